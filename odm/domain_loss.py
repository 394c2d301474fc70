"""``DomainLoss``: a torchmetrics ``Metric`` of per-domain mean training loss (what ``mix/loss/<domain>`` logs).

It keeps per-domain *sums and counts*: they add up across batches and ranks with one ``SUM`` reduction, and the
mean is ``loss_sum / count``. Reached as ``odm.stats.DomainLoss``; this module is separate because importing
torchmetrics is slow (it pulls optional text and audio back-ends), so only its users pay for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric

from odm._checks import check_domain_names

__all__ = ["DomainLoss"]


class DomainLoss(Metric):
    """Per-domain mean loss, accumulated as per-domain sums and counts that sum-reduce across ranks.

    ``compute()`` returns ``mean_k = Σ_{i: d_i = k} w_i·ℓ_i / Σ_{i: d_i = k} w_i`` for each domain ``k``
    (``w_i = 1`` unless weights are given), NaN for a domain with no samples since the last ``reset()``.
    Non-finite losses are skipped, as :class:`odm.OnlineMixer` skips them.

    Args:
        domains: domain names, in the order of the domain ids (``mixer.domains``).
        **kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ``process_group``, …).

    Raises:
        ValueError / TypeError: for an empty list, duplicates or non-string names.

    Example:
        >>> metric = DomainLoss(["web", "code"])
        >>> metric.update(torch.tensor([0, 1, 1]), torch.tensor([2.0, 1.0, 3.0]))
        >>> metric.compute()
        tensor([2., 2.], dtype=torch.float64)
        >>> metric.as_dict()
        {'web': 2.0, 'code': 2.0}
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    loss_sum: torch.Tensor
    count: torch.Tensor

    def __init__(self, domains: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.domains = check_domain_names(domains)
        k = len(self.domains)
        self.add_state("loss_sum", default=torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, domain: torch.Tensor, loss: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Adds one batch: per-sample domain ids ``[B]`` and losses ``[B]`` (or one scalar loss for a
        one-domain batch, counted ``B`` times).

        Raises:
            ValueError: ids out of range or shapes that do not match.
        """
        ids = torch.as_tensor(domain, device=self.loss_sum.device).reshape(-1).long()
        values = torch.as_tensor(loss, device=self.loss_sum.device).detach().to(torch.float64)
        if values.ndim == 0:
            w = torch.full((1,), float(max(ids.numel(), 1)), dtype=torch.float64, device=values.device)
            ids, values = ids[:1], values.reshape(1)
        else:
            values = values.reshape(-1)
            if ids.numel() != values.numel():
                raise ValueError(f"`domain` has {ids.numel()} ids but `loss` has {values.numel()} values")
            w = (
                torch.ones_like(values)
                if weight is None
                else torch.as_tensor(weight, device=values.device).to(torch.float64).reshape(-1)
            )
            if w.numel() != values.numel():
                raise ValueError(f"`weight` has {w.numel()} values but `loss` has {values.numel()}")
        if ids.numel() and ids.device.type == "cpu":  # a range check on an accelerator would sync it
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= len(self.domains):
                raise ValueError(f"domain ids must be in [0, {len(self.domains) - 1}], got ids in [{lo}, {hi}]")
        finite = torch.isfinite(values)
        w = torch.where(finite, w, torch.zeros_like(w))
        self.loss_sum.index_add_(0, ids, torch.where(finite, values * w, torch.zeros_like(values)))
        self.count.index_add_(0, ids, w)

    def compute(self) -> torch.Tensor:
        """Per-domain mean loss ``(K,)`` float64; NaN where a domain had no samples."""
        return torch.where(
            self.count > 0, self.loss_sum / self.count.clamp_min(1e-300), torch.full_like(self.loss_sum, torch.nan)
        )

    def as_dict(self) -> dict[str, float]:
        """``{domain: mean loss}`` for the domains that had samples (one host transfer)."""
        mean = self.compute().tolist()
        return {d: v for d, v in zip(self.domains, mean) if v == v}  # v == v drops NaN
