"""Sources: sharding, passes, resume and bad input, on real tar shards and real files."""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds

import odm
from odm.sources import (
    INDEX_EVERY,
    IterableSource,
    JsonlSource,
    MapSource,
    Source,
    TextSource,
    WebDatasetSource,
    as_source,
)

# -- fixtures: real files -------------------------------------------------------------------------------------


def write_tars(root: Path, sizes: list[int], prefix: str = "shard") -> list[str]:
    """Writes one webdataset tar per entry of ``sizes`` with webdataset's own writer; returns the paths."""
    paths = []
    for t, n in enumerate(sizes):
        path = str(root / f"{prefix}-{t:03d}.tar")
        with wds.TarWriter(path) as sink:
            for i in range(n):
                sink.write(
                    {
                        "__key__": f"{prefix}{t:03d}_{i:04d}",
                        "txt": f"{prefix} {t} {i}",
                        "cls": str(i % 7),
                        "json": json.dumps({"t": t, "i": i}),
                    }
                )
        paths.append(path)
    return paths


def write_lines(path: Path, lines: list[str], *, blank_every: int = 0, crlf: bool = False) -> Path:
    """Writes ``lines`` one per line, with a blank line after every ``blank_every``-th (0: none)."""
    end = "\r\n" if crlf else "\n"
    with open(path, "w", newline="") as f:
        for i, line in enumerate(lines):
            f.write(line + end)
            if blank_every and i % blank_every == 0:
                f.write("   " + end)
    return path


def ident(sample: Any) -> Any:
    """A hashable identity for a sample of any source used here."""
    if isinstance(sample, dict) and "__key__" in sample:
        return sample["__key__"]
    if isinstance(sample, dict):
        return json.dumps(sample, sort_keys=True)
    return sample


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


KINDS = ["iterable", "map", "webdataset", "jsonl", "text", "text_per_file"]


def make_source(kind: str, root: Path) -> tuple[Source, list[Any]]:
    """A source of ``kind`` over real data, and the identities of one whole pass in the unsharded order."""
    if kind == "iterable":
        items = [f"it{i}" for i in range(37)]
        return IterableSource(items), items
    if kind == "map":
        items = [f"map{i}" for i in range(37)]
        return MapSource(ListDataset(items)), items
    if kind == "webdataset":
        sizes = [9, 1, 12, 7]
        paths = write_tars(root, sizes)
        keys = [f"shard{t:03d}_{i:04d}" for t, n in enumerate(sizes) for i in range(n)]
        return WebDatasetSource(paths, shuffle_shards=False), keys
    if kind == "jsonl":
        a = write_lines(root / "a.jsonl", [json.dumps({"text": f"a{i}", "n": i}) for i in range(20)], blank_every=6)
        b = write_lines(root / "b.jsonl", [json.dumps({"text": f"b{i}"}) for i in range(17)])
        return JsonlSource([a, b], field="text"), [f"a{i}" for i in range(20)] + [f"b{i}" for i in range(17)]
    if kind == "text":
        a = write_lines(root / "a.txt", [f"a line {i}" for i in range(25)], blank_every=4, crlf=True)
        b = write_lines(root / "b.txt", [f"b line {i}" for i in range(12)])
        return TextSource([str(a), b]), [f"a line {i}" for i in range(25)] + [f"b line {i}" for i in range(12)]
    if kind == "text_per_file":
        files = []
        for i in range(11):
            p = root / f"doc{i:02d}.txt"
            p.write_text(f"document {i}\nsecond line\n")
            files.append(p)
        return TextSource(files, per_file=True), [f"document {i}\nsecond line\n" for i in range(11)]
    raise AssertionError(kind)


def read(src: Source, *, shard: int = 0, num_shards: int = 1, epoch: int = 0, start: int = 0, seed: int = 0) -> list:
    return [ident(s) for s in src.open(shard=shard, num_shards=num_shards, epoch=epoch, start=start, seed=seed)]


# -- sharding -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_shards", [1, 2, 3, 5, 12])
def test_shards_are_disjoint_and_their_union_is_the_whole_pass(tmp_path, kind, num_shards):
    src, everything = make_source(kind, tmp_path)
    shards = [read(src, shard=s, num_shards=num_shards, epoch=1, seed=3) for s in range(num_shards)]
    seen = Counter(x for part in shards for x in part)
    assert all(c == 1 for c in seen.values()), f"items in several shards: {[x for x, c in seen.items() if c > 1]}"
    assert set(seen) == set(everything)
    assert sum(len(p) for p in shards) == len(everything)


