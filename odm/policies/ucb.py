"""UCB-family bandits over domains: UCB1, discounted UCB and sliding-window UCB.

All three pick the domain with the largest upper confidence index and put ``1 − γ`` of the mass on it:

``u_i = r̄_i + c·sqrt(2·ln n / n_i)`` (``u_i = +∞`` for a domain never pulled),
``p = (1−γ)·onehot(argmax u) + γ/K``, ties broken at random by a generator keyed on ``(seed, step)`` (so every
rank breaks them the same way and a resume needs no generator state).

``n_i`` counts pulls weighted by their sample share (a whole batch of one domain is one pull, see
:mod:`odm.policies.bandits`), ``n = Σ_i n_i``, and ``r̄_i`` is the share-weighted mean of the domain's rewards
(loss or learning progress, scaled into ``[0, 1]`` as in :mod:`odm.policies.bandits`):

* :class:`UCB1` (Auer et al. 2002; FLAD, Albalak et al. 2023, smooths the reward with an EMA): all-time means
  or, with ``reward_smoothing=β``, ``r̄_i ← r̄_i + (1 − β^{s_i})·(r_i − r̄_i)`` per pull.
* :class:`DiscountedUCB` (Garivier & Moulines 2011, "On Upper-Confidence Bound Policies for Switching Bandit
  Problems"): counts and reward sums multiplied by ``γ_d`` every update.
* :class:`SlidingWindowUCB` (same paper): counts and reward sums over the last ``τ`` updates only.
"""

from __future__ import annotations

import math
from typing import Any, Unpack

import numpy as np

from odm._checks import check_int, check_seed
from odm.policies.bandits import BanditPolicy, RewardOptions, check_open_unit, check_rate
from odm.policies.base import DomainStats

__all__ = [
    "UCB1",
    "DiscountedUCB",
    "SlidingWindowUCB",
    "discounted_ucb_update",
    "sliding_window_update",
    "ucb1_update",
    "ucb_index",
    "ucb_proportions",
]

# Windowed counts below this are treated as zero (they are sums of added and subtracted shares).
_ZERO_COUNT = 1e-9
_TINY = 1e-300  # denominator floor: a pull count of 0 is handled apart


def ucb_index(means: np.ndarray, pulls: np.ndarray, c: float) -> np.ndarray:
    """``u_i = r̄_i + c·sqrt(2·ln n / n_i)`` with ``n = max(Σ n_i, 1)``; ``+∞`` where ``n_i = 0``."""
    scale = 2.0 * c * c * math.log(max(float(np.add.reduce(pulls)), 1.0))  # c·sqrt(x) = sqrt(c²·x)
    if np.count_nonzero(pulls) == pulls.shape[0]:  # every arm pulled (pulls are >= 0): the hot path
        return means + np.sqrt(scale / pulls)
    index = means + np.sqrt(scale / np.maximum(pulls, _TINY))
    index[pulls <= 0] = np.inf
    return index


def ucb_proportions(index: np.ndarray, gamma: float, *, seed: int, step: int) -> np.ndarray:
    """``(1−γ)·onehot(argmax u) + γ/K``; ties broken uniformly by a generator keyed on ``(seed, step)``."""
    k = index.shape[0]
    choice = int(index.argmax())
    ties = index == index[choice]
    if np.count_nonzero(ties) > 1:
        best = np.flatnonzero(ties)
        choice = int(best[np.random.default_rng((seed, step)).integers(best.size)])
    p = np.empty(k)
    p.fill(gamma / k)  # (np.full's Python wrapper costs more than the fill)
    p[choice] += 1.0 - gamma
    return p


