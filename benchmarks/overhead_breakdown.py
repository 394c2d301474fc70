"""Where the end-to-end feedback overhead goes inside a Lightning fit (docs/benchmarks.md §2).

``overhead_training.py`` measures what online mixing adds per step; this splits it. The same tiny MLP is trained
with the same ``MixtureLoader`` (by default a policy that never moves, so the loader's work is identical; ``--policy
exp3`` adds the updates and the loader's re-plans to the variants that step) and one of these callbacks on
``on_train_batch_end``:

* ``static`` — none;
* ``no-op`` — a callback that does nothing (Lightning's own cost of one more hook);
* ``observe`` — ``mixer.observe(batch, per_sample_losses)`` only;
* ``observe + step`` — and ``mixer.step()``;
* ``OnlineMixing`` — the real callback (the above plus its checks and its log window);
* ``observe + step, paired`` — the same calls as ``observe + step``, but made for two steps at once every
  other step (not exact online mixing: the measure of what running the mixer's code back to back would save);
* ``bare EXP3`` (``--policy exp3`` only) — the floor: the same arithmetic written out by hand in one function
  (two ``bincount``, the loss reward, the importance-weighted EXP3 update, one schedule row), with none of the
  mixer's checks, accumulators, history or distributed layout.

Variants are interleaved (a b c …, a b c …); the figure is the median process-CPU time per steady-state step and
its difference to ``static``. The lesson it gave (2026-11-29): inside a training loop these calls cost 3–4×
what ``overhead.py`` measures in a tight loop, because the step has just evicted the caches.

Run: ``python benchmarks/overhead_breakdown.py [--repeats 3] [--steps 1200] [--policy exp3]``; prints a table and writes
``benchmarks/results/overhead_breakdown-<hardware>-<yyyymmdd>.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_results
from overhead_training import Module, StepClock, bare_trainer, make_loader, make_sources

from odm.callbacks import OnlineMixing

VARIANTS = ("static", "no-op", "observe", "observe + step", "OnlineMixing", "observe + step, paired", "bare EXP3")


class _BareEXP3(pl.Callback):
    """EXP3 with the loss reward by hand: what ``observe`` + ``step`` compute for ``policy="exp3"``, at the
    least Python (same defaults: γ = 0.1, η = γ/K, scale decay 0.999; the row applies ``delay`` batches on)."""

    def __init__(self, mixer: Any) -> None:
        self.schedule, self.delay = mixer.schedule, mixer.delay
        self.k = mixer.num_domains
        self.gains, self.scale = np.zeros(self.k), 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
        k, gamma = self.k, 0.1
        ids, losses = batch["domain"].numpy(), outputs["sample_losses"].detach().numpy()
        count = np.bincount(ids, minlength=k)
        mean = np.bincount(ids, losses, minlength=k) / np.maximum(count, 1e-300)
        self.scale = max(0.999 * self.scale, float(mean.max()))
        reward = np.minimum(mean / self.scale, 1.0)
        drawn = self.schedule.proportions_for(batch["mix_step"])
        g = self.gains + reward * count / (count.sum() * np.maximum(drawn, 1e-12))
        g -= g.max()
        w = np.exp((gamma / k) * g)
        p = w * ((1.0 - gamma) / float(w.sum()))
        p += gamma / k
        self.gains = g
        self.schedule.append(p, batch["mix_step"] + 1 + self.delay, 0)


class _Feed(pl.Callback):
    """``observe`` (and ``step`` when ``step``) on every batch, or every other batch for the two last ones
    (``paired``); nothing when ``mixer`` is None."""

    def __init__(self, mixer: Any, *, step: bool, paired: bool = False) -> None:
        self.mixer, self.step, self.paired = mixer, step, paired
        self._held: list[tuple[Any, Any]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
        if self.mixer is None:
            return
        self._held.append((batch, outputs["sample_losses"].detach()))
        if self.paired and len(self._held) < 2:
            return
        for held_batch, losses in self._held:
            self.mixer.observe(held_batch, losses)
            if self.step:
                self.mixer.step()
        self._held.clear()


def run(variant: str, sources: dict[str, list[Any]], cfg: argparse.Namespace) -> float:
    """CPU µs per steady-state step of one fit."""
    torch.manual_seed(0)
    # A uniform policy (the default) never moves, so the loader's work is the same in every variant; with
    # `--policy exp3` the variants that step also pay for the updates and the loader's re-plans.
    loader = make_loader("online", sources, cfg)
    callbacks: list[pl.Callback] = {
        "static": [],
        "no-op": [_Feed(None, step=False)],
        "observe": [_Feed(loader.mixer, step=False)],
        "observe + step": [_Feed(loader.mixer, step=True)],
        "OnlineMixing": [OnlineMixing(loader)],
        "observe + step, paired": [_Feed(loader.mixer, step=True, paired=True)],
        "bare EXP3": [_BareEXP3(loader.mixer)],
    }[variant]
    clock = StepClock(cfg.warmup)
    bare_trainer(cfg.steps, [*callbacks, clock]).fit(Module(cfg), train_dataloaders=loader)
    return (clock.end[1] - clock.start[1]) / (cfg.steps - cfg.warmup) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200, help="training steps per fit (default 1200)")
    parser.add_argument("--warmup", type=int, default=200, help="steps not timed at the start (default 200)")
    parser.add_argument("--repeats", type=int, default=3, help="fits per variant, interleaved (default 3)")
    parser.add_argument("--domains", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--policy", default="uniform", help="the mixer's policy (default uniform: never moves)")
    parser.add_argument("--no-write", action="store_true", help="print only, write no results file")
    cfg = parser.parse_args(argv)
    if not 0 <= cfg.warmup < cfg.steps or cfg.repeats < 1:
        parser.error(f"need 0 <= --warmup < --steps and --repeats >= 1, got {cfg.warmup}, {cfg.steps}, {cfg.repeats}")
    cfg.lr = 1e-3
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module="lightning")
    sources = make_sources(cfg.domains, cfg.dim, 4000)
    variants = [v for v in VARIANTS if v != "bare EXP3" or cfg.policy == "exp3"]
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(cfg.repeats):
        for variant in variants:
            times[variant].append(run(variant, sources, cfg))
    base = statistics.median(times["static"])
    rows = [[v, f"{statistics.median(t):.0f}", f"{statistics.median(t) - base:+.0f}"] for v, t in times.items()]
    table = markdown_table(["callback", "CPU µs/step", "µs over static"], rows)
    notes = (
        f"MLP {cfg.dim}→{cfg.width}→{cfg.width}→1, batch {cfg.batch_size}, K = {cfg.domains}, policy {cfg.policy}"
        f"{' (never moves)' if cfg.policy == 'uniform' else ''}, {cfg.steps} steps ({cfg.warmup} not timed), "
        f"{cfg.repeats} interleaved fits per variant, medians."
    )
    print(table)
    print()
    print(notes)
    if not cfg.no_write:
        config = {k: v for k, v in vars(cfg).items() if k != "no_write"}
        paths = write_results("overhead_breakdown", config=config, results=times, table=table, notes=notes)
        print(f"\nwrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
