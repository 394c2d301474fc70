"""Overhead end to end: the same tiny model trained N steps with and without online mixing (docs/benchmarks.md §2).

Variants, all on the same data, model, optimiser and batch size, ``num_workers=0``, one process:

* ``plain stream`` — an ordinary ``DataLoader`` over one pre-mixed stream (no odm at all);
* ``static mixing`` — ``odm.MixtureLoader`` with fixed (uniform) proportions, no feedback;
* ``feedback only`` — the online machinery with a policy that never moves (uniform): what the callback (or
  ``observe`` + ``step``) costs apart from the policy's own update;
* ``online`` — ``odm.MixtureLoader`` with an online policy (EXP3 by default) fed every step: through the
  Lightning callback ``odm.callbacks.OnlineMixing``, and through a plain loop calling ``observe`` + ``step``.

Each variant runs in Lightning (``Trainer.fit``) and in a plain PyTorch loop. The variants are interleaved
(a b c, a b c, …) and the figure is the median over repeats of the steady-state time per step (steps after a
warm-up, measured from inside the loop), plus the whole ``fit`` wall-clock. The headline is the ratio
online / static in the same framework (target ≤ 1.01).

Run: ``python benchmarks/overhead_training.py [--quick]``. Prints a table and writes ``benchmarks/results/``.
A larger model (the overhead per step is fixed, so its share shrinks)::

    python benchmarks/overhead_training.py --width 2048 --batch-size 256 --steps 120 --warmup 20 \
        --repeats 3 --frameworks lightning --tag small
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, median, ratio, write_results

import odm
from odm.callbacks import OnlineMixing

VARIANTS = ("plain stream", "static mixing", "feedback only", "online")


def make_sources(num_domains: int, dim: int, n: int, seed: int = 0) -> dict[str, list[dict[str, torch.Tensor]]]:
    """``num_domains`` regression domains of ``n`` samples ``{"x", "y"}`` (different linear rules)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for d in range(num_domains):
        x = torch.randn(n, dim, generator=g)
        y = x @ torch.randn(dim, generator=g) + 0.1 * d * torch.randn(n, generator=g)
        out[f"domain{d}"] = [{"x": x[i], "y": y[i]} for i in range(n)]
    return out


def make_model(dim: int, width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))


def make_loader(variant: str, sources: dict[str, list[Any]], cfg: argparse.Namespace) -> Any:
    if variant == "plain stream":
        stream = [s for samples in sources.values() for s in samples]
        return torch.utils.data.DataLoader(stream, batch_size=cfg.batch_size, shuffle=True)
    policy = cfg.policy if variant == "online" else "uniform"  # a uniform policy never moves
    every = getattr(cfg, "update_every", 1)
    return odm.MixtureLoader(sources, batch_size=cfg.batch_size, policy=policy, seed=0, update_every=every)


class Module(pl.LightningModule):
    def __init__(self, cfg: argparse.Namespace) -> None:
        super().__init__()
        self.net = make_model(cfg.dim, cfg.width)
        self.lr = cfg.lr

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        losses = (self.net(batch["x"]).squeeze(-1) - batch["y"]).pow(2)
        return {"loss": losses.mean(), "sample_losses": losses}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


