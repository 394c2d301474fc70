"""EXP3-family bandits over domains, and the reward machinery every bandit policy shares.

One *pull* of domain ``i`` in an update is its samples in that update (``count_i > 0``). A pull counts with
its *share* ``s_i = count_i / Σ_j count_j`` of the update's samples: with batch granularity (one domain per
update) the drawn domain has ``s_i = 1``, exactly the textbook bandit; with sample granularity (every batch
mixes domains) the shares sum to 1 over the domains drawn. Importance-weighted estimates use
``x̂_i = x_i · s_i / p_i`` (``p`` = the proportions the batches were drawn under), which is ``x_i / p_i`` for a
single pull and stays unbiased (``E[s_i] = p_i``) when an update mixes domains.

Rewards (``reward=``):

* ``"loss"``: the domain's mean training loss in the update (ODM's reward). Favours whatever is hardest,
  including data that cannot be learned.
* ``"progress"``: learning progress (Graves et al. 2017, "Automated Curriculum Learning for Neural
  Networks"). Per domain, an EMA of its mean loss over its pulls, ``ℓ̄_i ← β·ℓ̄_i + (1−β)·L_i``; the raw
  progress of a pull is the decrease of ``ℓ̄_i`` since the domain's previous pull, and the reward is an EMA
  of that decrease, ``g_i ← β_g·g_i + (1−β_g)·(ℓ̄_i^old − ℓ̄_i^new)`` (a domain's first pull gives no
  progress). NOTE: a single pull's decrease is far below one batch's noise; both smoothings are what keep a
  progress bandit from chasing noise.

Scaling into ``[0, 1]`` (EXP3 needs bounded rewards): a running scale ``M``, the exponentially decayed running
maximum of ``|raw reward|`` over pulled domains, ``M ← max(δ·M, max_i |raw_i|)`` (``δ`` = ``scale_decay``,
``δ = 1`` an all-time maximum). Loss rewards map to ``clip(L/M, 0, 1)``; progress rewards to
``(1 + clip(g/M, −1, 1)) / 2`` (no progress = 1/2).

Negative losses (log-likelihoods, rewards passed as losses) under ``reward="loss"``: clipping them to 0 would
give every domain the reward 0 and leave the policy uniform forever. Instead the losses are shifted by a
running offset ``m = min(δ·m, min_i L_i, 0)`` (0 while every loss is non-negative, so cross-entropy is
unaffected): the reward is ``clip((L − m)/M, 0, 1)`` with ``M`` the running scale of ``L − m``. The first
negative loss warns once per policy, since it usually means the sign convention is not the one intended.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, TypedDict, Unpack

import numpy as np

from odm._checks import check_choice as _check_choice
from odm._checks import check_float
from odm.policies.base import DomainStats, Policy, check_proportions

__all__ = [
    "EXP3",
    "EXP3S",
    "RewardOptions",
    "exp3_update",
    "exp3s_update",
    "importance_estimates",
    "loss_rewards",
    "scaled_rewards",
]

REWARDS = ("loss", "progress")


class _SmoothingOptions(TypedDict, total=False):
    """The reward arguments besides ``reward`` itself (for a bandit that declares its own default reward)."""

    loss_smoothing: float
    progress_smoothing: float
    scale_decay: float


class RewardOptions(_SmoothingOptions, total=False):
    """The reward arguments every bandit takes as keywords (see :class:`BanditPolicy`): declared once here."""

    reward: str


# Smallest proportion used as an importance-weight denominator (a domain drawn under p = 0 can only come from
# an override; it must not turn into a division by zero).
MIN_PROPORTION = 1e-12
# Denominator floor for per-domain means (a domain not drawn has count 0).
_TINY = 1e-300
# The ufuncs' reductions without ndarray.min/max's Python wrappers (the hot path runs a few per update).
_min, _max = np.minimum.reduce, np.maximum.reduce


# -- argument checks shared by the bandit modules -------------------------------------------------------------
def check_open_unit(name: str, value: Any) -> float:
    """``value`` as a float strictly inside ``(0, 1)`` (:func:`odm._checks.check_float`)."""
    return float(check_float(value, name, low=0, high=1, low_open=True, high_open=True))


def check_rate(name: str, value: Any, *, upper: float = math.inf) -> float:
    """``value`` as a finite float ``> 0`` and ``<= upper`` (:func:`odm._checks.check_float`)."""
    return float(check_float(value, name, low=0, low_open=True, high=None if upper == math.inf else upper))


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices`` (:func:`odm._checks.check_choice`)."""
    return _check_choice(value, name, choices)


