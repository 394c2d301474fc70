"""The mixer under bad input and faults: each case asserts the exact outcome (the error and the words that name
the problem, or the exact numbers), and that a refused call leaves the mixer as it was and usable."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from conftest import ChaseLoss, Recorder, roundtrip

import odm
import odm.feedback
from odm.history import History
from odm.policies import EVAL_LOSS, TRAIN_LOSS, DomainStats, Policy
from odm.schedule import ProportionSchedule


def _names(k: int) -> list[str]:
    return [f"d{i}" for i in range(k)]


def _learned(k: int = 2, **kwargs) -> odm.OnlineMixer:
    """A mixer whose ChaseLoss policy has moved (so a wrong restore shows)."""
    mixer = odm.OnlineMixer(_names(k), ChaseLoss(), update_every=2, **kwargs)
    for t in range(5):
        mixer.observe(list(range(k)), [1.0 + d + 0.1 * t for d in range(k)], mix_step=t)
        mixer.step()
    return mixer


# -- arguments ------------------------------------------------------------------------------------------------


def test_a_negative_seed_is_refused_naming_seed():
    with pytest.raises(ValueError, match=r"^`seed` must be an integer >= 0 and <= 9\.22337e\+18, got -5$"):
        odm.OnlineMixer(_names(2), seed=-5)


def test_numpy_integers_are_accepted_for_every_integer_argument():
    mixer = odm.OnlineMixer(
        _names(2), delay=np.int64(3), update_every=np.int32(2), seed=np.uint8(7), history_every=np.int64(1)
    )
    assert (mixer.delay, mixer.update_every, mixer.seed) == (3, 2, 7)
    assert all(type(x) is int for x in (mixer.delay, mixer.update_every, mixer.seed))


def test_a_float_delay_is_a_type_error_naming_delay():
    with pytest.raises(TypeError, match=r"^`delay` must be an integer >= 0, got 1\.5 \(float\)$"):
        odm.OnlineMixer(_names(2), delay=1.5)


# -- counters -------------------------------------------------------------------------------------------------


def test_a_negative_mix_step_is_refused_and_the_mixer_keeps_working():
    rec = Recorder()
    mixer = odm.OnlineMixer(_names(2), rec)
    with pytest.raises(ValueError, match=r"^`mix_step` must be an integer >= 0, got -1$"):
        mixer.observe([0, 1], [1.0, 2.0], mix_step=-1)
    mixer.observe([0, 1], [1.0, 2.0], mix_step=0)
    mixer.step()
    np.testing.assert_array_equal(rec.seen[0].count, [1.0, 1.0])  # the refused call added nothing


def test_a_mix_step_the_loader_never_served_names_the_batch_and_changes_nothing():
    rec = Recorder()
    mixer = odm.OnlineMixer(_names(2), rec, delay=2)
    mixer.note_served(5)
    with pytest.raises(
        ValueError,
        match=r"`mix_step`=1000000000 names a batch the loader has not served \(the newest batch served is 5\)",
    ):
        mixer.observe([0], [1.0], mix_step=10**9)
    mixer.observe([0, 1], [1.0, 3.0], mix_step=5)
    mixer.step()
    np.testing.assert_array_equal(rec.seen[0].loss_sum, [1.0, 3.0])
    # The publish point follows batch 5, not 10**9.
    assert mixer.schedule.latest().effective_from == 5 + 1 + 2


def test_a_mix_step_whose_row_left_the_ring_is_refused_but_the_oldest_row_kept_is_not():
    mixer = odm.OnlineMixer(_names(2))
    capacity = mixer.schedule.capacity
    for i in range(capacity + 3):  # one row per batch, from batch 10 on, until the ring has dropped a few
        b = 10 + 2 * i
        mixer.observe([0], [1.0], mix_step=b - 1)
        mixer.step()
        assert mixer.set_proportions([2.0 + i % 2, 1.0]) == b  # from the batch after the newest one observed
    oldest = mixer.schedule.oldest_batch()
    assert oldest == 10 + 2 * 3  # the initial row and the rows from batches 10, 12 and 14 left the ring
    mixer.observe([0], [1.0], mix_step=oldest)  # the oldest row kept is still there
    with pytest.raises(
        ValueError, match=rf"`mix_step`={oldest - 1} names a batch whose proportions row has left the schedule ring"
    ):
        mixer.observe([0], [1.0], mix_step=oldest - 1)


def test_a_second_step_without_feedback_warns_once_and_moves_nothing():
    rec = Recorder()
    mixer = odm.OnlineMixer(_names(2), rec, delay=3, update_every=2)
    mixer.observe([0, 1], [1.0, 2.0], mix_step=0)
    mixer.step()
    with pytest.warns(RuntimeWarning, match=r"step\(\) was called with no observe\(\) since the previous step\(\)"):
        mixer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        for _ in range(5):
            mixer.step()
    assert (mixer.num_steps, mixer.num_updates, rec.seen) == (1, 0, [])
    assert mixer.set_proportions([0.9, 0.1]) == 0 + 1 + 3, "the publish point did not drift into the future"
    mixer.observe([0, 1], [1.0, 2.0], mix_step=1)
    mixer.step()
    assert mixer.num_updates == 1, "the cadence counts steps with feedback"
    np.testing.assert_array_equal(rec.seen[0].count, [2.0, 2.0])


def test_losses_on_the_meta_device_are_refused_at_observe():
    rec = Recorder()
    mixer = odm.OnlineMixer(_names(2), rec)
    with pytest.raises(ValueError, match=r"`loss` is on the 'meta' device, which holds no values"):
        mixer.observe(torch.tensor([0, 1]), torch.empty(2, device="meta"))
    with pytest.raises(ValueError, match=r"`loss_sum` is on the 'meta' device"):
        mixer.observe_eval(torch.empty(2, device="meta"), torch.ones(2))
    mixer.observe(torch.tensor([0, 1]), torch.tensor([1.0, 2.0]))
    mixer.step()
    np.testing.assert_array_equal(rec.seen[0].loss_sum, [1.0, 2.0])


class _Flaky(Policy):
    """Raises in its first update, then behaves as ChaseLoss."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = ChaseLoss()
        self.failures = 1
        self.seen: list[DomainStats] = []

    def _init_state(self, num_domains: int) -> None:
        self.inner.bind(num_domains)
        self._p = self.inner.proportions

    def update(self, stats: DomainStats) -> None:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("flaky")
        self.seen.append(stats)
        self.inner.update(stats)
        self._p = self.inner.proportions


