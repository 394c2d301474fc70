"""Aioli against a synthetic world whose held-out losses obey a known linear law ``L ← L − A·q + noise``."""

from __future__ import annotations

import bisect
import copy
import itertools

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

import odm
from odm.dataset import largest_remainder
from odm.policies import ADO, Aioli, DomainStats, DoReMi, SkillIt, get_policy
from odm.policies.aioli import aioli_normalize, aioli_unsmooth, probe_mixture
from odm.schedule import MODE_EXACT
from odm.simulate import LossSimulator, simulate


class LinearWorld:
    """A stand-in for mixer + model: publishes with a delay, draws batches, moves held-out losses linearly.

    Batch ``b`` is drawn under the newest row published with ``effective_from <= b``; update ``u`` (1-based)
    happens after batch ``u - 1`` and publishes a row effective from batch ``u + delay``. Rows flagged exact
    use largest-remainder counts; others multinomial draws. Each step the held-out loss moves by
    ``-A @ counts / batch`` plus Gaussian noise.
    """

    def __init__(self, a, *, batch=64, delay=0, noise=0.0, seed=0, loss0=10.0, transform=None):
        self.a = np.asarray(a, dtype=np.float64)
        self.k = self.a.shape[0]
        self.batch = batch
        self.delay = delay
        self.noise = noise
        self.rng = np.random.default_rng(seed)
        self.loss = np.full(self.k, loss0)
        self.rows: list[tuple[int, np.ndarray, bool]] = []
        self.updates = 0
        self.evals: list[int] = []
        self.drawn: list[np.ndarray] = []  # proportions each batch was drawn under
        self.transform = transform  # what the mixer does to published proportions (constraints)

    def run(self, policy, num_updates, *, skip_evals=()):
        if not self.rows:
            self.rows.append((0, policy.proportions, policy.exact_counts))
        for _ in range(num_updates):
            b = self.updates
            # The newest row with effective_from <= b (rows are appended in non-decreasing order).
            _, p, exact = self.rows[bisect.bisect_right(self.rows, b, key=lambda r: r[0]) - 1]
            counts = largest_remainder(p, self.batch) if exact else self.rng.multinomial(self.batch, p)
            counts = counts.astype(np.float64)
            self.drawn.append(p)
            self.loss = self.loss - self.a @ (counts / self.batch) + self.noise * self.rng.standard_normal(self.k)
            self.updates += 1
            u = self.updates
            ev = None
            if policy.wants_eval(u) and u not in skip_evals:
                ev = self.loss.copy()
                self.evals.append(u)
            stats = DomainStats(
                loss_sum=counts * 2.0, count=counts, proportions=p, step=u, num_samples=u * self.batch, eval_loss=ev
            )
            policy.update(stats)
            p = policy.proportions if self.transform is None else self.transform(policy.proportions)
            self.rows.append((u + self.delay, p, policy.exact_counts))
        return policy


def _true_a(k, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 0.02, size=(k, k)) + np.diag(rng.uniform(0.02, 0.05, size=k))


def test_probe_mixture_puts_the_probe_weight_on_its_domain_and_spreads_the_rest():
    np.testing.assert_allclose(probe_mixture(1, 3, 0.6), [0.2, 0.6, 0.2])
    np.testing.assert_allclose(probe_mixture(0, 1, 0.6), [1.0])


def test_unsmooth_inverts_the_mixing_of_the_probes():
    rng = np.random.default_rng(1)
    a = rng.uniform(size=(4, 4))
    w = np.stack([probe_mixture(j, 4, 0.7) for j in range(4)])
    np.testing.assert_allclose(aioli_unsmooth(a @ w.T, w), a)
    np.testing.assert_allclose(aioli_unsmooth(a, np.eye(4)), a)  # f = 1: A = D


def test_normalize_shifts_a_negative_minimum_and_divides_by_the_total():
    a = np.array([[1.0, -1.0], [2.0, 0.0]])
    np.testing.assert_allclose(aioli_normalize(a), np.array([[2.0, 0.0], [3.0, 1.0]]) / 6.0)
    np.testing.assert_allclose(aioli_normalize(np.zeros((2, 2))), np.zeros((2, 2)))


