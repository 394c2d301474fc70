"""From a step's statistics to the policy's update: what :class:`odm.OnlineMixer` feeds its policy.

:class:`PolicyUpdates` builds the :class:`~odm.policies.DomainStats` of one update — from the packed statistics of
the steps since the last update (:class:`~odm.feedback.FeedbackRows`, the general path), or from the one
``observe()`` the accumulator held (``DomainFeedback.held``, the usual step; ``docs/architecture.md``) — hands
them to the policy, counts updates and samples, and watches a held-out policy for missing evaluations. It never
touches the schedule: the mixer publishes what the policy proposes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np

from odm.feedback import COUNT, DRAWN, EVAL_COUNT, EVAL_SUM, LOSS, NONFINITE, SAMPLES, FeedbackRows
from odm.policies import EVAL_LOSS, DomainStats, Policy

__all__ = ["EVAL_PATIENCE", "EVAL_PATIENCE_UPDATES", "PolicyUpdates"]

#: Updates a held-out policy may ask for an evaluation and get none before the mixer warns.
EVAL_PATIENCE = 3
#: Updates without any evaluation after which a policy that requires them is warned about.
EVAL_PATIENCE_UPDATES = 100


class PolicyUpdates:
    """Feeds one bound policy its updates and keeps the counters that go with them.

    Args:
        policy: the bound policy.
        domains: the domain names, for warnings.
        warn: ``warn(kind, message)``: the owner's warn-once (shared with its other warnings).

    Attributes:
        num_updates: the policy's updates so far (the update index ``t`` of the last one).
        num_samples: samples observed over the run (all ranks), as of the last update.
        evals_missed: updates the policy asked an evaluation for and got none, since the last one it got.
        updates_without_eval: updates without any evaluation, for a policy that requires them but never asks.
        asks_eval: whether the policy decides per update whether it wants held-out losses.
    """

    def __init__(self, policy: Policy, domains: Sequence[str], warn: Callable[[str, str], None]) -> None:
        self.policy = policy
        self.domains = list(domains)
        self._warn = warn
        self.num_updates = 0
        self.num_samples = 0
        self.evals_missed = 0
        self.updates_without_eval = 0
        # Only a held-out policy is asked whether it wants an evaluation, and watched for missing ones.
        self.asks_eval = type(policy).wants_eval is not Policy.wants_eval or "wants_eval" in vars(policy)
        self._tracks_evals = self.asks_eval or EVAL_LOSS in policy.requires
        self._warned: set[tuple[str, int]] = set()  # (kind, domain) of the skipped-value warnings given

    def wants_eval(self) -> bool:
        """Whether the policy wants per-domain held-out losses for its next update."""
        return self.asks_eval and bool(self.policy.wants_eval(self.num_updates + 1))

    def commit(self, stats: DomainStats) -> None:
        """Counts an update the owner has committed (its step did not raise)."""
        self.num_updates, self.num_samples = stats.step, stats.num_samples

    def from_held(
        self, num_samples: int, loss_sum: np.ndarray, count: np.ndarray, proportions: np.ndarray
    ) -> DomainStats:
        """Updates the policy with the one clean ``observe()`` of a step (``DomainFeedback.held``): its loss sums
        and sample counts, ``proportions`` the row its batch was drawn under. Returns the statistics fed."""
        if self._tracks_evals:
            self._track_evals(False)
        stats = DomainStats(
            loss_sum=loss_sum,  # a fresh array (np.bincount's) that the accumulator drops when the step commits
            count=count.astype(np.float64),
            proportions=proportions,
            step=self.num_updates + 1,
            num_samples=self.num_samples + num_samples,
        )
        self.policy.update(stats)
        return stats

    def from_pending(self, pending: np.ndarray, latest: np.ndarray, num_steps: int) -> DomainStats | None:
        """Updates the policy with the packed statistics of the steps since the last update; returns them
        (``None``: nothing usable, no update). ``latest``: the newest published proportions (what batches
        observed without a batch index count as drawn under); ``num_steps``: for warnings."""
        k = len(self.domains)
        rows = FeedbackRows.domain_rows(pending, k)  # only the rows needed are taken (views)
        # Every row's total in one reduction; COUNT, SAMPLES, NONFINITE, EVAL_COUNT and DRAWN are sums of
        # non-negative numbers, so a zero total means an all-zero row.
        totals = np.add.reduce(rows, 1).tolist()
        eval_loss = None
        if totals[NONFINITE] or totals[EVAL_COUNT]:  # non-finite or held-out losses (usually neither)
            nonfinite, eval_sum, eval_count = rows[NONFINITE], rows[EVAL_SUM], rows[EVAL_COUNT]
            if nonfinite.any():
                self._warn_once("loss", nonfinite > 0, nonfinite, "loss value(s)", num_steps)
            if eval_count.any():
                with np.errstate(invalid="ignore", divide="ignore"):
                    eval_loss = np.where(eval_count > 0, eval_sum / eval_count, np.nan)
                bad = (eval_count > 0) & ~np.isfinite(eval_loss)
                if bad.any():
                    what = "held-out loss sum(s) over this many samples"
                    self._warn_once("eval", bad, eval_count, what, num_steps)
                    eval_loss[bad] = np.nan
        if self._tracks_evals:
            self._track_evals(eval_loss is not None)
        if not totals[COUNT] and (eval_loss is None or EVAL_LOSS not in self.policy.requires):
            return None  # nothing usable observed: the policy stays as it was
        total = totals[DRAWN]
        # NOTE: views of `pending`, a fresh array no one else keeps once this update is committed.
        stats = DomainStats(
            loss_sum=rows[LOSS],
            count=rows[COUNT],
            proportions=rows[DRAWN] / total if total > 0 else latest.copy(),
            step=self.num_updates + 1,
            num_samples=self.num_samples + round(totals[SAMPLES]),
            eval_loss=eval_loss,
            num_batches=max(1, round(float(pending[-1]))),  # the BATCHES scalar, last of the packed vector
        )
        self.policy.update(stats)
        return stats

    def _track_evals(self, got_eval: bool) -> None:
        """Warns once when a held-out policy goes without evaluations: it asked for :data:`EVAL_PATIENCE` and
        got none, or (one that never asks) it requires them and none came for :data:`EVAL_PATIENCE_UPDATES`."""
        policy = self.policy
        if got_eval:
            self.evals_missed = self.updates_without_eval = 0
            return
        if self.asks_eval and policy.wants_eval(self.num_updates + 1):
            self.evals_missed += 1
        elif not self.asks_eval and EVAL_LOSS in policy.requires:
            self.updates_without_eval += 1
        if self.evals_missed >= EVAL_PATIENCE:
            what = f"asked for held-out losses at {self.evals_missed} updates and got none"
        elif self.updates_without_eval >= EVAL_PATIENCE_UPDATES:
            what = f"got no held-out losses for {self.updates_without_eval} updates"
        else:
            return
        self._warn(
            "no-eval",
            f"odm: {type(policy).__name__} learns from held-out losses but {what}, so it cannot move as it "
            "should; pass them with mixer.observe_eval(loss_sum, count) before step() whenever "
            "mixer.wants_eval() is True, or give the Lightning callback `eval_loaders` (warned once)",
        )

    def _warn_once(self, kind: str, mask: np.ndarray, counts: np.ndarray, what: str, num_steps: int) -> None:
        for d in np.flatnonzero(mask):
            if (kind, int(d)) not in self._warned:
                self._warned.add((kind, int(d)))
                warnings.warn(
                    f"odm: skipped {int(counts[d])} non-finite {what} of domain {self.domains[d]!r} at step "
                    f"{num_steps}; they do not reach the policy (warned once per domain)",
                    RuntimeWarning,
                    stacklevel=4,  # the call of step()
                )
