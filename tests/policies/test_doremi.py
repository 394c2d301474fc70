"""Online DoReMi against a slow, obviously correct reference loop."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from odm.policies import DomainStats, DoReMi, Fixed, get_policy
from odm.simulate import LossSimulator, simulate


def _slow_doremi(steps, reference, eta, c, k):
    """Plain-Python DoReMi: per step, excess of the drawn domains, multiplicative update, uniform smoothing."""
    alpha = [1.0 / k] * k
    excess = [0.0] * k
    history = []
    for t, losses in enumerate(steps, start=1):
        ref = reference(t) if callable(reference) else reference
        for i in range(k):
            if not math.isnan(losses[i]):
                excess[i] = max(losses[i] - ref[i], 0.0)
        w = [a * math.exp(eta * e) for a, e in zip(alpha, excess)]
        total = sum(w)
        alpha = [(1 - c) * x / total + c / k for x in w]
        history.append(alpha)
    average = [sum(h[i] for h in history) / len(history) for i in range(k)]  # the paper: α_1 … α_T
    with_initial = [(1 / k + sum(h[i] for h in history)) / (len(history) + 1) for i in range(k)]  # official code
    return alpha, average, with_initial


def _random_steps(rng, k, num):
    steps = []
    for _ in range(num):
        losses = rng.uniform(1.0, 4.0, size=k)
        losses[rng.random(k) < 0.3] = np.nan  # domains absent from the step
        steps.append(losses.tolist())
    return steps


def _feed(policy, steps, *, reference_loss=None):
    for t, losses in enumerate(steps, start=1):
        stats = DomainStats.from_losses(losses, policy.proportions, step=t)
        if reference_loss is not None:
            stats = DomainStats(stats.loss_sum, stats.count, stats.proportions, t, reference_loss=reference_loss(t))
        policy.update(stats)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("source", ["values", "callable", "stats"])
def test_matches_the_slow_reference_on_random_inputs(seed, source):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 7))
    eta, c = float(rng.uniform(0.1, 2.0)), float(rng.uniform(0.0, 0.1))
    steps = _random_steps(rng, k, 60)
    values = rng.uniform(1.0, 3.0, size=k).tolist()
    curve = lambda t: [v + 0.01 * t for v in values]  # noqa: E731 - a reference loss curve by step
    if source == "values":
        policy = DoReMi(eta, smoothing=c, reference=values)
        ref = values
        _feed(policy, steps)
    elif source == "callable":
        policy = DoReMi(eta, smoothing=c, reference=curve).bind(k)
        ref = curve
        _feed(policy, steps)
    else:  # per-update reference losses take precedence over the constructor's
        policy = DoReMi(eta, smoothing=c, reference=[100.0] * k)
        ref = curve
        _feed(policy, steps, reference_loss=lambda t: np.array(curve(t)))
    alpha, average, with_initial = _slow_doremi(steps, ref, eta, c, k)
    np.testing.assert_allclose(policy.proportions, alpha, rtol=1e-10)
    np.testing.assert_allclose(policy.average_proportions, with_initial, rtol=1e-10)
    policy.average_initial = False
    np.testing.assert_allclose(policy.average_proportions, average, rtol=1e-10)


def test_an_absent_domain_keeps_its_previous_excess():
    policy = DoReMi(reference=[1.0, 1.0, 1.0])
    policy.update(DomainStats.from_losses([3.0, 1.5, 0.5], [1 / 3] * 3))
    np.testing.assert_allclose(policy.excess, [2.0, 0.5, 0.0])
    policy.update(DomainStats.from_losses([np.nan, 2.0, np.nan], policy.proportions, step=2))
    np.testing.assert_allclose(policy.excess, [2.0, 1.0, 0.0])


def test_weights_stay_finite_and_above_the_smoothing_floor_under_huge_excess():
    policy = DoReMi(reference=[0.0, 0.0, 0.0], smoothing=0.03)
    for t in range(1, 1001):
        policy.update(DomainStats.from_losses([1e6, 1e3, 0.0], policy.proportions, step=t))
    p = policy.proportions
    assert np.all(np.isfinite(p)) and abs(p.sum() - 1) < 1e-12 and p.min() >= 0.01 - 1e-15
    assert p.argmax() == 0


def test_time_averaged_weights_export_to_a_fixed_policy():
    policy = DoReMi(reference=[1.0, 2.0])
    assert np.allclose(policy.average_proportions, [0.5, 0.5])  # before any update: the initial weights
    _feed(policy, [[2.0, 2.0], [3.0, 2.5], [1.0, 4.0]])
    exported = Fixed(policy.average_proportions)
    np.testing.assert_allclose(exported.proportions, policy.average_proportions)


def test_state_round_trip_continues_the_same_trajectory():
    rng = np.random.default_rng(3)
    steps = _random_steps(rng, 4, 80)
    a = DoReMi(reference=[2.0] * 4)
    _feed(a, steps[:40])
    b = DoReMi(reference=[2.0] * 4)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for policy in (a, b):
        for t, losses in enumerate(steps[40:], start=41):
            policy.update(DomainStats.from_losses(losses, policy.proportions, step=t))
    np.testing.assert_array_equal(a.proportions, b.proportions)
    np.testing.assert_array_equal(a.average_proportions, b.average_proportions)


def test_non_finite_losses_are_skipped_with_a_warning_and_leave_the_state_unchanged():
    policy = DoReMi(reference=[1.0, 1.0])
    _feed(policy, [[2.0, 1.0]])
    before = policy.state_dict()
    bad = DomainStats(np.array([np.inf, 1.0]), np.ones(2), np.ones(2) / 2, step=2)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        policy.update(bad)
    np.testing.assert_equal(policy.state_dict(), before)


def test_bad_configuration_raises_a_clear_error():
    with pytest.raises(TypeError, match="needs reference losses"):
        DoReMi()
    with pytest.raises(TypeError, match="cannot be built from its name alone"):
        get_policy("doremi")
    with pytest.raises(ValueError, match=r"reference losses must have shape \(2,\)"):
        DoReMi(reference=lambda t: [1.0, 1.0, 1.0], prior=[0.5, 0.5]).bind(2).update(
            DomainStats.from_losses([1.0, 1.0], [0.5, 0.5])
        )
    with pytest.raises(ValueError, match="eta"):
        DoReMi(-1.0, reference=[1.0])
    with pytest.raises(ValueError, match="smoothing"):
        DoReMi(reference=[1.0], smoothing=2.0)
    with pytest.raises(ValueError, match="different lengths"):
        DoReMi(reference=[1.0, 2.0], prior=[1.0, 1.0, 1.0])


def test_doremi_is_registered_by_name_when_given_a_reference():
    assert isinstance(get_policy("doremi", reference=[1.0, 2.0]), DoReMi)


def test_through_a_standalone_online_mixer_doremi_weighs_excess_over_a_trained_reference_not_raw_loss():
    simulator = LossSimulator.demo()
    reference = simulator.expected_loss(trained=np.full(4, 1e6))  # a well-trained reference model's losses
    result = simulate(DoReMi(reference=reference.tolist()), steps=600, simulator=simulator, seed=0)
    average = result.mixer.policy.average_proportions
    assert result.domains[int(average.argmin())] == "noise"  # highest loss, but no excess over the reference
    assert abs(average.sum() - 1) < 1e-12


@pytest.mark.parametrize("seed", range(12))
def test_weights_stay_on_the_simplex_above_the_floor_under_extreme_random_losses(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 9))
    policy = DoReMi(float(rng.uniform(0.1, 10)), smoothing=1e-3, reference=(10.0 ** rng.uniform(-3, 3, k)).tolist())
    for t in range(1, 201):
        losses = 10.0 ** rng.uniform(-8, 8, size=k)
        losses[rng.random(k) < 0.3] = np.nan
        policy.update(DomainStats.from_losses(losses, policy.proportions, step=t))
        p = policy.proportions
        assert np.all(np.isfinite(p)) and abs(p.sum() - 1) < 1e-12 and p.min() >= 1e-3 / k - 1e-15
