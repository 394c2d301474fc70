"""The built-in demo (``odm demo``): the same small model trained under each policy, side by side.

The default (``make demo``, ``odm demo``) trains a small MLP regressor on four synthetic domains of different
learnability, whatever corpus may be cached:

* ``easy`` — a linear rule, learned in a few dozen steps;
* ``medium`` — a smooth non-linear rule;
* ``hard`` — a high-frequency rule the small model learns slowly;
* ``noise`` — targets are independent noise: its loss stays near 4 whatever the model does.

A policy that rewards high loss (EXP3/UCB with ``reward="loss"``, ODM's released variant, Skill-It) pours
samples into ``noise``, which cannot be learned, and ends worse on the learnable domains; a policy that follows
learning progress or a fitted scaling law (ADO, EXP3.S with its default ``reward="progress"``) moves away from it. The
table shows each policy's held-out loss per domain, the mean over the learnable domains, and the share of
samples each domain received; the plot shows the proportions over steps. Seen on 2 CPU cores (600 steps,
seed 0, ~15 s in all): noise share 0.69–0.77 for EXP3 / ODM-released / Skill-It against uniform's 0.25, and
learnable loss 0.80–0.95 against uniform's 0.44; ADO 0.19 and 0.44.

``odm demo --real [--data DIR]`` runs a short version of the real benchmark instead: it starts
``benchmarks/quality.py`` of the source checkout as a separate process (the installed library never runs
benchmark code) on a corpus built by ``benchmarks/corpus.py``.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import odm

__all__ = ["DOMAINS", "DemoRun", "compare", "demo_policies", "make_domains", "run_demo", "summary", "table", "train"]

DIM = 8
DOMAINS = ("easy", "medium", "hard", "noise")
NOISE_STD = 2.0
# need a vector, domain sizes, a trajectory or token samples: nothing to learn on this regression task
_NEEDS_DATA = {"entropy", "fixed", "natural", "temperature", "scheduled"}
CORPUS_CACHE = Path(os.environ.get("ODM_CORPUS", Path.home() / ".cache" / "odm" / "corpus"))


def make_domains(seed: int, n: int = 2048) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{domain: (x [n, DIM + 4], y [n])}`` for the four domains: same input law, different rules, plus a
    one-hot domain tag in the last four inputs."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(DIM, generator=g) / DIM**0.5
    out = {}
    for name in DOMAINS:
        x = torch.randn(n, DIM, generator=g)
        z = x @ w
        if name == "easy":
            y = 2 * z
        elif name == "medium":
            y = torch.tanh(2 * z) + 0.5 * x[:, 0] * x[:, 1]
        elif name == "hard":
            y = torch.sin(6 * z) + torch.cos(4 * x[:, 2])
        else:
            y = torch.randn(n, generator=g) * NOISE_STD
        # The input says which domain a sample comes from (one-hot): the rules differ, the inputs do not.
        tag = torch.zeros(n, len(DOMAINS))
        tag[:, DOMAINS.index(name)] = 1.0
        out[name] = (torch.cat([x, tag], dim=1), y)
    return out


@dataclasses.dataclass
class DemoRun:
    """One policy's result: final held-out loss per domain, proportions per step, curve and timing."""

    policy: str
    held_out: np.ndarray  # (K,) final held-out MSE per domain
    proportions: np.ndarray  # (steps, K) proportions each batch was drawn under
    curve: list[tuple[int, float]]  # (step, mean held-out loss over the learnable domains)
    seconds: float

    @property
    def learnable_loss(self) -> float:
        """Mean held-out loss over the domains that can be learned (all but ``noise``)."""
        return float(self.held_out[: len(DOMAINS) - 1].mean())

    @property
    def share(self) -> np.ndarray:
        """Share of the run's samples each domain received."""
        return self.proportions.mean(axis=0)


def _mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x).squeeze(-1) - y).pow(2)


