"""Carrying a checkpoint over to another domain set: a domain added, retired or reordered between runs.

A resume onto other domains is refused by default (``OnlineMixer.load_state_dict``); with the explicit opt-in
``domains="remap"`` the saved state is first rewritten for the new domain set by :func:`remap_mixer_state`:

* **Common domains** (same name) keep their policy state — every per-domain entry of the policy's state, found
  by comparing the shapes of a fresh policy bound to ``K`` and to ``K + 1`` domains, so a ``(K, K)`` matrix
  or a ``(window, K)`` buffer is remapped along each of its domain axes.
* **A new domain starts from the stated prior**: the value a fresh policy of the new run gives it (what a run
  that started today would hold: zero gains, zero pulls, …) and, in the proportions, its share under that
  fresh policy; the common domains split the rest in their saved ratios. A retired domain's mass goes to the
  others in proportion.
* Policies whose state holds no per-domain entry (static priors: ``Uniform``, ``Fixed``, ``Natural``, …) take
  the new policy's own proportions: the new run's configuration defines them.
* What is not carried: statistics pending between two updates (dropped: they were summed under the old
  domain ids) and a ``set_proportions`` override (call it again). The schedule's rows are rewritten like the
  proportions; the history's rows give a new domain 0 (it was not drawn then) and renormalise.
* A per-domain entry whose length changes with time (a history of per-domain vectors: ADO's, Skill-It's)
  cannot be carried without inventing the past of a new domain: such a policy is refused, naming the entry.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from odm.policies import Policy
from odm.policies.base import from_plain, to_plain

__all__ = ["remap_mixer_state", "remap_policy_state", "remap_proportions", "remap_stream_rows"]


def remap_proportions(p: Any, old: Sequence[str], new: Sequence[str], prior: Any) -> np.ndarray:
    """Proportions over ``old`` domains carried to ``new`` ones.

    New domains get their share of ``prior`` (proportions over ``new``); the common domains split the rest in
    their saved ratios (a retired domain's mass spreads over them in proportion).

    Example:
        >>> remap_proportions([0.6, 0.3, 0.1], ["a", "b", "c"], ["a", "c", "d"], [1 / 3, 1 / 3, 1 / 3]).round(4)
        array([0.5714, 0.0952, 0.3333])
    """
    p, prior = np.asarray(p, dtype=np.float64), np.asarray(prior, dtype=np.float64)
    out = np.zeros(len(new))
    common = [(new.index(d), old.index(d)) for d in new if d in old]
    fresh = [j for j, d in enumerate(new) if d not in old]
    out[fresh] = prior[fresh]
    mass = sum(p[i] for _, i in common)
    if common and mass > 0:
        rest = 1.0 - prior[fresh].sum()
        for j, i in common:
            out[j] = p[i] / mass * rest
    else:  # nothing saved carries mass: the prior alone
        out = prior.copy()
    if out.sum() <= 0:
        out[:] = 1.0
    return out / out.sum()


def _fresh(policy: Policy, num_domains: int) -> Policy:
    """An unbound copy of ``policy``'s configuration bound to ``num_domains`` (None where K is fixed at build)."""
    clone = copy.deepcopy(policy)
    clone._num_domains, clone._p = None, None
    try:
        return clone.bind(num_domains)
    except (ValueError, TypeError):
        return policy  # a policy whose constructor fixed K (Natural(sizes)): its own state is the template


def _shape(x: Any) -> tuple[int, ...] | None:
    try:
        return tuple(np.shape(x))
    except ValueError:  # ragged nested lists
        return None


def _remap_leaf(key: str, saved: Any, fresh: Any, wider: Any, pairs: list[tuple[int, int]], k_old: int) -> Any:
    """One entry of a policy's state: per-domain axes remapped, everything else carried as saved."""
    s_new, s_wide, s_old = _shape(fresh), _shape(wider), _shape(saved)
    if s_new is not None and s_new == s_wide:  # no domain axis: a counter, a setting, a fixed-size buffer
        if s_old != s_new:
            raise ValueError(
                f"the policy's state entry {key!r} grows over the run (shape {s_new} when fresh, {s_old} saved) and "
                "may hold per-domain values whose past a new domain lacks: this policy cannot be carried over to "
                "another domain set"
            )
        return saved
    if s_new is None or s_wide is None or len(s_new) != len(s_wide):
        raise ValueError(f"the policy's state entry {key!r} cannot be carried over to another domain set")
    a_new, a_old = np.asarray(fresh), np.asarray(saved)
    axes = [ax for ax in range(a_new.ndim) if s_new[ax] != s_wide[ax]]
    expected = tuple(k_old if ax in axes else s_new[ax] for ax in range(a_new.ndim))
    if a_old.shape != expected:
        raise ValueError(
            f"the policy's state entry {key!r} (shape {s_old} saved, {expected} expected for {k_old} domains) is "
            "not laid out per domain: this policy cannot be carried over to another domain set"
        )
    out = a_new.astype(np.result_type(a_new, a_old), copy=True)
    if pairs:  # common domains: out[..., new j, ...] = saved[..., old i, ...] on every domain axis at once
        new_idx = np.array([j for j, _ in pairs])
        old_idx = np.array([i for _, i in pairs])
        dst = np.ix_(*[new_idx if ax in axes else np.arange(out.shape[ax]) for ax in range(out.ndim)])
        src = np.ix_(*[old_idx if ax in axes else np.arange(a_old.shape[ax]) for ax in range(out.ndim)])
        out[dst] = a_old[src]
    return out.tolist() if isinstance(fresh, list) else out


def remap_policy_state(state: Mapping[str, Any], old: Sequence[str], new: Sequence[str], policy: Policy) -> dict:
    """A policy ``state_dict`` over ``old`` domains rewritten for ``new`` ones (see the module docstring).

    ``policy`` is the new run's policy, bound to ``len(new)`` domains: its configuration gives the prior.

    Raises:
        ValueError: another policy class than the checkpoint's, or a state entry that cannot be carried.
    """
    return _remap_policy(state, old, new, policy)[0]


def _remap_policy(
    state: Mapping[str, Any], old: Sequence[str], new: Sequence[str], policy: Policy
) -> tuple[dict[str, Any], bool]:
    """:func:`remap_policy_state` and whether any per-domain state was carried (False: a static policy)."""
    saved = from_plain(dict(state))
    if saved.get("policy") != type(policy).__name__:
        raise ValueError(f"the checkpoint's policy is {saved.get('policy')!r}, this run's is {type(policy).__name__!r}")
    fresh, wider = _fresh(policy, len(new)), _fresh(policy, len(new) + 1)
    fresh_state = from_plain(fresh.state_dict())
    wider_state = from_plain(wider.state_dict())["state"] if wider is not fresh else fresh_state["state"]
    pairs = [(new.index(d), old.index(d)) for d in new if d in old]
    inner = {}
    per_domain = False
    for key, value in fresh_state["state"].items():
        if key not in saved["state"]:
            raise ValueError(f"the checkpoint's policy state lacks {key!r}")
        inner[key] = _remap_leaf(key, saved["state"][key], value, wider_state[key], pairs, len(old))
        per_domain = per_domain or inner[key] is not saved["state"][key]
    p = fresh.proportions
    if per_domain:
        p = remap_proportions(saved["proportions"], old, new, p)
    out = {**saved, "num_domains": len(new), "proportions": p, "state": inner}
    return dict(to_plain(out)), per_domain


def remap_mixer_state(state: Mapping[str, Any], *, domains: Sequence[str], policy: Policy) -> dict[str, Any]:
    """An :class:`odm.OnlineMixer` ``state_dict`` rewritten for ``domains`` (see the module docstring).

    Args:
        state: the saved mixer state.
        domains: the new run's domain names.
        policy: the new run's policy (bound to ``len(domains)``).

    Returns:
        A state the new mixer loads as if it had been saved with ``domains``.

    Raises:
        ValueError: no domain in common, or a policy whose state cannot be carried over.
    """
    old, new = list(state["domains"]), list(domains)
    if not set(old) & set(new):
        raise ValueError(f"the checkpoint's domains {old} and this run's {new} have none in common: nothing to carry")
    out = dict(state)
    out["domains"] = new
    out["policy"], carried = _remap_policy(state["policy"], old, new, policy)
    prior = np.asarray(from_plain(out["policy"])["proportions"], dtype=np.float64)
    schedule = dict(state["schedule"])
    schedule["num_domains"] = len(new)
    # A static policy's proportions are the new run's configuration; a learned one's rows carry their ratios.
    schedule["rows"] = [
        (e, m, (remap_proportions(p, old, new, prior) if carried else prior).tolist()) for e, m, p in schedule["rows"]
    ]
    out["schedule"] = schedule
    zero = np.zeros(len(new))
    history = state["history"]
    if isinstance(history, Mapping):  # {"steps", "rows", …}
        out["history"] = {**history, "rows": [remap_proportions(p, old, new, zero).tolist() for p in history["rows"]]}
    else:  # [(step, proportions), …]
        out["history"] = [(s, remap_proportions(p, old, new, zero).tolist()) for s, p in history]
    out["override"] = None
    out["pending"] = None
    return out


def remap_stream_rows(rows: Sequence[Sequence[int]], old: Sequence[str], new: Sequence[str]) -> list[list[int]]:
    """A loader's stream rows ``[next_batch, epochs(K), positions(K), active(K)]`` carried from ``old`` domains
    to ``new`` ones: a common domain keeps its pass and position, a new one starts its first pass.

    Example:
        >>> remap_stream_rows([[5, 1, 0, 7, 3, 1, 1], [-1] * 7], ["a", "b"], ["b", "c"])
        [[5, 0, 0, 3, 0, 1, 1], [-1, -1, -1, -1, -1, -1, -1]]
    """
    k, new = len(old), list(new)
    out = []
    for row in rows:
        if row[0] < 0:  # a slot that made no batch stays fresh
            out.append([-1] * (1 + 3 * len(new)))
            continue
        cols = [
            [row[1 + part * k + old.index(d)] if d in old else (1 if part == 2 else 0) for d in new]
            for part in range(3)
        ]
        out.append([int(row[0]), *cols[0], *cols[1], *cols[2]])
    return out
