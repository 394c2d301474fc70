"""Velocitune against a slow reference, and in the simulator regime its paper targets."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from odm.policies import DomainStats, Velocitune, get_policy
from odm.policies.scaling_law import fit_power_law, power_law
from odm.simulate import LossSimulator, simulate


class ReferenceVelocitune:
    """The update rule one domain at a time in Python floats (targets given, or fitted by ``fit``)."""

    def __init__(self, k, *, eta, interval, initial, smoothing, smoothing_loss, min_gap, target=None):
        self.k, self.eta, self.interval, self.initial = k, eta, interval, initial
        self.c, self.b, self.min_gap, self.target = smoothing, smoothing_loss, min_gap, target
        self.log_w = [math.log(1 / k)] * k
        self.p = [1 / k] * k
        self.t = 0
        self.init_sum, self.init_cnt = [0.0] * k, [0.0] * k
        self.ema = [None] * k

    def update(self, loss_sum, count):
        self.t += 1
        for i in range(self.k):
            if count[i] > 0:
                mean = loss_sum[i] / count[i]
                if self.t <= self.initial:
                    self.init_sum[i] += loss_sum[i]
                    self.init_cnt[i] += count[i]
                self.ema[i] = mean if self.ema[i] is None else self.b * self.ema[i] + (1 - self.b) * mean
        if self.target is not None and self.t % self.interval == 0 and self.t > self.initial:
            for i in range(self.k):
                v = 0.0
                if self.init_cnt[i] > 0 and self.ema[i] is not None:
                    l0 = self.init_sum[i] / self.init_cnt[i]
                    gap = l0 - self.target[i]
                    if gap > self.min_gap * abs(l0):
                        v = min(max((self.ema[i] - self.target[i]) / gap, 0.0), 1.0)
                self.log_w[i] += self.eta * v
            top = max(self.log_w)
            w = [math.exp(x - top) for x in self.log_w]
            self.p = [(1 - self.c) * x / sum(w) + self.c / self.k for x in w]
        return self.p


@pytest.mark.parametrize("seed", range(6))
def test_matches_the_slow_reference_with_given_targets(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 7))
    cfg = dict(eta=float(rng.uniform(0.1, 2)), interval=int(rng.integers(1, 6)), initial=int(rng.integers(1, 8)))
    cfg.update(smoothing=float(rng.uniform(0, 0.1)), smoothing_loss=float(rng.uniform(0, 0.95)), min_gap=0.01)
    target = rng.uniform(0.5, 1.5, k)
    target[0] = 10.0  # a domain already at its target: V = 0
    policy = Velocitune(
        eta=cfg["eta"],
        update_interval=cfg["interval"],
        initial_steps=cfg["initial"],
        target=target,
        smoothing=cfg["smoothing"],
        smoothing_loss=cfg["smoothing_loss"],
        min_gap=cfg["min_gap"],
    )
    reference = ReferenceVelocitune(k, target=target.tolist(), **cfg)
    for t in range(1, 121):
        p = policy.proportions
        count = rng.multinomial(int(rng.integers(1, 30)), p).astype(np.float64)
        mean = 1.5 + 2.0 / math.sqrt(t) * rng.uniform(0.5, 1.5, k)
        policy.update(DomainStats(mean * count, count, p, step=t))
        np.testing.assert_allclose(policy.proportions, reference.update(mean * count, count), rtol=1e-12)


def test_the_target_is_the_fitted_law_at_the_horizon():
    true = np.array([[1.0, 0.3, 0.4], [1.8, 0.1, 0.3]])
    policy = Velocitune(initial_steps=5, fit_step=60, horizon=400).bind(2)
    ns, losses = [], []
    for t in range(1, 61):
        count = np.array([20.0, 12.0])
        n = 32 * t
        mean = power_law(true, n)
        ns.append(n)
        losses.append(mean)
        policy.update(DomainStats(mean * count, count, np.ones(2) / 2, step=t))
    params, ok = fit_power_law(np.array(ns, dtype=np.float64), np.array(losses).T)
    assert ok.all()
    np.testing.assert_allclose(policy.target_loss, power_law(params, 32 * 400), rtol=1e-12)
    np.testing.assert_allclose(policy.target_loss, power_law(true, 32 * 400), rtol=1e-3)


def _three_speed_world():
    """Losses that follow the fitted law's shape: a fast and a slow learner, and pure noise."""
    return LossSimulator(
        ["fast", "slow", "noise"],
        floor=[1.0, 1.0, 0.0],
        scale=[3.0, 3.0, 0.0],
        exponent=[0.7, 0.25, 1.0],
        horizon=20,
        noise_domains=["noise"],
        noise=0.2,
    )


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_in_continual_pretraining_it_favours_the_slow_learner_and_starves_noise(seed):
    """The paper's claim: weight goes to the domains learning slowest towards their targets and away from the
    fast ones; a domain with nothing left to learn (V = 0) is de-emphasised. The slow domain ends better than
    under uniform sampling."""
    policy = Velocitune(horizon=3000, fit_step=300)
    result = simulate(policy, steps=3000, simulator=_three_speed_world(), seed=seed)
    uniform = simulate("uniform", steps=3000, simulator=_three_speed_world(), seed=seed)
    mean = result.proportions.mean(axis=0)
    assert mean[1] > mean[0] > mean[2], mean
    assert result.proportions[-1, 2] < 0.2
    assert result.eval_loss[-1, 1] < uniform.eval_loss[-1, 1] - 0.02


def test_state_round_trip_continues_the_same_trajectory_and_stays_on_the_simplex():
    def feed(policy, steps, seed):
        rng = np.random.default_rng(seed)
        for t in range(policy._updates + 1, policy._updates + steps + 1):
            p = policy.proportions
            count = rng.multinomial(16, p).astype(np.float64)
            mean = np.array([1 + 3 / math.sqrt(t), 1 + 3 / t**0.2, 4.0]) + 0.05 * rng.standard_normal(3)
            policy.update(DomainStats(mean * count, count, p, step=t))
            assert abs(policy.proportions.sum() - 1) < 1e-12 and np.all(policy.proportions > 0)

    a = Velocitune(fit_step=40, update_interval=5, initial_steps=5).bind(3)
    feed(a, 30, 0)
    saved = copy.deepcopy(a.state_dict())
    feed(a, 60, 1)
    b = Velocitune(fit_step=40, update_interval=5, initial_steps=5)
    b.load_state_dict(saved)
    feed(b, 60, 1)
    np.testing.assert_array_equal(a.proportions, b.proportions)
    assert a.target_loss is not None


def test_bad_arguments_and_registry():
    assert isinstance(get_policy("velocitune"), Velocitune)
    with pytest.raises(ValueError, match="`eta`"):
        Velocitune(eta=0)
    with pytest.raises(ValueError, match="`fit_step`"):
        Velocitune(initial_steps=20, fit_step=10)
    with pytest.raises(ValueError, match="different lengths"):
        Velocitune(prior=[0.5, 0.5], target=[1.0, 1.0, 1.0])
    with pytest.warns(RuntimeWarning, match="non-finite"):
        Velocitune().bind(2).update(DomainStats(np.array([np.nan, 1.0]), np.ones(2), np.ones(2) / 2, step=1))