def test_a_step_whose_policy_raises_changes_nothing_and_the_retry_sees_the_same_statistics():
    policy = _Flaky()
    mixer = odm.OnlineMixer(_names(2), policy)
    mixer.observe([0, 1, 1], [1.0, 2.0, 4.0], mix_step=0)
    before = mixer.state_dict()
    with pytest.raises(RuntimeError, match="flaky"):
        mixer.step()
    assert mixer.state_dict() == before
    mixer.step()
    np.testing.assert_array_equal(policy.seen[0].loss_sum, [1.0, 6.0])
    np.testing.assert_array_equal(policy.seen[0].count, [1.0, 2.0])
    assert (mixer.num_steps, mixer.num_updates) == (1, 1)


class _Broken(Policy):
    def _init_state(self, num_domains: int) -> None:
        self._p = np.full(num_domains, 1.0 / num_domains)

    def update(self, stats: DomainStats) -> None:
        self._p = np.array([np.nan, 1.0])


def test_a_policy_that_returns_nan_is_refused_before_anything_is_published():
    mixer = odm.OnlineMixer(_names(2), _Broken())
    mixer.observe([0], [1.0])
    rows = mixer.schedule.state_dict()
    with pytest.raises(ValueError, match=r"`_Broken's proportions` must be finite, got array\(\[nan,  1\.\]\)"):
        mixer.step()
    assert mixer.schedule.state_dict() == rows
    assert (mixer.num_steps, mixer.num_updates) == (0, 0)


class _BrokenEXP3(odm.policies.EXP3):
    """Inherits EXP3's `simplex_update` flag but not the update it vouches for."""

    def update(self, stats: DomainStats) -> None:
        super().update(stats)
        self._p = self._p - 1.0


