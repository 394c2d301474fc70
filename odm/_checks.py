"""Argument checks shared by every module: one bottom layer, no odm imports.

Each check takes the value first and the argument's name second, returns the value in its canonical Python
type, and raises with a message that names the argument, quotes the bad value and says what is allowed.
NumPy scalars (``np.int64``, ``np.float32``) are accepted wherever a Python number is: they are what a config
read with numpy, or a value computed from an array, usually is. ``bool`` is never a number here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from numbers import Integral, Real
from typing import Any

__all__ = [
    "check_choice",
    "check_domain_names",
    "check_float",
    "check_int",
    "check_seed",
    "is_int",
    "is_real",
]


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (Python or NumPy), and not a ``bool``."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """Whether ``value`` is a real number (Python or NumPy, integer or float), and not a ``bool``."""
    return isinstance(value, Real) and not isinstance(value, bool)


def _bounds_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    return " and ".join(parts)


def check_int(
    value: Any,
    name: str,
    *,
    low: int | None = None,
    high: int | None = None,
    allow_none: bool = False,
) -> Any:
    """``value`` as a Python ``int`` in ``[low, high]`` (either bound optional), or ``None`` if allowed.

    Raises:
        TypeError: not an integer (a float, a string, a bool).
        ValueError: an integer outside the bounds.

    Example:
        >>> import numpy as np
        >>> check_int(np.int64(3), "num_workers", low=0)
        3
        >>> check_int(-1, "num_workers", low=0)
        Traceback (most recent call last):
        ...
        ValueError: `num_workers` must be an integer >= 0, got -1
    """
    if value is None and allow_none:
        return None
    if is_int(value):
        v = int(value)
        if (low is None or v >= low) and (high is None or v <= high):
            return v  # NOTE: the common case builds no message (this check runs once per batch in the loader)
    what = "an integer" + (f" {_bounds_text(low, high, False, False)}" if low is not None or high is not None else "")
    if allow_none:
        what += " or None"
    if not is_int(value):
        raise TypeError(f"`{name}` must be {what}, got {value!r} ({type(value).__name__})")
    raise ValueError(f"`{name}` must be {what}, got {int(value)!r}")


def check_float(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
) -> Any:
    """``value`` as a finite Python ``float`` within the bounds (open or closed), or ``None`` if allowed.

    Raises:
        TypeError: not a real number.
        ValueError: NaN, infinite, or outside the bounds.

    Example:
        >>> check_float(0.5, "gamma", low=0, high=1, low_open=True)
        0.5
        >>> check_float(0.0, "gamma", low=0, high=1, low_open=True)
        Traceback (most recent call last):
        ...
        ValueError: `gamma` must be a finite number > 0 and <= 1, got 0.0
    """
    if value is None and allow_none:
        return None
    bounds = _bounds_text(low, high, low_open, high_open)
    what = "a finite number" + (f" {bounds}" if bounds else "") + (" or None" if allow_none else "")
    if not is_real(value):
        raise TypeError(f"`{name}` must be {what}, got {value!r} ({type(value).__name__})")
    v = float(value)
    bad = not math.isfinite(v)
    bad = bad or (low is not None and (v <= low if low_open else v < low))
    bad = bad or (high is not None and (v >= high if high_open else v > high))
    if bad:
        raise ValueError(f"`{name}` must be {what}, got {v!r}")
    return v


def check_choice(value: Any, name: str, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``.

    Raises:
        ValueError: anything else, listing the choices.
    """
    options = tuple(choices)
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"`{name}` must be one of {', '.join(repr(c) for c in options)}; got {value!r}")
    return value


def check_seed(value: Any, name: str = "seed") -> int:
    """A seed: an integer in ``[0, 2**63)`` (NumPy's generators refuse negative seeds).

    Raises:
        TypeError / ValueError: as :func:`check_int`.
    """
    return int(check_int(value, name, low=0, high=2**63 - 1))


def check_domain_names(names: Any, name: str = "domains") -> list[str]:
    """A non-empty list of distinct, non-empty domain-name strings (from a sequence or a mapping's keys).

    Raises:
        TypeError: not a sequence/mapping (a bare string included), or a name that is not a non-empty string.
        ValueError: empty, or duplicate names.

    Example:
        >>> check_domain_names(("web", "code"))
        ['web', 'code']
    """
    if isinstance(names, str | bytes) or not isinstance(names, Sequence | Mapping):
        raise TypeError(f"`{name}` must be a sequence of domain names, got {names!r}")
    out = list(names)
    if not out:
        raise ValueError(f"`{name}` is empty: a mixture needs at least one domain")
    for n in out:
        if not isinstance(n, str) or not n:
            raise TypeError(f"domain names must be non-empty strings, got {n!r} in `{name}`")
    seen: set[str] = set()
    dupes = sorted({n for n in out if n in seen or seen.add(n)})  # type: ignore[func-returns-value]
    if dupes:
        raise ValueError(f"`{name}` has duplicate names: {dupes}")
    return out
