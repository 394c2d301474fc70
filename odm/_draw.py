"""Draw helpers shared by the dataset, the mixer and the policies: one bottom layer, numpy only."""

from __future__ import annotations

import numpy as np

__all__ = ["inverse_cdf", "largest_remainder"]


def largest_remainder(p: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` that round ``p * total`` by the largest-remainder method.

    Ties in the remainders go to the lower domain index, so the result is deterministic.

    Example:
        >>> largest_remainder(np.array([0.5, 0.3, 0.2]), 4).tolist()
        [2, 1, 1]
    """
    exact = p * total
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    if short > 0:
        order = np.argsort(-(exact - counts), kind="stable")
        counts[order[:short]] += 1
    return counts


def inverse_cdf(u: np.ndarray, p: np.ndarray, cdf: np.ndarray | None = None) -> np.ndarray:
    """Maps uniforms ``u`` in [0, 1) to domain ids (int64) under proportions ``p``; zero-proportion domains
    are never drawn. Pass a precomputed ``cdf = np.cumsum(p)`` to skip the cumulative sum.

    Example:
        >>> inverse_cdf(np.array([0.1, 0.6, 0.99]), np.array([0.5, 0.0, 0.5])).tolist()
        [0, 2, 2]
    """
    c = np.cumsum(p) if cdf is None else cdf
    # Scaling u by the total (rather than forcing c[-1] = 1) keeps trailing zero-proportion domains out.
    return np.searchsorted(c, u * c[-1], side="right").astype(np.int64, copy=False)
