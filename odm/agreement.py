"""Rank agreement: one ``all_gather_object`` of a fingerprint before the first collective of a run.

Ranks that disagree on the domains, their number, the policy or the update cadence do not fail on their own:
they sum different arms into one, pair collectives of different sizes (gloo aborts the process) or wait for
each other forever. One small gather of every rank's settings, compared field by field, turns each of those
into a ``ValueError`` on every rank that names the field and each rank's value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from odm._dist import distributed, rank_world

__all__ = ["check_agreement", "describe", "policy_config"]

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # object reprs differ between processes only by address


def describe(value: Any) -> str:
    """A process-independent text for ``value`` (arrays as lists, no memory addresses)."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, Mapping):
        return (
            "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))) + "}"
        )
    if isinstance(value, list | tuple):
        return "[" + ", ".join(describe(v) for v in value) + "]"
    return _ADDRESS.sub("", repr(value))


def policy_config(policy: Any) -> str:
    """The policy's class and configuration: ``policy.config()`` when it has one, else its public attributes.

    Taken before the first update, so public attributes are still the constructor's settings.
    """
    config = getattr(policy, "config", None)
    if callable(config):
        settings: Any = config()
    else:
        settings = {k: v for k, v in vars(policy).items() if not k.startswith("_")}
    return f"{type(policy).__module__}.{type(policy).__qualname__}({describe(settings)})"


def check_agreement(fields: Mapping[str, Any], group: Any = None) -> None:
    """Gathers ``fields`` from every rank of ``group`` (default: the world) and compares them.

    A no-op outside ``torch.distributed``. Every rank runs the same comparison on the same gathered data, so
    every rank raises the same error.

    Raises:
        ValueError: naming each field that differs and every rank's value of it.
    """
    if not distributed(group):
        return
    mine = {k: describe(v) for k, v in fields.items()}
    _, world = rank_world(group)
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, mine, group=group)
    problems = []
    for key in sorted({k for g in gathered for k in g}):
        values = [g.get(key, "<not set>") for g in gathered]
        if len(set(values)) > 1:
            per_rank = "; ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            problems.append(f"`{key}` differs ({per_rank})")
    if problems:
        raise ValueError(
            "odm: the ranks disagree on settings that must be identical on every rank: "
            + " | ".join(problems)
            + ". Build the loader and mixer from the same configuration on every rank."
        )
