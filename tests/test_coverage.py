"""Every sample exactly once per pass, per domain, for every source type, across workers x ranks (counted).

One mixture per source type: the source under test (domain ``x``) beside a plain list (domain ``y``), one pass
each (``max_passes=1``: a domain drops out after its pass, the last batches come out short, nothing is lost).
World size 2 is simulated at the dataset layer (``MixtureDataset.rank`` / ``world_size``, two DataLoaders with
real workers); one real two-process gloo run reads every source type through ``odm.MixtureLoader``.
"""

from __future__ import annotations

import json
import socket
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import webdataset as wds

import odm
from odm.dataset import MixtureDataset
from odm.sources import JsonlSource, TextSource, WebDatasetSource

try:
    import datasets
except ImportError:  # the HF kinds skip with a reason
    datasets = None

N = 30  # samples of the source under test (domain "x")
NY = 23  # samples of the plain list beside it (domain "y")


class WorkerSplitting(torch.utils.data.IterableDataset):
    """The torch docs' pattern: splits itself across DataLoader workers with ``get_worker_info()``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        lo, step = (0, 1) if info is None else (info.id, info.num_workers)
        return iter(f"ws{i}" for i in range(lo, self.n, step))


class ShardsItself:
    """Follows odm's ``shard(index, count)`` protocol: odm must not stride over it again."""

    def __init__(self, n: int) -> None:
        self.n = n

    def shard(self, index: int, count: int) -> list[str]:
        return [f"sp{i}" for i in range(index, self.n, count)]


class MapStyle(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> str:
        return f"map{i}"


HF_KINDS = ["hf_map", "hf_iterable", "hf_iterable_one_shard"]
KINDS = [
    "list",
    "map",
    "worker_splitting_iterable",
    "shard_protocol",
    "webdataset",
    "webdataset_shuffle_buffer",
    "jsonl",
    "text",
    *HF_KINDS,
]


def make(kind: str, root: Path) -> tuple[Any, list[str]]:
    """The source of ``kind`` over ``N`` samples, and the identities of those samples."""
    if kind == "list":
        return [f"l{i}" for i in range(N)], [f"l{i}" for i in range(N)]
    if kind == "map":
        return MapStyle(N), [f"map{i}" for i in range(N)]
    if kind == "worker_splitting_iterable":
        return WorkerSplitting(N), [f"ws{i}" for i in range(N)]
    if kind == "shard_protocol":
        return ShardsItself(N), [f"sp{i}" for i in range(N)]
    if kind.startswith("webdataset"):
        sizes = [9, 4, 11, 6]  # as many tars as 2 workers x 2 ranks, of unequal sizes
        paths, keys = [], []
        for t, n in enumerate(sizes):
            paths.append(str(root / f"w-{t}.tar"))
            with wds.TarWriter(paths[-1]) as sink:
                for i in range(n):
                    keys.append(f"w{t}_{i}")
                    sink.write({"__key__": keys[-1], "txt": b"x"})
        return WebDatasetSource(paths, shuffle=8 if kind.endswith("buffer") else 0), keys
    if kind == "jsonl":
        path = root / "x.jsonl"
        path.write_text("".join(json.dumps({"text": f"j{i}"}) + ("\n\n" if i % 7 == 0 else "\n") for i in range(N)))
        return JsonlSource(path, field="text"), [f"j{i}" for i in range(N)]
    if kind == "text":
        a, b = root / "a.txt", root / "b.txt"
        a.write_text("".join(f"t{i}\n" for i in range(17)))
        b.write_text("".join(f"t{i}\n" for i in range(17, N)))
        return TextSource([a, b]), [f"t{i}" for i in range(N)]
    if kind in HF_KINDS:
        if datasets is None:
            pytest.skip("Hugging Face `datasets` is not installed")
        ds = datasets.Dataset.from_dict({"id": [f"hf{i}" for i in range(N)]})
        if kind == "hf_iterable":
            ds = ds.to_iterable_dataset(num_shards=5)
        elif kind == "hf_iterable_one_shard":
            ds = ds.to_iterable_dataset(num_shards=1)
        return ds, [f"hf{i}" for i in range(N)]
    raise AssertionError(kind)


def ident(sample: Any) -> str:
    if isinstance(sample, dict):
        return str(sample.get("__key__", sample.get("id")))
    return str(sample)


def identities(samples: list[Any]) -> list[str]:
    """collate_fn: the identity of each sample (module level: picklable)."""
    return [ident(s) for s in samples]


def read_everything(ds: MixtureDataset, num_workers: int) -> list[tuple[int, str]]:
    """``(domain, identity)`` of every sample the dataset yields through a real DataLoader."""
    kwargs: dict[str, Any] = {"multiprocessing_context": "fork", "timeout": 60} if num_workers else {}
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers, **kwargs)
    out = []
    for batch in loader:
        out += list(zip(batch["domain"].tolist(), batch["data"]))
    return out


def assert_each_once(seen: list[tuple[int, str]], expected: dict[int, list[str]]) -> None:
    for d, items in expected.items():
        counts = Counter(x for dd, x in seen if dd == d)
        twice = sorted(x for x, c in counts.items() if c > 1)
        missing = sorted(set(items) - set(counts))
        foreign = sorted(set(counts) - set(items))
        assert (twice, missing, foreign) == ([], [], []), f"domain {d}: repeated, missing, foreign"


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_every_sample_exactly_once_per_pass_across_workers_and_ranks(tmp_path, kind, num_workers, world_size):
    source, items = make(kind, tmp_path)
    ys = [f"y{i}" for i in range(NY)]
    seen: list[tuple[int, str]] = []
    for rank in range(world_size):
        ds = MixtureDataset({"x": source, "y": ys}, batch_size=4, seed=7, max_passes=1, collate_fn=identities)
        ds.rank, ds.world_size = rank, world_size
        seen += read_everything(ds, num_workers)
    assert_each_once(seen, {0: items, 1: ys})


# -- one real run: two gloo ranks, two workers each, every source type at once ---------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kinds_here() -> list[str]:
    return [k for k in KINDS if datasets is not None or k not in HF_KINDS]


def _rank_main(rank: int, world: int, port: int, root: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=20)
    )
    try:
        sources = {}
        for kind in _kinds_here():  # each rank its own copy of the files (same sample identities)
            here = Path(root) / f"r{rank}" / kind
            here.mkdir(parents=True)
            sources[kind] = make(kind, here)[0]
        loader = odm.MixtureLoader(
            sources, batch_size=4, num_workers=2, seed=3, max_passes=1, collate_fn=identities, timeout=60
        )
        seen = [(d, x) for batch in loader for d, x in zip(batch["domain"].tolist(), batch["data"])]
        (Path(root) / f"rank{rank}.json").write_text(json.dumps(seen))
    finally:
        dist.destroy_process_group()


def test_two_real_gloo_ranks_read_every_sample_of_every_source_type_once(tmp_path):
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    seen = [tuple(x) for r in range(2) for x in json.loads((tmp_path / f"rank{r}.json").read_text())]
    expected = {d: make(kind, tmp_path / "r0" / kind)[1] for d, kind in enumerate(_kinds_here())}
    assert_each_once(seen, expected)  # type: ignore[arg-type]
