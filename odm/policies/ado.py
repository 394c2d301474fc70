"""ADO: sample domains by how fast their fitted scaling laws say they are still learning.

Jiang et al. 2024, "Adaptive Data Optimization: Dynamic Sample Selection with Scaling Laws". Per domain the
smoothed training loss is fitted with ``L̂_i(n) = e^{E_i} + e^{a_i}·n^{−α_i}`` (``n`` = samples seen by the run);
the slope of the fit, a credit for the domain's recent share of the data and the prior give the proportions.
See ``docs/algorithms.md``, "ADO".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from odm._checks import check_choice, check_float, check_int
from odm.policies.base import TRAIN_LOSS, DomainStats, Policy, check_proportions
from odm.policies.scaling_law import fit_power_law, power_law, savgol_smooth

__all__ = ["ADO", "apply_floor", "clip_floor", "fit_power_law", "power_law", "savgol_smooth"]

ALPHA_MIN_SLOPE = 0.05  # exponent floor in the learning speed
CREDIT_DECAY = 0.9  # h ← 0.9·h + 0.1·share
MEAN_WEIGHT = 0.9  # π = 0.9·π̄ + 0.1·ρ


def apply_floor(p: np.ndarray, floor: float) -> np.ndarray:
    """The distribution ``max(c·p, floor)`` summing to 1 (water-filling): entries below ``floor`` are lifted to
    it and the others scaled down by a common factor, so every entry is ``≥ floor`` and the order is kept."""
    k = p.shape[0]
    if floor <= 0:
        return p / p.sum()
    order = np.argsort(p, kind="stable")
    ps = p[order]
    suffix = np.cumsum(ps[::-1])[::-1]  # suffix[m] = Σ_{i≥m} ps[i]
    m_idx = np.arange(k)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = (1.0 - m_idx * floor) / suffix
    ok = (c * ps >= floor) & (suffix > 0)
    out = np.full(k, floor)
    if ok.any():
        m = int(np.argmax(ok))
        out[order[m:]] = c[m] * ps[m:]
    return out / out.sum()


def clip_floor(p: np.ndarray, floor: float) -> np.ndarray:
    """The authors' floor (``clip_min_probability``): ``max(p, floor)`` renormalised. Entries end at least
    ``floor/(1 + K·floor)``, not ``floor``; the order is kept."""
    out = np.maximum(p, floor)
    return out / out.sum()


def _credit(h: np.ndarray, mode: str) -> np.ndarray:
    return np.sqrt(h) if mode == "sqrt" else np.sqrt(h * (1.0 - h))


class ADO(Policy):
    """Adaptive Data Optimization: proportions from online per-domain scaling-law fits.

    Every ``update_interval`` updates from ``start_step`` on, each domain's smoothed training-loss history
    (per-domain mean loss in bins of ``bin_size`` updates, Savitzky-Golay smoothed over ``smoothing`` bins) is
    fitted with :func:`fit_power_law`; only finite fits replace a domain's parameters. Every update then:

    * ``h ← 0.9·h + 0.1·(realised batch share)``, ``h`` starting at the prior ``μ``;
    * learning speed ``v_i = max(α_i, 0.05)·(L̂_i(n) − e^{E_i}) / n`` (``n`` = samples seen so far);
    * score ``ρ_i ∝ μ_i·sqrt(h_i)·v_i``, normalised, floored at ``floor``;
    * proportions ``π = 0.9·π̄ + 0.1·ρ``, then ``π̄ ← π̄ + (ρ − π̄)/(t + 1)`` (the running mean of ``ρ`` over all
      updates, ``π̄_0 = μ``, ``ρ = μ`` before every domain has a fit). The order is the authors' code's: ``π``
      uses the mean *before* this update's ``ρ`` enters it.

    Fidelity to the authors' code (yidingjiang/ado): the fit adds their hinge penalties on ``a > 6.5`` and
    ``E < 0.5`` (``fit_penalties=True``, see :func:`fit_power_law`); the credit is their ``sqrt(h)``; the
    floor is their clip-and-renormalise with ``floor_rule="clip"``, while the default ``"exact"`` lifts
    entries to exactly ``floor`` (:func:`apply_floor`; the two differ by at most a factor ``1 + K·floor``
    on the floored entries). The authors subsample the per-step loss curve (every 10th step after a 101-step
    Savitzky-Golay filter); we average bins of ``bin_size`` updates and smooth over ``smoothing`` bins. Their
    ``ignore_steps`` drops the first steps from the fit's points after smoothing (their Pile config: 1000,
    equal to ``start_step``); ours keeps those updates out of the history (``n`` still counts their samples).

    ``n`` is the policy's own count of observed samples (``Σ stats.count``, the mixer's ``num_samples``), so a
    fit cannot be fooled by per-update ``num_samples``. ``π ≥ floor`` once ``μ ≥ floor``; ``π ≥ 0.1·floor``
    always. Losses must be positive (cross-entropy); other points are left out of the fit.

    Args:
        prior: ``μ`` (e.g. natural proportions); default uniform.
        start_step: first update at which a fit may run (the authors' 1000; evidence in ``docs/policies.md``).
        update_interval: fit at updates ``t ≥ start_step`` with ``t % update_interval == 0``.
        ignore_steps: updates at the start of the run left out of the history (the early transient). Default
            0; the authors' Pile config uses 1000.
        floor: probability floor of ``ρ``; ``floor·K ≤ 1``. ``None`` (default): the authors' 0.01, lowered to
            ``0.5/K`` when K > 50 so that the floor never takes more than half the mass.
        floor_rule: ``"exact"`` (water-filling: every entry of ``ρ`` ends ``≥ floor``) or ``"clip"`` (the
            authors' ``max(ρ, floor)`` renormalised).
        credit: ``"sqrt"`` (``sqrt(h)``, the authors' code and our specification) or ``"sqrt_var"``
            (``sqrt(h·(1−h))``, an alternative that also damps a dominant domain; not from the authors).
        fit_penalties: the authors' hinge penalties ``a ≤ 6.5``, ``E ≥ 0.5`` in the fit (default True). Off,
            an irreducible loss below 1.65 nats is fitted freely: at 1.2 nats the learning speed then differs by
            about 0.6× from the authors'.
        bin_size: updates per history point; adjacent points merge (and the size doubles) beyond
            ``max_points``, so the history and the fit cost stay bounded over any run length.
        max_points: most history points kept.
        smoothing: Savitzky-Golay window, in history points (odd; 1 disables it).
        huber_delta: Huber threshold of the fit, in log-loss units.

    Example:
        >>> ado = ADO(start_step=10, update_interval=10).bind(2)
        >>> ado.proportions
        array([0.5, 0.5])
    """

    name = "ado"
    requires = frozenset({TRAIN_LOSS})

    def __init__(
        self,
        prior: Sequence[float] | np.ndarray | None = None,
        *,
        start_step: int = 1000,
        update_interval: int = 1000,
        ignore_steps: int = 0,
        floor: float | None = None,
        floor_rule: str = "exact",
        credit: str = "sqrt",
        fit_penalties: bool = True,
        bin_size: int = 10,
        max_points: int = 2000,
        smoothing: int = 11,
        huber_delta: float = 1e-3,
    ) -> None:
        super().__init__()
        for arg, val, low in (
            ("start_step", start_step, 0),
            ("update_interval", update_interval, 1),
            ("ignore_steps", ignore_steps, 0),
            ("bin_size", bin_size, 1),
            ("max_points", max_points, 4),
            ("smoothing", smoothing, 1),
        ):
            check_int(val, arg, low=low)
        if smoothing % 2 == 0:
            raise ValueError(f"`smoothing` must be odd (a centred window), got {smoothing!r}")
        check_float(floor, "floor", low=0, high=1, high_open=True, allow_none=True)
        check_choice(credit, "credit", ("sqrt", "sqrt_var"))
        check_choice(floor_rule, "floor_rule", ("exact", "clip"))
        self.floor_rule, self.fit_penalties = floor_rule, bool(fit_penalties)
        huber_delta = check_float(huber_delta, "huber_delta", low=0, low_open=True)
        self.start_step, self.update_interval, self.ignore_steps = int(start_step), int(update_interval), ignore_steps
        self._floor_arg = None if floor is None else float(floor)
        self.floor, self.credit = self._floor_arg or 0.0, credit  # a None floor is resolved at bind
        self.max_points, self.smoothing, self.huber_delta = int(max_points), int(smoothing), float(huber_delta)
        self._initial_bin_size = int(bin_size)
        self.prior = None if prior is None else check_proportions(prior, name="prior")
        if self.prior is not None:
            self.bind(len(self.prior))

    def _init_state(self, num_domains: int) -> None:
        k = num_domains
        if self._floor_arg is None:
            self.floor = min(0.01, 0.5 / k)
        if self.floor * k > 1:
            raise ValueError(f"`floor`={self.floor} is infeasible for {k} domains (floor·K must be <= 1)")
        if self.prior is not None and len(self.prior) != k:
            raise ValueError(f"`prior` has {len(self.prior)} entries but the mixer has {k} domains")
        self._mu = self.prior.copy() if self.prior is not None else np.full(k, 1.0 / k)
        self._p = self._mu.copy()
        self._h = self._mu.copy()
        self._pi_bar = self._mu.copy()
        self._rho = self._mu.copy()
        self._params = np.full((k, 3), np.nan)
        self._fitted = np.zeros(k, dtype=bool)
        self._updates = 0
        self._n = 0.0
        self._bin_size = self._initial_bin_size
        self._bin = np.zeros(2 * k + 2)  # current bin: loss sums, counts, Σn, number of updates
        self._hist = np.zeros((0, 2 * k + 2))  # completed bins, same layout

    def _get_state(self) -> dict[str, Any]:
        return {
            "h": self._h.tolist(),
            "pi_bar": self._pi_bar.tolist(),
            "rho": self._rho.tolist(),
            "params": self._params.tolist(),
            "fitted": self._fitted.tolist(),
            "updates": self._updates,
            "n": self._n,
            "bin_size": self._bin_size,
            "bin": self._bin.tolist(),
            "hist": self._hist.tolist(),
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        k = self.num_domains
        self._h = np.array(state["h"], dtype=np.float64)
        self._pi_bar = np.array(state["pi_bar"], dtype=np.float64)
        self._rho = np.array(state["rho"], dtype=np.float64)
        self._params = np.array(state["params"], dtype=np.float64).reshape(k, 3)
        self._fitted = np.array(state["fitted"], dtype=bool)
        self._updates = int(state["updates"])
        self._n = float(state["n"])
        self._bin_size = int(state["bin_size"])
        self._bin = np.array(state["bin"], dtype=np.float64)
        self._hist = np.array(state["hist"], dtype=np.float64).reshape(-1, 2 * k + 2)

    # -- public face ---------------------------------------------------------------------------------------
    @property
    def params(self) -> np.ndarray:
        """``(K, 3)`` fitted ``(a, E, α)`` per domain; NaN rows for domains not fitted yet."""
        return self._params.copy()

    @property
    def credit_share(self) -> np.ndarray:
        """``h``, the smoothed realised share of each domain."""
        return self._h.copy()

    @property
    def score(self) -> np.ndarray:
        """``ρ``, the last floored score (``μ`` before the first fit)."""
        return self._rho.copy()

    def history(self) -> tuple[np.ndarray, np.ndarray]:
        """The fit's data: ``(n, loss)`` with ``n`` ``(T,)`` and per-domain mean losses ``(K, T)`` (NaN: no
        sample of the domain in that bin), before smoothing."""
        k = self.num_domains
        sums, cnt = self._hist[:, :k], self._hist[:, k : 2 * k]
        with np.errstate(invalid="ignore", divide="ignore"):
            loss = np.where(cnt > 0, sums / np.where(cnt > 0, cnt, 1.0), np.nan).T
        n = self._hist[:, 2 * k] / np.maximum(self._hist[:, 2 * k + 1], 1.0)
        return n, loss

    def update(self, stats: DomainStats) -> None:
        if not self._usable(stats):
            return
        total = float(stats.count.sum())
        self._updates += 1
        self._n += total
        self._h = CREDIT_DECAY * self._h + (1.0 - CREDIT_DECAY) * stats.count / total
        if self._updates > self.ignore_steps:
            self._record(stats)
        t = self._updates
        if t >= self.start_step and t % self.update_interval == 0 and len(self._hist) >= 3:
            self._fit()
        self._rho = self._score() if self._ready() else self._mu.copy()
        # The authors' order: π from the mean before this ρ, then the mean takes it in.
        self._p = MEAN_WEIGHT * self._pi_bar + (1.0 - MEAN_WEIGHT) * self._rho
        self._pi_bar = self._pi_bar + (self._rho - self._pi_bar) / (t + 1)

    # -- internals -----------------------------------------------------------------------------------------
    def _record(self, stats: DomainStats) -> None:
        k = self.num_domains
        self._bin[:k] += stats.loss_sum
        self._bin[k : 2 * k] += stats.count
        self._bin[2 * k] += self._n
        self._bin[2 * k + 1] += 1
        if self._bin[2 * k + 1] >= self._bin_size:
            self._hist = np.vstack([self._hist, self._bin[None]])
            self._bin = np.zeros(2 * k + 2)
            if len(self._hist) > self.max_points:
                # Merge adjacent bins (sums add up exactly); an odd last bin stays as it is.
                even = len(self._hist) // 2 * 2
                merged = self._hist[:even].reshape(-1, 2, 2 * k + 2).sum(axis=1)
                self._hist = np.vstack([merged, self._hist[even:]])
                self._bin_size *= 2

    def _fit(self) -> None:
        n, loss = self.history()
        mask = np.isfinite(loss)
        if self.smoothing > 1:
            loss = savgol_smooth(_fill_gaps(loss), self.smoothing)
        params, ok = fit_power_law(n, loss, mask, delta=self.huber_delta, penalties=self.fit_penalties)
        self._params[ok] = params[ok]
        self._fitted |= ok

    def _ready(self) -> bool:
        return bool(np.all(self._fitted | (self._mu == 0)))

    def _score(self) -> np.ndarray:
        a, alpha = self._params[:, 0], self._params[:, 2]
        log_n = np.log(self._n)
        # log v = log max(α, 0.05) + a − α·log n − log n   (L̂ − e^E = e^a·n^{−α})
        log_v = np.log(np.maximum(alpha, ALPHA_MIN_SLOPE)) + a - alpha * log_n - log_n
        with np.errstate(divide="ignore"):
            logits = np.log(self._mu) + np.log(_credit(self._h, self.credit)) + np.where(self._fitted, log_v, 0.0)
        if not np.any(np.isfinite(logits)):
            return self._mu.copy()
        logits = np.where(np.isfinite(logits), logits, -np.inf)
        z = np.exp(logits - logits.max())
        floored = apply_floor if self.floor_rule == "exact" else clip_floor
        return floored(z / z.sum(), self.floor)


def _fill_gaps(loss: np.ndarray) -> np.ndarray:
    """Forward-fills NaN along the last axis (leading NaN take the first value) so smoothing sees no holes."""
    valid = np.isfinite(loss)
    t = loss.shape[-1]
    idx = np.where(valid, np.arange(t), 0)
    np.maximum.accumulate(idx, axis=-1, out=idx)
    first = np.argmax(valid, axis=-1)
    idx = np.where(np.cumsum(valid, axis=-1) > 0, idx, first[:, None])
    out = np.take_along_axis(loss, idx, axis=-1)
    return np.where(np.isfinite(out), out, 0.0)
