"""Mixing quality: does an online policy train a better model than uniform sampling for the same budget?

    python benchmarks/corpus.py --max-mb 5 && python benchmarks/quality.py --quick   # minutes
    python benchmarks/quality.py --jobs 2                                            # the full run
    python benchmarks/quality.py --data DIR --policies uniform odm --seeds 3 --steps 500
    python benchmarks/quality.py --quick --steps 1000 --cap quotes_en=30000 prose=30000   # data-constrained
    python benchmarks/quality.py --quick --steps 1000 --junk 2e7                          # a junk domain
    python benchmarks/quality.py --quick --domains code_c code_go json_data legal         # another composition
    python benchmarks/quality.py --report results/a.json results/b.json --tag merged       # merge split runs

The benchmark lives in the package ``benchmarks/mixing_quality/`` (data, policy specs, one training run,
statistics, reports and plots, the runner and this command line); this file is its entry point and re-exports
its public names, so ``import quality`` (with benchmarks/ on ``sys.path``) and ``python -m benchmarks.quality``
keep working.
"""

from __future__ import annotations

import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from mixing_quality import *  # noqa: F403
from mixing_quality import __all__, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
