"""Fitting power-law loss curves ``L̂(n) = e^E + e^a·n^{−α}`` per domain, and smoothing curves before the fit.

ADO's scaling-law machinery (Jiang et al. 2024, ``docs/algorithms.md`` "ADO"), kept apart from the policy: a batched
Huber fit in log space (Gauss-Newton from a grid of starting points, all domains at once) and Savitzky-Golay
smoothing. Plain numpy, no policy state.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["ALPHA_MAX", "A_MAX", "E_MIN", "fit_penalty", "fit_power_law", "power_law", "savgol_smooth"]

ALPHA_MAX = 0.8  # bound on the fitted exponent
# The authors' fit adds the hinge penalties max(a − 6.5, 0) + max(0.5 − E, 0) to the summed Huber loss
# (yidingjiang/ado, `loss_fn`): the law's scale e^a stays below e^6.5 and its irreducible loss e^E above e^0.5.
A_MAX = 6.5
E_MIN = 0.5


def power_law(params: np.ndarray, n: np.ndarray | float) -> np.ndarray:
    """``L̂(n) = e^E + e^a·n^{−α}`` for ``params[..., :] = (a, E, α)``."""
    a, e, alpha = params[..., 0], params[..., 1], params[..., 2]
    return np.exp(e) + np.exp(a - alpha * np.log(n))


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    ar = np.abs(r)
    m = np.minimum(ar, delta)  # 0.5·r² inside ±δ, δ·(|r| − δ/2) outside
    return m * (ar - 0.5 * m)


def fit_penalty(params: np.ndarray) -> np.ndarray:
    """The authors' hinge penalties ``max(a − 6.5, 0) + max(0.5 − E, 0)`` for ``params[..., :] = (a, E, α)``."""
    return np.maximum(params[..., 0] - A_MAX, 0.0) + np.maximum(E_MIN - params[..., 1], 0.0)


