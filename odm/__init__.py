"""odm — online data mixing for PyTorch.

Learns, while a model trains, how much of each data domain to feed it:

* :class:`MixtureLoader` — a drop-in ``DataLoader`` over named per-domain sources with live proportions;
* :class:`OnlineMixer` — the policy + shared schedule + feedback object any training loop talks to;
* :mod:`odm.policies` — static priors, bandits and estimators that turn per-domain losses into proportions;
* ``odm.callbacks.OnlineMixing`` — the Lightning callback (imported separately: ``import odm`` stays light).
"""

from odm import policies
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
]
