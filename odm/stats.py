"""Per-domain loss statistics: a held-out evaluation helper and a metric for logging.

Both keep per-domain *sums and counts* (see ``docs/architecture.md``): they add up across batches, workers
and ranks with one ``SUM`` reduction, and the per-domain mean is ``loss_sum / count``.

* :func:`evaluate_domains` — per-domain held-out loss sums and counts for policies that ask for an
  evaluation (``OnlineMixer.wants_eval()`` → ``OnlineMixer.observe_eval(loss_sum, count)``), usable in any
  loop; the adapters call it too. Needs only torch.
* :class:`DomainLoss` — the running per-domain mean training loss a logger shows (``mix/loss/<domain>``), a
  torchmetrics ``Metric`` (defined in :mod:`odm.domain_loss`, imported on first use: torchmetrics is slow to
  import and comes with the ``[lightning]`` extra).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import islice
from typing import Any

import torch

from odm._checks import check_domain_names, check_int

__all__ = ["DomainLoss", "evaluate_domains"]  # noqa: F822 (DomainLoss: module __getattr__ below)


def __getattr__(name: str) -> Any:
    if name == "DomainLoss":
        try:
            from odm.domain_loss import DomainLoss
        except ImportError as err:
            if (err.name or "").split(".")[0] != "torchmetrics":
                raise
            raise ImportError("odm.stats.DomainLoss needs torchmetrics: pip install 'torch-odm[lightning]'") from err
        return DomainLoss
    raise AttributeError(f"module 'odm.stats' has no attribute {name!r}")


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
        loaders: ``{domain: iterable of batches}`` of held-out data, one per domain (any subset of ``domains``,
            in any order: each loader is credited to the domain it is keyed by).
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
    names = check_domain_names(list(loaders) if domains is None else domains)
    unknown = [d for d in loaders if d not in names]
    if unknown:
        raise ValueError(f"`loaders` has held-out data for unknown domains {unknown}; domains: {names}")
    check_int(max_batches, "max_batches", low=1, allow_none=True)
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
