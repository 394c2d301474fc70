"""``python -m odm demo`` (or the ``odm`` console script): a short run that shows what online mixing does."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="odm", description="Online data mixing for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="a short mixing run on a built-in synthetic task (or --data DIR)")
    demo.add_argument("--steps", type=int, default=300, help="training steps per policy")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from odm.demo import run_demo

        return run_demo(steps=args.steps, seed=args.seed)
    return 2


if __name__ == "__main__":
    sys.exit(main())
