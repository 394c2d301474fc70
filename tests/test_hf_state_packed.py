"""Packed loaders (``pack_length``) resumed through a Hugging Face ``IterableDataset``'s own ``state_dict()``:
exact mid-document, bounded re-reading (a carried document at a snapshot boundary included), and old
checkpoints without snapshot columns resuming by skipping (real ``datasets`` objects, real workers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import count_row, resume_from_rank_zeros_file, resume_in_place, roundtrip, rows_counted, run_ranks

import odm
from odm.packing import PackedMixtureDataset

datasets = pytest.importorskip("datasets")
from odm.hf_sources import HFIterableSource  # noqa: E402

KEYS = ("input_ids", "token_domain", "position_ids")
B, T = 2, 16


def _docs(domain: int, num_shards: int, per_shard: int, counter=None, low: int = 3, high: int = 40):
    """Documents of ``low..high`` tokens; token ``i`` of document ``j`` is ``domain * 10**6 + j * 100 + i`` (each
    token names its document and place, so a batch read from the wrong place differs)."""
    rng = np.random.default_rng(domain)
    n = num_shards * per_shard
    lengths = rng.integers(low, high + 1, size=n)
    ids = [[domain * 10**6 + j * 100 + i for i in range(int(m))] for j, m in enumerate(lengths)]
    ds = datasets.Dataset.from_dict({"input_ids": ids}).to_iterable_dataset(num_shards=num_shards)
    return ds if counter is None else ds.map(count_row, fn_kwargs={"path": str(counter)})


def _loader(sources: dict, *, num_workers: int = 0) -> odm.MixtureLoader:
    return odm.MixtureLoader(sources, batch_size=B, pack_length=T, policy="exp3", num_workers=num_workers, seed=2)


def _run(loader: odm.MixtureLoader, n: int, it=None) -> tuple[list[dict], object]:
    """``n`` batches, each observed with per-token losses and stepped on (the cut moves with every batch)."""
    out, it = [], it if it is not None else iter(loader)
    for _ in range(n):
        batch = next(it)
        losses = (batch["input_ids"] % 7).double() + batch["token_domain"] + 0.1 * batch["position_ids"]
        loader.mixer.observe(batch, losses)
        loader.mixer.step()
        out.append({k: batch[k] for k in KEYS})
    return out, it


def _same(expected: list[dict], got: list[dict]) -> None:
    assert len(expected) == len(got)
    for i, (a, b) in enumerate(zip(expected, got)):
        for key in KEYS:
            assert torch.equal(a[key], b[key]), f"batch {i} after the cut differs in {key!r}"


def _base(k: int) -> int:
    """A packed row's length before its snapshot columns: next batch, epochs, positions, deficits, carry."""
    return 1 + 3 * k + 2


