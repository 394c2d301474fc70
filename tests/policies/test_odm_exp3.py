"""ODM (Albalak et al. 2023), both variants, against slow per-domain reference loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
from draws import draw_counts

from odm.policies import ODM, DomainStats, get_policy
from odm.policies.odm_exp3 import exploration_rate, odm_released_update


def draw_stats(rng: np.random.Generator, p: np.ndarray, step: int, granularity: str, scale: float) -> DomainStats:
    """One update's statistics with losses uniform in ``[0, scale)``."""
    count = draw_counts(rng, p, granularity)
    losses = rng.uniform(0.0, scale, len(p))
    return DomainStats(loss_sum=count * losses, count=count, proportions=p.copy(), step=step)


def reference_eps(t: int, k: int) -> float:
    return 1.0 / k if t == 0 else min(1.0 / k, math.sqrt(math.log(k) / (k * t)))


class ReferencePaper:
    """Algorithm 1 of the paper, one micro-batch and one domain at a time in Python floats.

    ``update`` takes the update's micro-batches (per-domain loss sums and counts, all of one size) and adds
    ``share·mean/π`` of every micro-batch to the domain's reward: a one-domain micro-batch adds ``L/π_t(i)``.
    """

    def __init__(self, k: int, alpha: float) -> None:
        self.k, self.alpha, self.rewards = k, alpha, [0.0] * k

    def update(self, micro: list[tuple[np.ndarray, np.ndarray]], proportions: np.ndarray, t: int) -> list[float]:
        k = self.k
        summed = [0.0] * k
        for loss_sum, count in micro:
            size = sum(count)
            for i in range(k):
                if count[i] > 0:
                    summed[i] += (loss_sum[i] / count[i]) * (count[i] / size) / proportions[i]
        for i in range(k):
            if any(count[i] > 0 for _, count in micro):
                self.rewards[i] = self.alpha * self.rewards[i] + (1 - self.alpha) * summed[i]
        lr, eps = reference_eps(t, k), reference_eps(t + 1, k)
        top = max(lr * r for r in self.rewards)
        w = [math.exp(lr * r - top) for r in self.rewards]
        return [(1 - k * eps) * wi / sum(w) + eps for wi in w]


def draw_micro_batches(
    rng: np.random.Generator, p: np.ndarray, g: int, granularity: str, size: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``g`` micro-batches of ``size`` samples: one domain each (``"batch"``) or a per-sample mix."""
    out = []
    for _ in range(g):
        if granularity == "batch":
            count = np.zeros(len(p))
            count[rng.choice(len(p), p=p)] = size
        else:
            count = rng.multinomial(size, p).astype(np.float64)
        out.append((count * rng.uniform(0.0, 8.0, len(p)), count))
    return out


class ReferenceReleased:
    """The released scripts' rule in plain floats (no log space: the losses here are small)."""

    def __init__(self, k: int, alpha: float) -> None:
        self.k, self.alpha, self.rewards = k, alpha, [0.0] * k

    def update(self, stats: DomainStats) -> list[float]:
        k = self.k
        for i in range(k):
            if stats.count[i] > 0:
                mean = stats.loss_sum[i] / stats.count[i]
                self.rewards[i] = self.alpha * self.rewards[i] + (1 - self.alpha) * math.exp(mean)
        eps = reference_eps(stats.step, k)
        total = sum(self.rewards)
        share = [r / total for r in self.rewards] if total > 0 else [1 / k] * k
        return [(1 - k * eps) * s + eps for s in share]


@pytest.mark.parametrize("granularity", ["batch", "sample"])
@pytest.mark.parametrize("seed", range(12))
def test_paper_variant_matches_the_reference_loop(seed: int, granularity: str) -> None:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 12))
    alpha = float(rng.uniform(0.05, 0.95))
    g = int(rng.integers(1, 9))  # micro-batches per update (the paper: 8)
    policy = ODM("paper", alpha=alpha).bind(k)
    reference = ReferencePaper(k, alpha)
    for t in range(1, 301):
        p = policy.proportions
        micro = draw_micro_batches(rng, p, g, granularity, size=int(rng.integers(1, 9)))
        loss_sum = sum(m[0] for m in micro)
        count = sum(m[1] for m in micro)
        policy.update(DomainStats(loss_sum=loss_sum, count=count, proportions=p, step=t, num_batches=g))
        np.testing.assert_allclose(policy.proportions, reference.update(micro, p, t), rtol=1e-10, atol=1e-13)


def test_paper_variant_moves_further_with_more_micro_batches_per_update() -> None:
    """The reward is a sum over micro-batches, so G = 8 one-domain micro-batches move the policy further than
    the same statistics reported as one micro-batch (the bug this guards against divided the sum by G)."""
    k = 4
    losses = np.array([5.0, 3.0, 2.0, 1.0])
    spread = {}
    for g in (1, 8):
        policy = ODM("paper").bind(k)
        for t in range(1, 2001):
            count = np.full(k, 2.0 * g)  # G micro-batches of 8 samples, 2 per domain in each
            stats = DomainStats(count * losses, count, policy.proportions, step=t, num_batches=g)
            policy.update(stats)
        spread[g] = policy.proportions.max() / policy.proportions.min()
    assert spread[8] > spread[1] ** 4


