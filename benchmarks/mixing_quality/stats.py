"""The benchmark's statistics: paired differences over seeds, their standard errors, steps-to-target, regret.

Every comparison is *paired by seed*: two policies trained with the same seed share the model's initialisation
and the loader's random stream, so the per-seed difference cancels most of the seed-to-seed noise. Over ``n``
seeds the paired difference ``d_s = a_s - b_s`` is reported as its mean, its standard error
``SE = std(d, ddof=1) / sqrt(n)`` and the 95% t-interval ``mean ± t(0.975, n-1) · SE``. A difference is
*significant* when that interval excludes 0, and *beyond its SE* when ``|mean| > SE`` (the issue's bar).

Example:
    >>> p = paired({0: 3.0, 1: 3.1, 2: 2.9}, {0: 3.1, 1: 3.2, 2: 3.1})
    >>> round(p.mean, 4), round(p.se, 4), p.significant
    (-0.1333, 0.0333, False)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["STATIC", "Paired", "paired", "steps_to_reach", "summarise", "t_critical"]

# Policies that fix their proportions before training (nothing online): the static baselines of a corpus.
STATIC = ("uniform", "natural", "entropy", "temperature")

# Two-sided 95% quantiles of Student's t, t(0.975, df), df = 1..30; beyond, the Cornish-Fisher expansion.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_critical(df: int) -> float:
    """``t(0.975, df)``: the half-width of a 95% interval in standard errors (``inf`` for ``df < 1``)."""
    if df < 1:
        return math.inf
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964  # the normal's quantile, corrected in powers of 1/df (within 1e-4 of t for df > 30)
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclasses.dataclass(frozen=True)
class Paired:
    """A paired difference over seeds: ``mean`` of ``a_s - b_s``, its standard error and 95% t-interval."""

    mean: float
    se: float
    low: float
    high: float
    n: int
    per_seed: dict[int, float]

    @property
    def significant(self) -> bool:
        """The 95% t-interval excludes 0 (never with one seed)."""
        return self.n > 1 and (self.low > 0 or self.high < 0)

    @property
    def beyond_se(self) -> bool:
        """``|mean| > SE``: the bar of the issue's goal (weaker than significance at 3 seeds)."""
        return self.n > 1 and abs(self.mean) > self.se

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"significant": self.significant, "beyond_se": self.beyond_se}


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> Paired | None:
    """``a - b`` over the seeds both have (``None`` if none); ``se`` is NaN with one seed."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = np.array([a[s] - b[s] for s in seeds], dtype=np.float64)
    n = len(d)
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    half = t_critical(n - 1) * se if n > 1 else math.nan
    mean = float(d.mean())
    return Paired(mean, se, mean - half, mean + half, n, {s: float(x) for s, x in zip(seeds, d, strict=True)})


def steps_to_reach(
    curve: Sequence[tuple[int, Sequence[float]]], target: float, scored: Sequence[int] | None = None
) -> float:
    """First step at which the mean over ``scored`` domain indices (default all) reaches ``target``, linearly
    interpolated between evaluations; the first evaluation if it is already there; ``inf`` if never."""
    prev_step, prev_val = 0, math.inf
    for step, bpb in curve:
        values = np.asarray(bpb, dtype=np.float64)
        val = float(values.mean() if scored is None else values[list(scored)].mean())
        if val <= target + 1e-5:  # curves are stored to 5 decimals
            if math.isinf(prev_val):
                return float(step)
            return min(step, prev_step + (step - prev_step) * (prev_val - target) / max(prev_val - val, 1e-12))
        prev_step, prev_val = step, val
    return math.inf


def _mean_std(values: Sequence[float]) -> list[float]:
    return [float(np.mean(values)), float(np.std(values))]


def summarise(
    runs: list[dict[str, Any]],
    domains: list[str],
    weights: np.ndarray,
    steps: int,
    *,
    scored: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Per policy: means over seeds, paired differences to uniform, natural and the best static baseline,
    steps to reach their final means, and compute.

    ``scored``: the domains of the headline mean (default all; the junk domain is left out). ``weights``: the
    natural sizes, for the byte-weighted mean over the scored domains. Adds ``mean_bpb`` and ``weighted_bpb``
    to every run.
    """
    scored = list(domains if scored is None else scored)
    idx = [domains.index(d) for d in scored]
    w = np.asarray(weights, dtype=np.float64)[idx]
    w = w / w.sum()
    for r in runs:
        final = np.asarray(r["final_bpb"], dtype=np.float64)[idx]
        r["mean_bpb"] = float(final.mean())
        r["weighted_bpb"] = float(final @ w)
    labels = list(dict.fromkeys(r["policy"] for r in runs))
    by_label = {label: {r["seed"]: r for r in runs if r["policy"] == label} for label in labels}
    mean_of = {label: {s: r["mean_bpb"] for s, r in rs.items()} for label, rs in by_label.items()}
    static = [label for label in labels if label in STATIC]
    # the best static baseline of this corpus and regime: the static policy with the lowest mean over seeds
    best = min(static, key=lambda label: np.mean(list(mean_of[label].values()))) if static else None
    cpu_of = {
        label: {s: r.get("train_cpu_seconds", r["train_seconds"]) for s, r in rs.items()}
        for label, rs in by_label.items()
    }
    out: dict[str, Any] = {
        "scored_domains": scored,
        "best_static": best,
        "uniform_final_mean_bpb": float(np.mean(list(mean_of["uniform"].values()))) if "uniform" in mean_of else None,
        "policies": {},
    }
    for label in labels:
        rs = by_label[label]
        seeds = sorted(rs)
        finals = np.array([rs[s]["final_bpb"] for s in seeds])
        entry: dict[str, Any] = {
            "seeds": seeds,
            "online": label not in STATIC,
            "mean_bpb": _mean_std([rs[s]["mean_bpb"] for s in seeds]),
            "weighted_bpb": _mean_std([rs[s]["weighted_bpb"] for s in seeds]),
            "per_domain_bpb": {d: _mean_std(finals[:, i].tolist()) for i, d in enumerate(domains)},
            "mean_proportions": np.mean([np.mean(rs[s]["proportions"], axis=0) for s in seeds], axis=0).tolist(),
        }
        for name, base in (("uniform", "uniform"), ("natural", "natural"), ("best_static", best)):
            diff = paired(mean_of[label], mean_of[base]) if base in mean_of else None
            entry[f"delta_vs_{name}"] = None if diff is None else diff.as_dict()
            # steps to reach the baseline's final mean of the same seed, as a fraction of the budget
            fractions = [
                steps_to_reach(rs[s]["curve"], mean_of[base][s], idx) / steps
                for s in seeds
                if base in mean_of and s in mean_of[base]
            ]
            entry[f"steps_to_{name}"] = [float(np.median(fractions)) if fractions else math.nan, fractions]
        # compute: the policy's own training CPU time (its held-out evaluations included), plus the reference
        # run it needs (DoReMi trains against uniform's run of the same seed: that run is part of its cost)
        reference = rs[seeds[0]].get("reference")
        cpu = [cpu_of[label][s] + (cpu_of[reference].get(s, math.nan) if reference in cpu_of else 0.0) for s in seeds]
        base_cpu = np.mean(list(cpu_of["uniform"].values())) if "uniform" in cpu_of else math.nan
        entry["compute_cpu_seconds"] = _mean_std(cpu)
        entry["compute_vs_uniform"] = float(np.mean(cpu) / base_cpu) if base_cpu else math.nan
        entry["train_seconds"] = _mean_std([rs[s]["train_seconds"] for s in seeds])
        entry["reference_run"] = reference
        out["policies"][label] = entry
    return out