# -- pure functions -------------------------------------------------------------------------------------------
def importance_estimates(values: np.ndarray, count: np.ndarray, proportions: np.ndarray) -> np.ndarray:
    """Importance-weighted estimates ``x̂_i = x_i·s_i/p_i`` for pulled domains (``s_i`` their sample share), 0
    for the others. ``values`` may hold NaN where ``count == 0``."""
    total = float(count.sum())
    if total > 0 and math.isfinite(float(values.sum())):
        # Hot path: finite values (0 where not pulled, as the rewards are): no masking needed.
        return values * count / (total * np.maximum(proportions, MIN_PROPORTION))
    share = count / total if total > 0 else np.zeros_like(count)
    pulled = count > 0
    with np.errstate(invalid="ignore"):
        est = values * share / np.maximum(proportions, MIN_PROPORTION)
    return np.where(pulled, est, 0.0)


def _estimates(rewards: np.ndarray, count: np.ndarray, total: float, proportions: np.ndarray) -> np.ndarray:
    """:func:`importance_estimates` for rewards known finite (0 where not pulled) and a checked ``total``."""
    return rewards * count / (total * np.maximum(proportions, MIN_PROPORTION))


def scaled_rewards(
    mean_loss: np.ndarray,
    pulled: np.ndarray,
    smoothed_loss: np.ndarray,
    progress: np.ndarray,
    scale: float,
    *,
    reward: str,
    loss_smoothing: float,
    progress_smoothing: float,
    scale_decay: float,
    offset: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """One update of the shared reward signal (see the module docstring for the formulas).

    Args:
        mean_loss: ``(K,)`` mean loss per domain (any value where not pulled).
        pulled: ``(K,)`` bool, domains drawn in this update.
        smoothed_loss: ``(K,)`` EMA of each domain's loss over its pulls; NaN before its first pull.
        progress: ``(K,)`` EMA of the per-pull decrease of ``smoothed_loss``.
        scale: running scale ``M`` (0 before any reward).
        offset: running offset ``m ≤ 0`` of loss rewards (0 until a negative loss is seen).

    Returns:
        ``(rewards, smoothed_loss, progress, scale, offset)``: rewards in ``[0, 1]`` (0 where not pulled) and the
        new state.
    """
    loss = np.where(pulled, mean_loss, 0.0)
    seen = ~np.isnan(smoothed_loss)
    again = pulled & seen
    first = pulled & ~seen
    blended = loss_smoothing * np.where(seen, smoothed_loss, 0.0) + (1.0 - loss_smoothing) * loss
    new_smoothed = np.where(again, blended, np.where(first, loss, smoothed_loss))
    new_offset = offset
    if reward == "loss":
        low = float(loss.min()) if pulled.any() else 0.0
        if low < 0 or offset < 0:
            new_offset = min(scale_decay * offset, low, 0.0)
        raw = np.where(pulled, loss - new_offset, 0.0)
        new_progress = progress
    else:
        decrease = np.where(again, smoothed_loss - new_smoothed, 0.0)
        new_progress = np.where(again, progress_smoothing * progress + (1.0 - progress_smoothing) * decrease, progress)
        raw = np.where(pulled, new_progress, 0.0)
    peak = float(np.abs(raw).max()) if pulled.any() else 0.0
    new_scale = max(scale_decay * scale, peak)
    ratio = raw / new_scale if new_scale > 0 else np.zeros_like(raw)
    if reward == "loss":
        rewards = np.clip(ratio, 0.0, 1.0)
    else:
        rewards = 0.5 * (1.0 + np.clip(ratio, -1.0, 1.0))
    return np.where(pulled, rewards, 0.0), new_smoothed, new_progress, new_scale, new_offset


def loss_rewards(
    loss_sum: np.ndarray, count: np.ndarray, scale: float, offset: float, scale_decay: float
) -> tuple[np.ndarray, float, float]:
    """The ``"loss"`` branch of :func:`scaled_rewards` in a few numpy calls (the hot path of every loss
    bandit): ``clip((L − m)/M, 0, 1)`` for pulled domains, 0 for the others.

    Returns:
        ``(rewards, scale, offset)``.
    """
    loss = loss_sum / np.maximum(count, _TINY)
    if np.count_nonzero(count) < count.shape[0]:  # a domain not drawn (count 0) gets 0, whatever its loss_sum
        np.copyto(loss, 0.0, where=count <= 0)
    low = float(_min(loss))
    if low < 0 or offset < 0:
        offset = min(scale_decay * offset, low, 0.0)
        loss = np.where(count > 0, loss - offset, 0.0)
    # Every entry is now >= 0, so the largest |raw| is the largest entry.
    scale = max(scale_decay * scale, float(_max(loss)))
    if scale <= 0:
        return np.zeros_like(loss), scale, offset
    return np.minimum(loss * (1.0 / scale), 1.0), scale, offset


def logsumexp(x: np.ndarray) -> float:
    """``ln Σ exp(x_i)``, shifted by the maximum (``np.logaddexp.reduce`` is exact too, but ~10x slower)."""
    top = float(x.max())
    if not math.isfinite(top):
        return top
    return top + math.log(float(np.exp(x - top).sum()))


def exp3_update(
    gains: np.ndarray, estimates: np.ndarray, gamma: float, eta: float, log_prior: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """EXP3 (Auer et al. 2002, "The Nonstochastic Multiarmed Bandit Problem").

    ``G_i ← G_i + x̂_i``;  ``p = (1−γ)·softmax(η·G + ln π) + γ/K``: the weights start at the prior ``π``
    (default uniform, the textbook rule) and grow multiplicatively.

    ``G`` is returned shifted so that ``max G = 0`` (softmax is shift-invariant), which keeps it bounded for
    millions of updates.

    Returns:
        ``(gains, proportions)``.
    """
    g = gains + estimates
    g -= _max(g)
    if log_prior is None:
        w = np.exp(eta * g)  # max(η·G) = 0 already: no second shift
    else:
        z = eta * g + log_prior
        w = np.exp(z - z.max())
    p = w * ((1.0 - gamma) / float(np.add.reduce(w)))
    p += gamma / g.shape[0]
    return g, p


def exp3s_update(
    log_weights: np.ndarray,
    estimates: np.ndarray,
    gamma: float,
    eta: float,
    alpha: float,
    log_prior: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """EXP3.S (Auer et al. 2002), weight sharing so the policy recovers when the best domain changes.

    ``w_i ← w_i·exp(η·x̂_i) + e·α·π_i·Σ_j w_j``;  ``p = (1−γ)·w/Σw + γ/K`` (Auer's ``η = γ/K``). The shared
    weight flows back to the prior ``π`` (default uniform, ``π_i = 1/K``: Auer's rule), where the weights start.

    Weights are kept in log space and normalised (``Σw = 1``) after every update; the rule is homogeneous in
    ``w``, so this changes nothing but the overflow.

    Returns:
        ``(log_weights, proportions)``.
    """
    k = log_weights.shape[0]
    share = math.log(math.e * alpha) + (-math.log(k) if log_prior is None else log_prior)
    lw = np.logaddexp(log_weights - logsumexp(log_weights) + eta * estimates, share)
    lw -= logsumexp(lw)
    p = (1.0 - gamma) * np.exp(lw) + gamma / k
    return lw, p


# -- the shared stateful part ---------------------------------------------------------------------------------
class BanditPolicy(Policy):
    """Base of the bandit policies: reward choice, its smoothing and scaling, and their state.

    Args:
        reward: ``"loss"`` or ``"progress"``.
        loss_smoothing: ``β``, EMA weight on the old smoothed loss (progress reward), in ``(0, 1)``.
        progress_smoothing: ``β_g``, EMA weight on the old progress, in ``(0, 1)``.
        scale_decay: ``δ`` of the running reward scale, in ``(0, 1]``.
    """

    def __init__(
        self,
        *,
        reward: str = "loss",
        loss_smoothing: float = 0.9,
        progress_smoothing: float = 0.9,
        scale_decay: float = 0.999,
    ) -> None:
        super().__init__()
        self.reward = check_choice("reward", reward, REWARDS)
        self.loss_smoothing = check_open_unit("loss_smoothing", loss_smoothing)
        self.progress_smoothing = check_open_unit("progress_smoothing", progress_smoothing)
        self.scale_decay = check_rate("scale_decay", scale_decay, upper=1.0)

    def _init_rewards(self, num_domains: int) -> None:
        # The loss reward never reads the smoothed loss (NaN = "not pulled yet" feeds the progress reward only):
        # zeros keep NaN out of its checkpoints, so equal states compare equal.
        self._smoothed_loss = np.full(num_domains, np.nan) if self.reward == "progress" else np.zeros(num_domains)
        self._progress = np.zeros(num_domains)
        self._scale = 0.0
        self._offset = 0.0
        self._warned_negative = False

    def _rewards(self, stats: DomainStats) -> np.ndarray:
        if self.reward == "loss":  # the smoothed loss only feeds the progress reward
            rewards, self._scale, self._offset = loss_rewards(
                stats.loss_sum, stats.count, self._scale, self._offset, self.scale_decay
            )
            if self._offset < 0 and not self._warned_negative:  # the offset turns negative with the first one
                self._warned_negative = True
                warnings.warn(
                    f"odm: {type(self).__name__} got a negative loss with reward='loss' (log-likelihoods?); losses "
                    "are shifted by their running minimum so that rewards stay informative. Pass losses where lower "
                    "is better and non-negative (e.g. cross-entropy), or use reward='progress'",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return rewards
        rewards, self._smoothed_loss, self._progress, self._scale, self._offset = scaled_rewards(
            stats.mean_loss,
            stats.observed,
            self._smoothed_loss,
            self._progress,
            self._scale,
            reward=self.reward,
            loss_smoothing=self.loss_smoothing,
            progress_smoothing=self.progress_smoothing,
            scale_decay=self.scale_decay,
            offset=self._offset,
        )
        return rewards

    def _reward_state(self) -> dict[str, Any]:
        return {
            "smoothed_loss": self._smoothed_loss.copy(),
            "progress": self._progress.copy(),
            "scale": self._scale,
            "offset": self._offset,
        }

    def _set_reward_state(self, state: dict[str, Any]) -> None:
        self._smoothed_loss = np.array(state["smoothed_loss"], dtype=np.float64)
        self._progress = np.array(state["progress"], dtype=np.float64)
        self._scale = float(state["scale"])
        self._offset = float(state.get("offset", 0.0))  # absent in states saved before negative-loss handling


class EXP3(BanditPolicy):
    """EXP3 over domains (Auer et al. 2002) with bounded loss or learning-progress rewards.

    ``G_i += r_i·s_i/p_i`` for pulled domains, ``p = (1−γ)·softmax(η·G) + γ/K`` (see :func:`exp3_update` and
    the module docstring for ``r``, ``s`` and the scaling). Every proportion stays ``≥ γ/K``.

    Args:
        gamma: exploration ``γ ∈ (0, 1]``.
        eta: learning rate ``η > 0``; default ``γ/K`` (Auer et al.).
        prior: initial weights ``π`` (e.g. the domains' natural sizes; normalised, every entry > 0); the
            policy starts at ``(1−γ)·π + γ/K`` and learns from there. Default uniform.
        reward, loss_smoothing, progress_smoothing, scale_decay: see :class:`BanditPolicy`.

    Example:
        >>> from odm.policies import DomainStats
        >>> policy = EXP3(gamma=0.2).bind(2)
        >>> policy.update(DomainStats.from_losses([3.0, float("nan")], [0.5, 0.5]))
        >>> policy.proportions.round(4)
        array([0.5399, 0.4601])
    """

    name = "exp3"
    simplex_update = True  # (1 − γ)·softmax + γ/K

    def __init__(
        self,
        gamma: float = 0.1,
        *,
        eta: float | None = None,
        prior: Sequence[float] | np.ndarray | None = None,
        **rewards: Unpack[RewardOptions],
    ) -> None:
        super().__init__(
            **rewards,
        )
        self.gamma = check_rate("gamma", gamma, upper=1.0)
        self.eta = None if eta is None else check_rate("eta", eta)
        self.prior = None if prior is None else check_proportions(prior, name="prior")
        if self.prior is not None and not np.all(self.prior > 0):
            raise ValueError(
                f"`prior` must be > 0 for every domain (multiplicative weights cannot grow from 0), got {prior!r}"
            )

    def _learning_rate(self) -> float:
        return self.gamma / self.num_domains if self.eta is None else self.eta

    def _check_prior(self, num_domains: int) -> None:
        if self.prior is not None and len(self.prior) != num_domains:
            raise ValueError(f"`prior` has {len(self.prior)} entries but the mixer has {num_domains} domains")
        self._log_prior = None if self.prior is None else np.log(self.prior)

    def _initial_proportions(self, num_domains: int) -> np.ndarray:
        if self.prior is None:
            return np.full(num_domains, 1.0 / num_domains)
        return (1.0 - self.gamma) * self.prior + self.gamma / num_domains

    def _init_state(self, num_domains: int) -> None:
        self._check_prior(num_domains)
        self._init_rewards(num_domains)
        self._gains = np.zeros(num_domains)
        self._p = self._initial_proportions(num_domains)

    def update(self, stats: DomainStats) -> None:
        total = self._usable(stats)
        if not total:
            return
        estimates = _estimates(self._rewards(stats), stats.count, total, stats.proportions)
        self._gains, self._p = exp3_update(self._gains, estimates, self.gamma, self._learning_rate(), self._log_prior)

    def _get_state(self) -> dict[str, Any]:
        return {"gains": self._gains.copy(), **self._reward_state()}

    def _set_state(self, state: dict[str, Any]) -> None:
        self._gains = np.array(state["gains"], dtype=np.float64)
        self._set_reward_state(state)


class EXP3S(EXP3):
    """EXP3.S over domains (Auer et al. 2002): EXP3 plus weight sharing, for a best domain that changes.

    ``w_i ← w_i·exp(η·r_i·s_i/p_i) + (e·α/K)·Σ_j w_j``, ``p = (1−γ)·w/Σw + γ/K`` (see :func:`exp3s_update`).

    Args:
        gamma: exploration ``γ ∈ (0, 1]``.
        alpha: weight sharing ``α ∈ (0, 1)`` (Auer et al. suggest ``1/T`` for ``T`` updates).
        eta: learning rate ``η > 0``; default ``γ/K`` (Auer et al.).
        prior: initial weights ``π``, to which the shared weight also flows back (normalised, every entry > 0);
            default uniform.
        reward, loss_smoothing, progress_smoothing, scale_decay: see :class:`BanditPolicy`. The default reward
            is ``"progress"`` — EXP3.S with learning progress is Graves et al.'s (2017) curriculum bandit, and a
            loss reward chases data that cannot be learned; with the corpus' natural sizes as ``prior`` it is the
            benchmark's recommended rule (``docs/policies.md``). ``reward="loss"`` is the classic bandit on
            ODM's reward.

    Example:
        >>> from odm.policies import DomainStats
        >>> policy = EXP3S(gamma=0.2, alpha=0.01, reward="loss").bind(2)
        >>> policy.update(DomainStats.from_losses([3.0, float("nan")], [0.5, 0.5]))
        >>> policy.proportions.round(4)
        array([0.5389, 0.4611])
    """

    name = "exp3s"
    simplex_update = True  # (1 − γ)·w/Σw + γ/K

    def __init__(
        self,
        gamma: float = 0.1,
        *,
        alpha: float = 1e-3,
        eta: float | None = None,
        prior: Sequence[float] | np.ndarray | None = None,
        reward: str = "progress",
        **rewards: Unpack[_SmoothingOptions],
    ) -> None:
        super().__init__(gamma, eta=eta, prior=prior, reward=reward, **rewards)
        self.alpha = check_open_unit("alpha", alpha)

    def _init_state(self, num_domains: int) -> None:
        self._check_prior(num_domains)
        self._init_rewards(num_domains)
        self._log_weights = np.full(num_domains, -math.log(num_domains)) if self.prior is None else np.log(self.prior)
        self._p = self._initial_proportions(num_domains)

    def update(self, stats: DomainStats) -> None:
        total = self._usable(stats)
        if not total:
            return
        estimates = _estimates(self._rewards(stats), stats.count, total, stats.proportions)
        self._log_weights, self._p = exp3s_update(
            self._log_weights, estimates, self.gamma, self._learning_rate(), self.alpha, self._log_prior
        )

    def _get_state(self) -> dict[str, Any]:
        return {"log_weights": self._log_weights.copy(), **self._reward_state()}

    def _set_state(self, state: dict[str, Any]) -> None:
        self._log_weights = np.array(state["log_weights"], dtype=np.float64)
        self._set_reward_state(state)