@pytest.mark.parametrize("granularity", ["batch", "sample"])
@pytest.mark.parametrize("seed", range(12))
def test_released_variant_matches_the_reference_loop(seed: int, granularity: str) -> None:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 12))
    alpha = float(rng.uniform(0.05, 0.95))
    policy = ODM("released", alpha=alpha).bind(k)
    reference = ReferenceReleased(k, alpha)
    for t in range(1, 301):
        stats = draw_stats(rng, policy.proportions, t, granularity, scale=12.0)
        policy.update(stats)
        np.testing.assert_allclose(policy.proportions, reference.update(stats), rtol=1e-10, atol=1e-13)


def test_released_variant_stays_finite_for_losses_whose_exp_overflows() -> None:
    k = 3
    estimates = np.full(k, -np.inf)
    for t in range(1, 200):
        losses = np.array([800.0, 1000.0, 1200.0])
        estimates, p = odm_released_update(estimates, losses, np.ones(k), t, 0.5)
        assert np.all(np.isfinite(p)) and abs(p.sum() - 1) < 1e-12
    eps = exploration_rate(199, k)
    np.testing.assert_allclose(p, [eps, eps, 1 - 2 * eps], rtol=1e-12)  # exp(200) dwarfs the rest
    assert np.all(np.isfinite(estimates))


def test_exploration_rate_follows_the_paper() -> None:
    assert exploration_rate(0, 22) == 1 / 22
    assert exploration_rate(68, 22) == 1 / 22  # t <= K ln K: uniform
    assert exploration_rate(1000, 22) == pytest.approx(math.sqrt(math.log(22) / 22_000))


@pytest.mark.parametrize("variant", ["paper", "released"])
def test_the_policy_is_exactly_uniform_while_the_exploration_rate_is_one_over_k(variant: str) -> None:
    rng = np.random.default_rng(0)
    k = 22
    policy = ODM(variant, initial=rng.dirichlet(np.ones(k)))
    for t in range(1, 68):  # ε_{t+1} = 1/K for t + 1 <= 68
        policy.update(draw_stats(rng, policy.proportions, t, "batch", 5.0))
        np.testing.assert_allclose(policy.proportions, np.full(k, 1 / k), rtol=0, atol=1e-15)
    for t in range(68, 200):
        policy.update(draw_stats(rng, policy.proportions, t, "batch", 5.0))
    assert policy.proportions.std() > 0


@pytest.mark.parametrize("variant", ["paper", "released"])
def test_warmup_keeps_the_initial_proportions_and_learns_nothing(variant: str) -> None:
    rng = np.random.default_rng(1)
    initial = np.array([0.7, 0.2, 0.1])
    warm = ODM(variant, warmup_steps=50, initial=initial)
    cold = ODM(variant).bind(3)
    for t in range(1, 51):
        warm.update(draw_stats(rng, warm.proportions, t, "batch", 5.0))
        np.testing.assert_array_equal(warm.proportions, initial / initial.sum())
    for t in range(51, 120):
        stats = draw_stats(rng, warm.proportions, t, "batch", 5.0)
        warm.update(stats)
        cold.update(stats)  # a policy that never saw the warm-up statistics
        np.testing.assert_array_equal(warm.proportions, cold.proportions)


def test_defaults_and_registry() -> None:
    assert ODM().variant == "paper" and ODM().alpha == 0.9
    assert ODM("released").alpha == 0.5
    policy = get_policy("odm", variant="released", warmup_steps=2000)
    assert isinstance(policy, ODM) and policy.warmup_steps == 2000


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"variant": "published"}, "`variant` must be one of 'paper', 'released'"),
        ({"alpha": 1.0}, "`alpha` must be a finite number > 0 and < 1"),
        ({"alpha": 0.0}, "`alpha`"),
        ({"alpha": -0.5}, "`alpha`"),
        ({"warmup_steps": -1}, "`warmup_steps` must be an integer >= 0"),
        ({"initial": [0.5, -0.5]}, "`initial` must be non-negative"),
    ],
)
def test_bad_arguments_raise_a_clear_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ODM(**kwargs)
    with pytest.raises(TypeError, match=r"`warmup_steps` must be an integer >= 0, got 1.5 \(float\)"):
        ODM(warmup_steps=1.5)


def test_initial_proportions_fix_the_number_of_domains() -> None:
    with pytest.raises(ValueError, match="configured for 2 domains"):
        ODM(initial=[0.5, 0.5]).bind(3)


def test_a_state_dict_of_the_other_variant_is_refused() -> None:
    paper = ODM("paper").bind(3)
    with pytest.raises(ValueError, match="variant 'paper'"):
        ODM("released").load_state_dict(paper.state_dict())