def fit_power_law(
    n: np.ndarray,
    loss: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    delta: float = 1e-3,
    num_alphas: int = 17,
    num_starts: int = 2,
    num_iters: int = 100,
    penalties: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Fits ``log L ≈ log(e^E + e^a·n^{−α})`` per row of ``loss`` with a Huber loss, ``α ∈ [0, 0.8]``.

    Vectorised over domains and initialisations: a grid of ``num_alphas`` exponents, each with the
    least-squares ``(e^E, e^a)`` of the (linear, given ``α``) model, seeds ``num_starts`` damped Gauss-Newton
    (Levenberg-Marquardt on iteratively reweighted Huber residuals) runs per domain; ``α`` is projected onto
    its bounds after each step and the best run per domain is kept.

    Args:
        n: ``(T,)`` positive sample counts.
        loss: ``(K, T)`` positive losses.
        mask: ``(K, T)`` points to use (default: the finite, positive ones).
        delta: Huber threshold, in log-loss units.
        num_alphas: size of the exponent grid of initialisations.
        num_starts: initialisations refined per domain.
        num_iters: most refinement iterations (a run stops once it gains under 1e-10, relative, twice).
        penalties: the authors' hinge penalties ``max(a − 6.5, 0) + max(0.5 − E, 0)`` (:func:`fit_penalty`),
            applied as the bounds ``a ≤ 6.5``, ``E ≥ 0.5``: the hinges have slope 1 and the Huber sum's gradient
            is at most ``δ·T`` for ``T`` points, so for ``δ·T < 1`` (fewer than 1000 points at the default δ)
            the penalised optimum lies on the bounds and the two fits agree. An irreducible loss below
            ``e^0.5 ≈ 1.65`` nats is then fitted as ``e^0.5``.

    Returns:
        ``(params, ok)``: ``(K, 3)`` rows ``(a, E, α)`` and a ``(K,)`` mask of the finite fits (a row with fewer
        than 3 usable points is not fitted).
    """
    n = np.asarray(n, dtype=np.float64)
    y_lin = np.asarray(loss, dtype=np.float64)
    k = y_lin.shape[0]
    valid = np.isfinite(y_lin) & (y_lin > 0) & (n > 0)[None, :]
    if mask is not None:
        valid &= mask
    enough = valid.sum(axis=1) >= 3
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(valid, np.log(np.where(valid, y_lin, 1.0)), 0.0)
    wmask = valid.astype(np.float64)
    log_n = np.log(np.where(n > 0, n, 1.0))
    log_n2 = log_n * log_n

    # Grid: for each α the model is linear in (c1 = e^E, c2 = e^a): closed-form weighted least squares.
    alphas = np.linspace(0.0, ALPHA_MAX, num_alphas)
    x = np.exp(-alphas[:, None] * log_n[None, :])  # (G, T)
    yl = np.where(valid, y_lin, 0.0)
    sw = wmask.sum(1)[:, None]  # (K, 1)
    sx = wmask @ x.T  # (K, G)
    sxx = wmask @ (x * x).T
    sy = yl.sum(1)[:, None]
    sxy = yl @ x.T
    den = sw * sxx - sx * sx
    safe = den > 1e-12 * np.maximum(sw * sxx, 1e-300)
    c2 = np.where(safe, (sw * sxy - sx * sy) / np.where(safe, den, 1.0), 0.0)
    c1 = (sy - c2 * sx) / np.maximum(sw, 1.0)
    scale = np.maximum(sy / np.maximum(sw, 1.0), 1e-12)
    c1 = np.maximum(c1, 1e-3 * scale)
    c2 = np.maximum(c2, 1e-3 * scale)
    grid = np.stack([np.log(c2), np.log(c1), np.broadcast_to(alphas, c1.shape)], axis=-1)  # (K, G, 3)
    # Box of (a, E, α). The authors' hinges have slope 1 while the gradient of the Huber sum is at most
    # δ·T (T points, |∂f| ≤ 1 for a and E), so for δ·T < 1 their optimum lies on the box: they act as bounds.
    lo = np.array([-np.inf, E_MIN if penalties else -np.inf, 0.0])
    hi = np.array([A_MAX if penalties else np.inf, np.inf, ALPHA_MAX])
    grid = np.clip(grid, lo, hi)

    def residuals(theta: np.ndarray, yr: np.ndarray, wr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # f = log(e^u + e^E) = E + softplus(u − E), u = a − α·log n;  s1 = ∂f/∂a = sigmoid(u − E).
        d = theta[..., 0:1] - theta[..., 2:3] * log_n - theta[..., 1:2]
        e = np.exp(-np.abs(d))
        r = theta[..., 1:2] + np.maximum(d, 0.0) + np.log1p(e) - yr
        s1 = np.where(d >= 0, 1.0, e) / (1.0 + e)
        return r, s1, (_huber(r, delta) * wr).sum(-1)

    rows_g = np.broadcast_to(np.arange(k)[:, None], (k, num_alphas))
    obj_g = residuals(grid, y[rows_g], wmask[rows_g])[2]
    starts = np.argsort(obj_g, axis=1, kind="stable")[:, : min(num_starts, num_alphas)]
    s = starts.shape[1]
    theta = np.take_along_axis(grid, starts[..., None], axis=1).reshape(k * s, 3)
    rows = np.repeat(np.arange(k), s)
    yr, wr = y[rows], wmask[rows]
    r, s1, obj = residuals(theta, yr, wr)
    lam = np.full(k * s, 1e-3)
    stalled = np.zeros(k * s, dtype=np.int64)
    eye = np.eye(3)
    for _ in range(num_iters):
        # Only runs still improving are iterated: the easy ones stop early and cost nothing after.
        act = np.flatnonzero(stalled < 2)
        if act.size == 0:
            break
        th, ra, sa, la = theta[act], r[act], s1[act], lam[act]
        # Normal equations of the IRLS-weighted Gauss-Newton step, Jacobian rows (s1, 1 − s1, −log n·s1),
        # assembled from a few weighted sums instead of a (P, T, 3) tensor.
        w = wr[act] * (delta / np.maximum(np.abs(ra), delta))  # IRLS weights of the Huber loss
        ws1, wra = w * sa, w * ra
        q = ws1 * sa
        sw, sws1, sq = w.sum(1), ws1.sum(1), q.sum(1)
        ql, ql2, ws1l = q @ log_n, q @ log_n2, ws1 @ log_n
        h = np.empty((act.size, 3, 3))
        h[:, 0, 0] = sq
        h[:, 0, 1] = h[:, 1, 0] = sws1 - sq
        h[:, 1, 1] = sw - 2.0 * sws1 + sq
        h[:, 0, 2] = h[:, 2, 0] = -ql
        h[:, 1, 2] = h[:, 2, 1] = -(ws1l - ql)
        h[:, 2, 2] = ql2
        wrs = wra * sa
        g0 = wrs.sum(1)
        g = np.stack([g0, wra.sum(1) - g0, -(wrs @ log_n)], axis=1)
        diag = np.diagonal(h, axis1=1, axis2=2)
        damp = h + (la[:, None, None] * (diag[:, :, None] + 1e-12)) * eye + 1e-12 * eye
        cand = th - np.linalg.solve(damp, g[..., None])[..., 0]
        cand = np.clip(cand, lo, hi)
        with np.errstate(over="ignore", invalid="ignore"):
            cr, cs1, cobj = residuals(cand, yr[act], wr[act])
        better = np.isfinite(cobj) & (cobj < obj[act])
        gain = np.where(better, (obj[act] - cobj) / np.maximum(obj[act], 1e-300), 0.0)
        up = act[better]
        theta[up], r[up], s1[up], obj[up] = cand[better], cr[better], cs1[better], cobj[better]
        lam[act] = np.where(better, la / 3.0, np.minimum(la * 4.0, 1e8))
        # Converged: no relative gain above 1e-10 twice in a row (a rejected step may precede a good one).
        stalled[act] = np.where(gain < 1e-10, stalled[act] + 1, 0)
    obj = np.where(np.isfinite(obj) & np.all(np.isfinite(theta), axis=1), obj, np.inf).reshape(k, s)
    best = obj.argmin(axis=1)
    params = theta.reshape(k, s, 3)[np.arange(k), best]
    ok = enough & np.isfinite(obj[np.arange(k), best]) & np.all(np.isfinite(params), axis=1)
    return params, ok


def savgol_smooth(y: np.ndarray, window: int, order: int = 3) -> np.ndarray:
    """Savitzky-Golay smoothing along the last axis (local polynomial least squares; edges fitted too).

    The window shrinks to the longest odd length available; with fewer points than ``order + 2`` it is a no-op.
    """
    t = y.shape[-1]
    w = min(window, t if t % 2 else t - 1)
    if w <= order:
        return y.copy()
    h = w // 2
    v = np.vander(np.arange(-h, h + 1, dtype=np.float64), order + 1, increasing=True)
    hat = v @ np.linalg.pinv(v)  # (w, w): row i = smoothed value at window position i
    out = np.empty_like(y)
    out[..., h : t - h] = sliding_window_view(y, w, axis=-1) @ hat[h]
    out[..., :h] = y[..., :w] @ hat[:h].T
    out[..., t - h :] = y[..., t - w :] @ hat[h + 1 :].T
    return out
