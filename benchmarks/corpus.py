"""Builds the 12-domain text corpus described in ``docs/benchmarks.md`` ("The corpus") from package registries only.

    python benchmarks/corpus.py                  # 50 MB cap per domain, into ~/.cache/odm/corpus
    python benchmarks/corpus.py --max-mb 5       # the quick build (what `quality.py --quick` needs)

Fetches Debian packages with ``apt-get download`` (never installs them) and two pinned PyPI wheels with
``pip download --no-deps``, unpacks them (``dpkg-deb -x``, ``zipfile``), extracts plain text per domain, and
writes one folder per domain holding ``train.jsonl``, ``feedback.jsonl`` and ``test.jsonl`` (``{"text": ...,
"id": ...}`` per line), plus a ``manifest.json`` recording the fetched package versions, the caps and the bytes,
documents and groups per split.

Split, three ways: ``train``; ``feedback``, held-out documents a policy may evaluate on while it trains
(Aioli, Skill-It and DynamixSFT rewards); ``test``, held-out documents used only to score the trained model. The
unit of the split is a *group* of documents that share a source (:func:`group_of`): a source file's folder for
code (a Go or C package, a Python package), one file for licences, man pages, docs and fortune files, one
botocore service, and blocks of ~128 KB of consecutive records for the single-file sources (the dictionary,
the Bible, set.mm), so held-out text never has a neighbour in train. A group goes to ``test`` when
``int(sha1("<domain>/<group>"), 16) % 1000 < 50``, to ``feedback`` when that is in ``[50, 100)``; the
assignment of a group never depends on the others, so it is stable when documents are added. Cap: ``train``
takes documents in the order of their own hash (a deterministic sample spread over the whole domain, not its
first folder) until it holds ``--max-mb`` MB; ``feedback`` and ``test`` are drawn the same way from the whole
domain (not only the capped part) up to ``--held-out-mb`` each, so a small cap still leaves them many documents.

Idempotent: downloads are cached under ``<out>/_downloads``; a domain whose files and manifest entry match the
requested cap is not rebuilt. Nothing here is committed to the repository.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import itertools
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

RECIPE_VERSION = 2  # 2: three-way split by source group (was: train/val by document)
DEFAULT_OUT = Path(os.environ.get("ODM_CORPUS", Path.home() / ".cache" / "odm" / "corpus"))
TEST_PER_MILLE = 50  # groups with sha1 % 1000 < 50 are test ...
FEEDBACK_PER_MILLE = 50  # ... and the next 50 per mille are feedback
SPLITS = ("train", "feedback", "test")
BLOCK_RUNS = 8  # consecutive record runs per group in single-file sources (~128 KB)
RUN_BYTES = 16_384  # target size of a document made of consecutive records

# PyPI wheels pinned by the corpus recipe (docs/benchmarks.md).
WHEELS = {"licensedcode-data": "32.1.0", "botocore": "1.43.11"}

Doc = tuple[str, str]  # (doc id, text)


# -- the twelve domains: packages and extractors ---------------------------------------------------------------


def _read_text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _files(root: Path, pattern: str, *, max_bytes: int | None = None, skip: Iterable[str] = ()) -> Iterator[Path]:
    """Regular files (never links) under ``root`` matching ``pattern``, sorted, minus ``skip`` path parts."""
    skip = tuple(skip)
    for path in sorted(root.glob(pattern)):
        if path.is_symlink() or not path.is_file():
            continue
        rel = path.relative_to(root).as_posix()
        if any(s in rel for s in skip):
            continue
        if max_bytes is not None and path.stat().st_size > max_bytes:
            continue
        yield path


def _runs(records: Iterable[str], prefix: str, target: int = RUN_BYTES) -> Iterator[Doc]:
    """Groups consecutive records into documents of about ``target`` bytes, ids ``prefix:<index>``."""
    buf: list[str] = []
    size = 0
    index = 0
    for rec in records:
        buf.append(rec)
        size += len(rec.encode("utf-8"))
        if size >= target:
            yield f"{prefix}:{index}", "".join(buf)
            buf, size, index = [], 0, index + 1
    if buf:
        yield f"{prefix}:{index}", "".join(buf)


def _lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def code_python(root: Path) -> Iterator[Doc]:
    base = root / "usr/lib/python3.11"
    for p in _files(base, "**/*.py", max_bytes=256_000, skip=("site-packages/", "dist-packages/")):
        yield p.relative_to(base).as_posix(), _read_text(p.read_bytes())


def code_c(root: Path) -> Iterator[Doc]:
    tarballs = sorted((root / "usr/src/glibc").glob("glibc-*.tar.xz"))
    if not tarballs:
        raise FileNotFoundError("glibc-source: no usr/src/glibc/glibc-*.tar.xz in the package")
    with tarfile.open(tarballs[0], "r:xz") as tar:
        for m in tar:
            if not m.isfile() or not m.name.endswith(".c") or m.size > 200_000:
                continue
            if "/iconvdata/" in m.name or "/localedata/" in m.name:
                continue
            f = tar.extractfile(m)
            assert f is not None
            yield m.name, _read_text(f.read())


def code_go(root: Path) -> Iterator[Doc]:
    base = root / "usr/share/go-1.19/src"
    for p in _files(base, "**/*.go", max_bytes=256_000, skip=("testdata/",)):
        yield p.relative_to(base).as_posix(), _read_text(p.read_bytes())


def legal(root: Path) -> Iterator[Doc]:
    wheel = next(iter(sorted(root.glob("licensedcode_data-*.whl"))))
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(z.namelist()):
            if not (name.startswith("licensedcode/data/licenses/") and name.endswith(".LICENSE")):
                continue
            text = _read_text(z.read(name))
            if text.startswith("---"):  # YAML front matter: metadata, not licence text
                end = text.find("\n---", 3)
                if end >= 0:
                    text = text[text.find("\n", end + 1) + 1 :]
            if text.strip():
                yield name.rsplit("/", 1)[1], text


_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _dictd_number(s: str) -> int:
    """dictd's index numbers: base 64, most significant digit first."""
    n = 0
    for c in s:
        n = n * 64 + _B64[c]
    return n


