"""odm — online data mixing for PyTorch.

Learns, while a model trains, how much of each data domain to feed it:

* :class:`MixtureLoader` — a drop-in ``DataLoader`` over named per-domain sources with live proportions;
* :class:`OnlineMixer` — the policy + shared schedule + feedback object any training loop talks to;
* :mod:`odm.policies` — static priors, bandits and estimators that turn per-domain losses into proportions;
* :mod:`odm.sources` — file, webdataset, iterable and map-style per-domain sources;
* :mod:`odm.simulate` — a loss-curve simulator to compare policies in seconds, without a model;
* ``odm.callbacks.OnlineMixing`` — the Lightning callback, and :mod:`odm.stats` (torchmetrics) — imported
  separately, so ``import odm`` pulls neither Lightning nor torchmetrics.
"""

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
    "policies",
    "simulate",
    "sources",
]