@pytest.mark.parametrize("kind", ["iterable", "webdataset", "jsonl", "text", "text_per_file"])
def test_an_unshuffled_source_reads_in_file_order(tmp_path, kind):
    src, everything = make_source(kind, tmp_path)
    assert read(src) == everything


def test_webdataset_gives_whole_tars_to_shards_when_there_are_enough(tmp_path):
    paths = write_tars(tmp_path, [3, 4, 5, 6, 7])
    src = WebDatasetSource(paths, shuffle_shards=False)
    for s in range(2):
        tars = {k.split("_")[0] for k in read(src, shard=s, num_shards=2)}
        assert tars == {f"shard{t:03d}" for t in range(s, 5, 2)}


def test_webdataset_with_fewer_tars_than_shards_strides_samples_over_the_pass(tmp_path):
    paths = write_tars(tmp_path, [5, 6])
    src = WebDatasetSource(paths, shuffle_shards=False)
    everything = read(src)
    for s in range(4):
        assert read(src, shard=s, num_shards=4) == everything[s::4]


# -- passes ---------------------------------------------------------------------------------------------------


def tar_sequence(keys: list[str]) -> list[str]:
    """The order in which tars appear in a list of sample keys."""
    out: list[str] = []
    for k in keys:
        t = k.split("_")[0]
        if not out or out[-1] != t:
            out.append(t)
    return out


def test_webdataset_reshuffles_the_tar_order_each_pass_from_the_seed(tmp_path):
    paths = write_tars(tmp_path, [2] * 8)
    src = WebDatasetSource(paths)
    assert src.shuffles
    orders = {(seed, e): tar_sequence(read(src, epoch=e, seed=seed)) for seed in (0, 1) for e in range(3)}
    assert orders[(0, 0)] != orders[(0, 1)] != orders[(0, 2)]
    assert orders[(0, 0)] != orders[(1, 0)]
    assert all(sorted(o) == [f"shard{t:03d}" for t in range(8)] for o in orders.values())
    # Seeded: another object over the same tars, in another process state, gives the same orders.
    again = WebDatasetSource(list(paths))
    assert tar_sequence(read(again, epoch=1, seed=0)) == orders[(0, 1)]
    # And the order is the documented one.
    assert orders[(1, 2)] == [f"shard{t:03d}" for t in src.tar_order(epoch=2, seed=1)]


def test_webdataset_without_shuffling_repeats_the_same_pass(tmp_path):
    src = WebDatasetSource(write_tars(tmp_path, [2] * 5), shuffle_shards=False)
    assert not src.shuffles
    assert read(src, epoch=0) == read(src, epoch=4, seed=9)


def test_map_source_reshuffles_each_pass_and_files_do_not(tmp_path):
    src, _ = make_source("map", tmp_path)
    assert src.shuffles and read(src, epoch=0) != read(src, epoch=1)
    assert read(src, epoch=1, seed=5) == read(src, epoch=1, seed=5)
    for kind in ["jsonl", "text"]:
        src, _ = make_source(kind, tmp_path)
        assert not src.shuffles and read(src, epoch=0) == read(src, epoch=3, seed=7)


# -- resume ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_shards", [1, 3, 6])
def test_resume_from_start_yields_exactly_the_remaining_items(tmp_path, kind, num_shards):
    src, _ = make_source(kind, tmp_path)
    for shard in range(num_shards):
        whole = read(src, shard=shard, num_shards=num_shards, epoch=2, seed=1)
        for start in range(len(whole) + 2):
            fresh, _ = make_source(kind, tmp_path)  # no cached counts or index: the cold path
            expected = whole[start:]
            assert read(fresh, shard=shard, num_shards=num_shards, epoch=2, seed=1, start=start) == expected
            assert read(src, shard=shard, num_shards=num_shards, epoch=2, seed=1, start=start) == expected


def test_webdataset_resume_over_remote_style_urls_skips_by_reading(tmp_path):
    paths = write_tars(tmp_path, [4, 6, 3])
    local = WebDatasetSource(paths)
    remote = WebDatasetSource([f"file://{p}" for p in paths])
    assert remote.size_hint() is None  # nothing known about a URL before reading it
    for start in range(14):
        assert read(remote, epoch=1, start=start) == read(local, epoch=1, start=start)
    assert remote.size_hint() == 13  # counted while reading


