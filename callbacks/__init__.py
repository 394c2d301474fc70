"""Framework adapters, installed as ``odm.callbacks`` (the Lightning callback lands here)."""
