"""Online Skill-It against a slow reference, and the skills-graph estimate from single-domain probes."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from odm.policies import DomainStats, SkillIt, get_policy
from odm.policies.skillit import estimate_skill_graph
from odm.simulate import LossSimulator, simulate


def _slow_skillit(evals, graph, prior, eta, window):
    """p_i ∝ p0_i · exp(η · Σ_j A_ij · Σ_{last w evals} L_j), looped in plain Python."""
    k = len(prior)
    recent = evals[-window:]
    summed = [sum(e[j] for e in recent) for j in range(k)]
    scores = [math.log(prior[i]) + eta * sum(graph[i][j] * summed[j] for j in range(k)) for i in range(k)]
    top = max(scores)
    w = [math.exp(s - top) for s in scores]
    return [x / sum(w) for x in w]


def _stats(k, step, eval_loss=None):
    ones = np.ones(k)
    return DomainStats(ones, ones, ones / k, step=step, eval_loss=None if eval_loss is None else np.asarray(eval_loss))


def _run(policy, evals_by_step, num_steps):
    k = policy.num_domains
    for t in range(1, num_steps + 1):
        ev = evals_by_step.get(t) if policy.wants_eval(t) else None
        policy.update(_stats(k, t, ev))
    return policy


@pytest.mark.parametrize("seed", range(5))
def test_matches_the_slow_reference_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    k, window, every = int(rng.integers(2, 7)), int(rng.integers(1, 5)), int(rng.integers(1, 4))
    graph = rng.uniform(-0.2, 1.0, size=(k, k))
    prior = rng.dirichlet(np.ones(k))
    eta = float(rng.uniform(0.1, 2.0))
    policy = SkillIt(graph, eta=eta, window=window, prior=prior, eval_every=every)
    evals = {t: rng.uniform(0.5, 5.0, size=k).tolist() for t in range(1, 41)}
    _run(policy, evals, 40)
    seen = [evals[t] for t in range(1, 41) if t % every == 0]
    np.testing.assert_allclose(policy.proportions, _slow_skillit(seen, graph, prior, eta, window), rtol=1e-10)


def test_asks_for_an_evaluation_every_eval_every_updates_and_starts_from_unit_losses():
    graph = [[1.0, 0.5], [0.0, 1.0]]
    policy = SkillIt(graph, eta=1.0, eval_every=5, prior=[0.2, 0.8])
    assert [t for t in range(1, 21) if policy.wants_eval(t)] == [5, 10, 15, 20]
    start = _slow_skillit([[1.0, 1.0]], graph, [0.2, 0.8], 1.0, 1)  # p0 ⊙ exp(η·A·1), the authors' start
    np.testing.assert_allclose(policy.proportions, start, rtol=1e-12)
    assert abs(start[0] - 0.2) > 0.05  # A·1 = (1.5, 1): not p0
    for t in range(1, 5):
        policy.update(_stats(2, t))
    np.testing.assert_allclose(policy.proportions, start, rtol=1e-12)


def test_only_the_last_window_evaluations_count():
    policy = SkillIt(eta=1.0, window=2, eval_every=1).bind(2)
    for t, ev in enumerate([[100.0, 0.0], [1.0, 1.0], [2.0, 1.0]], start=1):
        policy.update(_stats(2, t, ev))
    expected = np.exp([3.0, 2.0])  # identity graph, the first evaluation has left the window
    np.testing.assert_allclose(policy.proportions, expected / expected.sum(), rtol=1e-12)


def test_estimate_skill_graph_measures_relative_drops_of_single_domain_probes():
    transfer = np.array([[0.3, 0.1, 0.0], [0.05, 0.2, -0.1], [0.0, 0.0, 0.4]])
    initial = np.array([2.0, 3.0, 4.0])
    calls = []

    def probe(i):  # "train on domain i from the same checkpoint, evaluate every domain"
        calls.append(i)
        return initial * (1.0 - transfer[i])

    graph = estimate_skill_graph(probe, initial, nonnegative=False)
    np.testing.assert_allclose(graph, transfer, atol=1e-12)
    assert calls == [0, 1, 2]
    np.testing.assert_allclose(estimate_skill_graph(probe, initial), np.maximum(transfer, 0.0), atol=1e-12)
    with pytest.raises(ValueError, match="probe\\(0\\)"):
        estimate_skill_graph(lambda i: [1.0, np.nan, 1.0], initial)
    with pytest.raises(ValueError, match="initial_loss"):
        estimate_skill_graph(probe, [1.0, 0.0, 2.0])


def test_state_round_trip_and_determinism():
    rng = np.random.default_rng(0)
    evals = {t: rng.uniform(1, 3, size=3).tolist() for t in range(1, 61)}
    graph = rng.uniform(0, 1, size=(3, 3))
    a = _run(SkillIt(graph, eval_every=2), evals, 30)
    b = SkillIt(graph, eval_every=2)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for policy in (a, b):
        for t in range(31, 61):
            policy.update(_stats(3, t, evals[t] if policy.wants_eval(t) else None))
    c = _run(SkillIt(graph, eval_every=2), evals, 60)
    np.testing.assert_array_equal(a.proportions, b.proportions)
    np.testing.assert_array_equal(a.proportions, c.proportions)
    assert abs(a.proportions.sum() - 1) < 1e-12


def test_huge_losses_never_overflow():
    policy = SkillIt(eta=10.0, eval_every=1).bind(3)
    policy.update(_stats(3, 1, [1e300, 1e3, 0.0]))
    p = policy.proportions
    assert np.all(np.isfinite(p)) and abs(p.sum() - 1) < 1e-12 and p.argmax() == 0


def test_a_non_finite_evaluation_is_skipped_with_a_warning_and_leaves_the_state_unchanged():
    policy = SkillIt(eval_every=1).bind(2)
    policy.update(_stats(2, 1, [1.0, 2.0]))
    before = policy.state_dict()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        policy.update(_stats(2, 2, [np.nan, 1.0]))
    np.testing.assert_equal(policy.state_dict(), before)


def test_bad_configuration_raises_a_clear_error():
    with pytest.raises(ValueError, match="graph"):
        SkillIt([[1.0, 0.0]])
    with pytest.raises(ValueError, match="disagree"):
        SkillIt(np.eye(2), prior=[1, 1, 1])
    with pytest.raises(ValueError, match="window"):
        SkillIt(window=0)
    with pytest.raises(ValueError, match="eta"):
        SkillIt(eta=float("nan"))
    with pytest.raises(ValueError, match="3 domains"):
        SkillIt(np.eye(3)).bind(2)


def test_skillit_is_registered_by_name():
    assert isinstance(get_policy("skillit"), SkillIt)


def test_through_a_standalone_online_mixer_skillit_evaluates_on_schedule():
    simulator = LossSimulator.demo()
    result = simulate(SkillIt(simulator.transfer, eval_every=10), steps=300, simulator=simulator, seed=0)
    assert result.num_evals == 30
    p = result.proportions[-1]
    assert np.all(np.isfinite(p)) and abs(p.sum() - 1) < 1e-12 and not np.allclose(p, 0.25)


@pytest.mark.parametrize("seed", range(12))
def test_proportions_stay_on_the_simplex_under_extreme_random_evaluations(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 9))
    policy = SkillIt(rng.normal(size=(k, k)), eta=float(rng.uniform(0.1, 10)), eval_every=1)
    for t in range(1, 51):
        policy.update(_stats(k, t, 10.0 ** rng.uniform(-8, 8, size=k)))
        p = policy.proportions
        assert np.all(np.isfinite(p)) and np.all(p >= 0) and abs(p.sum() - 1) < 1e-12