def test_only_the_update_a_class_vouches_for_skips_the_publish_check():
    # EXP3's own update keeps the simplex by construction: its vector is published as it is, bit for bit.
    mixer = odm.OnlineMixer(_names(3), odm.policies.EXP3())
    mixer.observe([0, 1, 2], [1.0, 2.0, 3.0])
    mixer.step()
    assert mixer.schedule.latest().proportions.tobytes() == mixer.policy.proportions.tobytes()
    # A subclass that overrides update inherits the flag, not the trust: its output is checked again.
    mixer = odm.OnlineMixer(_names(3), _BrokenEXP3())
    mixer.observe([0, 1, 2], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"`_BrokenEXP3's proportions` must be non-negative"):
        mixer.step()
    assert mixer.num_updates == 0


def test_bad_accelerator_ids_drop_that_step_only(monkeypatch):
    monkeypatch.setattr(odm.feedback, "_CPU_ON_HOST", False)
    rec = Recorder()
    mixer = odm.OnlineMixer(_names(3), rec)
    mixer.observe(torch.tensor([0, 9]), torch.tensor([1.0, 2.0]), mix_step=0)
    with pytest.raises(ValueError, match=r"1 domain id\(s\) outside \[0, 2\] .* this step's feedback was dropped"):
        mixer.step()
    assert (mixer.num_steps, mixer.cut_batch) == (0, None)
    mixer.observe(torch.tensor([2, 2]), torch.tensor([3.0, 5.0]), mix_step=1)
    mixer.step()
    np.testing.assert_array_equal(rec.seen[0].loss_sum, [0.0, 0.0, 8.0])
    assert (mixer.num_steps, mixer.cut_batch) == (1, 1)


def test_a_payload_of_the_wrong_length_is_refused_when_read():
    # One process: payloads are computed when read, so the wrong length surfaces at gathered(), every time.
    mixer = odm.OnlineMixer(_names(2))
    mixer.register_payload("rows", lambda cut: np.zeros(2), 3)
    assert mixer.gathered("rows") is None  # before any step
    mixer.observe([0], [1.0], mix_step=0)
    mixer.step()
    for _ in range(2):  # at every read, not once
        with pytest.raises(ValueError, match=r"payload 'rows' returned 2 numbers, registered with 3"):
            mixer.gathered("rows")
    with pytest.raises(KeyError, match="no payload 'nope' is registered"):
        mixer.gathered("nope")
    with pytest.raises(ValueError, match="a payload 'rows' is already registered"):
        mixer.register_payload("rows", lambda cut: np.zeros(3), 3)


def test_payloads_are_called_with_the_cut_of_the_last_step_once_when_read():
    mixer = odm.OnlineMixer(_names(2))
    cuts: list[int] = []
    mixer.register_payload("rows", lambda cut: cuts.append(cut) or np.array([cut, 2 * cut]), 2)
    mixer.observe([0], [1.0], mix_step=0)
    mixer.observe([1], [1.0], mix_step=1)
    mixer.step()
    mixer.observe([1], [1.0], mix_step=2)  # after the cut: not in the payload until the next step
    assert mixer.cut_batch == 1
    assert mixer.gathered("rows").tolist() == [[1.0, 2.0]]
    mixer.step()
    mixer.observe([0], [1.0], mix_step=3)
    mixer.step()
    assert cuts == [1]  # not called by the steps themselves
    assert mixer.gathered("rows").tolist() == [[3.0, 6.0]]
    assert mixer.gathered("rows").tolist() == [[3.0, 6.0]]
    assert cuts == [1, 3]  # once per read after a step, with that step's cut
    mixer.register_payload("late", lambda cut: np.array([cut]), 1)
    assert mixer.gathered("late") is None  # registered after the last step: no value yet
    mixer.observe([0], [1.0], mix_step=4)
    mixer.step()
    assert mixer.gathered("late").tolist() == [[4.0]] and mixer.gathered("rows").tolist() == [[4.0, 8.0]]


# -- checkpoints ----------------------------------------------------------------------------------------------


