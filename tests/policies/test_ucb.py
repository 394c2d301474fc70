"""UCB1, discounted UCB and sliding-window UCB against slow per-domain reference loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
from draws import draw_stats

from odm.policies import UCB1, DiscountedUCB, DomainStats, SlidingWindowUCB, get_policy
from odm.policies.ucb import ucb_proportions


class ReferenceLossReward:
    """Loss reward scaled by a decayed running maximum (odm.policies.bandits), per domain."""

    def __init__(self, decay: float = 0.999) -> None:
        self.decay, self.scale = decay, 0.0

    def __call__(self, stats: DomainStats) -> list[float]:
        k = len(stats.count)
        means = {i: stats.loss_sum[i] / stats.count[i] for i in range(k) if stats.count[i] > 0}
        self.scale = max(self.decay * self.scale, max(abs(v) for v in means.values()))
        return [min(max(means[i] / self.scale, 0.0), 1.0) if i in means else 0.0 for i in range(k)]


class ReferenceUCB:
    """UCB1 / discounted / sliding-window statistics and index, one domain at a time."""

    def __init__(self, k: int, c: float, kind: str, param: float | int | None) -> None:
        self.k, self.c, self.kind, self.param = k, c, kind, param
        self.pulls, self.means, self.sums = [0.0] * k, [0.0] * k, [0.0] * k
        self.history: list[tuple[list[float], list[float]]] = []
        self.rewards = ReferenceLossReward()

    def index(self, stats: DomainStats) -> list[float]:
        k = self.k
        r = self.rewards(stats)
        total = sum(stats.count)
        s = [c / total for c in stats.count]
        if self.kind == "ucb1":
            for i in range(k):
                if s[i] == 0:
                    continue
                if self.param is None:
                    self.pulls[i] += s[i]
                    self.means[i] += s[i] * (r[i] - self.means[i]) / self.pulls[i]
                else:
                    weight = 1.0 if self.pulls[i] == 0 else 1.0 - self.param ** s[i]
                    self.pulls[i] += s[i]
                    self.means[i] += weight * (r[i] - self.means[i])
        elif self.kind == "discounted":
            for i in range(k):
                self.pulls[i] = self.param * self.pulls[i] + s[i]
                self.sums[i] = self.param * self.sums[i] + s[i] * r[i]
                self.means[i] = self.sums[i] / self.pulls[i] if self.pulls[i] > 0 else 0.0
        else:
            self.history = [*self.history, (s, r)][-self.param :]
            for i in range(k):
                self.pulls[i] = sum(h[0][i] for h in self.history)
                self.sums[i] = sum(h[0][i] * h[1][i] for h in self.history)
                self.means[i] = self.sums[i] / self.pulls[i] if self.pulls[i] > 0 else 0.0
        n = max(sum(self.pulls), 1.0)
        return [
            self.means[i] + self.c * math.sqrt(2 * math.log(n) / self.pulls[i]) if self.pulls[i] > 0 else math.inf
            for i in range(k)
        ]


def check_against_reference(policy, reference: ReferenceUCB, seed: int, granularity: str, steps: int = 300) -> None:
    rng = np.random.default_rng(seed)
    k, gamma = reference.k, policy.gamma
    for t in range(1, steps + 1):
        stats = draw_stats(rng, policy.proportions, t, granularity)
        policy.update(stats)
        u = reference.index(stats)
        best = max(u)
        near = [i for i in range(k) if u[i] == best or (best < math.inf and u[i] >= best - 1e-9)]
        chosen = int(np.argmax(policy.proportions))
        assert chosen in near, f"step {t}: chose {chosen}, reference index {u}"
        if len(near) == 1 or all(u[i] == math.inf for i in near):
            ties = near if len(near) == 1 else [i for i in range(k) if u[i] == math.inf]
            pick = ties[0] if len(ties) == 1 else ties[np.random.default_rng((policy.seed, t)).integers(len(ties))]
            expected = [gamma / k] * k
            expected[pick] += 1 - gamma
            np.testing.assert_allclose(policy.proportions, expected, rtol=0, atol=1e-15)


SEEDS = [(seed, granularity) for seed in range(10) for granularity in ("batch", "sample")]


@pytest.mark.parametrize(("seed", "granularity"), SEEDS)
def test_ucb1_matches_the_reference_loop(seed: int, granularity: str) -> None:
    rng = np.random.default_rng(seed + 1000)
    k, c, gamma = int(rng.integers(2, 10)), float(rng.uniform(0.1, 2)), float(rng.uniform(0.05, 0.5))
    smoothing = None if seed % 2 else float(rng.uniform(0.5, 0.95))
    policy = UCB1(c, gamma=gamma, reward_smoothing=smoothing, seed=seed).bind(k)
    check_against_reference(policy, ReferenceUCB(k, c, "ucb1", smoothing), seed, granularity)


@pytest.mark.parametrize(("seed", "granularity"), SEEDS)
def test_discounted_ucb_matches_the_reference_loop(seed: int, granularity: str) -> None:
    rng = np.random.default_rng(seed + 2000)
    k, c, discount = int(rng.integers(2, 10)), float(rng.uniform(0.1, 2)), float(rng.uniform(0.8, 0.999))
    policy = DiscountedUCB(c, discount=discount, gamma=0.2, seed=seed).bind(k)
    check_against_reference(policy, ReferenceUCB(k, c, "discounted", discount), seed, granularity)


@pytest.mark.parametrize(("seed", "granularity"), SEEDS)
def test_sliding_window_ucb_matches_the_reference_loop(seed: int, granularity: str) -> None:
    rng = np.random.default_rng(seed + 3000)
    k, c, window = int(rng.integers(2, 10)), float(rng.uniform(0.1, 2)), int(rng.integers(1, 60))
    policy = SlidingWindowUCB(c, window=window, gamma=0.3, seed=seed).bind(k)
    check_against_reference(policy, ReferenceUCB(k, c, "window", window), seed, granularity)


def test_sliding_window_ucb_forgets_a_domain_not_pulled_for_a_whole_window() -> None:
    policy = SlidingWindowUCB(window=5, gamma=0.5).bind(3)
    for t in range(1, 20):
        count = np.array([1.0, 1.0, 0.0]) if t == 1 else np.array([1.0, 0.0, 0.0])
        policy.update(DomainStats(loss_sum=count * 2.0, count=count, proportions=np.full(3, 1 / 3), step=t))
        if t >= 6:
            assert policy._pulls[1] == 0.0  # domain 1 left the window: +inf index again
    assert policy._pulls[0] == pytest.approx(5.0)


def test_ties_are_broken_at_random_but_identically_for_the_same_seed_and_step() -> None:
    index = np.full(8, np.inf)
    picks = [int(np.argmax(ucb_proportions(index, 0.1, seed=0, step=t))) for t in range(200)]
    again = [int(np.argmax(ucb_proportions(index, 0.1, seed=0, step=t))) for t in range(200)]
    other = [int(np.argmax(ucb_proportions(index, 0.1, seed=1, step=t))) for t in range(200)]
    assert picks == again and picks != other
    assert set(picks) == set(range(8))


def test_an_arm_never_pulled_is_chosen_before_any_pulled_arm() -> None:
    policy = UCB1(gamma=0.1).bind(4)
    chosen = set()
    for t in range(1, 5):
        p = policy.proportions
        d = int(np.argmax(p)) if t > 1 else 0
        count = np.zeros(4)
        count[d] = 1.0
        policy.update(DomainStats(loss_sum=count * 3.0, count=count, proportions=p, step=t))
        chosen.add(d)
    assert chosen == {0, 1, 2, 3}


def test_defaults_and_registry() -> None:
    for name, cls in [("ucb1", UCB1), ("discounted_ucb", DiscountedUCB), ("sliding_window_ucb", SlidingWindowUCB)]:
        policy = get_policy(name)
        assert isinstance(policy, cls) and policy.c == 1.0 and policy.gamma == 0.5
        assert np.all(policy.bind(22).proportions == 1 / 22)


@pytest.mark.parametrize("cls", [UCB1, DiscountedUCB, SlidingWindowUCB])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"c": 0.0}, "`c` must be a finite number > 0"),
        ({"c": float("nan")}, "`c`"),
        ({"gamma": 0.0}, "`gamma` must be a finite number > 0 and <= 1"),
        ({"gamma": 2.0}, "`gamma`"),
        ({"seed": -1}, "`seed` must be an integer >= 0"),
        ({"reward": "regret"}, "`reward` must be one of"),
    ],
)
def test_bad_arguments_raise_a_clear_error(cls: type, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (UCB1, {"reward_smoothing": 1.0}, "`reward_smoothing` must be a finite number > 0 and < 1"),
        (DiscountedUCB, {"discount": 1.0}, "`discount` must be a finite number > 0 and < 1"),
        (SlidingWindowUCB, {"window": 0}, "`window` must be an integer >= 1"),
    ],
)
def test_bad_policy_specific_arguments_raise_a_clear_error(cls: type, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_a_sliding_window_state_dict_with_another_window_is_refused() -> None:
    with pytest.raises(ValueError, match="window 5"):
        SlidingWindowUCB(window=6).load_state_dict(SlidingWindowUCB(window=5).bind(3).state_dict())
