"""Toy domains and a small learned policy shared by the callback tests (and the DDP script they launch)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from odm.policies import DomainStats, Policy

DOMAINS = ["easy", "hard", "noise"]


class MeanLossSoftmax(Policy):
    """A small deterministic learned policy that chases loss: ``p ∝ exp(mean loss of each domain so far / 2)``."""

    def _init_state(self, num_domains: int) -> None:
        self._sum, self._count = np.zeros(num_domains), np.zeros(num_domains)
        self._p = np.full(num_domains, 1.0 / num_domains)

    def update(self, stats: DomainStats) -> None:
        self._sum += stats.loss_sum
        self._count += stats.count
        mean = np.where(self._count > 0, self._sum / np.maximum(self._count, 1), 0.0)
        w = np.exp((mean - mean.max()) / 2)
        self._p = w / w.sum()

    def _get_state(self) -> dict[str, Any]:
        return {"sum": self._sum.copy(), "count": self._count.copy()}

    def _set_state(self, state: dict[str, Any]) -> None:
        self._sum, self._count = np.array(state["sum"]), np.array(state["count"])


def toy_sources(n: int = 512) -> dict[str, list[dict[str, Any]]]:
    """``easy`` (linear), ``hard`` (non-linear) and ``noise`` (pure noise) regression domains with sample ids."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, generator=g) / 4
    out = {}
    for k, name in enumerate(DOMAINS):
        x = torch.randn(n, 16, generator=g)
        y = {"easy": 2 * (x @ w), "hard": torch.sin(3 * (x @ w)) + x[:, 0] * x[:, 1]}.get(name)
        y = 2 * torch.randn(n, generator=g) if y is None else y
        out[name] = [{"x": x[i], "y": y[i], "id": k * 100_000 + i} for i in range(n)]
    return out
