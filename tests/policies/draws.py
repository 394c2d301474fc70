"""Random per-update statistics shared by the bandit tests."""

from __future__ import annotations

import numpy as np

from odm.policies import DomainStats


def draw_counts(rng: np.random.Generator, p: np.ndarray, granularity: str) -> np.ndarray:
    """Per-domain sample counts of one update: one domain's micro-batch (``"batch"``) or a per-sample mix."""
    k = len(p)
    if granularity == "batch":
        count = np.zeros(k)
        count[rng.choice(k, p=p)] = rng.integers(1, 9)
        return count
    return rng.multinomial(int(rng.integers(1, 40)), p).astype(np.float64)


def draw_stats(
    rng: np.random.Generator, p: np.ndarray, step: int, granularity: str, *, offset: float = 0.0
) -> DomainStats:
    """Counts from :func:`draw_counts` and a drifting loss per domain (so progress rewards are not pure noise).

    The batches are drawn under ``q = (p + d)/2`` with ``d`` a random Dirichlet mixture, *not* under the
    policy's current ``p``: under the mixer's publish delay the two differ, and importance weights must use the
    proportions each batch was drawn under (``stats.proportions = q``). A policy that used its newest
    proportions instead would fail every reference test. ``offset`` shifts the losses (negative losses).
    """
    q = 0.5 * p + 0.5 * rng.dirichlet(np.ones(len(p)))
    count = draw_counts(rng, q, granularity)
    losses = offset + 3.0 + np.sin(step / 17.0 + np.arange(len(p))) + rng.normal(0.0, 0.3, len(p))
    return DomainStats(loss_sum=count * losses, count=count, proportions=q, step=step)
