"""Proportions shared with DataLoader workers, versioned by the batch they take effect at.

A Python attribute set in the main process never reaches a running DataLoader worker (let alone a persistent
one). A tensor placed in shared memory before the workers start does, under fork and spawn alike. Each
published row says from which global batch index it applies, so what a worker draws for batch ``b`` depends
only on the rows published for ``b`` — never on how far ahead the worker happens to run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch

from odm._checks import check_int
from odm._state import StateError, as_int, read, read_int, read_simplex

__all__ = ["MODE_EXACT", "MODE_SAMPLE", "ProportionSchedule", "ScheduleLookup", "ScheduleRow", "check_simplex"]

#: Row mode: each sample (or batch, with batch granularity) draws its domain from the proportions.
MODE_SAMPLE = 0
#: Row mode: per-domain counts are the largest-remainder rounding of ``p * batch_size`` (exact mixtures).
MODE_EXACT = 1

_STATE_VERSION = 1
_HEADER = 2  # ring columns before the proportions: effective_from, mode


class ScheduleRow(NamedTuple):
    """One published row: ``proportions`` of mode ``mode`` in force from batch ``effective_from`` on.

    The proportions come first, as in :class:`ScheduleLookup`.
    """

    proportions: np.ndarray
    mode: int
    effective_from: int


class ScheduleLookup(NamedTuple):
    """The row in force for a batch: its ``proportions`` and ``mode``, and ``position``, its index among every
    row published (the newest is ``num_rows - 1``; a reader may reuse it while no newer row exists)."""

    proportions: np.ndarray
    mode: int
    position: int


def check_simplex(p: Any, num_domains: int, name: str = "proportions") -> np.ndarray:
    """``p`` as float64 proportions normalised to sum 1.

    Raises:
        TypeError: not a sequence of numbers.
        ValueError: not 1-D, the wrong length, a negative or non-finite entry, or all zero.
    """
    try:
        arr = np.asarray(p, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"`{name}` must be a sequence of numbers, got {p!r}") from err
    if arr.ndim == 1 and arr.shape[0] == num_domains:
        total = arr.sum()  # fast path: NaN fails `min >= 0`, inf fails `total < inf`
        if arr.min() >= 0 and 0 < total < np.inf:
            return arr / total
    if arr.ndim != 1:
        raise ValueError(f"`{name}` must be one-dimensional, got shape {arr.shape}")
    if arr.shape[0] != num_domains:
        raise ValueError(f"`{name}` must have one entry per domain ({num_domains}), got {arr.shape[0]}: {p!r}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"`{name}` must be finite, got {p!r}")
    if np.any(arr < 0):
        raise ValueError(f"`{name}` must be non-negative, got {p!r}")
    raise ValueError(f"`{name}` must not be all zero, got {p!r}")


class ProportionSchedule:
    """A ring of rows ``(effective_from, mode, proportions)`` in shared memory.

    Rows are appended with non-decreasing ``effective_from``; the row in force for batch ``b`` is the newest
    row with ``effective_from <= b``. The ring keeps the last ``capacity`` rows, which must cover the rows
    published ahead of the batches being drawn (``capacity`` well above the publish delay).

    Args:
        num_domains: number of domains ``K``.
        initial: proportions in force from batch 0 (default uniform).
        capacity: number of rows kept.

    Example:
        >>> s = ProportionSchedule(2, initial=[0.5, 0.5])
        >>> s.publish([0.9, 0.1], effective_from=10)
        >>> s.lookup(9).proportions, s.lookup(10).proportions
        (array([0.5, 0.5]), array([0.9, 0.1]))
    """

    def __init__(self, num_domains: int, initial: Any = None, *, capacity: int = 1024) -> None:
        self.num_domains = check_int(num_domains, "num_domains", low=1)
        self.capacity = check_int(capacity, "capacity", low=2)
        # One row: [effective_from (exact in float64 up to 2**53), mode, proportions...] (see _pack / _unpack).
        self._rows = torch.zeros(self.capacity, _HEADER + self.num_domains, dtype=torch.float64).share_memory_()
        self._count = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._views: tuple[np.ndarray, np.ndarray] | None = None
        p0 = np.full(self.num_domains, 1.0 / self.num_domains) if initial is None else initial
        self.publish(p0, effective_from=0)

    # NOTE: numpy views are per process (rebuilt lazily after unpickling in a spawned worker); the tensors
    # themselves travel through torch's shared-memory pickling.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_views"] = None
        return state

    def _np(self) -> tuple[np.ndarray, np.ndarray]:
        if self._views is None:
            self._views = (self._rows.numpy(), self._count.numpy())
        return self._views

    @staticmethod
    def _unpack(row: np.ndarray) -> ScheduleRow:
        return ScheduleRow(row[_HEADER:].copy(), int(row[1]), int(row[0]))

    @property
    def num_rows(self) -> int:
        """Number of rows published so far (including the initial one)."""
        return int(self._np()[1][0])

    def publish(self, proportions: Any, effective_from: int, *, mode: int = MODE_SAMPLE) -> None:
        """Appends a row that applies from global batch ``effective_from`` on.

        Raises:
            ValueError: for invalid proportions, a negative ``effective_from``, one earlier than the newest
                row's, or an unknown mode.
        """
        p = check_simplex(proportions, self.num_domains)
        if type(effective_from) is not int or effective_from < 0:  # (the check below is the slow, full one)
            effective_from = check_int(effective_from, "effective_from", low=0)
        if mode not in (MODE_SAMPLE, MODE_EXACT):
            raise ValueError(f"`mode` must be MODE_SAMPLE (0) or MODE_EXACT (1), got {mode!r}")
        last = self.latest_effective_from()
        if effective_from < last:
            raise ValueError(
                f"`effective_from`={effective_from} is earlier than the newest row's ({last}); "
                "rows must be published in non-decreasing batch order"
            )
        self.append(p, effective_from, mode)

    def append(self, p: np.ndarray, effective_from: int, mode: int) -> None:
        """:meth:`publish` without the checks, for a caller that has made them (the mixer, a checkpoint)."""
        rows, count = self._np()
        n = int(count[0])
        row = rows[n % self.capacity]
        row[_HEADER:] = p
        row[1] = mode
        row[0] = effective_from
        # Publish the row only once it is complete: readers never look past `count`.
        count[0] = n + 1

    def latest_effective_from(self) -> int:
        rows, count = self._np()
        return int(rows[(int(count[0]) - 1) % self.capacity, 0])

    def oldest_batch(self) -> int:
        """The first batch whose row is still in the ring (0 until a row has been evicted)."""
        rows, count = self._np()
        n = int(count[0])
        return 0 if n <= self.capacity else int(rows[n % self.capacity, 0])

    def _find(self, batch: int) -> tuple[np.ndarray, int]:
        """The ring row in force for ``batch`` (a view) and its index; raises as :meth:`lookup`."""
        rows, count = self._np()
        n = int(count[0])
        capacity = self.capacity
        # Newest first: the rows newer than `batch` are the few published ahead of it (the publish delay).
        for i in range(n - 1, max(0, n - capacity) - 1, -1):
            row = rows[i % capacity]
            if row[0] <= batch:
                return row, i
        raise RuntimeError(
            f"the proportions row for batch {batch} has left the schedule ring (capacity {capacity}; the "
            f"oldest row kept applies from batch {self.oldest_batch()}); raise `capacity` or publish less often "
            "than once per batch"
        )

    def lookup(self, batch: int) -> ScheduleLookup:
        """The row in force for global batch ``batch``, and its index.

        Raises:
            RuntimeError: if the row in force for ``batch`` has already left the ring.
        """
        row, i = self._find(batch)
        return ScheduleLookup(row[_HEADER:].copy(), int(row[1]), i)

    def proportions_for(self, batch: int) -> np.ndarray:
        """:meth:`lookup`'s proportions as a read-only view into the ring, without a copy: for a caller that
        reads them at once (the mixer's importance weights); a later publish may overwrite them.

        Raises:
            RuntimeError: as :meth:`lookup`.
        """
        view = self._find(batch)[0][_HEADER:]
        view.flags.writeable = False
        return view

    def latest(self) -> ScheduleRow:
        """The newest row."""
        rows, count = self._np()
        return self._unpack(rows[(int(count[0]) - 1) % self.capacity])

    def rows(self) -> list[ScheduleRow]:
        """The rows still in the ring, oldest first."""
        rows, count = self._np()
        n = int(count[0])
        return [self._unpack(rows[i % self.capacity]) for i in range(max(0, n - self.capacity), n)]

    def state_dict(self) -> dict[str, Any]:
        """The rows still in the ring (they include every row published ahead of the current batch).

        Each saved row is ``[effective_from, mode, proportions]``.
        """
        rows, count = self._np()
        n = int(count[0])
        order = [i % self.capacity for i in range(max(0, n - self.capacity), n)]
        block = rows[order]
        return {
            "version": _STATE_VERSION,
            "num_domains": self.num_domains,
            "num_rows": n,
            "rows": [[int(r[0]), int(r[1]), r[_HEADER:].tolist()] for r in block],
        }

    def check_state(self, state_dict: Mapping[str, Any], path: str = "schedule") -> list[ScheduleRow]:
        """Every field of a saved schedule, checked; the rows to load (the newest ``capacity``).

        Raises:
            ValueError: a missing key, another version or domain count, a row that is not
                ``[effective_from, mode, proportions on the simplex]`` or out of batch order; each names its key
                path (``schedule.rows[3]``).
        """
        version = read(state_dict, "version", path)
        if version != _STATE_VERSION:
            raise StateError(f"`{path}.version` is {version!r}; this odm reads schedule version {_STATE_VERSION}")
        k = read_int(state_dict, "num_domains", path, low=1)
        if k != self.num_domains:
            raise StateError(f"`{path}` is for {k} domains, this schedule has {self.num_domains}")
        saved = read(state_dict, "rows", path)
        if not isinstance(saved, list | tuple) or not saved:
            raise StateError(f"`{path}.rows` must be a non-empty list of rows, got {saved!r}")
        out: list[ScheduleRow] = []
        last = 0
        for i, row in enumerate(saved):
            where = f"{path}.rows[{i}]"
            if not isinstance(row, list | tuple) or len(row) != 3:
                raise StateError(f"`{where}` must be [effective_from, mode, proportions], got {row!r}")
            effective_from = as_int(row[0], f"{where}.effective_from", low=last)
            mode = as_int(row[1], f"{where}.mode")
            if mode not in (MODE_SAMPLE, MODE_EXACT):
                raise StateError(f"`{where}.mode` must be 0 (sample) or 1 (exact), got {mode!r}")
            out.append(ScheduleRow(read_simplex(row[2], f"{where}.proportions", k), mode, effective_from))
            last = effective_from
        return out[-self.capacity :]

    def load_state_dict(self, state_dict: Mapping[str, Any], *, path: str = "schedule") -> None:
        """Replaces the rows in place (workers holding this schedule see the change).

        Raises:
            ValueError: as :meth:`check_state`; nothing is changed then.
        """
        self.replace(self.check_state(state_dict, path))

    def replace(self, rows: list[ScheduleRow]) -> None:
        """Replaces the rows with ``rows`` (as :meth:`check_state` returns them), in place."""
        _, count = self._np()
        count[0] = 0
        # NOTE: rows are written back as saved, not re-normalised: dividing by a sum again can move the last
        # bit, and one bit can change a domain draw after a resume.
        for p, mode, effective_from in rows:
            self.append(p, effective_from, mode)
