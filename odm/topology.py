"""Resuming on a new topology: the unread rest of every begun pass, re-dealt to another number of shards.

A checkpoint taken with ``W`` workers x ``R`` ranks holds, per domain, each of the ``n = R * W`` shards'
position ``(epoch, position)``. For the *strided* sources (lists and other iterables, map-style datasets, JSONL
and text files) shard ``s`` of ``n`` reads the positions ``s, s + n, s + 2n, …`` of a pass order that depends
only on the seed and the pass, so what a shard has not read yet is itself an arithmetic *progression*
``(epoch, first, step)`` — positions ``first, first + step, …`` of that pass — and
``source.open(shard=first % step, num_shards=step, start=first // step)`` reads exactly it.

:func:`reshard` collects, per domain, every shard's unread progressions — the rest of its current pass, and the
whole of its stride of any pass another shard has already begun — and deals them to the ``n'`` new shards:
whole progressions round-robin when there are at least ``n'``, else each split into ``n'`` sub-strides
``(epoch, first + r * step, n' * step)``. Each new shard reads its *plan* first, then regular passes from the
first pass no old shard had begun. Per domain, every position of every begun pass is therefore read exactly
once across the old and the new run (what a pass reads is kept; its order is not). A checkpoint taken while
a plan is being read re-deals the plan's rest in turn, so topology changes compose.

While reading its plan a stream's ``epoch`` is ``-(i + 1)`` for plan item ``i`` and ``position`` counts items
read of it; the int64 state rows of the loader keep their layout.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

from odm.sources import Source

__all__ = [
    "Progression",
    "ShardPosition",
    "Work",
    "check_strided",
    "is_strided",
    "open_progression",
    "plans_for",
    "plans_from_state",
    "plans_to_state",
    "reshard",
]


class Progression(NamedTuple):
    """Positions ``first, first + step, …`` (to the end) of the pass order of pass ``epoch``."""

    epoch: int
    first: int
    step: int


class Work(NamedTuple):
    """One new shard's share of one domain: ``plan`` first, then regular passes from ``next_epoch`` on."""

    plan: tuple[Progression, ...]
    next_epoch: int

    def start(self) -> tuple[int, int]:
        """The ``(epoch, position)`` a fresh stream of this shard starts at."""
        return (-1, 0) if self.plan else (self.next_epoch, 0)


class ShardPosition(NamedTuple):
    """One old shard's place in one domain: its own ``work`` (plan and regular passes), ``(epoch, position)``
    in it, and its regular stride ``shard`` of ``num_shards``."""

    work: Work
    epoch: int
    position: int
    shard: int
    num_shards: int


def is_strided(source: Source, *num_shards: int) -> bool:
    """Whether ``source``'s shards are strides of one pass order at each of these shard counts (so its unread
    rest can be re-dealt; see :meth:`odm.sources.Source.is_strided`)."""
    return all(source.is_strided(n) for n in num_shards)


def open_progression(source: Source, prog: Progression, *, start: int, seed: int) -> Iterator[Any]:
    """The items of ``prog`` from its ``start``-th on (``source`` must be strided)."""
    return source.open(
        shard=prog.first % prog.step,
        num_shards=prog.step,
        epoch=prog.epoch,
        start=prog.first // prog.step + start,
        seed=seed,
    )


def _unread(pos: ShardPosition) -> tuple[list[Progression], int]:
    """The shard's unread progressions of the passes it has begun, and its first untouched regular pass."""
    if pos.epoch < 0:  # inside plan item i
        i = -pos.epoch - 1
        p = pos.work.plan[i]
        rest = [Progression(p.epoch, p.first + pos.position * p.step, p.step), *pos.work.plan[i + 1 :]]
        return rest, pos.work.next_epoch
    return [Progression(pos.epoch, pos.shard + pos.position * pos.num_shards, pos.num_shards)], pos.epoch + 1