def test_webdataset_counts_samples_from_tar_headers_like_its_reader(tmp_path):
    paths = write_tars(tmp_path, [5, 0, 8])
    # A tar with metadata members and multi-file samples out of webdataset's own conventions.
    extra = tmp_path / "extra.tar"
    with wds.TarWriter(str(extra)) as sink:
        for i in range(4):
            sink.write({"__key__": f"dir/x{i}", "a.txt": b"1", "b.bin": b"\x00"})
    import tarfile

    with tarfile.open(extra, "a") as tf:
        info = tarfile.TarInfo("__meta__")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"{}"))
    src = WebDatasetSource([*paths, str(extra)])
    assert src.size_hint() == len(read(WebDatasetSource([*paths, str(extra)])))
    given = WebDatasetSource(paths, sample_counts=[5, 0, 8], shuffle_shards=False)
    assert given.size_hint() == 13
    assert read(given, start=6) == [f"shard002_{i:04d}" for i in range(1, 8)]


def test_line_resume_seeks_through_the_sparse_index_across_blocks_and_files(tmp_path):
    sizes = [INDEX_EVERY * 2 + 17, 5, INDEX_EVERY + 1]
    files, everything = [], []
    for f, n in enumerate(sizes):
        lines = [f"f{f}-{i}" for i in range(n)]
        files.append(write_lines(tmp_path / f"{f}.txt", lines, blank_every=97))
        everything += lines
    src = TextSource(files)
    for start in [
        0,
        1,
        INDEX_EVERY - 1,
        INDEX_EVERY,
        INDEX_EVERY + 3,
        2 * INDEX_EVERY + 16,
        2 * INDEX_EVERY + 17,
        2 * INDEX_EVERY + 22,
        len(everything) - 1,
        len(everything),
    ]:
        assert read(TextSource(files), start=start) == everything[start:], start
        assert read(src, start=start) == everything[start:], start
    for shard in range(3):
        for start in [0, 700, 1100]:
            assert read(src, shard=shard, num_shards=3, start=start) == everything[shard::3][start:]
    assert src.size_hint() == len(everything)


# -- samples and decoding -------------------------------------------------------------------------------------


def test_webdataset_samples_are_raw_bytes_or_decoded_by_webdataset(tmp_path):
    paths = write_tars(tmp_path, [3])
    raw = next(WebDatasetSource(paths).open(shard=0, num_shards=1, epoch=0, start=0, seed=0))
    assert raw["__key__"] == "shard000_0000" and raw["txt"] == b"shard 0 0" and raw["__url__"] == paths[0]
    dec = list(WebDatasetSource(paths, decode=True).open(shard=0, num_shards=1, epoch=0, start=1, seed=0))
    assert [(d["txt"], d["cls"], d["json"]) for d in dec] == [
        ("shard 0 1", 1, {"t": 0, "i": 1}),
        ("shard 0 2", 2, {"t": 0, "i": 2}),
    ]

    def upper(key: str, data: bytes) -> Any:
        return data.decode().upper() if key == ".txt" else None

    custom = next(WebDatasetSource(paths, decode=[upper]).open(shard=0, num_shards=1, epoch=0, start=0, seed=0))
    assert custom["txt"] == "SHARD 0 0" and custom["cls"] == 0


def test_brace_patterns_expand_to_the_tars(tmp_path):
    write_tars(tmp_path, [2, 3, 4])
    src = WebDatasetSource(str(tmp_path / "shard-{000..002}.tar"), shuffle_shards=False)
    assert len(src.urls) == 3 and src.size_hint() == 9


def test_text_lines_lose_their_line_endings_and_blank_lines_are_skipped(tmp_path):
    p = write_lines(tmp_path / "t.txt", ["x", "  y  ", "z"], blank_every=1, crlf=True)
    assert read(TextSource(p)) == ["x", "  y  ", "z"]


def test_jsonl_without_field_yields_whole_objects(tmp_path):
    p = write_lines(tmp_path / "a.jsonl", [json.dumps({"text": "a", "n": 1}), json.dumps([1, 2])])
    assert list(JsonlSource(p).open(shard=0, num_shards=1, epoch=0, start=0, seed=0)) == [{"text": "a", "n": 1}, [1, 2]]


def test_bad_jsonl_lines_name_the_file_and_line(tmp_path):
    p = write_lines(tmp_path / "bad.jsonl", [json.dumps({"text": "ok"}), "{not json", json.dumps({"other": 1})])
    with pytest.raises(ValueError, match=r"bad\.jsonl: non-empty line 2 is not valid JSON"):
        read(JsonlSource(p, field="text"))
    with pytest.raises(ValueError, match=r"bad\.jsonl: non-empty line 3 has no field 'text'"):
        read(JsonlSource(p, field="text"), start=2)


