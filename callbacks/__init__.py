"""Framework adapters, installed as ``odm.callbacks`` (kept out of ``import odm`` so the core stays light).

* :class:`OnlineMixing` — the Lightning callback (extra ``[lightning]``): per-sample losses in,
  ``mixer.observe`` / ``mixer.step`` out;
* :mod:`odm.callbacks.transformers` — ``OnlineMixingTrainer`` / ``OnlineMixingMixin`` for Hugging Face
  ``transformers.Trainer`` (extra ``[hf]``).

Each adapter is imported when first used, so one framework's adapter never needs the other framework.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SAMPLE_LOSSES", "OnlineMixing"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        try:
            from odm.callbacks import online_mixing
        except ImportError as err:
            if (err.name or "").split(".")[0] not in ("lightning", "torchmetrics"):
                raise
            raise ImportError(f"odm.callbacks.{name} needs Lightning: pip install 'torch-odm[lightning]'") from err
        return getattr(online_mixing, name)
    raise AttributeError(f"module 'odm.callbacks' has no attribute {name!r}")
