"""The trajectory of published proportions, bounded: recent rows exact, older rows thinned geometrically.

A run of 10⁶ policy updates publishes up to 10⁶ rows; keeping each would grow memory and every checkpoint
with the run (K floats per row). :class:`History` keeps at most ``capacity`` rows: the newest ``exact`` rows
as published, and before them a sample of the older ones whose spacing doubles each time they are thinned —
so recent behaviour replays exactly and the whole run stays visible at a resolution that fades with age.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from odm._checks import check_int
from odm._state import StateError, as_int, read_simplex

__all__ = ["History"]


class History:
    """At most ``capacity`` rows ``(num_steps, proportions)``, oldest first.

    When the ring is full, the rows older than the newest ``exact`` keep every other one (the first row, the
    initial proportions, always stays). Rows thinned once are spaced 2 apart, twice 4 apart, and so on, so the
    older part holds ``capacity - exact`` rows over the whole run and the cost is independent of its length.

    Args:
        num_domains: ``K``.
        exact: newest rows never thinned.
        capacity: rows held at most (> ``exact``).

    Example:
        >>> h = History(2, exact=2, capacity=4)
        >>> for s in range(6):
        ...     h.append(s, np.array([0.5, 0.5]))
        >>> [s for s, _ in h]
        [0, 3, 4, 5]
    """

    def __init__(self, num_domains: int, *, exact: int = 1024, capacity: int = 2048) -> None:
        self.num_domains = check_int(num_domains, "num_domains", low=1)
        self.exact = check_int(exact, "exact", low=1)
        self.capacity = check_int(capacity, "capacity", low=self.exact + 2)
        self._steps = np.zeros(self.capacity, dtype=np.int64)
        self._rows = np.zeros((self.capacity, self.num_domains))
        self._len = 0
        self.num_thinned = 0  # rows dropped over the run

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        for i in range(self._len):
            yield int(self._steps[i]), self._rows[i].copy()

    def __getitem__(self, i: int) -> tuple[int, np.ndarray]:
        j = range(self._len)[i]
        return int(self._steps[j]), self._rows[j].copy()

    def clear(self) -> None:
        """Forgets every row."""
        self._len = 0
        self.num_thinned = 0

    def append(self, num_steps: int, p: np.ndarray) -> None:
        """Records that ``p`` was published after ``num_steps`` calls of ``step()``."""
        if self._len == self.capacity:
            self._thin()
        self._steps[self._len] = num_steps
        self._rows[self._len] = p
        self._len += 1

    def _thin(self) -> None:
        old = self._len - self.exact
        keep = np.concatenate([np.arange(0, old, 2), np.arange(old, self._len)])
        n = keep.size
        self._steps[:n] = self._steps[keep]
        self._rows[:n] = self._rows[keep]
        self.num_thinned += self._len - n
        self._len = n

    def export(self) -> list[tuple[int, list[float]]]:
        """``[(num_steps, proportions), …]`` oldest first, the format ``odm.policies.Scheduled`` replays."""
        n = self._len
        return list(zip(self._steps[:n].tolist(), self._rows[:n].tolist()))

    def check_state(self, saved: Any, path: str = "history") -> tuple[list[int], np.ndarray]:
        """Rows saved as :meth:`export` writes them, checked: ``(steps, rows)`` (the newest ``capacity``).

        Raises:
            ValueError: a malformed entry, naming its key path (``mixer.history[3]``).
        """
        if not isinstance(saved, list | tuple) or not saved:
            raise StateError(f"checkpoint field `{path}` must be a non-empty list of [num_steps, proportions]")
        steps: list[int] = []
        rows = []
        for i, entry in enumerate(saved):
            where = f"{path}[{i}]"
            if not isinstance(entry, list | tuple) or len(entry) != 2:
                raise StateError(f"checkpoint field `{where}` must be [num_steps, proportions], got {entry!r}")
            steps.append(as_int(entry[0], f"{where}.num_steps", low=steps[-1] if steps else 0))
            rows.append(read_simplex(entry[1], f"{where}.proportions", self.num_domains))
        return steps[-self.capacity :], np.array(rows[-self.capacity :])

    def restore(self, steps: list[int], rows: np.ndarray, num_thinned: int) -> None:
        """Replaces the rows with what :meth:`check_state` returned."""
        self._len = len(steps)
        self._steps[: self._len] = steps
        self._rows[: self._len] = rows
        self.num_thinned = num_thinned
