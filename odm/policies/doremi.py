"""DoReMi, online: exponentiated-gradient domain weights driven by the excess loss over a reference model.

Xie et al. 2023, "DoReMi: Optimizing Data Mixtures Speeds Up Language Model Pretraining". See ``docs/algorithms.md``,
"DoReMi, online".
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from odm._checks import check_float
from odm.policies.base import TRAIN_LOSS, DomainStats, Policy, check_proportions

__all__ = ["DoReMi", "doremi_step"]

Reference = Sequence[float] | np.ndarray | Callable[[int], Sequence[float] | np.ndarray]


def doremi_step(log_alpha: np.ndarray, excess: np.ndarray, eta: float, smoothing: float) -> np.ndarray:
    """One DoReMi update in log space: ``α ← α ⊙ exp(η·λ)``, normalised, then ``α ← (1 − c)·α + c/K``.

    Args:
        log_alpha: ``(K,)`` log of the current weights (any additive constant).
        excess: ``(K,)`` non-negative excess losses ``λ``.
        eta: step size ``η``.
        smoothing: ``c``, the weight of the uniform mixture.

    Returns:
        The new weights ``α`` (on the simplex, every entry ``≥ c/K``).
    """
    z = log_alpha + eta * excess
    w = np.exp(z - z.max())  # shifting keeps any excess finite
    k = w.shape[0]
    return (1.0 - smoothing) * w / w.sum() + smoothing / k


class DoReMi(Policy):
    """Online DoReMi: sample domains with the exponentiated-gradient weights of the excess loss.

    Per update, for each domain ``i`` drawn in it, the excess loss is ``λ_i = max(L̄_i − L̄ref_i, 0)`` with
    ``L̄_i`` the domain's mean training loss of the update and ``L̄ref_i`` the reference model's mean loss; a
    domain not drawn keeps its previous ``λ_i`` (0 at the start). Then::

        α ← α ⊙ exp(η·λ);   α ← (1 − c)·α/Σα + c/K

    and ``α`` is used as the sampling proportions. The time average over the ``T`` updates so far is
    :attr:`average_proportions`: ``ᾱ = (1/(T+1))·Σ_{t=0..T} α_t`` with the initial weights ``α_0`` included (the
    official code, sangmichaelxie/doremi, averages from its initial weights; ``average_initial=True``), or
    ``(1/T)·Σ_{t=1..T} α_t`` (the paper's formula; ``average_initial=False``). Export it
    (``odm.policies.Fixed(ᾱ)``) for a final static run, the DoReMi workflow.

    NOTE: the paper takes the mean over a domain's tokens of ``max(ℓ_θ − ℓ_ref, 0)``; the mixer reduces losses
    to per-domain sums, so this is the clipped difference of the means (equal when every token's excess has the
    same sign; never larger). For the per-token version, pass per-sample excesses ``max(ℓ_θ − ℓ_ref, 0)`` as
    the observed loss and ``reference=[0.0] * K``. The original method trains a small *proxy* model with ``α``
    as per-domain *loss weights* (Group DRO) and uses ``ᾱ`` for the real run; here ``α`` is used online as the
    *sampling* proportions.

    Args:
        eta: ``η > 0``, step size. Default 0.1, not the authors' 1.0 (tuned for proxy training with loss
            weights, not online sampling; evidence in ``docs/policies.md``).
        smoothing: ``c ∈ [0, 1]``, weight of the uniform mixture (1e-3 in the authors' runs).
        reference: per-domain reference losses ``(K,)``, or a callable ``step -> (K,)`` (``stats.step``), e.g.
            a lookup into a reference run's loss curve. When an update carries ``stats.reference_loss`` (the
            reference model's mean loss on the same samples), that takes precedence.
        prior: initial weights (default uniform).
        average_initial: include ``α_0`` in :attr:`average_proportions` (default True, as the official code).

    Raises:
        TypeError: without ``reference``, or when it is neither a sequence of numbers nor a callable.

    Example:
        >>> policy = DoReMi(reference=[1.0, 1.0]).bind(2)
        >>> policy.update(DomainStats.from_losses([2.0, 1.0], [0.5, 0.5]))
        >>> policy.proportions.round(3)
        array([0.525, 0.475])
    """

    name = "doremi"
    requires = frozenset({TRAIN_LOSS})

    def __init__(
        self,
        eta: float = 0.1,
        *,
        smoothing: float = 1e-3,
        reference: Reference | None = None,
        prior: Sequence[float] | np.ndarray | None = None,
        average_initial: bool = True,
    ) -> None:
        super().__init__()
        self.average_initial = bool(average_initial)
        eta = check_float(eta, "eta", low=0, low_open=True)
        smoothing = check_float(smoothing, "smoothing", low=0, high=1)
        if reference is None:
            raise TypeError(
                "DoReMi needs reference losses: pass `reference=` per-domain values (a reference model's mean "
                "loss per domain) or a callable step -> per-domain values"
            )
        self.eta, self.smoothing = float(eta), float(smoothing)
        self._ref_fn: Callable[[int], Any] | None = None
        self._ref: np.ndarray | None = None
        if callable(reference):
            self._ref_fn = reference
        else:
            try:
                ref = np.asarray(reference, dtype=np.float64)
            except (TypeError, ValueError) as err:
                raise TypeError(f"`reference` must be per-domain numbers or a callable, got {reference!r}") from err
            if ref.ndim != 1 or not np.all(np.isfinite(ref)):
                raise ValueError(f"`reference` must be a 1-D sequence of finite losses, got {reference!r}")
            self._ref = ref
        self.prior = None if prior is None else check_proportions(prior, name="prior")
        self._bind_from(reference=self._ref, prior=self.prior)

    def _init_state(self, num_domains: int) -> None:
        if self._ref is not None and len(self._ref) != num_domains:
            raise ValueError(f"`reference` has {len(self._ref)} entries but the mixer has {num_domains} domains")
        self._p = self.prior.copy() if self.prior is not None else np.full(num_domains, 1.0 / num_domains)
        self._alpha0 = self._p.copy()
        self._excess = np.zeros(num_domains)
        self._alpha_sum = np.zeros(num_domains)
        self._num_updates = 0

    def _get_state(self) -> dict[str, Any]:
        return {
            "excess": self._excess.tolist(),
            "alpha_sum": self._alpha_sum.tolist(),
            "num_updates": self._num_updates,
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        self._excess = np.array(state["excess"], dtype=np.float64)
        self._alpha_sum = np.array(state["alpha_sum"], dtype=np.float64)
        self._num_updates = int(state["num_updates"])

    @property
    def excess(self) -> np.ndarray:
        """``λ``, the latest excess loss of each domain."""
        return self._excess.copy()

    @property
    def average_proportions(self) -> np.ndarray:
        """``ᾱ``, the mean of the weights over all updates, ``α_0`` included when ``average_initial`` (the
        initial weights before the first update)."""
        if self._num_updates == 0:
            return self.proportions
        if self.average_initial:
            return (self._alpha_sum + self._alpha0) / (self._num_updates + 1)
        return self._alpha_sum / self._num_updates

    def _reference(self, stats: DomainStats) -> np.ndarray:
        k = self.num_domains
        if stats.reference_loss is not None:
            ref = np.asarray(stats.reference_loss, dtype=np.float64)
        elif self._ref_fn is not None:
            ref = np.asarray(self._ref_fn(stats.step), dtype=np.float64)
        else:
            assert self._ref is not None
            return self._ref
        if ref.shape != (k,):
            raise ValueError(f"reference losses must have shape ({k},), got {ref.shape} at step {stats.step}")
        return ref

    def update(self, stats: DomainStats) -> None:
        # An update with no samples still steps: absent domains keep their previous excess.
        if not self._usable(stats) and stats.count.sum() != 0:
            return
        ref = self._reference(stats)
        mean = stats.mean_loss
        seen = stats.observed
        if not (np.all(np.isfinite(mean[seen])) and np.all(np.isfinite(ref[seen]))):
            warnings.warn("odm: DoReMi skipped an update with non-finite reference losses", RuntimeWarning, 2)
            return
        self._excess = np.where(seen, np.maximum(np.where(seen, mean, 0.0) - ref, 0.0), self._excess)
        assert self._p is not None
        with np.errstate(divide="ignore"):
            log_alpha = np.log(self._p)
        self._p = doremi_step(log_alpha, self._excess, self.eta, self.smoothing)
        self._alpha_sum = self._alpha_sum + self._p
        self._num_updates += 1
