"""``python -m odm demo`` (or the ``odm`` console script): a short run that shows what online mixing does."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _corpus_cache() -> Path:
    # Where benchmarks/corpus.py builds by default (kept in sync with odm.demo.CORPUS_CACHE, without importing
    # the demo — and torch — just to print --help).
    return Path(os.environ.get("ODM_CORPUS", Path.home() / ".cache" / "odm" / "corpus"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="odm", description="Online data mixing for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="compare mixing policies on a built-in synthetic task (~1 min), or on a real corpus (--real)",
        description="Trains the same small model under each mixing policy and prints a table and a plot. The "
        "default is a fast synthetic task; --real runs a short version of the real benchmark (a source "
        "checkout and a corpus built by benchmarks/corpus.py; about 20 minutes on 2 CPU cores).",
    )
    demo.add_argument("--steps", type=int, help="training steps per policy (default 600; --real 150)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--policies", nargs="+", help="policy names (default: every registered policy that applies)")
    demo.add_argument("--real", action="store_true", help="the real-corpus benchmark instead of the synthetic task")
    demo.add_argument("--data", type=Path, help=f"the corpus folder for --real (implies it; default {_corpus_cache()})")
    demo.add_argument("--synthetic", action="store_true", help=argparse.SUPPRESS)  # the default; kept for old scripts
    demo.add_argument("--plot", type=Path, help="where to write the PNG (default: <tmp>/odm-demo/odm-demo.png)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.steps is not None and args.steps < 1:
            parser.error(f"--steps must be >= 1, got {args.steps}")
        if args.synthetic and (args.real or args.data is not None):
            parser.error("--synthetic and --real/--data exclude each other")
        from odm.demo import run_demo

        try:
            return run_demo(
                steps=args.steps,
                seed=args.seed,
                policies=args.policies,
                data=args.data,
                real=args.real,
                plot_path=args.plot,
            )
        except (ValueError, FileNotFoundError) as err:  # bad names or an empty --data folder: a usage error
            parser.error(str(err))
    return 2


if __name__ == "__main__":
    sys.exit(main())
