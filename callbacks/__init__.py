"""Framework adapters, installed as ``odm.callbacks`` (kept out of ``import odm`` so the core stays light).

* :class:`OnlineMixing` — the Lightning callback: per-sample losses in, ``mixer.observe`` / ``mixer.step`` out.
"""

from odm.callbacks.online_mixing import SAMPLE_LOSSES, OnlineMixing

__all__ = ["SAMPLE_LOSSES", "OnlineMixing"]
