"""``OnlineMixer``: the one object a training loop talks to — policy, shared schedule and feedback.

    mixer.observe(batch, per_sample_loss)   # any number of times per step; stays on the loss's device
    mixer.step()                            # one host transfer (and one all_reduce under DDP), then update

Feedback is per-domain sums, accumulated where the loss lives: numpy on the host for CPU tensors, numpy
arrays and lists; a torch tensor on the loss's device otherwise (no synchronisation until :meth:`step`).
Every update moves one flat vector — loss sums, weights, samples, non-finite counts, held-out sums and counts,
the proportions the batches were drawn under, and invalid-input counters — through one ``all_reduce(SUM)``
and one host transfer. Every rank then feeds the policy identical numbers, so the proportions agree bit for
bit without a broadcast.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from odm.dataset import largest_remainder
from odm.policies import EVAL_LOSS, DomainStats, Policy, check_proportions, get_policy
from odm.policies.constraints import Constraints
from odm.schedule import MODE_EXACT, MODE_SAMPLE, ProportionSchedule

__all__ = ["OnlineMixer"]

_STATE_VERSION = 1

# Rows of the per-domain accumulator (each of length K), then two scalar counters.
_LOSS, _COUNT, _SAMPLES, _NONFINITE, _EVAL_SUM, _EVAL_COUNT, _DRAWN = range(7)
_NUM_ROWS = 7
_BAD_IDS, _BAD_WEIGHTS = 0, 1  # counters after the rows: inputs only checkable once on the host
# Device types whose losses are accumulated in numpy on the host (a CPU tensor's .numpy() is a free view).
_HOST_DEVICE_TYPES = frozenset({"cpu"})


def _check_domains(domains: Any) -> list[str]:
    if isinstance(domains, str) or not isinstance(domains, Sequence | Mapping):
        raise TypeError(f"`domains` must be a sequence of domain names, got {domains!r}")
    names = list(domains)
    if not names:
        raise ValueError("`domains` is empty: a mixture needs at least one domain")
    for n in names:
        if not isinstance(n, str) or not n:
            raise TypeError(f"domain names must be non-empty strings, got {n!r}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"`domains` has duplicate names: {dupes}")
    return names


def _domain_diff(saved: list[str], mine: list[str]) -> str:
    missing = [d for d in saved if d not in mine]
    extra = [d for d in mine if d not in saved]
    parts = []
    if missing:
        parts.append(f"the checkpoint has {missing} which this run lacks")
    if extra:
        parts.append(f"this run has {extra} which the checkpoint lacks")
    if not parts:
        parts.append(f"same names in another order: checkpoint {saved}, this run {mine}")
    return "; ".join(parts)


def _host(x: Any, name: str) -> np.ndarray:
    """``x`` (tensor on any device, numpy, list, number) as a 1-D-or-scalar numpy array, without copying CPU data."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.device.type != "cpu":
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


