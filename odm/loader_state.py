"""The :class:`odm.MixtureLoader`'s resumable state: each slot's stream row at the cut, and its checks.

A *stream row* is one worker slot's stream state after a batch, the flat :class:`odm.dataset.StreamRow`
``[next_batch, epochs(K), positions(K), active(K)]`` (all ``-1`` while the slot is fresh). The loader
records the row of every batch it hands out; :class:`SlotRows` keeps each slot's newest row (where the next
``iter()`` starts) and its row at the *cut* — the newest batch the mixer stepped on, which is what a
checkpoint holds. Rows of batches taken past the cut wait in a queue until a ``step()`` moves the cut over them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from odm._checks import is_int
from odm.dataset import FRESH, StreamRow

__all__ = ["CONFIG_KEYS", "SlotRows", "check_streams", "config_diff", "require"]

#: The loader settings a checkpoint stores, in the order a difference is reported.
CONFIG_KEYS = (
    "domains",
    "batch_size",
    "granularity",
    "seed",
    "delay",
    "num_workers",
    "num_slots",
    "dp_world_size",
    "exhausted",
    "max_passes",
    "sources",
)
# Why a difference in each matters, appended to the message.
_WHY = {
    "delay": "the publish delay: num_workers × prefetch_factor + 2 unless given",
    "num_slots": "each worker slot reads its own shard",
    "dp_world_size": "each data-parallel replica reads its own shard",
    "sources": "the shuffles depend on each source's length",
}


class SlotRows:
    """Each worker slot's stream row: after the newest batch taken, and at the cut.

    Example:
        >>> rows = SlotRows(num_slots=2, num_domains=1)
        >>> rows.take(0, 0, [1, 0, 4, 1]); rows.take(1, 1, [2, 0, 4, 1]); rows.take(2, 0, [3, 0, 8, 1])
        >>> rows.payload(1).reshape(2, 4).tolist()  # the cut after batch 1: slot 0 as of batch 0
        [[1, 0, 4, 1], [2, 0, 4, 1]]
        >>> rows.newest_state()
        (3, [[3, 0, 8, 1], [2, 0, 4, 1]])
    """

    #: Rows of batches past the cut that are kept; a cut further back than that is unknown.
    CAPACITY = 4096
    #: Fills a payload whose rows at the cut are unknown.
    UNKNOWN = -2

    def __init__(self, num_slots: int, num_domains: int, *, row_len: int | None = None) -> None:
        self.num_slots = num_slots
        self.row_len = StreamRow.width(num_domains) if row_len is None else row_len  # packed rows are longer
        self.restore(0, [[FRESH] * self.row_len for _ in range(num_slots)])

    def restore(self, next_batch: int, rows: list[list[int]]) -> None:
        """Starts over from a checkpoint's rows (cut and newest alike)."""
        self.next_batch = next_batch  # one past the newest batch taken
        self.newest = [list(r) for r in rows]
        self.at_cut = [list(r) for r in rows]
        self._pending: deque[tuple[int, int, list[int]]] = deque()  # (batch, slot, row) taken past the cut
        self._lost = -1  # the newest batch whose row was dropped from `_pending` (over CAPACITY)
        self.cut_moved = False  # whether a step() moved the cut since the last restore()

    def take(self, batch: int, slot: int, row: list[int]) -> None:
        """Records that ``batch`` (served by ``slot``) was taken, with the slot's row after it."""
        self.newest[slot] = row
        self.next_batch = batch + 1
        pending = self._pending
        pending.append((batch, slot, row))
        if len(pending) > self.CAPACITY:
            self._lost, old_slot, old_row = pending.popleft()
            self.at_cut[old_slot] = old_row

    def payload(self, cut: int) -> np.ndarray:
        """Moves the cut to batch ``cut`` and returns every slot's row there, flat (``UNKNOWN`` if dropped).

        Called by the mixer at every ``step()`` with the newest batch observed before it (-1: none yet).
        """
        self.cut_moved = True
        if cut >= 0:
            pending, at_cut = self._pending, self.at_cut
            while pending and pending[0][0] <= cut:
                _, slot, row = pending.popleft()
                at_cut[slot] = row
            if cut < self._lost:
                return np.full(self.num_slots * self.row_len, self.UNKNOWN, dtype=np.int64)
        return np.asarray(self.at_cut, dtype=np.int64).reshape(-1)

    def newest_state(self) -> tuple[int, list[list[int]]]:
        """``(next batch, rows)`` after the newest batch taken."""
        return self.next_batch, [list(r) for r in self.newest]

    def fill(self, block: torch.Tensor) -> int:
        """Writes where the next ``iter()`` starts into the workers' shared ``block``; returns that batch."""
        block[0, 0] = self.next_batch
        block[1:] = torch.tensor(self.newest, dtype=torch.int64)
        return self.next_batch


