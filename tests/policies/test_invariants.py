"""Invariants every bandit/ODM policy satisfies (docs/algorithms.md, "Invariants"), over many seeds."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from odm.policies import (
    EXP3,
    EXP3S,
    ODM,
    UCB1,
    DiscountedUCB,
    DomainStats,
    EntropyPrior,
    Policy,
    Scheduled,
    SlidingWindowUCB,
    Uniform,
)
from odm.policies.bandits import exp3_update, exp3s_update, importance_estimates, scaled_rewards
from odm.policies.odm_exp3 import exploration_rate, odm_paper_update, odm_released_update
from odm.policies.ucb import (
    discounted_ucb_update,
    sliding_window_update,
    ucb1_update,
    ucb_index,
    ucb_proportions,
)


def odm_floor(policy: ODM, step: int) -> float:
    return 0.0 if step <= policy.warmup_steps else exploration_rate(step + 1, policy.num_domains)


def gamma_floor(policy: Policy, step: int) -> float:
    return policy.gamma / policy.num_domains  # type: ignore[attr-defined]


POLICIES: dict[str, tuple[Callable[[], Policy], Callable[[Policy, int], float]]] = {
    "odm-paper": (lambda: ODM("paper"), odm_floor),
    "odm-paper-warmup": (lambda: ODM("paper", alpha=0.5, warmup_steps=7), odm_floor),
    "odm-released": (lambda: ODM("released"), odm_floor),
    "exp3-loss": (lambda: EXP3(), gamma_floor),
    "exp3-progress": (lambda: EXP3(0.3, eta=0.5, reward="progress"), gamma_floor),
    "exp3s-loss": (lambda: EXP3S(alpha=0.01, reward="loss"), gamma_floor),
    "exp3s-progress": (lambda: EXP3S(reward="progress", scale_decay=1.0), gamma_floor),
    "ucb1": (lambda: UCB1(), gamma_floor),
    "ucb1-ema-progress": (lambda: UCB1(0.5, reward_smoothing=0.8, reward="progress"), gamma_floor),
    "discounted-ucb": (lambda: DiscountedUCB(discount=0.9), gamma_floor),
    "sliding-window-ucb": (lambda: SlidingWindowUCB(window=7, reward="progress"), gamma_floor),
}


def draw(seed: int, k: int, p: np.ndarray, step: int) -> DomainStats:
    """Random statistics keyed by (seed, step): batch or sample granularity, ordinary and extreme losses."""
    rng = np.random.default_rng((seed, step))
    if rng.random() < 0.5:
        count = np.zeros(k)
        count[rng.choice(k, p=p)] = rng.integers(1, 5)
    else:
        count = rng.multinomial(int(rng.integers(1, 64)), p).astype(np.float64)
        if count.sum() == 0:
            count[0] = 1.0
    scale = rng.choice([1e-3, 1.0, 10.0, 1e4])
    loss = rng.uniform(0, scale, k)
    drawn_under = 0.5 * p + 0.5 * rng.dirichlet(np.ones(k))  # as if averaged over several published rows
    return DomainStats(loss_sum=count * loss, count=count, proportions=drawn_under, step=step)


class Driver:
    """A policy plus its update counter, resumable through one state dict."""

    def __init__(self, policy: Policy, seed: int, k: int) -> None:
        self.policy, self.seed, self.k, self.step = policy.bind(k), seed, k, 0

    def advance(self, n: int) -> list[list[float]]:
        out = []
        for _ in range(n):
            self.step += 1
            self.policy.update(draw(self.seed, self.k, self.policy.proportions, self.step))
            out.append(self.policy.proportions.tolist())
        return out

    def state_dict(self) -> dict:
        return {"policy": self.policy.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        self.step = state["step"]


@pytest.mark.parametrize("k", [1, 2, 7, 40])
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_proportions_stay_finite_on_the_simplex_and_above_the_floor(name: str, seed: int, k: int) -> None:
    make, floor = POLICIES[name]
    policy = make().bind(k)
    for t in range(1, 251):
        policy.update(draw(seed, k, policy.proportions, t))
        p = policy.proportions
        assert np.all(np.isfinite(p)) and abs(p.sum() - 1.0) < 1e-12, (t, p)
        assert np.all(p >= floor(policy, t) - 1e-15), (t, p)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_identical_inputs_give_identical_proportions(name: str, seed: int) -> None:
    make, _ = POLICIES[name]
    assert Driver(make(), seed, 6).advance(150) == Driver(make(), seed, 6).advance(150)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_a_state_dict_round_trip_continues_the_same_trajectory(
    name: str, seed: int, assert_resumes_identically
) -> None:
    make, _ = POLICIES[name]
    assert_resumes_identically(lambda: Driver(make(), seed, 5), lambda d, n: d.advance(n), before=37, after=40)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_a_non_finite_loss_is_skipped_with_a_warning_and_leaves_the_state_unchanged(name: str) -> None:
    make, _ = POLICIES[name]
    driver = Driver(make(), 0, 4)
    driver.advance(20)
    before = driver.policy.state_dict()
    p = driver.policy.proportions
    for bad in (np.nan, np.inf):
        stats = DomainStats(np.array([1.0, bad, 2.0, 0.0]), np.array([1.0, 2.0, 1.0, 0.0]), p, step=21)
        with pytest.warns(RuntimeWarning, match="non-finite loss for domain"):
            driver.policy.update(stats)
        np.testing.assert_equal(driver.policy.state_dict(), before)  # NaN entries (never-pulled) compare equal


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_statistics_of_the_wrong_shape_are_refused(name: str) -> None:
    make, _ = POLICIES[name]
    policy = make().bind(3)
    stats = DomainStats.from_losses([1.0, 2.0], [0.5, 0.5], step=10)
    with pytest.raises(ValueError, match=r"must have shape \(3,\)"):
        policy.update(stats)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_a_state_dict_from_another_policy_or_another_number_of_domains_is_refused(name: str) -> None:
    make, _ = POLICIES[name]
    state = make().bind(4).state_dict()
    with pytest.raises(ValueError, match="state_dict is for 4 domains, but this policy has 5"):
        make().bind(5).load_state_dict(state)
    other = Uniform() if not isinstance(make(), EXP3) else UCB1()
    with pytest.raises(ValueError, match="state_dict is for policy"):
        other.bind(4).load_state_dict(state)
    with pytest.raises(ValueError, match="state_dict is for policy"):
        make().load_state_dict(Uniform().bind(4).state_dict())


def test_exp3s_is_not_confused_with_its_parent_class() -> None:
    with pytest.raises(ValueError, match="state_dict is for policy 'EXP3'"):
        EXP3S().load_state_dict(EXP3().bind(3).state_dict())


def test_static_priors_keep_their_proportions() -> None:
    for policy in (EntropyPrior(entropies=[1.0, 2.0, 3.0]), Scheduled([(0, [0.2, 0.3, 0.5])])):
        before = policy.proportions
        policy.update(draw(0, 3, before, 1))
        np.testing.assert_array_equal(policy.proportions, before)


# -- a million updates ----------------------------------------------------------------------------------------
def million_update_loop(family: str, n: int, k: int = 3, start: int = 1) -> None:
    """Drives one family's pure functions ``n`` times with adversarial inputs (huge, tiny and zero losses,
    proportions at the floor) and checks the proportions stay finite and on the simplex."""
    rng = np.random.default_rng(0)
    chunk = 10_000
    state = np.zeros(k) if family != "odm-released" else np.full(k, -np.inf)
    state = np.full(k, -math.log(k)) if family == "exp3s" else state
    pulls, sums, means = np.zeros(k), np.zeros(k), np.zeros(k)
    window_pulls, window_sums = np.zeros((50, k)), np.zeros((50, k))
    smoothed, progress, scale = np.full(k, np.nan), np.zeros(k), 0.0
    p = np.full(k, 1.0 / k)
    for base in range(0, n, chunk):
        domains = rng.integers(0, k, chunk)
        losses = rng.choice([0.0, 1e-6, 3.0, 50.0, 1e4], size=chunk)
        for j in range(chunk):
            t = start + base + j
            count = np.zeros(k)
            count[domains[j]] = 1.0
            loss_sum = count * losses[j]
            if family == "odm-paper":
                state, p = odm_paper_update(state, loss_sum, count, p, t, 0.9)
            elif family == "odm-released":
                state, p = odm_released_update(state, loss_sum, count, t, 0.5)
            else:
                r, smoothed, progress, scale, _ = scaled_rewards(
                    loss_sum, count > 0, smoothed, progress, scale,
                    reward="progress" if j % 2 else "loss", loss_smoothing=0.9, progress_smoothing=0.9,
                    scale_decay=0.999,
                )  # fmt: skip
                if family == "exp3":
                    state, p = exp3_update(state, importance_estimates(r, count, p), 0.01, 1.0)
                elif family == "exp3s":
                    state, p = exp3s_update(state, importance_estimates(r, count, p), 0.01, 1.0, 1e-6)
                else:
                    if family == "ucb1":
                        means, pulls = ucb1_update(means, pulls, r, count, None)
                    elif family == "discounted-ucb":
                        sums, pulls = discounted_ucb_update(sums, pulls, r, count, 0.5)
                        means = np.where(pulls > 0, sums / np.maximum(pulls, 1e-300), 0.0)
                    else:
                        sums, pulls = sliding_window_update(window_pulls, window_sums, pulls, sums, t % 50, r, count)
                        means = np.where(pulls > 0, sums / np.maximum(pulls, 1e-300), 0.0)
                    p = ucb_proportions(ucb_index(means, pulls, 1.0), 0.1, seed=0, step=t)
        assert np.all(np.isfinite(p)) and abs(p.sum() - 1.0) < 1e-12 and np.all(p >= 0), (family, t, p)
        assert not np.any(np.isnan(state)), (family, t)


FAMILIES = ["odm-paper", "odm-released", "exp3", "exp3s", "ucb1", "discounted-ucb", "sliding-window-ucb"]


@pytest.mark.parametrize("family", FAMILIES)
def test_updates_late_in_a_million_update_run_neither_overflow_nor_leave_the_simplex(family: str) -> None:
    """Fast version: 10^4 adversarial updates starting at step 10^6 (ODM's rates depend on the step)."""
    million_update_loop(family, 10_000, start=1_000_000)


def lean_loop(family: str, n: int, k: int = 3) -> None:
    """``n`` sequential updates of the state that accumulates over a run (ODM's estimates and step-dependent
    rates, EXP3's gains, EXP3.S's weights), fed adversarially: one domain per update, rewards at the extremes,
    importance weights at the largest the floor allows."""
    rng = np.random.default_rng(1)
    eye = np.eye(k)
    state = {"odm-paper": np.zeros(k), "odm-released": np.full(k, -np.inf), "exp3": np.zeros(k)}.get(
        family, np.full(k, -math.log(k))
    )
    p = np.full(k, 1.0 / k)
    chunk = 100_000
    for base in range(0, n, chunk):
        domains = rng.integers(0, k, chunk)
        values = rng.choice([0.0, 1e-6, 1.0, 50.0, 1e4], size=chunk)
        for j in range(chunk):
            t = base + j + 1
            count = eye[domains[j]]
            if family == "odm-paper":
                state, p = odm_paper_update(state, count * values[j], count, p, t, 0.9)
            elif family == "odm-released":
                state, p = odm_released_update(state, count * values[j], count, t, 0.5)
            elif family == "exp3":
                state, p = exp3_update(state, count * (min(values[j], 1.0) / p), 0.01, 1.0)
            else:
                state, p = exp3s_update(state, count * (min(values[j], 1.0) / p), 0.01, 1.0, 1e-6)
        assert np.all(np.isfinite(p)) and abs(p.sum() - 1.0) < 1e-12 and np.all(p >= 0), (family, t, p)
        assert not np.any(np.isnan(state)) and not np.any(np.isposinf(state)), (family, t)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["odm-paper", "odm-released", "exp3", "exp3s"])
def test_a_million_updates_neither_overflow_nor_leave_the_simplex(family: str) -> None:
    """The UCB statistics are counts and averages (bounded or growing by at most 1 per update); they get the
    fast late-run test above only."""
    lean_loop(family, 1_000_000)