def _comm_device() -> torch.device:
    """Where the collective runs when this rank observed nothing on a device: NCCL needs a CUDA tensor."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class OnlineMixer:
    """Holds a policy and the shared proportions schedule, and turns observed losses into updates.

    Args:
        domains: domain names, in the order of the domain ids.
        policy: a :class:`odm.policies.Policy` or its registered name (default ``"uniform"``).
        delay: batches between a publish and the batch it applies to. ``odm.MixtureLoader`` sets it from its
            prefetching; a standalone sampler uses 0.
        update_every: update the policy every N-th :meth:`step` (statistics accumulate in between).
        seed: seeds :meth:`sample`.
        floors: per-domain lower bounds on the proportions: one number for every domain, a ``(K,)`` sequence,
            or ``{domain: floor}`` (other domains 0).
        ceilings: per-domain upper bounds, in the same forms (other domains 1).
        frozen: domains whose proportion is held fixed: ``{domain: proportion}``, or domain names held at the
            policy's initial proportions.
        constraints: a ready :class:`odm.policies.constraints.Constraints` (or any object with
            ``project(p) -> p``) instead of the three above. Every published vector — the policy's and
            :meth:`set_proportions`' — is the Euclidean projection of the raw vector onto the simplex restricted
            by these bounds; the policy never sees them, its importance weights use the published proportions.

    Attributes:
        policy: the bound policy.
        schedule: the shared :class:`~odm.schedule.ProportionSchedule` the data pipeline reads.
        history: ``[(step, proportions), …]`` of every publish that changed the proportions (grows with the run;
            ``history.clear()`` is safe when memory matters, e.g. K = 10 000 over a million updates).

    Under ``torch.distributed`` every rank must call :meth:`step` (each update is one collective).

    Example:
        >>> mixer = OnlineMixer(["web", "code"], policy="uniform")
        >>> mixer.proportions
        array([0.5, 0.5])
        >>> mixer.observe([0, 1, 1], [2.0, 1.0, 3.0])
        >>> mixer.step()
        >>> mixer.sample(4).shape
        (4,)
    """

    def __init__(
        self,
        domains: Sequence[str],
        policy: str | Policy = "uniform",
        *,
        delay: int = 0,
        update_every: int = 1,
        seed: int = 0,
        floors: Any = None,
        ceilings: Any = None,
        frozen: Any = None,
        constraints: Any = None,
    ) -> None:
        self.domains = _check_domains(domains)
        self.policy = get_policy(policy).bind(len(self.domains))
        if isinstance(delay, bool) or not isinstance(delay, int) or delay < 0:
            raise ValueError(f"`delay` must be a non-negative integer, got {delay!r}")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"`update_every` must be an integer >= 1, got {update_every!r}")
        self.delay = delay
        self.update_every = update_every
        self.seed = seed
        self.constraints = self._build_constraints(floors, ceilings, frozen, constraints)
        p0 = self._constrain(self.policy.proportions)
        self.schedule = ProportionSchedule(len(self.domains), initial=p0)
        self._rng = np.random.default_rng(seed)
        self._override: np.ndarray | None = None
        self._step = 0  # step() calls
        self._num_updates = 0  # policy updates
        self._num_samples = 0  # samples observed over the run
        self._next_batch = 0  # one past the newest batch index observed
        self._warned: set[tuple[str, int]] = set()
        self._published = p0  # the newest published vector as given to the schedule
        self.history: list[tuple[int, np.ndarray]] = [(0, self.schedule.latest()[2])]
        self._reset_accumulators()

    # -- constraints -----------------------------------------------------------------------------------------
    def _build_constraints(self, floors: Any, ceilings: Any, frozen: Any, constraints: Any) -> Any:
        if constraints is not None:
            if floors is not None or ceilings is not None or frozen is not None:
                raise TypeError("pass either `constraints` or `floors`/`ceilings`/`frozen`, not both")
            if not callable(getattr(constraints, "project", None)):
                raise TypeError(f"`constraints` must have a .project(p) method, got {type(constraints).__name__}")
            return constraints
        if floors is None and ceilings is None and frozen is None:
            return None
        if frozen is not None and not isinstance(frozen, Mapping):
            names = [frozen] if isinstance(frozen, str) else list(frozen)
            unknown = [d for d in names if d not in self.domains]
            if unknown:
                raise ValueError(f"`frozen` names unknown domains {unknown}; the domains are {self.domains}")
            p0 = self.policy.proportions
            frozen = {d: float(p0[self.domains.index(d)]) for d in names}
        return Constraints.for_domains(self.domains, floors, ceilings, frozen)

    def _constrain(self, p: np.ndarray) -> np.ndarray:
        return p if self.constraints is None else np.asarray(self.constraints.project(p), dtype=np.float64)

    # -- proportions -----------------------------------------------------------------------------------------
    @property
    def num_domains(self) -> int:
        return len(self.domains)

    @property
    def proportions(self) -> np.ndarray:
        """The newest published proportions (float64, sums to 1)."""
        return self.schedule.latest()[2]

    def _effective_from(self) -> int:
        return max(self._next_batch, self._step) + self.delay

    def _publish(self, p: np.ndarray) -> int:
        """Publishes ``p`` (constrained) unless it repeats the newest row; returns the batch it applies from."""
        p = self._constrain(p)
        last, last_mode, _ = self.schedule.latest()
        mode = MODE_EXACT if (self._override is None and self.policy.exact_counts) else MODE_SAMPLE
        # Compared with the newest entry as given (the schedule renormalises, which may move the last bit).
        if mode == last_mode and np.array_equal(p, self._published):
            return last
        effective_from = max(self._effective_from(), last)
        self.schedule.publish(p, effective_from=effective_from, mode=mode)
        self._published = p.copy()
        self.history.append((self._step, self.schedule.latest()[2]))  # as stored (the schedule renormalises)
        return effective_from

    def set_proportions(self, proportions: Any) -> int:
        """Publishes ``proportions`` now and holds them (the policy keeps learning) until :meth:`release`.

        Returns:
            The global batch index from which the new proportions apply.

        Raises:
            ValueError: negative, NaN, all-zero proportions or the wrong length.
        """
        self._override = self._constrain(check_proportions(proportions, self.num_domains))
        return self._publish(self._override)

    def release(self) -> int:
        """Ends a :meth:`set_proportions` override: the policy's proportions are published again."""
        self._override = None
        return self._publish(self.policy.proportions)

    def sample(self, n: int, *, generator: np.random.Generator | None = None) -> np.ndarray:
        """Draws ``n`` domain ids from the current proportions (the standalone sampler).

        Under an exact-counts row (a policy's probe phase) the per-domain counts are the largest-remainder
        rounding of ``p * n``, in random order.

        Raises:
            ValueError: if ``n`` is negative.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"`n` must be a non-negative integer, got {n!r}")
        gen = self._rng if generator is None else generator
        _, mode, p = self.schedule.latest()
        if mode == MODE_EXACT:
            return gen.permutation(np.repeat(np.arange(self.num_domains), largest_remainder(p, n)))
        cdf = np.cumsum(p)
        return np.searchsorted(cdf, gen.random(n) * cdf[-1], side="right").astype(np.int64)

    # -- feedback --------------------------------------------------------------------------------------------
    def _reset_accumulators(self) -> None:
        k = self.num_domains
        self._acc = np.zeros(_NUM_ROWS * k + 2)  # host rows (and the two counters), see the module docstring
        self._dev: torch.Tensor | None = None  # the same layout on the loss's device, made on first use
        self._batches: dict[int, int] = {}  # mix_step -> samples observed from that batch
        self._pending = False

    def _device_acc(self, device: torch.device) -> torch.Tensor:
        if self._dev is None:
            self._dev = torch.zeros(self._acc.shape[0], dtype=torch.float64, device=device)
        elif self._dev.device != device:
            raise ValueError(
                f"observe() got losses on {device} after losses on {self._dev.device} in the same step; "
                "keep one device per mixer"
            )
        return self._dev

    def observe(self, domain: Any, loss: Any, *, weight: Any = None, mix_step: int | None = None) -> None:
        """Accumulates per-domain loss sums and counts for the next update; no host transfer.

        Args:
            domain: per-sample domain ids (``LongTensor[B]``, numpy, list), one id for a one-domain batch,
                or the batch itself (a mapping with ``"domain"`` and ``"mix_step"``).
            loss: per-sample losses ``[B]``, or a scalar loss when every sample is of one domain.
            weight: optional per-sample weights (e.g. token counts when sequences are packed); the loss sum
                of a domain is then ``Σ w·loss`` and its count ``Σ w``.
            mix_step: the batch index the batch was drawn at (taken from the batch when it is a mapping); the
                update's importance weights use the proportions in force for it.

        Non-finite losses are skipped (with one warning per domain at the next :meth:`step`) and never reach
        the policy. Ids and weights that already live on an accelerator are checked at :meth:`step` (where the
        host transfer happens anyway) instead of here, so observing never synchronises with the device.

        Raises:
            ValueError: domain ids out of range, negative or non-finite weights, or shapes that do not match.
            TypeError: domain ids that are not integers.
        """
        if isinstance(domain, Mapping):
            if "domain" not in domain:
                raise ValueError("a batch passed to observe() needs a 'domain' entry (odm batches carry one)")
            if mix_step is None and "mix_step" in domain:
                mix_step = int(domain["mix_step"])
            domain = domain["domain"]
        if isinstance(loss, torch.Tensor) and loss.device.type not in _HOST_DEVICE_TYPES:
            num = self._observe_device(domain, loss, weight)
        else:
            num = self._observe_host(domain, loss, weight)
        self._pending = True
        if mix_step is not None:
            b = int(mix_step)
            self._batches[b] = self._batches.get(b, 0) + num
            self._next_batch = max(self._next_batch, b + 1)

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

    def _observe_host(self, domain: Any, loss: Any, weight: Any) -> int:
        values = _host(loss, "loss").astype(np.float64, copy=False)
        scalar = values.ndim == 0
        values = values.reshape(-1)
        ids = self._host_ids(domain, values.size, scalar)
        if scalar:
            values = np.broadcast_to(values, ids.shape)
        n = values.size
        w = None if weight is None else self._host_weight(weight, n)
        k = self.num_domains
        try:
            samples = np.bincount(ids, minlength=k)  # also the range check: negative ids raise, large ones widen
        except ValueError:
            raise self._range_error(ids) from None
        if samples.size > k:
            raise self._range_error(ids)
        rows = self._acc[: _NUM_ROWS * k].reshape(_NUM_ROWS, k)
        finite = np.isfinite(values)
        if not finite.all():
            skipped = np.bincount(ids[~finite], minlength=k)
            rows[_NONFINITE] += skipped
            samples = samples - skipped
            ids, values = ids[finite], values[finite]
            w = None if w is None else w[finite]
        rows[_SAMPLES] += samples
        if w is None:
            rows[_COUNT] += samples
            rows[_LOSS] += np.bincount(ids, values, minlength=k)
        else:
            rows[_COUNT] += np.bincount(ids, w, minlength=k)
            rows[_LOSS] += np.bincount(ids, values * w, minlength=k)
        return n

    def _observe_device(self, domain: Any, loss: torch.Tensor, weight: Any) -> int:
        device = loss.device
        values = loss.detach().to(torch.float64)
        scalar = values.ndim == 0
        values = values.reshape(-1)
        acc = self._device_acc(device)
        k = self.num_domains
        if isinstance(domain, torch.Tensor) and domain.device.type not in _HOST_DEVICE_TYPES:
            # Ids already on the accelerator: out-of-range ids are counted here and reported at step().
            _check_ids_dtype(
                not (domain.is_floating_point() or domain.is_complex() or domain.dtype == torch.bool), domain.dtype
            )
            ids = domain.to(device=device, dtype=torch.long).reshape(-1)
            out_of_range = (ids < 0) | (ids >= k)
            if ids.numel() == 1 and values.numel() > 1:
                ids, out_of_range = ids.expand(values.numel()), out_of_range.expand(values.numel())
            elif not scalar and ids.numel() != values.numel():
                raise ValueError(
                    f"`domain` has {ids.numel()} ids but `loss` has {values.numel()} values; they must match"
                )
            bad_ids: torch.Tensor | None = out_of_range
        else:
            host_ids = self._host_ids(domain, values.numel(), scalar)
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
        if weight is None:
            w = keep.to(torch.float64)
        elif isinstance(weight, torch.Tensor) and weight.device.type not in _HOST_DEVICE_TYPES:
            w = weight.detach().to(device=device, dtype=torch.float64).reshape(-1)
            if w.numel() == 1 and n != 1:
                w = w.expand(n)
            if w.numel() != n:
                raise ValueError(f"`weight` has {w.numel()} values but the batch has {n} samples; they must match")
            bad_w = ~torch.isfinite(w) | (w < 0)
            acc[_NUM_ROWS * k + _BAD_WEIGHTS] += bad_w.sum()
            w = torch.where(keep & ~bad_w, w, 0.0)
        else:
            w = torch.from_numpy(self._host_weight(weight, n).copy()).to(device, non_blocking=True)
            w = torch.where(keep, w, 0.0)
        if bad_ids is not None:
            acc[_NUM_ROWS * k + _BAD_IDS] += bad_ids.sum()
            ids = ids.clamp(0, k - 1)
            finite = finite | bad_ids  # a bad id is reported as such, not as a non-finite loss
        src = torch.stack([torch.where(keep, values, 0.0) * w, w, keep.to(torch.float64), (~finite).to(torch.float64)])
        acc[: _NUM_ROWS * k].view(_NUM_ROWS, k)[:4].index_add_(1, ids, src)
        return n

    def wants_eval(self) -> bool:
        """Whether the next :meth:`step` updates a policy that wants per-domain held-out losses for it.

        When True, evaluate and pass the per-domain sums and counts to :meth:`observe_eval` before that step.
        """
        if (self._step + 1) % self.update_every:
            return False
        return bool(self.policy.wants_eval(self._num_updates + 1))

    def observe_eval(self, loss_sum: Any, count: Any) -> None:
        """Accumulates per-domain held-out loss sums and counts (each ``(K,)``) for the next update.

        They are reduced across ranks with the training statistics (same collective) and reach the policy as
        ``DomainStats.eval_loss = loss_sum / count`` (NaN where the count is 0). A policy that requires
        ``EVAL_LOSS`` is updated at the next update step even if no training loss was observed.

        Raises:
            ValueError: if either is not of shape ``(K,)``, or a count is negative.
        """
        k = self.num_domains
        pair = []
        for name, x in (("loss_sum", loss_sum), ("count", count)):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor | np.ndarray) else np.shape(x)
            if shape != (k,):
                raise ValueError(f"`{name}` must have shape ({k},) (one entry per domain), got {shape}")
            pair.append(x)
        on_device = [isinstance(x, torch.Tensor) and x.device.type not in _HOST_DEVICE_TYPES for x in pair]
        if any(on_device):
            device = pair[on_device.index(True)].device
            acc = self._device_acc(device)
            dev_rows = acc[: _NUM_ROWS * k].view(_NUM_ROWS, k)
            dev_rows[_EVAL_SUM] += torch.as_tensor(pair[0]).detach().to(device=device, dtype=torch.float64)
            dev_rows[_EVAL_COUNT] += torch.as_tensor(pair[1]).detach().to(device=device, dtype=torch.float64)
        else:
            s = _host(pair[0], "loss_sum").astype(np.float64)
            c = _host(pair[1], "count").astype(np.float64)
            if np.any(c < 0) or not np.all(np.isfinite(c)):
                raise ValueError(f"`count` must be finite and non-negative, got {count!r}")
            rows = self._acc[: _NUM_ROWS * k].reshape(_NUM_ROWS, k)
            rows[_EVAL_SUM] += s
            rows[_EVAL_COUNT] += c
        self._pending = True

    def _reduce(self) -> np.ndarray:
        """Sums the accumulators (host and device), all-reduces them once, returns them on the host."""
        k = self.num_domains
        if self._batches:
            # Sample-weighted sum of the rows the batches were drawn under; reduced like everything else so every
            # rank feeds the policy the same importance weights even when ranks saw different batch sizes.
            drawn = self._acc[_DRAWN * k : (_DRAWN + 1) * k]
            for b, n in self._batches.items():
                drawn += n * self.schedule.lookup(b)[0]
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        dist = dist and torch.distributed.get_world_size() > 1
        if self._dev is None and not dist:
            return self._acc
        flat = torch.from_numpy(self._acc)
        if self._dev is not None:
            flat = self._dev + flat.to(self._dev.device)
        elif dist:
            flat = flat.to(_comm_device())
        if dist:
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        return flat.cpu().numpy()

    def _warn_once(self, kind: str, mask: np.ndarray, counts: np.ndarray, what: str) -> None:
        for d in np.flatnonzero(mask):
            if (kind, int(d)) not in self._warned:
                self._warned.add((kind, int(d)))
                warnings.warn(
                    f"odm: skipped {int(counts[d])} non-finite {what} of domain {self.domains[d]!r} at step "
                    f"{self._step}; they do not reach the policy (warned once per domain)",
                    RuntimeWarning,
                    stacklevel=3,
                )

    def step(self) -> None:
        """Ends a training step: every ``update_every`` steps, reduce the statistics, update, publish.

        Raises:
            ValueError: if ids or weights observed on an accelerator since the last update were invalid.
        """
        self._step += 1
        if self._step % self.update_every:
            return
        k = self.num_domains
        flat = self._reduce()
        self._reset_accumulators()
        rows = flat[: _NUM_ROWS * k].reshape(_NUM_ROWS, k)
        bad_ids, bad_weights = flat[_NUM_ROWS * k :]
        if bad_ids or bad_weights:
            raise ValueError(
                f"observe() got {int(bad_ids)} domain id(s) outside [0, {k - 1}] and {int(bad_weights)} negative "
                "or non-finite weight(s) since the last update (checked at step() because they were on an "
                "accelerator); these samples were left out"
            )
        if rows[_NONFINITE].any():
            self._warn_once("loss", rows[_NONFINITE] > 0, rows[_NONFINITE], "loss value(s)")
        counts = rows[_COUNT]
        eval_loss = None
        eval_count = rows[_EVAL_COUNT]
        if eval_count.any():
            with np.errstate(invalid="ignore", divide="ignore"):
                eval_loss = np.where(eval_count > 0, rows[_EVAL_SUM] / eval_count, np.nan)
            bad = (eval_count > 0) & ~np.isfinite(eval_loss)
            if bad.any():
                self._warn_once("eval", bad, eval_count, "held-out loss sum(s) over this many samples")
                eval_loss[bad] = np.nan
        if counts.sum() <= 0 and (eval_loss is None or EVAL_LOSS not in self.policy.requires):
            return  # nothing usable observed: the policy stays as it was
        total = rows[_DRAWN].sum()
        drawn = rows[_DRAWN] / total if total > 0 else self.proportions
        self._num_updates += 1
        self._num_samples += round(rows[_SAMPLES].sum())
        stats = DomainStats(
            loss_sum=rows[_LOSS],  # views of a buffer no one else holds (the accumulators were replaced)
            count=counts,
            proportions=drawn,
            step=self._num_updates,
            num_samples=self._num_samples,
            eval_loss=eval_loss,
        )
        self.policy.update(stats)
        self._publish(self._override if self._override is not None else self.policy.proportions)

    # -- export and state ------------------------------------------------------------------------------------
    def export_schedule(self) -> list[tuple[int, list[float]]]:
        """The trajectory ``[(step, proportions), …]`` of every publish, for ``odm.policies.Scheduled``.

        A publish that repeats the newest proportions is not recorded, so each entry holds from its step until
        the next entry's step.
        """
        return [(s, p.tolist()) for s, p in self.history]

    def state_dict(self) -> dict[str, Any]:
        """Policy, schedule, counters, generator and history as a plain versioned dict."""
        if self._pending:
            warnings.warn(
                "odm: state_dict() called with statistics observed since the last update; they are not saved",
                RuntimeWarning,
                stacklevel=2,
            )
        return {
            "version": _STATE_VERSION,
            "domains": list(self.domains),
            "policy": self.policy.state_dict(),
            "schedule": self.schedule.state_dict(),
            "step": self._step,
            "num_updates": self._num_updates,
            "num_samples": self._num_samples,
            "next_batch": self._next_batch,
            "override": None if self._override is None else self._override.tolist(),
            "rng": self._rng.bit_generator.state,
            "history": self.export_schedule(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restores a state saved by :meth:`state_dict`.

        Raises:
            ValueError: a checkpoint from another domain set (the message lists the differences), another
                version, or another policy.
        """
        if state_dict.get("version") != _STATE_VERSION:
            raise ValueError(f"mixer state has version {state_dict.get('version')!r}, expected {_STATE_VERSION}")
        saved = list(state_dict["domains"])
        if saved != self.domains:
            raise ValueError(f"checkpoint domains differ from this mixer's: {_domain_diff(saved, self.domains)}")
        self.policy.load_state_dict(state_dict["policy"])
        self.schedule.load_state_dict(state_dict["schedule"])
        self._step = int(state_dict["step"])
        self._num_updates = int(state_dict["num_updates"])
        self._num_samples = int(state_dict["num_samples"])
        self._next_batch = int(state_dict["next_batch"])
        ov = state_dict["override"]
        self._override = None if ov is None else np.asarray(ov, dtype=np.float64)
        self._rng.bit_generator.state = state_dict["rng"]
        self.history = [(int(s), np.asarray(p, dtype=np.float64)) for s, p in state_dict["history"]]
        self._published = self.proportions
        self._reset_accumulators()

    def __repr__(self) -> str:
        return f"OnlineMixer(domains={self.domains}, policy={self.policy!r}, delay={self.delay})"
