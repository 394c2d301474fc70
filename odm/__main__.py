"""``python -m odm demo`` (or the ``odm`` console script): a short run that shows what online mixing does."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="odm", description="Online data mixing for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="compare mixing policies on a built-in synthetic task (or a real corpus: --data DIR)",
        description="Trains the same small model under each mixing policy and prints a table and a plot.",
    )
    demo.add_argument("--steps", type=int, help="training steps per policy (default 600; real corpus 150)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--policies", nargs="+", help="policy names (default: every registered policy that applies)")
    demo.add_argument("--data", type=Path, help="a corpus folder (one folder per domain with train/val.jsonl)")
    demo.add_argument("--synthetic", action="store_true", help="use the built-in task even if a corpus is built")
    demo.add_argument("--plot", type=Path, help="where to write the PNG (default: <tmp>/odm-demo/odm-demo.png)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.steps is not None and args.steps < 1:
            parser.error(f"--steps must be >= 1, got {args.steps}")
        from odm.demo import run_demo

        try:
            return run_demo(
                steps=args.steps,
                seed=args.seed,
                policies=args.policies,
                data=args.data,
                synthetic=args.synthetic,
                plot_path=args.plot,
            )
        except (ValueError, FileNotFoundError) as err:  # bad names or an empty --data folder: a usage error
            parser.error(str(err))
    return 2


if __name__ == "__main__":
    sys.exit(main())
