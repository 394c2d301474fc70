"""Resume on a new topology: every position of every begun pass read exactly once across the topologies."""

from __future__ import annotations

import json
from collections import Counter
from functools import partial

import numpy as np
import pytest

from odm.sources import IterableSource, JsonlSource, MapSource
from odm.topology import Progression, ShardPosition, Work, open_progression, reshard


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
