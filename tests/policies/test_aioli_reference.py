"""Aioli step by step against a slow reference that runs the paper's round as a plain procedural loop.

The reference drives its own copy of a linear world (same seed, same draws) with no policy object: evaluate,
LearnParams (probe batches with largest-remainder counts whose spare samples go to the off-target domains in a
rotated order), un-smooth with the realised mixtures, normalise, exponentiated-gradient or EMA update, train the
rest of the round. The policy, fed the same world through ``update``/``wants_eval`` with no publish delay, must
draw every batch under the same mixture and end every round at the same proportions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from odm.policies import Aioli, DomainStats


def probe_counts(j: int, k: int, f: float, batch: int, rotation: int) -> list[int]:
    """Largest-remainder counts of probe ``j``: floors first, then one spare sample each to the largest
    remainders, ties among the off-target domains broken in the order rotated by ``rotation``."""
    m = [f if i == j else (1 - f) / (k - 1) for i in range(k)]
    exact = [x * batch for x in m]
    counts = [math.floor(x + 1e-9) for x in exact]
    off = [i for i in range(k) if i != j]
    priority = {off[(rotation + r) % (k - 1)]: r for r in range(k - 1)}
    priority[j] = -1 if (exact[j] - counts[j]) > 0 else k  # any order: only ties among off-targets matter
    spare = batch - sum(counts)
    ranked = sorted(range(k), key=lambda i: (-round(exact[i] - counts[i], 9), priority[i]))
    for i in ranked[:spare]:
        counts[i] += 1
    return counts


def reference_run(a, *, k, batch, rounds, u, r, s, f, eta, ema, seed, noise, world_seed):
    """Returns (mixtures each batch was drawn under, main proportions after each round)."""
    rng = np.random.default_rng(world_seed)
    a = np.asarray(a)
    loss = np.full(k, 10.0)
    drawn, finals = [], []
    p = [1.0 / k] * k

    def train(counts, mixture):
        nonlocal loss
        drawn.append(mixture)
        loss = loss - a @ (np.asarray(counts, dtype=np.float64) / batch) + noise * rng.standard_normal(k)

    def train_sampled(mixture):
        train(rng.multinomial(batch, mixture), mixture)

    train_sampled(p)  # batch 0, before the first evaluation
    log_w = [0.0] * k
    e_mat = None
    stride = max(1, -(-(k - 1) // s))
    for rnd in range(1, rounds + 1):
        l_prev = loss.copy()
        order_rng = np.random.default_rng([seed, rnd])
        order = [int(x) for _ in range(r) for x in order_rng.permutation(k)]
        d = [[0.0] * k for _ in range(k)]
        w = [[0.0] * k for _ in range(k)]
        for idx, j in enumerate(order):
            sweep = idx // k
            acc = [0.0] * k
            for c in range(s):
                counts = probe_counts(j, k, f, batch, (c + s * sweep) * stride)
                train(counts, None)
                acc = [x + y / batch for x, y in zip(acc, counts)]
            for i in range(k):
                d[i][j] += l_prev[i] - loss[i]
            w[j] = [x + y / s for x, y in zip(w[j], acc)]
            l_prev = loss.copy()
        d_avg = np.array(d) / r
        w_avg = np.array(w) / r
        a_hat = np.linalg.solve(w_avg, d_avg.T).T
        lo = a_hat.min()
        if lo < 0:
            a_hat = a_hat - lo
        a_hat = a_hat / a_hat.sum()
        col = [sum(a_hat[i][j] for i in range(k)) for j in range(k)]
        if ema is None:
            log_w = [lw + eta * cj for lw, cj in zip(log_w, col)]
            logits = log_w
        else:
            e_mat = a_hat.copy() if e_mat is None else (1 - ema) * a_hat + ema * e_mat
            logits = [eta * sum(e_mat[i][j] for i in range(k)) for j in range(k)]
        top = max(logits)
        z = [math.exp(x - top) for x in logits]
        p = [x / sum(z) for x in z]
        finals.append(p)
        for _ in range(u - r * k * s):
            train_sampled(np.array(p))
    return drawn, finals


def policy_run(a, *, k, batch, rounds, u, r, s, f, eta, ema, seed, noise, world_seed):
    rng = np.random.default_rng(world_seed)
    a = np.asarray(a)
    loss = np.full(k, 10.0)
    policy = Aioli(round_steps=u, sweeps=r, probe_steps=s, probe_weight=f, eta=eta, ema=ema, seed=seed).bind(k)
    drawn, finals, exact_flags = [], [], []
    for t in range(1, 1 + rounds * u + 1):
        p = policy.proportions
        exact = policy.exact_counts
        if exact:
            exact_p = p
            counts = np.floor(exact_p * batch + 1e-12).astype(np.int64)
            spare = batch - counts.sum()
            counts[np.argsort(-(exact_p * batch - counts), kind="stable")[:spare]] += 1
        else:
            counts = rng.multinomial(batch, p)
        drawn.append(None if exact else p)
        exact_flags.append(counts)
        loss = loss - a @ (counts / batch) + noise * rng.standard_normal(k)
        ev = loss.copy() if policy.wants_eval(t) else None
        was_probe = policy.phase == "probe"
        policy.update(DomainStats(counts * 2.0, counts.astype(np.float64), p, step=t, eval_loss=ev))
        if was_probe and policy.phase == "main":
            finals.append(policy.main_proportions)
    return drawn, finals, exact_flags


@pytest.mark.parametrize("ema", [None, 0.5])
@pytest.mark.parametrize(("k", "batch", "f"), [(3, 10, 0.625), (5, 7, 0.5), (4, 16, 1.0)])
def test_aioli_matches_the_procedural_reference_batch_by_batch(ema, k, batch, f):
    rng = np.random.default_rng(k)
    a = rng.uniform(0.0, 0.02, size=(k, k)) + np.diag(rng.uniform(0.02, 0.05, size=k))
    cfg = dict(k=k, batch=batch, rounds=3, u=2 * 2 * k * 3, r=2, s=3, f=f, eta=2.0, ema=ema, seed=7, noise=0.01)
    ref_drawn, ref_finals = reference_run(a, world_seed=11, **cfg)
    got_drawn, got_finals, _ = policy_run(a, world_seed=11, **cfg)
    assert len(got_finals) == len(ref_finals) == 3
    for t, (x, y) in enumerate(zip(got_drawn, ref_drawn)):
        assert (x is None) == (y is None), f"batch {t}: probe in one run only"
        if x is not None:
            np.testing.assert_allclose(x, y, rtol=1e-12, err_msg=f"batch {t}")
    np.testing.assert_allclose(got_finals, ref_finals, rtol=1e-9)


def test_probe_batches_spread_their_spare_samples_over_every_off_target_domain():
    """K = 5, f = 0.625, B = 8: the target gets 5 samples, each off-target domain 0.75, so 3 spare samples go to
    3 of the 4 off-target domains; over a probe of s = 4 steps each gets 3 of the 12 (not 4, 4, 4, 0)."""
    k, batch, s = 5, 8, 4
    _, _, counts = policy_run(
        np.eye(k) * 0.01,
        k=k,
        batch=batch,
        rounds=1,
        u=k * s,
        r=1,
        s=s,
        f=0.625,
        eta=1.0,
        ema=None,
        seed=0,
        noise=0.0,
        world_seed=0,
    )
    probes = np.array(counts[1 : 1 + k * s]).reshape(k, s, k).sum(axis=1)  # per probe, summed over its steps
    for row in probes:
        j = int(row.argmax())
        assert row[j] == 5 * s
        off = np.delete(row, j)
        assert off.tolist() == [3, 3, 3, 3], row
