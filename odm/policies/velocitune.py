"""Velocitune: up-weight the domains that learn slowest relative to how far they still have to go.

Luo et al. 2025, "Velocitune: A Velocity-based Dynamic Domain Reweighting Method for Continual Pre-training"
(arXiv 2411.14318). Each domain has an initial loss ``L₀``, a target loss ``L*`` predicted by a per-domain
scaling law, and a current loss ``L_t``; its *learning velocity* ``V = (L_t − L*)/(L₀ − L*)`` is 1 while
nothing was learned and 0 once the target is reached. Weights move exponentially towards the slow domains
(large ``V``), as Group DRO moves towards the high-loss groups. See ``docs/algorithms.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from odm._checks import check_float, check_int
from odm.policies.base import TRAIN_LOSS, DomainStats, Policy, check_proportions
from odm.policies.scaling_law import fit_power_law, power_law

__all__ = ["Velocitune", "learning_velocity", "velocitune_step"]


def learning_velocity(current: np.ndarray, initial: np.ndarray, target: np.ndarray, min_gap: float = 0.0) -> np.ndarray:
    """``V = (L_t − L*)/(L₀ − L*)`` clipped to ``[0, 1]``. A domain with nothing left to learn
    (``L₀ − L* ≤ min_gap·L₀``) has ``V = 0``: the ratio of two noisy near-equal losses says nothing."""
    gap = initial - target
    learnable = gap > min_gap * np.abs(initial)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(learnable, (current - target) / np.where(learnable, gap, 1.0), 0.0)
    return np.clip(v, 0.0, 1.0)


def velocitune_step(
    log_w: np.ndarray, velocity: np.ndarray, eta: float, prior: np.ndarray, smoothing: float
) -> tuple[np.ndarray, np.ndarray]:
    """``log w ← log w + η·V``; ``p = (1 − c)·w/Σw + c·prior``. Returns ``(log_w, p)`` (``log_w`` shifted so its
    maximum is 0, which keeps any number of updates finite)."""
    log_w = log_w + eta * velocity
    log_w = log_w - log_w.max()
    w = np.exp(log_w)
    return log_w, (1.0 - smoothing) * w / w.sum() + smoothing * prior


class Velocitune(Policy):
    """Velocitune: exponential weights on each domain's learning velocity towards a scaling-law target.

    Three stages, all on the per-domain training loss the mixer already reduces (no extra evaluation):

    1. ``L₀``: each domain's mean loss over the first ``initial_steps`` updates (sampling ``prior``).
    2. Target: at update ``fit_step`` a power law ``L̂_i(n) = e^{E_i} + e^{a_i}·n^{−α_i}`` is fitted to each
       domain's loss history (:func:`~odm.policies.scaling_law.fit_power_law`, ``n`` the samples the run has
       seen) and ``L*_i = L̂_i(n_end)``, the loss the law predicts at the end of the run (``horizon`` updates,
       at the mean samples per update so far). The law's value at a horizon is well determined even where its
       asymptote ``e^E`` is not (a flat curve fits any split of ``e^E + e^a`` with ``α = 0``). Or give
       ``target=`` per domain (e.g. from a proxy run, as the paper does) and no fit runs.
    3. Every ``update_interval`` updates after that: ``V_i = (L_t,i − L*_i)/(L₀,i − L*_i)`` clipped to
       ``[0, 1]`` (``L_t`` an EMA of the domain's training loss with weight ``smoothing_loss`` on the old value;
       ``V_i = 0`` when ``L₀,i − L*_i ≤ min_gap·L₀,i``), ``log w ← log w + η·V``, ``p = (1 − c)·w/Σw + c·prior``;
       ``w`` starts at ``prior``.

    A domain that has stopped improving by the fit (its law predicts no further gain, e.g. noise) has ``V = 0``
    and loses weight to the domains still far from their targets; among learnable domains the slow ones
    (``V`` near 1) gain on the fast ones (``V`` near 0), which evens out the progress towards the targets.

    Choices where the paper leaves a detail open (documented, not the authors' code, which is not public): the
    paper computes velocity on evaluations of held-out data and fits the target on a proxy model trained on a
    subset; here the loss is the EMA of the training loss (single-epoch data: an unbiased held-out estimate),
    and the target is fitted online on the run's own first ``fit_step`` updates. The step size ``η`` and the
    interval are our defaults (see ``docs/policies.md``).

    Args:
        prior: starting and smoothing proportions (default uniform).
        eta: ``η > 0``, step size per weight update.
        update_interval: updates between weight updates.
        initial_steps: updates averaged for ``L₀``.
        fit_step: update at which the targets are fitted (``≥ initial_steps + 3``); ignored with ``target``.
        horizon: the run's planned number of updates; the fitted law at that point gives the target.
        target: per-domain target losses ``L*`` (skips the fit).
        min_gap: a domain whose target is within ``min_gap·L₀`` of ``L₀`` has nothing to learn (``V = 0``).
        smoothing: ``c ∈ [0, 1]``, weight of ``prior`` in the proportions.
        smoothing_loss: EMA weight on the old value of ``L_t``, in ``[0, 1)``.

    Example:
        >>> policy = Velocitune(target=[1.0, 1.0], initial_steps=1, update_interval=1).bind(2)
        >>> for t in range(1, 4):
        ...     policy.update(DomainStats.from_losses([3.0, 1.5 if t > 1 else 3.0], policy.proportions, step=t))
        >>> bool(policy.proportions[0] > policy.proportions[1])  # domain 0 has not moved towards its target
        True
    """

    name = "velocitune"
    requires = frozenset({TRAIN_LOSS})

    def __init__(
        self,
        prior: Sequence[float] | np.ndarray | None = None,
        *,
        eta: float = 0.5,
        update_interval: int = 50,
        initial_steps: int = 20,
        fit_step: int = 500,
        horizon: int = 10_000,
        target: Sequence[float] | np.ndarray | None = None,
        min_gap: float = 0.01,
        smoothing: float = 0.01,
        smoothing_loss: float = 0.9,
    ) -> None:
        super().__init__()
        self.eta = check_float(eta, "eta", low=0, low_open=True)
        self.update_interval = check_int(update_interval, "update_interval", low=1)
        self.initial_steps = check_int(initial_steps, "initial_steps", low=1)
        self.fit_step = check_int(fit_step, "fit_step", low=self.initial_steps + 3)
        self.horizon = check_int(horizon, "horizon", low=1)
        self.min_gap = check_float(min_gap, "min_gap", low=0)
        self.smoothing = check_float(smoothing, "smoothing", low=0, high=1)
        self.smoothing_loss = check_float(smoothing_loss, "smoothing_loss", low=0, high=1, high_open=True)
        self.prior = None if prior is None else check_proportions(prior, name="prior")
        self.target = None
        if target is not None:
            tgt = np.asarray(target, dtype=np.float64)
            if tgt.ndim != 1 or not np.all(np.isfinite(tgt)):
                raise ValueError(f"`target` must be a 1-D sequence of finite losses, got {target!r}")
            self.target = tgt
        self._bind_from(prior=self.prior, target=self.target)

    def _init_state(self, num_domains: int) -> None:
        k = num_domains
        for arg, val in (("prior", self.prior), ("target", self.target)):
            if val is not None and len(val) != k:
                raise ValueError(f"`{arg}` has {len(val)} entries but the mixer has {k} domains")
        self._prior = self.prior if self.prior is not None else np.full(k, 1.0 / k)
        self._p = self._prior.copy()
        with np.errstate(divide="ignore"):
            self._log_w = np.log(self._prior)
        self._updates = 0
        self._n = 0.0
        self._init_sum = np.zeros(k)  # loss sums and counts of the first `initial_steps` updates
        self._init_cnt = np.zeros(k)
        self._ema = np.full(k, np.nan)
        self._target = None if self.target is None else self.target.copy()
        self._hist: list[list[float]] = []  # per update until the fit: n, then K mean losses (NaN: not drawn)

    def _get_state(self) -> dict[str, Any]:
        return {
            "log_w": self._log_w,
            "updates": self._updates,
            "n": self._n,
            "init_sum": self._init_sum,
            "init_cnt": self._init_cnt,
            "ema": self._ema,
            "target": self._target,
            "hist": self._hist,
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        self._log_w = np.asarray(state["log_w"], dtype=np.float64)
        self._updates, self._n = int(state["updates"]), float(state["n"])
        self._init_sum = np.asarray(state["init_sum"], dtype=np.float64)
        self._init_cnt = np.asarray(state["init_cnt"], dtype=np.float64)
        self._ema = np.asarray(state["ema"], dtype=np.float64)
        self._target = None if state["target"] is None else np.asarray(state["target"], dtype=np.float64)
        self._hist = [list(map(float, row)) for row in state["hist"]]

    # -- public face ---------------------------------------------------------------------------------------
    @property
    def initial_loss(self) -> np.ndarray:
        """``L₀`` (NaN for a domain not seen yet)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self._init_cnt > 0, self._init_sum / np.maximum(self._init_cnt, 1e-300), np.nan)

    @property
    def target_loss(self) -> np.ndarray | None:
        """``L*`` per domain; None before the fit."""
        return None if self._target is None else self._target.copy()

    @property
    def velocity(self) -> np.ndarray | None:
        """The current ``V`` per domain; None before the target is known."""
        if self._target is None:
            return None
        return learning_velocity(self._ema, self.initial_loss, self._target, self.min_gap)

    def update(self, stats: DomainStats) -> None:
        if not self._usable(stats):
            return
        self._updates += 1
        self._n += float(stats.count.sum())
        seen = stats.observed
        mean = stats.mean_loss
        if self._updates <= self.initial_steps:
            self._init_sum += np.where(seen, stats.loss_sum, 0.0)
            self._init_cnt += stats.count
        b = self.smoothing_loss
        self._ema = np.where(seen, np.where(np.isnan(self._ema), mean, b * self._ema + (1 - b) * mean), self._ema)
        if self._target is None:
            self._hist.append([self._n, *np.where(seen, mean, np.nan).tolist()])
            if self._updates >= self.fit_step:
                self._fit_target()
            return
        if self._updates % self.update_interval == 0 and self._updates > self.initial_steps:
            v = learning_velocity(self._ema, self.initial_loss, self._target, self.min_gap)
            v = np.where(np.isfinite(v), v, 0.0)  # a domain never seen has no velocity yet
            self._log_w, self._p = velocitune_step(self._log_w, v, self.eta, self._prior, self.smoothing)

    def _fit_target(self) -> None:
        hist = np.asarray(self._hist, dtype=np.float64)
        n, loss = hist[:, 0], hist[:, 1:].T
        params, ok = fit_power_law(n, loss)
        n_end = self._n / self._updates * max(self.horizon, self._updates)
        predicted = power_law(params, n_end)
        # A domain without a usable fit keeps L* = L₀: nothing to learn, V = 0 (it is neither chased nor starved
        # more than the smoothing allows).
        self._target = np.where(ok & np.isfinite(predicted), predicted, self.initial_loss)
        self._hist = []