def dictionary(root: Path) -> Iterator[Doc]:
    base = root / "usr/share/dictd"
    data = gzip.decompress((base / "gcide.dict.dz").read_bytes())  # dictzip is gzip with an index
    starts = set()
    for line in (base / "gcide.index").read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            starts.add(_dictd_number(parts[1]))
    bounds = [*sorted(starts), len(data)]
    entries = (_read_text(data[a:b]) for a, b in itertools.pairwise(bounds))
    yield from _runs(entries, "gcide")


def _r_unserialize(buf: bytes) -> object:
    """A minimal reader of R's XDR serialisation (enough for character vectors, lists and attributes)."""
    if buf[:2] != b"X\n":
        raise ValueError("not an XDR R serialisation")
    pos = 2
    refs: list[object] = []

    def integer() -> int:
        nonlocal pos
        (v,) = struct.unpack_from(">i", buf, pos)
        pos += 4
        return int(v)

    def length() -> int:
        n = integer()
        if n == -1:
            hi, lo = integer(), integer()
            n = (hi << 32) + lo
        return n

    version = integer()
    integer(), integer()  # writer and minimal reader versions
    if version == 3:
        n = integer()
        pos += n  # native encoding name

    def item() -> object:
        nonlocal pos
        flags = integer()
        kind = flags & 0xFF
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind in (254, 253, 252, 251, 250, 242, 241):  # NULL, environments, special values
            return None
        if kind == 255:  # reference
            idx = flags >> 8
            return refs[(idx if idx else integer()) - 1]
        if kind == 1:  # symbol
            name = item()
            refs.append(name)
            return name
        if kind in (2, 3, 5, 6, 17, 239, 240):  # pairlist-like
            attr = item() if has_attr else None
            tag = item() if has_tag else None
            car = item()
            cdr = item()
            rest = cdr if isinstance(cdr, list) else []
            del attr
            return [(tag, car), *rest]
        if kind == 9:  # CHARSXP
            n = integer()
            if n == -1:
                return None
            s = buf[pos : pos + n].decode("utf-8", errors="replace")
            pos += n
            return s
        if kind in (10, 13):  # logical, integer
            n = length()
            pos += 4 * n
            out: object = None
        elif kind == 14:  # double
            n = length()
            pos += 8 * n
            out = None
        elif kind == 15:  # complex
            n = length()
            pos += 16 * n
            out = None
        elif kind == 24:  # raw
            n = length()
            pos += n
            out = None
        elif kind in (16, 19, 20):  # character vector, list, expression
            n = length()
            out = [item() for _ in range(n)]
        else:
            raise ValueError(f"R serialisation type {kind} is not supported by this reader")
        if has_attr:
            item()
        return out

    return item()


