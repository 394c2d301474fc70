"""``OnlineMixer``: the one object a training loop talks to — policy, shared schedule and feedback.

    mixer.observe(batch, per_sample_loss)   # any number of times per step; stays on the loss's device
    mixer.step()                            # one host transfer (and one all_reduce under DDP), then update

Feedback is per-domain sums, accumulated where the loss lives by :class:`odm.feedback.DomainFeedback`. Every
:meth:`OnlineMixer.step` moves it through one ``all_reduce(SUM)`` and one host transfer, so the statistics
pending between two policy updates are already the sum over the ranks on every rank: every rank feeds the
policy identical numbers (the proportions agree bit for bit without a broadcast), and a checkpoint written by
one rank alone resumes all of them.

"Step" means four different things around a mixer; each has its own name here:

* ``mix_step`` — the global index of a batch (:class:`odm.MixtureLoader` tags each batch with it); the
  schedule is indexed by it, and a published row applies from a ``mix_step`` on.
* ``num_steps`` — the calls of :meth:`OnlineMixer.step` that ended a training step (that carried feedback).
  ``update_every`` counts these, and :meth:`OnlineMixer.export_schedule` is keyed by them.
* the update index ``t`` — the policy's own counter (``num_updates``; ``DomainStats.step``).
* a framework's global step (Lightning's ``trainer.global_step``, optimizer steps); the mixer never reads it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from odm._checks import check_choice, check_domain_names, check_int, check_seed
from odm._draw import largest_remainder
from odm._state import StateError
from odm.agreement import check_agreement, policy_config
from odm.collective import StepCollective
from odm.feedback import DomainFeedback, FeedbackRows, flatten_tokens
from odm.history import History
from odm.mixer_state import STATE_VERSION, check_state
from odm.policies import DomainStats, Policy, get_policy
from odm.policies.base import vouches_for_update
from odm.policies.constraints import Constraints
from odm.remap import remap_mixer_state
from odm.schedule import MODE_EXACT, MODE_SAMPLE, ProportionSchedule, check_simplex
from odm.updates import PolicyUpdates

__all__ = ["OnlineMixer"]


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
            and releases are always recorded); ``None`` records none. The history is bounded whatever the run
            length (see :class:`odm.history.History`).
        process_group: the data-parallel group the statistics are reduced over (default: the world). Ranks of
            one model-parallel group see the same batches and must not be counted twice.

    Attributes:
        policy: the bound policy.
        schedule: the shared :class:`~odm.schedule.ProportionSchedule` the data pipeline reads (read-only). The
            mixer alone writes it (it keeps the newest row at hand): publish with :meth:`set_proportions`; a row
            published behind its back is refused at the next :meth:`step`.
        history: the publishes ``(num_steps, proportions)`` that changed the proportions, bounded (recent ones
            exact, older ones thinned); saved in :meth:`state_dict`.
        agreement_fields: extra settings every rank must share (the loader adds its own); compared by
            :meth:`check_agreement`.

    Under ``torch.distributed`` every rank must call :meth:`step` (each call is one collective).

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
        process_group: Any = None,
    ) -> None:
        self.domains = check_domain_names(domains)
        self.delay = check_int(delay, "delay", low=0)
        self.update_every = check_int(update_every, "update_every", low=1)
        self.history_every = check_int(history_every, "history_every", low=1, allow_none=True)
        self.seed = check_seed(seed)
        self.policy = get_policy(policy).bind(len(self.domains))
        self._warned: set[str] = set()
        self._updates = PolicyUpdates(self.policy, self.domains, self._warn)
        # In updates: a row published after batch b applies from batch b + 1 + delay, which falls in the
        # (delay // update_every + 1)-th update after this one (one batch per step).
        # In updates, rounded up: an update that mixes batches drawn before and after a publish counts as old.
        self.policy.set_publish_delay(-(-self.delay // self.update_every))
        self.process_group = process_group
        self.constraints = self._build_constraints(floors, ceilings, frozen, constraints)
        # An update that keeps the simplex by construction is published without another check, unless projected.
        self._vouched = self.constraints is None and vouches_for_update(self.policy)
        k = len(self.domains)
        p0 = self._constrain(self.policy.proportions)
        self._schedule = ProportionSchedule(k, initial=p0)
        self._rows_published = self._schedule.num_rows  # rows in the ring that this mixer wrote (all of them)
        self._rng = np.random.default_rng(self.seed)
        self._override: np.ndarray | None = None
        self._num_steps = 0
        self._next_batch = 0  # one past the newest mix_step observed on any rank before the last step()
        self._local_next = 0  # the same, on this rank, including observations since the last step()
        self._cut_batch: int | None = None
        self._served: int | None = None
        self._pending: np.ndarray | None = None  # packed FeedbackRows of the steps since the last update
        self._published = p0.tobytes()  # the newest published vector as given to the schedule
        self._published_mode = self._schedule.latest().mode
        self._latest = self._schedule.latest().proportions  # the newest row's proportions, as stored
        self._latest.flags.writeable = False  # (handed to policies, see _publish)
        self._latest_from = self._schedule.latest_effective_from()  # the batch it applies from (only we publish)
        self.history = History(k)
        self.history.append(0, self._schedule.latest().proportions)
        self._feedback = DomainFeedback(k)
        self._collective = StepCollective(process_group)
        self.agreement_fields: dict[str, Any] = {}
        self._agreed = False

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
    def num_steps(self) -> int:
        """Calls of :meth:`step` that ended a training step (carried feedback)."""
        return self._num_steps

    @property
    def num_updates(self) -> int:
        """Policy updates so far (the update index of the last one)."""
        return self._updates.num_updates

    @property
    def schedule(self) -> ProportionSchedule:
        """The shared proportions schedule the data pipeline reads (see the class docstring)."""
        return self._schedule

    @property
    def proportions(self) -> np.ndarray:
        """The newest published proportions (float64, sums to 1)."""
        return self._schedule.latest().proportions

    def _effective_from(self) -> int:
        # The batch clock: one past the newest mix_step stepped on (any rank); a mixer never given a mix_step
        # counts its steps instead. A step() without feedback moves neither, so the publish point never drifts.
        # (Observed batches count before their step(): an override set between observe() and step() applies
        # after them, as the uninterrupted run's would.)
        clock = max(self._next_batch, self._local_next)
        return (clock if clock else self._num_steps) + self.delay

    def _mode(self) -> int:
        return MODE_EXACT if (self._override is None and self.policy.exact_counts) else MODE_SAMPLE

    def _publish(
        self, p: np.ndarray, *, from_policy: bool = False, q: np.ndarray | None = None, key: bytes | None = None
    ) -> int:
        """Publishes ``p`` (already constrained) unless it repeats the newest row; returns the batch it applies
        from. ``q``: ``p`` already checked and normalised; else it is checked here, before anything changes.
        ``key``: ``p.tobytes()`` when the caller has it (and has found that it is not a repeat)."""
        mode = self._mode()
        if key is None:
            key = p.tobytes()
            if key == self._published and mode == self._published_mode:
                return self._latest_from
        if q is None:
            q = check_simplex(p, self.num_domains, name="published proportions")
        effective_from = max(self._effective_from(), self._latest_from)
        self._schedule.append(q, effective_from, mode)
        self._rows_published += 1
        q.flags.writeable = False  # handed to policies as the drawn-under proportions (see _update_held)
        self._published, self._published_mode, self._latest, self._latest_from = key, mode, q, effective_from
        every = self.history_every
        if not from_policy or (every is not None and self._updates.num_updates % every == 0):
            self.history.append(self._num_steps, q)
        return effective_from

    def set_proportions(self, proportions: Any) -> int:
        """Publishes ``proportions`` now and holds them (the policy keeps learning) until :meth:`release`.

        Returns:
            The ``mix_step`` from which the new proportions apply.

        Raises:
            ValueError: negative, NaN, all-zero proportions or the wrong length.
        """
        p = check_simplex(proportions, self.num_domains)
        if self.constraints is not None:
            p = check_simplex(self._constrain(p), self.num_domains, name="constrained proportions")
        previous, self._override = self._override, p
        try:
            return self._publish(p, q=p)
        except ValueError:
            self._override = previous
            raise

    def release(self) -> int:
        """Ends a :meth:`set_proportions` override: the policy's proportions are published again."""
        self._override = None
        return self._publish(self._constrain(self.policy.proportions))

    def sample(self, n: int, *, generator: np.random.Generator | None = None) -> np.ndarray:
        """Draws ``n`` domain ids from the current proportions (the standalone sampler).

        Under an exact-counts row (a policy's probe phase) the per-domain counts are the largest-remainder
        rounding of ``p * n``, in random order.

        Raises:
            ValueError: if ``n`` is negative.
        """
        n = check_int(n, "n", low=0)
        gen = self._rng if generator is None else generator
        p, mode, _ = self._schedule.latest()
        if mode == MODE_EXACT:
            return gen.permutation(np.repeat(np.arange(self.num_domains), largest_remainder(p, n)))
        cdf = np.cumsum(p)
        return np.searchsorted(cdf, gen.random(n) * cdf[-1], side="right").astype(np.int64)

    # -- feedback --------------------------------------------------------------------------------------------
    def note_served(self, mix_step: int) -> None:
        """Tells the mixer the newest batch handed to the training loop (the loader calls it per batch).

        :meth:`observe` then refuses a ``mix_step`` beyond it: feedback for a batch nobody drew.
        """
        self._served = check_int(mix_step, "mix_step", low=0)

    def _check_mix_step(self, mix_step: Any) -> int:
        served = self._served
        if type(mix_step) is not int or mix_step < 0 or (served is not None and mix_step > served):
            if isinstance(mix_step, torch.Tensor) and mix_step.numel() == 1 and not mix_step.is_floating_point():
                mix_step = mix_step.item()  # a collated batch's index
            mix_step = check_int(mix_step, "mix_step", low=0)
            if served is not None and mix_step > served:
                raise ValueError(
                    f"`mix_step`={mix_step} names a batch the loader has not served (the newest batch served is "
                    f"{served}); pass each batch's own 'mix_step' (or the batch itself) to observe()"
                )
        if mix_step >= self._latest_from:
            return mix_step  # under the newest row, which the ring always holds
        oldest = self._schedule.oldest_batch()
        if mix_step < oldest:
            raise ValueError(
                f"`mix_step`={mix_step} names a batch whose proportions row has left the schedule ring (the rows "
                f"kept apply from batch {oldest} on), so its importance weight is unknown; observe each batch "
                "before many publishes pass"
            )
        return mix_step

    def observe(self, domain: Any, loss: Any, *, weight: Any = None, mix_step: int | None = None) -> None:
        """Accumulates per-domain loss sums and counts for the next step; no host transfer.

        Args:
            domain: per-sample domain ids (``LongTensor[B]``, numpy, list), one id for a one-domain batch,
                or the batch itself (a mapping with ``"domain"`` and ``"mix_step"``). A batch of packed
                sequences carries ``"token_domain"`` (``[B, T]``, -1 at padding) instead: ``loss`` is then the
                per-token losses ``[B, T]``, and each token's loss is credited to its own domain.
            loss: per-sample losses ``[B]`` (per-token ``[B, T]`` for packed batches), or a scalar loss when
                every sample is of one domain.
            weight: optional per-sample weights (e.g. token counts); the loss sum of a domain is then
                ``Σ w·loss`` and its count ``Σ w``. For packed batches: ``[B, T]``, or ``[B]`` per sequence.
            mix_step: the batch index the batch was drawn at (taken from the batch when it is a mapping); the
                update's importance weights use the proportions in force for it.

        Non-finite losses are skipped (with one warning per domain at the next update) and never reach the
        policy. Ids and weights that already live on an accelerator are checked at :meth:`step` (where the
        host transfer happens anyway) instead of here, so observing never synchronises with the device.

        Raises:
            ValueError: domain ids out of range, negative or non-finite weights, shapes that do not match,
                losses on the ``meta`` device, or a ``mix_step`` that is negative, beyond the newest batch the
                loader served, or older than the schedule still holds.
            TypeError: domain ids that are not integers.
        """
        pad_id = None
        if type(domain) is dict or (not isinstance(domain, torch.Tensor) and isinstance(domain, Mapping)):
            batch = domain
            if mix_step is None and "mix_step" in batch:
                mix_step = batch["mix_step"]
            if "token_domain" in batch:
                domain, pad_id = batch["token_domain"], -1
                loss, weight = flatten_tokens(domain, loss, weight)
            elif "domain" in batch:
                domain = batch["domain"]
            else:
                raise ValueError(
                    "a batch passed to observe() needs a 'domain' entry (odm batches carry one), or "
                    "'token_domain' for packed sequences"
                )
        b = None if mix_step is None else self._check_mix_step(mix_step)
        num = self._feedback.observe(domain, loss, weight, pad_id=pad_id)
        if b is not None:
            self._feedback.add_batch(b, num)
            if b >= self._local_next:
                self._local_next = b + 1

    def wants_eval(self) -> bool:
        """Whether the next :meth:`step` updates a policy that wants per-domain held-out losses for it.

        When True, evaluate and pass the per-domain sums and counts to :meth:`observe_eval` before that step.
        """
        return not (self._num_steps + 1) % self.update_every and self._updates.wants_eval()

    def observe_eval(self, loss_sum: Any, count: Any) -> None:
        """Accumulates per-domain held-out loss sums and counts (each ``(K,)``) for the next update.

        They are reduced across ranks with the training statistics (same collective) and reach the policy as
        ``DomainStats.eval_loss = loss_sum / count`` (NaN where the count is 0). A policy that requires
        ``EVAL_LOSS`` is updated at the next update step even if no training loss was observed.

        Raises:
            ValueError: if either is not of shape ``(K,)``, or a count is negative.
        """
        self._feedback.observe_eval(loss_sum, count)

    def _warn(self, kind: str, message: str, stacklevel: int = 3) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)

    # -- the checkpoint protocol -----------------------------------------------------------------------------
    def register_payload(self, key: str, local_fn: Callable[[int], np.ndarray], length: int) -> None:
        """Adds ``length`` numbers of each rank to every :meth:`step`'s collective.

        At each step, ``local_fn(cut)`` is called with this rank's newest ``mix_step`` observed before that
        step (-1 if none) and must return ``length`` numbers (integers below 2**53 travel exactly). After the
        step, :meth:`gathered` holds every rank's numbers. This is how the loader's stream positions at the cut
        reach every rank without a collective in ``state_dict()``.

        ``local_fn`` must depend on the cut alone (given non-decreasing cuts): in one process there is nothing
        to gather, so it is called only when :meth:`gathered` is read, with the cut of the last step — one call
        per checkpoint instead of one per step — and a wrong length raises there instead of in :meth:`step`.

        Raises:
            ValueError: an empty key, a key already registered, or a negative length.
        """
        self._collective.register(key, local_fn, length)

    def gathered(self, key: str) -> np.ndarray | None:
        """Every rank's payload ``key`` as of the last :meth:`step`: ``(world, length)`` float64 (world: the
        ranks of ``process_group``), or ``None`` before the first step since it was registered.

        Raises:
            KeyError: ``key`` was never registered.
            ValueError: in one process, a payload that returns the wrong number of values.
        """
        return self._collective.get(key)

    @property
    def cut_batch(self) -> int | None:
        """The newest ``mix_step`` this rank observed before the last :meth:`step` (``None`` if none)."""
        return self._cut_batch

    def agreement(self) -> dict[str, Any]:
        """The settings every rank must share: the mixer's, then :attr:`agreement_fields`."""
        return {
            **self.agreement_fields,
            "domains": self.domains,
            "num_domains": self.num_domains,
            "policy": policy_config(self.policy),
            "update_every": self.update_every,
            "delay": self.delay,
        }

    def check_agreement(self) -> None:
        """Compares :meth:`agreement` across the ranks (one ``all_gather_object`` over the world).

        Runs by itself at the first :meth:`step` if no one called it before (the loader calls it at its first
        ``iter()``). A no-op outside ``torch.distributed``.

        Raises:
            ValueError: on every rank, naming each setting that differs and each rank's value.
        """
        check_agreement(self.agreement())
        self._agreed = True

    def _drawn_under(self, b: int) -> np.ndarray:
        if b >= self._latest_from:
            return self._latest  # the newest row's proportions, as stored (read at once, never written)
        try:
            return self._schedule.proportions_for(b)
        except RuntimeError:
            # NOTE: checked at observe(); only a flood of publishes since then gets here. Raising before the
            # collective would leave the other ranks waiting, so weigh it with the oldest row kept instead.
            return self._schedule.rows()[0].proportions

    def step(self) -> None:
        """Ends a training step: reduces its statistics (one collective under DDP); every ``update_every``-th
        step with feedback also updates the policy and publishes.

        A step without any :meth:`observe` / :meth:`observe_eval` since the previous one (on any rank) changes
        nothing but the loader's payloads, and warns once. A step that raises changes nothing.

        Raises:
            ValueError: if ids or weights observed on an accelerator since the last step were invalid (this
                step's feedback is then dropped), or if the ranks' settings disagree (first step only).
            RuntimeError: if the schedule holds rows the mixer did not publish.
        """
        foreign = None  # raised after the collective under DDP, so that no rank is left waiting in it
        if self._schedule.num_rows != self._rows_published:
            foreign = RuntimeError(
                f"the mixer's schedule holds {self._schedule.num_rows} rows but the mixer wrote "
                f"{self._rows_published}: something else published to it (mixer.schedule.publish?), so the mixer's "
                "importance weights and publish points would be wrong. Publish with mixer.set_proportions(...)"
            )
        if not self._agreed:
            self.check_agreement()
        cut = self._local_next - 1
        num_steps = self._num_steps + 1
        update_now = num_steps % self.update_every == 0
        feedback = self._feedback
        gathered: dict[str, np.ndarray] | None = None
        held = feedback.held
        stats: DomainStats | None
        if held is not None and foreign is None and self._collective.local():
            # One clean observe() on the host, in one process: nothing to reduce or pack.
            next_batch = self._local_next
            if held[0] and update_now and self._pending is None:  # the usual step
                pending = None
                stats = self._update_held(*held)
            else:  # added to the statistics since the last update, as the general path adds them
                pending = self._pend_held(*held, in_place=not update_now)
                stats = self._updates.from_pending(pending, self._latest, self._num_steps) if update_now else None
        else:
            reduced = self._reduce(cut, foreign)
            if reduced is None:
                return  # no feedback on any rank
            step_rows, next_batch, gathered = reduced
            pending = step_rows if self._pending is None else self._pending + step_rows
            # The policy moves; nothing else yet.
            stats = self._updates.from_pending(pending, self._latest, self._num_steps) if update_now else None
        p = q = key = None
        if stats is not None and self._override is None:
            p = self._constrain(self.policy.proportions)
            key = p.tobytes()  # compared as given: the schedule's row may differ in the last bit
            if key == self._published and self._mode() == self._published_mode:
                p = None  # nothing to publish: it repeats the newest row
            else:
                q = p if self._vouched else self._check_output(p)
        # Commit: nothing below raises.
        feedback.reset()
        self._collective.commit(gathered, cut)
        if next_batch > self._next_batch:
            self._next_batch = next_batch
        if cut >= 0:
            self._cut_batch = cut
        self._num_steps = num_steps
        self._pending = None if update_now else pending
        if stats is not None:
            self._updates.commit(stats)
            if p is not None:
                self._publish(p, from_policy=True, q=q, key=key)

    def _reduce(
        self, cut: int, error: BaseException | None
    ) -> tuple[np.ndarray, int, dict[str, np.ndarray] | None] | None:
        """The general path's collective: the step's packed statistics summed over the ranks, the batch clock and
        the payloads (see :meth:`StepCollective.reduce`); ``None`` after a step without feedback on any rank
        (which commits the payloads and warns once). ``error``: raised after the collective (on every rank).

        Raises:
            ValueError: ids or weights observed on an accelerator were invalid (the step's feedback is dropped).
        """
        feedback = self._feedback
        step_rows, next_batch, gathered = self._collective.reduce(
            feedback, self._drawn_under, self._local_next, cut, error
        )
        bad_ids, bad_weights, calls, _ = FeedbackRows.scalars(step_rows)
        if bad_ids or bad_weights:
            feedback.reset()
            raise ValueError(
                f"observe() got {int(bad_ids)} domain id(s) outside [0, {self.num_domains - 1}] and "
                f"{int(bad_weights)} negative or non-finite weight(s) since the last step (checked at step() "
                "because they were on an accelerator); this step's feedback was dropped"
            )
        if not calls:
            self._collective.commit(gathered, cut)
            self._warn(
                "idle",
                "odm: step() was called with no observe() since the previous step(); it changed nothing. "
                "Call mixer.step() once per training step (if a callback already does, do not call it yourself)",
                stacklevel=4,  # the call of step()
            )
            return None
        return step_rows, next_batch, gathered

    def _check_output(self, p: np.ndarray) -> np.ndarray:
        """The policy's (constrained) proportions normalised, checked like a user's: a policy bug must not reach
        the schedule the data pipeline reads."""
        if type(p) is np.ndarray and p.dtype == np.float64 and p.shape == (self.num_domains,):
            total = float(np.add.reduce(p))
            if 0 < total < math.inf and float(np.minimum.reduce(p)) >= 0:  # NaN fails both
                return p / total
        return check_simplex(p, self.num_domains, name=f"{type(self.policy).__name__}'s proportions")  # raises

    def _update_held(self, num_samples: int, loss_sum: np.ndarray, count: np.ndarray) -> DomainStats:
        """Updates the policy with a step's one clean host :meth:`observe` (held by the accumulator), without
        packing, reducing and unpacking the accumulator: the general path's statistics, except that the
        proportions are the drawn-under row itself where it computes ``n·p / Σ(n·p)`` (equal up to rounding;
        ``tests/test_mixer_held_step.py`` holds the two paths together)."""
        feedback = self._feedback
        if feedback.batches:
            (b,) = feedback.batches  # one observe(), so one batch
            proportions = self._drawn_under(b)
            if proportions is not self._latest:  # a view into the ring, which later publishes overwrite
                proportions = proportions.copy()
        else:  # observed without a mix_step: nothing says what it was drawn under
            proportions = self._latest
        return self._updates.from_held(num_samples, loss_sum, count, proportions)

    def _pend_held(self, num_samples: int, loss_sum: np.ndarray, count: np.ndarray, *, in_place: bool) -> np.ndarray:
        """The statistics pending since the last update plus the held :meth:`observe` — the general path's
        ``pending + step_rows``, bit for bit. ``in_place``: added into ``self._pending`` itself (only when nothing
        after it can raise: a step that raises changes nothing)."""
        k = self.num_domains
        if self._pending is None:
            pending = np.zeros(FeedbackRows.size(k))
        else:
            pending = self._pending if in_place else self._pending.copy()
        drawn = None
        if self._feedback.batches:
            (b,) = self._feedback.batches
            drawn = num_samples * self._drawn_under(b)
        FeedbackRows.add_observation(pending, k, loss_sum, count, drawn)
        return pending

    # -- export and state ------------------------------------------------------------------------------------
    def export_schedule(self) -> list[tuple[int, list[float]]]:
        """The trajectory ``[(num_steps, proportions), …]`` of the publishes, for ``odm.policies.Scheduled``.

        A publish that repeats the newest proportions is not recorded, so each entry holds from its step until
        the next entry's. The newest 1024 entries are exact; older ones are thinned (see :attr:`history`).
        """
        return self.history.export()

    def state_dict(self) -> dict[str, Any]:
        """Policy, schedule, counters, generator, history and the statistics since the last update.

        Never a collective: the statistics pending between two updates were summed over the ranks at each
        :meth:`step`, so they are the same on every rank, and one rank's state resumes all of them. What was
        observed after the last :meth:`step` is not saved — those batches are after the cut and are replayed.
        """
        return {
            "version": STATE_VERSION,
            "domains": list(self.domains),
            "policy": self.policy.state_dict(),
            "schedule": self._schedule.state_dict(),
            "num_steps": self._num_steps,
            "num_updates": self._updates.num_updates,
            "num_samples": self._updates.num_samples,
            "next_batch": self._next_batch,
            "cut_batch": self._cut_batch,
            "override": None if self._override is None else self._override.tolist(),
            # As given to the schedule, which normalises it: a resumed run tells a repeat as this one does.
            "published": np.frombuffer(self._published).tolist(),
            "rng": self._rng.bit_generator.state,
            "history": self.history.export(),
            "history_thinned": self.history.num_thinned,
            "pending": None if self._pending is None else self._pending.tolist(),
            "evals_missed": [self._updates.evals_missed, self._updates.updates_without_eval],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any], *, path: str = "mixer", domains: str = "same") -> None:
        """Restores a state saved by :meth:`state_dict`. Every field is checked before anything changes.

        Args:
            state_dict: the saved state.
            path: the key path of ``state_dict`` in the checkpoint, for error messages.
            domains: ``"same"`` refuses a checkpoint of another domain set; ``"remap"`` carries it over to this
                mixer's domains (common domains keep their policy state, a new one starts from a fresh policy's
                prior; see :mod:`odm.remap`).

        Raises:
            ValueError: a checkpoint from another domain set (the message lists the differences), another
                version or policy, a missing key or a field odm never writes (proportions off the simplex,
                negative counters); each names its key path (``mixer.schedule.rows[3]``).
        """
        remap = check_choice(domains, "domains", ("same", "remap")) == "remap"
        if remap and isinstance(state_dict, Mapping) and list(state_dict.get("domains", ())) != self.domains:
            state_dict = remap_mixer_state(state_dict, domains=self.domains, policy=self.policy)
        got = check_state(state_dict, domains=self.domains, schedule=self._schedule, history=self.history, path=path)
        before = self.policy.state_dict()
        try:
            self.policy.load_state_dict(dict(got.policy))
        except (ValueError, TypeError, KeyError) as err:
            self.policy.load_state_dict(before)
            raise StateError(f"checkpoint field `{path}.policy` does not load: {err}") from err
        # Everything is checked: commit.
        self._schedule.replace(got.schedule_rows)
        self._rows_published = self._schedule.num_rows
        self.history.restore(*got.history)
        self._num_steps = got.num_steps
        self._updates.num_updates, self._updates.num_samples = got.num_updates, got.num_samples
        self._next_batch = self._local_next = got.next_batch
        self._cut_batch = got.cut_batch
        self._override = got.override
        self._rng = got.rng
        self._pending = got.pending
        self._updates.evals_missed, self._updates.updates_without_eval = got.evals_missed
        latest = self._schedule.latest()
        self._published, self._published_mode = got.published.tobytes(), latest.mode
        self._latest, self._latest_from = latest.proportions, latest.effective_from
        self._latest.flags.writeable = False
        self._feedback.reset()
        self._collective.clear()

    def __repr__(self) -> str:
        return f"OnlineMixer(domains={self.domains}, policy={self.policy!r}, delay={self.delay})"
