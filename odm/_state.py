"""Checked reads of a loaded checkpoint: every field by its key path, before anything is restored.

A checkpoint is data from disk: it may be from another version, truncated, or edited by hand. Each reader
takes the dict, the key and the path of the dict (``"mixer.schedule"``), and raises ``ValueError`` naming the
full key path (``mixer.schedule.rows[3]``), what it holds and what is allowed — never a bare ``KeyError``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from odm._checks import is_int, is_real

__all__ = ["StateError", "as_int", "read", "read_int", "read_simplex", "read_vector", "require_mapping"]

# Proportions saved by odm sum to 1 within a few ulps; anything further off was not written by odm.
SIMPLEX_TOL = 1e-9


class StateError(ValueError):
    """A checkpoint field that is missing or holds a value odm never writes."""


def require_mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise StateError(f"checkpoint field `{path}` must be a dict, got {type(value).__name__}")
    return value


def read(state: Mapping[str, Any], key: str, path: str) -> Any:
    """``state[key]``, or a :class:`StateError` naming ``path.key`` when it is missing."""
    require_mapping(state, path)
    if key not in state:
        raise StateError(
            f"the checkpoint is missing `{path}.{key}` (it has {sorted(state)}); was it written by another "
            "version of odm, or edited?"
        )
    return state[key]


def as_int(value: Any, path: str, *, low: int = 0) -> int:
    """``value`` (the field at ``path``) as an integer ``>= low``."""
    if not is_int(value) or int(value) < low:
        raise StateError(f"checkpoint field `{path}` must be an integer >= {low}, got {value!r}")
    return int(value)


def read_int(state: Mapping[str, Any], key: str, path: str, *, low: int = 0, allow_none: bool = False) -> Any:
    """An integer ``>= low`` (or ``None`` when allowed) at ``path.key``."""
    value = read(state, key, path)
    if value is None and allow_none:
        return None
    return as_int(value, f"{path}.{key}", low=low)


def read_vector(value: Any, path: str, length: int, *, low: float | None = None) -> np.ndarray:
    """A finite float64 vector of ``length`` numbers (each ``>= low`` if given) at ``path``."""
    if isinstance(value, str | bytes) or not hasattr(value, "__len__"):
        raise StateError(f"checkpoint field `{path}` must be a list of {length} numbers, got {value!r}")
    if len(value) != length or not all(is_real(x) for x in value):
        raise StateError(f"checkpoint field `{path}` must be a list of {length} numbers, got {_short(value)}")
    arr = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(arr)) or (low is not None and np.any(arr < low)):
        bound = "" if low is None else f" and >= {low:g}"
        raise StateError(f"checkpoint field `{path}` must hold finite numbers{bound}, got {_short(value)}")
    return arr


def read_simplex(value: Any, path: str, length: int) -> np.ndarray:
    """Proportions at ``path``: ``length`` non-negative numbers summing to 1 (as odm saves them)."""
    p = read_vector(value, path, length, low=0.0)
    if not math.isclose(float(p.sum()), 1.0, rel_tol=0.0, abs_tol=SIMPLEX_TOL):
        raise StateError(
            f"checkpoint field `{path}` must be proportions on the simplex (non-negative, summing to 1), got "
            f"{_short(value)} (sum {float(p.sum())!r})"
        )
    return p


def _short(value: Any) -> str:
    text = repr(list(value)) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 200 else text[:197] + "..."
