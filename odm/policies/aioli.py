"""Aioli: estimate how training on each domain moves every held-out loss, then take an exponentiated step.

Chen et al. 2024, "Aioli: A Unified Optimization Framework for Language Model Data Mixing". Within a round the
held-out losses are modelled as moving linearly with the mixture, ``L^{t+1} = L^t − A·p^t``; the policy
estimates ``A`` online with short probe phases on the live model and takes an exponentiated-gradient step on
the total predicted decrease. See ``docs/algorithms.md``, "Aioli".
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from odm._checks import check_choice, check_float, check_int, check_seed
from odm.policies.aioli_estimate import (
    AioliEstimator,
    aioli_normalize,
    aioli_unsmooth,
    probe_batch_mixture,
    probe_mixture,
)
from odm.policies.base import EVAL_LOSS, TRAIN_LOSS, DomainStats, Policy, check_proportions

__all__ = ["Aioli", "aioli_normalize", "aioli_unsmooth", "probe_batch_mixture", "probe_mixture"]

# Phases of the round state machine.
_PRIOR, _AWAIT, _PROBE, _MAIN = "prior", "await_eval", "probe", "main"
# Two proportions vectors closer than this (max-abs) are the same mixture.
_MATCH_TOL = 1e-6
# Longest publish-to-draw delay (in updates) the probe pipelining plans for.
_MAX_LAG = 256


class Aioli(Policy):
    """Aioli: rounds of held-out evaluation, LearnParams probes and an exponentiated-gradient update.

    Each round (``U = round_steps`` updates; ``R = sweeps``, ``s = probe_steps``, ``f = probe_weight``):

    1. an evaluation gives the per-domain held-out losses ``L_prev``;
    2. LearnParams: for each domain ``j`` of ``R`` concatenated random permutations of the domains, train on
       the probe mixture ``m_j`` (``f`` on ``j``, ``(1−f)/(K−1)`` elsewhere) until ``s`` updates drawn under
       ``m_j`` have been observed, evaluate, add ``L_prev − L_new`` to column ``j`` of ``D``; ``D ← D/R``;
    3. un-smooth: solve ``D = A·Wᵀ`` with ``W[j]`` the mixture *actually trained on* between the two
       evaluations of probe ``j`` (realised per-domain counts, averaged over the sweeps; ``f = 1``: ``A = D``);
    4. normalise (``normalize=True``): shift by ``min(A)`` if negative, divide by the sum of entries: ``Ā``;
    5. update: cumulative ``log w ← log w + η·colsum(Ā)``, ``p = softmax(log w)``; or, with ``ema=β``,
       ``E ← (1−β)·Ā + β·E`` (``E₁ = Ā₁``: the first round's estimate, as in the authors' code) and
       ``p ∝ base ⊙ exp(η·colsum(E))`` — non-cumulative, so ``p`` stays within ``exp(±η·max colsum)`` of
       ``base``;
    6. train on ``p`` for the rest of the round. A round costs ``R·K + 1`` evaluations.

    Probe steps are ordinary training steps on the live model. During probes :attr:`exact_counts` is True, so
    the mixer builds probe batches with exact largest-remainder counts.

    NOTE (delay): proportions published at an update apply ``delay`` batches later (``delay`` = prefetch depth
    + 2 under ``odm.MixtureLoader``, 0 for a standalone mixer). The policy therefore works from what it
    *observes*: a probe's ``s`` steps are the updates whose ``stats.proportions`` (the proportions the batches
    were really drawn under) equal ``m_j``, and ``W[j] = Σ_t count_t/Σcount_t / s`` sums the realised shares of
    *every* update between the two evaluations of probe ``j``. It measures the delay (in updates) from the
    first change of mixture it sees drawn (:attr:`lag`) and from then on *pipelines* the phases: at each update
    it publishes the mixture planned for the update ``lag + 1`` ahead, replaying the rows already in flight,
    so the next probe's batches follow the previous probe's evaluation without a gap and each interval is
    exactly ``s`` updates under ``m_j`` (``W[j]`` = the realised ``m_j``). Before the delay is known (the
    first probe of the first round) the interval also holds the batches still drawn under the previous
    mixture; their counts are in ``W``, so the solve stays exact under the linear law. :meth:`wants_eval` asks
    for the probe-end evaluation at the update that brings the ``s``-th step (with ``s = 1``, at every update
    until the first step is seen). An evaluation that does not come extends the probe (its extra updates enter
    ``W``) and is asked for again; one the policy did not ask for is ignored. If a probe mixture is never drawn
    as published (mixer ``floors``/``ceilings`` project it, or ``set_proportions`` holds another), the policy
    warns once and counts probe steps by time (and pairs drawn changes with published ones to learn the
    delay); ``W`` still holds what was really drawn, so the solve stays exact under the linear law.

    Cost: ``R·K + 1`` held-out evaluations per ``U`` updates (the default ``U = 250``, ``R = s = 4`` fits
    ``K ≤ 15``; for The Pile's 22 domains use e.g. ``sweeps=1``).

    Restricted setting: with ``prior_steps = S0 > 0`` the policy samples ``prior`` for ``S0`` updates, then
    starts the rounds (the first evaluation comes with update ``max(S0, 1)``). ``start_from`` chooses the base
    of the exponentiated-gradient update at the hand-over: ``"uniform"`` (the authors' code restarts there) or
    ``"prior"`` (``log w`` starts at ``log p0``; in EMA mode ``base = p0``).

    Args:
        round_steps: ``U``, updates per round (probes included); must be ``≥ R·K·s`` (checked at bind).
            ``None`` (default): ``max(250, 2·R·K·s)`` — the authors' 250 for few domains, and rounds that keep
            at least half their updates for exploitation when K is large (K = 22 with the defaults: 704).
            Meant for long runs: below a few thousand steps the probes dominate; pass e.g. ``round_steps=100,
            sweeps=1, probe_steps=2`` there (evidence in ``docs/policies.md``).
        sweeps: ``R``, random permutations of the domains per round.
        probe_steps: ``s``, updates drawn under each probe mixture.
        probe_weight: ``f ∈ (0, 1]``, weight of the probed domain (``≠ 1/K``: the probes would coincide).
        eta: ``η > 0``, exponentiated-gradient step size.
        ema: ``β ∈ [0, 1)`` (weight on the old estimate) for EMA mode; ``None``: cumulative mode.
        normalize: normalise ``A`` before the update (recommended).
        prior: ``p0``, proportions of the prior phase and initial proportions (default uniform).
        prior_steps: ``S0``, updates on ``prior`` before the first round.
        start_from: ``"uniform"`` or ``"prior"``, the base of the update (see above).
        unsmooth: ``"realised"`` (``W`` from realised counts) or ``"nominal"`` (``W[j] = m_j``, the authors'
            code).
        seed: seeds the probe permutations (round ``r`` uses ``default_rng([seed, r])``).

    Example:
        >>> policy = Aioli(round_steps=20, sweeps=1, probe_steps=2).bind(2)
        >>> policy.wants_eval(1), policy.proportions
        (True, array([0.5, 0.5]))
    """

    name = "aioli"
    requires = frozenset({TRAIN_LOSS, EVAL_LOSS})

    def __init__(
        self,
        round_steps: int | None = None,
        *,
        sweeps: int = 4,
        probe_steps: int = 4,
        probe_weight: float = 0.625,
        eta: float = 0.2,
        ema: float | None = None,
        normalize: bool = True,
        prior: Sequence[float] | np.ndarray | None = None,
        prior_steps: int = 0,
        start_from: str = "uniform",
        unsmooth: str = "realised",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self._round_steps_arg = check_int(round_steps, "round_steps", low=1, allow_none=True)
        self.round_steps = self._round_steps_arg or 0  # resolved at bind when None
        self.sweeps = check_int(sweeps, "sweeps", low=1)
        self.probe_steps = check_int(probe_steps, "probe_steps", low=1)
        self.probe_weight = check_float(probe_weight, "probe_weight", low=0, high=1, low_open=True)
        self.eta = check_float(eta, "eta", low=0, low_open=True)
        # None: cumulative mode
        self.ema = check_float(ema, "ema", low=0, high=1, high_open=True, allow_none=True)
        if not isinstance(normalize, bool | np.bool_):
            raise TypeError(f"`normalize` must be a bool, got {normalize!r}")
        self.prior_steps = check_int(prior_steps, "prior_steps", low=0)
        check_choice(start_from, "start_from", ("uniform", "prior"))
        check_choice(unsmooth, "unsmooth", ("realised", "nominal"))
        seed = check_seed(seed)
        self.normalize = normalize
        self.prior = None if prior is None else check_proportions(prior, name="prior")
        self.start_from = start_from
        self.unsmooth = unsmooth
        self.seed = int(seed)
        if self.prior is not None:
            self.bind(len(self.prior))

    # -- state ---------------------------------------------------------------------------------------------
    def _init_state(self, num_domains: int) -> None:
        k = num_domains
        if self._round_steps_arg is None:
            self.round_steps = max(250, 2 * self.sweeps * k * self.probe_steps)
        if self.round_steps < self.sweeps * k * self.probe_steps:
            raise ValueError(
                f"`round_steps`={self.round_steps} is shorter than the probes of a round: sweeps·K·probe_steps = "
                f"{self.sweeps}·{k}·{self.probe_steps} = {self.sweeps * k * self.probe_steps}; raise round_steps "
                "or lower sweeps / probe_steps"
            )
        if k > 1 and abs(self.probe_weight - 1.0 / k) < 1e-9:
            raise ValueError(
                f"`probe_weight`={self.probe_weight} equals 1/K for K={k}: every probe would be uniform and A "
                "could not be identified; use a weight above 1/K (default 0.625)"
            )
        if self.prior is not None and len(self.prior) != k:
            raise ValueError(f"`prior` has {len(self.prior)} entries but the mixer has {k} domains")
        p0 = self.prior if self.prior is not None else np.full(k, 1.0 / k)
        base = p0 if self.start_from == "prior" else np.full(k, 1.0 / k)
        with np.errstate(divide="ignore"):
            log_base = np.log(base)
        self._est = AioliEstimator(
            k,
            log_base,
            eta=self.eta,
            ema=self.ema,
            normalize=self.normalize,
            sweeps=self.sweeps,
            probe_steps=self.probe_steps,
            unsmooth=self.unsmooth,
        )
        self._p0 = p0
        self._p = p0.copy()
        self._exact = False  # whether the published proportions are a probe mixture
        self._phase = _PRIOR if self.prior_steps > 1 else _AWAIT
        self._updates = 0
        self._round = 0  # rounds started
        self._round_pos = 0  # updates since the round's first evaluation
        self._probe = 0  # index into the round's probe order
        self._probe_count = 0  # updates of this probe drawn under its mixture
        self._waited = 0  # updates this probe has waited for its mixture to be drawn
        self._by_time = False  # the mixer alters the mixtures: count probe steps by time
        self._lag = 0  # publish-to-draw delay, in updates: given (set_publish_delay) or learned
        self._lag_known = False
        self._changes: list[tuple[int, list[float]]] = []  # published changes of mixture not yet observed
        self._observed = p0.tolist()  # the mixture the latest batches were drawn under
        self._recent: list[list[float]] = []  # mixtures published at the latest updates, oldest first
        self._warned_eval = False
        self._orders: dict[int, np.ndarray] = {}

    _KEYS = (
        *("phase", "exact", "updates", "round", "round_pos", "probe", "probe_count"),
        *("waited", "by_time", "lag", "changes", "observed", "recent"),
    )

    def _get_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {key: copy.deepcopy(getattr(self, "_" + key)) for key in self._KEYS}
        state.update(self._est.state())  # one flat layout: checkpoints of the unsplit policy still load
        return state

    def _set_state(self, state: dict[str, Any]) -> None:
        for key in self._KEYS:
            setattr(self, "_" + key, copy.deepcopy(state[key]))
        self._changes = [(int(u), list(m)) for u, m in self._changes]
        self._est.load(state)

    # -- public face ---------------------------------------------------------------------------------------
    @property
    def phase(self) -> str:
        """What the observed updates measure: ``"prior"``, ``"await_eval"`` (a round's first evaluation is due),
        ``"probe"`` or ``"main"``."""
        return self._phase

    @property
    def estimate(self) -> np.ndarray | None:
        """The last round's ``Ā`` (``A`` when ``normalize=False``); None before the first round ends."""
        return None if self._est.estimate is None else self._est.estimate.copy()

    @property
    def ema_estimate(self) -> np.ndarray:
        """``E``, the EMA of the estimates (EMA mode; zeros otherwise)."""
        return self._est.ema.copy()

    @property
    def main_proportions(self) -> np.ndarray:
        """The learned mixture of the main phase (what :attr:`proportions` is outside probes); export this."""
        return self._main_proportions()

    @property
    def lag(self) -> int:
        """The learned delay, in updates, between publishing proportions and observing batches drawn under them."""
        return self._lag

    @property
    def exact_counts(self) -> bool:
        return self._exact

    def set_publish_delay(self, delay: int) -> None:
        """The publish delay in updates, from the mixer: proportions published at update ``u`` are first drawn
        in update ``u + delay + 1``. Probes are pipelined by it from the first one, instead of learning it from
        the first change of mixture drawn (which still runs when no delay is given)."""
        self._lag = check_int(delay, "delay", low=0, high=_MAX_LAG - 1)
        self._lag_known = True

    def wants_eval(self, step: int) -> bool:
        if self._phase == _PRIOR:
            return self._updates + 1 >= self.prior_steps
        if self._phase == _AWAIT:
            return True
        if self._phase == _MAIN:
            return self._round_pos + 1 >= self.round_steps
        # A probe ends with the update that brings its s-th step drawn under its mixture. Pipelined publishing
        # makes the steps of a probe consecutive, so once one was seen the next one follows; with s = 1 the
        # first one cannot be predicted before the delay is known, so every update asks.
        return self._probe_count + 1 >= self.probe_steps

    def update(self, stats: DomainStats) -> None:
        # An evaluation-only update (no samples, finite) is usable here: it can open a round.
        if not self._usable(stats, losses=False) and stats.count.sum() != 0:
            return
        ev = self._eval_loss(stats)
        total = stats.count.sum()
        if total <= 0:
            # No training observed (an evaluation-only update): it can only open a round that waits for one.
            if ev is not None and self._phase == _AWAIT:
                self._start_round(ev)
                self._publish()
            return
        self._updates += 1
        self._learn_lag(stats.proportions)
        if self._phase == _PRIOR:
            if self._updates >= self.prior_steps:
                self._open_round(ev)
        elif self._phase == _AWAIT:
            if ev is not None:
                self._start_round(ev)
        elif self._phase == _MAIN:
            self._round_pos += 1
            if self._round_pos >= self.round_steps:
                self._open_round(ev)
        else:
            self._probe_update(stats.count / total, stats.proportions, ev)
        self._publish()

    # -- publishing: what the batches `lag` updates ahead should be drawn under ---------------------------------
    def _order_of(self, round_index: int) -> np.ndarray:
        """The probe order of a round: ``sweeps`` permutations drawn from ``default_rng([seed, round])``."""
        if round_index not in self._orders:
            rng = np.random.default_rng([self.seed, round_index])
            self._orders = {r: o for r, o in self._orders.items() if r >= round_index - 1}  # a derived cache
            self._orders[round_index] = np.concatenate([rng.permutation(self.num_domains) for _ in range(self.sweeps)])
        return self._orders[round_index]

    def _predict(self) -> tuple[np.ndarray, bool]:
        """The mixture the batches of update ``updates + lag + 1`` should be drawn under, and whether it is a probe.

        The rows for the ``lag`` updates before it are already published (in flight): replay them on a copy of
        the round position, assuming every evaluation comes when it is due, and return what comes next.
        """
        s, k, f = self.probe_steps, self.num_domains, self.probe_weight
        phase, rnd, probe, count, pos, upd = (
            self._phase,
            self._round,
            self._probe,
            self._probe_count,
            self._round_pos,
            self._updates,
        )
        order = self._order_of(rnd)
        in_flight = self._recent[max(len(self._recent) - self._lag, 0) :] if self._lag else []
        for x in in_flight:
            upd += 1
            pos += 1
            if phase == _PROBE:
                if np.max(np.abs(np.asarray(x) - probe_mixture(int(order[probe]), k, f))) <= _MATCH_TOL:
                    count += 1
                if count >= s:
                    probe, count = probe + 1, 0
                    if probe == len(order):
                        phase = _MAIN
            if (phase == _PRIOR and upd >= self.prior_steps) or (phase == _MAIN and pos >= self.round_steps):
                phase, rnd, probe, count, pos = _PROBE, rnd + 1, 0, 0, 0
                order = self._order_of(rnd)
        if phase == _PROBE:
            # Rotate which off-target domains get a batch's spare samples: by a stride that spreads the s steps
            # of a probe (and the sweeps) evenly over the K − 1 of them.
            stride = max(1, -(-(k - 1) // s))
            rotation = (count + s * (probe // k)) * stride
            return probe_batch_mixture(int(order[probe]), k, f, rotation), True
        return (self._p0 if phase == _PRIOR else self._main_proportions()), False

    def _publish(self) -> None:
        mixture, is_probe = self._predict()
        assert self._p is not None
        if np.max(np.abs(mixture - self._p)) > _MATCH_TOL:
            self._changes = [*self._changes[-31:], (self._updates, mixture.tolist())]
        self._recent = [*self._recent[-(_MAX_LAG - 1) :], mixture.tolist()]
        self._p, self._exact = mixture, is_probe

    def _learn_lag(self, drawn: np.ndarray) -> None:
        """Measures the delay when the batches of this update are drawn under a newly published mixture."""
        if self._lag_known:
            return
        if np.max(np.abs(drawn - np.asarray(self._observed))) <= _MATCH_TOL:
            return
        for i, (published_at, mixture) in enumerate(self._changes):
            if np.max(np.abs(drawn - np.asarray(mixture))) <= _MATCH_TOL:
                self._lag = self._updates - published_at - 1
                self._observed = mixture
                del self._changes[: i + 1]
                return
        if self._by_time and self._changes:
            # The mixer alters what is published: pair this change with the oldest change not seen yet.
            self._lag = self._updates - self._changes.pop(0)[0] - 1
            self._observed = drawn.tolist()

    # -- observing: rounds, probes, the update --------------------------------------------------------------
    def _open_round(self, ev: np.ndarray | None) -> None:
        if ev is None:
            self._phase = _AWAIT  # keep the current proportions and ask at every update
        else:
            self._start_round(ev)

    def _main_proportions(self) -> np.ndarray:
        return self._est.proportions()

    def _start_round(self, l_now: np.ndarray) -> None:
        self._round += 1
        self._phase = _PROBE
        self._probe = 0
        self._probe_count = 0
        self._waited = 0
        self._round_pos = 0
        self._est.start_round(l_now)

    def _probe_update(self, realised: np.ndarray, drawn_under: np.ndarray, ev: np.ndarray | None) -> None:
        order = self._order_of(self._round)
        j = int(order[self._probe])
        m = probe_mixture(j, self.num_domains, self.probe_weight)
        self._round_pos += 1
        self._est.observe(realised)
        if self._by_time or np.max(np.abs(drawn_under - m)) <= _MATCH_TOL:
            self._probe_count += 1
        elif self._probe_count == 0:
            self._waited += 1
            if self._waited > 2 * (self._lag + self.probe_steps) + 8:
                # The probe mixture is never drawn as published: the mixer alters it (floors, ceilings, an
                # override). Count probe steps by time from now on; W still holds what was really drawn.
                self._by_time = True
                self._probe_count = 1
                warnings.warn(
                    "odm: Aioli's probe mixtures are not drawn as published (mixer constraints or an override?); "
                    "probe steps are counted by time from now on",
                    RuntimeWarning,
                    stacklevel=3,
                )
        if self._probe_count < self.probe_steps:
            return
        if ev is None:
            if not self._warned_eval:
                self._warned_eval = True
                warnings.warn(
                    "odm: Aioli asked for a held-out evaluation at the end of a probe and got none; the probe "
                    "continues until one comes (does your loop honour `wants_eval`?)",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return
        self._est.end_probe(j, ev, m)
        self._probe += 1
        self._probe_count = 0
        self._waited = 0
        if self._probe == len(order):
            self._finish_round(ev)

    def _finish_round(self, l_now: np.ndarray) -> None:
        if not self._est.end_round():
            warnings.warn("odm: Aioli's estimate of A is not finite; the proportions are kept", RuntimeWarning, 3)
        self._phase = _MAIN
        if self._round_pos >= self.round_steps:
            self._start_round(l_now)  # no main phase left: this evaluation opens the next round
