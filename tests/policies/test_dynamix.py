"""DynamixSFT against a slow reference, and in the simulator regime its paper targets."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from odm.policies import DomainStats, DynamixSFT, get_policy
from odm.simulate import LossSimulator, simulate


class ReferenceDynamix:
    """The rule in Python floats: accumulate between evaluations, reward, smooth, prior-scaled Boltzmann."""

    def __init__(self, prior, *, temperature, smoothing, credit):
        self.prior, self.tau, self.b, self.credit = list(prior), temperature, smoothing, credit
        k = len(prior)
        self.q, self.v = [0.0] * k, [0.0] * k
        self.last = None
        self.counts, self.drawn = [0.0] * k, [0.0] * k
        self.p = list(prior)

    def update(self, count, proportions, ev):
        k = len(self.prior)
        total = sum(count)
        for i in range(k):
            self.counts[i] += count[i]
            self.drawn[i] += total * proportions[i]
        if ev is None:
            return self.p
        if self.last is not None and sum(self.counts) > 0:
            n = sum(self.counts)
            rel = [(self.last[i] - ev[i]) / self.last[i] for i in range(k)]
            if self.credit == "own":
                rewards = {i: rel[i] for i in range(k)}
            else:
                delta = sum(self.prior[i] * rel[i] for i in range(k))
                rewards = {
                    i: delta * (self.counts[i] / n) / (self.drawn[i] / n) for i in range(k) if self.counts[i] > 0
                }
            for i, r in rewards.items():
                self.v[i] = self.b * self.v[i] + (1 - self.b) * (r - self.q[i]) ** 2
                self.q[i] = self.b * self.q[i] + (1 - self.b) * r
            se = math.sqrt(sum(self.v) / k * (1 - self.b) / (1 + self.b))
            if se > 0:
                mean_q = sum(self.q) / k
                z = [min(max((q - mean_q) / se, -3.0), 3.0) for q in self.q]
                w = [p * math.exp(x / self.tau) for p, x in zip(self.prior, z)]
                self.p = [0.95 * x / sum(w) + 0.05 * p for x, p in zip(w, self.prior)]  # γ = 0.05
        self.last = list(ev)
        self.counts, self.drawn = [0.0] * k, [0.0] * k
        return self.p


@pytest.mark.parametrize("credit", ["own", "lookahead"])
@pytest.mark.parametrize("granularity", ["batch", "sample"])
@pytest.mark.parametrize("seed", range(4))
def test_matches_the_slow_reference(seed, granularity, credit):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 7))
    prior = rng.dirichlet(np.ones(k))
    tau, beta, every = float(rng.uniform(0.3, 2)), float(rng.uniform(0, 0.95)), int(rng.integers(1, 4))
    policy = DynamixSFT(prior, temperature=tau, smoothing=beta, eval_every=every, credit=credit)
    reference = ReferenceDynamix(prior, temperature=tau, smoothing=beta, credit=credit)
    loss = rng.uniform(2, 4, k)
    for t in range(1, 151):
        drawn_under = rng.dirichlet(np.ones(k))  # not the current proportions: the mixer's delay
        if granularity == "batch":
            count = np.zeros(k)
            count[rng.choice(k, p=drawn_under)] = 8
        else:
            count = rng.multinomial(16, drawn_under).astype(np.float64)
        loss = loss * (1 - 0.01 * rng.uniform(0, 1, k))
        ev = loss + 0.01 * rng.standard_normal(k) if policy.wants_eval(t) else None
        policy.update(DomainStats(count * 2.0, count, drawn_under, step=t, eval_loss=ev))
        expected = reference.update(count.tolist(), drawn_under.tolist(), None if ev is None else ev.tolist())
        np.testing.assert_allclose(policy.proportions, expected, rtol=1e-10, err_msg=f"update {t}")
    assert not np.allclose(policy.proportions, prior)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_in_the_demo_world_it_starves_the_domain_that_never_improves_and_beats_uniform(seed):
    """The paper's claim: rewards from held-out improvement tilt the prior towards the domains that help and
    away from one that does not (the demo's pure-noise domain), while the prior keeps every domain sampled."""
    # credit="own": with per-sample mixing the default look-ahead credit cannot separate the domains (the next
    # test); crediting each domain with its own held-out drop is the mechanism under test here.
    result = simulate(DynamixSFT(credit="own"), steps=3000, simulator=LossSimulator.demo(), seed=seed)
    uniform = simulate("uniform", steps=3000, simulator=LossSimulator.demo(), seed=seed)
    mean = result.proportions.mean(axis=0)
    assert result.domains[int(mean.argmin())] == "noise" and mean[3] < 0.2, mean
    assert result.proportions.min() >= 0.05 * 0.25 - 1e-12  # γ·prior
    learnable = slice(0, 3)
    assert result.eval_loss[-1, learnable].mean() < uniform.eval_loss[-1, learnable].mean() - 0.005


@pytest.mark.slow
def test_the_default_lookahead_credit_stays_near_the_prior_when_every_batch_mixes_domains():
    """What the benchmark chose on its tuning seeds (no collapse on a real corpus) costs this: per-sample
    mixing gives every domain about the same look-ahead credit, so the proportions stay within noise of the
    prior even in a world with a pure-noise domain (where credit="own" starves it to < 0.2: the test above)."""
    result = simulate(DynamixSFT(), steps=3000, simulator=LossSimulator.demo(), seed=0)
    mean = result.proportions.mean(axis=0)
    np.testing.assert_allclose(mean, 0.25, atol=0.03)


def test_without_a_reward_signal_the_prior_is_kept():
    prior = np.array([0.5, 0.3, 0.2])
    policy = DynamixSFT(prior, eval_every=1)
    ones = np.ones(3)
    for t in range(1, 20):
        policy.update(DomainStats(ones, ones, prior, step=t, eval_loss=np.full(3, 2.0)))
    np.testing.assert_allclose(policy.proportions, prior, rtol=1e-15)


def test_state_round_trip_and_bad_input():
    def feed(policy, steps, seed):
        rng = np.random.default_rng(seed)
        for t in range(steps):
            p = policy.proportions
            count = rng.multinomial(16, p).astype(np.float64)
            ev = rng.uniform(1, 3, 3) if t % 2 else None
            policy.update(DomainStats(count, count, p, step=t + 1, eval_loss=ev))

    a = DynamixSFT(eval_every=2).bind(3)
    feed(a, 20, 0)
    saved = copy.deepcopy(a.state_dict())
    feed(a, 20, 1)
    b = DynamixSFT(eval_every=2)
    b.load_state_dict(saved)
    feed(b, 20, 1)
    np.testing.assert_array_equal(a.proportions, b.proportions)
    assert isinstance(get_policy("dynamix"), DynamixSFT)
    with pytest.raises(ValueError, match="`temperature`"):
        DynamixSFT(temperature=0)
    with pytest.raises(ValueError, match="`credit`"):
        DynamixSFT(credit="mine")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        a.update(DomainStats(np.ones(3), np.ones(3), np.ones(3) / 3, step=99, eval_loss=np.array([1.0, np.nan, 1.0])))