def _strip_snapshots(state: dict, version: int) -> dict:
    """The checkpoint a packed loader wrote before packed rows took snapshots: version 4 with snapshot widths
    of 0 (or version 3, with no ``snapshots`` entry), rows ending with the carry."""
    k = len(state["config"]["domains"])
    old = {key: value for key, value in state.items() if key != "snapshots"}
    old["version"] = version
    if version == 4:
        old["snapshots"] = {"widths": [0] * k, "skeletons": []}
    old["streams"] = [[row[: _base(k)] for row in rows] for rows in state["streams"]]
    return old


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_packed_resume_continues_with_the_uninterrupted_runs_batches(num_workers):
    # Two snapshotting domains of 8 HF shards, 3-40 token documents into 16-token rows (most are cut and
    # carried); the cut lies past the first pass of each slot's shard, and the batches after it cross more.
    a, b = _docs(1, 8, 4), _docs(2, 8, 3)

    def make() -> odm.MixtureLoader:
        return _loader({"a": HFIterableSource(a, state_every=4), "b": HFIterableSource(b, state_every=4)},
                       num_workers=num_workers)  # fmt: skip

    first = make()
    _, it = _run(first, 60)
    state = roundtrip(first.state_dict())
    expected, _ = _run(first, 16, it)
    del it, first
    resumed = make()
    resumed.load_state_dict(state)
    got, _ = _run(resumed, 16)
    _same(expected, got)
    base = _base(2)
    width = 2 + 24
    assert state["snapshots"]["widths"] == [width, width] and state["snapshots"]["skeletons"]
    rows = state["streams"][0]
    assert all(row[1] >= 1 and row[2] >= 1 for row in rows), f"the cut must be past a first pass: {rows}"
    for row in rows:  # each slot's row ends with a snapshot of each domain's current pass, within state_every
        for d in range(2):
            snap, position = row[base + d * width : base + (d + 1) * width], row[1 + 2 + d]
            assert (snap[0] == -1 and position <= 4) or (0 < snap[0] <= position <= snap[0] + 4), (d, row)
    assert any(row[base] > 0 or row[base + width] > 0 for row in rows), rows


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_packed_resume_reads_a_bounded_number_of_rows_not_the_position(tmp_path, num_workers):
    # One domain, 8 HF shards of 400 documents of 5-20 tokens (2-7 per 32-token batch); the cut is hundreds of
    # documents into each slot's shard. A resume that skipped would run the counting .map() over all of them.
    counter = tmp_path / "reads"
    ds = _docs(1, 8, 400, counter=counter, low=5, high=20)
    every = 16

    def make(**kw) -> odm.MixtureLoader:
        return _loader({"a": HFIterableSource(ds, state_every=every, **kw)}, num_workers=num_workers)

    first = make()
    _, it = _run(first, 240)
    state = first.state_dict()
    expected, _ = _run(first, 3, it)
    del it, first
    positions = [row[2] for row in state["streams"][0]]  # [next batch, epoch, position, …]
    assert min(positions) > 200 and all(row[1] == 0 for row in state["streams"][0]), state["streams"]
    resumed = make()
    resumed.load_state_dict(state)
    counter.unlink()
    got, it = _run(resumed, 3)
    del it  # (with workers: they stop prefetching)
    _same(expected, got)
    slots = max(1, num_workers)
    # Per slot: at most state_every rows from the snapshot to the next document (a carried one needs the
    # snapshot before it), then the documents of the batches taken and prefetched (at most 7 each).
    bound = slots * (every + 7 * 6)
    assert rows_counted(counter) <= bound < sum(positions) / 2, (
        f"{rows_counted(counter)} rows read to resume at {positions}"
    )
    # Without room for the state (1 column) the same resume skips: every consumed document is read again.
    small = make(state_numbers=1)
    _, it = _run(small, 240)
    skipping = small.state_dict()
    del it, small
    assert skipping["snapshots"]["skeletons"] == []
    again = make(state_numbers=1)
    again.load_state_dict(skipping)
    counter.unlink()
    got, it = _run(again, 3)
    del it
    _same(expected, got)
    assert rows_counted(counter) >= sum(positions)


def test_a_document_carried_across_a_snapshot_boundary_resumes_exactly_from_the_snapshot_before_it(tmp_path):
    # Find a cut whose carried document is the one that completed a snapshot: its domain's newest snapshot holds
    # the state *after* the carried document, from which that document cannot be read again.
    counter = tmp_path / "reads"
    ds = _docs(1, 4, 300, counter=counter, low=20, high=40)
    every = 4
    k = 1

    def make() -> odm.MixtureLoader:
        return _loader({"a": HFIterableSource(ds, state_every=every)})

    first = make()
    it, state = None, None
    for _ in range(200):
        _, it = _run(first, 1, it)
        row = first.state_dict()["streams"][0][0]
        carry, position = row[1 + 3 * k], row[1 + k]
        if carry == 0 and position % every == 0 and position >= 10 * every:
            state = roundtrip(first.state_dict())
            break
    assert state is not None, "no cut carries a document at a snapshot boundary"
    snap = state["streams"][0][0][_base(k) :]
    assert snap[0] == position - every, f"the carried domain's snapshot must precede its document: {snap[:2]}"
    expected, _ = _run(first, 6, it)
    del it, first
    resumed = make()
    resumed.load_state_dict(state)
    counter.unlink()
    got, _ = _run(resumed, 6)
    _same(expected, got)
    # The snapshot before the carried document, then that document and those of six 32-token batches (<= 2 each).
    assert rows_counted(counter) <= every + 1 + 6 * 2 < position, (
        f"{rows_counted(counter)} rows read to resume at {position}"
    )


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("version", [3, 4])
def test_a_packed_checkpoint_from_before_snapshots_still_resumes_exactly_by_skipping(tmp_path, version, num_workers):
    counter = tmp_path / "reads"
    a, b = _docs(1, 8, 30, counter=counter), _docs(2, 8, 30)

    def make() -> odm.MixtureLoader:
        return _loader({"a": HFIterableSource(a, state_every=4), "b": HFIterableSource(b, state_every=4)},
                       num_workers=num_workers)  # fmt: skip

    first = make()
    _, it = _run(first, 40)
    state = first.state_dict()
    expected, _ = _run(first, 8, it)
    del it, first
    old = roundtrip(_strip_snapshots(state, version))
    resumed = make()
    resumed.load_state_dict(old)
    assert resumed.state_dict()["streams"] != state["streams"]  # the snapshots were dropped: it skips
    counter.unlink()
    got, it = _run(resumed, 8)
    del it
    _same(expected, got)
    if num_workers == 0:
        assert rows_counted(counter) >= sum(row[3] for row in state["streams"][0])  # [.., epochs(2), positions(2)]


