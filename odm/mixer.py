"""``OnlineMixer``: the one object a training loop talks to — policy, shared schedule and feedback.

    mixer.observe(batch, per_sample_loss)   # any number of times per step; stays on the loss's device
    mixer.step()                            # one host transfer (and one all_reduce under DDP), then update

Feedback is per-domain sums, accumulated where the loss lives by :class:`odm.feedback.DomainFeedback`, and
moved through one ``all_reduce(SUM)`` and one host transfer per update. Every rank then feeds the policy
identical numbers, so the proportions agree bit for bit without a broadcast.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from odm._checks import check_domain_names
from odm._draw import largest_remainder
from odm.feedback import (
    COUNT,
    DRAWN,
    EVAL_COUNT,
    EVAL_SUM,
    LOSS,
    NONFINITE,
    NUM_ROWS,
    SAMPLES,
    DomainFeedback,
    all_reduce_host,
    distributed,
)
from odm.policies import EVAL_LOSS, DomainStats, Policy, check_proportions, get_policy
from odm.policies.constraints import Constraints
from odm.schedule import MODE_EXACT, MODE_SAMPLE, ProportionSchedule

__all__ = ["OnlineMixer"]

_STATE_VERSION = 1


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
        floors: per-domain lower bounds on the proportions: one number for every domain, a ``(K,)`` sequence,
            or ``{domain: floor}`` (other domains 0).
        ceilings: per-domain upper bounds, in the same forms (other domains 1).
        frozen: domains whose proportion is held fixed: ``{domain: proportion}``, or domain names held at the
            policy's initial proportions.
        constraints: a ready :class:`odm.policies.constraints.Constraints` (or any object with
            ``project(p) -> p``) instead of the three above. Every published vector — the policy's and
            :meth:`set_proportions`' — is the Euclidean projection of the raw vector onto the simplex restricted
            by these bounds; the policy never sees them, its importance weights use the published proportions.
        history_every: record the policy's publishes in :attr:`history` only at every N-th update (overrides
            and releases are always recorded); ``None`` records none. The default 1 keeps every change, so
            :meth:`export_schedule` replays the run exactly; it costs ``K`` floats per update in memory and in
            every checkpoint (K = 22 over 10⁶ updates: ~180 MB), so long runs set e.g. ``history_every=100``
            (the replay then holds each recorded vector until the next).

    Attributes:
        policy: the bound policy.
        schedule: the shared :class:`~odm.schedule.ProportionSchedule` the data pipeline reads.
        history: ``[(step, proportions), …]`` of the publishes that changed the proportions (see
            ``history_every``); saved in :meth:`state_dict`.

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
        history_every: int | None = 1,
    ) -> None:
        self.domains = check_domain_names(domains)
        self.policy = get_policy(policy).bind(len(self.domains))
        if isinstance(delay, bool) or not isinstance(delay, int) or delay < 0:
            raise ValueError(f"`delay` must be a non-negative integer, got {delay!r}")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"`update_every` must be an integer >= 1, got {update_every!r}")
        if history_every is not None and (
            isinstance(history_every, bool) or not isinstance(history_every, int) or history_every < 1
        ):
            raise ValueError(f"`history_every` must be an integer >= 1 or None, got {history_every!r}")
        self.delay = delay
        self.update_every = update_every
        self.history_every = history_every
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
        self._feedback = DomainFeedback(len(self.domains))

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

    def _publish(self, p: np.ndarray, *, from_policy: bool = False) -> int:
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
        every = self.history_every
        if not from_policy or (every is not None and self._num_updates % every == 0):
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
        num = self._feedback.observe(domain, loss, weight)
        if mix_step is not None:
            b = int(mix_step)
            self._feedback.add_batch(b, num)
            self._next_batch = max(self._next_batch, b + 1)

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
        self._feedback.observe_eval(loss_sum, count)

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
        flat = self._feedback.reduce(lambda b: self.schedule.lookup(b)[0])
        self._feedback.reset()
        rows = flat[: NUM_ROWS * k].reshape(NUM_ROWS, k)
        bad_ids, bad_weights = flat[NUM_ROWS * k :]
        if bad_ids or bad_weights:
            raise ValueError(
                f"observe() got {int(bad_ids)} domain id(s) outside [0, {k - 1}] and {int(bad_weights)} negative "
                "or non-finite weight(s) since the last update (checked at step() because they were on an "
                "accelerator); these samples were left out"
            )
        if rows[NONFINITE].any():
            self._warn_once("loss", rows[NONFINITE] > 0, rows[NONFINITE], "loss value(s)")
        counts = rows[COUNT]
        eval_loss = None
        eval_count = rows[EVAL_COUNT]
        if eval_count.any():
            with np.errstate(invalid="ignore", divide="ignore"):
                eval_loss = np.where(eval_count > 0, rows[EVAL_SUM] / eval_count, np.nan)
            bad = (eval_count > 0) & ~np.isfinite(eval_loss)
            if bad.any():
                self._warn_once("eval", bad, eval_count, "held-out loss sum(s) over this many samples")
                eval_loss[bad] = np.nan
        if counts.sum() <= 0 and (eval_loss is None or EVAL_LOSS not in self.policy.requires):
            return  # nothing usable observed: the policy stays as it was
        total = rows[DRAWN].sum()
        drawn = rows[DRAWN] / total if total > 0 else self.proportions
        self._num_updates += 1
        self._num_samples += round(rows[SAMPLES].sum())
        stats = DomainStats(
            loss_sum=rows[LOSS],  # views of a buffer no one else holds (the accumulators were replaced)
            count=counts,
            proportions=drawn,
            step=self._num_updates,
            num_samples=self._num_samples,
            eval_loss=eval_loss,
        )
        self.policy.update(stats)
        if self._override is None:
            self._publish(self.policy.proportions, from_policy=True)

    # -- export and state ------------------------------------------------------------------------------------
    def export_schedule(self) -> list[tuple[int, list[float]]]:
        """The trajectory ``[(step, proportions), …]`` of every publish, for ``odm.policies.Scheduled``.

        A publish that repeats the newest proportions is not recorded, so each entry holds from its step until
        the next entry's step.
        """
        return [(s, p.tolist()) for s, p in self.history]

    def state_dict(self) -> dict[str, Any]:
        """Policy, schedule, counters, generator, history and pending statistics as a plain versioned dict.

        A checkpoint taken between two updates (``update_every > 1``) keeps the statistics observed since the
        last update, so the resumed run's next update is the uninterrupted run's. Under ``torch.distributed``
        those are summed over the ranks, which makes this call a collective *between updates* (when the number
        of :meth:`step` calls is not a multiple of ``update_every``): call it on every rank then, as
        :meth:`odm.MixtureLoader.state_dict` always requires.
        """
        pending = None
        between = self._step % self.update_every != 0
        if between or (self._feedback.pending and not distributed()):
            pending = self._feedback.local(lambda b: self.schedule.lookup(b)[0])
            if between and distributed():
                pending = all_reduce_host(pending)
        elif self._feedback.pending:
            warnings.warn(
                "odm: state_dict() called under torch.distributed after observe() but before the step() that "
                "updates; those statistics are not saved (checkpoint after step())",
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
            "pending": None if pending is None else pending.tolist(),
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
        self._feedback.reset()
        pending = state_dict.get("pending")  # absent from checkpoints written before it was saved
        if pending is not None:
            expected = NUM_ROWS * self.num_domains + 2
            if len(pending) != expected:
                raise ValueError(f"mixer state has {len(pending)} pending statistics, expected {expected}")
            # Under DDP every rank loads the same (already summed) statistics: one rank adds them to the next update.
            if not distributed() or torch.distributed.get_rank() == 0:
                self._feedback.restore(np.asarray(pending, dtype=np.float64))

    def __repr__(self) -> str:
        return f"OnlineMixer(domains={self.domains}, policy={self.policy!r}, delay={self.delay})"
