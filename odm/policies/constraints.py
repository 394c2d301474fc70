"""Constraints on the proportions: per-domain floors and ceilings, and frozen domains.

:meth:`Constraints.project` maps any proportions vector to the nearest (Euclidean) feasible one,

``argmin_x ‖x − p‖²``  s.t.  ``Σ x = 1``, ``lo_i ≤ x_i ≤ hi_i`` (free domains), ``x_f = v_f`` (frozen domains).

KKT gives ``x_i = clip(p_i − λ, lo_i, hi_i)`` for the free domains, with ``λ`` the one shift making them sum to
the budget ``b = 1 − Σ_f v_f``. ``f(λ) = Σ_i clip(p_i − λ, lo_i, hi_i)`` is continuous, non-increasing and
piecewise linear with breakpoints ``p_i − hi_i`` and ``p_i − lo_i``; :func:`project` evaluates it at every
breakpoint with sorted prefix sums and solves the linear piece that crosses ``b``: exact (up to rounding),
``O(K log K)``, no loop over domains.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from odm._checks import check_int, is_int, is_real

__all__ = ["Constraints", "project"]

Bound = float | Sequence[float] | np.ndarray | Mapping[int, float] | None
# Slack allowed when checking that the bounds admit a point on the simplex.
_TOL = 1e-12


def project(p: np.ndarray, lower: np.ndarray, upper: np.ndarray, budget: float = 1.0) -> np.ndarray:
    """Euclidean projection of ``p`` onto ``{x : Σx = budget, lower ≤ x ≤ upper}`` (assumed non-empty).

    Example:
        >>> project(np.array([0.7, 0.2, 0.1]), np.full(3, 0.2), np.ones(3))
        array([0.6, 0.2, 0.2])
    """
    if p.size == 0:
        return p.astype(np.float64)
    a = p - upper  # below a_i: x_i = upper_i
    b = p - lower  # above b_i: x_i = lower_i
    order_a = np.argsort(a, kind="stable")
    order_b = np.argsort(b, kind="stable")
    sorted_a, sorted_b = a[order_a], b[order_b]
    zero = np.zeros(1)
    upper_prefix = np.concatenate([zero, np.cumsum(upper[order_a])])
    p_prefix_a = np.concatenate([zero, np.cumsum(p[order_a])])
    lower_prefix = np.concatenate([zero, np.cumsum(lower[order_b])])
    p_prefix_b = np.concatenate([zero, np.cumsum(p[order_b])])

    def total(lam: np.ndarray) -> np.ndarray:
        n_a = np.searchsorted(sorted_a, lam, side="right")  # domains with a_i <= λ: not at their ceiling
        n_b = np.searchsorted(sorted_b, lam, side="left")  # domains with b_i < λ: at their floor
        at_upper = upper_prefix[-1] - upper_prefix[n_a]
        at_lower = lower_prefix[n_b]
        free = (p_prefix_a[n_a] - p_prefix_b[n_b]) - lam * (n_a - n_b)
        return at_upper + at_lower + free

    breaks = np.sort(np.concatenate([a, b]))
    values = total(breaks)  # non-increasing
    # first breakpoint whose value is <= budget; the crossing lies between it and the previous one
    j = int(np.searchsorted(-values, -budget, side="left"))
    if j == 0:
        lam = breaks[0]
    elif j == breaks.size:
        lam = breaks[-1]
    else:
        hi_val, lo_val = values[j - 1], values[j]
        drop = hi_val - lo_val
        lam = breaks[j - 1] + (hi_val - budget) / drop * (breaks[j] - breaks[j - 1]) if drop > 0 else breaks[j]
    return np.clip(p - lam, lower, upper)


def _bound(name: str, value: Bound, num_domains: int | None, default: float) -> tuple[Any, int | None]:
    """Validates one bound; returns it (scalar, array or dict) and the number of domains it implies."""
    if value is None:
        return default, None
    if isinstance(value, Mapping):
        out = {}
        for key, v in value.items():
            if not is_int(key) or key < 0:
                raise ValueError(f"`{name}` keys must be domain indices (integers >= 0), got {key!r}")
            if num_domains is not None and key >= num_domains:
                raise ValueError(f"`{name}` names domain {key}, but there are only {num_domains} domains")
            out[int(key)] = _unit(name, v, f"domain {key}")
        return out, None
    if is_real(value):
        return _unit(name, value, "all domains"), None
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"`{name}` must be a number, a 1-D sequence or a {{domain: value}} mapping, got {value!r}")
    for i, v in enumerate(arr):
        _unit(name, float(v), f"domain {i}")
    return arr, arr.size


def _unit(name: str, value: Any, where: str) -> float:
    if not is_real(value):
        raise ValueError(f"`{name}` for {where} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"`{name}` for {where} must lie in [0, 1], got {value!r}")
    return float(value)


def _expand(bound: Any, num_domains: int, default: float) -> np.ndarray:
    if isinstance(bound, dict):
        out = np.full(num_domains, default)
        for key, v in bound.items():
            out[key] = v
        return out
    if isinstance(bound, np.ndarray):
        return bound.copy()
    return np.full(num_domains, float(bound))


class Constraints:
    """Floors, ceilings and frozen domains for the proportions, with the exact Euclidean projection.

    Floors and ceilings apply to the free domains; a frozen domain keeps exactly its given value (its floor
    and ceiling are ignored).

    Args:
        floors: minimum proportion per domain: one number for all, a sequence with one per domain, or a
            ``{domain index: value}`` mapping (other domains 0).
        ceilings: maximum proportion, same forms (other domains 1).
        frozen: ``{domain index: value}`` domains held at a fixed proportion.
        num_domains: number of domains; inferred from a sequence bound, else fixed by :meth:`bind` or the
            first :meth:`project`.

    Raises:
        ValueError: bounds outside ``[0, 1]``, a floor above its ceiling, frozen values summing above 1, or
            bounds no proportions vector can meet (the message gives the sums); a domain index out of range.

    Example:
        >>> c = Constraints(floors=0.1, frozen={2: 0.5})
        >>> c.project([0.9, 0.1, 0.0])
        array([0.4, 0.1, 0.5])
    """

    def __init__(
        self,
        floors: Bound = None,
        ceilings: Bound = None,
        frozen: Mapping[int, float] | None = None,
        *,
        num_domains: int | None = None,
    ) -> None:
        num_domains = check_int(num_domains, "num_domains", low=1, allow_none=True)
        if frozen is not None and not isinstance(frozen, Mapping):
            raise ValueError(f"`frozen` must be a {{domain index: proportion}} mapping, got {frozen!r}")
        self._floors, k1 = _bound("floors", floors, num_domains, 0.0)
        self._ceilings, k2 = _bound("ceilings", ceilings, num_domains, 1.0)
        self._frozen, _ = _bound("frozen", frozen or {}, num_domains, 0.0)
        sizes = {k for k in (num_domains, k1, k2) if k is not None}
        if len(sizes) > 1:
            raise ValueError(
                f"inconsistent numbers of domains: num_domains={num_domains}, floors has {k1}, ceilings has {k2}"
            )
        self._num_domains: int | None = None
        self._lower: np.ndarray = np.zeros(0)
        self._upper: np.ndarray = np.zeros(0)
        self._fixed: np.ndarray = np.zeros(0)
        self._mask: np.ndarray = np.zeros(0, dtype=bool)
        self._budget = 1.0
        if sizes:
            self.bind(sizes.pop())

    @classmethod
    def for_domains(
        cls,
        domains: Sequence[str],
        floors: float | Mapping[str, float] | None = None,
        ceilings: float | Mapping[str, float] | None = None,
        frozen: Mapping[str, float] | None = None,
    ) -> Constraints:
        """Builds constraints from domain *names* (``{"web": 0.1}``) given the mixer's domain order.

        Raises:
            ValueError: a name that is not one of ``domains``.
        """
        index = {name: i for i, name in enumerate(domains)}

        def by_index(arg: str, value: Any) -> Any:
            if not isinstance(value, Mapping):
                return value
            unknown = [k for k in value if k not in index]
            if unknown:
                raise ValueError(f"`{arg}` names unknown domain(s) {unknown}; the domains are {list(domains)}")
            return {index[k]: v for k, v in value.items()}

        return cls(
            by_index("floors", floors),
            by_index("ceilings", ceilings),
            by_index("frozen", frozen),
            num_domains=len(index),
        )

    @property
    def num_domains(self) -> int | None:
        return self._num_domains

    def bind(self, num_domains: int) -> Constraints:
        """Fixes the number of domains and checks feasibility. Returns ``self``.

        Raises:
            ValueError: if already bound to another number, an index is out of range, or the set is empty.
        """
        if self._num_domains is not None:
            if num_domains != self._num_domains:
                raise ValueError(f"Constraints are for {self._num_domains} domains, got {num_domains}")
            return self
        for name, bound in (("floors", self._floors), ("ceilings", self._ceilings), ("frozen", self._frozen)):
            if isinstance(bound, dict) and bound and max(bound) >= num_domains:
                raise ValueError(f"`{name}` names domain {max(bound)}, but there are only {num_domains} domains")
        lower = _expand(self._floors, num_domains, 0.0)
        upper = _expand(self._ceilings, num_domains, 1.0)
        mask = np.zeros(num_domains, dtype=bool)
        fixed = np.zeros(num_domains)
        for key, v in self._frozen.items():
            mask[key] = True
            fixed[key] = v
        bad = np.flatnonzero(~mask & (lower > upper))
        if bad.size:
            raise ValueError(
                f"floors exceed ceilings for domain(s) {bad.tolist()}: "
                f"floors {lower[bad].tolist()} > ceilings {upper[bad].tolist()}"
            )
        frozen_total = float(fixed.sum())
        budget = 1.0 - frozen_total
        low, high = float(lower[~mask].sum()), float(upper[~mask].sum())
        if budget < -_TOL:
            raise ValueError(f"frozen proportions sum to {frozen_total:g} > 1")
        if not mask.all() and not (low - _TOL <= budget <= high + _TOL):
            raise ValueError(
                f"infeasible constraints: the free domains must share {budget:g} (1 − frozen {frozen_total:g}), "
                f"but their floors sum to {low:g} and their ceilings to {high:g}"
            )
        if mask.all() and abs(budget) > _TOL:
            raise ValueError(f"every domain is frozen, so the frozen proportions must sum to 1, got {frozen_total:g}")
        self._num_domains = num_domains
        self._lower, self._upper, self._fixed, self._mask = lower, upper, fixed, mask
        self._budget = min(max(budget, low), high) if not mask.all() else 0.0
        return self

    @property
    def floors(self) -> np.ndarray:
        """Effective lower bound per domain (frozen domains: their value)."""
        self._require_bound()
        return np.where(self._mask, self._fixed, self._lower)

    @property
    def ceilings(self) -> np.ndarray:
        """Effective upper bound per domain (frozen domains: their value)."""
        self._require_bound()
        return np.where(self._mask, self._fixed, self._upper)

    def _require_bound(self) -> None:
        if self._num_domains is None:
            raise RuntimeError("Constraints are not bound to domains yet; call `.bind(num_domains)`")

    def project(self, p: Sequence[float] | np.ndarray) -> np.ndarray:
        """The feasible proportions closest to ``p`` in Euclidean distance (binds to ``len(p)`` if unbound).

        Raises:
            ValueError: ``p`` not 1-D and finite, or of the wrong length.
        """
        arr = np.asarray(p, dtype=np.float64)
        if arr.ndim != 1 or not np.all(np.isfinite(arr)):
            raise ValueError(f"`p` must be a finite 1-D vector, got {p!r}")
        if self._num_domains is None:
            self.bind(arr.size)
        if arr.size != self._num_domains:
            raise ValueError(f"`p` has {arr.size} entries, these constraints are for {self._num_domains} domains")
        out = self._fixed.copy()
        free = ~self._mask
        out[free] = project(arr[free], self._lower[free], self._upper[free], self._budget)
        return out

    def __repr__(self) -> str:
        return (
            f"Constraints(floors={self._floors!r}, ceilings={self._ceilings!r}, frozen={self._frozen!r}, "
            f"num_domains={self._num_domains})"
        )
