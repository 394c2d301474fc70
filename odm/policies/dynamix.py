"""DynamixSFT: a bandit over domains whose Boltzmann exploration is anchored to the prior proportions.

Shin et al. 2025, "DynamixSFT: Dynamic Mixture Optimization of Instruction Tuning Collections" (arXiv
2508.12116). Each domain's reward is how much training on it has just improved the held-out loss (the paper's
*1-step look-ahead reward*); the proportions are a *prior-scaled Boltzmann* distribution,
``p_i ∝ prior_i·exp(Q_i/τ)``, so they stay anchored to the collection's own proportions and only tilt towards
the domains that currently help. See ``docs/algorithms.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from odm._checks import check_choice, check_float, check_int
from odm.policies.base import EVAL_LOSS, TRAIN_LOSS, DomainStats, Policy, check_proportions

__all__ = ["DynamixSFT", "lookahead_reward", "prior_boltzmann"]

CREDITS = ("own", "lookahead")


Z_MAX = 3.0  # |z| bound: p_i/prior_i stays within exp(±2·Z_MAX/τ)


def prior_boltzmann(prior: np.ndarray, q: np.ndarray, noise: float, temperature: float) -> np.ndarray:
    """``p_i ∝ prior_i·exp(z_i/τ)`` with ``z = clip((Q − mean Q)/σ, ±3)``: the smoothed rewards' differences
    in units of ``σ = noise``, their standard error. Differences that are only noise tilt by about
    ``exp(±1/τ)``, consistent ones up to ``exp(±3/τ)`` each way; ``p = prior`` while ``σ = 0``."""
    if not noise > 0:
        return prior.copy()
    logits = np.clip((q - q.mean()) / noise, -Z_MAX, Z_MAX) / temperature
    with np.errstate(divide="ignore"):
        logits = logits + np.log(prior)
    w = np.exp(logits - logits.max())
    return w / w.sum()


def lookahead_reward(
    prev: np.ndarray, now: np.ndarray, prior: np.ndarray, share: np.ndarray, drawn_under: np.ndarray, credit: str
) -> tuple[np.ndarray, np.ndarray]:
    """Per-domain rewards of one interval between two held-out evaluations, and which domains they update.

    * ``"own"``: ``r_i = (L_i^prev − L_i^now)/L_i^prev`` — the relative drop of domain ``i``'s own held-out loss;
      every domain is updated (works with any granularity: per-sample mixing included).
    * ``"lookahead"``: the prior-weighted relative drop of all held-out losses,
      ``Δ = Σ_j prior_j·(L_j^prev − L_j^now)/L_j^prev``, credited as ``r_i = Δ·share_i/π_i`` to the domains
      trained in the interval (``share`` their sample shares, ``π`` the proportions they were drawn under).
      With one domain per batch and an evaluation after every update this is the paper's 1-step look-ahead
      reward of the domain drawn, importance-weighted so that its expectation is that reward for every domain.
    """
    rel = (prev - now) / np.where(prev > 0, prev, 1.0)
    if credit == "own":
        return rel, np.ones(prev.shape[0], dtype=bool)
    delta = float(prior @ rel)
    drawn = share > 0
    return np.where(drawn, delta * share / np.maximum(drawn_under, 1e-12), 0.0), drawn


class DynamixSFT(Policy):
    """DynamixSFT: prior-scaled Boltzmann exploration over held-out look-ahead rewards.

    Every ``eval_every`` updates the policy asks for a held-out evaluation (:meth:`wants_eval`). Between two
    evaluations it accumulates what was trained; at each evaluation it computes per-domain rewards
    (:func:`lookahead_reward`), smooths them (``Q_i ← β·Q_i + (1 − β)·r_i`` for the domains updated, ``Q``
    starting at 0; ``v_i ← β·v_i + (1 − β)·(r_i − Q_i)²`` tracks their noise) and sets
    ``p = (1 − γ)·prior_boltzmann(prior, Q, σ, τ) + γ·prior`` with ``σ = sqrt(mean_i v_i·(1 − β)/(1 + β))``,
    the standard error of a smoothed reward.

    A domain that stops improving stops earning reward and sinks below the others' mean, so it is starved down
    towards ``γ·prior_i`` — never to zero: the prior keeps every domain in the mixture. When no domain
    helps more than noise, the mixture returns to the prior.

    Choices where the paper leaves a detail open, or where ``observe``/``step`` cannot do what it does: the
    paper measures the look-ahead reward with a *virtual* gradient step per dataset on the current model; a
    mixing policy never touches the model, so the reward here comes from the real steps between two held-out
    evaluations. ``credit="lookahead"`` (the default) is exactly the paper's reward in expectation with one
    domain per batch and ``eval_every=1``; when every batch mixes domains it cannot tell them apart (each domain
    trained gets about the same credit), so the policy stays near its prior. ``credit="own"`` credits each
    domain with the drop of its own held-out loss instead, which discriminates under any mixing but favours
    whatever is easiest to learn: on a real corpus at ``τ = 0.5`` it put 76–95 % of the batch on one domain and
    lost 0.4–0.5 bits per byte (``docs/policies.md``); if you use it, raise ``temperature`` (``τ = 4`` bounds
    the tilt to about 2× either way). Rewards are standardised across domains in units of their own noise
    before the temperature, so ``τ`` does not depend on the loss scale.

    Args:
        prior: the collection's own proportions, the anchor (default uniform).
        temperature: ``τ > 0``; lower tilts further from the prior.
        smoothing: ``β ∈ [0, 1)``, EMA weight on the old reward estimate.
        eval_every: updates between held-out evaluations (each evaluation is one reward).
        credit: ``"lookahead"`` (default) or ``"own"`` (see :func:`lookahead_reward`).
        exploration: ``γ ∈ [0, 1]``, the prior's share kept in the proportions: ``p ≥ γ·prior``.

    Example:
        >>> policy = DynamixSFT(eval_every=1, credit="own").bind(2)
        >>> ones = np.ones(2)
        >>> policy.update(DomainStats(ones, ones, ones / 2, step=1, eval_loss=np.array([3.0, 3.0])))
        >>> policy.update(DomainStats(ones, ones, ones / 2, step=2, eval_loss=np.array([2.0, 3.0])))
        >>> bool(policy.proportions[0] > 0.5)  # domain 0's held-out loss fell, domain 1's did not
        True
    """

    name = "dynamix"
    requires = frozenset({TRAIN_LOSS, EVAL_LOSS})

    def __init__(
        self,
        prior: Sequence[float] | np.ndarray | None = None,
        *,
        temperature: float = 0.5,
        smoothing: float = 0.9,
        eval_every: int = 20,
        credit: str = "lookahead",
        exploration: float = 0.05,
    ) -> None:
        super().__init__()
        self.temperature = check_float(temperature, "temperature", low=0, low_open=True)
        self.smoothing = check_float(smoothing, "smoothing", low=0, high=1, high_open=True)
        self.eval_every = check_int(eval_every, "eval_every", low=1)
        self.credit = check_choice(credit, "credit", CREDITS)
        self.exploration = check_float(exploration, "exploration", low=0, high=1)
        self.prior = None if prior is None else check_proportions(prior, name="prior")
        if self.prior is not None:
            self.bind(len(self.prior))

    def _init_state(self, num_domains: int) -> None:
        k = num_domains
        if self.prior is not None and len(self.prior) != k:
            raise ValueError(f"`prior` has {len(self.prior)} entries but the mixer has {k} domains")
        self._prior = self.prior if self.prior is not None else np.full(k, 1.0 / k)
        self._p = self._prior.copy()
        self._q = np.zeros(k)
        self._v = np.zeros(k)
        self._last_eval: np.ndarray | None = None
        self._counts = np.zeros(k)  # samples trained since the last evaluation
        self._drawn = np.zeros(k)  # count-weighted proportions they were drawn under

    def _get_state(self) -> dict[str, Any]:
        return {"q": self._q, "v": self._v, "last_eval": self._last_eval, "counts": self._counts, "drawn": self._drawn}

    def _set_state(self, state: dict[str, Any]) -> None:
        self._q = np.asarray(state["q"], dtype=np.float64)
        self._v = np.asarray(state["v"], dtype=np.float64)
        last = state["last_eval"]
        self._last_eval = None if last is None else np.asarray(last, dtype=np.float64)
        self._counts = np.asarray(state["counts"], dtype=np.float64)
        self._drawn = np.asarray(state["drawn"], dtype=np.float64)

    @property
    def rewards(self) -> np.ndarray:
        """``Q``, the smoothed reward of each domain."""
        return self._q.copy()

    def wants_eval(self, step: int) -> bool:
        return step % self.eval_every == 0

    def update(self, stats: DomainStats) -> None:
        k = self.num_domains
        # An evaluation-only update (no samples, finite) still carries a reward.
        if not self._usable(stats, losses=False) and stats.count.sum() != 0:
            return
        total = stats.count.sum()
        self._counts = self._counts + stats.count
        self._drawn = self._drawn + total * stats.proportions
        ev = self._eval_loss(stats)
        if ev is None:
            return
        if self._last_eval is not None and self._counts.sum() > 0:
            n = self._counts.sum()
            reward, hit = lookahead_reward(
                self._last_eval, ev, self._prior, self._counts / n, self._drawn / n, self.credit
            )
            b = self.smoothing
            self._v = np.where(hit, b * self._v + (1.0 - b) * (reward - self._q) ** 2, self._v)
            self._q = np.where(hit, b * self._q + (1.0 - b) * reward, self._q)
            # The standard error of a smoothed Q: an EMA with weight β averages about (1 + β)/(1 − β) rewards.
            se = float(np.sqrt(self._v.mean() * (1.0 - b) / (1.0 + b)))
            tilted = prior_boltzmann(self._prior, self._q, se, self.temperature)
            self._p = (1.0 - self.exploration) * tilted + self.exploration * self._prior
        self._last_eval = ev
        self._counts = np.zeros(k)
        self._drawn = np.zeros(k)