def prose(root: Path) -> Iterator[Doc]:
    bible = root / "usr/bin/bible"
    out = subprocess.run(
        [str(bible), "-p", str(root / "usr/lib"), "-l10000", "Gen1:1-Rev22:21"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=True,
    ).stdout.decode("utf-8", errors="replace")
    chapters = re.split(r"\n(?=\S[^\n]* \d+\n)", out)
    yield from _runs((c + "\n" for c in chapters), "kjv")
    rdb = root / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
    data = rdb.read_bytes()
    pos, index = 0, 0
    while pos + 4 < len(data):
        d = zlib.decompressobj()
        raw = d.decompress(data[pos + 4 :])
        consumed = len(data) - pos - 4 - len(d.unused_data)
        pos += 4 + consumed
        obj = _r_unserialize(raw)
        if isinstance(obj, list) and obj and all(isinstance(s, str) or s is None for s in obj):
            lines = [(s or "") + "\n" for s in obj]
            yield from _runs(lines, f"austen{index}")
            index += 1


def man_pages(root: Path) -> Iterator[Doc]:
    base = root / "usr/share/man"
    for p in _files(base, "man*/*.gz"):
        text = _read_text(gzip.decompress(p.read_bytes()))
        if text.lstrip().startswith(".so ") and len(text) < 200:
            continue  # a stub pointing at another page
        yield p.relative_to(base).as_posix(), text


def tech_docs(root: Path) -> Iterator[Doc]:
    base = root / "usr/share/doc/python3.11/html/_sources"
    for p in _files(base, "**/*.rst.txt"):
        yield p.relative_to(base).as_posix(), _read_text(p.read_bytes())


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _fortune_docs(paths: Iterable[Path], base: Path) -> Iterator[Doc]:
    for p in paths:
        if p.suffix == ".dat":
            continue
        u8 = p.with_name(p.name + ".u8")
        if u8.is_file() and not u8.is_symlink():
            continue  # the same quotes, in UTF-8, sit beside it (often `X.u8` is only a link to `X`)
        raw = p.read_bytes()
        if b"\0" in raw:
            continue  # a binary index
        text = _ANSI.sub("", _read_text(raw))
        quotes = [q.strip("\n") + "\n%\n" for q in re.split(r"^%$", text, flags=re.M) if q.strip()]
        yield from _runs(quotes, p.relative_to(base).as_posix())


def quotes_en(root: Path) -> Iterator[Doc]:
    base = root / "usr/share/games/fortunes"
    yield from _fortune_docs(_files(base, "*"), base)


def multilingual(root: Path) -> Iterator[Doc]:
    base = root / "usr/share/games"
    yield from _fortune_docs(_files(base, "**/*", skip=("es/off/",)), base)


def json_data(root: Path) -> Iterator[Doc]:
    wheel = next(iter(sorted(root.glob("botocore-*.whl"))))
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(z.namelist()):
            if re.fullmatch(r"botocore/data/[^/]+/[^/]+/service-2\.json\.gz", name):
                text = _read_text(gzip.decompress(z.read(name)))
                yield from _runs(_lines(text), name.split("/")[2] + "/" + name.split("/")[3], target=65_536)


def math(root: Path) -> Iterator[Doc]:
    setmm = (root / "usr/share/metamath/databases/set.mm").read_text(encoding="utf-8", errors="replace")
    setmm = re.sub(r"\$=.*?\$\.", "$= ... $.", setmm, flags=re.S)  # compressed proofs are not text
    yield from _runs(_lines(setmm), "set.mm")
    for p in _files(root / "usr/share/pari/doc", "*.tex"):
        yield from _runs(_lines(_read_text(p.read_bytes())), "pari/" + p.name, target=65_536)


# domain -> (Debian packages, PyPI wheels, extractor)
DOMAINS: dict[str, tuple[tuple[str, ...], tuple[str, ...], Callable[[Path], Iterator[Doc]]]] = {
    "code_python": (("libpython3.11-minimal", "libpython3.11-stdlib"), (), code_python),
    "code_c": (("glibc-source",), (), code_c),
    "code_go": (("golang-1.19-src",), (), code_go),
    "legal": ((), ("licensedcode-data",), legal),
    "dictionary": (("dict-gcide",), (), dictionary),
    "prose": (("bible-kjv", "bible-kjv-text", "r-cran-janeaustenr"), (), prose),
    "man_pages": (("manpages", "manpages-dev"), (), man_pages),
    "tech_docs": (("python3.11-doc",), (), tech_docs),
    "quotes_en": (("fortunes", "fortunes-min", "fortunes-debian-hints", "fortune-anarchism"), (), quotes_en),
    "multilingual": (
        tuple(f"fortunes-{x}" for x in ("de", "it", "es", "ru", "zh", "cs", "pl", "bg", "eo", "br", "mario")),
        (),
        multilingual,
    ),
    "json_data": ((), ("botocore",), json_data),
    "math": (("metamath-databases", "pari-doc"), (), math),
}


# -- fetching ---------------------------------------------------------------------------------------------------


def _deb_version(deb: Path) -> str:
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True
    ).stdout.strip()


