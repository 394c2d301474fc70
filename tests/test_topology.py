"""Resume on a new topology: every position of every begun pass read exactly once across the topologies."""

from __future__ import annotations

import json
from collections import Counter
from datetime import timedelta
from functools import partial

import numpy as np
import pytest
import torch

from odm.dataset import STATE_KEY, MixtureDataset, StreamRow
from odm.sources import IterableSource, JsonlSource, MapSource
from odm.topology import Progression, ShardPosition, Work, open_progression, plans_from_state, reshard


class _Stream:
    """Reference model of one shard of one domain: reads pass positions ``(epoch, q)`` of a pass of ``n_items``,
    first its plan, then its regular stride ``shard`` of ``num_shards`` (written out, no odm code)."""

    def __init__(self, work: Work, shard: int, num_shards: int, n_items: int) -> None:
        self.work, self.shard, self.num_shards, self.n_items = work, shard, num_shards, n_items
        self.epoch, self.position = work.start()

    def read(self) -> tuple[int, int]:
        while True:
            if self.epoch < 0:
                i = -self.epoch - 1
                p = self.work.plan[i]
                q = p.first + self.position * p.step
                if q < self.n_items:
                    self.position += 1
                    return p.epoch, q
                self.epoch, self.position = (
                    (self.epoch - 1, 0) if i + 1 < len(self.work.plan) else (self.work.next_epoch, 0)
                )
            else:
                q = self.shard + self.position * self.num_shards
                if q < self.n_items:
                    self.position += 1
                    return self.epoch, q
                self.epoch, self.position = self.epoch + 1, 0

    def checkpoint(self) -> ShardPosition:
        return ShardPosition(self.work, self.epoch, self.position, self.shard, self.num_shards)


def _layout(works: list[Work], n_items: int) -> list[_Stream]:
    return [_Stream(w, s, len(works), n_items) for s, w in enumerate(works)]


def _read_randomly(streams: list[_Stream], reads: Counter, rng: np.random.Generator, n_items: int) -> None:
    for st in streams:
        for _ in range(int(rng.integers(0, 3 * n_items // len(streams) + 2))):
            reads[st.read()] += 1


@pytest.mark.parametrize("seed", range(40))
def test_a_chain_of_topology_changes_reads_every_position_of_every_pass_exactly_once(seed):
    rng = np.random.default_rng(seed)
    n_items = int(rng.integers(12, 60))
    sizes = [int(x) for x in rng.choice([1, 2, 3, 4, 6, 8], size=3)]
    reads: Counter = Counter()
    streams = _layout([Work((), 0)] * sizes[0], n_items)
    _read_randomly(streams, reads, rng, n_items)
    for size in sizes[1:]:  # checkpoint, re-deal to another shard count (a plan may be half read), read on
        streams = _layout(reshard([s.checkpoint() for s in streams], size), n_items)
        _read_randomly(streams, reads, rng, n_items)
    assert max(reads.values()) == 1, "a position of a pass was read twice"
    # Let every shard read on past the last pass begun anywhere: then every pass up to it is complete.
    last = max(e for e, _ in reads)
    for st in streams:
        while True:
            e, q = st.read()
            reads[(e, q)] += 1
            if e > last:
                break
    for epoch in range(last + 1):
        counts = [reads[(epoch, q)] for q in range(n_items)]
        assert counts == [1] * n_items, f"pass {epoch}: positions read {counts}"


def test_two_by_two_to_one_by_one_deals_every_rest_to_the_one_shard():
    old = [ShardPosition(Work((), 0), 0, p, s, 4) for s, p in enumerate([2, 3, 0, 5])]
    (work,) = reshard(old, 1)
    assert work.next_epoch == 1
    assert work.plan == tuple(Progression(0, s + p * 4, 4) for s, p in enumerate([2, 3, 0, 5]))


def test_one_by_one_to_two_by_two_splits_the_rest_into_four_sub_strides():
    works = reshard([ShardPosition(Work((), 0), 0, 10, 0, 1)], 4)
    assert [w.plan for w in works] == [(Progression(0, 10 + r, 4),) for r in range(4)]
    assert {w.next_epoch for w in works} == {1}


def test_a_shard_behind_contributes_its_whole_stride_of_a_pass_others_began():
    old = [ShardPosition(Work((), 0), 0, 7, 0, 2), ShardPosition(Work((), 0), 1, 2, 1, 2)]
    (work,) = reshard(old, 1)
    assert work.plan == (Progression(0, 14, 2), Progression(1, 0, 2), Progression(1, 5, 2))
    assert work.next_epoch == 2


# -- real sources: a progression reads exactly the positions it names ---------------------------------------


def _gen(n: int):
    yield from (f"g{i}" for i in range(n))


def _jsonl(tmp_path, n: int) -> JsonlSource:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(n)))
    return JsonlSource(path)


@pytest.mark.parametrize("kind", ["list", "generator", "map", "jsonl"])
def test_open_progression_reads_the_named_positions_of_the_pass_order(tmp_path, kind):
    n = 37
    source = {
        "list": lambda: IterableSource([f"x{i}" for i in range(n)]),
        "generator": lambda: IterableSource(partial(_gen, n)),
        "map": lambda: MapSource([f"m{i}" for i in range(n)]),  # shuffled per pass
        "jsonl": lambda: _jsonl(tmp_path, n),
    }[kind]()
    for epoch in (0, 1):
        order = list(source.open(shard=0, num_shards=1, epoch=epoch, start=0, seed=5))
        for prog, start in [
            (Progression(epoch, 3, 4), 0),
            (Progression(epoch, 10, 3), 2),
            (Progression(epoch, 7, 12), 1),
        ]:
            got = list(open_progression(source, prog, start=start, seed=5))
            assert got == order[prog.first + start * prog.step :: prog.step]


# -- the mixture dataset reading plans: 2 workers x 2 ranks <-> 1 x 1, every sample of the pass exactly once --

_DATA = {f"d{k}": [k * 1000 + i for i in range(k * 9 + 30)] for k in range(3)}


def _phase(rank: int, world: int, num_workers: int, plans, num_batches: int | None, mode: dict):
    """Batches of one rank of a run (ranks simulated by the dataset's rank attributes); last row per slot."""
    ds = MixtureDataset(_DATA, batch_size=4, seed=7, **mode)
    ds.rank, ds.world_size, ds.attach_state, ds.plans = rank, world, True, plans
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers)
    ids: list[int] = []
    rows: dict[int, list[int]] = {}
    for i, batch in enumerate(loader):
        if num_batches is not None and i == num_batches:
            break
        ids.extend(batch["data"].tolist())
        rows[batch[STATE_KEY]["slot"]] = batch[STATE_KEY]["row"]
    return ids, rows


