"""Mixing throughput: how fast each mixer turns K per-domain streams into one mixed stream (docs/benchmarks.md §1).

K in-memory per-domain streams of small items (ints), the same proportions for every method, one process:

* ``raw stream`` — one stream, no mixing: the ceiling of the loop itself;
* ``numpy block draw`` — a plain vectorised draw: per block of B items, inverse-CDF domain ids, per-domain
  counts, one ``islice`` per domain, scatter back to the drawn order (what odm does, minus everything else);
* ``odm fixed`` — ``odm.MixtureDataset`` batches, fixed proportions;
* ``odm live`` — the same, proportions republished after every batch (every 64 items at B = 64, the finest
  a batch-indexed schedule allows) through ``ProportionSchedule.publish``, as ``OnlineMixer`` does;
* torchdata ``MultiNodeWeightedSampler`` and webdataset ``RandomMix`` — item-by-item mixers with static weights;
* HuggingFace ``interleave_datasets`` where installed.

Item mixers are iterated item by item, block mixers block by block (counting the items); both with the same
loop around ``islice``. Then the same through a DataLoader (``odm.MixtureLoader``, ``num_workers`` 0 and 2;
batches/s after the first batch, so worker start-up is not counted), with and without a live update per batch.

Run: ``python benchmarks/throughput.py [--quick]``. Prints a table and writes ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from itertools import islice
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, median, ratio, si, timed, write_results

import odm
from odm.schedule import ProportionSchedule


def proportions(k: int, seed: int = 0) -> np.ndarray:
    """Skewed but not degenerate proportions (Zipf-like, shuffled), the same for every method."""
    p = 1.0 / np.arange(1, k + 1) ** 0.8
    p = np.random.default_rng(seed).permutation(p)
    return p / p.sum()


def domain_streams(k: int, n: int) -> list[range]:
    """K per-domain streams of ``n`` small items each (``range`` objects: in memory, never exhausted here)."""
    return [range(d * 10**9, d * 10**9 + n) for d in range(k)]


def identity(samples: list[Any]) -> list[Any]:
    """collate_fn that keeps the list (module level: picklable for DataLoader workers)."""
    return samples


def live_vectors(p: np.ndarray, count: int = 16, seed: int = 1) -> list[np.ndarray]:
    """Perturbed copies of ``p`` that a live benchmark cycles through when republishing."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        q = p * rng.uniform(0.5, 1.5, size=len(p))
        out.append(q / q.sum())
    return out


# -- the ways of iterating -------------------------------------------------------------------------------------


def count_items(it: Iterator[Any], n: int) -> int:
    """Item mixers: pull ``n`` items one by one."""
    got = 0
    for _ in islice(it, n):
        got += 1
    return got


def count_blocks(it: Iterator[Any], n: int, size: Callable[[Any], int] = len) -> int:
    """Block mixers: pull blocks until ``n`` items, counting items."""
    got = 0
    for block in it:
        got += size(block)
        if got >= n:
            break
    return got


# -- the methods ------------------------------------------------------------------------------------------------
# Each builds its mixer (not timed: shared-memory set-up, node graphs) and returns a zero-argument function that
# iterates ``n`` items and returns how many it got (timed).


def run_raw(k: int, n: int, p: np.ndarray, batch_size: int) -> Callable[[], int]:
    return lambda: count_items(iter(range(n)), n)


def numpy_blocks(streams: list[range], p: np.ndarray, batch_size: int, seed: int = 0) -> Iterator[list[Any]]:
    """The plain vectorised draw: inverse-CDF ids for the block, one ``islice`` per domain, scatter back."""
    rng = np.random.default_rng(seed)
    its = [iter(s) for s in streams]
    cdf = np.cumsum(p)
    k = len(p)
    arange = np.arange(batch_size)
    while True:
        ids = np.searchsorted(cdf, rng.random(batch_size) * cdf[-1], side="right")
        counts = np.bincount(ids, minlength=k)
        flat: list[Any] = []
        for d in np.flatnonzero(counts).tolist():
            flat.extend(islice(its[d], int(counts[d])))
        order = np.argsort(ids, kind="stable")  # positions grouped by domain, like `flat`
        inverse = np.empty_like(order)
        inverse[order] = arange
        yield list(itemgetter(*inverse.tolist())(flat))


def run_numpy(k: int, n: int, p: np.ndarray, batch_size: int) -> Callable[[], int]:
    streams = domain_streams(k, n)
    return lambda: count_blocks(numpy_blocks(streams, p, batch_size), n)


