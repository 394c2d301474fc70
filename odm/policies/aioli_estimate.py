"""Aioli's estimator: the LearnParams accumulation of one round, the un-smoothing solve and the
exponentiated-gradient (or EMA) update of the mixture — the paper's math, with no scheduling.

Chen et al. 2024, "Aioli: A Unified Optimization Framework for Language Model Data Mixing". Within a round the
held-out losses move linearly with the mixture, ``L^{t+1} = L^t − A·p^t``. Probe ``j`` trains on a mixture
``W[j]`` between two evaluations; the loss drops fill column ``j`` of ``D``; ``D = A·Wᵀ`` is solved for ``A``.
:class:`odm.policies.Aioli` decides *when* probes run and evaluations come (the scheduler); this module only
accumulates what it is told and updates the mixture. See ``docs/algorithms.md``, "Aioli".
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["AioliEstimator", "aioli_normalize", "aioli_unsmooth", "probe_batch_mixture", "probe_mixture"]

# Tie-break nudge of the probe batches' off-target entries (far below a 1e-6 mixture match even summed over K²).
_NUDGE = 1e-10


def probe_mixture(j: int, num_domains: int, weight: float) -> np.ndarray:
    """The LearnParams probe mixture ``m_j``: ``weight`` on domain ``j``, ``(1 − weight)/(K − 1)`` on the others."""
    if num_domains == 1:
        return np.ones(1)
    m = np.full(num_domains, (1.0 - weight) / (num_domains - 1))
    m[j] = weight
    return m


def probe_batch_mixture(j: int, num_domains: int, weight: float, rotation: int) -> np.ndarray:
    """``m_j`` with its off-target entries nudged so that largest-remainder rounding hands the spare samples
    of a batch to the off-target domains in an order rotated by ``rotation`` (not always the lowest indices).

    The nudges (``≤ K·1e-10``) change no count except among tied remainders, and a realised count stays within
    one of ``m_j·B``: over the steps of a probe the off-target mass is then spread over every domain.
    """
    m = probe_mixture(j, num_domains, weight)
    off = [i for i in range(num_domains) if i != j]
    for rank in range(len(off)):
        m[off[(rotation + rank) % len(off)]] += (len(off) - rank) * _NUDGE
    return m / m.sum()


def aioli_unsmooth(d: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Solves ``D = A·Wᵀ`` for ``A`` (``D[:, j]`` the loss drops of probe ``j``, ``W[j]`` its mixture).

    Falls back to least squares when ``W`` is singular (e.g. two probes realised the same counts).
    """
    try:
        at = np.linalg.solve(w, d.T)
    except np.linalg.LinAlgError:
        at = np.linalg.lstsq(w, d.T, rcond=None)[0]
    return at.T


def aioli_normalize(a: np.ndarray) -> np.ndarray:
    """Ā: shift by ``min(A)`` when it is negative, then divide by the sum of all entries (0 stays 0)."""
    a = a.astype(np.float64, copy=True)
    lo = a.min()
    if lo < 0:
        a -= lo
    total = a.sum()
    return a / total if total > 0 else np.zeros_like(a)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max())
    return z / z.sum()


class AioliEstimator:
    """One round's LearnParams sums and the learned mixture (the state the scheduler does not own).

    Args:
        num_domains: ``K``.
        log_base: log of the base proportions of the update (uniform or the prior).
        eta: ``η``, the exponentiated-gradient step size.
        ema: ``β`` for EMA mode, ``None`` for cumulative mode.
        normalize: normalise ``A`` before the update.
        sweeps: ``R``, probes of each domain per round (``D`` and ``W`` are averaged over them).
        probe_steps: ``s``, updates per probe (``W[j]`` is the mean realised share over them).
        unsmooth: ``"realised"`` (``W`` from realised counts) or ``"nominal"`` (``W[j] = m_j``).
    """

    ARRAYS = ("w_acc", "d_sum", "w_sum", "l_prev", "log_w", "ema")

    def __init__(
        self,
        num_domains: int,
        log_base: np.ndarray,
        *,
        eta: float,
        ema: float | None,
        normalize: bool,
        sweeps: int,
        probe_steps: int,
        unsmooth: str,
    ) -> None:
        k = num_domains
        self.log_base, self.eta, self.beta, self.normalize = log_base, eta, ema, normalize
        self.sweeps, self.probe_steps, self.unsmooth = sweeps, probe_steps, unsmooth
        self.w_acc = np.zeros(k)  # realised shares of the probe under way
        self.d_sum = np.zeros((k, k))  # D·R: loss drops, column j = probe j
        self.w_sum = np.zeros((k, k))  # W·R: row j = mixture of probe j
        self.l_prev = np.zeros(k)  # held-out losses at the last evaluation
        self.log_w = log_base.copy()  # cumulative mode: log w
        self.ema = np.zeros((k, k))  # EMA mode: E
        self.estimate: np.ndarray | None = None  # the last round's Ā

    def start_round(self, l_now: np.ndarray) -> None:
        """A round opens at an evaluation: the sums restart from it."""
        k = self.l_prev.shape[0]
        self.w_acc = np.zeros(k)
        self.d_sum = np.zeros((k, k))
        self.w_sum = np.zeros((k, k))
        self.l_prev = l_now.copy()

    def observe(self, realised: np.ndarray) -> None:
        """Adds the realised sample shares of one update of the probe under way."""
        self.w_acc += realised

    def end_probe(self, j: int, l_now: np.ndarray, nominal: np.ndarray) -> None:
        """Probe ``j`` ends at an evaluation ``l_now``: its drops fill column ``j`` of ``D``, its mixture row
        ``j`` of ``W`` (the realised shares, or ``nominal`` = ``m_j`` with ``unsmooth="nominal"``)."""
        self.d_sum[:, j] += self.l_prev - l_now
        self.w_sum[j] += self.w_acc / self.probe_steps if self.unsmooth == "realised" else nominal
        self.l_prev = l_now
        self.w_acc = np.zeros_like(self.w_acc)

    def end_round(self) -> bool:
        """Solves for ``A``, normalises it and updates the mixture. Returns False (mixture kept) when the
        estimate is not finite."""
        a = aioli_unsmooth(self.d_sum / self.sweeps, self.w_sum / self.sweeps)
        if self.normalize:
            a = aioli_normalize(a)
        if not np.all(np.isfinite(a)):
            return False
        first = self.estimate is None
        self.estimate = a
        if self.beta is None:
            self.log_w = self.log_w + self.eta * a.sum(axis=0)
            self.log_w -= self.log_w.max()  # keeps millions of rounds finite
        elif first:
            self.ema = a.copy()  # E₁ = Ā₁, as the authors' code starts it (not (1−β)·Ā₁ from E₀ = 0)
        else:
            self.ema = (1.0 - self.beta) * a + self.beta * self.ema
        return True

    def proportions(self) -> np.ndarray:
        """The learned mixture: ``softmax(log w)``, or ``∝ base ⊙ exp(η·colsum(E))`` in EMA mode."""
        if self.beta is None:
            return _softmax(self.log_w)
        return _softmax(self.log_base + self.eta * self.ema.sum(axis=0))

    def state(self) -> dict[str, Any]:
        out: dict[str, Any] = {key: getattr(self, key).tolist() for key in self.ARRAYS}
        out["estimate"] = None if self.estimate is None else self.estimate.tolist()
        return out

    def load(self, state: dict[str, Any]) -> None:
        for key in self.ARRAYS:
            setattr(self, key, np.array(state[key], dtype=np.float64))
        self.estimate = None if state["estimate"] is None else np.array(state["estimate"], dtype=np.float64)
