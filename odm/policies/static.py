"""Static priors: proportions fixed at construction. Also the starting point of every adaptive policy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from odm._checks import check_float
from odm.policies.base import DomainStats, Policy, check_proportions

__all__ = ["Fixed", "Natural", "Temperature", "Uniform", "temperature_proportions"]


def temperature_proportions(sizes: np.ndarray, tau: float) -> np.ndarray:
    """``p_i ∝ n_i^(1/τ)``, computed in log space so huge sizes and large ``τ`` stay finite."""
    logits = np.log(sizes) / tau
    logits -= logits.max()
    w = np.exp(logits)
    return w / w.sum()


class _Static(Policy):
    """A policy whose proportions never change; ``update`` is a no-op."""

    requires = frozenset()

    def update(self, stats: DomainStats) -> None:
        pass


class Uniform(_Static):
    """Uniform (stratified) sampling: ``p_i = 1/K``. The baseline every benchmark compares against.

    Example:
        >>> Uniform().bind(4).proportions
        array([0.25, 0.25, 0.25, 0.25])
    """

    name = "uniform"

    def _init_state(self, num_domains: int) -> None:
        self._p = np.full(num_domains, 1.0 / num_domains)


class Fixed(_Static):
    """User-given proportions, validated (finite, non-negative, not all zero) and normalised.

    Args:
        proportions: one non-negative weight per domain.

    Example:
        >>> Fixed([1, 3]).proportions
        array([0.25, 0.75])
    """

    name = "fixed"

    def __init__(self, proportions: Sequence[float] | np.ndarray) -> None:
        super().__init__()
        self._given = check_proportions(proportions, name="proportions")
        self.bind(len(self._given))

    def _init_state(self, num_domains: int) -> None:
        self._p = self._given.copy()


def _check_sizes(sizes: Any) -> np.ndarray:
    arr = np.asarray(sizes, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"`sizes` must be a non-empty 1-D sequence of domain sizes, got {sizes!r}")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"`sizes` must be finite and positive (tokens or samples per domain), got {sizes!r}")
    return arr


class Temperature(_Static):
    """Temperature sampling: ``p_i ∝ n_i^(1/τ)``; ``τ = 1`` is natural, ``τ → ∞`` uniform.

    Args:
        sizes: domain sizes (tokens or samples), one per domain.
        tau: temperature, ``> 0``.

    Example:
        >>> Temperature([1, 4], tau=2.0).proportions.round(3)
        array([0.333, 0.667])
    """

    name = "temperature"

    def __init__(self, sizes: Sequence[float] | np.ndarray, tau: float = 1.0) -> None:
        super().__init__()
        self.tau = check_float(tau, "tau", low=0, low_open=True)
        self.sizes = _check_sizes(sizes)
        self.bind(len(self.sizes))

    def _init_state(self, num_domains: int) -> None:
        self._p = temperature_proportions(self.sizes, self.tau)


class Natural(Temperature):
    """Natural proportions: ``p_i ∝ n_i`` (domain size in tokens or samples).

    Example:
        >>> Natural([10, 30]).proportions
        array([0.25, 0.75])
    """

    name = "natural"

    def __init__(self, sizes: Sequence[float] | np.ndarray) -> None:
        super().__init__(sizes, tau=1.0)