def _positions(rows_by_rank: list[dict[int, list[int]]], num_workers: int, old_plans) -> list[list[ShardPosition]]:
    """Per domain, every old shard's position from its slot's newest row (fresh where it made no batch)."""
    k = len(_DATA)
    world, slots = len(rows_by_rank), max(1, num_workers)
    out: list[list[ShardPosition]] = [[] for _ in range(k)]
    for rank, rows in enumerate(rows_by_rank):
        for slot in range(slots):
            shard = rank * slots + slot
            row = StreamRow.unpack(rows[slot], k) if slot in rows else None
            for d in range(k):
                work = Work((), 0) if old_plans is None else old_plans[shard][d]
                epoch, pos = (row.epochs[d], row.positions[d]) if row is not None else work.start()
                out[d].append(ShardPosition(work, epoch, pos, shard, world * slots))
    return out


def _plans(positions: list[list[ShardPosition]], num_shards: int) -> list[list[Work]]:
    per_domain = [reshard(p, num_shards) for p in positions]
    return [[per_domain[d][s] for d in range(len(per_domain))] for s in range(num_shards)]


@pytest.mark.parametrize("mode", [{"exhausted": "drop"}, {"exhausted": "restart", "max_passes": 1}])
@pytest.mark.parametrize(("old", "new"), [((2, 2), (1, 1)), ((1, 1), (2, 2)), ((2, 2), (1, 2))])
def test_a_mixture_resumed_on_another_topology_reads_every_sample_of_the_pass_exactly_once(old, new, mode):
    # One pass per domain (dropped at its end): the two runs together must read every sample exactly once.
    (w_old, r_old), (w_new, r_new) = old, new
    first = [_phase(r, r_old, w_old, None, 6, mode) for r in range(r_old)]
    plans = _plans(_positions([rows for _, rows in first], w_old, None), w_new * r_new)
    second = [_phase(r, r_new, w_new, plans, None, mode) for r in range(r_new)]
    read = Counter(i for ids, _ in first + second for i in ids)
    expected = Counter(i for items in _DATA.values() for i in items)
    assert read == expected


# -- MixtureLoader: 2 workers x 2 gloo ranks -> 1 x 1 and back, through one rank-0 checkpoint -----------------


