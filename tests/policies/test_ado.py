"""ADO: the scaling-law fit against synthetic power-law curves, the sampling rule against a hand-checked case."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from odm.policies import ADO, DomainStats, get_policy
from odm.policies.ado import apply_floor
from odm.policies.scaling_law import fit_power_law, power_law, savgol_smooth
from odm.simulate import LossSimulator, simulate


def _curves(k, seed, n):
    rng = np.random.default_rng(seed)
    true = np.stack([rng.uniform(1, 4, k), rng.uniform(0, 1.2, k), rng.uniform(0.2, 0.7, k)], axis=1)
    return true, power_law(true[:, None, :], n[None, :])


def _huber_objective(params, n, loss, delta=1e-3):
    r = np.log(power_law(params[:, None, :], n[None, :])) - np.log(loss)
    ar = np.abs(r)
    return np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta)).sum(axis=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_recovers_the_parameters_of_noise_free_power_law_curves(seed):
    n = np.linspace(1e4, 1e7, 500)
    true, loss = _curves(6, seed, n)
    params, ok = fit_power_law(n, loss)
    assert ok.all()
    np.testing.assert_allclose(params, true, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_fit_of_noisy_curves_is_close_and_at_least_as_good_as_the_true_parameters(seed):
    n = np.geomspace(1e3, 1e7, 400)
    true, loss = _curves(8, seed, n)
    noisy = loss * np.exp(0.001 * np.random.default_rng(seed + 10).standard_normal(loss.shape))
    params, ok = fit_power_law(n, noisy)
    assert ok.all()
    assert np.all(_huber_objective(params, n, noisy) <= _huber_objective(true, n, noisy) * (1 + 1e-6))
    assert np.abs(params[:, 2] - true[:, 2]).max() < 0.02
    assert np.abs(power_law(params[:, None, :], n) / loss - 1).max() < 2e-3


def test_fit_is_robust_to_loss_spikes():
    n = np.linspace(1e4, 1e6, 300)
    true, loss = _curves(3, 5, n)
    spiky = loss.copy()
    spiky[:, ::37] *= 3.0  # a few large outliers
    params, ok = fit_power_law(n, spiky)
    assert ok.all()
    np.testing.assert_allclose(params, true, atol=0.02)
    np.testing.assert_allclose(power_law(params[:, None, :], n), loss, rtol=2e-3)


def test_fit_keeps_the_exponent_within_its_bounds_and_rejects_unusable_rows():
    n = np.linspace(1e2, 1e5, 200)
    steep = power_law(np.array([4.0, 0.1, 1.3]), n)  # true α beyond the 0.8 bound
    flat = np.full(200, 2.0)
    nan_row = np.full(200, np.nan)
    two_points = np.full(200, np.nan)
    two_points[:2] = 3.0
    params, ok = fit_power_law(n, np.stack([steep, flat, nan_row, two_points]))
    assert ok.tolist() == [True, True, False, False]
    assert 0.0 <= params[0, 2] <= 0.8 and 0.0 <= params[1, 2] <= 0.8
    np.testing.assert_allclose(power_law(params[1], n), 2.0, rtol=1e-6)


def test_savgol_smoothing_reproduces_cubics_exactly_and_reduces_noise():
    t = np.linspace(-1, 1, 50)
    cubic = np.stack([1 + 2 * t - t**2 + 0.5 * t**3, t**3])
    np.testing.assert_allclose(savgol_smooth(cubic, 11), cubic, atol=1e-10)
    noise = np.random.default_rng(0).standard_normal((1, 500))
    assert savgol_smooth(noise, 21).std() < 0.6 * noise.std()
    np.testing.assert_array_equal(savgol_smooth(cubic[:, :3], 11), cubic[:, :3])  # too short: unchanged


def _slow_floor(p, floor):
    """Raises the smallest entries to the floor one at a time, rescaling the rest (the obvious algorithm)."""
    p = [float(x) for x in p]
    fixed = [False] * len(p)
    while True:
        free = sum(x for x, f in zip(p, fixed) if not f)
        budget = 1.0 - floor * sum(fixed)
        q = [floor if f else x * budget / free for x, f in zip(p, fixed)]
        low = [i for i, x in enumerate(q) if not fixed[i] and x < floor]
        if not low:
            return np.array(q)
        fixed[min(low, key=lambda i: q[i])] = True


@pytest.mark.parametrize("seed", range(5))
def test_floor_matches_a_slow_reference_and_keeps_every_entry_above_it(seed):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(12, 0.3))
    out = apply_floor(p, 0.03)
    np.testing.assert_allclose(out, _slow_floor(p, 0.03), rtol=1e-12)
    assert out.min() >= 0.03 - 1e-15 and abs(out.sum() - 1) < 1e-12
    smaller = p[:, None] < p[None, :]
    assert np.all((out[:, None] <= out[None, :] + 1e-15) | ~smaller)  # order kept (ties among floored)


def test_sampling_distribution_follows_the_spec_formula_on_a_hand_checked_case():
    policy = ADO(start_step=10**9).bind(3)  # never fits: the parameters are set by hand below
    state = policy.state_dict()
    params = [[1.0, 0.0, 0.5], [2.0, 0.5, 0.02], [-3.0, 0.2, 0.3]]
    state["state"].update(
        params=params,
        fitted=[True, True, True],
        h=[0.5, 0.3, 0.2],
        pi_bar=[0.4, 0.3, 0.3],
        updates=9,
        n=9000.0,
    )
    policy.load_state_dict(state)
    policy.update(DomainStats(np.array([10.0, 0.0, 5.0]), np.array([600.0, 0.0, 400.0]), np.ones(3) / 3, step=10))
    # By hand: n = 10000; h = 0.9·h + 0.1·(0.6, 0, 0.4) = (0.51, 0.27, 0.22).
    n, h, mu = 10000.0, [0.51, 0.27, 0.22], [1 / 3] * 3
    v = [max(a_, 0.05) * math.exp(a) * n**-a_ / n for a, _, a_ in params]  # (L̂ − e^E) = e^a·n^−α
    score = [m * math.sqrt(hh) * vv for m, hh, vv in zip(mu, h, v)]
    rho = [s / sum(score) for s in score]
    # rho ≈ (0.0455, 0.9496, 0.0049): domain 2 is below the 0.01 floor, lifted; the others share 0.99.
    assert rho[2] < 0.01
    free = rho[0] + rho[1]
    rho = [rho[0] * 0.99 / free, rho[1] * 0.99 / free, 0.01]
    expected = [0.9 * pb + 0.1 * r for pb, r in zip([0.4, 0.3, 0.3], rho)]  # the authors' order: the old mean
    pi_bar = [pb + (r - pb) / 11 for pb, r in zip([0.4, 0.3, 0.3], rho)]  # then the mean takes ρ in
    np.testing.assert_allclose(policy.credit_share, h, rtol=1e-12)
    np.testing.assert_allclose(policy.score, rho, rtol=1e-12)
    np.testing.assert_allclose(policy.proportions, expected, rtol=1e-12)
    np.testing.assert_allclose(policy.state_dict()["state"]["pi_bar"], pi_bar, rtol=1e-12)


def _simulate(policy, true, num_updates, *, batch=64, noise=0.005, seed=0):
    """Each domain's per-sample loss follows its own power law in the run's total samples ``n``."""
    rng = np.random.default_rng(seed)
    n = 0
    for t in range(1, num_updates + 1):
        p = policy.proportions
        counts = rng.multinomial(batch, p).astype(np.float64)
        n += batch
        mean = power_law(true, n) * np.exp(noise * rng.standard_normal(len(p)))
        policy.update(DomainStats(mean * counts, counts, p, step=t, num_samples=n))
    return policy


@pytest.mark.slow
def test_policy_recovers_the_curves_it_is_trained_on_and_favours_the_fastest_learner():
    true = np.array([[1.0, 0.5, 0.3], [3.0, 0.3, 0.4], [0.5, 1.0, 0.2]])
    policy = _simulate(ADO(start_step=500, update_interval=500, fit_penalties=False).bind(3), true, 3000)
    n = np.array([1e4, 1e5, 64 * 3000])
    fitted = power_law(policy.params[:, None, :], n)
    np.testing.assert_allclose(fitted, power_law(true[:, None, :], n), rtol=0.01)
    assert np.abs(policy.params[:, 2] - true[:, 2]).max() < 0.1
    speed = true[:, 2] * np.exp(true[:, 0]) * n[-1] ** -true[:, 2]  # −n·dL/dn at the end of the run
    assert speed.argmax() == 1 and policy.proportions.argmax() == 1


def test_fits_run_every_update_interval_from_the_start_step():
    true = np.array([[1.0, 0.5, 0.3], [2.0, 0.3, 0.5]])
    policy = ADO(start_step=200, update_interval=100, bin_size=5)
    policy.bind(2)
    _simulate(policy, true, 199)
    assert np.isnan(policy.params).all() and np.allclose(policy.proportions, 0.5)
    _simulate(policy, true, 1, seed=1)
    first = policy.params
    assert np.isfinite(first).all()
    _simulate(policy, true, 99, seed=2)
    np.testing.assert_array_equal(policy.params, first)
    _simulate(policy, true, 1, seed=3)
    assert not np.array_equal(policy.params, first)


def test_history_stays_bounded_and_merging_keeps_the_sums_exact():
    policy = ADO(start_step=10**9, bin_size=1, max_points=8).bind(2)
    rng = np.random.default_rng(0)
    total = np.zeros(2)
    for t in range(1, 101):
        counts = rng.integers(0, 5, size=2).astype(np.float64) + 1
        total += counts * 2.0
        policy.update(DomainStats(counts * 2.0, counts, np.ones(2) / 2, step=t))
    n, loss = policy.history()
    assert len(n) <= 8 and np.all(np.diff(n) > 0)
    np.testing.assert_allclose(loss, 2.0)
    hist = np.array(policy.state_dict()["state"]["hist"])
    bin_ = np.array(policy.state_dict()["state"]["bin"])
    np.testing.assert_allclose(hist[:, :2].sum(0) + bin_[:2], total)


@pytest.mark.parametrize("credit", ["sqrt", "sqrt_var"])
def test_invariants_simplex_floor_determinism_and_state_round_trip(credit):
    true = np.array([[1.0, 0.5, 0.3], [2.0, 0.3, 0.5], [0.2, 0.8, 0.1], [1.5, 0.0, 0.6]])

    def fresh():
        return ADO(start_step=100, update_interval=50, credit=credit).bind(4)

    a = _simulate(fresh(), true, 260)
    saved = copy.deepcopy(a.state_dict())
    _simulate(a, true, 140, seed=7)
    b = fresh()
    b.load_state_dict(saved)
    _simulate(b, true, 140, seed=7)
    np.testing.assert_array_equal(a.proportions, b.proportions)
    np.testing.assert_array_equal(a.params, b.params)
    c = _simulate(fresh(), true, 260)
    _simulate(c, true, 140, seed=7)
    np.testing.assert_array_equal(a.proportions, c.proportions)
    p = a.proportions
    assert np.all(np.isfinite(p)) and abs(p.sum() - 1) < 1e-12 and p.min() >= 0.01 - 1e-12


def test_non_finite_losses_are_skipped_with_a_warning_and_leave_the_state_unchanged():
    policy = ADO(start_step=10, update_interval=10).bind(2)
    before = policy.state_dict()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        policy.update(DomainStats(np.array([np.inf, 1.0]), np.ones(2), np.ones(2) / 2, step=1))
    np.testing.assert_equal(policy.state_dict()["state"], before["state"])


def test_bad_configuration_raises_a_clear_error():
    with pytest.raises(ValueError, match="floor"):
        ADO(floor=0.2).bind(6)
    with pytest.raises(ValueError, match="update_interval"):
        ADO(update_interval=0)
    with pytest.raises(ValueError, match="credit"):
        ADO(credit="sqrt_h")
    with pytest.raises(ValueError, match="smoothing"):
        ADO(smoothing=10)
    with pytest.raises(ValueError, match="prior"):
        ADO(prior=[1.0, -1.0])


def test_ado_is_registered_by_name():
    assert isinstance(get_policy("ado"), ADO)


def test_through_a_standalone_online_mixer_ado_fits_every_domain_and_starves_the_unlearnable_one():
    result = simulate(ADO(start_step=200, update_interval=100), steps=1500, simulator=LossSimulator.demo(), seed=0)
    policy = result.mixer.policy
    assert np.all(np.isfinite(policy.params))
    p = result.proportions[-1]
    assert result.domains[int(p.argmin())] == "noise"  # its loss never falls: no learning speed
    assert abs(p.sum() - 1) < 1e-12 and p.min() >= 0.01


@pytest.mark.parametrize("seed", range(12))
def test_proportions_respect_the_floor_under_extreme_random_losses(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 9))
    policy = ADO(start_step=20, update_interval=10, bin_size=2).bind(k)
    for t in range(1, 121):
        counts = rng.multinomial(int(rng.integers(1, 50)), policy.proportions).astype(np.float64)
        losses = 10.0 ** rng.uniform(-8, 8, size=k)
        policy.update(DomainStats(losses * counts, counts, policy.proportions, step=t))
        p = policy.proportions
        assert np.all(np.isfinite(p)) and abs(p.sum() - 1) < 1e-12 and p.min() >= 0.01 - 1e-12
