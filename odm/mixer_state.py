"""The mixer's checkpoint: its fields, each checked by key path before the mixer restores anything.

:meth:`odm.OnlineMixer.state_dict` writes a plain versioned dict; :func:`check_state` reads one back into a
:class:`CheckedState` or raises a ``ValueError`` naming the key path of the first field that is missing or
holds something odm never writes (proportions off the simplex, negative counters, a foreign generator state).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from odm._state import StateError, as_int, read, read_int, read_simplex, read_vector
from odm.feedback import FeedbackRows
from odm.history import History
from odm.schedule import ProportionSchedule, ScheduleRow

__all__ = ["STATE_VERSION", "CheckedState", "check_state"]

#: Version of the mixer's state layout (2: pending statistics summed over the ranks, bounded history).
STATE_VERSION = 2


@dataclasses.dataclass
class CheckedState:
    """A mixer checkpoint, every field checked (see :meth:`odm.OnlineMixer.state_dict` for the meanings)."""

    schedule_rows: list[ScheduleRow]
    history: tuple[list[int], np.ndarray, int]  # steps, rows, rows thinned away
    num_steps: int
    num_updates: int
    num_samples: int
    next_batch: int
    cut_batch: int | None
    override: np.ndarray | None
    published: np.ndarray
    rng: np.random.Generator
    pending: np.ndarray | None
    evals_missed: tuple[int, int]
    policy: Mapping[str, Any]


def domain_diff(saved: list[str], mine: list[str]) -> str:
    """What differs between two domain lists, in words."""
    missing = [d for d in saved if d not in mine]
    extra = [d for d in mine if d not in saved]
    parts = []
    if missing:
        parts.append(f"the checkpoint has {missing} which this run lacks")
    if extra:
        parts.append(f"this run has {extra} which the checkpoint lacks")
    if not parts:
        parts.append(f"same names in another order: checkpoint {saved}, this run {mine}")
    return "; ".join(parts)


def check_state(
    state: Mapping[str, Any], *, domains: list[str], schedule: ProportionSchedule, history: History, path: str
) -> CheckedState:
    """Every field of a saved mixer state, checked against this mixer's domains, schedule and history.

    Raises:
        ValueError: the first problem, naming its key path (``mixer.schedule.rows[3].proportions``).
    """
    version = read(state, "version", path)
    if version != STATE_VERSION:
        raise StateError(f"`{path}.version` is {version!r}; this odm reads mixer state version {STATE_VERSION}")
    saved = read(state, "domains", path)
    if not isinstance(saved, list | tuple) or list(saved) != domains:
        what = domain_diff(list(saved), domains) if isinstance(saved, list | tuple) else repr(saved)
        raise StateError(
            f"checkpoint domains differ from this mixer's: {what}; load_state_dict(..., domains='remap') carries "
            "the state over"
        )
    k = len(domains)
    rows = schedule.check_state(read(state, "schedule", path), f"{path}.schedule")
    steps, rows_kept = history.check_state(read(state, "history", path), f"{path}.history")
    kept = (steps, rows_kept, read_int(state, "history_thinned", path))
    counters = {key: read_int(state, key, path) for key in ("num_steps", "num_updates", "num_samples")}
    ov = read(state, "override", path)
    pending = read(state, "pending", path)
    if pending is not None:
        pending = read_vector(pending, f"{path}.pending", FeedbackRows.size(k))
        unpacked = FeedbackRows.unpack(pending, k)
        for name in ("count", "samples", "nonfinite", "eval_count", "drawn"):
            if np.any(getattr(unpacked, name) < 0):
                raise StateError(f"checkpoint field `{path}.pending` holds a negative {name}: {pending.tolist()}")
    missed = read(state, "evals_missed", path)
    if not isinstance(missed, list | tuple) or len(missed) != 2:
        raise StateError(f"checkpoint field `{path}.evals_missed` must be two integers, got {missed!r}")
    rng = np.random.default_rng()
    try:
        rng.bit_generator.state = read(state, "rng", path)
    except (TypeError, ValueError, KeyError) as err:
        raise StateError(
            f"checkpoint field `{path}.rng` is not a {type(rng.bit_generator).__name__} state: {err}"
        ) from err
    if kept[0] and kept[0][-1] > counters["num_steps"]:
        raise StateError(
            f"checkpoint field `{path}.history` ends at step {kept[0][-1]}, after "
            f"`{path}.num_steps`={counters['num_steps']}"
        )
    policy = read(state, "policy", path)
    if not isinstance(policy, Mapping):
        raise StateError(f"checkpoint field `{path}.policy` must be a dict, got {type(policy).__name__}")
    return CheckedState(
        schedule_rows=rows,
        history=kept,
        num_steps=counters["num_steps"],
        num_updates=counters["num_updates"],
        num_samples=counters["num_samples"],
        next_batch=read_int(state, "next_batch", path),
        cut_batch=read_int(state, "cut_batch", path, allow_none=True),
        override=None if ov is None else read_simplex(ov, f"{path}.override", k),
        published=read_vector(read(state, "published", path), f"{path}.published", k, low=0.0),
        rng=rng,
        pending=pending,
        evals_missed=(as_int(missed[0], f"{path}.evals_missed[0]"), as_int(missed[1], f"{path}.evals_missed[1]")),
        policy=policy,
    )