class _Tagged(MapSource):
    """A map-style source whose items say which pass read them: ``(pass, sample id)``."""

    def open(self, *, shard: int, num_shards: int, epoch: int, start: int, seed: int):
        items = super().open(shard=shard, num_shards=num_shards, epoch=epoch, start=start, seed=seed)
        return ((epoch, x) for x in items)


def _as_list(samples: list) -> list:
    return samples


_SIZES = (24, 40, 33)


def _loader(num_workers: int):
    from odm import MixtureLoader

    sources = {f"d{k}": _Tagged([k * 1000 + i for i in range(n)]) for k, n in enumerate(_SIZES)}
    return MixtureLoader(sources, batch_size=4, policy="exp3s", num_workers=num_workers, seed=3, collate_fn=_as_list)


def _train(loader, num_batches: int) -> list[list[int]]:
    reads = []
    for _, batch in zip(range(num_batches), loader):
        reads.extend([list(x) for x in batch["data"]])
        loader.mixer.observe(batch, batch["domain"].double() + 0.5)
        loader.mixer.step()
    return reads


def _rank_main(rank: int, world: int, port: int, out: str, state_in: str | None, num_batches: int) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=20)
    )
    try:
        loader = _loader(num_workers=2)
        if state_in is not None:
            loader.load_state_dict(torch.load(state_in, weights_only=True), reshard=True)
        p0 = loader.mixer.proportions.tolist()
        plans = loader.dataset.plans
        first_regular = None if plans is None else [w.next_epoch for w in plans[0]]
        reads = _train(loader, num_batches)
        if rank == 0:
            torch.save(loader.state_dict(), f"{out}/state.pt")
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump({"reads": reads, "p0": p0, "p": loader.mixer.proportions.tolist(), "first": first_regular}, f)
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, state_in, num_batches: int) -> list[dict]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(2, port, str(tmp_path), state_in, num_batches), nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def _assert_each_begun_pass_read_once(reads: list[list[int]], final_state: dict, first_regular: list[int]) -> None:
    """No (pass, sample) twice; per domain, every pass before its first regular one after the reshard complete."""
    count = Counter((e, i) for e, i in reads)
    assert max(count.values()) == 1, [k for k, v in count.items() if v > 1][:5]
    assert min(first_regular) >= 1
    assert final_state["plans"] is None, "every shard has read its plan: the checkpoint no longer needs it"
    for rank_rows in final_state["streams"]:  # every shard has finished its plan
        for row in rank_rows:
            assert all(row[1 + d] >= first for d, first in enumerate(first_regular)), row
    for d, n in enumerate(_SIZES):
        for epoch in range(first_regular[d]):
            got = sorted(i for (e, i) in count if e == epoch and i // 1000 == d)
            assert got == [d * 1000 + i for i in range(n)], f"domain {d} pass {epoch}"


@pytest.mark.slow
def test_two_workers_by_two_ranks_resume_on_one_process_reading_every_begun_pass_once(tmp_path):
    first = _spawn(tmp_path, None, num_batches=7)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    loader = _loader(num_workers=0)
    loader.load_state_dict(state, reshard=True)
    assert loader.mixer.proportions.tolist() == first[0]["p"]  # the mixer continues
    (work,) = plans_from_state(loader.state_dict()["plans"])  # one shard, whose plan is every old shard's rest
    reads = _train(loader, 60)
    first_regular = [w.next_epoch for w in work]
    _assert_each_begun_pass_read_once(first[0]["reads"] + first[1]["reads"] + reads, loader.state_dict(), first_regular)


@pytest.mark.slow
def test_one_process_resumes_on_two_workers_by_two_ranks_reading_every_begun_pass_once(tmp_path):
    loader = _loader(num_workers=0)
    reads = _train(loader, 9)
    torch.save(loader.state_dict(), tmp_path / "before.pt")
    second = _spawn(tmp_path, str(tmp_path / "before.pt"), num_batches=30)
    assert second[0]["p0"] == second[1]["p0"] == loader.mixer.proportions.tolist()  # the mixer continues
    final = torch.load(tmp_path / "state.pt", weights_only=True)
    assert second[0]["first"] == second[1]["first"] is not None
    _assert_each_begun_pass_read_once(reads + second[0]["reads"] + second[1]["reads"], final, second[0]["first"])


def test_a_resume_on_another_topology_is_refused_unless_asked_for():
    loader = _loader(num_workers=0)
    _train(loader, 3)
    state = loader.state_dict()
    other = _loader(num_workers=2)
    with pytest.raises(ValueError, match=r"num_workers=0 in the checkpoint.*reshard=True"):
        other.load_state_dict(state)
    other.load_state_dict(state, reshard=True)
    assert other.state_dict()["plans"] is not None
