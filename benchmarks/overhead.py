"""Feedback overhead: µs per ``mixer.observe`` + ``mixer.step`` for every policy and K (docs/benchmarks.md §2).

For each registered policy that builds from its name and each number of domains K (8, 22 — The Pile —, 100,
1000, 10 000 — CLIMB-style clusters), one ``OnlineMixer`` runs the feedback half of a training step over and
over: ``observe(domain_ids, per_sample_losses)`` on a batch of B CPU tensors (ids drawn from the current
proportions), a held-out evaluation fed to ``observe_eval`` whenever the policy asks (``wants_eval``), then
``step()`` — reduction, host transfer, policy update, publish. A repeat is the mean over enough steps to fill
a time budget (so periodic work, e.g. ADO's fits or Aioli's rounds, is amortised); the figure is the median
over repeats, with the share spent inside ``policy.update``. The batch is drawn outside the timed region.
``mixer.history`` is cleared between repeats to keep memory flat at large K.

Run: ``python benchmarks/overhead.py [--quick] [--device cuda]``. Prints a table and writes
``benchmarks/results/overhead-<hardware>-<yyyymmdd>.{json,md}``. Target: ODM / EXP3 / UCB1 under 50 µs at K = 22.

``--torch-path`` feeds the CPU tensors through the accelerator path (torch ops on the loss's device, ids
included, as a Lightning batch moved to a GPU arrives) instead of the host path: where no GPU is at hand, the
number and cost of its torch calls per step is a proxy for what it costs on one (a CUDA launch adds a few µs to
each). Its results are written as ``overhead-torchpath-…``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, median, write_results

import odm
import odm.feedback
from odm.policies import default_policy_names, policy_names

SIZES = (8, 22, 100, 1000, 10_000)
TARGET = {"policies": ("odm", "exp3", "ucb1"), "num_domains": 22, "us": 50.0}


class _TimedUpdate:
    """Wraps ``policy.update`` to add up the time spent inside it."""

    def __init__(self, policy: odm.Policy) -> None:
        self.inner = policy.update
        self.seconds = 0.0

    def __call__(self, stats: odm.DomainStats) -> None:
        t0 = time.perf_counter()
        self.inner(stats)
        self.seconds += time.perf_counter() - t0


class Cell:
    """One policy at one K: a mixer fed random batches, timed around the feedback calls only."""

    def __init__(
        self, name: str, k: int, *, batch_size: int, device: str, seed: int = 0, clock: Any = time.perf_counter
    ) -> None:
        self.name, self.k, self.batch_size, self.device, self.clock = name, k, batch_size, device, clock
        self.mixer = odm.OnlineMixer([f"d{i}" for i in range(k)], name, seed=seed)
        self.timer = _TimedUpdate(self.mixer.policy)
        self.mixer.policy.update = self.timer  # type: ignore[method-assign]
        self.rng = np.random.default_rng(seed)
        self.eval_sum = torch.full((k,), 64.0 * 2.0, device=device)
        self.eval_count = torch.full((k,), 64.0, device=device)
        self.steps = 20
        self.us_total: list[float] = []
        self.us_update: list[float] = []

    def run(self, n: int) -> float:
        """``n`` steps; returns the seconds spent in observe (+ observe_eval) + step."""
        mixer, spent, clock = self.mixer, 0.0, self.clock
        for _ in range(n):
            ids = torch.from_numpy(mixer.sample(self.batch_size))  # the loader's ids: on the CPU
            loss = torch.from_numpy(self.rng.gamma(2.0, 1.0, self.batch_size) + 0.01 * ids.numpy())
            loss = loss.float().to(self.device)
            t0 = clock()
            mixer.observe(ids, loss)
            if mixer.wants_eval():
                mixer.observe_eval(self.eval_sum, self.eval_count)
            mixer.step()
            spent += clock() - t0
        return spent

    def calibrate(self, budget_s: float) -> None:
        self.run(20)  # warm-up (first allocations, first publish)
        per_step = max(self.run(20) / 20, 1e-7)
        self.steps = int(min(max(budget_s / per_step, 20), 5000))

    def repeat(self) -> None:
        self.mixer.history.clear()
        self.timer.seconds = 0.0
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        spent = self.run(self.steps)
        self.us_total.append(spent / self.steps * 1e6)
        self.us_update.append(self.timer.seconds / self.steps * 1e6)

    def result(self) -> dict[str, Any]:
        return {
            "policy": self.name,
            "num_domains": self.k,
            "steps_per_repeat": self.steps,
            "us_total": self.us_total,
            "us_update": self.us_update,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 short repeats per cell (about a minute)")
    parser.add_argument("--policies", nargs="*", default=None, help="default: every policy that builds by name")
    parser.add_argument("--sizes", nargs="*", type=int, default=list(SIZES), help="numbers of domains K")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=None, help="default 7 (3 with --quick)")
    parser.add_argument("--budget", type=float, default=None, help="seconds per repeat (default 0.25, quick 0.05)")
    parser.add_argument("--device", default="cpu", help="where the losses live (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--torch-path", action="store_true", help="CPU tensors through the accelerator (torch) path: a GPU proxy"
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall-clock (default) or this thread's CPU time (steadier when other processes share the cores)",
    )
    args = parser.parse_args(argv)
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    repeats = args.repeats or (3 if args.quick else 7)
    budget = args.budget or (0.05 if args.quick else 0.25)
    torch.set_num_threads(args.threads)
    if args.torch_path:
        odm.feedback._CPU_ON_HOST = False  # what the tests do to run the accelerator path on the CPU
    names = args.policies or default_policy_names()
    unknown = sorted(set(names) - set(policy_names()))
    if unknown:
        parser.error(f"unknown policies {unknown}; known: {policy_names()}")

    load_before = os.getloadavg()[0]
    cells, results = [], []
    for name in names:
        for k in args.sizes:
            try:
                cell = Cell(name, k, batch_size=args.batch_size, device=args.device, clock=clock)
            except ValueError as err:  # a policy whose defaults do not fit this K (e.g. a floor above 1/K)
                results.append({"policy": name, "num_domains": k, "error": str(err)})
                print(f"  {name:<20} K={k:<6} not run: {err}", file=sys.stderr, flush=True)
                continue
            cell.calibrate(budget)
            cells.append(cell)
    # Repeats go round all cells in turn, so a noisy neighbour slows every policy alike.
    for r in range(repeats):
        for cell in cells:
            cell.repeat()
        print(f"  repeat {r + 1}/{repeats} done", file=sys.stderr, flush=True)
    results += [cell.result() for cell in cells]
    load = [round(load_before, 2), round(os.getloadavg()[0], 2)]

    cell = {(r["policy"], r["num_domains"]): r for r in results}
    headers = ["policy", *(f"K={k}" for k in args.sizes)]
    rows = []
    for name in names:
        row = [name]
        for k in args.sizes:
            r = cell[(name, k)]
            row.append("n/a" if "error" in r else f"{median(r['us_total']):.1f} ({median(r['us_update']):.1f})")
        rows.append(row)
    table = markdown_table(headers, rows)
    verdicts = []
    for name in TARGET["policies"]:
        if "us_total" in cell.get((name, TARGET["num_domains"]), {}):
            us = median(cell[(name, TARGET["num_domains"])]["us_total"])
            verdicts.append(f"{name} {us:.1f} µs ({'under' if us < TARGET['us'] else 'OVER'} {TARGET['us']:.0f})")
    notes = (
        "µs per `observe` + `step` (in brackets: inside `policy.update`), median over "
        f"{repeats} repeats, batch {args.batch_size}, losses on {args.device}"
        f"{' through the accelerator (torch) path' if args.torch_path else ''}, {args.threads} torch thread(s), "
        f"{'wall-clock' if args.clock == 'wall' else 'thread CPU'} time; "
        f"1-minute load average {load[0]} before and {load[1]} after. "
        "`uniform` never moves, so its row is the mixer's own cost (accumulate, reduce, build the stats). "
        "Shared machine: compare rows within this run. Target at K = 22: " + "; ".join(verdicts) + "."
    )
    errors = [f"{r['policy']} at K={r['num_domains']}: {r['error']}" for r in results if "error" in r]
    if errors:
        notes += "\n\nn/a — the policy's defaults refuse this K: " + "; ".join(errors) + "."
    print(table)
    print()
    print(notes)
    config = {
        "sizes": args.sizes,
        "batch_size": args.batch_size,
        "repeats": repeats,
        "budget_s": budget,
        "device": args.device,
        "threads": args.threads,
        "clock": args.clock,
        "torch_path": args.torch_path,
        "quick": args.quick,
        "policies": names,
        "load_average": load,
    }
    name = "overhead-torchpath" if args.torch_path else "overhead"
    json_path, md_path = write_results(name, config=config, results=results, table=table, notes=notes)
    print(f"\nwrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
