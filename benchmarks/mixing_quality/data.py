"""The benchmark's data: a multi-domain corpus split three ways, its regimes, byte windows and evaluation.

A corpus folder holds one folder per domain with ``train.jsonl``, ``feedback.jsonl`` and ``test.jsonl``
(``{"text": ...}`` per line; ``corpus.py`` builds one): the loader draws from ``train``; a policy that asks for
held-out losses (Aioli, Skill-It) is evaluated on ``feedback``; the reported scores come from ``test`` only.
Regimes change the corpus, never the protocol: ``domains`` (a second composition), ``caps`` (the
data-constrained regime: those domains repeat) and ``junk`` (an added domain of random bytes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from model import per_sequence_loss

DEFAULT_DATA = Path(os.environ.get("ODM_CORPUS", Path.home() / ".cache" / "odm" / "corpus"))

__all__ = [
    "DEFAULT_DATA",
    "JUNK",
    "ByteWindows",
    "Corpus",
    "eval_windows",
    "evaluate",
    "junk_bytes",
    "load_corpus",
    "parse_caps",
    "read_domain",
]


class ByteWindows(torch.utils.data.Dataset):
    """Non-overlapping windows of ``length`` bytes (stride ``length - 1``) over one domain's text."""

    def __init__(self, data: np.ndarray, length: int) -> None:
        self.data = torch.from_numpy(data)
        self.length = length
        self.count = max(0, (len(data) - 1) // (length - 1))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> torch.Tensor:
        start = i * (self.length - 1)
        return self.data[start : start + self.length].long()


def _documents(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _join(docs: Sequence[str], max_bytes: int | None = None) -> np.ndarray:
    """Documents as one byte array (separated by a blank line), at most ``max_bytes`` (whole documents, then cut)."""
    chunks: list[bytes] = []
    total = 0
    for text in docs:
        raw = text.encode("utf-8") + b"\n\n"
        chunks.append(raw)
        total += len(raw)
        if max_bytes is not None and total >= max_bytes:
            break
    data = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    return (data if max_bytes is None else data[:max_bytes]).copy()


def read_domain(path: Path, max_bytes: int | None = None) -> np.ndarray:
    """The documents of a JSONL file as one byte array (documents separated by a blank line)."""
    return _join(_documents(path), max_bytes)


JUNK = "junk"  # the name of the added random-bytes domain (``--junk``); never part of the scored mean


def junk_bytes(size: int, *, seed: int) -> np.ndarray:
    """``size`` uniformly random bytes: 8 bits per byte is the best any model can do, and nothing transfers."""
    return np.random.default_rng(seed).integers(0, 256, size=size, dtype=np.uint8)


@dataclasses.dataclass
class Corpus:
    """One domain per key: ``train`` (what the loader draws), ``feedback`` (held-out text a policy may be
    evaluated on while it trains) and ``test`` (held-out text used only for the reported scores).

    ``caps``: the per-domain training caps applied (bytes), ``scored``: the domains of the headline mean (all but
    the junk domain)."""

    domains: list[str]
    train: dict[str, np.ndarray]
    feedback: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    manifest: dict[str, Any]
    caps: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def scored(self) -> list[str]:
        return [d for d in self.domains if d != JUNK]

    @property
    def train_bytes(self) -> np.ndarray:
        return np.array([len(self.train[d]) for d in self.domains], dtype=np.float64)

    @property
    def natural_bytes(self) -> np.ndarray:
        """Each domain's natural size: the bytes its packages hold before the build's cap (``available_bytes``
        in ``corpus.py``'s manifest), else the training bytes read; a domain capped by ``caps`` (the
        data-constrained regime) counts what is left of it. Natural proportions and the byte-weighted mean use
        these, so a capped quick build keeps the real corpus' weights."""
        entries = self.manifest.get("domains", {})
        sizes = self.train_bytes.copy()
        if all("available_bytes" in entries.get(d, {}) for d in self.domains if d != JUNK):
            for i, d in enumerate(self.domains):
                if d != JUNK:
                    sizes[i] = entries[d]["available_bytes"]
        for i, d in enumerate(self.domains):
            if d in self.caps:
                sizes[i] = min(sizes[i], len(self.train[d]))
        return sizes


def _split_val(docs: list[str], domain: str) -> tuple[list[str], list[str]]:
    """A two-way corpus' ``val.jsonl`` split by document: even sha1 -> feedback, odd -> test."""
    halves: tuple[list[str], list[str]] = ([], [])
    for i, text in enumerate(docs):
        h = int(hashlib.sha1(f"{domain}/{i}/{text[:256]}".encode()).hexdigest(), 16)
        halves[h % 2].append(text)
    return halves


def parse_caps(items: Sequence[str] | None, domains: Sequence[str]) -> dict[str, int]:
    """``["code_go=40000", "quotes_en=2e4"]`` -> ``{"code_go": 40000, ...}``; ``all=N`` caps every domain.

    Raises:
        ValueError: naming the item for a malformed one, an unknown domain or a size below 2 windows.
    """
    caps: dict[str, int] = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        try:
            size = int(float(value))
        except ValueError:
            size = -1
        if not sep or size < 1:
            raise ValueError(f"--cap {item!r}: expected DOMAIN=BYTES with BYTES >= 1 (e.g. quotes_en=40000)")
        if name == "all":
            caps.update({d: size for d in domains if d not in caps})
        elif name not in domains:
            raise ValueError(f"--cap {item!r}: unknown domain {name!r}; domains: {list(domains)}")
        else:
            caps[name] = size
    return caps


def load_corpus(
    data: Path,
    *,
    max_train_mb: float | None = None,
    domains: Sequence[str] | None = None,
    caps: Sequence[str] | dict[str, int] | None = None,
    junk: int = 0,
) -> Corpus:
    """Reads ``data/<domain>/{train,feedback,test}.jsonl`` for every domain folder that has them.

    A folder with ``train.jsonl`` and ``val.jsonl`` only (a two-way corpus) has its validation documents split
    in two by document hash: feedback and test never share a document. ``domains`` selects a subset, ``caps``
    (``DOMAIN=BYTES`` items or a dict) cuts those domains' training text, and ``junk > 0`` adds a domain
    ``junk`` of that many random training bytes (and random held-out bytes).

    Raises:
        FileNotFoundError: if ``data`` holds no domain folder with the files (with how to build one).
        ValueError: for an unknown domain in ``domains`` or ``caps``.
    """

    def usable(p: Path) -> bool:
        return (p / "train.jsonl").is_file() and (
            all((p / f"{s}.jsonl").is_file() for s in ("feedback", "test")) or (p / "val.jsonl").is_file()
        )

    found = sorted(p.name for p in data.iterdir() if usable(p)) if data.is_dir() else []
    if not found:
        raise FileNotFoundError(
            f"no corpus in {data}: expected one folder per domain with train.jsonl, feedback.jsonl and test.jsonl "
            "(or train.jsonl and val.jsonl); build one with `python benchmarks/corpus.py --max-mb 5` or pass --data DIR"
        )
    if domains:
        unknown = [d for d in domains if d not in found]
        if unknown:
            raise ValueError(f"unknown domain(s) {unknown} in {data}; domains: {found}")
        found = [d for d in found if d in domains]
    cap = None if max_train_mb is None else int(max_train_mb * 1e6)
    caps = dict(caps) if isinstance(caps, dict) else parse_caps(caps, found)
    train, feedback, test = {}, {}, {}
    for d in found:
        limit = min(x for x in (cap, caps.get(d)) if x is not None) if (cap or d in caps) else None
        train[d] = read_domain(data / d / "train.jsonl", limit)
        if (data / d / "test.jsonl").is_file():
            feedback[d] = read_domain(data / d / "feedback.jsonl")
            test[d] = read_domain(data / d / "test.jsonl")
        else:
            fb, te = _split_val(_documents(data / d / "val.jsonl"), d)
            feedback[d], test[d] = _join(fb), _join(te)
    if junk > 0:
        found = [*found, JUNK]
        train[JUNK] = junk_bytes(int(junk), seed=1)
        feedback[JUNK] = junk_bytes(200_000, seed=2)
        test[JUNK] = junk_bytes(200_000, seed=3)
    manifest_path = data / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    return Corpus(found, train, feedback, test, manifest, caps)


def eval_windows(val: np.ndarray, length: int, count: int) -> torch.Tensor:
    """``count`` fixed windows spread evenly over a domain's held-out bytes (test or feedback split)."""
    n = max(1, (len(val) - 1) // (length - 1))
    idx = np.unique(np.linspace(0, n - 1, num=count, dtype=np.int64))
    ds = ByteWindows(val, length)
    rows = [ds[int(i)] for i in idx if len(ds[int(i)]) == length]
    if not rows:
        raise ValueError(f"a validation split of {len(val)} bytes is too short for windows of {length}")
    return torch.stack(rows)


@torch.no_grad()
def evaluate(model: torch.nn.Module, sets: Sequence[torch.Tensor], batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per-domain sums of per-window mean losses (nats per byte) and window counts."""
    was_training = model.training
    model.eval()
    sums = np.zeros(len(sets))
    counts = np.zeros(len(sets))
    for d, windows in enumerate(sets):
        for i in range(0, len(windows), batch):
            loss = per_sequence_loss(model, windows[i : i + batch])
            sums[d] += float(loss.sum())
            counts[d] += loss.numel()
    model.train(was_training)
    return sums, counts
