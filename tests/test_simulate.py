"""``odm.simulate``: the loss curves follow their formula, training lowers them, runs are reproducible."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ChaseLoss

from odm.policies import EVAL_LOSS, TRAIN_LOSS, DomainStats, Policy, default_policy_names
from odm.simulate import LossSimulator, simulate


def _reference_loss(sim: LossSimulator, trained: list[float]) -> list[float]:
    """The formula, one domain and one term at a time."""
    out = []
    for i in range(sim.num_domains):
        n = sum(sim.transfer[i, j] * trained[j] for j in range(sim.num_domains))
        out.append(sim.floor[i] + sim.scale[i] * (1.0 + n / sim.horizon) ** (-sim.exponent[i]))
    return out


def test_noise_free_losses_follow_the_power_law_with_transfer_and_are_measured_before_training():
    sim = LossSimulator(
        3,
        floor=[0.5, 1.0, 2.0],
        scale=[3.0, 2.0, 1.0],
        exponent=[0.3, 0.6, 0.9],
        horizon=50.0,
        transfer=[[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.2, 0.2, 1.0]],
        noise=0.0,
    )
    rng = np.random.default_rng(0)
    trained = [0.0, 0.0, 0.0]
    for _ in range(40):
        ids = rng.integers(0, 3, int(rng.integers(1, 30)))
        expected = _reference_loss(sim, trained)
        np.testing.assert_allclose(sim.train(ids), [expected[i] for i in ids], rtol=1e-13)
        for i in ids:
            trained[i] += 1
    np.testing.assert_allclose(sim.expected_loss(), _reference_loss(sim, trained), rtol=1e-13)
    sums, counts = sim.evaluate()
    np.testing.assert_allclose(sums / counts, _reference_loss(sim, trained), rtol=1e-13)


def test_the_domain_trained_more_falls_faster_and_transfer_helps_its_neighbour():
    sim = LossSimulator(3, transfer=[[1.0, 0.0, 0.0], [0.3, 1.0, 0.0], [0.0, 0.0, 1.0]], noise=0.0)
    start = sim.expected_loss()
    for _ in range(50):
        sim.train(np.array([0] * 24 + [1] * 6 + [2] * 2))
    drop = start - sim.expected_loss()
    assert drop[0] > drop[1] > drop[2] > 0
    alone = LossSimulator(3, noise=0.0)
    for _ in range(50):
        alone.train(np.array([0] * 24 + [1] * 6 + [2] * 2))
    assert drop[1] > (start - alone.expected_loss())[1], "training on d0 also lowers d1 through T[1, 0] = 0.3"


def test_a_pure_noise_domain_never_learns_and_helps_no_one():
    sim = LossSimulator(["a", "junk"], floor=1.0, scale=2.0, noise_domains=["junk"], transfer=np.ones((2, 2)))
    before = sim.expected_loss()
    assert before[1] == pytest.approx(1.0 + 2.0 + 1.0), "default noise loss: one above every domain's start"
    for _ in range(100):
        sim.train(np.ones(16, dtype=np.int64))
    np.testing.assert_array_equal(sim.expected_loss(), before)
    losses = sim.train(np.ones(10_000, dtype=np.int64))
    assert losses.std() == pytest.approx(0.2, rel=0.05) and losses.mean() == pytest.approx(4.0, abs=0.02)


def test_a_loss_chasing_policy_feeds_the_noise_domain_and_uniform_learns_more():
    chase = simulate(ChaseLoss(), steps=300, seed=0)
    uniform = simulate("uniform", steps=300, seed=0)
    noise = chase.domains.index("noise")
    assert chase.proportions[-50:, noise].mean() > 0.5
    learnable = [i for i in range(4) if i != noise]
    assert chase.eval_loss[-1, learnable].mean() > uniform.eval_loss[-1, learnable].mean()


def test_simulations_are_deterministic_per_seed_and_do_not_consume_the_policy():
    policy = ChaseLoss()
    a = simulate(policy, steps=120, seed=5)
    b = simulate(policy, steps=120, seed=5)
    c = simulate(policy, steps=120, seed=6)
    for field in ("proportions", "counts", "train_loss", "eval_loss"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.train_loss, c.train_loss, equal_nan=True)
    assert not policy.is_bound, "simulate copies a policy instance"


def test_the_trajectories_line_up_with_the_draws():
    result = simulate("uniform", steps=50, batch_size=16, seed=1)
    assert result.counts.sum(axis=1).tolist() == [16.0] * 50
    drawn = result.counts > 0
    assert np.isnan(result.train_loss[~drawn]).all() and np.isfinite(result.train_loss[drawn]).all()
    np.testing.assert_array_equal(result.proportions, np.full((50, 4), 0.25))
    assert set(result.final_eval_loss) == {"easy", "medium", "hard", "noise"}
    batch = simulate("uniform", steps=50, batch_size=16, granularity="batch", seed=1)
    assert ((batch.counts == 0) | (batch.counts == 16)).all(), "one domain per batch"


class _EvalEvery(Policy):
    """Asks for held-out losses every third update and keeps what it gets."""

    requires = frozenset({TRAIN_LOSS, EVAL_LOSS})

    def _init_state(self, num_domains: int) -> None:
        self._p = np.full(num_domains, 1.0 / num_domains)
        self.evals: list[tuple[int, np.ndarray]] = []

    def wants_eval(self, step: int) -> bool:
        return step % 3 == 0

    def update(self, stats: DomainStats) -> None:
        if stats.eval_loss is not None:
            self.evals.append((stats.step, stats.eval_loss))


def test_held_out_losses_reach_the_policy_exactly_when_it_asks():
    sim = LossSimulator(3, noise=0.0)
    result = simulate(_EvalEvery(), steps=30, simulator=sim)
    policy = result.mixer.policy
    assert isinstance(policy, _EvalEvery)
    assert result.num_evals == 10
    assert [s for s, _ in policy.evals] == list(range(3, 31, 3))
    # The evaluation runs after the step's batch trained: it sees the loss recorded for that step.
    for s, loss in policy.evals:
        np.testing.assert_allclose(loss, result.eval_loss[s - 1], rtol=1e-13)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"exponent": 0.0}, "`exponent` must be finite and > 0"),
        ({"floor": [1.0, 2.0]}, "`floor` must be one number or 3 numbers"),
        ({"scale": -1.0}, "`scale` must be finite and >= 0"),
        ({"transfer": np.eye(2)}, r"`transfer` must be a non-negative finite \(3, 3\) matrix"),
        ({"horizon": 0.0}, "`horizon` must be a finite number of samples > 0"),
        ({"noise": -0.1}, "`noise` must be a finite standard deviation >= 0"),
        ({"noise_domains": ["x"]}, "`noise_domains` names unknown domain 'x'"),
        ({"eval_samples": 0}, "`eval_samples` must be an integer >= 1, got 0"),
    ],
)
def test_bad_simulator_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossSimulator(3, **kwargs)


def test_bad_simulation_settings_are_refused():
    with pytest.raises(ValueError, match="`steps` must be an integer >= 1, got 0"):
        simulate("uniform", steps=0)
    with pytest.raises(ValueError, match="`granularity` must be one of"):
        simulate("uniform", steps=1, granularity="token")
    with pytest.raises(ValueError, match=r"domain ids must be in \[0, 2\]"):
        LossSimulator(3).train(np.array([3]))


@pytest.mark.parametrize("name", default_policy_names())
def test_every_policy_runs_against_the_simulator(name):
    result = simulate(name, steps=300, seed=0)
    p = result.proportions
    assert np.isfinite(p).all() and (p >= 0).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)
    assert result.eval_loss[-1, 0] < result.eval_loss[0, 0]
