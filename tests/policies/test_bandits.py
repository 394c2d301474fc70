"""EXP3, EXP3.S and the shared reward machinery against slow per-domain reference loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
from draws import draw_stats

from odm.policies import EXP3, EXP3S, ODM, UCB1, DiscountedUCB, DomainStats, Policy, SlidingWindowUCB, get_policy
from odm.policies.bandits import scaled_rewards


class ReferenceRewards:
    """The reward signal of odm.policies.bandits, one domain at a time."""

    def __init__(self, k: int, reward: str, beta: float, beta_g: float, decay: float) -> None:
        self.k, self.reward, self.beta, self.beta_g, self.decay = k, reward, beta, beta_g, decay
        self.smoothed: list[float | None] = [None] * k
        self.progress = [0.0] * k
        self.scale = 0.0
        self.offset = 0.0  # loss rewards: shift by the running minimum once a loss is negative

    def __call__(self, stats: DomainStats) -> list[float]:
        raw = {}
        for i in range(self.k):
            if stats.count[i] == 0:
                continue
            loss = stats.loss_sum[i] / stats.count[i]
            old = self.smoothed[i]
            if old is None:
                self.smoothed[i] = loss
            else:
                new = self.beta * old + (1 - self.beta) * loss
                self.smoothed[i] = new
                self.progress[i] = self.beta_g * self.progress[i] + (1 - self.beta_g) * (old - new)
            raw[i] = loss if self.reward == "loss" else self.progress[i]
        if self.reward == "loss":
            low = min(min(raw.values()), 0.0)
            if low < 0 or self.offset < 0:
                self.offset = min(self.decay * self.offset, low)
            raw = {i: v - self.offset for i, v in raw.items()}
        self.scale = max(self.decay * self.scale, max(abs(v) for v in raw.values()))
        rewards = [0.0] * self.k
        for i, v in raw.items():
            if self.reward == "loss":
                rewards[i] = min(max(v / self.scale, 0.0), 1.0) if self.scale > 0 else 0.0
            else:
                rewards[i] = 0.5 * (1 + min(max(v / self.scale, -1.0), 1.0)) if self.scale > 0 else 0.5
        return rewards


def shares(stats: DomainStats) -> list[float]:
    total = sum(stats.count)
    return [c / total for c in stats.count]


class ReferenceEXP3:
    def __init__(self, k: int, gamma: float, eta: float, rewards: ReferenceRewards, prior=None) -> None:
        self.k, self.gamma, self.eta, self.rewards = k, gamma, eta, rewards
        self.gains = [0.0] * k
        self.prior = [1.0] * k if prior is None else list(prior)

    def update(self, stats: DomainStats) -> list[float]:
        r, s = self.rewards(stats), shares(stats)
        for i in range(self.k):
            if stats.count[i] > 0:
                self.gains[i] += r[i] * s[i] / stats.proportions[i]
        top = max(self.gains)
        w = [pi * math.exp(self.eta * (g - top)) for pi, g in zip(self.prior, self.gains)]
        return [(1 - self.gamma) * wi / sum(w) + self.gamma / self.k for wi in w]


class ReferenceEXP3S:
    """Auer et al.'s Exp3.S with unnormalised weights (fine for a few hundred updates)."""

    def __init__(self, k: int, gamma: float, eta: float, alpha: float, rewards: ReferenceRewards, prior=None) -> None:
        self.k, self.gamma, self.eta, self.alpha, self.rewards = k, gamma, eta, alpha, rewards
        self.w = [1.0] * k if prior is None else [x / sum(prior) for x in prior]
        self.share = [1.0 / k] * k if prior is None else [x / sum(prior) for x in prior]

    def update(self, stats: DomainStats) -> list[float]:
        r, s = self.rewards(stats), shares(stats)
        total = sum(self.w)
        for i in range(self.k):
            x = r[i] * s[i] / stats.proportions[i] if stats.count[i] > 0 else 0.0
            self.w[i] = self.w[i] * math.exp(self.eta * x) + math.e * self.alpha * self.share[i] * total
        total = sum(self.w)
        return [(1 - self.gamma) * wi / total + self.gamma / self.k for wi in self.w]


CASES = [
    (seed, granularity, reward)
    for seed in range(8)
    for granularity in ("batch", "sample")
    for reward in ("loss", "progress")
]