# -- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [WebDatasetSource, JsonlSource, TextSource])
def test_bad_paths_are_refused_at_construction_with_the_reason(tmp_path, cls):
    with pytest.raises(ValueError, match="no such file .*missing"):
        cls([tmp_path / "missing"])
    with pytest.raises(ValueError, match="is empty"):
        cls([])
    with pytest.raises(ValueError, match="not a regular file"):
        cls(tmp_path)
    with pytest.raises(TypeError, match="must be a path or a sequence of paths, got int"):
        cls(3)
    with pytest.raises(TypeError, match=r"must hold paths .* got 3 \(int\)"):
        cls([3])


def test_bad_options_are_refused_at_construction(tmp_path):
    paths = write_tars(tmp_path, [2, 2])
    with pytest.raises(TypeError, match="`decode` must be"):
        WebDatasetSource(paths, decode=3)
    with pytest.raises(TypeError, match="not a webdataset image spec"):
        WebDatasetSource(paths, decode="nonsense")
    with pytest.raises(ValueError, match="`sample_counts` has 1 entries but there are 2 urls"):
        WebDatasetSource(paths, sample_counts=[2])
    with pytest.raises(ValueError, match="`sample_counts` must be an integer >= 0, got -1"):
        WebDatasetSource(paths, sample_counts=[2, -1])
    p = write_lines(tmp_path / "a.jsonl", ["{}"])
    with pytest.raises(TypeError, match="`field` must be a string"):
        JsonlSource(p, field=1)  # type: ignore[arg-type]


def test_as_source_wraps_iterables_datasets_and_refuses_one_shot_iterators(tmp_path):
    src, _ = make_source("text", tmp_path)
    assert as_source(src) is src
    assert isinstance(as_source([1, 2]), IterableSource)
    assert isinstance(as_source(ListDataset([1, 2])), MapSource)
    with pytest.raises(TypeError, match="domain 'web'.*one-shot iterator"):
        as_source(iter([1, 2]), domain="web")
    with pytest.raises(TypeError, match="domain 'web'.*JsonlSource or TextSource"):
        as_source("data.jsonl", domain="web")


# -- through real DataLoader workers --------------------------------------------------------------------------


def identities(samples: list[Any]) -> list[Any]:
    """collate_fn: the identities of a batch's samples (module level, so spawn can pickle it)."""
    return [ident(s) for s in samples]


def file_sources(root: Path) -> tuple[dict[str, Source], set[Any]]:
    """Three domains over real files: 40 samples each, so each of 2 workers holds a multiple of the batch."""
    tars = write_tars(root, [10, 10, 10, 10], prefix="web")
    jsonl = write_lines(root / "q.jsonl", [json.dumps({"text": f"q{i}"}) for i in range(40)], blank_every=9)
    text = [write_lines(root / f"c{f}.txt", [f"c{f}-{i}" for i in range(20)]) for f in range(2)]
    sources: dict[str, Source] = {
        "web": WebDatasetSource(tars, decode=True),
        "qa": JsonlSource(jsonl, field="text"),
        "code": TextSource(text),
    }
    expected = {f"web{t:03d}_{i:04d}" for t in range(4) for i in range(10)}
    expected |= {f"q{i}" for i in range(40)} | {f"c{f}-{i}" for f in range(2) for i in range(20)}
    return sources, expected


@pytest.mark.slow
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_a_loader_with_two_workers_sees_every_sample_of_a_pass_exactly_once(tmp_path, context):
    sources, expected = file_sources(tmp_path)
    loader = odm.MixtureLoader(
        sources,
        batch_size=5,
        policy=odm.policies.Fixed([0.5, 0.3, 0.2]),
        num_workers=2,
        seed=4,
        collate_fn=identities,
        max_passes=1,
        multiprocessing_context=context,
        timeout=60,
    )
    seen = []
    names = loader.domains
    for batch in loader:
        assert 1 <= len(batch["data"]) <= 5
        for item, d in zip(batch["data"], batch["domain"].tolist()):
            prefix = {"web": "web", "qa": "q", "code": "c"}[names[d]]
            assert str(item).startswith(prefix), (item, names[d])
        seen += batch["data"]
    counts = Counter(seen)
    assert [x for x, c in counts.items() if c > 1] == []
    assert set(counts) == expected


