"""Constraints: validation, and the exact Euclidean projection against a brute-force active-set search."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from odm.policies.constraints import Constraints, project


def brute_force_projection(p: np.ndarray, lower: np.ndarray, upper: np.ndarray, budget: float) -> np.ndarray:
    """Tries every assignment of each domain to {floor, ceiling, free}; for the free ones the KKT point is
    ``p_i − λ`` with one shared ``λ``. The feasible candidate nearest ``p`` is the projection (the optimum is one
    of the candidates, and every candidate is feasible)."""
    best, best_dist = None, np.inf
    k = len(p)
    for assignment in itertools.product((0, 1, 2), repeat=k):
        x = [0.0] * k
        free = []
        fixed_total = 0.0
        for i, a in enumerate(assignment):
            if a == 0:
                x[i] = lower[i]
                fixed_total += lower[i]
            elif a == 1:
                x[i] = upper[i]
                fixed_total += upper[i]
            else:
                free.append(i)
        if free:
            lam = (sum(p[i] for i in free) - (budget - fixed_total)) / len(free)
            for i in free:
                x[i] = p[i] - lam
        elif abs(fixed_total - budget) > 1e-12:
            continue
        if all(lower[i] - 1e-12 <= x[i] <= upper[i] + 1e-12 for i in range(k)):
            dist = sum((x[i] - p[i]) ** 2 for i in range(k))
            if dist < best_dist:
                best, best_dist = x, dist
    assert best is not None
    return np.array(best)


def random_bounds(rng: np.random.Generator, k: int) -> tuple[np.ndarray, np.ndarray]:
    while True:
        lower = rng.uniform(0, 1.5 / k, k) * (rng.random(k) < 0.7)
        upper = np.minimum(np.where(rng.random(k) < 0.6, lower + rng.uniform(0, 2.0 / k, k), 1.0), 1.0)
        if lower.sum() <= 1 <= upper.sum():
            return lower, upper


@pytest.mark.parametrize("seed", range(40))
def test_projection_matches_the_brute_force_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 7))
    lower, upper = random_bounds(rng, k)
    p = rng.normal(0, 1, k) if seed % 2 else rng.dirichlet(np.ones(k))
    got = Constraints(lower, upper).project(p)
    np.testing.assert_allclose(got, brute_force_projection(p, lower, upper, 1.0), atol=1e-12)


@pytest.mark.parametrize("seed", range(10))
def test_projection_matches_scipy_on_larger_problems(seed: int) -> None:
    optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(100 + seed)
    k = 30
    lower, upper = random_bounds(rng, k)
    p = rng.dirichlet(np.ones(k) * 0.3)
    result = optimize.minimize(
        lambda x: 0.5 * np.sum((x - p) ** 2),
        np.clip(np.full(k, 1 / k), lower, upper),
        jac=lambda x: x - p,
        bounds=list(zip(lower, upper)),
        constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1.0, "jac": lambda x: np.ones(k)}],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 500},
    )
    got = project(p, lower, upper)
    np.testing.assert_allclose(got, result.x, atol=1e-7)
    assert 0.5 * np.sum((got - p) ** 2) <= result.fun + 1e-12


@pytest.mark.parametrize("seed", range(20))
def test_projection_is_feasible_idempotent_and_exact_on_feasible_input(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 200))
    lower, upper = random_bounds(rng, k)
    c = Constraints(lower, upper)
    x = c.project(rng.normal(0, 1, k))
    assert abs(x.sum() - 1) < 1e-12
    assert np.all(x >= lower - 1e-15) and np.all(x <= upper + 1e-15)
    np.testing.assert_allclose(c.project(x), x, atol=1e-15)


def test_frozen_domains_keep_their_value_and_the_rest_is_projected_onto_the_remainder() -> None:
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(6))
    c = Constraints(floors=0.05, ceilings={0: 0.3}, frozen={2: 0.2, 5: 0.1})
    x = c.project(p)
    assert x[2] == 0.2 and x[5] == 0.1
    free = [0, 1, 3, 4]
    ref = brute_force_projection(p[free], np.full(4, 0.05), np.array([0.3, 1, 1, 1]), 0.7)
    np.testing.assert_allclose(x[free], ref, atol=1e-12)
    np.testing.assert_allclose(c.floors, [0.05, 0.05, 0.2, 0.05, 0.05, 0.1])


def test_a_large_projection_is_vectorised_and_exact() -> None:
    rng = np.random.default_rng(1)
    k = 10_000
    p = rng.dirichlet(np.ones(k))
    x = Constraints(floors=0.5 / k, ceilings=5.0 / k).project(p)
    assert abs(x.sum() - 1) < 1e-10
    # KKT: the free coordinates all moved by the same shift
    free = (x > 0.5 / k) & (x < 5.0 / k)
    shifts = (p - x)[free]
    assert shifts.max() - shifts.min() < 1e-15


def test_constraints_from_domain_names() -> None:
    c = Constraints.for_domains(["web", "code", "math"], floors={"math": 0.2}, frozen={"web": 0.5})
    np.testing.assert_allclose(c.project([1.0, 0.0, 0.0]), [0.5, 0.25, 0.25])
    with pytest.raises(ValueError, match="unknown domain"):
        Constraints.for_domains(["web"], floors={"wbe": 0.1})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"floors": [0.6, 0.6]}, "infeasible constraints"),
        ({"ceilings": [0.2, 0.2, 0.2]}, "infeasible constraints"),
        ({"floors": [0.3, 0.1], "ceilings": [0.2, 1.0]}, "floors exceed ceilings for domain"),
        ({"floors": -0.1}, "must lie in"),
        ({"ceilings": {0: 1.5}}, "must lie in"),
        ({"frozen": {0: 0.7, 1: 0.6}, "num_domains": 3}, "frozen proportions sum"),
        ({"frozen": {0: 0.5, 1: 0.4}, "num_domains": 2}, "every domain is frozen"),
        ({"floors": [0.1, 0.1], "ceilings": [0.5, 0.5, 0.5]}, "inconsistent numbers of domains"),
        ({"floors": {5: 0.1}, "num_domains": 3}, "only 3 domains"),
        ({"frozen": [0.5, 0.5]}, "mapping"),
    ],
)
def test_bad_constraints_raise_a_clear_error_at_construction(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Constraints(**kwargs)


def test_scalar_bounds_are_checked_when_the_number_of_domains_is_known() -> None:
    c = Constraints(floors=0.3)
    with pytest.raises(ValueError, match="infeasible"):
        c.bind(4)
    assert Constraints(floors=0.3).project([0.2, 0.3, 0.5]).sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="entries"):
        Constraints(floors=[0.1, 0.1]).project([0.5, 0.3, 0.2])