def fetch(packages: Iterable[str], wheels: Iterable[str], downloads: Path) -> dict[str, str]:
    """Downloads what is missing into ``downloads``; returns ``{package: version}`` of what is there."""
    downloads.mkdir(parents=True, exist_ok=True)
    packages, wheels = list(packages), list(wheels)
    missing = [p for p in packages if not list(downloads.glob(f"{p}_*.deb"))]
    if missing:
        cmd = ["apt-get", "download", *missing]
        res = subprocess.run(cmd, cwd=downloads, capture_output=True, text=True)
        if res.returncode != 0:  # stale package lists: refresh once and retry
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
            res = subprocess.run(cmd, cwd=downloads, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{res.stderr[-2000:]}")
    for w in wheels:
        norm = w.replace("-", "_")
        if not list(downloads.glob(f"{norm}-{WHEELS[w]}-*.whl")):
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "-q",
                "-d",
                str(downloads),
                f"{w}=={WHEELS[w]}",
            ]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{res.stderr[-2000:]}")
    versions = {}
    for p in packages:
        versions[p] = _deb_version(sorted(downloads.glob(f"{p}_*.deb"))[-1])
    for w in wheels:
        versions[f"pypi:{w}"] = WHEELS[w]
    return versions


def unpack(packages: Iterable[str], wheels: Iterable[str], downloads: Path, into: Path) -> None:
    for p in packages:
        deb = sorted(downloads.glob(f"{p}_*.deb"))[-1]
        subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True)
    for w in wheels:
        whl = sorted(downloads.glob(f"{w.replace('-', '_')}-{WHEELS[w]}-*.whl"))[-1]
        shutil.copy(whl, into / whl.name)


# -- splitting and writing --------------------------------------------------------------------------------------


def doc_hash(domain: str, doc_id: str) -> int:
    return int(hashlib.sha1(f"{domain}/{doc_id}".encode()).hexdigest(), 16)


def group_of(domain: str, doc_id: str) -> str:
    """The unit of the split: documents of one group are all in the same split.

    ``dir/file`` ids (code, man pages, docs) group by folder (a package); top-level files are their own group;
    run ids ``source:index`` group by source (a fortune file, a botocore service, a pari manual) unless the
    source is one big stream of records (the dictionary, the Bible, Austen, set.mm): then by blocks of
    ``BLOCK_RUNS`` consecutive runs.
    """
    if ":" in doc_id:
        source, index = doc_id.rsplit(":", 1)
        if domain == "json_data":  # "service/version:i" -> the service
            return source.split("/", 1)[0]
        if source in ("gcide", "kjv", "set.mm") or source.startswith("austen"):
            return f"{source}:{int(index) // BLOCK_RUNS}"
        return source
    if domain in ("code_python", "code_go", "code_c") and "/" in doc_id:
        return doc_id.rsplit("/", 1)[0]
    return doc_id


def split_of(domain: str, doc_id: str) -> str:
    """The split rule: ``test`` iff ``sha1("<domain>/<group>") mod 1000 < 50``, ``feedback`` iff in ``[50, 100)``."""
    h = doc_hash(domain, group_of(domain, doc_id)) % 1000
    if h < TEST_PER_MILLE:
        return "test"
    return "feedback" if h < TEST_PER_MILLE + FEEDBACK_PER_MILLE else "train"