@pytest.mark.parametrize(("seed", "granularity", "reward"), CASES)
def test_exp3_matches_the_reference_loop(seed: int, granularity: str, reward: str) -> None:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 10))
    gamma, beta, beta_g, decay = rng.uniform(0.05, 0.5), rng.uniform(0.5, 0.95), rng.uniform(0.5, 0.95), 0.99
    eta = None if seed % 2 else float(rng.uniform(0.05, 1.0))
    policy = EXP3(gamma, eta=eta, reward=reward, loss_smoothing=beta, progress_smoothing=beta_g, scale_decay=decay)
    policy.bind(k)
    reference = ReferenceEXP3(
        k, gamma, gamma / k if eta is None else eta, ReferenceRewards(k, reward, beta, beta_g, decay)
    )
    for t in range(1, 301):
        stats = draw_stats(rng, policy.proportions, t, granularity)
        policy.update(stats)
        np.testing.assert_allclose(policy.proportions, reference.update(stats), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize(("seed", "granularity", "reward"), CASES)
def test_exp3s_matches_the_reference_loop(seed: int, granularity: str, reward: str) -> None:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 10))
    gamma, alpha = rng.uniform(0.05, 0.5), rng.uniform(1e-4, 0.2)
    policy = EXP3S(gamma, alpha=alpha, reward=reward).bind(k)
    reference = ReferenceEXP3S(k, gamma, gamma / k, alpha, ReferenceRewards(k, reward, 0.9, 0.9, 0.999))
    for t in range(1, 301):
        stats = draw_stats(rng, policy.proportions, t, granularity)
        policy.update(stats)
        np.testing.assert_allclose(policy.proportions, reference.update(stats), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("cls", [EXP3, EXP3S])
def test_a_prior_sets_the_starting_weights_and_matches_the_reference_loop(seed: int, cls: type) -> None:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 10))
    gamma, alpha = rng.uniform(0.05, 0.5), rng.uniform(1e-4, 0.2)
    prior = rng.uniform(0.05, 5.0, k)  # unnormalised, like domain sizes
    rewards = ReferenceRewards(k, "progress" if seed % 2 else "loss", 0.9, 0.9, 0.999)
    if cls is EXP3:
        policy = EXP3(gamma, prior=prior, reward=rewards.reward).bind(k)
        reference = ReferenceEXP3(k, gamma, gamma / k, rewards, prior=prior)
    else:
        policy = EXP3S(gamma, alpha=alpha, prior=prior, reward=rewards.reward).bind(k)
        reference = ReferenceEXP3S(k, gamma, gamma / k, alpha, rewards, prior=prior)
    np.testing.assert_allclose(policy.proportions, (1 - gamma) * prior / prior.sum() + gamma / k, rtol=1e-12)
    for t in range(1, 201):
        stats = draw_stats(rng, policy.proportions, t, "sample")
        policy.update(stats)
        np.testing.assert_allclose(policy.proportions, reference.update(stats), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("cls", [EXP3, EXP3S])
def test_a_prior_must_be_positive_and_match_the_domains(cls: type) -> None:
    with pytest.raises(ValueError, match=r"`prior` must be > 0 for every domain"):
        cls(prior=[0.5, 0.0, 0.5])
    with pytest.raises(ValueError, match="`prior` must be non-negative"):
        cls(prior=[0.5, -1.0])
    with pytest.raises(ValueError, match="`prior` has 3 entries but the mixer has 4 domains"):
        cls(prior=[1, 2, 3]).bind(4)


@pytest.mark.parametrize("reward", ["loss", "progress"])
def test_rewards_lie_in_the_unit_interval_and_are_zero_for_domains_not_pulled(reward: str) -> None:
    rng = np.random.default_rng(3)
    k = 50
    smoothed, progress, scale, offset = np.full(k, np.nan), np.zeros(k), 0.0, 0.0
    for _ in range(500):
        pulled = rng.random(k) < 0.3
        loss = np.where(pulled, rng.standard_cauchy(k) * 10, np.nan)
        r, smoothed, progress, scale, offset = scaled_rewards(
            loss, pulled, smoothed, progress, scale,
            reward=reward, loss_smoothing=0.9, progress_smoothing=0.9, scale_decay=0.99, offset=offset,
        )  # fmt: skip
        assert np.all((r >= 0) & (r <= 1)) and np.all(r[~pulled] == 0)


@pytest.mark.parametrize("cls", [EXP3, EXP3S])
@pytest.mark.parametrize("granularity", ["batch", "sample"])
def test_negative_losses_are_shifted_with_one_warning_and_still_move_the_policy(cls: type, granularity: str) -> None:
    """Log-likelihood-like losses (all negative): clipping them to 0 left the policy uniform forever."""
    rng = np.random.default_rng(5)
    k = 4
    policy = cls(0.1, eta=0.5, reward="loss").bind(k)
    rewards = ReferenceRewards(k, "loss", 0.9, 0.9, 0.999)
    reference = ReferenceEXP3(k, 0.1, 0.5, rewards) if cls is EXP3 else ReferenceEXP3S(k, 0.1, 0.5, 1e-3, rewards)
    with pytest.warns(RuntimeWarning, match="negative loss") as record:
        for t in range(1, 201):
            stats = draw_stats(rng, policy.proportions, t, granularity, offset=-10.0)
            policy.update(stats)
            np.testing.assert_allclose(policy.proportions, reference.update(stats), rtol=1e-10, atol=1e-13)
    assert sum("negative loss" in str(w.message) for w in record) == 1
    assert policy.proportions.max() / policy.proportions.min() > 1.2


def test_exp3s_recovers_faster_than_exp3_when_the_best_domain_changes() -> None:
    """Domain 0 has the highest loss for 3000 updates, then domain 1: weight sharing lets EXP3.S follow."""
    results = {}
    for policy in (EXP3(0.05, eta=0.05), EXP3S(0.05, eta=0.05, alpha=1e-3, reward="loss")):
        policy.bind(3)
        rng = np.random.default_rng(0)
        for t in range(1, 4001):
            best = 0 if t <= 3000 else 1
            stats = draw_stats(rng, policy.proportions, t, "batch")
            means = np.where(np.arange(3) == best, 5.0, 1.0)
            stats = DomainStats(stats.count * means, stats.count, stats.proportions, t)
            policy.update(stats)
        results[policy.name] = policy.proportions[1]
    assert results["exp3s"] > 0.8 > results["exp3"]


def learnable_and_noise_run(policy: Policy, seed: int, updates: int = 4000) -> np.ndarray:
    """Domains 0-2 are learnable (loss 1 + 4·exp(−n/300), n = their samples so far); domain 3 is noise with the
    highest loss (5 ± noise) that training never lowers. One domain per update. Returns the mean proportions
    over the last half."""
    rng = np.random.default_rng(seed)
    k = 4
    policy.bind(k)
    seen = np.zeros(k)
    history = []
    for t in range(1, updates + 1):
        p = policy.proportions
        d = rng.choice(k, p=p)
        loss = 5.0 if d == 3 else 1.0 + 4.0 * math.exp(-seen[d] / 300.0)
        loss += rng.normal(0.0, 0.05)
        seen[d] += 1
        count = np.zeros(k)
        count[d] = 1.0
        policy.update(DomainStats(loss_sum=count * loss, count=count, proportions=p, step=t))
        history.append(policy.proportions)
    return np.mean(history[updates // 2 :], axis=0)


@pytest.mark.parametrize("seed", range(3))
def test_loss_reward_chases_the_noise_domain_and_progress_reward_leaves_it(seed: int) -> None:
    uniform = 0.25
    assert learnable_and_noise_run(ODM("paper"), seed)[3] > uniform + 0.02
    assert learnable_and_noise_run(ODM("released"), seed)[3] > 0.7
    assert learnable_and_noise_run(EXP3(reward="loss"), seed)[3] > uniform + 0.1
    progress = [cls(reward="progress") for cls in (EXP3, EXP3S, UCB1, DiscountedUCB, SlidingWindowUCB)]
    for policy in progress:
        assert learnable_and_noise_run(policy, seed)[3] < uniform - 0.03, policy
    # EXP3.S's default is the progress reward (the benchmark's recommended rule): it leaves the noise domain too,
    # where the same bandit on the loss reward chases it.
    assert learnable_and_noise_run(EXP3S(), seed)[3] < uniform - 0.03
    assert learnable_and_noise_run(EXP3S(reward="loss"), seed)[3] > uniform + 0.05


def test_defaults_and_registry() -> None:
    assert isinstance(get_policy("exp3"), EXP3) and isinstance(get_policy("exp3s", reward="progress"), EXP3S)
    policy = EXP3().bind(22)
    assert policy.gamma == 0.1 and policy._learning_rate() == pytest.approx(0.1 / 22)
    # The configuration ranks compare says what each default is (EXP3.S's reward differs from EXP3's).
    assert (EXP3().reward, EXP3().config()["reward"]) == ("loss", "loss")
    assert (EXP3S().reward, EXP3S().config()["reward"]) == ("progress", "progress")
    assert EXP3S(reward="loss").config()["reward"] == "loss"


@pytest.mark.parametrize("cls", [EXP3, EXP3S])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gamma": 0.0}, "`gamma` must be a finite number > 0 and <= 1"),
        ({"gamma": 1.5}, "`gamma`"),
        ({"eta": -1.0}, "`eta` must be a finite number > 0"),
        ({"eta": float("inf")}, "`eta`"),
        ({"reward": "gain"}, "`reward` must be one of 'loss', 'progress'"),
        ({"loss_smoothing": 1.0}, "`loss_smoothing` must be a finite number > 0 and < 1"),
        ({"progress_smoothing": 0}, "`progress_smoothing`"),
        ({"scale_decay": 0.0}, "`scale_decay`"),
    ],
)
def test_bad_arguments_raise_a_clear_error(cls: type, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1])
def test_exp3s_rejects_a_sharing_rate_outside_the_unit_interval(alpha: float) -> None:
    with pytest.raises(ValueError, match="`alpha` must be a finite number > 0 and < 1"):
        EXP3S(alpha=alpha)
