"""The policy interface: reduced per-domain statistics in, proportions on the simplex out.

A policy is a deterministic function of the statistics it is fed. Every rank feeds it the same (all-reduced)
statistics, so every rank holds the same proportions without a broadcast. Policies see float64 numpy arrays
only: never tensors, devices, ranks or workers.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from odm._checks import is_int

__all__ = ["EVAL_LOSS", "REFERENCE_LOSS", "TRAIN_LOSS", "DomainStats", "Policy", "check_proportions", "check_stats"]

# Signals a policy may require (``Policy.requires``).
TRAIN_LOSS = "train_loss"  # per-domain training-loss sums and counts, every step
EVAL_LOSS = "eval_loss"  # per-domain held-out loss, when the policy asks for it
REFERENCE_LOSS = "reference_loss"  # per-domain reference-model loss (DoReMi)


@dataclasses.dataclass(frozen=True)
class DomainStats:
    """Per-domain statistics of one policy update, already reduced across ranks.

    Attributes:
        loss_sum: ``(K,)`` sum of per-sample (or per-token, when weighted) training losses per domain.
        count: ``(K,)`` number of samples (or total weight) behind ``loss_sum``; 0 for a domain not drawn.
        proportions: ``(K,)`` the proportions the observed batches were actually drawn under (count-weighted
            over the batches of the update). Importance weights use these, not the newest proportions.
        step: 1-based index of this update (``t`` in ``docs/algorithms.md``).
        num_samples: total samples seen by the run so far, this update included (ADO's ``n``).
        eval_loss: ``(K,)`` per-domain held-out mean loss, when an evaluation ran for this update.
        reference_loss: ``(K,)`` per-domain mean reference loss (DoReMi), when available.
        num_batches: how many micro-batches (``observe`` calls of equal size) the training statistics come
            from. ODM's paper rule sums one reward per micro-batch, so it scales with this count.
    """

    loss_sum: np.ndarray
    count: np.ndarray
    proportions: np.ndarray
    step: int
    num_samples: int = 0
    eval_loss: np.ndarray | None = None
    reference_loss: np.ndarray | None = None
    num_batches: int = 1

    @property
    def num_domains(self) -> int:
        return int(self.loss_sum.shape[0])

    @property
    def mean_loss(self) -> np.ndarray:
        """Per-domain mean loss; NaN for domains with no samples in this update."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.loss_sum / np.maximum(self.count, 1e-300), np.nan)

    @property
    def observed(self) -> np.ndarray:
        """Boolean mask of the domains that were drawn in this update."""
        return self.count > 0

    @classmethod
    def from_losses(
        cls,
        losses: Sequence[float] | np.ndarray,
        proportions: Sequence[float] | np.ndarray,
        *,
        step: int = 1,
        counts: Sequence[float] | np.ndarray | None = None,
        num_batches: int = 1,
    ) -> DomainStats:
        """Builds stats from per-domain *mean* losses (NaN = not drawn); handy in tests and simulations."""
        mean = np.asarray(losses, dtype=np.float64)
        if counts is None:
            cnt = np.where(np.isnan(mean), 0.0, 1.0)
        else:
            cnt = np.asarray(counts, dtype=np.float64)
        total = np.where(cnt > 0, np.nan_to_num(mean) * cnt, 0.0)
        return cls(
            loss_sum=total,
            count=cnt,
            proportions=np.asarray(proportions, dtype=np.float64),
            step=step,
            num_samples=int(cnt.sum()),
            num_batches=num_batches,
        )


_ARRAY_TAG = "__ndarray__"


def to_plain(obj: Any) -> Any:
    """Recursively turns numpy arrays and scalars into plain Python values (arrays as tagged dicts).

    Checkpoints then hold only what ``torch.load(weights_only=True)`` accepts (Lightning's default for local
    files), and :func:`from_plain` restores the arrays exactly (float64 survives the round trip bit for bit).
    """
    if isinstance(obj, np.ndarray):
        return {_ARRAY_TAG: obj.ravel().tolist(), "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    return obj


def from_plain(obj: Any) -> Any:
    """Inverse of :func:`to_plain` (tuples come back as lists)."""
    if isinstance(obj, dict):
        if _ARRAY_TAG in obj:
            return np.asarray(obj[_ARRAY_TAG], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])
        return {k: from_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_plain(v) for v in obj]
    return obj


def check_proportions(p: Any, num_domains: int | None = None, *, name: str = "proportions") -> np.ndarray:
    """Validates a proportions vector and returns it normalised to the simplex as float64.

    Raises:
        ValueError: if ``p`` is not 1-D, has the wrong length, holds a negative or non-finite entry, or sums
            to zero.
    """
    try:
        arr = np.asarray(p, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"`{name}` must be a sequence of numbers, got {p!r}") from err
    if arr.ndim == 1 and arr.size and (num_domains is None or arr.shape[0] == num_domains):
        # Fast path (one publish per step): NaN fails `min >= 0`, inf fails `total < inf`.
        with np.errstate(over="ignore"):  # huge finite entries overflow the sum: the slow path rescales them
            total = arr.sum()
        if arr.min() >= 0 and 0 < total < np.inf:
            return arr / total
    if arr.ndim != 1:
        raise ValueError(f"`{name}` must be one-dimensional, got shape {arr.shape}")
    if num_domains is not None and arr.shape[0] != num_domains:
        raise ValueError(f"`{name}` must have one entry per domain ({num_domains}), got {arr.shape[0]}: {p!r}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"`{name}` must be finite, got {p!r}")
    if np.any(arr < 0):
        raise ValueError(f"`{name}` must be non-negative, got {p!r}")
    if not arr.max() > 0:
        raise ValueError(f"`{name}` must not be all zero, got {p!r}")
    # Scaled by the largest entry first: the sum of huge finite entries ([1e308, 1e308]) overflows to inf.
    arr = arr / arr.max()
    return arr / arr.sum()


def check_stats(stats: DomainStats, num_domains: int, policy: str, *, losses: bool = True) -> float:
    """Whether ``stats`` can update a policy: checks the shapes, and skips (warning, state unchanged) an update
    with a non-finite count, proportion or — with ``losses`` — a non-finite loss of a drawn domain.

    Returns:
        The update's total count ``Σ count`` (truthy), or 0.0 for a skipped update or one with no samples.

    Raises:
        ValueError: if an array does not have one entry per domain.
    """
    want = (num_domains,)
    loss_sum, count, proportions = stats.loss_sum, stats.count, stats.proportions
    try:  # arrays (always, from the mixer): their .shape, without np.shape's conversion
        same = loss_sum.shape == want and count.shape == want and proportions.shape == want
    except AttributeError:
        same = False
    if not same:
        for field in ("loss_sum", "count", "proportions"):
            shape = np.shape(getattr(stats, field))
            if shape != want:
                raise ValueError(f"{policy}: `stats.{field}` must have shape ({num_domains},), got {shape}")
    # Fast path (the mixer's stats are always finite): a sum and a dot product propagate any NaN or inf (inf·0
    # is NaN); a finite overflow only sends the update down the exact path below.
    total = float(np.add.reduce(count))
    if math.isfinite(total + float(loss_sum.dot(proportions) if losses else np.add.reduce(proportions))):
        return total if total > 0 else 0.0
    bad = stats.observed & ~np.isfinite(stats.loss_sum) if losses else np.zeros(num_domains, dtype=bool)
    if bad.any() or not (np.all(np.isfinite(stats.count)) and np.all(np.isfinite(stats.proportions))):
        what = f"non-finite loss for domain(s) {np.flatnonzero(bad).tolist()}" if bad.any() else "non-finite counts"
        warnings.warn(
            f"odm: {policy} skipped update {stats.step}: {what}; its state is unchanged", RuntimeWarning, stacklevel=3
        )
        return 0.0
    return total if total > 0 else 0.0


def vouches_for_update(policy: Policy) -> bool:
    """Whether ``policy``'s ``update`` is one whose class sets :attr:`Policy.simplex_update`."""
    owner = next(c for c in type(policy).__mro__ if "update" in c.__dict__)
    return bool(owner.__dict__.get("simplex_update", False))


def _plain_config(value: Any) -> Any:
    """A configuration value as plain, comparable Python (arrays as lists, callables by name)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _plain_config(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain_config(v) for v in value]
    if callable(value) and not isinstance(value, type):
        return f"<callable {getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}>"
    return value


class Policy(ABC):
    """Base class of every mixing policy.

    Subclasses implement :meth:`_init_state` (called once the number of domains is known), :meth:`update` and
    the pair ``_get_state`` / ``_set_state``; the base class handles binding, validation and versioned
    ``state_dict`` envelopes. The math of each policy lives in pure functions beside its class.

    A policy is *bound* to a number of domains before use: :class:`odm.OnlineMixer` does it, or call
    :meth:`bind` yourself. Policies whose constructor already fixes ``K`` (``Natural(sizes)``) bind at once.
    """

    #: Short registry name (``policy="uniform"``).
    name: ClassVar[str] = ""
    #: Signals the policy needs (see the module constants).
    requires: ClassVar[frozenset[str]] = frozenset({TRAIN_LOSS})
    #: Version of the ``state_dict`` layout; bump when it changes.
    state_version: ClassVar[int] = 1
    #: True when this class's own :meth:`update` leaves the proportions on the simplex by construction (finite,
    #: ``>= 0``, summing to 1 up to rounding) whenever :func:`check_stats` accepted the statistics, so the mixer
    #: publishes them without checking them again. It vouches for the ``update`` defined in the class that sets
    #: it: a subclass that overrides ``update`` is checked again unless it sets the flag itself
    #: (:func:`vouches_for_update`).
    simplex_update: ClassVar[bool] = False
    _config_args: tuple[tuple[Any, ...], dict[str, Any]]

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # The constructor's arguments, as given: config() reports them (with the defaults filled in).
        obj = super().__new__(cls)
        obj._config_args = (args, kwargs)
        return obj

    def __init__(self) -> None:
        self._num_domains: int | None = None
        self._p: np.ndarray | None = None

    def config(self) -> dict[str, Any]:
        """The constructor configuration: every constructor argument by name, defaults filled in, as plain
        comparable values (arrays as lists, callables by qualified name).

        Two policies built with the same arguments have equal configs; the mixer compares them across ranks.

        Example:
            >>> from odm.policies import EXP3
            >>> EXP3(0.2).config()["gamma"], EXP3(0.2).config()["reward"]
            (0.2, 'loss')
        """
        args, kwargs = getattr(self, "_config_args", ((), {}))
        out: dict[str, Any] = {}
        # Defaults of every constructor up the hierarchy (a subclass passes **options to its base), then the
        # arguments given, bound to the class's own signature.
        for klass in reversed(type(self).__mro__):
            init = klass.__dict__.get("__init__")
            if init is None or klass is object:
                continue
            for param in inspect.signature(init).parameters.values():
                if param.name != "self" and param.default is not inspect.Parameter.empty:
                    out[param.name] = param.default
        bound = inspect.signature(type(self).__init__).bind_partial(self, *args, **kwargs)
        for name, value in bound.arguments.items():
            param = inspect.signature(type(self).__init__).parameters[name]
            if name == "self":
                continue
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                out.update(value)
            else:
                out[name] = value
        return {k: _plain_config(v) for k, v in sorted(out.items())}

    def set_publish_delay(self, delay: int) -> None:  # noqa: B027 - optional hook
        """Tells the policy how many updates pass between publishing proportions and observing batches drawn
        under them: proportions published at update ``u`` are first drawn in the batches of update
        ``u + delay + 1`` (the batches of the ``delay`` updates in between were already in flight). For a mixer
        whose rows apply ``D`` batches after the publish and that updates every ``E`` steps of one batch each,
        ``delay = ceil(D / E)`` (an update that mixes old and new batches counts as old). The mixer calls it
        once after binding; most policies ignore it (the default does nothing)."""

    def _usable(self, stats: DomainStats, *, losses: bool = True) -> float:
        """:func:`check_stats` for this policy: shapes checked, a non-finite update skipped with a warning.
        Returns the update's total count (0.0, falsy, when it cannot update the policy)."""
        return check_stats(stats, self.num_domains, type(self).__name__, losses=losses)

    def _eval_loss(self, stats: DomainStats) -> np.ndarray | None:
        """The update's held-out losses as a checked ``(K,)`` array, or ``None`` when there are none or any is
        non-finite (skipped with a warning: a policy never learns from a broken evaluation)."""
        if stats.eval_loss is None:
            return None
        k = self.num_domains
        ev = np.asarray(stats.eval_loss, dtype=np.float64)
        if ev.shape != (k,):
            raise ValueError(f"`eval_loss` must have shape ({k},), got {ev.shape}")
        if not np.all(np.isfinite(ev)):
            warnings.warn(
                f"odm: {type(self).__name__} skipped a non-finite held-out evaluation", RuntimeWarning, stacklevel=3
            )
            return None
        return ev

    # -- binding ---------------------------------------------------------------------------------------------
    @property
    def num_domains(self) -> int:
        if self._num_domains is None:
            raise RuntimeError(f"{type(self).__name__} is not bound to domains yet; call `.bind(num_domains)`")
        return self._num_domains

    @property
    def is_bound(self) -> bool:
        return self._num_domains is not None

    def _bind_from(self, **per_domain: Any) -> None:
        """Binds to the number of domains the given per-domain arguments imply (``None`` ones ignored).

        Raises:
            ValueError: the arguments have different lengths (names and lengths listed).
        """
        sizes = {name: len(x) for name, x in per_domain.items() if x is not None}
        if len(set(sizes.values())) > 1:
            named = " and ".join(f"`{n}` ({k})" for n, k in sizes.items())
            raise ValueError(f"{named} have different lengths: they disagree on the number of domains")
        if sizes:
            self.bind(next(iter(sizes.values())))

    def bind(self, num_domains: int) -> Policy:
        """Fixes the number of domains and initialises the state. Returns ``self``.

        Raises:
            ValueError: if already bound to another number of domains, or ``num_domains < 1``.
        """
        if not is_int(num_domains) or num_domains < 1:
            raise ValueError(f"`num_domains` must be a positive integer, got {num_domains!r}")
        if self._num_domains is not None:
            if self._num_domains != num_domains:
                raise ValueError(
                    f"{type(self).__name__} is configured for {self._num_domains} domains, "
                    f"but the mixer has {num_domains}"
                )
            return self
        self._num_domains = int(num_domains)
        self._init_state(self._num_domains)
        assert self._p is not None, "_init_state must set self._p"
        return self

    @abstractmethod
    def _init_state(self, num_domains: int) -> None:
        """Initialises the state for ``num_domains`` domains; must set ``self._p``."""

    # -- the face every policy shares ------------------------------------------------------------------------
    @property
    def proportions(self) -> np.ndarray:
        """Current sampling proportions: float64, shape ``(K,)``, on the simplex (a copy)."""
        if self._p is None:
            raise RuntimeError(f"{type(self).__name__} is not bound to domains yet; call `.bind(num_domains)`")
        return self._p.copy()

    @abstractmethod
    def update(self, stats: DomainStats) -> None:
        """Consumes one update's reduced statistics and moves the proportions."""

    def wants_eval(self, step: int) -> bool:
        """Whether the policy needs per-domain held-out losses (``DomainStats.eval_loss``) for update ``step``.

        The mixer (or the Lightning callback) asks before each update; when True it runs an evaluation and
        passes its per-domain mean losses in the stats of that update.
        """
        return False

    @property
    def exact_counts(self) -> bool:
        """When True, batches drawn under the current proportions use exact largest-remainder per-domain
        counts instead of random draws (Aioli's probe phases). The mixer publishes this with each row."""
        return False

    # -- state -----------------------------------------------------------------------------------------------
    def _get_state(self) -> dict[str, Any]:
        return {}

    def _set_state(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        pass

    def _check_state(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Refuses (``ValueError``) a decoded ``state`` that this policy's configuration cannot continue (e.g. a
        state of another ODM variant). Called before anything is changed."""

    def state_dict(self) -> dict[str, Any]:
        """A plain, versioned dict: class, version, number of domains, proportions and the policy's state.

        Numpy arrays in ``_get_state()`` are stored as plain lists (see :func:`to_plain`) and come back as
        arrays in ``_set_state``, so checkpoints load with ``torch.load(weights_only=True)``.
        """
        return to_plain(
            {
                "policy": type(self).__name__,
                "version": self.state_version,
                "num_domains": self.num_domains,
                "proportions": self.proportions,
                "state": self._get_state(),
            }
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores a state saved by :meth:`state_dict`; binds the policy if it is not bound yet.

        Raises:
            ValueError: if the state comes from another policy class, another version or another number of
                domains.
        """
        cls = state_dict.get("policy")
        if cls != type(self).__name__:
            raise ValueError(f"state_dict is for policy {cls!r}, not {type(self).__name__!r}")
        version = state_dict.get("version")
        if version != self.state_version:
            raise ValueError(
                f"{type(self).__name__} state_dict has version {version!r}; this odm reads {self.state_version}"
            )
        num = int(state_dict["num_domains"])
        if self.is_bound and num != self.num_domains:
            raise ValueError(
                f"{type(self).__name__} state_dict is for {num} domains, but this policy has {self.num_domains}"
            )
        state = from_plain(state_dict)
        self._check_state(state["state"])
        self.bind(num)
        self._p = np.array(state["proportions"], dtype=np.float64)
        self._set_state(state["state"])

    def __repr__(self) -> str:
        k = self._num_domains if self._num_domains is not None else "unbound"
        return f"{type(self).__name__}(num_domains={k})"
