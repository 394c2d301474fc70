"""Schedule replay: play back an exported proportions trajectory (the DoReMi / RegMix proxy-to-target
workflow, or a prior for Aioli's restricted setting)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from odm._checks import check_int, is_int
from odm.policies.base import DomainStats, Policy, check_proportions

__all__ = ["Scheduled", "scheduled_proportions"]

Trajectory = Sequence[tuple[int, Sequence[float]]] | Mapping[int, Sequence[float]]


def scheduled_proportions(steps: np.ndarray, rows: np.ndarray, step: int) -> np.ndarray:
    """The row in force at ``step``: the last row whose step is ``≤ step`` (the first row before it)."""
    i = int(np.searchsorted(steps, step, side="right")) - 1
    return rows[max(i, 0)].copy()


class Scheduled(Policy):
    """Replays a trajectory ``[(step, proportions), …]``, step-wise constant.

    The format is :meth:`odm.OnlineMixer.export_schedule`'s: a row ``(s, p)`` holds the proportions published
    after the mixer's ``s``-th ``step()`` (``s = 0``: the initial ones). After update ``t`` the policy holds the
    row of the largest ``s ≤ t·steps_per_update`` (rows with equal steps: the last one wins). Replaying with
    the original's ``update_every`` as ``steps_per_update`` reproduces the run's proportions, as long as the
    original never skipped an update for lack of samples.

    Rows that already sum to 1 (within 1e-12) are replayed bit for bit; others are normalised.

    Args:
        trajectory: ``(step, proportions)`` pairs with non-decreasing integer steps ``≥ 0``, or a mapping
            ``{step: proportions}``.
        steps_per_update: trajectory steps per policy update (the original mixer's ``update_every``).

    Raises:
        ValueError: an empty trajectory, decreasing or negative steps, rows of different lengths or invalid
            proportions.

    Example:
        >>> from odm.policies import DomainStats
        >>> policy = Scheduled([(0, [0.5, 0.5]), (2, [0.9, 0.1])])
        >>> policy.update(DomainStats.from_losses([1.0, 1.0], [0.5, 0.5], step=1))
        >>> policy.proportions
        array([0.5, 0.5])
        >>> policy.update(DomainStats.from_losses([1.0, 1.0], [0.5, 0.5], step=2))
        >>> policy.proportions
        array([0.9, 0.1])
    """

    name = "scheduled"
    requires = frozenset()

    def __init__(self, trajectory: Trajectory, *, steps_per_update: int = 1) -> None:
        super().__init__()
        pairs = list(trajectory.items()) if isinstance(trajectory, Mapping) else list(trajectory)
        if not pairs:
            raise ValueError("`trajectory` must hold at least one (step, proportions) row, got none")
        steps: list[int] = []
        rows: list[np.ndarray] = []
        for n, pair in enumerate(pairs):
            try:
                step, p = pair
            except (TypeError, ValueError) as err:
                raise ValueError(f"`trajectory` row {n} must be a (step, proportions) pair, got {pair!r:.80}") from err
            if not is_int(step) or step < 0:
                raise ValueError(f"`trajectory` row {n}: step must be a non-negative integer, got {step!r}")
            if steps and step < steps[-1]:
                raise ValueError(f"`trajectory` steps must be non-decreasing; row {n} has {step} after {steps[-1]}")
            steps.append(int(step))
            row = check_proportions(p, len(rows[0]) if rows else None, name=f"trajectory row {n}")
            given = np.asarray(p, dtype=np.float64)
            # NOTE: rows that already sum to 1 are kept bit for bit, so a replay reproduces the exported run
            # exactly (renormalising can change the last bit).
            rows.append(given if abs(given.sum() - 1.0) <= 1e-12 else row)
        self.steps_per_update = check_int(steps_per_update, "steps_per_update", low=1)
        self._steps = np.asarray(steps, dtype=np.int64)
        self._rows = np.stack(rows)
        self.bind(self._rows.shape[1])

    def _init_state(self, num_domains: int) -> None:
        self._p = scheduled_proportions(self._steps, self._rows, 0)

    def update(self, stats: DomainStats) -> None:
        self._p = scheduled_proportions(self._steps, self._rows, stats.step * self.steps_per_update)

    def _get_state(self) -> dict[str, Any]:
        # A fingerprint of the trajectory, so a checkpoint is not resumed against another schedule.
        return {"num_rows": len(self._steps), "last_step": int(self._steps[-1])}

    def _set_state(self, state: dict[str, Any]) -> None:
        mine = {"num_rows": len(self._steps), "last_step": int(self._steps[-1])}
        theirs = {"num_rows": int(state["num_rows"]), "last_step": int(state["last_step"])}
        if mine != theirs:
            raise ValueError(f"Scheduled state_dict is for another trajectory ({theirs}); this one has {mine}")