class Faulty(Source):
    """Yields ``ok`` items, then raises (a corrupt file, a dropped connection)."""

    def __init__(self, ok: int) -> None:
        self.ok = ok

    def open(self, *, shard: int, num_shards: int, epoch: int, start: int, seed: int) -> Iterator[Any]:
        yield from range(start, self.ok)
        raise OSError("disk on fire")


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_source_that_raises_mid_stream_surfaces_in_the_main_process_naming_its_domain(tmp_path, num_workers):
    sources, _ = file_sources(tmp_path)
    sources["broken"] = Faulty(ok=3)
    kwargs: dict[str, Any] = {"timeout": 60, "multiprocessing_context": "fork"} if num_workers else {}
    loader = odm.MixtureLoader(sources, batch_size=4, num_workers=num_workers, collate_fn=identities, **kwargs)
    with pytest.raises(RuntimeError, match=r"domain 'broken' raised OSError: disk on fire"):
        for _ in loader:
            pass


def test_size_hints_feed_natural_proportions(tmp_path):
    sources, _ = file_sources(tmp_path)
    sizes = [s.size_hint() for s in sources.values()]
    assert sizes == [40, 40, 40]
    loader = odm.MixtureLoader(sources, batch_size=4, policy=odm.policies.Natural(sizes), collate_fn=identities)
    np.testing.assert_allclose(loader.mixer.proportions, [1 / 3] * 3)


# -- sample shuffle buffer ------------------------------------------------------------------------------------


def buffer_reference(samples: list[Any], size: int, seed_int: int) -> list[Any]:
    """webdataset's shuffle buffer written out plainly: fill, swap out a random one per new sample, drain."""
    import random

    rng, buf, out = random.Random(seed_int), [], []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
        else:
            j = rng.randrange(size)
            out.append(buf[j])
            buf[j] = s
    rng.shuffle(buf)
    return out + buf


@pytest.mark.parametrize("num_shards", [1, 2, 6])
def test_webdataset_shuffle_buffer_permutes_each_shard_and_resumes_exactly(tmp_path, num_shards):
    paths = write_tars(tmp_path, [7, 5, 9])
    plain = WebDatasetSource(paths, shuffle_shards=False)
    src = WebDatasetSource(paths, shuffle_shards=False, shuffle=4)
    assert src.shuffles
    for shard in range(num_shards):
        base = read(plain, shard=shard, num_shards=num_shards)
        whole = read(src, shard=shard, num_shards=num_shards, epoch=1, seed=2)
        key = np.random.SeedSequence([2, 1, shard, num_shards, 0xB0F]).generate_state(1)
        assert whole == buffer_reference(base, 4, int(key[0]))  # the documented buffer, seeded as documented
        for start in range(len(whole) + 1):  # resume replays the buffer: the exact remainder
            assert read(src, shard=shard, num_shards=num_shards, epoch=1, seed=2, start=start) == whole[start:]
    a = read(src, epoch=0, seed=2)
    assert a != read(src, epoch=1, seed=2) and a != read(plain) and sorted(a) == sorted(read(plain))


def test_a_buffer_of_one_keeps_the_order(tmp_path):
    paths = write_tars(tmp_path, [4, 4])
    assert read(WebDatasetSource(paths, shuffle_shards=False, shuffle=1)) == read(
        WebDatasetSource(paths, shuffle_shards=False)
    )


# -- the sharding contract ------------------------------------------------------------------------------------


class SplitsByWorker(torch.utils.data.IterableDataset):
    """The torch docs' pattern: splits itself over DataLoader workers by ``get_worker_info()``."""

    def __iter__(self) -> Iterator[int]:
        info = torch.utils.data.get_worker_info()
        lo, step = (0, 1) if info is None else (info.id, info.num_workers)
        return iter(range(lo, 12, step))


def worker_shard(seed: int) -> list[int]:
    """Shard 1 of 2 of ``SplitsByWorker`` as odm reads it inside a real DataLoader worker."""
    info = torch.utils.data.get_worker_info()
    assert info is not None  # really inside a worker
    return list(IterableSource(SplitsByWorker()).open(shard=1, num_shards=2, epoch=0, start=0, seed=seed))


class _OneShard(torch.utils.data.IterableDataset):
    def __iter__(self) -> Iterator[list[int]]:
        yield worker_shard(0)
        # The worker info is back for everything else in the worker.
        assert torch.utils.data.get_worker_info() is not None


