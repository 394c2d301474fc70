"""Which policies the benchmark runs, and how it builds each one for a corpus.

Policies are discovered through the public lookup (``odm.policies.policy_names()`` / ``get_policy``): every
registered policy runs with its documented defaults, plus the :data:`VARIANTS` the protocol asks to compare.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np

import odm
from odm.policies import REFERENCE_LOSS

from .data import Corpus

__all__ = ["NEVER", "VARIANTS", "CurveReference", "Spec", "build_policy", "discover", "needs_reference", "policy_class"]


@dataclasses.dataclass(frozen=True)
class Spec:
    """One benchmarked configuration: a display label, a registry name and constructor arguments."""

    label: str
    name: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


# Variants the spec asks to compare (both ODM variants, loss- and progress-rewarded bandits); every other
# registered policy runs with its defaults. A variant whose arguments its policy does not take is skipped.
VARIANTS = [
    Spec("uniform", "uniform"),
    Spec("natural", "natural"),
    Spec("odm-paper", "odm", {"variant": "paper"}),
    Spec("odm-released", "odm", {"variant": "released"}),
    Spec("exp3s-progress", "exp3s", {"reward": "progress"}),  # (EXP3.S's default since 2026-11-29)
    Spec("exp3s-loss", "exp3s", {"reward": "loss"}),
    Spec("exp3-progress", "exp3", {"reward": "progress"}),
    # the best static prior as the starting point of the best bandit: does adapting on top of it help?
    Spec("exp3s-progress-natural", "exp3s", {"reward": "progress", "prior": "natural"}),
    # Its step size: Auer's η = γ/K leaves it close to its prior (the 2026-11-29 step-size study, tuning seeds).
    Spec("exp3s-progress-natural-eta0.05", "exp3s", {"reward": "progress", "prior": "natural", "eta": 0.05}),
    Spec("exp3s-progress-natural-eta0.2", "exp3s", {"reward": "progress", "prior": "natural", "eta": 0.2}),
    Spec("exp3s-progress-natural-eta0.8", "exp3s", {"reward": "progress", "prior": "natural", "eta": 0.8}),
    Spec("discounted_ucb-progress", "discounted_ucb", {"reward": "progress"}),
    # The alternatives the exploration and step-size defaults were decided against (see the policies' docstrings).
    Spec("ucb1-gamma0.1", "ucb1", {"gamma": 0.1}),
    Spec("discounted_ucb-gamma0.1", "discounted_ucb", {"gamma": 0.1}),
    Spec("doremi-eta1", "doremi", {"eta": 1.0}),
    # Round-based estimators with their defaults sized for long runs act only late (ADO starts fitting at step
    # 1000; one Aioli round of 250 steps spends 4·K·4 = 192 steps probing at K = 12): also run short settings.
    Spec("aioli-short", "aioli", {"round_steps": 100, "sweeps": 1, "probe_steps": 2}),
    Spec("ado-short", "ado", {"start_step": 50, "update_interval": 50}),
    # DynamixSFT anchors its exploration to "the collection's own proportions" (its `prior`): the natural sizes.
    Spec("dynamix-natural", "dynamix", {"prior": "natural"}),
    # The credit and temperatures DynamixSFT's default was chosen against on the tuning seeds (docs/policies.md;
    # in the tuning results of 2026-11-29 these are `dynamix-natural-t0.5/t2/t4`, and the default is
    # `dynamix-natural-lookahead`).
    Spec("dynamix-natural-own", "dynamix", {"prior": "natural", "credit": "own", "temperature": 0.5}),
    Spec("dynamix-natural-own-t2", "dynamix", {"prior": "natural", "credit": "own", "temperature": 2.0}),
    Spec("dynamix-natural-own-t4", "dynamix", {"prior": "natural", "credit": "own", "temperature": 4.0}),
    # Velocitune's `horizon` is the run's planned number of updates (a fact about the run, not a tuned value).
    Spec("velocitune", "velocitune", {"horizon": "steps"}),
]
NEVER = {"fixed", "scheduled", "temperature"}  # need a user-given vector or trajectory: nothing to learn here


def discover(selected: Sequence[str] | None) -> list[Spec]:
    """The specs to run: the variants above plus every other registered policy (or only those named)."""
    names = odm.policies.policy_names()
    specs = [s for s in VARIANTS if s.name in names]
    covered = {s.label for s in specs} | {s.name for s in specs if "variant" in s.kwargs}
    specs += [Spec(n, n) for n in names if n not in covered and n not in NEVER]
    if selected:
        wanted = [s.lower() for s in selected]
        unknown = [w for w in wanted if not any(w in (s.label, s.name) for s in specs)]
        if unknown:
            print(f"not registered (skipped): {unknown}; registered: {names}")
        specs = [s for s in specs if s.label in wanted or s.name in wanted]
    # uniform first: DoReMi's reference and the steps-to-baseline target come from it
    return sorted(specs, key=lambda s: s.label != "uniform")


def policy_class(name: str) -> type[odm.Policy]:
    """The class registered as ``name``, found through the public API (``odm.policies.__all__``)."""
    lookup = getattr(odm.policies, "policy_class", None)
    if lookup is not None:
        cls: type[odm.Policy] = lookup(name)
        return cls
    for attr in odm.policies.__all__:
        obj = getattr(odm.policies, attr)
        if isinstance(obj, type) and issubclass(obj, odm.Policy) and getattr(obj, "name", None) == name:
            return obj
    raise ValueError(f"unknown policy {name!r}; known policies: {odm.policies.policy_names()}")


def _reference_kwarg(cls: type) -> str | None:
    return next((p for p in inspect.signature(cls).parameters if "reference" in p), None)


class CurveReference:
    """DoReMi's reference: uniform's per-domain (EMA-smoothed) training loss at the same step, ``step -> (K,)``.

    The reference model is "the same model trained under uniform proportions"; comparing at equal steps makes
    the excess loss measure what the mixture does better or worse than uniform *so far*, rather than how far a
    young model is from a finished one (a final-loss reference makes every domain's excess positive early on).
    """

    def __init__(self, curve: np.ndarray) -> None:
        self.curve = np.asarray(curve, dtype=np.float64)

    def __call__(self, step: int) -> np.ndarray:
        return self.curve[min(max(step, 1), len(self.curve)) - 1]


def build_policy(spec: Spec, corpus: Corpus, reference: np.ndarray | None, *, steps: int | None = None) -> odm.Policy:
    """Builds ``spec`` for this corpus; raises ``RuntimeError`` with a readable reason when it cannot.

    ``reference``: uniform's ``(steps, K)`` smoothed training-loss curve of the same seed, for policies that
    take a ``reference…`` argument (DoReMi). ``steps``: the run's number of training steps, for arguments
    given as ``"steps"`` (Velocitune's horizon).
    """
    kwargs = {k: steps if v == "steps" and steps is not None else v for k, v in spec.kwargs.items()}
    if spec.name in ("natural", "temperature"):
        kwargs["sizes"] = corpus.natural_bytes
    if kwargs.get("prior") == "natural":  # a policy started from (and sharing back to) the natural proportions
        kwargs["prior"] = corpus.natural_bytes
    if spec.name == "entropy":  # the entropy prior estimates from a sample of each domain's training bytes
        kwargs["samples"] = [[corpus.train[d][:262_144].tobytes()] for d in corpus.domains]
    cls = policy_class(spec.name)  # the class, to inspect its signature
    key = _reference_kwarg(cls)
    if needs_reference(spec):
        if key is None:
            raise RuntimeError(f"{cls.__name__} needs reference losses but takes no `reference…` argument")
        if reference is None:
            raise RuntimeError("needs reference losses: run `uniform` (same seeds) in the same invocation")
        kwargs[key] = CurveReference(reference)
    try:
        return odm.policies.get_policy(spec.name, **kwargs)
    except (TypeError, ValueError) as err:
        raise RuntimeError(f"cannot build {spec.name}({', '.join(map(str, kwargs))}): {err}") from None


def needs_reference(spec: Spec) -> bool:
    """Whether the policy needs reference losses (DoReMi): its runs wait for uniform's run of the same seed."""
    cls = policy_class(spec.name)
    return _reference_kwarg(cls) is not None or REFERENCE_LOSS in cls.requires