def odm_dataset(k: int, n: int, p: np.ndarray, batch_size: int) -> tuple[odm.MixtureDataset, ProportionSchedule]:
    schedule = ProportionSchedule(k, initial=p, capacity=4096)
    sources = {f"d{d}": s for d, s in enumerate(domain_streams(k, n))}
    ds = odm.MixtureDataset(sources, batch_size=batch_size, schedule=schedule, collate_fn=identity, seed=0)
    return ds, schedule


def run_odm_fixed(k: int, n: int, p: np.ndarray, batch_size: int) -> Callable[[], int]:
    ds, _ = odm_dataset(k, n, p, batch_size)
    return lambda: count_blocks(iter(ds), n, size=lambda b: len(b["data"]))


def run_odm_live(k: int, n: int, p: np.ndarray, batch_size: int) -> Callable[[], int]:
    ds, schedule = odm_dataset(k, n, p, batch_size)
    vectors = live_vectors(p)

    def go() -> int:
        got = 0
        for batch in ds:
            got += len(batch["data"])
            b = batch["mix_step"]
            schedule.publish(vectors[b % len(vectors)], effective_from=b + 1)
            if got >= n:
                break
        return got

    return go


def run_torchdata(k: int, n: int, p: np.ndarray, batch_size: int) -> Callable[[], int]:
    from torchdata.nodes import IterableWrapper, MultiNodeWeightedSampler

    streams = domain_streams(k, n)
    nodes = {f"d{d}": IterableWrapper(s) for d, s in enumerate(streams)}
    weights = {f"d{d}": float(w) for d, w in enumerate(p)}
    sampler = MultiNodeWeightedSampler(nodes, weights, stop_criteria="CYCLE_FOREVER", rank=0, world_size=1, seed=0)
    return lambda: count_items(sampler, n)


def run_webdataset(k: int, n: int, p: np.ndarray, batch_size: int) -> Callable[[], int]:
    import random

    from webdataset import RandomMix

    random.seed(0)
    mix = RandomMix(domain_streams(k, n), probs=p.tolist())
    return lambda: count_items(iter(mix), n)


def run_hf(k: int, n: int, p: np.ndarray, batch_size: int) -> Callable[[], int]:
    from datasets import IterableDataset, interleave_datasets

    def gen(lo: int) -> Iterator[dict[str, int]]:
        yield from ({"x": i} for i in range(lo, lo + n))

    parts = [IterableDataset.from_generator(gen, gen_kwargs={"lo": d * 10**9}) for d in range(k)]
    mixed = interleave_datasets(parts, probabilities=p.tolist(), seed=0)
    return lambda: count_items(iter(mixed), n)


def hf_available() -> bool:
    try:
        import datasets  # noqa: F401
    except ImportError:
        return False
    return True


ITEM_METHODS: dict[str, Callable[[int, int, np.ndarray, int], Callable[[], int]]] = {
    "raw stream (ceiling)": run_raw,
    "numpy block draw": run_numpy,
    "odm fixed": run_odm_fixed,
    "odm live (publish every batch)": run_odm_live,
    "torchdata MultiNodeWeightedSampler": run_torchdata,
    "webdataset RandomMix": run_webdataset,
}


# -- through a DataLoader ------------------------------------------------------------------------------------


def run_loader(k: int, num_batches: int, p: np.ndarray, batch_size: int, *, num_workers: int, live: bool) -> float:
    """Batches/s of ``odm.MixtureLoader``, timed from the first batch (worker start-up excluded)."""
    import time

    n = (num_batches + 64) * batch_size
    sources = {f"d{d}": s for d, s in enumerate(domain_streams(k, n))}
    loader = odm.MixtureLoader(
        sources, batch_size=batch_size, policy=odm.policies.Fixed(p), num_workers=num_workers, collate_fn=identity
    )
    vectors = live_vectors(p)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    for i, _batch in enumerate(islice(it, num_batches)):
        if live:
            loader.mixer.set_proportions(vectors[i % len(vectors)])
    elapsed = time.perf_counter() - t0
    del it
    return num_batches / elapsed


# -- main -----------------------------------------------------------------------------------------------------


LIVE = "odm live (publish every batch)"
MNWS = "torchdata MultiNodeWeightedSampler"
NUMPY = "numpy block draw"