@pytest.mark.parametrize("delay", [0, 1, 3, 6])
@pytest.mark.parametrize("probe_weight", [1.0, 0.625])
def test_noise_free_linear_law_is_recovered_exactly_for_any_publish_delay(delay, probe_weight):
    a = _true_a(3)
    policy = Aioli(round_steps=60, sweeps=2, probe_steps=4, probe_weight=probe_weight).bind(3)
    LinearWorld(a, batch=24, delay=delay).run(policy, 61)
    assert policy.estimate is not None
    np.testing.assert_allclose(policy.estimate, a / a.sum(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("delay", [0, 2, 5, 13])
def test_probes_are_pipelined_so_each_probe_is_exactly_s_batches_under_its_mixture_once_the_delay_is_learned(delay):
    k, r, s, u = 3, 2, 3, 60
    policy = Aioli(round_steps=u, sweeps=r, probe_steps=s).bind(k)
    world = LinearWorld(_true_a(k), delay=delay)
    world.run(policy, 1 + 4 * u)
    assert policy.lag == delay
    evals = world.evals
    # Round i (i >= 1) opens with the evaluation of update 1 + u·i; no evaluation is wasted.
    per_round = [[e for e in evals if 1 + u * i <= e < 1 + u * (i + 1)] for i in range(4)]
    assert [len(x) for x in per_round[1:]] == [r * k + 1] * 3
    for i in (1, 2, 3):
        # From the second round on, the batches between two evaluations are exactly one probe: s batches, all
        # drawn under the probed mixture with exact counts, and they follow each other without a gap.
        assert np.diff(per_round[i]).tolist() == [s] * (r * k)
        order = policy._order_of(i + 1)
        for n, (lo, hi) in enumerate(itertools.pairwise(per_round[i])):
            expected = probe_mixture(int(order[n]), k, policy.probe_weight)
            assert all(np.allclose(world.drawn[b], expected) for b in range(lo, hi))


@pytest.mark.parametrize("delay", [0, 2, 5])
def test_a_publish_delay_given_by_the_mixer_pipelines_the_probes_from_the_first_round(delay):
    """With ``set_publish_delay`` no mixture change has to be seen first: after the first probe (which also
    holds the ``delay`` batches already in flight when the round opened) every probe of the first round is
    exactly s batches under its mixture, back to back, and the solve is exact."""
    k, r, s, u = 3, 2, 3, 60
    given = Aioli(round_steps=u, sweeps=r, probe_steps=s).bind(k)
    given.set_publish_delay(delay)
    assert given.lag == delay
    world = LinearWorld(_true_a(k), delay=delay)
    world.run(given, 1 + u)
    first_round = [e for e in world.evals if e < 1 + u]
    assert np.diff(first_round).tolist() == [s + delay] + [s] * (r * k - 1)
    order = given._order_of(1)
    for n, (lo, hi) in enumerate(itertools.pairwise(first_round)):
        expected = probe_mixture(int(order[n]), k, given.probe_weight)
        assert all(np.allclose(world.drawn[b], expected) for b in range(max(lo, 1 + delay), hi))
    np.testing.assert_allclose(given.estimate, _true_a(k) / _true_a(k).sum(), rtol=1e-9)
    assert given.lag == delay  # never re-learned
    with pytest.raises(ValueError, match="`delay`"):
        given.set_publish_delay(-1)


def test_round_one_update_from_uniform_is_softmax_of_eta_times_column_sums():
    a = _true_a(3, seed=4)
    policy = Aioli(round_steps=30, sweeps=1, probe_steps=2, probe_weight=1.0, eta=0.5).bind(3)
    LinearWorld(a, batch=30).run(policy, 8)
    assert policy.phase == "main"
    expected = np.exp(0.5 * (a / a.sum()).sum(axis=0))
    np.testing.assert_allclose(policy.proportions, expected / expected.sum(), rtol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noisy_estimate_converges_to_the_true_a_and_proportions_favour_the_helpful_domain(seed):
    k = 3
    a = np.full((k, k), 0.01) + np.diag([0.02, 0.02, 0.02])
    a[:, 2] += 0.03  # training on domain 2 lowers every held-out loss most
    policy = Aioli(round_steps=60, sweeps=4, probe_steps=4, ema=0.9, eta=2.0, seed=seed).bind(k)
    world = LinearWorld(a, batch=32, delay=2, noise=0.002, seed=seed)
    world.run(policy, 1 + 60 * 5)
    early = np.abs(policy.ema_estimate / policy.ema_estimate.sum() - a / a.sum()).max()
    world.run(policy, 60 * 55)
    late = np.abs(policy.ema_estimate / policy.ema_estimate.sum() - a / a.sum()).max()
    assert late < 0.02 and late < early
    p = policy.main_proportions
    assert p.argmax() == 2 and p[2] > 1.0 / k + 0.05


def test_realised_mixture_solve_beats_the_nominal_one_when_counts_round_badly():
    k, batch = 20, 16  # f = 0.5: 8 samples on the probed domain, the other 8 spread over 19 domains
    a = _true_a(k, seed=7)
    errors = {}
    for mode in ("realised", "nominal"):
        policy = Aioli(round_steps=k * 2, sweeps=1, probe_steps=2, probe_weight=0.5, unsmooth=mode).bind(k)
        LinearWorld(a, batch=batch, noise=1e-5, seed=3).run(policy, 1 + k * 2)
        assert policy.estimate is not None
        errors[mode] = np.abs(policy.estimate - a / a.sum()).max()
    assert errors["realised"] < 0.2 * errors["nominal"]


@pytest.mark.parametrize("delay", [0, 4])
def test_when_the_mixer_alters_the_probe_mixtures_probes_count_by_time_and_the_solve_stays_exact(delay):
    a = _true_a(3, seed=6)
    policy = Aioli(round_steps=60, sweeps=2, probe_steps=3, probe_weight=0.8).bind(3)
    world = LinearWorld(a, batch=30, delay=delay, transform=lambda p: 0.7 * p + 0.1)  # e.g. a floor of 0.1
    with pytest.warns(RuntimeWarning, match="counted by time"):
        world.run(policy, 1 + 3 * 60)
    assert len(world.evals) >= 3 * (2 * 3 + 1) - 1 and policy.lag == delay
    np.testing.assert_allclose(policy.estimate, a / a.sum(), rtol=1e-9)


def test_a_missing_probe_evaluation_extends_the_probe_and_the_solve_still_recovers_a():
    a = _true_a(3, seed=2)
    policy = Aioli(round_steps=40, sweeps=1, probe_steps=3).bind(3)
    world = LinearWorld(a, batch=24)
    with pytest.warns(RuntimeWarning, match="continues until one comes"):
        world.run(policy, 41, skip_evals={4, 5})
    np.testing.assert_allclose(policy.estimate, a / a.sum(), rtol=1e-9)


def test_restricted_setting_samples_the_prior_then_restarts_from_the_chosen_base():
    a = _true_a(2, seed=5)
    prior = np.array([0.8, 0.2])
    results = {}
    for start in ("uniform", "prior"):
        policy = Aioli(round_steps=20, sweeps=1, probe_steps=2, prior=prior, prior_steps=10, start_from=start)
        world = LinearWorld(a, batch=20)
        world.run(policy, 9)
        assert world.evals == [] and np.allclose(policy.proportions, prior)
        world.run(policy, 1)
        assert world.evals == [10] and policy.phase == "probe"
        world.run(policy, 4)
        assert policy.phase == "main"
        base = prior if start == "prior" else np.full(2, 0.5)
        expected = base * np.exp(0.2 * (a / a.sum()).sum(axis=0))
        np.testing.assert_allclose(policy.proportions, expected / expected.sum(), rtol=1e-12)
        results[start] = policy.proportions
    assert not np.allclose(results["uniform"], results["prior"])


def test_probe_phases_ask_for_exact_counts_and_the_main_phase_does_not():
    policy = Aioli(round_steps=20, sweeps=1, probe_steps=2).bind(2)
    assert not policy.exact_counts
    world = LinearWorld(_true_a(2))
    world.run(policy, 1)
    assert policy.exact_counts and policy.phase == "probe"
    world.run(policy, 4)
    assert not policy.exact_counts and policy.phase == "main"


@pytest.mark.parametrize("ema", [None, 0.5])
def test_invariants_simplex_determinism_and_a_state_round_trip_continue_the_same_trajectory(ema):
    a = _true_a(4, seed=3)

    def fresh():
        return Aioli(round_steps=40, sweeps=2, probe_steps=2, ema=ema, seed=5).bind(4)

    p1, w1 = fresh(), LinearWorld(a, delay=2, noise=0.003, seed=9)
    w1.run(p1, 44)  # stop in the middle of a probe of round 2
    assert p1.phase == "probe"
    saved, world_state = p1.state_dict(), copy.deepcopy(w1)
    w1.run(p1, 100)
    p2 = Aioli(round_steps=40, sweeps=2, probe_steps=2, ema=ema, seed=5)
    p2.load_state_dict(copy.deepcopy(saved))
    world_state.run(p2, 100)
    np.testing.assert_array_equal(p1.proportions, p2.proportions)
    assert p1.state_dict()["state"] == p2.state_dict()["state"]
    p3, w3 = fresh(), LinearWorld(a, delay=2, noise=0.003, seed=9)
    w3.run(p3, 144)
    np.testing.assert_array_equal(p1.proportions, p3.proportions)
    for p in (p1.proportions, p3.proportions):
        assert np.all(np.isfinite(p)) and np.all(p >= 0) and abs(p.sum() - 1) < 1e-12


def test_non_finite_inputs_never_corrupt_the_state():
    policy = Aioli(round_steps=20, sweeps=1, probe_steps=2).bind(2)
    before = policy.state_dict()
    bad = DomainStats(np.array([1.0, 1.0]), np.array([1.0, np.nan]), np.array([0.5, 0.5]), step=1)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        policy.update(bad)
    nan_eval = DomainStats(np.ones(2), np.ones(2), np.array([0.5, 0.5]), step=1, eval_loss=np.array([np.nan, 1.0]))
    with pytest.warns(RuntimeWarning, match="non-finite held-out"):
        policy.update(nan_eval)
    after = policy.state_dict()
    assert after["state"]["phase"] == before["state"]["phase"] == "await_eval"
    np.testing.assert_array_equal(after["proportions"], before["proportions"])


def test_bad_configuration_raises_a_clear_error():
    with pytest.raises(ValueError, match="round_steps.*sweeps·K·probe_steps"):
        Aioli(round_steps=10, sweeps=2, probe_steps=2).bind(3)
    with pytest.raises(ValueError, match="equals 1/K"):
        Aioli(round_steps=100, probe_weight=0.5).bind(2)
    with pytest.raises(ValueError, match="probe_weight"):
        Aioli(probe_weight=1.5)
    with pytest.raises(ValueError, match="ema"):
        Aioli(ema=1.0)
    with pytest.raises(ValueError, match="start_from"):
        Aioli(start_from="middle")
    with pytest.raises(ValueError, match="3 domains"):
        Aioli(round_steps=100, sweeps=1, probe_steps=1, prior=[1, 1, 1]).bind(2)
    with pytest.raises(ValueError, match="eta"):
        Aioli(eta=0)


def test_aioli_is_registered_by_name():
    policy = get_policy("aioli", round_steps=100, sweeps=1)
    assert isinstance(policy, Aioli) and policy.name == "aioli"


@pytest.mark.slow
def test_through_a_mixture_loader_with_prefetching_workers_probes_are_exact_and_a_is_recovered():
    k, batch = 3, 12
    a = _true_a(k, seed=11)
    train = {f"d{i}": [{"x": torch.tensor([float(j)])} for j in range(64)] for i in range(k)}
    policy = Aioli(round_steps=40, sweeps=2, probe_steps=3, probe_weight=0.5)
    loader = odm.MixtureLoader(train, batch_size=batch, policy=policy, num_workers=2, seed=0)
    mixer = loader.mixer
    assert mixer.delay > 0
    loss, exact_batches = np.full(k, 10.0), 0
    for step, b in enumerate(loader, start=1):  # a training loop whose held-out losses obey the linear law
        counts = np.bincount(b["domain"].numpy(), minlength=k)
        p, mode, _ = mixer.schedule.lookup(int(b["mix_step"]))
        if mode == MODE_EXACT:
            exact_batches += 1
            np.testing.assert_array_equal(counts, largest_remainder(p, batch))
        loss = loss - a @ (counts / batch)
        mixer.observe(b, torch.ones(batch))
        if mixer.wants_eval():
            mixer.observe_eval(loss.copy(), np.ones(k))
        mixer.step()
        if step == 1 + 2 * 40:
            break
    assert exact_batches >= 2 * 2 * k * 3
    assert policy.lag == mixer.delay
    np.testing.assert_allclose(policy.estimate, a / a.sum(), rtol=1e-9)


def test_through_a_standalone_online_mixer_a_round_costs_rk_plus_one_evaluations():
    policy = Aioli(round_steps=50, sweeps=2, probe_steps=3)
    result = simulate(policy, steps=500, simulator=LossSimulator.demo(), seed=0)
    assert result.num_evals == 10 * (2 * 4 + 1)
    assert result.mixer.policy.lag == 0
    p = result.proportions
    assert np.all(np.isfinite(p)) and np.allclose(p.sum(axis=1), 1.0)


# -- a real Lightning Trainer fit, for each estimator policy -------------------------------------------------
class _Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def sample_losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (self.net(x).squeeze(-1) - y).pow(2)

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        losses = self.sample_losses(batch["x"], batch["y"])
        return {"loss": losses.mean(), "sample_losses": losses}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _regression_domains(n: int = 256) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, generator=g)
    train, held = {}, {}
    for k, name in enumerate(["linear", "sine", "noise"]):
        x = torch.randn(n + 32, 8, generator=g)
        y = [x @ w, torch.sin(2 * (x @ w)), 2 * torch.randn(n + 32, generator=g)][k]
        train[name] = [{"x": x[i], "y": y[i]} for i in range(n)]
        held[name] = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[n:], y[n:]), batch_size=16)
    return train, held


