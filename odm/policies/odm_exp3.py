"""ODM: EXP3 with smoothed loss rewards (Albalak et al. 2023, "Efficient Online Data Mixing").

Two variants, chosen by ``variant=`` (``docs/algorithms.md``, "ODM"):

* ``"paper"`` (Algorithm 1 of the paper): importance-weighted, EMA-smoothed reward estimates and an EXP3
  policy whose learning rate is the previous exploration rate,
  ``R̂_i ← α·R̂_i + (1−α)·L̂_i`` for drawn domains, ``π_{t+1} = (1 − K·ε_{t+1})·softmax(ε_t·R̂) + ε_{t+1}``.
* ``"released"`` (the authors' released training scripts): no importance weight, ``exp`` of the mean loss,
  ``R̂_i ← α·R̂_i + (1−α)·exp(L̄_i)``, ``π = (1 − K·ε_t)·R̂/ΣR̂ + ε_t``. It samples about
  ``(1−Kε)·softmax(L) + ε`` and moves much further from uniform than the paper variant.

Both share ``ε_t = min(1/K, sqrt(ln K / (K·t)))``: while ``ε_t = 1/K`` (``t ≤ K·ln K``) the policy is exactly
uniform.

Granularity: the paper pulls one domain per micro-batch and, in an update of ``G`` micro-batches (gradient
accumulation), adds up the rewards ``L/π_t(i)`` of every micro-batch drawn from domain ``i``: the reward of an
update is ``Σ_{micro-batches of i} L_b / π_t(i)``. Here a domain is *pulled* in an update when it has samples in
it (``count_i > 0``), which covers batch and sample granularity alike, and each micro-batch contributes its
share of domain ``i`` (``S_{b,i}/N_b``) times that share's mean loss. With ``G = stats.num_batches`` micro-batches
of equal size ``N/G`` this sums to ``L̂_i = G·S_i / (N·π_t(i))`` (``S_i`` the domain's loss sum over the
update, ``N`` all samples of the update). With one-domain micro-batches that is exactly the paper's sum; with
per-sample mixing it is ``G`` times an unbiased estimate of the domain's mean loss over ``π_t(i)``
(``E[S_i] = N·π_i·L_i``). The policy's step size is fixed by the ε schedule (it is not scale-invariant), so
``G`` matters: the paper's runs use ``G = 8``. The released variant uses the domain's mean loss ``S_i / count_i``
(no ``G``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from odm._checks import check_int
from odm.policies.bandits import MIN_PROPORTION, check_choice, check_open_unit
from odm.policies.base import DomainStats, Policy, check_proportions

__all__ = ["ODM", "exploration_rate", "odm_paper_update", "odm_released_update"]

VARIANTS = ("paper", "released")
DEFAULT_ALPHA = {"paper": 0.9, "released": 0.5}


def exploration_rate(step: int, num_domains: int) -> float:
    """``ε_t = min(1/K, sqrt(ln K / (K·t)))``, with ``ε_0 = 1/K``."""
    if step <= 0:
        return 1.0 / num_domains
    return min(1.0 / num_domains, math.sqrt(math.log(num_domains) / (num_domains * step)))


def _mix(softmax_part: np.ndarray, eps: float) -> np.ndarray:
    k = softmax_part.shape[0]
    # NOTE: 1 − K·ε is exactly 0 while ε = 1/K in real arithmetic, but not always in floats.
    return max(0.0, 1.0 - k * eps) * softmax_part + eps


def odm_paper_update(
    estimates: np.ndarray,
    loss_sum: np.ndarray,
    count: np.ndarray,
    proportions: np.ndarray,
    step: int,
    alpha: float,
    num_batches: int = 1,
    total: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The paper variant of one ODM update (Albalak et al. 2023, Algorithm 1).

    ``R̂_i ← α·R̂_i + (1−α)·G·S_i/(N·π_t(i))`` for domains with ``count_i > 0`` (others keep ``R̂_i``), with
    ``G = num_batches`` (the micro-batches of the update: the paper sums one reward per micro-batch), then
    ``π_{t+1} = (1 − K·ε_{t+1})·softmax(ε_t·R̂) + ε_{t+1}`` with ``t = step``.

    Returns:
        ``(estimates, proportions)``.
    """
    k = estimates.shape[0]
    # G·S_i / (N·π_i) = Σ over the G micro-batches of share_{b,i}·mean_{b,i} / π_i, in one division
    n = float(count.sum()) if total is None else total
    weighted = loss_sum * (num_batches / n) / np.maximum(proportions, MIN_PROPORTION)
    new = np.where(count > 0, alpha * estimates + (1.0 - alpha) * weighted, estimates)
    eps, lr = exploration_rate(step + 1, k), exploration_rate(step, k)
    if eps * k >= 1.0:  # ε = 1/K: exactly uniform, whatever the estimates (t ≤ K·ln K)
        return new, np.full(k, eps)
    logits = lr * new
    w = np.exp(logits - logits.max())
    return new, _mix(w * (1.0 / float(w.sum())), eps)