def reshard(positions: Sequence[ShardPosition], num_shards: int) -> list[Work]:
    """Deals the unread rest of every begun pass of one domain to ``num_shards`` new shards.

    Args:
        positions: every old shard's :class:`ShardPosition` (all shards of the checkpoint, fresh ones too).
        num_shards: the new number of shards ``n' = R' * W'``.

    Returns:
        One :class:`Work` per new shard (index ``rank * num_workers + slot``).

    Example:
        >>> old = [ShardPosition(Work((), 0), 0, 3, s, 2) for s in range(2)]  # 2 shards, 3 items read each
        >>> reshard(old, 1)  # one shard finishes both strides, then pass 1 on its own
        [Work(plan=(Progression(epoch=0, first=6, step=2), Progression(epoch=0, first=7, step=2)), next_epoch=1)]
    """
    if num_shards < 1:
        raise ValueError(f"`num_shards` must be >= 1, got {num_shards}")
    unread = [_unread(p) for p in positions]
    first_new = max(f for _, f in unread)
    work: list[Progression] = []
    for pos, (rest, first_untouched) in zip(positions, unread):
        work.extend(rest)
        # Passes other shards have begun and this one has not: its whole stride of each is unread.
        work.extend(Progression(e, pos.shard, pos.num_shards) for e in range(first_untouched, first_new))
    work.sort(key=lambda p: p.epoch)  # stable: older passes are finished first
    if len(work) >= num_shards:
        plans = [work[j::num_shards] for j in range(num_shards)]
    else:
        plans = [[] for _ in range(num_shards)]
        for i, p in enumerate(work):
            for r in range(num_shards):
                plans[(i + r) % num_shards].append(Progression(p.epoch, p.first + r * p.step, p.step * num_shards))
        for plan in plans:
            plan.sort(key=lambda p: p.epoch)
    return [Work(tuple(plan), first_new) for plan in plans]


def plans_for(
    streams: Sequence[Sequence[Sequence[int]]], old_plans: Sequence[Sequence[Work]] | None, num_shards: int
) -> list[list[Work]]:
    """Per new shard, per domain, the :class:`Work` that resumes a loader checkpoint on ``num_shards`` shards.

    Args:
        streams: the checkpoint's stream rows ``[rank][slot] -> [next_batch, epochs(K), positions(K), …]``
            (``next_batch == -1``: a slot that made no batch).
        old_plans: the checkpoint's own plans per old shard (``None`` when it was not resharded itself).
        num_shards: ``dp_world_size * num_slots`` of the new run.
    """
    slots = len(streams[0])
    n_old = len(streams) * slots
    k = (len(streams[0][0]) - 1) // 3
    per_domain = []
    for d in range(k):
        positions = []
        for rank, rows in enumerate(streams):
            for slot, row in enumerate(rows):
                shard = rank * slots + slot
                work = Work((), 0) if old_plans is None else old_plans[shard][d]
                epoch, pos = work.start() if row[0] < 0 else (int(row[1 + d]), int(row[1 + k + d]))
                positions.append(ShardPosition(work, epoch, pos, shard, n_old))
        per_domain.append(reshard(positions, num_shards))
    return [[per_domain[d][s] for d in range(k)] for s in range(num_shards)]


def plans_to_state(plans: Sequence[Sequence[Work]]) -> list[list[list[Any]]]:
    """Plans as plain lists ``[shard][domain] -> [[[epoch, first, step], …], next_epoch]`` for a checkpoint."""
    return [[[[list(p) for p in w.plan], w.next_epoch] for w in shard] for shard in plans]


def plans_from_state(state: Any) -> list[list[Work]]:
    """Inverse of :func:`plans_to_state`.

    Raises:
        ValueError: a malformed entry, naming it.
    """
    try:
        return [
            [Work(tuple(Progression(int(e), int(f), int(s)) for e, f, s in plan), int(nxt)) for plan, nxt in shard]
            for shard in state
        ]
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"loader state `plans` is malformed ({err}): expected [shard][domain] -> [plan, next pass]"
        ) from err


def check_strided(domains: Sequence[str], sources: Sequence[Source], *num_shards: int) -> None:
    """Refuses a resume on another topology when a domain's unread rest cannot be re-dealt: its source must be
    strided at the old and the new shard count (plans only use strides of at least the smaller one).

    Raises:
        ValueError: naming the domains whose sources are not strided.
    """
    bent = [d for d, s in zip(domains, sources) if not is_strided(s, *num_shards)]
    if bent:
        raise ValueError(
            f"domains {bent} have sources that are not strides of one pass order (webdataset tars, self-sharding "
            "datasets): their unread rest cannot be re-dealt to another topology; resume on the same one"
        )
