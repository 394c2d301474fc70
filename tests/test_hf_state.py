"""A Hugging Face ``IterableDataset`` resumed through its own ``state_dict()``: exact, bounded, and skipping
where a snapshot cannot be used (real ``datasets`` objects, real workers, two gloo ranks)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import count_row, resume_from_rank_zeros_file, resume_in_place, rows_counted, run_ranks

import odm
from odm.hf_state import decode, encode, skeleton_id

datasets = pytest.importorskip("datasets")
from odm.hf_sources import HFIterableSource  # noqa: E402

CALLS = [0]  # rows the counting .map() produced in this process


def _count(row: dict) -> dict:
    CALLS[0] += 1
    return row


def _ids(rows: list) -> list[int]:
    return [int(r["x"]) for r in rows]


def _table(num_shards: int, rows_per_shard: int) -> datasets.IterableDataset:
    n = num_shards * rows_per_shard
    return datasets.Dataset.from_dict({"x": list(range(n))}).to_iterable_dataset(num_shards=num_shards)


def _json(tmp_path, num_shards: int, rows_per_shard: int) -> datasets.IterableDataset:
    files = []
    for f in range(num_shards):
        path = tmp_path / f"part{f}.jsonl"
        path.write_text("".join(json.dumps({"x": f * rows_per_shard + i}) + "\n" for i in range(rows_per_shard)))
        files.append(str(path))
    return datasets.load_dataset("json", data_files=files, split="train", streaming=True)


def _pipeline(kind: str, tmp_path, rows_per_shard: int = 12) -> datasets.IterableDataset:
    if kind == "json":
        return _json(tmp_path, 8, rows_per_shard)
    ds = _table(8, rows_per_shard)
    return {"arrow": ds, "map": ds.map(_count), "shuffle_buffer": ds.shuffle(seed=3, buffer_size=6)}[kind]


def _loader(source, *, num_workers: int = 0, others: bool = True) -> odm.MixtureLoader:
    sources = {"a": source}
    if others:
        sources["b"] = [{"x": 10_000 + i} for i in range(50)]
    return odm.MixtureLoader(sources, batch_size=4, num_workers=num_workers, seed=2, collate_fn=_ids)


def _run(loader, n, it=None):
    out, it = [], it or iter(loader)
    for _ in range(n):
        batch = next(it)
        loader.mixer.observe(batch, torch.ones(len(batch["domain"])))
        loader.mixer.step()
        out.append(batch["data"])
    return out, it


def _resumes(make, cut: int, after: int) -> tuple[dict, list, list]:
    """(the checkpoint at ``cut``, the uninterrupted run's next ``after`` batches, the resumed run's)."""
    first = make()
    _, it = _run(first, cut)
    state = first.state_dict()
    expected, _ = _run(first, after, it)
    del it
    resumed = make()
    resumed.load_state_dict(state)
    got, _ = _run(resumed, after)
    return state, expected, got


# -- the encoding ---------------------------------------------------------------------------------------------


def test_a_real_state_travels_as_a_skeleton_and_integers_and_comes_back_equal():
    part = _table(8, 12).map(_count).shard(num_shards=2, index=1)
    rows = iter(part)
    for _ in range(7):
        next(rows)
    state = part.state_dict()
    skeleton, leaves = encode(state)
    assert decode(skeleton, leaves) == state
    assert all(isinstance(v, int) for v in leaves) and 0 <= skeleton_id(skeleton) < 2**48
    with pytest.raises(ValueError, match="float"):
        encode({"rate": 0.5})
    with pytest.raises(ValueError, match="2\\*\\*53"):
        encode({"shard_example_idx": 2**53})


@pytest.mark.parametrize(
    ("kind", "reason"), [("arrow", None), ("map", None), ("json", None), ("shuffle_buffer", "BufferShuffled")]
)
def test_only_pipelines_whose_state_resumes_exactly_take_snapshots(tmp_path, kind, reason):
    src = HFIterableSource(_pipeline(kind, tmp_path))
    if reason is None:
        assert src.no_state_reason is None and src.snapshot_width == 2 + src.state_numbers
    else:
        assert reason in src.no_state_reason and src.snapshot_width == 0
    table = HFIterableSource(_table(8, 4).with_format("arrow"))
    assert "table format" in table.no_state_reason and table.snapshot_width == 0


@pytest.mark.parametrize(("arg", "value"), [("state_every", 0), ("state_numbers", 0), ("state_every", 1.5)])
def test_bad_snapshot_settings_are_refused_naming_the_argument(arg, value):
    with pytest.raises((ValueError, TypeError), match=arg):
        HFIterableSource(_table(2, 2), **{arg: value})


# -- resume ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("kind", ["arrow", "map", "json", "shuffle_buffer"])
def test_a_resume_continues_with_the_uninterrupted_runs_batches(tmp_path, kind, num_workers):
    # 40 rows over 1-2 odm shards, 4 per batch: the cut (batch 30) lies in a later pass, whose snapshot holds
    # that epoch (and, for datasets, the shard order it shuffles for it), and the batches after it cross more.
    ds = _pipeline(kind, tmp_path, rows_per_shard=5)
    state, expected, got = _resumes(
        lambda: _loader(HFIterableSource(ds, state_every=3), num_workers=num_workers), 30, 24
    )
    assert got == expected
    base = 1 + 3 * 2  # [next batch, epochs, positions, active] of two domains, then domain a's snapshot
    rows = state["streams"][0]
    assert all(row[1] >= 1 for row in rows), "the cut is past the first pass"
    widths = state["snapshots"]["widths"]
    if kind == "shuffle_buffer":  # no snapshot: the skip replays the buffer deterministically
        assert widths == [0, 0]
    else:  # the slots' rows carry snapshots of their current pass, and their skeletons are in the checkpoint
        assert widths == [2 + 24, 0]
        assert any(row[base] > 0 for row in rows), rows
        assert state["snapshots"]["skeletons"]


def test_a_resume_reads_at_most_state_every_rows_before_the_next_batch():
    # One domain, 8 HF shards of 500 rows; the cut is 800 rows into the shard. A resume that skipped (as before
    # snapshots, or a silent fall-back) would run the counting .map() over all 800 again.
    ds = _table(8, 500).map(_count)
    every = 16
    first = _loader(HFIterableSource(ds, state_every=every), others=False)
    _, it = _run(first, 200)
    state = first.state_dict()
    position = state["streams"][0][0][2]  # [next batch, epoch, position, active, snapshot…]
    assert position == 800 and state["streams"][0][0][3:5] == [1, 800]
    expected, _ = _run(first, 5, it)
    del it
    resumed = _loader(HFIterableSource(ds, state_every=every), others=False)
    resumed.load_state_dict(state)
    CALLS[0] = 0
    got, _ = _run(resumed, 5)
    assert got == expected
    assert CALLS[0] <= every + 5 * 4, f"{CALLS[0]} rows read to resume at row {position}"
    # Without room for the state (1 column), the same resume skips: every consumed row is read again.
    small = _loader(HFIterableSource(ds, state_every=every, state_numbers=1), others=False)
    _, it = _run(small, 200)
    skipping = small.state_dict()
    del it
    assert skipping["snapshots"]["skeletons"] == []
    again = _loader(HFIterableSource(ds, state_every=every, state_numbers=1), others=False)
    again.load_state_dict(skipping)
    CALLS[0] = 0
    assert _run(again, 5)[0] == expected
    assert CALLS[0] >= position


def _strip_snapshots(state: dict) -> dict:
    """The checkpoint a version-3 loader wrote for the same run: rows end with the active flags, no snapshots."""
    k = len(state["config"]["domains"])
    old = {key: value for key, value in state.items() if key != "snapshots"}
    old["version"] = 3
    old["streams"] = [[row[: 1 + 3 * k] for row in rows] for rows in state["streams"]]
    return old


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_checkpoint_from_before_snapshots_still_resumes_exactly(num_workers):
    ds = _table(8, 12).map(_count)
    state, expected, _ = _resumes(lambda: _loader(HFIterableSource(ds, state_every=5), num_workers=num_workers), 30, 12)
    resumed = _loader(HFIterableSource(ds, state_every=5), num_workers=num_workers)
    resumed.load_state_dict(_strip_snapshots(state))
    assert _run(resumed, 12)[0] == expected
    assert resumed.state_dict()["streams"] != state["streams"]  # the snapshots were dropped: it skipped


def test_a_checkpoint_with_another_snapshot_layout_resumes_by_skipping():
    ds = _table(8, 12).map(_count)
    state, expected, _ = _resumes(lambda: _loader(HFIterableSource(ds, state_every=5)), 30, 12)
    resumed = _loader(HFIterableSource(ds, state_every=5, state_numbers=30))
    resumed.load_state_dict(state)
    assert _run(resumed, 12)[0] == expected


# -- two ranks ------------------------------------------------------------------------------------------------


def _rank_body(rank: int, out_dir: str) -> dict:
    ds = _table(8, 300).map(_count)

    def make():
        return _loader(HFIterableSource(ds, state_every=8))

    def reset() -> None:
        CALLS[0] = 0

    state, expected, got = resume_from_rank_zeros_file(make, _run, 120, 6, f"{out_dir}/ckpt.pt", reset)
    position = state["streams"][rank][0][3]  # [next batch, epochs(2), positions(2), …]: domain "a"
    return {"expected": expected, "got": got, "calls": CALLS[0], "position": position}


@pytest.mark.slow
def test_every_rank_resumes_through_its_snapshot_from_the_file_rank_zero_alone_wrote(tmp_path):
    for r, res in enumerate(run_ranks(_rank_body, tmp_path)):
        assert res["got"] == res["expected"], f"rank {r} resumed differently"
        assert res["position"] > 100 and res["calls"] <= 8 + 6 * 4, f"rank {r}: {res['calls']} rows re-read"


@pytest.mark.parametrize(("start_method", "cut"), [("fork", 100), ("spawn", 100), ("fork", 101)])
def test_persistent_workers_resume_a_checkpoint_loaded_after_they_started_through_its_snapshot(
    tmp_path, start_method, cut
):
    # The workers outlive the epoch; the checkpoint is loaded into the same loader afterwards. Its snapshots'
    # skeletons were first seen by those very workers: they must still decode them (not skip every row again).
    # An odd cut hands each slot to the other worker (slot = (worker + start) % workers).
    counter = tmp_path / "reads"
    ds = _table(8, 400).map(count_row, fn_kwargs={"path": str(counter)})
    loader = odm.MixtureLoader(
        {"a": HFIterableSource(ds, state_every=8)},
        batch_size=4,
        num_workers=2,
        persistent_workers=True,
        multiprocessing_context=start_method,
        num_batches=120,
        seed=2,
        collate_fn=_ids,
    )
    state, expected, got = resume_in_place(loader, _run, cut, 5, before_resume=counter.unlink)
    assert got == expected
    positions = [row[2] for row in state["streams"][0]]  # [next batch, epoch, position, active, snapshot…]
    assert min(positions) >= 200
    # Per slot: fewer than 8 rows from its snapshot, then what the 5 batches (and the prefetch) read.
    assert rows_counted(counter) <= 2 * 8 + 12 * 4 < sum(positions) / 4, rows_counted(counter)