def odm_released_update(
    log_estimates: np.ndarray,
    loss_sum: np.ndarray,
    count: np.ndarray,
    step: int,
    alpha: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The released-code variant of one ODM update, in log space.

    ``R̂_i ← α·R̂_i + (1−α)·exp(L̄_i)`` for domains with ``count_i > 0``, ``π = (1 − K·ε_t)·R̂/ΣR̂ + ε_t``.
    ``log R̂`` is stored (``−inf`` before a domain's first pull) and updated with ``logaddexp``, so
    ``exp(L̄)`` never overflows. Before any domain was drawn, ``R̂/ΣR̂`` is taken as uniform.

    Returns:
        ``(log_estimates, proportions)``.
    """
    k = log_estimates.shape[0]
    pulled = count > 0
    mean = loss_sum / np.where(pulled, count, 1.0)
    blended = np.logaddexp(math.log(alpha) + log_estimates, math.log1p(-alpha) + mean)
    new = np.where(pulled, blended, log_estimates)
    top = new.max()
    if np.isneginf(top):
        share = np.full(k, 1.0 / k)
    else:
        w = np.exp(new - top)
        share = w / w.sum()
    return new, _mix(share, exploration_rate(step, k))


class ODM(Policy):
    """Online Data Mixing (Albalak et al. 2023): EXP3 with smoothed training-loss rewards.

    See the module docstring for the two variants and how per-sample data is handled. Proportions stay
    ``≥ ε_t``; during the warm-up they are the initial proportions and nothing is learned.

    Args:
        variant: ``"paper"`` (Algorithm 1 of the paper, the default) or ``"released"`` (the authors' scripts);
            the released rule chases an unlearnable domain much harder (evidence in ``docs/policies.md``).
        alpha: smoothing ``α ∈ (0, 1)`` (weight on the old estimate). Default: 0.9 for ``"paper"`` (our choice),
            0.5 for ``"released"`` (the released scripts).
        warmup_steps: updates (``stats.step ≤ warmup_steps``) ignored at the start; the paper uses 1% of the
            steps, the released scripts 2000.
        initial: proportions before the first learned update (default uniform; the released scripts use the
            corpus' natural weights). Giving them binds the policy to their length.

    Example:
        >>> from odm.policies import DomainStats
        >>> policy = ODM(variant="released").bind(2)
        >>> for t in range(1, 4):
        ...     policy.update(DomainStats.from_losses([4.0, 2.0], policy.proportions, step=t))
        >>> policy.proportions.round(3)
        array([0.622, 0.378])
    """

    name = "odm"
    simplex_update = True  # (1 − K·ε)·softmax + ε

    def __init__(
        self,
        variant: str = "paper",
        *,
        alpha: float | None = None,
        warmup_steps: int = 0,
        initial: Sequence[float] | np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.variant = check_choice("variant", variant, VARIANTS)
        self.alpha = DEFAULT_ALPHA[self.variant] if alpha is None else check_open_unit("alpha", alpha)
        self.warmup_steps = check_int(warmup_steps, "warmup_steps", low=0)
        self._initial = None if initial is None else check_proportions(initial, name="initial")
        if self._initial is not None:
            self.bind(len(self._initial))

    def _init_state(self, num_domains: int) -> None:
        if self._initial is not None and len(self._initial) != num_domains:
            raise ValueError(f"`initial` has {len(self._initial)} entries, but the mixer has {num_domains} domains")
        start = -np.inf if self.variant == "released" else 0.0
        self._estimates = np.full(num_domains, start)
        self._p = self._initial.copy() if self._initial is not None else np.full(num_domains, 1.0 / num_domains)

    def update(self, stats: DomainStats) -> None:
        if stats.step <= self.warmup_steps:
            return
        total = self._usable(stats)
        if not total:
            return
        if self.variant == "paper":
            self._estimates, self._p = odm_paper_update(
                self._estimates,
                stats.loss_sum,
                stats.count,
                stats.proportions,
                stats.step,
                self.alpha,
                stats.num_batches,
                total,
            )
        else:
            self._estimates, self._p = odm_released_update(
                self._estimates, stats.loss_sum, stats.count, stats.step, self.alpha
            )

    def _get_state(self) -> dict[str, Any]:
        return {"variant": self.variant, "estimates": self._estimates.copy()}

    def _check_state(self, state: dict[str, Any]) -> None:
        if state.get("variant", self.variant) != self.variant:
            raise ValueError(f"ODM state_dict is for variant {state['variant']!r}, this policy is {self.variant!r}")

    def _set_state(self, state: dict[str, Any]) -> None:
        self._estimates = np.array(state["estimates"], dtype=np.float64)
