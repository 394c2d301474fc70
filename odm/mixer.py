"""``OnlineMixer``: the one object a training loop talks to — policy, shared schedule and feedback.

    mixer.observe(batch, per_sample_loss)   # any number of times per step; stays on the loss's device
    mixer.step()                            # one host transfer (and one all_reduce under DDP), then update
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from odm.policies import DomainStats, Policy, check_proportions, get_policy
from odm.schedule import MODE_EXACT, MODE_SAMPLE, ProportionSchedule

__all__ = ["OnlineMixer"]

_STATE_VERSION = 1


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


class OnlineMixer:
    """Holds a policy and the shared proportions schedule, and turns observed losses into updates.

    Args:
        domains: domain names, in the order of the domain ids.
        policy: a :class:`odm.policies.Policy` or its registered name (default ``"uniform"``).
        delay: batches between a publish and the batch it applies to. ``odm.MixtureLoader`` sets it from its
            prefetching; a standalone sampler uses 0.
        update_every: update the policy every N-th :meth:`step` (statistics accumulate in between).
        seed: seeds :meth:`sample`.

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
        self.schedule = ProportionSchedule(len(self.domains), initial=self.policy.proportions)
        self._rng = np.random.default_rng(seed)
        self._override: np.ndarray | None = None
        self._step = 0  # step() calls
        self._num_updates = 0  # policy updates
        self._num_samples = 0  # samples observed over the run
        self._next_batch = 0  # one past the newest batch index observed
        self._warned: set[int] = set()
        self.history: list[tuple[int, np.ndarray]] = [(0, self.policy.proportions)]
        self._reset_accumulators()

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
        last = self.schedule.latest()[0]
        effective_from = max(self._effective_from(), last)
        mode = MODE_EXACT if (self._override is None and self.policy.exact_counts) else MODE_SAMPLE
        self.schedule.publish(p, effective_from=effective_from, mode=mode)
        self.history.append((self._step, p.copy()))
        return effective_from

    def set_proportions(self, proportions: Any) -> int:
        """Publishes ``proportions`` now and holds them (the policy keeps learning) until :meth:`release`.

        Returns:
            The global batch index from which the new proportions apply.

        Raises:
            ValueError: negative, NaN, all-zero proportions or the wrong length.
        """
        p = check_proportions(proportions, self.num_domains)
        self._override = p
        return self._publish(p)

    def release(self) -> int:
        """Ends a :meth:`set_proportions` override: the policy's proportions are published again."""
        self._override = None
        return self._publish(self.policy.proportions)

    def sample(self, n: int, *, generator: np.random.Generator | None = None) -> np.ndarray:
        """Draws ``n`` domain ids from the current proportions (the standalone sampler).

        Raises:
            ValueError: if ``n`` is negative.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"`n` must be a non-negative integer, got {n!r}")
        gen = self._rng if generator is None else generator
        cdf = np.cumsum(self.proportions)
        return np.searchsorted(cdf, gen.random(n) * cdf[-1], side="right").astype(np.int64)

    # -- feedback --------------------------------------------------------------------------------------------
    def _reset_accumulators(self) -> None:
        self._sums: torch.Tensor | None = None  # (K,) on the loss's device
        self._counts: torch.Tensor | None = None
        self._nonfinite: torch.Tensor | None = None
        self._batches: list[tuple[int, int]] = []  # (mix_step, num samples) observed since the last update

    def observe(self, domain: Any, loss: Any, *, weight: Any = None, mix_step: int | None = None) -> None:
        """Accumulates per-domain loss sums and counts for the next update; no host transfer.

        Args:
            domain: per-sample domain ids (``LongTensor[B]``, numpy, list), one id for a one-domain batch,
                or the batch itself (a mapping with ``"domain"`` and ``"mix_step"``).
            loss: per-sample losses ``[B]``, or a scalar loss when every sample is of one domain.
            weight: optional per-sample weights (e.g. token counts when sequences are packed); the loss sum
                of a domain is then ``Σ w·loss`` and its count ``Σ w``.
            mix_step: the batch index the batch was drawn at (taken from the batch when it is a mapping).

        Raises:
            ValueError: domain ids out of range, or shapes that do not match.
            TypeError: domain ids that are not integers.
        """
        if isinstance(domain, Mapping):
            if "domain" not in domain:
                raise ValueError("a batch passed to observe() needs a 'domain' entry (odm batches carry one)")
            if mix_step is None and "mix_step" in domain:
                mix_step = int(domain["mix_step"])
            domain = domain["domain"]
        loss_t = loss.detach() if isinstance(loss, torch.Tensor) else torch.as_tensor(loss, dtype=torch.float64)
        device = loss_t.device
        ids = domain if isinstance(domain, torch.Tensor) else torch.as_tensor(np.asarray(domain))
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
            raise TypeError(f"domain ids must be integers, got dtype {ids.dtype}")
        ids = ids.to(device=device, dtype=torch.long).reshape(-1)
        k = self.num_domains
        if loss_t.ndim == 0:
            if ids.numel() > 1 and device.type == "cpu" and bool((ids != ids[0]).any()):
                raise ValueError(
                    "a scalar loss needs a batch of one domain; this batch mixes domains "
                    f"{sorted(set(ids.tolist()))}: pass per-sample losses (reduction='none')"
                )
            num = max(ids.numel(), 1)
            ids = ids[:1]
            loss_t = loss_t.reshape(1) * 1.0
            w = torch.full((1,), float(num), device=device, dtype=torch.float64)
        else:
            loss_t = loss_t.reshape(-1)
            if ids.numel() == 1 and loss_t.numel() > 1:
                ids = ids.expand(loss_t.numel())
            if ids.numel() != loss_t.numel():
                raise ValueError(
                    f"`domain` has {ids.numel()} ids but `loss` has {loss_t.numel()} values; they must match"
                )
            w = (
                torch.ones_like(loss_t, dtype=torch.float64)
                if weight is None
                else torch.as_tensor(weight, device=device).to(torch.float64).reshape(-1)
            )
            if w.numel() != loss_t.numel():
                raise ValueError(f"`weight` has {w.numel()} values but `loss` has {loss_t.numel()}")
        if ids.numel() and device.type == "cpu":
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= k:
                raise ValueError(f"domain ids must be in [0, {k - 1}] for {k} domains, got ids in [{lo}, {hi}]")
        loss64 = loss_t.to(torch.float64)
        finite = torch.isfinite(loss64)
        wf = torch.where(finite, w, torch.zeros_like(w))
        if self._sums is None:
            self._sums = torch.zeros(k, dtype=torch.float64, device=device)
            self._counts = torch.zeros(k, dtype=torch.float64, device=device)
            self._nonfinite = torch.zeros(k, dtype=torch.float64, device=device)
        assert self._counts is not None and self._nonfinite is not None
        self._sums.index_add_(0, ids, torch.where(finite, loss64 * w, torch.zeros_like(loss64)))
        self._counts.index_add_(0, ids, wf)
        self._nonfinite.index_add_(0, ids, (~finite).to(torch.float64))
        if mix_step is not None:
            self._batches.append((int(mix_step), int(ids.numel() if loss_t.ndim else w.item())))
            self._next_batch = max(self._next_batch, int(mix_step) + 1)

    def _reduce(self) -> np.ndarray:
        """Stacks the accumulators into one ``(3, K)`` tensor, all-reduces it once, moves it to the host."""
        k = self.num_domains
        if self._sums is None:
            stacked = torch.zeros(3, k, dtype=torch.float64)
        else:
            assert self._counts is not None and self._nonfinite is not None
            stacked = torch.stack([self._sums, self._counts, self._nonfinite])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                torch.distributed.all_reduce(stacked, op=torch.distributed.ReduceOp.SUM)
        return stacked.cpu().numpy()

    def _drawn_under(self) -> np.ndarray:
        """Sample-weighted mean of the proportions rows the observed batches were drawn under."""
        if not self._batches:
            return self.proportions
        total = np.zeros(self.num_domains)
        for b, n in self._batches:
            total += n * self.schedule.lookup(b)[0]
        return total / total.sum()

    def step(self) -> None:
        """Ends a training step: every ``update_every`` steps, reduce the statistics, update, publish."""
        self._step += 1
        if self._step % self.update_every:
            return
        reduced = self._reduce()
        sums, counts, nonfinite = reduced
        for d in np.flatnonzero(nonfinite > 0):
            if int(d) not in self._warned:
                self._warned.add(int(d))
                warnings.warn(
                    f"odm: skipped {int(nonfinite[d])} non-finite loss value(s) of domain {self.domains[d]!r} "
                    f"at step {self._step}; they do not reach the policy (warned once per domain)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        drawn = self._drawn_under()
        self._reset_accumulators()
        if counts.sum() <= 0:
            return  # nothing finite observed: the policy stays as it was
        self._num_updates += 1
        self._num_samples += round(counts.sum())
        stats = DomainStats(
            loss_sum=sums,
            count=counts,
            proportions=drawn,
            step=self._num_updates,
            num_samples=self._num_samples,
        )
        self.policy.update(stats)
        self._publish(self._override if self._override is not None else self.policy.proportions)

    # -- export and state ------------------------------------------------------------------------------------
    def export_schedule(self) -> list[tuple[int, list[float]]]:
        """The trajectory ``[(step, proportions), …]`` of every publish, for ``odm.policies.Scheduled``."""
        return [(s, p.tolist()) for s, p in self.history]

    def state_dict(self) -> dict[str, Any]:
        """Policy, schedule, counters, generator and history as a plain versioned dict."""
        if self._sums is not None:
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
        self._reset_accumulators()

    def __repr__(self) -> str:
        return f"OnlineMixer(domains={self.domains}, policy={self.policy!r}, delay={self.delay})"