def measure_items(
    methods: dict[str, Any], k: int, bs: int, items: int, repeats: int
) -> tuple[dict[str, list[float]], list[list[Any]], str]:
    """Items/s of every method (interleaved repeats), the table rows and the target line for one (K, B)."""
    p = proportions(k)
    rates: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(repeats):  # interleaved, so a noisy neighbour hits every method alike
        for name, make in methods.items():
            seconds, got = timed(make(k, items, p, bs))
            rates[name].append(got / seconds)
    ref = median(rates[LIVE])
    rows = [[k, bs, name, si(median(r), "items/s"), f"{ratio(median(r), ref):.2f}"] for name, r in rates.items()]
    line = (
        f"K={k}, B={bs}: odm live / MultiNodeWeightedSampler = {ratio(ref, median(rates[MNWS])):.2f}x "
        f"(target >= 5); numpy block draw / odm live = {ratio(median(rates[NUMPY]), ref):.2f}x (target <= 2)"
    )
    return rates, rows, line


def measure_loader(k: int, bs: int, batches: int, repeats: int) -> tuple[dict[str, list[float]], list[list[Any]]]:
    """Batches/s through ``odm.MixtureLoader`` for num_workers 0 and 2, with and without live updates."""
    p = proportions(k)
    cases = [(w, live) for w in (0, 2) for live in (False, True)]
    rates: dict[str, list[float]] = {f"workers={w} live={live}": [] for w, live in cases}
    for _ in range(repeats):
        for w, live in cases:
            rates[f"workers={w} live={live}"].append(run_loader(k, batches, p, bs, num_workers=w, live=live))
    rows = []
    for w, live in cases:
        m = median(rates[f"workers={w} live={live}"])
        rows.append([k, bs, w, "yes" if live else "no", f"{m:,.0f}", si(m * bs, "items/s")])
    return rates, rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer items and repeats (about a minute)")
    parser.add_argument("--domains", type=int, nargs="+", default=[8, 64], help="values of K")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256], help="block / batch sizes B")
    parser.add_argument("--items", type=int, default=None, help="items per measurement")
    parser.add_argument("--repeats", type=int, default=None, help="repeats (median quoted)")
    parser.add_argument("--loader-batches", type=int, default=None, help="batches per DataLoader measurement")
    parser.add_argument("--no-loader", action="store_true", help="skip the DataLoader part")
    parser.add_argument("--no-write", action="store_true", help="print only, write no results file")
    args = parser.parse_args(argv)
    items = args.items or (100_000 if args.quick else 400_000)
    repeats = args.repeats or 3
    loader_batches = args.loader_batches or (200 if args.quick else 1000)
    methods = dict(ITEM_METHODS)
    if hf_available():
        methods["HF interleave_datasets"] = run_hf
    config = {
        "domains": args.domains,
        "batch_sizes": args.batch_sizes,
        "items": items,
        "repeats": repeats,
        "loader_batches": loader_batches,
        "live": "ProportionSchedule.publish of a perturbed vector after every batch (every 64 items at B=64)",
        "proportions": "1/rank^0.8, normalised, shuffled with seed 0",
        "quick": args.quick,
    }
    raw: dict[str, Any] = {"items_per_s": {}, "loader_batches_per_s": {}}
    rows: list[list[Any]] = []
    summary: list[str] = []
    for k in args.domains:
        for bs in args.batch_sizes:
            rates, r, line = measure_items(methods, k, bs, items, repeats)
            raw["items_per_s"][f"K={k},B={bs}"] = rates
            rows += r
            summary.append(line)
    table = markdown_table(["K", "B", "method (one process)", "items/s (median)", "÷ odm live"], rows)
    print(table + "\n\n" + "\n".join(summary))
    full = table + "\n\n" + "\n".join(f"* {s}" for s in summary)
    if not args.no_loader:
        lrows: list[list[Any]] = []
        for k in args.domains:
            for bs in args.batch_sizes:
                lrates, r = measure_loader(k, bs, loader_batches, repeats)
                raw["loader_batches_per_s"][f"K={k},B={bs}"] = lrates
                lrows += r
        ltable = markdown_table(["K", "B", "num_workers", "live update every batch", "batches/s", "items/s"], lrows)
        print("\n" + ltable)
        full += "\n\nThrough `odm.MixtureLoader` (identity collate, medians):\n\n" + ltable
    if not args.no_write:
        notes = (
            f"{items} items per measurement; medians over {repeats} interleaved repeats. Item mixers are iterated "
            "item by item, block mixers (numpy, odm) block by block, counting items; set-up is not timed. "
            "DataLoader rates are timed after the first batch (worker start-up excluded)."
        )
        if not hf_available():
            notes += " HuggingFace `datasets` is not installed: `interleave_datasets` was not measured."
        json_path, md_path = write_results("throughput", config=config, results=raw, table=full, notes=notes)
        print(f"\nwrote {json_path} and {md_path}")
    return raw


if __name__ == "__main__":
    main()