def train(policy: str | odm.Policy, *, steps: int = 300, seed: int = 0, batch_size: int = 32) -> DemoRun:
    """Trains a small MLP for ``steps`` steps under ``policy`` with the MixtureLoader + OnlineMixer loop."""
    torch.manual_seed(seed)
    data = make_domains(seed)
    split = 3 * len(next(iter(data.values()))[0]) // 4
    train_data = {d: list(zip(x[:split], y[:split], strict=True)) for d, (x, y) in data.items()}
    held_out = [(x[split:], y[split:]) for x, y in data.values()]
    loader = odm.MixtureLoader(train_data, batch_size=batch_size, policy=policy, seed=seed)
    mixer = loader.mixer
    model = nn.Sequential(nn.Linear(DIM + len(DOMAINS), 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    @torch.no_grad()
    def evaluate() -> tuple[np.ndarray, np.ndarray]:
        sums = np.array([float(_mse(model, x, y).sum()) for x, y in held_out])
        return sums, np.array([float(len(y)) for _, y in held_out])

    proportions, curve = [], []
    start = time.perf_counter()
    for step, batch in enumerate(loader):
        if step >= steps:
            break
        proportions.append(mixer.schedule.lookup(int(batch["mix_step"]))[0])
        x, y = batch["data"]
        loss = _mse(model, x, y)  # per-sample losses: what the mixer needs
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        mixer.observe(batch, loss)
        if mixer.wants_eval():  # policies that learn from held-out losses (Aioli, Skill-It)
            mixer.observe_eval(*evaluate())
        mixer.step()
        if (step + 1) % 25 == 0 or step + 1 == steps:
            sums, counts = evaluate()
            curve.append((step + 1, float((sums / counts)[:-1].mean())))
    seconds = time.perf_counter() - start
    sums, counts = evaluate()
    name = policy if isinstance(policy, str) else getattr(policy, "name", type(policy).__name__)
    return DemoRun(str(name), sums / counts, np.array(proportions), curve, seconds)


# Settings the demo runs besides each registered policy's defaults: label -> (registry name, arguments).
# Round-based policies get shorter rounds than their defaults (sized for long runs) so they act within a demo.
DEMO_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "aioli": ("aioli", {"round_steps": 60, "sweeps": 1, "probe_steps": 2}),
    "ado": ("ado", {"start_step": 100, "update_interval": 50}),
    "odm-released": ("odm", {"variant": "released"}),
    "exp3s-loss": ("exp3s", {"reward": "loss"}),  # EXP3.S defaults to the progress reward: show the other
}


def demo_policies() -> list[str]:
    """The labels the demo runs by default: every registered policy that learns something here (not those
    that need user data), plus the variants above whose policy is registered."""
    names = odm.policies.policy_names()
    labels = [n for n in names if n not in _NEEDS_DATA]
    labels += [label for label, (name, _) in DEMO_VARIANTS.items() if name in names and label not in labels]
    return labels


def _build(label: str, reference: np.ndarray | None) -> odm.Policy:
    name, kwargs = DEMO_VARIANTS.get(label, (label, {}))
    # A policy that measures excess loss against a reference run (DoReMi) gets uniform's final held-out loss.
    try:
        policy = odm.policies.get_policy(name, **kwargs)
    except TypeError:
        if reference is None:
            raise TypeError("needs reference losses (from a `uniform` run in the same comparison)") from None
        return odm.policies.get_policy(name, **kwargs, reference=reference)
    if reference is not None and "reference" in inspect.signature(type(policy)).parameters:
        policy = odm.policies.get_policy(name, **kwargs, reference=reference)
    return policy


def compare(
    policies: Sequence[str] | None = None, *, steps: int = 600, seed: int = 0
) -> tuple[list[DemoRun], dict[str, str]]:
    """Trains under each policy (uniform first: DoReMi's reference is uniform's final held-out loss).

    Args:
        policies: registry names or the labels of ``DEMO_VARIANTS`` (default :func:`demo_policies`).

    Returns:
        The runs, and ``{policy: reason}`` for the policies that could not be built.

    Raises:
        ValueError: for a name that is neither registered nor a demo variant.
    """
    labels = list(policies) if policies is not None else demo_policies()
    known = set(odm.policies.policy_names()) | set(DEMO_VARIANTS)
    unknown = [n for n in labels if n not in known]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; known: {sorted(known)}")
    labels = sorted(dict.fromkeys(labels), key=lambda n: n != "uniform")
    runs: list[DemoRun] = []
    skipped: dict[str, str] = {}
    reference = None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide MLP gains nothing from intra-op threads, and loses a lot on a busy machine
    try:
        for label in labels:
            try:
                policy = _build(label, reference)
            except (TypeError, ValueError, KeyError) as err:
                skipped[label] = str(err)
                continue
            run = train(policy, steps=steps, seed=seed)
            run.policy = label
            if label == "uniform":
                reference = run.held_out
            runs.append(run)
    finally:
        torch.set_num_threads(threads)
    return runs, skipped


TABLE_LEGEND = (
    "loss/<domain>: final held-out MSE of that domain (noise cannot go below ~4: its targets are pure noise)\n"
    "learnable:     mean of loss/easy, loss/medium, loss/hard — lower is better\n"
    "p/<domain>:    share of all training samples drawn from that domain over the run (uniform: 0.25 each)\n"
    "seconds:       wall time of the run (one seed; the runs share the machine, so only a rough guide)"
)


def table(runs: Sequence[DemoRun]) -> str:
    """The comparison as fixed-width text: held-out loss per domain, learnable mean, shares, seconds
    (:data:`TABLE_LEGEND` explains the columns)."""
    width = max([len("policy"), *(len(r.policy) for r in runs)]) + 2
    head = f"{'policy':<{width}}" + "".join(f"{'loss/' + d:>12}" for d in DOMAINS) + f"{'learnable':>11}"
    head += "".join(f"{'p/' + d:>10}" for d in DOMAINS) + f"{'seconds':>9}"
    lines = [head, "-" * len(head)]
    for r in runs:
        row = f"{r.policy:<{width}}" + "".join(f"{v:>12.3f}" for v in r.held_out) + f"{r.learnable_loss:>11.3f}"
        lines.append(row + "".join(f"{v:>10.2f}" for v in r.share) + f"{r.seconds:>9.1f}")
    return "\n".join(lines)


def summary(runs: Sequence[DemoRun]) -> str:
    """Two lines read off the table: who fed the model noise, and who learned the learnable domains best."""
    noise = DOMAINS.index("noise")
    by_noise = sorted(runs, key=lambda r: r.share[noise])
    by_loss = sorted(runs, key=lambda r: r.learnable_loss)
    most, least = by_noise[-1], by_noise[0]
    lines = [
        f"share of samples spent on noise: most {most.policy} {most.share[noise]:.2f}, "
        f"least {least.policy} {least.share[noise]:.2f} (uniform 0.25)",
        "lowest held-out loss on the learnable domains: "
        + ", ".join(f"{r.policy} {r.learnable_loss:.3f}" for r in by_loss[:3]),
    ]
    return "\n".join(lines)


def plot(runs: Sequence[DemoRun], path: Path) -> Path | None:
    """Proportions over steps (stacked areas) per policy, and the learnable held-out loss; ``None`` without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cols = min(4, len(runs) + 1)
    rows = -(-(len(runs) + 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 2.9 * rows), squeeze=False)
    domain_colors = ["#4c72b0", "#55a868", "#dd8452", "#c44e52"]
    for ax, r in zip(axes.flat, runs, strict=False):
        ax.stackplot(np.arange(len(r.proportions)), r.proportions.T, labels=DOMAINS, colors=domain_colors, lw=0)
        ax.set_title(f"{r.policy}: proportions", fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_xlim(0, max(1, len(r.proportions) - 1))
        ax.set_xlabel("training step", fontsize=8)
        ax.set_ylabel("share of batch", fontsize=8)
    ax = axes.flat[len(runs)]
    # One colour per policy (tab20 has 20 distinct ones; the default cycle repeats after 10).
    policy_colors = plt.get_cmap("tab20")
    for i, r in enumerate(runs):
        color = "k" if r.policy == "uniform" else policy_colors(i % 20)
        ax.plot(*zip(*r.curve, strict=True), label=r.policy, color=color, lw=2 if r.policy == "uniform" else 1)
    ax.set_title("held-out loss, learnable domains", fontsize=9)
    ax.set_xlabel("training step", fontsize=8)
    ax.set_ylabel("mean MSE (log scale)", fontsize=8)
    ax.set_yscale("log")
    ax.legend(fontsize=6, ncol=2)
    for extra in axes.flat[len(runs) + 1 :]:
        extra.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(DOMAINS), fontsize=8, title="domain")
    fig.suptitle("odm demo: the same model under each mixing policy (synthetic domains; noise is unlearnable)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _quality_script() -> Path | None:
    """``benchmarks/quality.py`` of the source checkout this package runs from (an editable install), or None."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"
    return path if path.is_file() else None


REAL_POLICIES = ["uniform", "odm", "exp3s", "ado", "doremi", "aioli"]


def run_real(
    data: Path, *, steps: int, seed: int, policies: Sequence[str] | None, out: Path, plot_path: Path | None
) -> int:
    """A short run of the real benchmark on ``data`` (one seed, the quick model) in a separate process."""
    script = _quality_script()
    if script is None:
        print(
            "odm demo --real runs the benchmark of a source checkout (benchmarks/quality.py), which an installed "
            "package does not ship:\n  git clone <the odm repository> && cd odm && pip install -e '.[bench]' && "
            "odm demo --real\n(`odm demo` without --real needs nothing more)"
        )
        return 1
    if not (data / "manifest.json").is_file():
        raise FileNotFoundError(
            f"no corpus in {data} (no manifest.json): build one with `python {script.parent / 'corpus.py'} "
            "--max-mb 5` (~20 s), or pass --data DIR"
        )
    policies = list(policies) if policies is not None else REAL_POLICIES
    print(
        f"odm demo --real: benchmarks/quality.py --quick on {data}, {steps} steps x {len(policies)} policies, "
        f"seed {seed}\n  expected time: ~{max(1, round(len(policies) * steps / 45))} min on 2 CPU cores "
        "(progress below)\n",
        flush=True,
    )
    cmd = [sys.executable, str(script), "--data", str(data), "--quick", "--steps", str(steps)]
    cmd += ["--seeds", "1", "--first-seed", str(seed), "--out", str(out), "--tag", "demo", "--policies", *policies]
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        return done.returncode
    if plot_path is not None:
        made = sorted(out.glob("quality-demo-*-proportions.png"), key=lambda p: p.stat().st_mtime)
        if made:
            plot_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(made[-1], plot_path)
            print(f"\nplot: {plot_path}")
    return 0


def run_demo(
    *,
    steps: int | None = None,
    seed: int = 0,
    policies: Sequence[str] | None = None,
    data: Path | None = None,
    real: bool = False,
    plot_path: Path | None = None,
) -> int:
    """The ``odm demo`` command: the synthetic comparison, or (``real=True`` or a ``data`` folder) a short
    real-corpus run of the benchmark."""
    out = Path(tempfile.gettempdir()) / "odm-demo"
    if real or data is not None:
        return run_real(
            data or CORPUS_CACHE, steps=steps or 150, seed=seed, policies=policies, out=out, plot_path=plot_path
        )
    steps = steps or 600
    print(
        f"odm demo: a small MLP, {steps} steps of batch 32 per policy, domains {list(DOMAINS)}\n"
        f"  (noise: targets are pure noise of variance {NOISE_STD**2:.0f} — its loss cannot go below that)\n"
    )
    runs, skipped = compare(policies, steps=steps, seed=seed)
    print(table(runs))
    print()
    print(TABLE_LEGEND)
    print()
    print(summary(runs))
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    path = plot(runs, plot_path or out / "odm-demo.png")
    print(f"\nplot: {path}" if path else "\n(no plot: pip install matplotlib)")
    return 0
