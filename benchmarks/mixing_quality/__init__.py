"""Mixing quality: does an online policy train a better model than uniform sampling for the same budget?

Protocol (``docs/benchmarks.md`` §4): a tiny byte-level decoder LM (``model.py``) trains on a
multi-domain corpus split three ways (:mod:`.data`): ``train`` (what the loader draws), ``feedback`` (held-out
documents a policy may evaluate on while it trains: Aioli, Skill-It) and ``test`` (held-out documents used only
for the reported scores, never reachable by a policy). Every policy (:mod:`.specs`) gets the same model,
optimiser, schedule, batch size and number of steps; only the proportions differ (:mod:`.training`). Per policy
and seed the run records test **bits per byte** per domain along the run; :mod:`.stats` reports, per policy:

* the mean over scored domains of the final test bits per byte (unweighted: the headline, Aioli's "average
  test perplexity" criterion) and the byte-weighted mean (weights = the natural sizes);
* paired by seed: the difference to uniform, to natural and to the best static baseline of that corpus and
  regime (the regret), each as mean ± standard error with its 95% t-interval;
* the steps needed to reach those baselines' final means (the ODM paper's criterion), as a fraction of the budget;
* compute: training CPU time, the policy's held-out evaluations and any reference run (DoReMi's) included.

Regimes (flags usable with any ``--data``): ``--domains`` (another composition), ``--cap DOMAIN=BYTES`` (the
data-constrained regime: those domains repeat), ``--junk BYTES`` (a domain of random bytes, never scored),
``--steps`` (the horizon). Choices of defaults are made on the tuning seeds (``--first-seed 100``), results
reported on others.

Reading the results: the paired Δ cancels the initialisation, not the data order. In short runs of the small
model the learning curve drops in steps whose timing depends on which windows come first, so proportions that
differ by a few percent move the final mean by ±0.1–0.15 bpb per seed (measured at ``--quick``, 200 steps).
Below that noise floor, differences need longer runs or more seeds; the standard errors say which are.

The training loop uses odm the way users do: an ``odm.MixtureLoader`` over per-domain map-style datasets of
byte windows, ``loader.mixer.observe(batch, per_sequence_loss)`` and ``mixer.step()`` every step, and — for
policies that ask for held-out losses — ``mixer.wants_eval()`` → evaluation on the feedback split →
``mixer.observe_eval(sums, counts)``. Modules: :mod:`.data`, :mod:`.specs`, :mod:`.training`, :mod:`.stats`,
:mod:`.report`, :mod:`.runner`, :mod:`.cli`.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The package's modules import the benchmarks' shared helpers (``_common``, ``model``) by their top-level names,
# as every script in benchmarks/ does.
_HERE = str(Path(__file__).resolve().parents[1])
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from model import ByteLM, LMConfig, per_sequence_loss  # noqa: E402

from .cli import main  # noqa: E402
from .data import DEFAULT_DATA, JUNK, ByteWindows, Corpus, eval_windows, evaluate, load_corpus, parse_caps  # noqa: E402
from .report import goal, markdown, merge, plots, report, resummarise  # noqa: E402
from .runner import RESULTS, hardware, run, run_one  # noqa: E402
from .specs import VARIANTS, CurveReference, Spec, build_policy, discover, needs_reference, policy_class  # noqa: E402
from .stats import STATIC, Paired, paired, steps_to_reach, summarise, t_critical  # noqa: E402
from .training import LN2, QUICK, QUICK_MODEL, RunConfig, train_run  # noqa: E402

__all__ = [
    "DEFAULT_DATA",
    "JUNK",
    "LN2",
    "QUICK",
    "QUICK_MODEL",
    "RESULTS",
    "STATIC",
    "VARIANTS",
    "ByteLM",
    "ByteWindows",
    "Corpus",
    "CurveReference",
    "LMConfig",
    "Paired",
    "RunConfig",
    "Spec",
    "build_policy",
    "discover",
    "eval_windows",
    "evaluate",
    "goal",
    "hardware",
    "load_corpus",
    "main",
    "markdown",
    "merge",
    "needs_reference",
    "paired",
    "parse_caps",
    "per_sequence_loss",
    "plots",
    "policy_class",
    "report",
    "resummarise",
    "run",
    "run_one",
    "steps_to_reach",
    "summarise",
    "t_critical",
    "train_run",
]
