"""The command line of ``python benchmarks/quality.py`` (and ``python -m benchmarks.quality``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from .data import DEFAULT_DATA
from .report import report
from .runner import RESULTS, run

__all__ = ["main"]

DESCRIPTION = "Mixing quality: does an online policy train a better model than uniform sampling for the same budget?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"corpus folder (default {DEFAULT_DATA})")
    parser.add_argument("--quick", action="store_true", help="smaller model, 200 steps: minutes, for a first look")
    parser.add_argument("--policies", nargs="+", help="labels or registry names (default: all registered)")
    parser.add_argument("--labels", nargs="+", help="exact policy labels (e.g. doremi without doremi-eta1)")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (first-seed..first-seed+N-1), default 3")
    parser.add_argument(
        "--first-seed", type=int, default=0, help="the first seed (default 0; the tuning seeds are 100, 101, 102)"
    )
    parser.add_argument("--steps", type=int, help="training steps per run (default 800; quick 200)")
    parser.add_argument("--max-train-mb", type=float, help="read at most this many MB of training text per domain")
    parser.add_argument("--domains", nargs="+", help="a subset of the corpus' domains (another composition)")
    parser.add_argument(
        "--cap",
        nargs="+",
        metavar="DOMAIN=BYTES",
        help="cut these domains' training text (all=BYTES: every domain): the data-constrained regime",
    )
    parser.add_argument("--junk", type=float, default=0, help="add a domain `junk` of this many random bytes")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads in all")
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs trained at once, in worker processes sharing --threads (e.g. 2)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    parser.add_argument("--tag", help="file name tag instead of the hardware name")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--report",
        type=Path,
        nargs="+",
        help="no training: re-summarise a results JSON in place, or merge several into one (with --tag/--out)",
    )
    args = parser.parse_args(argv)
    if args.report is not None:
        try:
            report(args.report, out=args.out if args.out != RESULTS else None, tag=args.tag)
        except ValueError as err:
            parser.error(str(err))
        return 0
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.jobs < 1 or args.threads < 1:
        parser.error(f"--jobs and --threads must be >= 1, got {args.jobs} and {args.threads}")
    if args.junk < 0:
        parser.error(f"--junk must be >= 0 bytes, got {args.junk}")
    torch.set_num_threads(args.threads)
    try:
        run(
            args.data,
            quick=args.quick,
            policies=args.policies,
            seeds=range(args.first_seed, args.first_seed + args.seeds),
            steps=args.steps,
            out=args.out,
            max_train_mb=args.max_train_mb,
            progress=not args.no_progress,
            tag=args.tag,
            jobs=args.jobs,
            domains=args.domains,
            caps=args.cap,
            junk=int(args.junk),
            labels=args.labels,
        )
    except ValueError as err:  # a bad --domains / --cap item: the message names it
        parser.error(str(err))
    return 0
