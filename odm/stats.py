"""Per-domain loss statistics: a torchmetrics ``Metric`` for logging and a held-out evaluation helper.

Both keep per-domain *sums and counts* (ARCHITECTURE.md, decision 5): they add up across batches, workers
and ranks with one ``SUM`` reduction, and the per-domain mean is ``loss_sum / count``.

* :class:`DomainLoss` — the running per-domain mean training loss a logger shows (``mix/loss/<domain>``);
* :func:`evaluate_domains` — per-domain held-out loss sums and counts for policies that ask for an
  evaluation (``OnlineMixer.wants_eval()`` → ``OnlineMixer.observe_eval(loss_sum, count)``), usable in any
  loop; the Lightning callback calls it too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import islice
from typing import Any

import torch
from torchmetrics import Metric

__all__ = ["DomainLoss", "evaluate_domains"]


def _domain_names(domains: Any) -> list[str]:
    if isinstance(domains, str) or not isinstance(domains, Sequence):
        raise TypeError(f"`domains` must be a sequence of domain names, got {domains!r}")
    names = list(domains)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"`domains` must be a non-empty list of non-empty strings, got {domains!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"`domains` has duplicate names: {names}")
    return names


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
        self.domains = _domain_names(domains)
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


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def evaluate_domains(
    loss_fn: Callable[[Any], torch.Tensor],
    loaders: Mapping[str, Iterable[Any]],
    *,
    domains: Sequence[str] | None = None,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-domain held-out loss sums and counts, for :meth:`odm.OnlineMixer.observe_eval`.

    For each domain ``k`` with a loader, ``loss_sum_k = Σ_i ℓ_i`` and ``count_k`` = the number of samples over
    (at most ``max_batches``) batches of that loader; domains without a loader get ``0`` and ``0``. The caller
    chooses the mode: put the model in eval mode first (the Lightning callback does, and restores train mode);
    this function only adds ``torch.no_grad()``.

    Args:
        loss_fn: ``batch -> per-sample losses [B]`` (``reduction="none"``), or a scalar mean loss of the batch,
            then counted once per sample of the batch's first tensor dimension when it can tell, else once.
        loaders: ``{domain: iterable of batches}`` of held-out data, one per domain (any subset of ``domains``).
        domains: every domain name in mixer order (``mixer.domains``); default: the keys of ``loaders``.
        device: move each batch (tensors in nested dicts, lists, tuples) there first; ``None`` leaves it.
        max_batches: read at most this many batches per domain.

    Returns:
        ``(loss_sum, count)``: two float64 tensors ``(K,)`` on the losses' device (no host transfer), not
        reduced across ranks — ``OnlineMixer.observe_eval`` does that.

    Raises:
        ValueError: a loader for an unknown domain, a bad ``max_batches``, or ``loss_fn`` returning losses
            that do not form a 1-D or scalar tensor.
        TypeError: ``loaders`` not a mapping, or ``loss_fn`` returning something that is not a tensor.

    Example:
        >>> data = {"a": [torch.tensor([1.0, 3.0])], "b": [torch.tensor([4.0])]}
        >>> loss_sum, count = evaluate_domains(lambda batch: batch, data, domains=["a", "b", "c"])
        >>> loss_sum.tolist(), count.tolist()
        ([4.0, 4.0, 0.0], [2.0, 1.0, 0.0])
    """
    if not isinstance(loaders, Mapping):
        raise TypeError(f"`loaders` must be a mapping {{domain: held-out loader}}, got {type(loaders).__name__}")
    names = _domain_names(list(loaders) if domains is None else domains)
    unknown = [d for d in loaders if d not in names]
    if unknown:
        raise ValueError(f"`loaders` has held-out data for unknown domains {unknown}; domains: {names}")
    bad = isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    if max_batches is not None and bad:
        raise ValueError(f"`max_batches` must be a positive integer or None, got {max_batches!r}")
    dev = None if device is None else torch.device(device)
    sums: list[torch.Tensor | float] = [0.0] * len(names)
    counts: list[torch.Tensor | float] = [0.0] * len(names)
    out_device = dev or torch.device("cpu")
    with torch.no_grad():
        for name, loader in loaders.items():
            k = names.index(name)
            total: torch.Tensor | float = 0.0
            num = 0.0
            for batch in islice(loader, max_batches):
                if dev is not None:
                    batch = _to_device(batch, dev)
                loss = loss_fn(batch)
                if not isinstance(loss, torch.Tensor):
                    raise TypeError(f"`loss_fn` must return a tensor of per-sample losses, got {type(loss).__name__}")
                loss = loss.detach().to(torch.float64)
                if loss.ndim == 0:
                    n = _batch_size(batch)
                    total = total + loss * n
                    num += n
                elif loss.ndim == 1:
                    total = total + loss.sum()
                    num += loss.numel()
                else:
                    raise ValueError(
                        f"`loss_fn` must return per-sample losses of shape [B] (reduction='none') or a scalar, "
                        f"got shape {tuple(loss.shape)}"
                    )
                out_device = loss.device
            sums[k], counts[k] = total, num
    loss_sum = torch.stack([torch.as_tensor(s, dtype=torch.float64, device=out_device) for s in sums])
    count = torch.tensor([float(c) for c in counts], dtype=torch.float64, device=out_device)
    return loss_sum, count


def _batch_size(batch: Any) -> int:
    """The first dimension of the first tensor in ``batch`` (1 when there is none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, list | tuple):
        for v in batch:
            if isinstance(v, torch.Tensor | Mapping | list | tuple):
                return _batch_size(v)
    return 1