class StepClock(pl.Callback):
    """Wall-clock and process CPU time from the start of step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.end = (0.0, 0.0)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.warmup:
            self.start = _now()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
        self.end = _now()


Timing = dict[str, float]


def _timing(start: tuple[float, float], end: tuple[float, float], steps: int, run_s: float) -> Timing:
    return {"step_s": (end[0] - start[0]) / steps, "step_cpu_s": (end[1] - start[1]) / steps, "run_s": run_s}


def run_lightning(variant: str, sources: dict[str, list[Any]], cfg: argparse.Namespace) -> Timing:
    """Seconds per steady-state step (wall-clock and process CPU) and the whole ``fit`` wall-clock."""
    torch.manual_seed(0)
    loader = make_loader(variant, sources, cfg)
    clock = StepClock(cfg.warmup)
    # The mixing callback sits before the clock: its on_train_batch_end is inside the timed step.
    feedback = variant in ("online", "feedback only")
    callbacks: list[pl.Callback] = [OnlineMixing(loader)] if feedback else []
    t0 = time.perf_counter()
    bare_trainer(cfg.steps, [*callbacks, clock]).fit(Module(cfg), train_dataloaders=loader)
    return _timing(clock.start, clock.end, cfg.steps - cfg.warmup, time.perf_counter() - t0)


def bare_trainer(steps: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    """A CPU ``Trainer`` doing nothing but the steps and ``callbacks``: no logger, bar, summary or checkpoints."""
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )


def run_plain(variant: str, sources: dict[str, list[Any]], cfg: argparse.Namespace) -> Timing:
    """The same in a hand-written loop."""
    torch.manual_seed(0)
    t0 = time.perf_counter()
    loader = make_loader(variant, sources, cfg)
    model = make_model(cfg.dim, cfg.width)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    mixer = loader.mixer if variant in ("online", "feedback only") else None
    step, start = 0, (0.0, 0.0)
    while step < cfg.steps:
        for batch in loader:
            if step == cfg.warmup:
                start = _now()
            losses = (model(batch["x"]).squeeze(-1) - batch["y"]).pow(2)
            opt.zero_grad()
            losses.mean().backward()
            opt.step()
            if mixer is not None:
                mixer.observe(batch, losses)
                mixer.step()
            step += 1
            if step == cfg.steps:
                break
    end = _now()
    return _timing(start, end, cfg.steps - cfg.warmup, time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (well under a minute)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 400; quick 150)")
    parser.add_argument("--warmup", type=int, default=None, help="steps not timed at the start (default 50)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per variant (default 7; quick 3)")
    parser.add_argument("--domains", type=int, default=8, help="number of domains K")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dim", type=int, default=64, help="input width")
    parser.add_argument("--width", type=int, default=256, help="hidden width of the 3-layer MLP")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--policy", default="exp3", help="the online policy")
    parser.add_argument("--update-every", type=int, default=1, help="policy updates every N steps (default 1)")
    parser.add_argument("--frameworks", nargs="+", default=["lightning", "plain"], choices=["lightning", "plain"])
    parser.add_argument("--tag", default="", help="suffix of the results name (e.g. `small` for a larger model)")
    parser.add_argument("--no-write", action="store_true", help="print only, write no results file")
    cfg = parser.parse_args(argv)
    cfg.steps = cfg.steps or (150 if cfg.quick else 400)
    cfg.warmup = cfg.warmup if cfg.warmup is not None else (30 if cfg.quick else 50)
    cfg.repeats = cfg.repeats or (3 if cfg.quick else 7)
    if cfg.warmup >= cfg.steps:
        parser.error(f"--warmup ({cfg.warmup}) must be below --steps ({cfg.steps})")
    torch.set_num_threads(1)  # the shared 2-core machines: one thread keeps the repeats comparable

    sources = make_sources(cfg.domains, cfg.dim, n=4096)
    runners = {"lightning": run_lightning, "plain": run_plain}
    keys = ("step_s", "step_cpu_s", "run_s")
    raw: dict[str, dict[str, dict[str, list[float]]]] = {
        fw: {v: {k: [] for k in keys} for v in VARIANTS} for fw in cfg.frameworks
    }
    for fw in cfg.frameworks:
        runners[fw]("online", sources, cfg)  # warm caches and imports once, untimed
        for _ in range(cfg.repeats):
            for v in VARIANTS:  # interleaved, so slow phases of a noisy machine hit every variant
                timing = runners[fw](v, sources, cfg)
                for k in keys:
                    raw[fw][v][k].append(timing[k])

    rows, summary = [], {}
    for fw in cfg.frameworks:
        static = {k: median(raw[fw]["static mixing"][k]) for k in keys}
        how = "callback" if fw == "lightning" else "observe + step"
        names = {"online": f"online ({cfg.policy}, {how})", "feedback only": f"feedback only (uniform, {how})"}
        for v in VARIANTS:
            med = {k: median(raw[fw][v][k]) for k in keys}
            r = {k: ratio(med[k], static[k]) for k in keys}
            extra_us = (med["step_cpu_s"] - static["step_cpu_s"]) * 1e6
            wall = [f"{med['step_s'] * 1e3:.3f}", f"{r['step_s']:.3f}"]
            cpu = [f"{med['step_cpu_s'] * 1e3:.3f}", f"{r['step_cpu_s']:.3f}", f"{extra_us:+.0f}"]
            rows.append([fw, names.get(v, v), *wall, *cpu, f"{med['run_s']:.2f}", f"{r['run_s']:.3f}"])
            summary[f"{fw}/{v}"] = {"median": med, "ratio_to_static": r, "extra_cpu_us_per_step": extra_us}
    headers = ["framework", "variant", "wall ms/step", "÷ static", "CPU ms/step", "÷ static", "CPU µs/step extra"]
    headers += ["run s", "÷ static"]
    table = markdown_table(headers, rows)
    print(table)
    notes = (
        f"Tiny MLP ({cfg.dim}→{cfg.width}→{cfg.width}→1), batch {cfg.batch_size}, K={cfg.domains}, "
        f"{cfg.steps} steps ({cfg.warmup} warm-up steps not in ms/step), {cfg.repeats} interleaved repeats, "
        "num_workers=0, torch.set_num_threads(1); medians. `wall` is wall-clock per steady-state step, `CPU` the "
        "process CPU time per step (less sensitive to neighbours on a shared machine), `run s` the whole run "
        "including Trainer set-up. The ratio that matters is online ÷ static within one framework (target "
        "≤ 1.01); the extra cost per step is fixed, so a smaller model makes it look larger."
    )
    if not cfg.no_write:
        config = {k: v for k, v in vars(cfg).items() if k != "no_write"}
        paths = write_results(
            "overhead_training" + (f"-{cfg.tag}" if cfg.tag else ""),
            config=config,
            results={"raw": raw, "summary": summary},
            table=table,
            notes=notes,
        )
        print(f"\nwrote {paths[0]} and {paths[1]}")
    return summary


if __name__ == "__main__":
    main()
