"""A ``datasets.IterableDataset``'s own ``state_dict()`` as a few integers that ride odm's stream rows.

odm's stream state is a row of integers per worker slot, and under DDP every rank's row reaches every rank as
float64 numbers inside the one all_reduce of ``mixer.step()`` (:mod:`odm.collective`). A Hugging Face state is
a nested dict whose *numbers* change while its *skeleton* — the keys, the strings such as ``"type"`` and
where ``None`` stands — changes rarely (an inner ``previous_state`` goes from ``None`` to a dict once). So a
state travels split in two (:func:`encode`): its integer leaves, in a fixed number of columns, and the id of
its skeleton (a 48-bit hash); the skeleton itself, a short string, goes once to the main process with the
batch that first used it and into the checkpoint. :func:`decode` puts them back together.

A stream row's *snapshot* (the row tail of one domain, :data:`NONE` when absent) is
``[position, skeleton id, leaves…]``: the state after exactly ``position`` items of the current pass of the
slot's shard. Integers travel exactly as float64 below ``2**53``; a state with a larger integer, a float, or
more leaves than there are columns is simply not snapshotted (the resume then skips further).

Example:
    >>> skeleton, leaves = encode({"shard_idx": 1, "shard_example_idx": 12, "type": "Arrow", "prev": None})
    >>> skeleton, leaves
    ('{"shard_idx":"i","shard_example_idx":"i","type":"sArrow","prev":null}', [1, 12])
    >>> decode(skeleton, [1, 13])
    {'shard_idx': 1, 'shard_example_idx': 13, 'type': 'Arrow', 'prev': None}
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

__all__ = ["MAX_EXACT", "MAX_SKELETONS", "NONE", "decode", "encode", "skeleton_id", "why_not_resumable"]

#: Integers travel as float64 in the step's all_reduce: exact below this bound.
MAX_EXACT = 2**53
#: The first entry of a snapshot that is absent (the rest of the columns is ignored).
NONE = -1
#: Skeletons of snapshots a process keeps (more are not learnt: those snapshots go unused and a resume skips).
MAX_SKELETONS = 256
#: Pipeline steps whose ``state_dict()`` resumes exactly (checked against the installed ``datasets`` by the
#: tests); any other step — a buffered ``shuffle`` above all, whose buffer the state does not hold — makes the
#: source resume by skipping instead.
EXACT_STEPS = frozenset(
    {
        "ExamplesIterable",
        "ArrowExamplesIterable",
        "RebatchedArrowExamplesIterable",
        "MappedExamplesIterable",
        "FilteredExamplesIterable",
        "FormattedExamplesIterable",
        "SelectColumnsIterable",
        "TypedExamplesIterable",
    }
)


class _Unencodable(Exception):
    """Internal: a state holds something that cannot travel as integers."""


def encode(state: Any) -> tuple[str, list[int]]:
    """``(skeleton, leaves)`` of a ``datasets`` state: the integer (and bool) leaves in order, and the rest.

    Raises:
        ValueError: a leaf that is not an int, bool, str or None (a float), an integer beyond ``2**53``, a
            tuple or a non-string key.
    """
    leaves: list[int] = []

    def walk(x: Any) -> Any:
        if isinstance(x, bool):
            leaves.append(int(x))
            return "b"
        if type(x) is int:
            if abs(x) >= MAX_EXACT:
                raise _Unencodable(f"the integer {x} is beyond 2**53")
            leaves.append(x)
            return "i"
        if x is None:
            return None
        if isinstance(x, str):
            return "s" + x
        if type(x) is dict and all(isinstance(k, str) for k in x):
            return {k: walk(v) for k, v in x.items()}
        if type(x) is list:
            return [walk(v) for v in x]
        raise _Unencodable(f"a {type(x).__name__} leaf ({x!r:.40})")

    try:
        skeleton = json.dumps(walk(state), separators=(",", ":"))
    except _Unencodable as err:
        raise ValueError(f"this state cannot travel as integers: {err}") from None
    return skeleton, leaves


def decode(skeleton: str, leaves: Sequence[int]) -> Any:
    """The state :func:`encode` split into ``skeleton`` and ``leaves`` (extra leaves are ignored)."""
    it = iter(leaves)

    def build(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: build(v) for k, v in x.items()}
        if isinstance(x, list):
            return [build(v) for v in x]
        if x is None:
            return None
        if x == "i":
            return int(next(it))
        if x == "b":
            return bool(next(it))
        return x[1:]  # "s…": a string

    return build(json.loads(skeleton))


def skeleton_id(skeleton: str) -> int:
    """A 48-bit id of a skeleton (exact as float64; a collision is a 2**-48 event per pair)."""
    return int.from_bytes(hashlib.blake2b(skeleton.encode(), digest_size=6).digest(), "big")


def why_not_resumable(dataset: Any) -> str | None:
    """Why ``dataset``'s own ``state_dict()`` cannot resume it exactly (``None``: it can).

    Its pipeline must consist of :data:`EXACT_STEPS` only; a buffered ``shuffle`` loses its buffer, a table
    format (``with_format("arrow")`` and the like) can skip a batch after a batched ``map`` (``datasets``'
    own documentation of ``IterableDataset.state_dict``).
    """
    if not (callable(getattr(dataset, "state_dict", None)) and callable(getattr(dataset, "load_state_dict", None))):
        return "this `datasets` version has no IterableDataset.state_dict()"
    formatting = getattr(dataset, "_formatting", None)
    if formatting is not None and getattr(formatting, "is_table", False):
        return f"a table format ({formatting.format_type!r}) may skip a batch when its state is restored"
    todo = [getattr(dataset, "_ex_iterable", None)]
    while todo:
        step = todo.pop()
        if step is None:
            return "its pipeline is not visible (no `_ex_iterable`)"
        name = type(step).__name__
        if name not in EXACT_STEPS:
            why = "its buffer is not part of the state" if name == "BufferShuffledExamplesIterable" else "untested"
            return f"its pipeline holds a {name} ({why})"
        step_format = getattr(step, "formatting", None)
        if step_format is not None and getattr(step_format, "is_table", False):
            return f"a {name} works on tables ({step_format.format_type!r}) and may skip a batch when restored"
        inner = getattr(step, "ex_iterable", None)
        if inner is not None:
            todo.append(inner)
        todo.extend(getattr(step, "ex_iterables", None) or [])
    return None