def _tampered(edit) -> dict:  # type: ignore[no-untyped-def]
    state = copy.deepcopy(_learned().state_dict())
    edit(state)
    return state


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda s: s.pop("num_steps"), r"the checkpoint is missing `mixer\.num_steps`"),
        (lambda s: s["schedule"].pop("rows"), r"the checkpoint is missing `mixer\.schedule\.rows`"),
        (lambda s: s.__setitem__("published", [0.5, -1.0]), r"`mixer\.published` must hold finite numbers and >= 0"),
        (lambda s: s.pop("history_thinned"), r"the checkpoint is missing `mixer\.history_thinned`"),
        (
            lambda s: s["history"].__setitem__(0, [0, [0.5]]),
            r"`mixer\.history\[0\]\.proportions` must be a list of 2 numbers, got \[0\.5\]",
        ),
        (
            lambda s: s["schedule"]["rows"].__setitem__(0, [0, 0, [1.5, -0.5]]),
            r"`mixer\.schedule\.rows\[0\]\.proportions` must hold finite numbers and >= 0, got \[1\.5, -0\.5\]",
        ),
        (
            lambda s: s["schedule"]["rows"].__setitem__(0, [0, 0, [0.7, 0.7]]),
            r"`mixer\.schedule\.rows\[0\]\.proportions` must be proportions on the simplex",
        ),
        (
            lambda s: s["schedule"]["rows"].__setitem__(0, [0, 7, [0.5, 0.5]]),
            r"`mixer\.schedule\.rows\[0\]\.mode` must be 0 \(sample\) or 1 \(exact\), got 7",
        ),
        (
            lambda s: s["schedule"]["rows"].append([0, 0, [0.5, 0.5]]),
            r"`mixer\.schedule\.rows\[\d+\]\.effective_from` must be an integer >= \d+, got 0",
        ),
        (lambda s: s.__setitem__("override", [2, -1]), r"`mixer\.override` must hold finite numbers and >= 0"),
        (lambda s: s.__setitem__("num_steps", -1), r"`mixer\.num_steps` must be an integer >= 0, got -1"),
        (lambda s: s.__setitem__("num_updates", 2.5), r"`mixer\.num_updates` must be an integer >= 0, got 2\.5"),
        (lambda s: s.__setitem__("pending", [0.0] * 3), r"`mixer\.pending` must be a list of 18 numbers"),
        (
            lambda s: s.__setitem__("pending", [0.0, 0.0, -1.0] + [0.0] * 15),
            r"`mixer\.pending` holds a negative count",
        ),
        (lambda s: s["rng"].__setitem__("bit_generator", "MT19937"), r"`mixer\.rng` is not a PCG64 state"),
        (lambda s: s.__setitem__("version", 1), r"`mixer\.version` is 1; this odm reads mixer state version 2"),
        (lambda s: s["history"].__setitem__(-1, [99, [0.5, 0.5]]), r"`mixer\.history` ends at step 99"),
        (lambda s: s["policy"].__setitem__("policy", "EXP3"), r"`mixer\.policy` does not load: .*'EXP3'"),
        (
            lambda s: s.__setitem__("domains", ["d0", "x"]),
            r"the checkpoint has \['x'\] which this run lacks; this run has \['d1'\]",
        ),
    ],
)
def test_a_tampered_checkpoint_is_refused_naming_the_key_path_and_changes_nothing(edit, words):
    state = _tampered(edit)
    mixer = _learned()
    mixer.observe([0], [1.0], mix_step=5)
    mixer.step()
    before = mixer.state_dict()
    with pytest.raises(ValueError, match=words):
        mixer.load_state_dict(state)
    assert mixer.state_dict() == before


def test_an_untampered_checkpoint_loads_through_torch_save_with_weights_only():
    state = roundtrip(_learned().state_dict())
    mixer = odm.OnlineMixer(_names(2), ChaseLoss(), update_every=2)
    mixer.load_state_dict(state)
    assert mixer.state_dict() == _learned().state_dict()


# -- warnings -------------------------------------------------------------------------------------------------