def ucb1_update(
    means: np.ndarray,
    pulls: np.ndarray,
    rewards: np.ndarray,
    shares: np.ndarray,
    reward_smoothing: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """UCB1 statistics after one update: ``n_i += s_i``; ``r̄_i`` the share-weighted running mean of the
    rewards, or an EMA ``r̄_i ← r̄_i + (1 − β^{s_i})·(r_i − r̄_i)`` (the first pull sets ``r̄_i = r_i``).

    Returns:
        ``(means, pulls)``.
    """
    new_pulls = pulls + shares
    if reward_smoothing is None:
        weight = shares / np.maximum(new_pulls, _TINY)  # 0 where not pulled (shares 0, new_pulls >= shares)
    else:
        pulled = shares > 0
        weight = np.where(pulls > 0, 1.0 - np.power(reward_smoothing, shares), 1.0)
        weight = np.where(pulled, weight, 0.0)
    return means + weight * (rewards - means), new_pulls


def discounted_ucb_update(
    sums: np.ndarray, pulls: np.ndarray, rewards: np.ndarray, shares: np.ndarray, discount: float
) -> tuple[np.ndarray, np.ndarray]:
    """Discounted statistics: ``n_i ← γ_d·n_i + s_i``, ``S_i ← γ_d·S_i + s_i·r_i``; ``r̄_i = S_i/n_i``.

    Returns:
        ``(sums, pulls)``.
    """
    return discount * sums + shares * rewards, discount * pulls + shares


def sliding_window_update(
    window_pulls: np.ndarray,
    window_sums: np.ndarray,
    pulls: np.ndarray,
    sums: np.ndarray,
    position: int,
    rewards: np.ndarray,
    shares: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Windowed statistics: replaces the oldest of the last ``τ`` updates (row ``position`` of the ``(τ, K)``
    ring buffers, updated IN PLACE so an update stays O(K)) and returns the new totals ``(sums, pulls)``.

    Totals are recomputed exactly from the buffers when ``position`` is the last row, so rounding from the
    running add/subtract never accumulates over more than ``τ`` updates.
    """
    new_sums = sums - window_sums[position] + shares * rewards
    new_pulls = pulls - window_pulls[position] + shares
    window_sums[position] = shares * rewards
    window_pulls[position] = shares
    if position == window_pulls.shape[0] - 1:
        new_sums = window_sums.sum(axis=0)
        new_pulls = window_pulls.sum(axis=0)
    empty = new_pulls <= _ZERO_COUNT
    return np.where(empty, 0.0, new_sums), np.where(empty, 0.0, new_pulls)


def _shares(count: np.ndarray, total: float) -> np.ndarray:
    return count * (1.0 / total)


class _UCB(BanditPolicy):
    """Shared arguments, checks and proportions of the UCB policies."""

    simplex_update = True  # (1 − γ)·onehot + γ/K

    def __init__(
        self,
        c: float,
        *,
        gamma: float,
        seed: int,
        **rewards: Unpack[RewardOptions],
    ) -> None:
        super().__init__(
            **rewards,
        )
        self.c = check_rate("c", c)
        self.gamma = check_rate("gamma", gamma, upper=1.0)
        self.seed = check_seed(seed)

    def _init_state(self, num_domains: int) -> None:
        self._init_rewards(num_domains)
        self._means = np.zeros(num_domains)
        self._pulls = np.zeros(num_domains)
        self._p = np.full(num_domains, 1.0 / num_domains)

    def _statistics(self, rewards: np.ndarray, shares: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Returns ``(means, pulls)`` after this update and stores the policy's own state."""
        raise NotImplementedError

    def update(self, stats: DomainStats) -> None:
        total = self._usable(stats)
        if not total:
            return
        rewards = self._rewards(stats)
        self._means, self._pulls = self._statistics(rewards, _shares(stats.count, total))
        index = ucb_index(self._means, self._pulls, self.c)
        self._p = ucb_proportions(index, self.gamma, seed=self.seed, step=stats.step)

    def _get_state(self) -> dict[str, Any]:
        return {"means": self._means.copy(), "pulls": self._pulls.copy(), **self._reward_state()}

    def _set_state(self, state: dict[str, Any]) -> None:
        self._means = np.array(state["means"], dtype=np.float64)
        self._pulls = np.array(state["pulls"], dtype=np.float64)
        self._set_reward_state(state)


class UCB1(_UCB):
    """UCB1 (Auer et al. 2002) over domains, optionally with FLAD's EMA-smoothed reward.

    See the module docstring for the index and the proportions.

    Args:
        c: exploration constant ``c > 0`` of the confidence bonus.
        gamma: mass ``γ ∈ (0, 1]`` spread uniformly; every proportion stays ``≥ γ/K``. Default 0.5: with
            ``γ = 0.1`` each batch is 90 % one domain (evidence in ``docs/policies.md``).
        reward_smoothing: ``None`` for all-time mean rewards, or the EMA weight ``β ∈ (0, 1)`` on the old mean.
        seed: keys the tie-breaking generator (with the update's step).
        reward, loss_smoothing, progress_smoothing, scale_decay: see
            :class:`odm.policies.bandits.BanditPolicy`.

    Example:
        >>> from odm.policies import DomainStats
        >>> policy = UCB1(gamma=0.5).bind(2)
        >>> policy.update(DomainStats.from_losses([3.0, float("nan")], [0.5, 0.5]))
        >>> policy.proportions  # domain 1 was never pulled: infinite index
        array([0.25, 0.75])
    """

    name = "ucb1"

    def __init__(
        self,
        c: float = 1.0,
        *,
        gamma: float = 0.5,
        reward_smoothing: float | None = None,
        seed: int = 0,
        **rewards: Unpack[RewardOptions],
    ) -> None:
        super().__init__(
            c,
            gamma=gamma,
            seed=seed,
            **rewards,
        )
        self.reward_smoothing = (
            None if reward_smoothing is None else check_open_unit("reward_smoothing", reward_smoothing)
        )

    def _statistics(self, rewards: np.ndarray, shares: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return ucb1_update(self._means, self._pulls, rewards, shares, self.reward_smoothing)


class DiscountedUCB(_UCB):
    """Discounted UCB (Garivier & Moulines 2011): statistics discounted by ``γ_d`` per update.

    Args:
        c: exploration constant ``c > 0`` of the confidence bonus.
        discount: ``γ_d ∈ (0, 1)``; the memory is about ``1/(1−γ_d)`` updates.
        gamma: mass ``γ ∈ (0, 1]`` spread uniformly; every proportion stays ``≥ γ/K``. Default 0.5 (see
            :class:`UCB1`).
        seed: keys the tie-breaking generator (with the update's step).
        reward, loss_smoothing, progress_smoothing, scale_decay: see
            :class:`odm.policies.bandits.BanditPolicy`.

    Example:
        >>> from odm.policies import DomainStats
        >>> policy = DiscountedUCB(gamma=0.5).bind(2)
        >>> policy.update(DomainStats.from_losses([3.0, 1.0], [0.5, 0.5]))
        >>> policy.proportions
        array([0.75, 0.25])
    """

    name = "discounted_ucb"

    def __init__(
        self,
        c: float = 1.0,
        *,
        discount: float = 0.99,
        gamma: float = 0.5,
        seed: int = 0,
        **rewards: Unpack[RewardOptions],
    ) -> None:
        super().__init__(
            c,
            gamma=gamma,
            seed=seed,
            **rewards,
        )
        self.discount = check_open_unit("discount", discount)

    def _init_state(self, num_domains: int) -> None:
        super()._init_state(num_domains)
        self._sums = np.zeros(num_domains)

    def _statistics(self, rewards: np.ndarray, shares: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._sums, pulls = discounted_ucb_update(self._sums, self._pulls, rewards, shares, self.discount)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.where(pulls > 0, self._sums / pulls, 0.0)
        return means, pulls

    def _get_state(self) -> dict[str, Any]:
        return {**super()._get_state(), "sums": self._sums.copy()}

    def _set_state(self, state: dict[str, Any]) -> None:
        super()._set_state(state)
        self._sums = np.array(state["sums"], dtype=np.float64)


class SlidingWindowUCB(_UCB):
    """Sliding-window UCB (Garivier & Moulines 2011): statistics over the last ``τ`` updates only.

    Memory: two ``(τ, K)`` float64 ring buffers.

    Args:
        c: exploration constant ``c > 0`` of the confidence bonus.
        window: ``τ ≥ 1`` updates.
        gamma: mass ``γ ∈ (0, 1]`` spread uniformly; every proportion stays ``≥ γ/K``. Default 0.5 (see
            :class:`UCB1`).
        seed: keys the tie-breaking generator (with the update's step).
        reward, loss_smoothing, progress_smoothing, scale_decay: see
            :class:`odm.policies.bandits.BanditPolicy`.

    Example:
        >>> from odm.policies import DomainStats
        >>> policy = SlidingWindowUCB(window=1, gamma=0.5).bind(2)
        >>> policy.update(DomainStats.from_losses([3.0, 1.0], [0.5, 0.5]))
        >>> policy.proportions
        array([0.75, 0.25])
    """

    name = "sliding_window_ucb"

    def __init__(
        self,
        c: float = 1.0,
        *,
        window: int = 200,
        gamma: float = 0.5,
        seed: int = 0,
        **rewards: Unpack[RewardOptions],
    ) -> None:
        super().__init__(
            c,
            gamma=gamma,
            seed=seed,
            **rewards,
        )
        self.window = check_int(window, "window", low=1)

    def _init_state(self, num_domains: int) -> None:
        super()._init_state(num_domains)
        self._sums = np.zeros(num_domains)
        self._window_sums = np.zeros((self.window, num_domains))
        self._window_pulls = np.zeros((self.window, num_domains))
        self._position = 0

    def _statistics(self, rewards: np.ndarray, shares: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._sums, pulls = sliding_window_update(
            self._window_pulls, self._window_sums, self._pulls, self._sums, self._position, rewards, shares
        )
        self._position = (self._position + 1) % self.window
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.where(pulls > 0, self._sums / pulls, 0.0)
        return means, pulls

    def _get_state(self) -> dict[str, Any]:
        return {
            **super()._get_state(),
            "sums": self._sums.copy(),
            "window_sums": self._window_sums.copy(),
            "window_pulls": self._window_pulls.copy(),
            "position": self._position,
        }

    def _check_state(self, state: dict[str, Any]) -> None:
        saved = np.shape(state["window_sums"])[0]
        if saved != self.window:
            raise ValueError(f"SlidingWindowUCB state_dict has window {saved}, this policy has {self.window}")

    def _set_state(self, state: dict[str, Any]) -> None:
        super()._set_state(state)
        self._sums = np.array(state["sums"], dtype=np.float64)
        self._window_sums = np.array(state["window_sums"], dtype=np.float64)
        self._window_pulls = np.array(state["window_pulls"], dtype=np.float64)
        self._position = int(state["position"])
