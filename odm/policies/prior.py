"""Entropy prior: static proportions proportional to each domain's empirical conditional entropy.

BiMix (Ge et al. 2024, "BiMix: A Bivariate Data Mixing Law for Language Model Pretraining") reports that
entropy-driven, training-free mixtures are a strong cheap prior: ``p_i ∝ H_i``.

Estimator (order ``m``, default 1): the plug-in conditional entropy of a symbol given the ``m`` symbols before
it, pooled over all samples of the domain,

``H_i = −Σ_{c,x} (N(c,x)/N) · ln(N(c,x)/N(c))``

where ``N(c,x)`` counts the positions whose context (previous ``m`` symbols, within the same sample) is ``c``
and symbol is ``x``, ``N(c) = Σ_x N(c,x)`` and ``N`` is the number of positions with a full context. Order 0
is the plain unigram entropy. Symbols are UTF-8 bytes for ``str`` samples, bytes for ``bytes`` and token ids for
integer sequences, so pass token ids to get the *token* entropy of ``docs/algorithms.md``. In nats. The plug-in
estimate is biased low for small samples (more so for larger ``m``); use the same amount of text per domain.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from odm._checks import check_int
from odm.policies.base import DomainStats, Policy, check_proportions

__all__ = ["EntropyPrior", "conditional_entropy"]

Sample = str | bytes | Sequence[int] | np.ndarray


def _symbols(sample: Any) -> np.ndarray:
    if isinstance(sample, str):
        return np.frombuffer(sample.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    if isinstance(sample, bytes | bytearray | memoryview):
        return np.frombuffer(bytes(sample), dtype=np.uint8).astype(np.int64)
    arr = np.asarray(sample)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"a sample must be str, bytes or a 1-D sequence of integer token ids, got {sample!r:.80}")
    return arr.astype(np.int64)


def conditional_entropy(samples: Iterable[Sample], *, order: int = 1) -> float:
    """Plug-in conditional entropy (nats) of a symbol given the ``order`` previous symbols (module docstring).

    Raises:
        ValueError: if no sample is long enough to hold a symbol with a full context.

    Example:
        >>> round(conditional_entropy(["abab", "abab"], order=0), 4)  # two equally likely bytes
        0.6931
        >>> conditional_entropy(["abab", "abab"], order=1)  # each byte determines the next
        0.0
    """
    rows = []
    for sample in samples:
        s = _symbols(sample)
        if s.size > order:
            # each row: (context symbols..., symbol) for every position with a full context
            rows.append(np.stack([s[j : s.size - order + j] for j in range(order + 1)], axis=1))
    if not rows:
        raise ValueError(f"no sample has more than {order} symbols: cannot estimate an order-{order} entropy")
    grams = np.concatenate(rows)
    _, joint = np.unique(grams, axis=0, return_counts=True)
    total = float(joint.sum())
    h_joint = -np.sum(joint / total * np.log(joint / total))
    if order == 0:
        return float(max(h_joint, 0.0)) + 0.0  # + 0.0 turns -0.0 into 0.0
    _, ctx = np.unique(grams[:, :order], axis=0, return_counts=True)
    h_ctx = -np.sum(ctx / total * np.log(ctx / total))
    return float(max(h_joint - h_ctx, 0.0)) + 0.0  # H(X | C) = H(C, X) − H(C)


class EntropyPrior(Policy):
    """Static proportions ``p_i ∝ H_i``, the empirical conditional entropy of a sample of each domain.

    Args:
        samples: per domain, a list of samples (``str``, ``bytes`` or token-id sequences); a mapping is taken
            in its key order. Give this or ``entropies``.
        entropies: precomputed non-negative entropies, one per domain.
        order: context length ``m ≥ 0`` of the estimator (see the module docstring).

    Raises:
        TypeError: if neither ``samples`` nor ``entropies`` is given, or both are.
        ValueError: if the entropies are negative, non-finite or all zero.

    Example:
        >>> EntropyPrior([["aaaa"], ["abab", "baba"]], order=0).proportions
        array([0., 1.])
        >>> EntropyPrior(entropies=[1.0, 3.0]).proportions
        array([0.25, 0.75])
    """

    name = "entropy"
    requires = frozenset()

    def __init__(
        self,
        samples: Sequence[Iterable[Sample]] | Mapping[str, Iterable[Sample]] | None = None,
        *,
        entropies: Sequence[float] | np.ndarray | None = None,
        order: int = 1,
    ) -> None:
        super().__init__()
        order = check_int(order, "order", low=0)
        if (samples is None) == (entropies is None):
            raise TypeError("EntropyPrior needs exactly one of `samples` (per-domain samples) or `entropies`")
        if samples is not None:
            groups = list(samples.values()) if isinstance(samples, Mapping) else list(samples)
            if not groups or any(isinstance(g, str | bytes) for g in groups):
                raise TypeError("`samples` must hold one list of samples per domain (not a single string)")
            entropies = [conditional_entropy(g, order=order) for g in groups]
        self.order = order
        self.entropies = np.asarray(entropies, dtype=np.float64)
        self._given = check_proportions(self.entropies, name="entropies")
        self.bind(len(self._given))

    def _init_state(self, num_domains: int) -> None:
        self._p = self._given.copy()

    def update(self, stats: DomainStats) -> None:
        pass