@pytest.mark.slow
@pytest.mark.parametrize("name", ["aioli", "ado", "doremi", "skillit"])
def test_each_estimator_policy_drives_a_real_lightning_trainer_fit_on_cpu(tmp_path, name):
    from odm.callbacks import OnlineMixing

    policy = {
        "aioli": Aioli(round_steps=12, sweeps=1, probe_steps=2),
        "ado": ADO(start_step=20, update_interval=10, bin_size=1, smoothing=3),
        "doremi": DoReMi(reference=[0.1, 0.1, 1.0]),
        "skillit": SkillIt(eval_every=5),
    }[name]
    train, held = _regression_domains()
    loader = odm.MixtureLoader(train, batch_size=16, policy=policy, seed=0)
    callback = OnlineMixing(loader, eval_loaders=held, eval_fn=lambda module, batch: module.sample_losses(*batch))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=40,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(_Regressor(), train_dataloaders=loader)
    p = loader.mixer.proportions
    assert np.all(np.isfinite(p)) and abs(p.sum() - 1) < 1e-12
    assert len(loader.mixer.history) > 1 and not np.allclose(p, 1 / 3)  # the policy moved
    if name == "aioli":
        assert policy.estimate is not None and np.all(np.isfinite(policy.estimate)) and policy.lag > 0
    if name == "ado":
        assert np.all(np.isfinite(policy.params))