def test_a_packing_iterators_own_state_resumes_from_its_snapshot_and_loads_version_1(tmp_path):
    # PackedMixtureDataset without a loader: its state_dict() holds the skeletons its row's snapshots need.
    counter = tmp_path / "reads"
    ds = _docs(1, 2, 300, counter=counter, low=5, high=20)

    def make() -> PackedMixtureDataset:
        return PackedMixtureDataset({"a": HFIterableSource(ds, state_every=8)}, batch_size=B, pack_length=T)

    first = iter(make())
    for _ in range(60):
        next(first)
    state = roundtrip(first.state_dict())
    expected = [{k: x[k] for k in KEYS} for x in (next(first) for _ in range(4))]
    assert state["version"] == 2 and state["skeletons"] and state["row"][_base(1)] > 0
    resumed = iter(make())
    counter.unlink()
    resumed.load_state_dict(state)  # (reads the carried document again, if any)
    _same(expected, [{k: x[k] for k in KEYS} for x in (next(resumed) for _ in range(4))])
    assert rows_counted(counter) <= 8 + 4 * 7 < state["row"][2]
    old = {**state, "version": 1, "row": state["row"][: _base(1)]}
    old.pop("skeletons")
    skipping = iter(make())
    skipping.load_state_dict(old)
    _same(expected, [{k: x[k] for k in KEYS} for x in (next(skipping) for _ in range(4))])


# -- two ranks ------------------------------------------------------------------------------------------------


def _rank_body(rank: int, out_dir: str) -> dict:
    counter = f"{out_dir}/reads{rank}"
    ds = _docs(1, 8, 300, counter=counter, low=5, high=20)

    def make() -> odm.MixtureLoader:
        return _loader({"a": HFIterableSource(ds, state_every=8), "b": [[7] * 9] * 50})

    before = [0]

    def mark() -> None:
        before[0] = rows_counted(counter)

    state, expected, got = resume_from_rank_zeros_file(make, _run, 120, 6, f"{out_dir}/ckpt.pt", mark)
    same = all(torch.equal(a[k], b[k]) for a, b in zip(expected, got) for k in KEYS)
    row = state["streams"][rank][0]  # [next batch, epochs(2), positions(2), deficits(2), carry(2), snapshot…]
    return {"same": same, "reads": rows_counted(counter) - before[0], "position": row[3], "snapshot": row[9]}


@pytest.mark.slow
def test_every_rank_of_a_packed_loader_resumes_through_its_snapshot_from_rank_zeros_file(tmp_path):
    for r, res in enumerate(run_ranks(_rank_body, tmp_path)):
        assert res["same"], f"rank {r} resumed differently"
        assert 0 < res["snapshot"] <= res["position"], f"rank {r}: no snapshot in rank 0's file for it: {res}"
        # From the snapshot (< 8 rows back, or 16 for a carried document) to 6 more batches of 2-7 documents.
        assert res["position"] > 100 and res["reads"] <= 16 + 6 * 7, f"rank {r}: {res['reads']} rows re-read"


@pytest.mark.parametrize("cut", [160, 161])
def test_persistent_workers_resume_a_packed_checkpoint_loaded_after_they_started_through_its_snapshot(tmp_path, cut):
    # The workers outlive the epoch and the checkpoint is loaded into the same loader: its skeletons were first
    # seen by those workers, which must still decode them. An odd cut hands each slot to the other worker.
    counter = tmp_path / "reads"
    ds = _docs(1, 8, 300, counter=counter, low=5, high=20)
    loader = odm.MixtureLoader(
        {"a": HFIterableSource(ds, state_every=8)},
        batch_size=B,
        pack_length=T,
        policy="exp3",
        num_workers=2,
        persistent_workers=True,
        num_batches=200,
        seed=2,
    )
    state, expected, got = resume_in_place(loader, _run, cut, 4, before_resume=counter.unlink)
    _same(expected, got)
    positions = [row[2] for row in state["streams"][0]]  # [next batch, epoch, position, …]
    assert min(positions) >= 150, positions
    # Per slot: < 16 rows from its snapshot (8 more for a carried document), then the batches and the prefetch.
    assert rows_counted(counter) <= 2 * 16 + 12 * 7 < sum(positions) / 2, rows_counted(counter)
