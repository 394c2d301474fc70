"""Mixing policies: per-domain statistics in, sampling proportions out.

Every policy can be passed as an instance (``odm.policies.EXP3()``) or named by string (``policy="exp3"``);
:func:`get_policy` resolves both.
"""

from __future__ import annotations

from typing import Any

from odm.policies import ado, aioli, bandits, doremi, dynamix, odm_exp3, prior, scheduled, skillit, ucb, velocitune
from odm.policies.ado import *  # noqa: F403 (ADO)
from odm.policies.aioli import *  # noqa: F403 (Aioli)
from odm.policies.bandits import *  # noqa: F403 (EXP3, EXP3S)
from odm.policies.base import (
    EVAL_LOSS,
    REFERENCE_LOSS,
    TRAIN_LOSS,
    DomainStats,
    Policy,
    check_proportions,
    check_stats,
)
from odm.policies.constraints import Constraints
from odm.policies.doremi import *  # noqa: F403 (DoReMi)
from odm.policies.dynamix import *  # noqa: F403 (DynamixSFT)
from odm.policies.odm_exp3 import *  # noqa: F403 (ODM)
from odm.policies.prior import *  # noqa: F403 (EntropyPrior)
from odm.policies.scheduled import *  # noqa: F403 (Scheduled)
from odm.policies.skillit import *  # noqa: F403 (SkillIt)
from odm.policies.static import Fixed, Natural, Temperature, Uniform
from odm.policies.ucb import *  # noqa: F403 (UCB1, DiscountedUCB, SlidingWindowUCB)
from odm.policies.velocitune import *  # noqa: F403 (Velocitune)

# Each family module (one file per family, see docs/architecture.md) lists its public policies in __all__; the
# registry below finds every Policy subclass with a `name`, so a new policy needs no edit here.
_FAMILIES = (bandits, odm_exp3, ucb, prior, scheduled, aioli, ado, doremi, skillit, dynamix, velocitune)

__all__ = [
    *(name for module in _FAMILIES for name in module.__all__),
    "EVAL_LOSS",
    "REFERENCE_LOSS",
    "TRAIN_LOSS",
    "Constraints",
    "DomainStats",
    "Fixed",
    "Natural",
    "Policy",
    "Temperature",
    "Uniform",
    "check_proportions",
    "check_stats",
    "default_policy_names",
    "get_policy",
    "policy_class",
    "policy_names",
]


def _all_subclasses(cls: type) -> list[type[Policy]]:
    out: list[type[Policy]] = []
    sub: type[Policy]
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


# Every policy class that sets a `name`. Classes that need data (Fixed, Natural) are listed too: their name gives
# a clear error asking for an instance. Private: use policy_names() / policy_class() / get_policy().
_REGISTRY: dict[str, type[Policy]] = {cls.name: cls for cls in _all_subclasses(Policy) if cls.name}


def policy_names() -> list[str]:
    """Names accepted by :func:`get_policy` (and by ``policy=`` everywhere).

    Example:
        >>> {"dynamix", "velocitune", "odm"} <= set(policy_names())
        True
    """
    return sorted(_REGISTRY)


def policy_class(name: str) -> type[Policy]:
    """The policy class registered under ``name`` (e.g. to inspect its signature or ``requires``).

    Raises:
        ValueError: for an unknown name (the message lists the known ones).

    Example:
        >>> policy_class("exp3s").__name__
        'EXP3S'
    """
    key = name.lower().replace("-", "_") if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ValueError(f"unknown policy {name!r}; known policies: {', '.join(policy_names())}")
    return _REGISTRY[key]


def default_policy_names() -> list[str]:
    """Names of the policies that build from their name alone (documented defaults); the others need data
    (sizes, a vector, a trajectory, a reference) and say so when named alone.

    Example:
        >>> {"uniform", "odm", "exp3"} <= set(default_policy_names()), "fixed" in default_policy_names()
        (True, False)
    """
    out = []
    for name in policy_names():
        try:
            get_policy(name)
        except TypeError:
            continue
        out.append(name)
    return out


def get_policy(policy: str | Policy, **kwargs: Any) -> Policy:
    """Returns ``policy`` itself if it is a :class:`Policy`, else builds the registered policy of that name.

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
        TypeError: for anything that is neither a name nor a :class:`Policy`.
    """
    if isinstance(policy, Policy):
        if kwargs:
            raise TypeError("keyword arguments are only accepted with a policy name, not a Policy instance")
        return policy
    if isinstance(policy, str):
        cls = policy_class(policy)
        try:
            return cls(**kwargs)
        except TypeError as err:
            raise TypeError(
                f"policy {policy!r} cannot be built from its name alone ({err}); "
                f"pass an instance, e.g. odm.policies.{cls.__name__}(...)"
            ) from err
    raise TypeError(f"`policy` must be a policy name or an odm.policies.Policy, got {type(policy).__name__}")
