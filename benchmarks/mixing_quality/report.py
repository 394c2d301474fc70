"""Reports: the results as Markdown tables and plots, and merging or re-summarising saved results.

The headline table gives, per policy, the mean over scored domains of the final held-out (test) bits per
byte, the paired differences to uniform, to natural and to the best static baseline of the run (its regret),
each ``mean ± SE`` with a mark (``*``: the 95% t-interval excludes 0; ``~``: beyond one SE only), the steps to
reach the best static baseline's final mean, and compute relative to uniform (DoReMi's reference run
included).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from _common import markdown_table

from .specs import Spec, needs_reference
from .stats import summarise

__all__ = ["fmt_paired", "goal", "markdown", "merge", "plots", "report", "resummarise"]


def fmt_paired(d: dict[str, Any] | None) -> str:
    """``-0.0321 ± 0.0100 *``: mean ± SE and its mark (``*`` significant at 95%, ``~`` beyond one SE)."""
    if d is None:
        return ""
    if d["n"] < 2:
        return f"{d['mean']:+.4f}"
    mark = " *" if d["significant"] else " ~" if d["beyond_se"] else ""
    return f"{d['mean']:+.4f} ± {d['se']:.4f}{mark}"


def _fmt_fraction(x: float) -> str:
    return "never" if not math.isfinite(x) or x > 1 else f"{x:.2f}"


def goal(summary: dict[str, Any]) -> list[str]:
    """The online policies that beat both uniform and natural by more than the paired SE (the issue's goal)."""
    out = []
    for label, s in summary["policies"].items():
        du, dn = s.get("delta_vs_uniform"), s.get("delta_vs_natural")
        if s["online"] and du and dn and du["mean"] < -du["se"] and dn["mean"] < -dn["se"]:
            out.append(label)
    return out


def resummarise(result: dict[str, Any]) -> dict[str, Any]:
    """Recomputes ``result["summary"]`` from its runs (marking the runs that needed a reference run)."""
    for r in result["runs"]:
        if "reference" not in r:
            r["reference"] = "uniform" if needs_reference(Spec(r["policy"], r["name"])) else None
    weights = np.array(result.get("natural_bytes", result["train_bytes"]), dtype=np.float64)
    result.setdefault("natural_bytes", weights.tolist())
    scored = result.get("scored_domains", result["domains"])
    result["summary"] = summarise(result["runs"], result["domains"], weights, result["config"]["steps"], scored=scored)
    return result


def markdown(result: dict[str, Any]) -> str:
    """The results as Markdown: headline table, per-domain table, the command and the corpus versions."""
    summary, domains = result["summary"], result["domains"]
    cfg = result["config"]
    regime = result.get("regime") or {}
    scored = summary.get("scored_domains", domains)
    best = summary.get("best_static")
    what = []
    if regime.get("caps"):
        what.append("training text capped: " + ", ".join(f"{d} {b / 1e3:.0f} KB" for d, b in regime["caps"].items()))
    if regime.get("junk_bytes"):
        what.append(f"a `junk` domain of {regime['junk_bytes'] / 1e6:.0f} MB random bytes added (not scored)")
    if regime.get("domains"):
        what.append(f"{len(regime['domains'])}-domain subset")
    lines = [
        f"# Mixing quality — {result['hardware']}, {result['date']}",
        "",
        f"`{result['command']}` — {result.get('machine', result['hardware'])}",
        "",
        f"{len(domains)} domains{' (' + '; '.join(what) + ')' if what else ''}, byte-level LM {cfg['model']} "
        f"({result['num_parameters']:,} parameters), {cfg['steps']} steps × batch {cfg['batch_size']}, "
        f"seeds {result['seeds']} ({result.get('seed_role', 'reporting')} seeds; defaults are chosen on the "
        "tuning seeds 100–102, figures reported on others). Scores: **test-split** bits per byte (documents no "
        f"policy saw or evaluated on), mean over the {len(scored)} scored domains. Δ: paired by seed, "
        "mean ± standard error; `*` the 95% "
        "t-interval excludes 0, `~` beyond one SE only. *regret*: Δ to the best static baseline of this run "
        f"(**{best}**). *steps→best*: median over seeds of the fraction of the budget needed to reach the best "
        "static baseline's final mean of the same seed (`never`: not within the budget). *compute*: training CPU "
        "time vs uniform, the policy's held-out evaluations and any reference run (DoReMi: uniform's) included.",
        "",
    ]
    rows = sorted(summary["policies"].items(), key=lambda kv: kv[1]["mean_bpb"][0])
    lines.append(
        markdown_table(
            [
                "policy",
                "mean bpb",
                "Δ vs uniform",
                "Δ vs natural",
                "regret (Δ vs best static)",
                "steps→best",
                "compute",
            ],
            [
                [
                    label,
                    f"{s['mean_bpb'][0]:.4f} ± {s['mean_bpb'][1]:.4f}",
                    fmt_paired(s.get("delta_vs_uniform")),
                    fmt_paired(s.get("delta_vs_natural")),
                    fmt_paired(s.get("delta_vs_best_static")),
                    _fmt_fraction(s.get("steps_to_best_static", [math.nan])[0]),
                    f"{s['compute_vs_uniform']:.2f}×" if math.isfinite(s.get("compute_vs_uniform", math.nan)) else "",
                ]
                for label, s in rows
            ],
        )
    )
    winners = goal(summary)
    lines += [
        "",
        "Online policies beating **both** uniform and natural by more than the paired SE: "
        + (", ".join(f"**{w}**" for w in winners) if winners else "none")
        + ".",
        "",
        "Per-domain test bits per byte (mean over seeds) and mean proportions over the run:",
        "",
    ]
    lines.append(
        markdown_table(
            ["policy", *domains],
            [
                [label]
                + [
                    f"{s['per_domain_bpb'][d][0]:.3f} ({100 * p:.0f}%)"
                    for d, p in zip(domains, s["mean_proportions"], strict=True)
                ]
                for label, s in rows
            ],
        )
    )
    lines += [
        "",
        "Natural sizes (MB, what natural proportions weigh): "
        + ", ".join(f"{d} {b / 1e6:.2f}" for d, b in zip(domains, result["natural_bytes"], strict=True))
        + ".",
    ]
    if result.get("skipped"):
        lines += ["", "Skipped:", ""] + [f"* `{k}`: {v}" for k, v in result["skipped"].items()]
    packages = {
        p: v for e in result.get("corpus", {}).get("domains", {}).values() for p, v in e.get("packages", {}).items()
    }
    if packages:
        lines += ["", "Corpus packages: " + ", ".join(f"{p} {v}" for p, v in sorted(packages.items()))]
    return "\n".join(lines) + "\n"


def plots(result: dict[str, Any], runs: list[dict[str, Any]], stem: Path) -> list[Path]:
    """Stacked-area proportions per policy (its first seed) and the mean test bpb vs steps (mean over seeds)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install odm[bench]): no plots")
        return []
    domains = result["domains"]
    scored = [domains.index(d) for d in result["summary"].get("scored_domains", domains)]
    labels = list(result["summary"]["policies"])
    first = {label: next(r for r in runs if r["policy"] == label) for label in labels}
    steps = result["config"]["steps"]
    cols = min(4, len(labels))
    rows = math.ceil(len(labels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), sharex=True, sharey=True, squeeze=False)
    colors = plt.get_cmap("tab20")(np.arange(len(domains)) % 20)
    for ax, label in zip(axes.flat, labels, strict=False):
        p = np.array(first[label]["proportions"])
        x = np.linspace(0, steps, len(p), endpoint=False)  # proportions may be subsampled
        ax.stackplot(x, p.T, labels=domains, colors=colors, linewidth=0)
        ax.set_title(label, fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_xlim(0, steps)
    for ax in axes.flat[len(labels) :]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(7, len(domains)), fontsize=7)
    fig.suptitle(f"proportions over steps (seed {first[labels[0]]['seed']})", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    props_path = stem.with_name(stem.name + "-proportions.png")
    fig.savefig(props_path, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label in labels:
        curves = [r["curve"] for r in runs if r["policy"] == label]
        steps_x = [s for s, _ in curves[0]]
        mean_curve = np.mean([[np.mean(np.asarray(b)[scored]) for _, b in c] for c in curves], axis=0)
        bold = label in ("uniform", "natural")
        ax.plot(
            steps_x, mean_curve, label=label, lw=2 if bold else 1.2, color={"uniform": "k", "natural": "0.5"}.get(label)
        )
    ax.set_xlabel("step")
    ax.set_ylabel("mean test bits per byte (scored domains)")
    base = result["summary"]["uniform_final_mean_bpb"]
    if base is not None:
        ax.axhline(base, color="k", ls=":", lw=0.8)
        lo = min(s["mean_bpb"][0] for s in result["summary"]["policies"].values())
        ax.set_ylim(lo - 0.1, base + 1.0)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    loss_path = stem.with_name(stem.name + "-loss.png")
    fig.savefig(loss_path, dpi=110)
    plt.close(fig)
    return [props_path, loss_path]


def merge(results: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """One result from several runs of the same benchmark (e.g. the policies split over two processes).

    The inputs must share the configuration, the corpus, its domains and the regime; a (policy, seed) pair
    present in more than one is kept once when its results agree exactly (training is deterministic on one
    thread) and refused when they differ. ``names`` label the inputs in error messages.
    """
    first = results[0]
    for field in ("config", "domains", "natural_bytes", "corpus", "regime"):
        for name, other in zip(names[1:], results[1:], strict=True):
            if other.get(field) != first.get(field):
                raise ValueError(f"cannot merge {names[0]} and {name}: their `{field}` differ")
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    for name, result in zip(names, results, strict=True):
        for r in result["runs"]:
            key = (r["policy"], r["seed"])
            if key in runs and runs[key]["final_bpb"] != r["final_bpb"]:
                delta = np.max(np.abs(np.subtract(runs[key]["final_bpb"], r["final_bpb"])))
                raise ValueError(
                    f"policy {key[0]!r} seed {key[1]} ran in more than one input with different results "
                    f"(max per-domain difference {delta:.5f} bpb, last in {name}); merge only one of them"
                )
            runs.setdefault(key, r)
    merged = dict(first)
    merged["command"] = " + ".join(dict.fromkeys(r["command"] for r in results))
    merged["date"] = max(r["date"] for r in results)
    merged["seeds"] = sorted({s for r in results for s in r["seeds"]})
    merged["skipped"] = {k: v for r in results for k, v in r.get("skipped", {}).items()}
    merged["total_seconds"] = sum(r.get("total_seconds", 0.0) for r in results)
    # uniform first: the paired deltas and the steps-to-baseline target come from it
    merged["runs"] = sorted(runs.values(), key=lambda r: r["policy"] != "uniform")
    return merged


def write(result: dict[str, Any], stem: Path) -> list[Path]:
    """Writes ``stem.json``, ``stem.md`` and the plots; returns their paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, default=float))
    stem.with_suffix(".md").write_text(markdown(result))
    return [stem.with_suffix(".json"), stem.with_suffix(".md"), *plots(result, result["runs"], stem)]


def report(paths: Sequence[Path], out: Path | None = None, tag: str | None = None) -> dict[str, Any]:
    """Re-summarises saved results JSON (e.g. after a change to the metrics) and rewrites their Markdown and plots.

    One path without ``tag`` is rewritten in place; several are merged (see :func:`merge`) into
    ``quality-<tag>-<date>`` under ``out`` (default: beside the first).
    """
    results = [json.loads(p.read_text()) for p in paths]
    result = merge(results, [str(p) for p in paths]) if len(paths) > 1 else results[0]
    resummarise(result)
    if len(paths) == 1 and tag is None:
        stem = paths[0].with_suffix("")
    else:
        day = result["date"][:10].replace("-", "")
        stem = (out or paths[0].parent) / f"quality-{tag or result['hardware']}-{day}"
    written = write(result, stem)
    print(markdown(result))
    print(f"wrote {written[0]}")
    return result