def test_a_held_out_policy_without_evaluations_is_warned_about_once_naming_the_fix():
    rec = Recorder(requires=frozenset({TRAIN_LOSS, EVAL_LOSS}), wants=lambda t: True)
    mixer = odm.OnlineMixer(_names(2), rec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(10):
            mixer.observe([0, 1], [1.0, 2.0], mix_step=t)
            mixer.step()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "Recorder learns from held-out losses but asked for held-out losses at 3 updates and got none" in messages[0]
    assert "mixer.observe_eval(loss_sum, count)" in messages[0] and "`eval_loaders`" in messages[0]


class _NeverAsks(Policy):
    requires = frozenset({EVAL_LOSS})

    def _init_state(self, num_domains: int) -> None:
        self._p = np.full(num_domains, 1.0 / num_domains)

    def update(self, stats: DomainStats) -> None:
        pass


def test_a_held_out_policy_that_never_asks_is_warned_about_after_100_updates_without_evaluations():
    mixer = odm.OnlineMixer(_names(2), _NeverAsks())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(150):
            mixer.observe([0, 1], [1.0, 2.0], mix_step=t)
            mixer.step()
            if t == 98:
                assert not caught, "not before 100 updates"
    assert len(caught) == 1
    assert str(caught[0].message).startswith(
        "odm: _NeverAsks learns from held-out losses but got no held-out losses for 100 updates"
    )


def test_a_policy_that_asks_rarely_is_not_warned_about_between_its_asks():
    rec = Recorder(requires=frozenset({TRAIN_LOSS, EVAL_LOSS}), wants=lambda t: t % 250 == 0)
    mixer = odm.OnlineMixer(_names(2), rec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in range(600):
            if mixer.wants_eval():
                mixer.observe_eval([2.0, 4.0], [1.0, 1.0])
            mixer.observe([0, 1], [1.0, 2.0], mix_step=t)
            mixer.step()


def test_evaluations_that_arrive_keep_the_held_out_warning_away():
    rec = Recorder(requires=frozenset({TRAIN_LOSS, EVAL_LOSS}), wants=lambda t: True)
    mixer = odm.OnlineMixer(_names(2), rec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in range(10):
            if t % 2:
                mixer.observe_eval([2.0, 4.0], [1.0, 1.0])  # every other update: never 3 misses in a row
            mixer.observe([0, 1], [1.0, 2.0], mix_step=t)
            mixer.step()
    assert sum(s.eval_loss is not None for s in rec.seen) == 5


# -- packed sequences -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["host", "device"])
def test_per_token_losses_are_credited_to_each_tokens_domain_and_padding_is_ignored(monkeypatch, path):
    if path == "device":
        monkeypatch.setattr(odm.feedback, "_CPU_ON_HOST", False)
    rec = Recorder()
    mixer = odm.OnlineMixer(_names(3), rec)
    batch = {"token_domain": torch.tensor([[0, 0, 2, -1], [1, 1, 1, 2]]), "mix_step": 0}
    loss = torch.tensor([[1.0, 2.0, 4.0, 100.0], [3.0, 3.0, 3.0, 5.0]])
    mixer.observe(batch, loss)
    mixer.observe(batch, loss, weight=torch.tensor([2.0, 1.0]))  # per sequence: each of its tokens
    mixer.step()
    np.testing.assert_array_equal(rec.seen[0].loss_sum, [3.0 + 6.0, 9.0 + 9.0, 9.0 + 8.0 + 5.0])
    np.testing.assert_array_equal(rec.seen[0].count, [2.0 + 4.0, 3.0 + 3.0, 2.0 + 3.0])
    with pytest.raises(ValueError, match=r"per-token losses must have the shape of batch\['token_domain'\] \[2, 4\]"):
        mixer.observe(batch, loss[:, :3])


# -- the schedule ring and the publish point (real bugs the default run must catch) ---------------------------


def test_the_oldest_row_still_in_the_ring_answers_and_the_one_before_it_is_reported_evicted():
    s = ProportionSchedule(2, capacity=4)
    for b in (10, 20, 30, 40):  # five rows in a ring of four: the initial row (batch 0) left
        s.publish([b, 100 - b], effective_from=b)
    assert s.lookup(10).proportions.tolist() == [0.1, 0.9]
    assert s.lookup(19).proportions.tolist() == [0.1, 0.9] and s.lookup(19).position == 1
    with pytest.raises(RuntimeError, match=r"the proportions row for batch 9 has left the schedule ring"):
        s.lookup(9)
    assert [r.effective_from for r in s.rows()] == [10, 20, 30, 40]


@pytest.mark.parametrize("delay", [0, 3])
def test_a_policy_publish_applies_from_exactly_one_past_the_newest_stepped_batch_plus_the_delay(delay):
    mixer = odm.OnlineMixer(_names(2), ChaseLoss(), delay=delay)
    mixer.observe([0, 1], [1.0, 5.0], mix_step=6)
    mixer.observe([0, 1], [1.0, 5.0], mix_step=7)
    mixer.step()
    new = mixer.proportions
    assert mixer.schedule.latest().effective_from == 8 + delay
    assert mixer.schedule.lookup(7 + delay).proportions.tolist() == [0.5, 0.5]
    assert mixer.schedule.lookup(8 + delay).proportions.tolist() == new.tolist()


# -- bounded history ------------------------------------------------------------------------------------------


def test_the_history_stays_bounded_with_the_newest_rows_exact_and_the_first_kept():
    h = History(2, exact=8, capacity=16)
    for s in range(1000):
        h.append(s, np.array([s, 1000 - s]) / 1000)
    steps = [s for s, _ in h]
    assert len(h) <= 16 and h.num_thinned == 1000 - len(h)
    assert steps[0] == 0 and steps[-8:] == list(range(992, 1000))
    assert steps == sorted(steps)
    gaps = np.diff(steps[:-8])
    assert gaps[0] >= gaps[-1], "older rows are spaced further apart"


class _Unnormalised(Policy):
    """Holds proportions that do not sum to 1 (the mixer normalises what it publishes)."""

    def _init_state(self, num_domains: int) -> None:
        self._p = np.array([0.2, 0.3, 0.6])

    def update(self, stats: DomainStats) -> None:
        self._p = np.array([0.2, 0.3, 0.6])


def test_unchanged_proportions_are_not_published_again_even_when_their_sum_is_off_by_a_bit():
    assert sum([0.2, 0.3, 0.6]) != 1.0
    mixer = odm.OnlineMixer(_names(3), _Unnormalised())
    for t in range(20):
        if t == 5:
            mixer.set_proportions([1.0, 1.0, 1.0])
        if t == 10:
            mixer.release()  # the policy's vector again: published once, not once per later step
        mixer.observe([0, 1, 2], [1.0, 1.0, 1.0], mix_step=t)
        mixer.step()
    assert (mixer.schedule.num_rows, len(mixer.history)) == (3, 3)


def test_a_resumed_run_publishes_exactly_the_rows_of_the_uninterrupted_one():
    def run(mixer: odm.OnlineMixer, steps: range) -> odm.OnlineMixer:
        for t in steps:
            if t == 3:
                mixer.set_proportions([1.0, 1.0, 1.0])
            if t == 6:
                mixer.release()
            mixer.observe([0, 1, 2], [1.0, 1.0, 1.0], mix_step=t)
            mixer.step()
        return mixer

    whole = run(odm.OnlineMixer(_names(3), _Unnormalised()), range(12))
    resumed = odm.OnlineMixer(_names(3), _Unnormalised())
    resumed.load_state_dict(roundtrip(run(odm.OnlineMixer(_names(3), _Unnormalised()), range(8)).state_dict()))
    run(resumed, range(8, 12))
    assert resumed.state_dict() == whole.state_dict()


def test_a_row_published_behind_the_mixers_back_is_refused_at_the_next_step_which_changes_nothing():
    mixer = odm.OnlineMixer(_names(2), "exp3")
    mixer.observe([0, 1], [1.0, 2.0], mix_step=0)
    mixer.step()
    before = mixer.state_dict()
    mixer.observe([0, 1], [1.0, 2.0], mix_step=1)
    mixer.schedule.publish([0.9, 0.1], effective_from=5)  # not through the mixer: its importance weights would lie
    with pytest.raises(RuntimeError, match=r"mixer wrote 2: something else published.*set_proportions"):
        mixer.step()
    before_schedule = before.pop("schedule")
    after = mixer.state_dict()
    assert after.pop("schedule") != before_schedule  # (the foreign row is there)
    assert after == before  # the step changed nothing else
    with pytest.raises(AttributeError):
        mixer.schedule = ProportionSchedule(2)  # the loader's workers hold this one: it cannot be swapped
