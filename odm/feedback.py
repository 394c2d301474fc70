"""Per-domain feedback: loss sums and counts accumulated where the loss lives, reduced once per step.

:class:`DomainFeedback` is the accumulator behind :meth:`odm.OnlineMixer.observe`: numpy on the host for CPU
tensors, numpy arrays and lists (a CPU tensor's ``.numpy()`` is a free view); a torch tensor on the loss's
device otherwise (no synchronisation until :meth:`DomainFeedback.reduce`). Every :meth:`odm.OnlineMixer.step`
moves one flat vector — a :class:`FeedbackRows` record, plus whatever the caller appends — through one
``all_reduce(SUM)`` and one host transfer, so every rank holds identical numbers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from odm._dist import all_reduce_host, comm_device, distributed

__all__ = ["DomainFeedback", "FeedbackRows", "all_reduce_host", "distributed", "flatten_tokens"]

_NUM_DOMAIN_ROWS = 7  # the (K,) fields of FeedbackRows
#: CPU tensors take the numpy host path; tests set this False to run the accelerator (torch) path on the CPU.
_CPU_ON_HOST = True
_FLOAT_DTYPES = frozenset({torch.float32, torch.float64, torch.float16})  # losses numpy reads as they are
_NUM_SCALARS = 4  # the scalar fields of FeedbackRows


@dataclasses.dataclass
class FeedbackRows:
    """The statistics of one or more steps, summed over ranks: the one layout of the flat vector.

    Every field is additive (the all_reduce sums it, and the mixer adds steps between two policy updates).
    :meth:`pack` / :meth:`unpack` are the only places that know the order.

    Attributes:
        loss: ``(K,)`` Σ weight·loss over the finite losses of each domain.
        count: ``(K,)`` Σ weight (samples, or tokens when weighted) behind ``loss``.
        samples: ``(K,)`` finite losses observed (samples, or tokens of packed sequences).
        nonfinite: ``(K,)`` NaN / inf losses skipped.
        eval_sum: ``(K,)`` held-out loss sums given to :meth:`odm.OnlineMixer.observe_eval`.
        eval_count: ``(K,)`` held-out counts.
        drawn: ``(K,)`` Σ over observed batches of (samples of the batch) × (the proportions it was drawn under).
        bad_ids: domain ids out of range, seen on an accelerator (checkable only on the host).
        bad_weights: negative or non-finite weights seen on an accelerator.
        calls: ``observe`` / ``observe_eval`` calls (tells a step with feedback from one without).
        batches: ``observe`` calls: the micro-batches behind the training statistics.
    """

    loss: np.ndarray
    count: np.ndarray
    samples: np.ndarray
    nonfinite: np.ndarray
    eval_sum: np.ndarray
    eval_count: np.ndarray
    drawn: np.ndarray
    bad_ids: float = 0.0
    bad_weights: float = 0.0
    calls: float = 0.0
    batches: float = 0.0

    @staticmethod
    def size(num_domains: int) -> int:
        """Length of the packed vector for ``num_domains`` domains."""
        return _NUM_DOMAIN_ROWS * num_domains + _NUM_SCALARS

    @classmethod
    def zeros(cls, num_domains: int) -> FeedbackRows:
        return cls.unpack(np.zeros(cls.size(num_domains)), num_domains)

    @classmethod
    def unpack(cls, flat: np.ndarray, num_domains: int) -> FeedbackRows:
        """Views into ``flat`` (writing a field writes ``flat``); the scalars are copied out."""
        k = num_domains
        r = flat[: _NUM_DOMAIN_ROWS * k].reshape(_NUM_DOMAIN_ROWS, k)
        bad_ids, bad_weights, calls, batches = (float(x) for x in flat[_NUM_DOMAIN_ROWS * k : cls.size(k)])
        loss, count, samples, nonfinite, eval_sum, eval_count, drawn = r
        return cls(loss, count, samples, nonfinite, eval_sum, eval_count, drawn, bad_ids, bad_weights, calls, batches)

    @staticmethod
    def domain_rows(flat: np.ndarray, num_domains: int) -> np.ndarray:
        """The ``(7, K)`` per-domain rows of a packed vector (a view), indexed by ``LOSS`` … ``DRAWN``."""
        return flat[: _NUM_DOMAIN_ROWS * num_domains].reshape(_NUM_DOMAIN_ROWS, num_domains)

    @staticmethod
    def scalars(flat: np.ndarray) -> tuple[float, float, float, float]:
        """``(bad_ids, bad_weights, calls, batches)`` of a packed vector (exactly :meth:`size` long)."""
        bad_ids, bad_weights, calls, batches = flat[-_NUM_SCALARS:].tolist()
        return bad_ids, bad_weights, calls, batches

    @staticmethod
    def add_observation(
        flat: np.ndarray, num_domains: int, loss_sum: np.ndarray, count: np.ndarray, drawn: np.ndarray | None
    ) -> None:
        """Adds one unweighted, all-finite ``observe()`` to the packed vector ``flat`` in place: the same numbers,
        summed in the same order, as adding the vector :meth:`DomainFeedback.reduce` packs for that call alone —
        its loss sums, its counts (``count`` and ``samples`` alike), ``drawn`` (its samples × the row it was drawn
        under; ``None`` without a batch index), one call and one batch."""
        rows = flat[: _NUM_DOMAIN_ROWS * num_domains].reshape(_NUM_DOMAIN_ROWS, num_domains)
        rows[LOSS] += loss_sum
        rows[COUNT : SAMPLES + 1] += count
        if drawn is not None:
            rows[DRAWN] += drawn
        flat[CALLS - _NUM_SCALARS] += 1.0
        flat[BATCHES - _NUM_SCALARS] += 1.0

    def pack(self) -> np.ndarray:
        """The flat vector :meth:`unpack` reads (a new array)."""
        rows = [self.loss, self.count, self.samples, self.nonfinite, self.eval_sum, self.eval_count, self.drawn]
        return np.concatenate([*rows, [self.bad_ids, self.bad_weights, self.calls, self.batches]])


# Offsets into the packed vector, for the accumulators that write it in place (host numpy, device torch).
LOSS, COUNT, SAMPLES, NONFINITE, EVAL_SUM, EVAL_COUNT, DRAWN = range(_NUM_DOMAIN_ROWS)
BAD_IDS, BAD_WEIGHTS, CALLS, BATCHES = range(_NUM_SCALARS)  # after the K-rows


def _host(x: Any, name: str) -> np.ndarray:
    """``x`` (tensor on any device, numpy, list, number) as a numpy array, without copying CPU data."""
    if isinstance(x, torch.Tensor):
        if x.requires_grad:
            x = x.detach()
        if not x.is_cpu:
            _refuse_meta(**{name: x})
            x = x.cpu()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as err:
        raise TypeError(f"`{name}` must be a tensor, numpy array, sequence or number, got {type(x).__name__}") from err


def _check_ids_dtype(integer: bool, dtype: Any) -> None:
    if not integer:
        raise TypeError(f"domain ids must be integers (e.g. torch.long), got dtype {dtype}")


def _refuse_meta(**named: Any) -> None:
    for name, x in named.items():
        if isinstance(x, torch.Tensor) and x.device.type == "meta":
            raise ValueError(
                f"`{name}` is on the 'meta' device, which holds no values; pass the real tensor (e.g. the "
                "per-sample losses of the forward pass), not a shape placeholder"
            )


def flatten_tokens(token_domain: Any, loss: Any, weight: Any) -> tuple[Any, Any]:
    """Per-token losses (and weights) of a packed batch, flattened to match ``token_domain.reshape(-1)``.

    A per-sequence weight ``[B]`` applies to every token of its sequence.
    """
    shape = tuple(token_domain.shape) if hasattr(token_domain, "shape") else np.shape(token_domain)
    if len(shape) != 2:
        raise ValueError(f"batch['token_domain'] must be [B, T] (one domain id per token), got shape {shape}")
    b, t = shape
    loss_shape = tuple(loss.shape) if hasattr(loss, "shape") else np.shape(loss)
    if loss_shape != shape:
        raise ValueError(
            f"per-token losses must have the shape of batch['token_domain'] {list(shape)}, got {list(loss_shape)}; "
            "pass the unreduced loss (reduction='none'), reshaped to [B, T]"
        )
    flat_loss = loss.reshape(-1) if hasattr(loss, "reshape") else np.asarray(loss).reshape(-1)
    if weight is None:
        return flat_loss, None
    w_shape = tuple(weight.shape) if hasattr(weight, "shape") else np.shape(weight)
    if w_shape == shape:
        return flat_loss, weight.reshape(-1) if hasattr(weight, "reshape") else np.asarray(weight).reshape(-1)
    if w_shape == (b,):
        if isinstance(weight, torch.Tensor):
            return flat_loss, weight.reshape(b, 1).expand(b, t).reshape(-1)
        return flat_loss, np.broadcast_to(np.asarray(weight, dtype=np.float64).reshape(b, 1), (b, t)).reshape(-1)
    if w_shape == ():
        return flat_loss, weight
    raise ValueError(
        f"`weight` of a packed batch must be [B, T] {list(shape)}, per sequence [B] ({b},) or one number, "
        f"got shape {list(w_shape)}"
    )


class DomainFeedback:
    """Per-domain loss sums and counts of one step, on the host and (lazily) on the loss's device.

    Args:
        num_domains: ``K``.
    """

    def __init__(self, num_domains: int) -> None:
        self.num_domains = num_domains
        self.size = FeedbackRows.size(num_domains)
        self._calls_at = self.size - _NUM_SCALARS + CALLS
        self._batches_at = self.size - _NUM_SCALARS + BATCHES
        self.reset()

    def reset(self) -> None:
        """Starts a new step: zero host rows, no device buffer, no batches."""
        k = self.num_domains
        if not hasattr(self, "_acc"):
            self._acc = np.zeros(self.size)  # a packed FeedbackRows, written in place
            self._rows = self._acc[: _NUM_DOMAIN_ROWS * k].reshape(_NUM_DOMAIN_ROWS, k)
            self.batches: dict[int, int] = {}  # mix_step -> samples observed from that batch
        else:
            if self.held is None:  # (a step that held its only call left the rows at zero)
                self._acc.fill(0.0)  # (reduce() handed out a copy)
            if self.batches:
                self.batches = {}
        self._dev: torch.Tensor | None = None  # the same layout on the loss's device, made on first use
        self._calls = self._batches = 0  # written into the packed vector at reduce()
        self.pending = False
        # `(samples, loss sums, counts)` of the step's only call so far when it was an unweighted, all-finite
        # observe() on the host (padding left out): kept out of the rows until anything else needs them (the usual step
        # hands them to the policy as they are; see OnlineMixer.step).
        self.held: tuple[int, np.ndarray, np.ndarray] | None = None

    def _fold(self) -> None:
        """Adds the held observation into the rows (before another call adds to them, or a reduction)."""
        assert self.held is not None
        _, sums, samples = self.held
        self.held = None
        self._rows[LOSS] += sums
        self._rows[COUNT : SAMPLES + 1] += samples  # unweighted: COUNT and SAMPLES (adjacent rows) alike

    def _device_acc(self, device: torch.device) -> torch.Tensor:
        if self._dev is None:
            self._dev = torch.zeros(self.size, dtype=torch.float64, device=device)
        elif self._dev.device != device:
            raise ValueError(
                f"observe() got losses on {device} after losses on {self._dev.device} in the same step; "
                "keep one device per mixer"
            )
        return self._dev

    def _scalar_index(self, which: int) -> int:
        return _NUM_DOMAIN_ROWS * self.num_domains + which

    def observe(self, domain: Any, loss: Any, weight: Any, *, pad_id: int | None = None) -> int:
        """Adds one batch's per-sample (or scalar) losses; returns the number of samples it covered.

        ``pad_id``: ids equal to it (padding tokens of packed sequences) are left out entirely.
        See :meth:`odm.OnlineMixer.observe` for the accepted forms and the errors.
        """
        if self.held is not None:
            self._fold()
        if isinstance(loss, torch.Tensor) and not (loss.is_cpu and _CPU_ON_HOST):
            _refuse_meta(loss=loss, domain=domain, weight=weight)
            num = self._observe_device(domain, loss, weight, pad_id)
        else:
            num = self._observe_host(domain, loss, weight, pad_id, hold=not self._calls)
        self._calls += 1
        self._batches += 1
        self.pending = True
        return num

    def add_batch(self, mix_step: int, num_samples: int) -> None:
        """Records that ``num_samples`` observed samples came from batch ``mix_step``."""
        self.batches[mix_step] = self.batches.get(mix_step, 0) + num_samples

    def _range_error(self, ids: np.ndarray) -> ValueError:
        k = self.num_domains
        lo, hi = int(ids.min()), int(ids.max())
        return ValueError(f"domain ids must be in [0, {k - 1}] for {k} domains, got ids in [{lo}, {hi}]")

    def _host_ids(self, domain: Any, num_losses: int, scalar: bool) -> np.ndarray:
        """Domain ids as a host array matching the losses; checks dtype, shape and a scalar loss's one domain.

        The range is checked by the caller (the host path gets it for free from ``np.bincount``).
        """
        ids = _host(domain, "domain").reshape(-1)
        if ids.size or not isinstance(domain, Sequence):  # `[]` is float64 to numpy
            _check_ids_dtype(ids.dtype.kind in "iu", ids.dtype)
        if scalar:
            if not ids.size:
                raise ValueError("a scalar loss needs the domain id of its batch; `domain` is empty")
            if ids.size > 1 and (ids != ids[0]).any():
                raise ValueError(
                    f"a scalar loss needs a batch of one domain; this batch mixes domain ids "
                    f"{np.unique(ids).tolist()[:10]}: pass per-sample losses (reduction='none')"
                )
        ids = ids.astype(np.intp, copy=False)
        if not scalar and ids.size == 1 and num_losses > 1:
            return np.broadcast_to(ids, (num_losses,))
        if not scalar and ids.size != num_losses:
            raise ValueError(f"`domain` has {ids.size} ids but `loss` has {num_losses} values; they must match")
        return ids

    @staticmethod
    def _host_weight(weight: Any, n: int) -> np.ndarray:
        w = _host(weight, "weight").astype(np.float64, copy=False).reshape(-1)
        if w.size == 1 and n != 1:
            w = np.broadcast_to(w, (n,))
        if w.size != n:
            raise ValueError(f"`weight` has {w.size} values but the batch has {n} samples; they must match")
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError(f"`weight` must be finite and non-negative (e.g. token counts), got {weight!r}")
        return w

    def _observe_host(self, domain: Any, loss: Any, weight: Any, pad_id: int | None, *, hold: bool = False) -> int:
        """Adds the batch on the host (``hold``: the step's first call; an unweighted, all-finite one is
        then held instead, see :attr:`held`)."""
        if (
            type(loss) is torch.Tensor  # the usual call: per-sample CPU losses and the batch's CPU int64 ids
            and type(domain) is torch.Tensor
            and domain.dtype == torch.int64
            and loss.dtype in _FLOAT_DTYPES
            and domain.is_cpu
            and loss.dim() == 1
            and domain.shape == loss.shape
        ):
            values, ids, scalar = (loss.detach() if loss.requires_grad else loss).numpy(), domain.numpy(), False
        else:
            values = _host(loss, "loss")
            if values.dtype.kind != "f":
                values = values.astype(np.float64)
            scalar = values.ndim == 0
            values = values.reshape(-1)
            ids = self._host_ids(domain, values.size, scalar)
        if scalar:
            values = np.broadcast_to(values, ids.shape)
        w = None if weight is None else self._host_weight(weight, values.size)
        if pad_id is not None:
            real = ids != pad_id
            ids, values = ids[real], values[real]
            w = None if w is None else w[real]
        n = values.size
        k = self.num_domains
        try:
            samples = np.bincount(ids, minlength=k)  # also the range check: negative ids raise, large ones widen
        except ValueError:
            raise self._range_error(ids) from None
        if samples.size > k:
            raise self._range_error(ids)
        rows = self._rows
        if w is None:
            # bincount sums in float64 whatever the loss dtype; a NaN or inf among the losses carries into the
            # total, so one check on K sums replaces one per loss (an overflowing total takes the slow path).
            sums = np.bincount(ids, values, minlength=k)
            if math.isfinite(sums.dot(sums)):  # (a dot product is the cheapest reduction; overflow: exact path)
                if hold:
                    self.held = (n, sums, samples)
                else:
                    rows[LOSS] += sums
                    rows[COUNT : SAMPLES + 1] += samples  # unweighted: COUNT and SAMPLES (adjacent rows) alike
                return n
        values = values.astype(np.float64, copy=False)
        finite = np.isfinite(values)
        if not finite.all():
            skipped = np.bincount(ids[~finite], minlength=k)
            rows[NONFINITE] += skipped
            samples = samples - skipped
            ids, values = ids[finite], values[finite]
            w = None if w is None else w[finite]
        rows[SAMPLES] += samples
        if w is None:
            rows[COUNT] += samples
            rows[LOSS] += np.bincount(ids, values, minlength=k)
        else:
            rows[COUNT] += np.bincount(ids, w, minlength=k)
            rows[LOSS] += np.bincount(ids, values * w, minlength=k)
        return n

    def _observe_device(self, domain: Any, loss: torch.Tensor, weight: Any, pad_id: int | None) -> int:
        device = loss.device
        values = loss.detach().to(torch.float64)
        scalar = values.ndim == 0
        values = values.reshape(-1)
        acc = self._device_acc(device)
        k = self.num_domains
        real: torch.Tensor | None = None  # False at padding tokens
        num_real: int | None = None
        if isinstance(domain, torch.Tensor) and not (domain.is_cpu and _CPU_ON_HOST):
            # Ids already on the accelerator: out-of-range ids are counted here and reported at step().
            _check_ids_dtype(
                not (domain.is_floating_point() or domain.is_complex() or domain.dtype == torch.bool), domain.dtype
            )
            ids = domain.to(device=device, dtype=torch.long).reshape(-1)
            if pad_id is not None:
                real = ids != pad_id
                ids = torch.where(real, ids, 0)
            clamped = ids.clamp(0, k - 1)  # out-of-range ids are credited nowhere: only counted, below
            out_of_range = clamped != ids
            ids = clamped
            if ids.numel() == 1 and values.numel() > 1:
                ids, out_of_range = ids.expand(values.numel()), out_of_range.expand(values.numel())
            elif not scalar and ids.numel() != values.numel():
                raise ValueError(
                    f"`domain` has {ids.numel()} ids but `loss` has {values.numel()} values; they must match"
                )
            bad_ids: torch.Tensor | None = out_of_range
        else:
            host_ids = self._host_ids(domain, values.numel(), scalar)
            if pad_id is not None:
                host_real = host_ids != pad_id
                num_real = int(host_real.sum())
                real = torch.from_numpy(np.ascontiguousarray(host_real)).to(device)
                host_ids = np.where(host_real, host_ids, 0)
            if host_ids.size and (host_ids.min() < 0 or host_ids.max() >= k):
                raise self._range_error(host_ids)
            ids = torch.from_numpy(np.ascontiguousarray(host_ids)).to(device=device, dtype=torch.long)
            bad_ids = None
        if scalar:
            # NOTE: that ids on an accelerator are all one domain is not checked (it would synchronise).
            values = values.expand(ids.numel())
        n = values.numel()
        finite = torch.isfinite(values)
        keep = finite if bad_ids is None else finite & ~bad_ids
        if real is not None:
            keep = keep & real
        kept = keep.to(torch.float64)
        if weight is None:
            w, weighted_loss = kept, torch.where(keep, values, 0.0)  # (w is 1 where kept: no product needed)
        elif isinstance(weight, torch.Tensor) and not (weight.is_cpu and _CPU_ON_HOST):
            w = weight.detach().to(device=device, dtype=torch.float64).reshape(-1)
            if w.numel() == 1 and n != 1:
                w = w.expand(n)
            if w.numel() != n:
                raise ValueError(f"`weight` has {w.numel()} values but the batch has {n} samples; they must match")
            bad_w = ~torch.isfinite(w) | (w < 0)
            if real is not None:
                bad_w = bad_w & real
            acc[self._scalar_index(BAD_WEIGHTS)] += bad_w.sum()
            w = torch.where(keep & ~bad_w, w, 0.0)
            weighted_loss = torch.where(keep, values, 0.0) * w
        else:
            w = torch.from_numpy(self._host_weight(weight, n).copy()).to(device, non_blocking=True)
            w = torch.where(keep, w, 0.0)
            weighted_loss = torch.where(keep, values, 0.0) * w
        if bad_ids is not None:
            acc[self._scalar_index(BAD_IDS)] += bad_ids.sum()
            finite = finite | bad_ids  # a bad id is reported as such, not as a non-finite loss
        if real is not None:
            finite = finite | ~real  # nor is a padding token
        src = torch.stack([weighted_loss, w, kept, (~finite).to(torch.float64)])
        acc[: _NUM_DOMAIN_ROWS * k].view(_NUM_DOMAIN_ROWS, k)[:4].index_add_(1, ids, src)
        # NOTE: with padding ids on the accelerator, n counts padding too (counting would synchronise); it only
        # weighs this batch against others of the same step in the drawn-under proportions.
        return n if num_real is None else num_real

    def observe_eval(self, loss_sum: Any, count: Any) -> None:
        """Accumulates per-domain held-out loss sums and counts (each ``(K,)``) for the next update.

        Raises:
            ValueError: if either is not of shape ``(K,)``, or a count is negative.
        """
        _refuse_meta(loss_sum=loss_sum, count=count)
        if self.held is not None:
            self._fold()
        k = self.num_domains
        pair = []
        for name, x in (("loss_sum", loss_sum), ("count", count)):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor | np.ndarray) else np.shape(x)
            if shape != (k,):
                raise ValueError(f"`{name}` must have shape ({k},) (one entry per domain), got {shape}")
            pair.append(x)
        on_device = [isinstance(x, torch.Tensor) and not (x.is_cpu and _CPU_ON_HOST) for x in pair]
        if any(on_device):
            device = pair[on_device.index(True)].device
            acc = self._device_acc(device)
            dev_rows = acc[: _NUM_DOMAIN_ROWS * k].view(_NUM_DOMAIN_ROWS, k)
            dev_rows[EVAL_SUM] += torch.as_tensor(pair[0]).detach().to(device=device, dtype=torch.float64)
            dev_rows[EVAL_COUNT] += torch.as_tensor(pair[1]).detach().to(device=device, dtype=torch.float64)
        else:
            s = _host(pair[0], "loss_sum").astype(np.float64)
            c = _host(pair[1], "count").astype(np.float64)
            if np.any(c < 0) or not np.all(np.isfinite(c)):
                raise ValueError(f"`count` must be finite and non-negative, got {count!r}")
            self._rows[EVAL_SUM] += s
            self._rows[EVAL_COUNT] += c
        self._calls += 1
        self.pending = True

    def reduce(
        self,
        lookup: Callable[[int], np.ndarray],
        tail: np.ndarray | None = None,
        group: Any = None,
        dist: bool | None = None,
    ) -> np.ndarray:
        """This step's packed :class:`FeedbackRows` then ``tail``, summed over ``group`` in one collective.

        ``lookup(b)`` gives the proportions batch ``b`` was drawn under. ``tail`` (each rank's own segment of a
        zero block, in the mixer's use) rides along in the same ``all_reduce``. The accumulators are left as
        they are (:meth:`reset` clears them once the caller has committed the step). ``dist``: whether ``group``
        is a running group of several ranks, when the caller knows.
        """
        if self.held is not None:
            self._fold()
        acc = self._acc.copy() if tail is None else np.concatenate([self._acc, tail])
        acc[self._calls_at] = self._calls
        acc[self._batches_at] = self._batches
        if self.batches:
            # Sample-weighted sum of the rows the batches were drawn under; reduced like everything else so every
            # rank feeds the policy the same importance weights even when ranks saw different batch sizes.
            drawn = acc[DRAWN * self.num_domains : (DRAWN + 1) * self.num_domains]
            for b, n in self.batches.items():
                drawn += n * lookup(b)
        if dist is None:
            dist = distributed(group)
        if not dist:
            if self._dev is not None:  # one copy to the host, added there: the same sums as on the device
                acc[: self.size] += self._dev.cpu().numpy()
            return acc
        flat = torch.from_numpy(acc)
        if self._dev is not None:
            flat = flat.to(self._dev.device)
            flat[: self.size] += self._dev
        elif dist:
            flat = flat.to(comm_device(group))
        if dist:
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM, group=group)
        return flat.cpu().numpy()
