"""The built-in demo (``odm demo``): the same small model trained under each policy, side by side.

Synthetic mode (the default when no corpus is around) trains a small MLP regressor on four domains of
different learnability:

* ``easy`` — a linear rule, learned in a few dozen steps;
* ``medium`` — a smooth non-linear rule;
* ``hard`` — a high-frequency rule the small model learns slowly;
* ``noise`` — targets are independent noise: its loss stays near 4 whatever the model does.

A policy that rewards high loss (EXP3/UCB with ``reward="loss"``, ODM's released variant, Skill-It) pours
samples into ``noise``, which cannot be learned, and ends worse on the learnable domains; a policy that follows
learning progress or a fitted scaling law (ADO, EXP3.S with ``reward="progress"``) moves away from it. The
table shows each policy's held-out loss per domain, the mean over the learnable domains, and the share of
samples each domain received; the plot shows the proportions over steps. Seen on 2 CPU cores (600 steps,
seed 0, ~15 s in all): noise share 0.69–0.77 for EXP3 / ODM-released / Skill-It against uniform's 0.25, and
learnable loss 0.80–0.95 against uniform's 0.44; ADO 0.19 and 0.44.

With ``--data DIR`` (or a corpus built by ``benchmarks/corpus.py`` in its default cache folder) the demo
runs a short version of the real benchmark, ``benchmarks/quality.py``, instead (a source checkout is needed).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
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
from odm.policies import REFERENCE_LOSS

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
    "exp3s-progress": ("exp3s", {"reward": "progress"}),
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
    kwargs = dict(kwargs)
    cls = odm.policies._REGISTRY[name]
    key = next((p for p in inspect.signature(cls).parameters if "reference" in p), None)
    if key is not None or REFERENCE_LOSS in cls.requires:
        if key is None or reference is None:
            raise TypeError("needs reference losses (from a `uniform` run in the same comparison)")
        kwargs[key] = reference
    return odm.policies.get_policy(name, **kwargs)


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


def table(runs: Sequence[DemoRun]) -> str:
    """The comparison as fixed-width text: held-out loss per domain, learnable mean, shares, seconds."""
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
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False)
    colors = ["#4c72b0", "#55a868", "#dd8452", "#c44e52"]
    for ax, r in zip(axes.flat, runs, strict=False):
        ax.stackplot(np.arange(len(r.proportions)), r.proportions.T, labels=DOMAINS, colors=colors, linewidth=0)
        ax.set_title(r.policy, fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_xlim(0, max(1, len(r.proportions) - 1))
    ax = axes.flat[len(runs)]
    for r in runs:
        ax.plot(*zip(*r.curve, strict=True), label=r.policy, color="k" if r.policy == "uniform" else None)
    ax.set_title("held-out loss, learnable domains", fontsize=9)
    ax.set_yscale("log")
    ax.legend(fontsize=6)
    for extra in axes.flat[len(runs) + 1 :]:
        extra.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(DOMAINS), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _find_quality() -> Any:
    """``benchmarks/quality.py`` of the source checkout this package runs from, or None."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("odm_benchmarks_quality", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_real(data: Path, *, steps: int, seed: int, policies: Sequence[str] | None, out: Path) -> int:
    """A short run of the real benchmark on ``data`` (one seed, the quick model)."""
    quality = _find_quality()
    if quality is None:
        print("the real-corpus demo runs benchmarks/quality.py from a source checkout of odm; none found")
        return 1
    if policies is None:
        wanted = ["uniform", "odm-paper", "odm-released", "aioli", "ado", "doremi"]
        policies = [w for w in wanted if any(w in (s.label, s.name) for s in quality.discover(None))]
    quality.run(data, quick=True, policies=policies, seeds=[seed], steps=steps, out=out, tag="demo")
    return 0


def run_demo(
    *,
    steps: int | None = None,
    seed: int = 0,
    policies: Sequence[str] | None = None,
    data: Path | None = None,
    synthetic: bool = False,
    plot_path: Path | None = None,
) -> int:
    """The ``odm demo`` command: synthetic comparison, or a short real-corpus run when a corpus is found."""
    if data is None and not synthetic and (CORPUS_CACHE / "manifest.json").is_file():
        data = CORPUS_CACHE
        print(f"found a built corpus in {data} (use --synthetic for the built-in task)")
    out = Path(tempfile.gettempdir()) / "odm-demo"
    if data is not None:
        return run_real(data, steps=steps or 150, seed=seed, policies=policies, out=out)
    steps = steps or 600
    print(
        f"odm demo: a small MLP, {steps} steps of batch 32 per policy, domains {list(DOMAINS)}\n"
        f"  (noise: targets are pure noise of variance {NOISE_STD**2:.0f} — its loss cannot go below that)\n"
    )
    runs, skipped = compare(policies, steps=steps, seed=seed)
    print(table(runs))
    print()
    print(summary(runs))
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    path = plot(runs, plot_path or out / "odm-demo.png")
    print(f"\nplot: {path}" if path else "\n(no plot: pip install matplotlib)")
    return 0