def write_domain(
    domain: str, docs: Iterable[Doc], out: Path, max_bytes: int, held_out_bytes: int | None = None
) -> dict[str, int]:
    """Splits and caps ``docs``, writes ``out/<domain>/{train,feedback,test}.jsonl``; returns sizes.

    ``held_out_bytes`` caps ``feedback`` and ``test`` each (default: ``max_bytes // 5``).
    """
    held_out_bytes = max_bytes // 5 if held_out_bytes is None else held_out_bytes
    caps = {"train": max_bytes, "feedback": held_out_bytes, "test": held_out_bytes}
    ordered = sorted(((doc_hash(domain, i), i, t) for i, t in docs if t.strip()), key=lambda x: x[0])
    folder = out / domain
    folder.mkdir(parents=True, exist_ok=True)
    stats = {f"{s}_{k}": 0 for s in SPLITS for k in ("bytes", "docs", "groups")} | {"available_bytes": 0}
    groups: dict[str, set[str]] = {s: set() for s in SPLITS}
    tmp = {s: folder / f".{s}.jsonl.tmp" for s in SPLITS}
    files = {s: tmp[s].open("w", encoding="utf-8") for s in SPLITS}
    try:
        for _, doc_id, text in ordered:
            n = len(text.encode("utf-8"))
            stats["available_bytes"] += n
            split = split_of(domain, doc_id)
            if stats[f"{split}_bytes"] >= caps[split]:
                continue
            files[split].write(json.dumps({"text": text, "id": doc_id}, ensure_ascii=False) + "\n")
            stats[f"{split}_bytes"] += n
            stats[f"{split}_docs"] += 1
            groups[split].add(group_of(domain, doc_id))
    finally:
        for f in files.values():
            f.close()
    for s in SPLITS:
        stats[f"{s}_groups"] = len(groups[s])
        tmp[s].replace(folder / f"{s}.jsonl")
    stale = folder / "val.jsonl"  # recipe 1's two-way split: never read beside the three-way one
    if stale.exists():
        stale.unlink()
    return stats


def build(
    out: Path = DEFAULT_OUT,
    *,
    max_mb: float = 50.0,
    held_out_mb: float | None = None,
    domains: Iterable[str] | None = None,
    force: bool = False,
) -> dict:
    """Builds (or completes) the corpus under ``out``; returns the manifest."""
    names = list(DOMAINS) if domains is None else list(domains)
    unknown = [d for d in names if d not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}; known: {list(DOMAINS)}")
    if not max_mb > 0:
        raise ValueError(f"`max_mb` must be positive, got {max_mb!r}")
    held_out_mb = max_mb / 5 if held_out_mb is None else held_out_mb
    if not held_out_mb > 0:
        raise ValueError(f"`held_out_mb` must be positive, got {held_out_mb!r}")
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.setdefault("domains", {})
    manifest.update(
        recipe_version=RECIPE_VERSION,
        max_mb=max_mb,
        held_out_mb=held_out_mb,
        test_per_mille=TEST_PER_MILLE,
        feedback_per_mille=FEEDBACK_PER_MILLE,
    )
    manifest.pop("val_per_mille", None)
    downloads = out / "_downloads"
    for domain in names:
        packages, wheels, extract = DOMAINS[domain]
        entry = manifest["domains"].get(domain, {})
        done = all((out / domain / f"{s}.jsonl").exists() for s in SPLITS)
        same = (entry.get("max_mb"), entry.get("held_out_mb"), entry.get("recipe_version"))
        if done and not force and same == (max_mb, held_out_mb, RECIPE_VERSION):
            print(f"{domain:<13} up to date ({entry['train_bytes'] / 1e6:.1f} MB train)")
            continue
        start = time.perf_counter()
        versions = fetch(packages, wheels, downloads)
        with tempfile.TemporaryDirectory(prefix=f"odm-{domain}-") as tmp:
            unpack(packages, wheels, downloads, Path(tmp))
            stats = write_domain(domain, extract(Path(tmp)), out, int(max_mb * 1e6), int(held_out_mb * 1e6))
        entry = {**stats, "packages": versions, "max_mb": max_mb, "held_out_mb": held_out_mb}
        entry["recipe_version"] = RECIPE_VERSION
        entry["seconds"] = round(time.perf_counter() - start, 1)
        manifest["domains"][domain] = entry
        manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        print(
            f"{domain:<13} "
            + "  ".join(
                f"{s} {stats[s + '_bytes'] / 1e6:5.2f} MB ({stats[s + '_docs']} docs, {stats[s + '_groups']} groups)"
                for s in SPLITS
            )
            + f"  of {stats['available_bytes'] / 1e6:6.1f} MB  [{entry['seconds']} s]"
        )
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--max-mb", type=float, default=50.0, help="cap per domain, MB of text (default 50; quick: 5)")
    parser.add_argument(
        "--held-out-mb", type=float, help="cap of the feedback and the test split each, MB (default max-mb / 5)"
    )
    parser.add_argument("--domains", nargs="+", choices=list(DOMAINS), help="build only these domains")
    parser.add_argument("--force", action="store_true", help="rebuild domains that are up to date")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    build(args.out, max_mb=args.max_mb, held_out_mb=args.held_out_mb, domains=args.domains, force=args.force)
    print(f"corpus in {args.out} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