@pytest.mark.parametrize("seed", range(12))
def test_proportions_stay_finite_and_on_the_simplex_over_random_worlds(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 6))
    a = rng.normal(0.0, 0.05, size=(k, k)) * 10.0 ** rng.uniform(-3, 3)  # any sign, any scale
    policy = Aioli(
        round_steps=k * 4 + int(rng.integers(0, 10)),
        sweeps=2,
        probe_steps=2,
        ema=None if seed % 2 else 0.5,
        normalize=bool(seed % 3),
        eta=float(rng.uniform(0.1, 5.0)),
        seed=seed,
    ).bind(k)
    world = LinearWorld(a, batch=int(rng.integers(1, 40)), delay=int(rng.integers(0, 5)), noise=0.01, seed=seed)
    for _ in range(20):
        world.run(policy, 10)
        for p in (policy.proportions, policy.main_proportions):
            assert np.all(np.isfinite(p)) and np.all(p >= 0) and abs(p.sum() - 1) < 1e-9


@pytest.mark.parametrize(("delay", "update_every"), [(6, 4), (5, 4), (8, 4), (3, 2), (6, 1), (0, 4)])
def test_the_delay_the_mixer_tells_aioli_is_the_one_aioli_learns_from_the_drawn_mixtures(delay, update_every):
    """Through a real mixer: told (set_publish_delay) and learned (first update drawn wholly under a new
    mixture) agree, including when the delay in batches is not a multiple of update_every (rounded up)."""
    lags = []
    for tell in (False, True):
        policy = Aioli(round_steps=40, sweeps=1, probe_steps=2, prior_steps=2)
        if not tell:
            policy.set_publish_delay = lambda d: None  # type: ignore[method-assign]
        mixer = odm.OnlineMixer(["a", "b", "c"], policy, delay=delay, update_every=update_every)
        for b in range(240):
            p = mixer.schedule.lookup(b)[0]
            ids = np.repeat(np.arange(3), np.round(np.asarray(p) * 30).astype(int))
            mixer.observe(ids, np.ones(len(ids)), mix_step=b)
            if mixer.wants_eval():
                mixer.observe_eval(np.full(3, 10.0 - 0.01 * b), np.ones(3))
            mixer.step()
        lags.append(policy._lag)
    assert lags[0] == lags[1] == -(-delay // update_every)
