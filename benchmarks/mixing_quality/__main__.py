"""``python -m mixing_quality`` (from benchmarks/) runs the quality benchmark's command line."""

import sys

from . import main

sys.exit(main())