def test_a_worker_splitting_dataset_is_split_once_by_odm_inside_a_real_worker():
    loader = torch.utils.data.DataLoader(_OneShard(), batch_size=None, num_workers=1, multiprocessing_context="fork")
    assert list(loader) == [[1, 3, 5, 7, 9, 11]]


def test_sequences_are_sliced_not_streamed(tmp_path):
    src = as_source(range(10**12))  # slicing a range is O(1): a stream would never get here
    assert list(islice(src.open(shard=3, num_shards=4, epoch=0, start=10**9, seed=0), 2)) == [
        4 * 10**9 + 3,
        4 * 10**9 + 7,
    ]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_shards", [1, 2, 5, 12])
def test_a_strided_source_reads_a_stride_of_one_pass_order(tmp_path, kind, num_shards):
    # The invariant a resume on another topology builds on: shard s of n reads pass[s::n], pass from (seed, epoch).
    src, _ = make_source(kind, tmp_path)
    whole = read(src, epoch=2, seed=4)
    if not src.is_strided(num_shards):
        assert kind == "webdataset" and num_shards <= 4  # whole tars per shard
        return
    for s in range(num_shards):
        assert read(src, shard=s, num_shards=num_shards, epoch=2, seed=4) == whole[s::num_shards]


# -- Hugging Face datasets ------------------------------------------------------------------------------------


def hf_datasets() -> Any:
    return pytest.importorskip("datasets", reason="Hugging Face `datasets` is not installed")


def test_a_hugging_face_dataset_is_map_style_reshuffled_per_pass_and_resumes_in_o1():
    datasets = hf_datasets()
    from odm.hf_sources import HFDatasetSource

    ds = datasets.Dataset.from_dict({"x": list(range(40))})
    src = as_source(ds)
    assert isinstance(src, HFDatasetSource) and src.shuffles and src.size_hint() == 40
    rows = [r["x"] for r in src.open(shard=0, num_shards=1, epoch=0, start=0, seed=1)]
    again = [r["x"] for r in src.open(shard=0, num_shards=1, epoch=1, start=0, seed=1)]
    assert sorted(rows) == sorted(again) == list(range(40)) and rows != again
    assert rows == src.pass_order(epoch=0, seed=1).tolist()
    # O(1) resume: opening at `start` reads only the rows it yields.
    reads: list[int] = []

    class Counting:
        def __len__(self) -> int:
            return len(ds)

        def __getitem__(self, i: int) -> Any:
            raise AssertionError("rows are fetched in chunks")

        def __getitems__(self, keys: list[int]) -> list[Any]:
            reads.extend(keys)
            return ds.__getitems__(keys)

    resumed = HFDatasetSource(Counting()).open(shard=0, num_shards=1, epoch=0, start=37, seed=1)
    assert [r["x"] for r in resumed] == rows[37:] and len(reads) == 3


def test_a_hugging_face_iterable_dataset_is_sharded_by_its_own_shards():
    datasets = hf_datasets()
    from odm.hf_sources import HFIterableSource

    ds = datasets.Dataset.from_dict({"x": list(range(12))}).to_iterable_dataset(num_shards=4)
    src = as_source(ds)
    assert isinstance(src, HFIterableSource) and not src.is_strided(2) and src.is_strided(5)
    parts = [[r["x"] for r in src.open(shard=s, num_shards=2, epoch=0, start=0, seed=0)] for s in range(2)]
    assert parts == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]  # whole HF shards (files), contiguous
    assert [r["x"] for r in src.open(shard=1, num_shards=2, epoch=0, start=4, seed=0)] == [10, 11]
    # Fewer HF shards than odm shards: every n-th row of the stream.
    assert [r["x"] for r in src.open(shard=1, num_shards=5, epoch=0, start=1, seed=0)] == [6, 11]


def test_a_shuffled_hugging_face_iterable_reshuffles_per_pass_identically_in_every_process():
    datasets = hf_datasets()
    base = datasets.Dataset.from_dict({"x": list(range(30))}).to_iterable_dataset(num_shards=3)
    src = as_source(base.shuffle(seed=3, buffer_size=8))
    passes = [[r["x"] for r in src.open(shard=0, num_shards=1, epoch=e, start=0, seed=0)] for e in range(2)]
    assert passes[0] != passes[1] and sorted(passes[0]) == sorted(passes[1]) == list(range(30))
    other = as_source(base.shuffle(seed=3, buffer_size=8))  # another object: another process
    assert [r["x"] for r in other.open(shard=0, num_shards=1, epoch=1, start=0, seed=0)] == passes[1]
