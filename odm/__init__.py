"""odm — online data mixing for PyTorch.

Learns, while a model trains, how much of each data domain to feed it:

* :class:`MixtureLoader` — a drop-in ``DataLoader`` over named per-domain sources with live proportions;
* :class:`OnlineMixer` — the policy + shared schedule + feedback object any training loop talks to;
* :mod:`odm.policies` — static priors, bandits and estimators that turn per-domain losses into proportions;
* :mod:`odm.sources` — file, webdataset, iterable and map-style per-domain sources;
* :mod:`odm.simulate` — a loss-curve simulator to compare policies in seconds, without a model;
* :mod:`odm.stats` — per-domain held-out losses (``evaluate_domains``) and a torchmetrics ``DomainLoss``;
* :func:`plot_proportions` / :func:`write_proportions_csv` (:mod:`odm.plot`) — proportions over time;
* ``odm.callbacks.OnlineMixing`` (Lightning) and ``odm.callbacks.transformers.OnlineMixingTrainer``
  (Hugging Face) — the framework adapters, each an install extra.

``odm.stats`` and ``odm.plot`` load on first use, and the adapters only when imported, so ``import odm`` pulls
torch and numpy but neither Lightning, transformers, torchmetrics nor matplotlib.
"""

import importlib
from typing import Any

from odm import policies, simulate, sources
from odm.dataset import MixtureDataset, largest_remainder
from odm.loader import MixtureLoader
from odm.mixer import OnlineMixer
from odm.policies import DomainStats, Policy
from odm.schedule import ProportionSchedule

__version__ = "0.1.0"

__all__ = [
    "DomainStats",
    "MixtureDataset",
    "MixtureLoader",
    "OnlineMixer",
    "Policy",
    "ProportionSchedule",
    "__version__",
    "largest_remainder",
    "plot",
    "plot_proportions",
    "policies",
    "simulate",
    "sources",
    "stats",
    "write_proportions_csv",
]

_LAZY_MODULES = ("stats", "plot")
_LAZY_FUNCTIONS = {"plot_proportions": "plot", "write_proportions_csv": "plot"}


def __getattr__(name: str) -> Any:
    # PEP 562: `odm.stats` imports torchmetrics and `odm.plot`'s functions matplotlib; both wait until used.
    if name in _LAZY_MODULES:
        return importlib.import_module(f"odm.{name}")
    if name in _LAZY_FUNCTIONS:
        return getattr(importlib.import_module(f"odm.{_LAZY_FUNCTIONS[name]}"), name)
    raise AttributeError(f"module 'odm' has no attribute {name!r}")