# -- checks --------------------------------------------------------------------------------------------------
def require(state: Any, key: str, *, path: str = "") -> Any:
    """``state[key]``, or a ``ValueError`` naming the key path (``config.seed``) that is missing."""
    where = f"loader state{'.' + path if path else ''}"
    if not isinstance(state, Mapping):
        raise ValueError(f"{where} must be a mapping (a dict saved by MixtureLoader.state_dict()), got {state!r:.80}")
    if key not in state:
        full = f"{path}.{key}" if path else key
        raise ValueError(
            f"loader state is missing '{full}' (has {sorted(map(str, state))}); was it saved by "
            "MixtureLoader.state_dict() of this version?"
        )
    return state[key]


def config_diff(saved: Mapping[str, Any], mine: Mapping[str, Any]) -> str:
    """Every setting that differs, as ``"seed=1 in the checkpoint, seed=2 here"`` (``num_workers`` through the
    slots it gives: 0 and 1 worker read the same one shard); empty when none does."""
    if list(saved["domains"]) != list(mine["domains"]):  # then the rest compares unrelated sources
        old, new = list(saved["domains"]), list(mine["domains"])
        gone, added = [d for d in old if d not in new], [d for d in new if d not in old]
        if not gone and not added:
            return f"the same domains in another order: {old} in the checkpoint, {new} here"
        return "; ".join(
            [f"the checkpoint has {gone} which this run lacks"] * bool(gone)
            + [f"this run has {added} which the checkpoint lacks"] * bool(added)
        )
    parts = []
    for key in CONFIG_KEYS:
        if key in ("domains", "num_workers"):
            continue
        a, b = saved[key], mine[key]
        if isinstance(a, tuple):
            a = list(a)
        if a == b:
            continue
        if key == "num_slots":
            text = f"num_workers={saved['num_workers']} in the checkpoint, num_workers={mine['num_workers']} here"
        else:
            text = f"{key}={a!r} in the checkpoint, {key}={b!r} here"
        parts.append(text + (f" ({_WHY[key]})" if key in _WHY else ""))
    return "; ".join(parts)


def check_streams(
    streams: Any,
    *,
    world: int,
    num_slots: int,
    row_len: int,
    num_domains: int,
    flags: bool = True,
    min_epoch: int = 0,
) -> list[list[list[int]]]:
    """``streams[rank][slot]`` as int rows, checked for shape and range; errors name the entry.

    ``flags``: whether the epochs and positions are followed by K active flags (a packed row has its token
    deficits and carry there); after them may come source state snapshots (any integers);
    ``min_epoch``: negative while a resharding plan is read (see :mod:`odm.topology`)."""
    k = num_domains

    def fail(path: str, what: str) -> ValueError:
        return ValueError(f"loader state streams{path} {what}")

    if not isinstance(streams, list | tuple) or len(streams) != world:
        n = len(streams) if isinstance(streams, list | tuple) else type(streams).__name__
        raise fail("", f"must hold one block per data-parallel replica ({world} here), got {n}")
    out = []
    for r, block in enumerate(streams):
        if not isinstance(block, list | tuple) or len(block) != num_slots:
            raise fail(f"[{r}]", f"must hold {num_slots} slot rows, got {block!r:.80}")
        rows = []
        for s, row in enumerate(block):
            path = f"[{r}][{s}]"
            if not isinstance(row, list | tuple) or len(row) != row_len or not all(is_int(v) for v in row):
                raise fail(path, f"must be {row_len} integers, got {row!r:.120}")
            row = [int(v) for v in row]
            epochs, positions, rest = row[1 : 1 + k], row[1 + k : 1 + 2 * k], row[1 + 2 * k : 1 + 3 * k]
            if row[0] == FRESH:
                if any(v != FRESH for v in row):
                    raise fail(path, f"is marked fresh (-1) but holds positions: {row}")
            elif row[0] < 1 or min(epochs) < min_epoch or min(positions) < 0 or (flags and not set(rest) <= {0, 1}):
                raise fail(path, f"= {row} is out of range: [next batch >= 1, epochs >= 0, positions >= 0, active 0/1]")
            rows.append(row)
        out.append(rows)
    return out
