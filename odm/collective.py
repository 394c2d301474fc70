"""The one collective of a mixer step: statistics, the batch clock and the loader's payloads, in one all_reduce.

Under ``torch.distributed`` each :meth:`odm.OnlineMixer.step` sums one flat vector over the data-parallel
group: the step's :class:`~odm.feedback.FeedbackRows`, then one segment per rank of a zero block. A rank writes
only its own segment — its newest ``mix_step`` plus one, a failure flag, then each registered payload — so the
sum *gathers* them. That is how every rank learns the batch clock (the newest batch of any rank) and how the
loader's stream positions at the cut reach every rank, without a second collective and without one in
``state_dict()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from odm._checks import check_int
from odm._dist import distributed, rank_world
from odm.feedback import DomainFeedback

__all__ = ["StepCollective"]

_HEADER = 2  # segment columns before the payloads: next batch, failure flag


class StepCollective:
    """Registered payloads and the reduction that carries them.

    Args:
        group: the data-parallel process group (``None``: the world).
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.payloads: dict[str, tuple[Callable[[int], np.ndarray], int]] = {}
        self.gathered: dict[str, np.ndarray] = {}
        # One process: the cut of the last step and the keys then registered, whose payloads are computed when
        # first read (a payload is a function of the cut alone, so reading it later gives the same numbers).
        self._deferred: tuple[int, tuple[str, ...]] | None = None

    def register(self, key: str, local_fn: Callable[[int], np.ndarray], length: int) -> None:
        """See :meth:`odm.OnlineMixer.register_payload`."""
        if not isinstance(key, str) or not key:
            raise ValueError(f"`key` must be a non-empty string, got {key!r}")
        if key in self.payloads:
            raise ValueError(f"a payload {key!r} is already registered")
        if not callable(local_fn):
            raise TypeError(f"`local_fn` must be callable, got {type(local_fn).__name__}")
        self.payloads[key] = (local_fn, check_int(length, "length", low=0))

    def local(self) -> bool:
        """Whether a step reduces nothing: no running group of several ranks (:meth:`reduce` is then a copy)."""
        return not distributed(self.group)

    def get(self, key: str) -> np.ndarray | None:
        """See :meth:`odm.OnlineMixer.gathered`."""
        if key not in self.payloads:
            raise KeyError(f"no payload {key!r} is registered (registered: {sorted(self.payloads)})")
        if self._deferred is not None:
            cut, keys = self._deferred
            got = {}
            for k in keys:
                fn, length = self.payloads[k]
                arr = np.asarray(fn(cut), dtype=np.float64).reshape(1, -1)
                if arr.shape[1] != length:  # (raised again at every read: nothing is stored)
                    raise ValueError(f"payload {k!r} returned {arr.size} numbers, registered with {length}")
                got[k] = arr
            self.gathered.update(got)
            self._deferred = None
        return self.gathered.get(key)

    def commit(self, gathered: dict[str, np.ndarray] | None, cut: int) -> None:
        """Stores a committed step's payloads: ``gathered`` as :meth:`reduce` returned it (``None``: one process,
        computed from ``cut`` when first read)."""
        if gathered is None:
            self._deferred = (cut, tuple(self.payloads)) if self.payloads else None
        else:
            self._deferred = None
            self.gathered.update(gathered)

    def clear(self) -> None:
        """Forgets every payload value (a restored mixer has stepped on none of this run's batches)."""
        self._deferred = None
        self.gathered.clear()

    def _segment(
        self, next_batch: int, cut: int, error: BaseException | None
    ) -> tuple[np.ndarray, BaseException | None]:
        """This rank's segment [next batch, failed flag, payloads…], and the exception to raise after the
        collective: ``error`` (this rank's, found before it) or the first a payload raised."""
        parts: list[Any] = [np.array([float(next_batch), 0.0 if error is None else 1.0])]
        for key, (fn, length) in self.payloads.items():
            try:
                arr = np.asarray(fn(cut), dtype=np.float64).reshape(-1)
                if arr.shape != (length,):
                    raise ValueError(f"payload {key!r} returned {arr.size} numbers, registered with {length}")
            except Exception as err:  # re-raised after the collective, so no rank is left waiting
                arr = np.zeros(length)
                parts[0][1] = 1.0
                error = error or err
            parts.append(arr)
        return np.concatenate(parts), error

    def reduce(
        self,
        feedback: DomainFeedback,
        lookup: Callable[[int], np.ndarray],
        next_batch: int,
        cut: int,
        error: BaseException | None = None,
    ) -> tuple[np.ndarray, int, dict[str, np.ndarray] | None]:
        """One all_reduce: the step's packed statistics summed over the ranks, the batch clock (the largest
        ``next_batch`` of any rank) and every rank's payloads ``{key: (world, length)}`` (not yet stored; in one
        process ``None``: :meth:`commit` defers them to the first read). ``error``: this rank cannot complete the
        step; it is raised after the collective, so that no rank is left waiting in it.

        Raises:
            Exception: ``error``, or a payload that failed on this rank (as raised), or ``ValueError`` naming the
                ranks where one of those happened — on every rank, after the collective.
        """
        group = self.group
        dist = not self.local()
        if not dist:  # one process: the payloads are this rank's own, nothing to gather (read when needed)
            if error is not None:
                raise error
            return feedback.reduce(lookup, None, group, dist), next_batch, None
        tail, error = self._segment(next_batch, cut, error)
        rank, world = rank_world(group) if dist else (0, 1)
        if world > 1:
            block = np.zeros((world, tail.size))
            block[rank] = tail
            tail = block.reshape(-1)
        flat = feedback.reduce(lookup, tail, group, dist)
        segments = flat[feedback.size :].reshape(world, -1)
        failed = np.flatnonzero(segments[:, 1])
        if failed.size:
            if error is not None:
                raise error
            raise ValueError(
                f"odm: rank(s) {failed.tolist()} failed this step (a payload of the loader, or a check: see that "
                "rank's error)"
            )
        gathered, offset = {}, _HEADER
        for key, (_, length) in self.payloads.items():
            gathered[key] = segments[:, offset : offset + length].copy()
            offset += length
        return flat[: feedback.size], int(segments[:, 0].max()), gathered
