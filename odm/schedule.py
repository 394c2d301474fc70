"""Proportions shared with DataLoader workers, versioned by the batch they take effect at.

A Python attribute set in the main process never reaches a running DataLoader worker (let alone a persistent
one). A tensor placed in shared memory before the workers start does, under fork and spawn alike. Each
published row says from which global batch index it applies, so what a worker draws for batch ``b`` depends
only on the rows published for ``b`` — never on how far ahead the worker happens to run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from odm.policies.base import check_proportions

__all__ = ["MODE_EXACT", "MODE_SAMPLE", "ProportionSchedule"]

#: Row mode: each sample (or batch, with batch granularity) draws its domain from the proportions.
MODE_SAMPLE = 0
#: Row mode: per-domain counts are the largest-remainder rounding of ``p * batch_size`` (exact mixtures).
MODE_EXACT = 1

_STATE_VERSION = 1


class ProportionSchedule:
    """A ring of ``(effective_from, mode, proportions)`` rows in shared memory.

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
        >>> s.lookup(9)[0], s.lookup(10)[0]
        (array([0.5, 0.5]), array([0.9, 0.1]))
    """

    def __init__(self, num_domains: int, initial: Any = None, *, capacity: int = 1024) -> None:
        if not isinstance(num_domains, int) or num_domains < 1:
            raise ValueError(f"`num_domains` must be a positive integer, got {num_domains!r}")
        if not isinstance(capacity, int) or capacity < 2:
            raise ValueError(f"`capacity` must be an integer >= 2, got {capacity!r}")
        self.num_domains = num_domains
        self.capacity = capacity
        # Column 0: effective_from (exact in float64 up to 2**53), column 1: mode, columns 2:: proportions.
        self._rows = torch.zeros(capacity, 2 + num_domains, dtype=torch.float64).share_memory_()
        self._count = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._views: tuple[np.ndarray, np.ndarray] | None = None
        p0 = np.full(num_domains, 1.0 / num_domains) if initial is None else initial
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
        p = check_proportions(proportions, self.num_domains)
        if int(effective_from) != effective_from or effective_from < 0:
            raise ValueError(f"`effective_from` must be a non-negative integer, got {effective_from!r}")
        if mode not in (MODE_SAMPLE, MODE_EXACT):
            raise ValueError(f"`mode` must be MODE_SAMPLE (0) or MODE_EXACT (1), got {mode!r}")
        rows, count = self._np()
        n = int(count[0])
        if n > 0:
            last = rows[(n - 1) % self.capacity, 0]
            if effective_from < last:
                raise ValueError(
                    f"`effective_from`={effective_from} is earlier than the newest row's ({int(last)}); "
                    "rows must be published in non-decreasing batch order"
                )
        self._append(p, int(effective_from), mode)

    def _append(self, p: np.ndarray, effective_from: int, mode: int) -> None:
        rows, count = self._np()
        n = int(count[0])
        slot = n % self.capacity
        rows[slot, 2:] = p
        rows[slot, 1] = mode
        rows[slot, 0] = effective_from
        # Publish the row only once it is complete: readers never look past `count`.
        count[0] = n + 1

    def lookup(self, batch: int) -> tuple[np.ndarray, int, int]:
        """Returns ``(proportions, mode, row_index)`` in force for global batch ``batch``.

        Raises:
            RuntimeError: if the row in force for ``batch`` has already left the ring.
        """
        rows, count = self._np()
        n = int(count[0])
        lo = max(0, n - self.capacity)
        i = n - 1
        # Newest first: the rows newer than `batch` are the few published ahead of it (the publish delay).
        while i >= lo:
            slot = i % self.capacity
            if rows[slot, 0] <= batch:
                return rows[slot, 2:].copy(), int(rows[slot, 1]), i
            i -= 1
        raise RuntimeError(
            f"the proportions row for batch {batch} has left the schedule ring (capacity {self.capacity}); "
            "raise `capacity` or publish less often than once per batch"
        )

    def latest(self) -> tuple[int, int, np.ndarray]:
        """The newest row as ``(effective_from, mode, proportions)``."""
        rows, count = self._np()
        r = rows[(int(count[0]) - 1) % self.capacity]
        return int(r[0]), int(r[1]), r[2:].copy()

    def rows(self) -> list[tuple[int, int, np.ndarray]]:
        """The rows still in the ring, oldest first, as ``(effective_from, mode, proportions)``."""
        rows, count = self._np()
        n = int(count[0])
        out = []
        for i in range(max(0, n - self.capacity), n):
            r = rows[i % self.capacity]
            out.append((int(r[0]), int(r[1]), r[2:].copy()))
        return out

    def state_dict(self) -> dict[str, Any]:
        """The rows still in the ring (they include every row published ahead of the current batch)."""
        return {
            "version": _STATE_VERSION,
            "num_domains": self.num_domains,
            "num_rows": self.num_rows,
            "rows": [(e, m, p.tolist()) for e, m, p in self.rows()],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Replaces the rows in place (workers holding this schedule see the change).

        Raises:
            ValueError: on a version or domain-count mismatch.
        """
        if state_dict.get("version") != _STATE_VERSION:
            raise ValueError(f"schedule state has version {state_dict.get('version')!r}, expected {_STATE_VERSION}")
        if state_dict["num_domains"] != self.num_domains:
            raise ValueError(
                f"schedule state is for {state_dict['num_domains']} domains, this schedule has {self.num_domains}"
            )
        saved = state_dict["rows"][-self.capacity :]
        _, count = self._np()
        count[0] = 0
        # NOTE: rows are written back as saved, not re-normalised: dividing by a sum again can move the last
        # bit, and one bit can change a domain draw after a resume.
        for effective_from, mode, p in saved:
            self._append(np.asarray(p, dtype=np.float64), int(effective_from), int(mode))
