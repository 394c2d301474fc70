"""``OnlineMixer``: feedback accumulation, importance weights, updates, evals, overrides, constraints, state."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from conftest import ChaseLoss, Recorder

import odm
import odm.feedback
from odm.policies import EVAL_LOSS, TRAIN_LOSS, default_policy_names


def _names(k: int) -> list[str]:
    return [f"d{i}" for i in range(k)]


def _reference_sums(batches: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]], k: int):
    """Slow, obviously correct per-domain Σw·loss, Σw and sample counts over finite losses."""
    total, weight, samples = np.zeros(k), np.zeros(k), np.zeros(k)
    for ids, losses, w in batches:
        for i in range(len(ids)):
            if not np.isfinite(losses[i]):
                continue
            wi = 1.0 if w is None else float(w[i])
            total[ids[i]] += wi * float(losses[i])
            weight[ids[i]] += wi
            samples[ids[i]] += 1
    return total, weight, samples


def _random_batches(rng: np.random.Generator, k: int, num: int, *, weighted: bool, nonfinite: bool):
    out = []
    for _ in range(num):
        b = int(rng.integers(1, 40))
        ids = rng.integers(0, k, b)
        losses = rng.gamma(2.0, 1.5, b)
        if nonfinite and b > 2:
            losses[rng.integers(0, b)] = rng.choice([np.nan, np.inf, -np.inf])
        w = rng.integers(1, 50, b).astype(np.float64) if weighted else None
        out.append((ids, losses, w))
    return out


_FORMS: dict[str, Callable[[np.ndarray], object]] = {
    "list": lambda a: a.tolist(),
    "numpy": lambda a: a,
    "tensor": lambda a: torch.from_numpy(a.copy()),
    "float32 tensor": lambda a: torch.from_numpy(a.copy()).float() if a.dtype.kind == "f" else torch.from_numpy(a),
}


@pytest.fixture(params=["host", "device"])
def path(request, monkeypatch) -> str:
    """Runs a test through the host (numpy) path and through the accelerator path, on CPU tensors."""
    if request.param == "device":
        # The torch path that CUDA losses take, exercised here by treating "cpu" as an accelerator.
        monkeypatch.setattr(odm.feedback, "_CPU_ON_HOST", False)
    return request.param


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("form", sorted(_FORMS))
@pytest.mark.parametrize("weighted", [False, True])
def test_sums_and_counts_match_a_per_sample_reference(path, seed, form, weighted):
    rng = np.random.default_rng(seed)
    k = 5
    rec = Recorder()
    mixer = odm.OnlineMixer(_names(k), rec, update_every=3)
    to = _FORMS[form]
    seen_samples = 0
    for step in range(4):
        batches = _random_batches(rng, k, 3, weighted=weighted, nonfinite=step == 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for ids, losses, w in batches:
                loss = torch.from_numpy(losses) if path == "device" else to(losses)
                mixer.observe(to(ids), loss, weight=None if w is None else to(w))
                mixer.step()
        total, weight, samples = _reference_sums(batches, k)
        stats = rec.seen[step]
        np.testing.assert_allclose(stats.loss_sum, total, rtol=1e-6 if "float32" in form else 1e-12)
        np.testing.assert_allclose(stats.count, weight, rtol=1e-12)
        assert stats.step == step + 1
        seen_samples += int(samples.sum())
        assert stats.num_samples == seen_samples


def test_a_scalar_loss_counts_once_per_sample_of_its_one_domain_batch(path):
    rec = Recorder()
    mixer = odm.OnlineMixer(_names(3), rec)
    mixer.observe(torch.tensor([2, 2, 2, 2]), torch.tensor(1.5))
    mixer.observe(1, 0.5)  # one id and a number: a one-sample batch
    mixer.step()
    np.testing.assert_array_equal(rec.seen[0].loss_sum, [0.0, 0.5, 6.0])
    np.testing.assert_array_equal(rec.seen[0].count, [0.0, 1.0, 4.0])


def test_a_scalar_loss_of_a_mixed_batch_is_refused():
    mixer = odm.OnlineMixer(_names(3))
    with pytest.raises(ValueError, match="scalar loss needs a batch of one domain"):
        mixer.observe(torch.tensor([0, 1]), torch.tensor(1.0))
    with pytest.raises(ValueError, match="scalar loss needs the domain id"):
        mixer.observe([], 1.0)


def test_one_domain_id_applies_to_every_per_sample_loss(path):
    rec = Recorder()
    mixer = odm.OnlineMixer(_names(2), rec)
    mixer.observe(1, torch.tensor([1.0, 2.0, 3.0]))
    mixer.step()
    np.testing.assert_array_equal(rec.seen[0].count, [0.0, 3.0])
    np.testing.assert_array_equal(rec.seen[0].loss_sum, [0.0, 6.0])


@pytest.mark.parametrize(
    ("domain", "loss", "kwargs", "error", "match"),
    [
        ([0, 3], [1.0, 1.0], {}, ValueError, r"domain ids must be in \[0, 2\] for 3 domains, got ids in \[0, 3\]"),
        ([-1, 0], [1.0, 1.0], {}, ValueError, r"must be in \[0, 2\]"),
        (torch.tensor([0.0, 1.0]), [1.0, 1.0], {}, TypeError, "domain ids must be integers"),
        (torch.tensor([True, False]), [1.0, 1.0], {}, TypeError, "domain ids must be integers"),
        (np.array([0.5]), [1.0], {}, TypeError, "domain ids must be integers"),
        ([0, 1, 2], [1.0, 1.0], {}, ValueError, "`domain` has 3 ids but `loss` has 2 values"),
        ([0, 1], [1.0, 1.0], {"weight": [1.0]}, None, None),  # one weight for all: fine
        ([0, 1], [1.0, 1.0], {"weight": [1.0, 2.0, 3.0]}, ValueError, "`weight` has 3 values but the batch has 2"),
        ([0, 1], [1.0, 1.0], {"weight": [1.0, -2.0]}, ValueError, "`weight` must be finite and non-negative"),
        ([0, 1], [1.0, 1.0], {"weight": [1.0, np.nan]}, ValueError, "`weight` must be finite and non-negative"),
        ({"mix_step": 0}, [1.0], {}, ValueError, "needs a 'domain' entry"),
    ],
)
def test_bad_observations_are_refused_at_the_door(path, domain, loss, kwargs, error, match):
    mixer = odm.OnlineMixer(_names(3))
    loss = torch.tensor(loss) if path == "device" else loss
    if error is None:
        mixer.observe(domain, loss, **kwargs)
        return
    with pytest.raises(error, match=match):
        mixer.observe(domain, loss, **kwargs)


def test_accelerator_ids_and_weights_out_of_range_are_reported_at_the_next_step(monkeypatch):
    monkeypatch.setattr(odm.feedback, "_CPU_ON_HOST", False)
    rec = Recorder()
    mixer = odm.OnlineMixer(_names(3), rec)
    mixer.observe(torch.tensor([0, 7, 1]), torch.tensor([1.0, 2.0, 3.0]))
    mixer.observe(torch.tensor([0, 1]), torch.tensor([1.0, 2.0]), weight=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match=r"1 domain id\(s\) outside \[0, 2\] and 1 negative or non-finite weight"):
        mixer.step()
    assert rec.seen == []
    # The bad step is dropped; the mixer keeps working.
    mixer.observe(torch.tensor([0, 1]), torch.tensor([1.0, 2.0]))
    mixer.step()
    np.testing.assert_array_equal(rec.seen[0].count, [1.0, 1.0, 0.0])


def test_constructor_arguments_are_checked():
    with pytest.raises(ValueError, match=r"`delay` must be an integer >= 0, got -1"):
        odm.OnlineMixer(_names(2), delay=-1)
    with pytest.raises(ValueError, match="`update_every` must be an integer >= 1, got 0"):
        odm.OnlineMixer(_names(2), update_every=0)
    with pytest.raises(ValueError, match="duplicate"):
        odm.OnlineMixer(["a", "a"])
    with pytest.raises(TypeError, match="sequence of domain names"):
        odm.OnlineMixer("ab")
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        odm.OnlineMixer(_names(2), "nope")


def test_importance_weights_use_the_proportions_each_batch_was_drawn_under():
    rec = Recorder(inner=odm.policies.Uniform())
    mixer = odm.OnlineMixer(_names(2), rec, delay=2, update_every=2)
    assert mixer.set_proportions([0.8, 0.2]) == 2  # applies from batch 2 (delay 2)
    # Batch 1 was drawn under the initial row, batch 2 under the override: 1 sample vs 3 samples.
    mixer.observe({"domain": torch.tensor([0]), "mix_step": 1}, torch.tensor([1.0]))
    mixer.step()
    mixer.observe({"domain": torch.tensor([0, 1, 1]), "mix_step": torch.tensor(2)}, torch.tensor([1.0, 1.0, 1.0]))
    mixer.step()
    expected = (1 * np.array([0.5, 0.5]) + 3 * np.array([0.8, 0.2])) / 4
    np.testing.assert_allclose(rec.seen[0].proportions, expected, rtol=1e-15)
    # Newer proportions published meanwhile do not change what the old batches were drawn under.
    mixer.set_proportions([0.1, 0.9])
    for _ in range(2):
        mixer.observe({"domain": torch.tensor([1]), "mix_step": 2}, torch.tensor([1.0]))
        mixer.step()
    np.testing.assert_allclose(rec.seen[1].proportions, [0.8, 0.2], rtol=1e-15)


def test_without_a_batch_index_the_newest_proportions_are_the_ones_drawn_under():
    rec = Recorder(inner=odm.policies.Fixed([1.0, 3.0]))
    mixer = odm.OnlineMixer(_names(2), rec)
    mixer.observe(mixer.sample(8), np.ones(8))
    mixer.step()
    np.testing.assert_allclose(rec.seen[0].proportions, [0.25, 0.75])


def test_update_every_n_steps_feeds_the_policy_the_sums_of_those_steps():
    rec = Recorder()
    mixer = odm.OnlineMixer(_names(2), rec, update_every=3)
    published = []
    for t in range(9):
        mixer.observe([t % 2], [float(t * t)])
        mixer.step()
        published.append(mixer.proportions)
    assert [s.step for s in rec.seen] == [1, 2, 3]
    np.testing.assert_array_equal(rec.seen[0].loss_sum, [0.0 + 4.0, 1.0])
    np.testing.assert_array_equal(rec.seen[1].loss_sum, [16.0, 9.0 + 25.0])
    np.testing.assert_array_equal(rec.seen[2].count, [2.0, 1.0])
    # Proportions move only after the update steps 3, 6 and 9, and there they do move.
    changed = [t for t in range(1, 9) if not np.array_equal(published[t], published[t - 1])]
    assert changed == [2, 5, 8]


def test_non_finite_losses_warn_once_per_domain_and_never_reach_the_policy(path):
    rec = Recorder()
    mixer = odm.OnlineMixer(_names(3), rec)
    mixer.observe(torch.tensor([0, 1]), torch.tensor([1.0, 2.0]))
    mixer.step()
    before_p, before_state = mixer.proportions, mixer.policy.state_dict()
    with pytest.warns(RuntimeWarning, match=r"skipped 2 non-finite loss value\(s\) of domain 'd2'"):
        mixer.observe(torch.tensor([2, 2]), torch.tensor([float("nan"), float("inf")]))
        mixer.step()
    # Only non-finite values: no update at all, the policy's state is untouched.
    assert len(rec.seen) == 1
    np.testing.assert_array_equal(mixer.proportions, before_p)
    np.testing.assert_array_equal(mixer.policy.state_dict()["state"]["inner"]["state"]["ema"],
                                  before_state["state"]["inner"]["state"]["ema"])  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time for d2: no warning
        mixer.observe(torch.tensor([2, 0]), torch.tensor([float("nan"), 4.0]))
        mixer.step()
    assert np.isfinite(rec.seen[-1].loss_sum).all()
    np.testing.assert_array_equal(rec.seen[-1].count, [1.0, 0.0, 0.0])


def test_token_weights_give_a_token_weighted_mean_and_sample_counts_stay_samples(path):
    rec = Recorder()
    mixer = odm.OnlineMixer(_names(2), rec)
    mixer.observe(torch.tensor([0, 0, 1]), torch.tensor([1.0, 3.0, 2.0]), weight=torch.tensor([100.0, 300.0, 7.0]))
    mixer.step()
    np.testing.assert_allclose(rec.seen[0].mean_loss, [(100 + 900) / 400, 2.0])
    assert rec.seen[0].num_samples == 3


def test_wants_eval_asks_before_exactly_the_update_steps_the_policy_wants_evaluated():
    rec = Recorder(wants=lambda t: t % 2 == 0, requires=frozenset({TRAIN_LOSS, EVAL_LOSS}))
    mixer = odm.OnlineMixer(_names(2), rec, update_every=2)
    asked = []
    for _ in range(8):
        asked.append(mixer.wants_eval())
        mixer.observe([0], [1.0])
        mixer.step()
    # Updates happen after steps 2, 4, 6, 8 (indices 1, 3, 5, 7); the policy wants updates 2 and 4 evaluated.
    assert asked == [False, False, False, True, False, False, False, True]


def test_held_out_losses_reach_the_next_update_as_means_with_nan_for_unevaluated_domains(path):
    rec = Recorder()
    mixer = odm.OnlineMixer(_names(3), rec)
    mixer.observe([0], [1.0])
    mixer.observe_eval(torch.tensor([4.0, 0.0, 3.0]), torch.tensor([2.0, 0.0, 1.0]))
    mixer.observe_eval(np.array([2.0, 0.0, 0.0]), [2.0, 0.0, 0.0])  # a second chunk adds up
    mixer.step()
    np.testing.assert_array_equal(rec.seen[0].eval_loss, [1.5, np.nan, 3.0])
    mixer.observe([0], [1.0])
    mixer.step()
    assert rec.seen[1].eval_loss is None


def test_an_eval_alone_updates_a_policy_that_requires_evals_and_nothing_else():
    needs = Recorder(requires=frozenset({EVAL_LOSS}))
    mixer = odm.OnlineMixer(_names(2), needs)
    mixer.observe_eval([1.0, 2.0], [1.0, 1.0])
    mixer.step()
    assert len(needs.seen) == 1 and needs.seen[0].count.sum() == 0
    np.testing.assert_array_equal(needs.seen[0].eval_loss, [1.0, 2.0])
    train_only = Recorder()
    mixer = odm.OnlineMixer(_names(2), train_only)
    mixer.observe_eval([1.0, 2.0], [1.0, 1.0])
    mixer.step()
    assert train_only.seen == []


def test_bad_held_out_statistics_are_refused():
    mixer = odm.OnlineMixer(_names(3))
    with pytest.raises(ValueError, match=r"`loss_sum` must have shape \(3,\)"):
        mixer.observe_eval([1.0, 2.0], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"`count` must have shape \(3,\)"):
        mixer.observe_eval(torch.zeros(3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="`count` must be finite and non-negative"):
        mixer.observe_eval([1.0, 2.0, 3.0], [1.0, -1.0, 1.0])


def test_a_non_finite_held_out_sum_becomes_nan_with_a_warning():
    rec = Recorder()
    mixer = odm.OnlineMixer(_names(2), rec)
    mixer.observe([0], [1.0])
    mixer.observe_eval([float("inf"), 2.0], [1.0, 1.0])
    with pytest.warns(RuntimeWarning, match="non-finite held-out"):
        mixer.step()
    np.testing.assert_array_equal(rec.seen[0].eval_loss, [np.nan, 2.0])


def test_a_manual_override_holds_until_released_while_the_policy_keeps_learning():
    rec = Recorder()
    mixer = odm.OnlineMixer(_names(2), rec)
    mixer.set_proportions([0.9, 0.1])
    for _ in range(5):
        mixer.observe([0, 1], [0.1, 5.0])  # ChaseLoss wants domain 1
        mixer.step()
        np.testing.assert_allclose(mixer.proportions, [0.9, 0.1])
    assert len(rec.seen) == 5 and rec.proportions[1] > 0.9
    mixer.release()
    np.testing.assert_array_equal(mixer.proportions, rec.proportions)


def test_history_records_each_change_and_replays_with_the_publish_steps():
    rec = Recorder()
    mixer = odm.OnlineMixer(_names(2), rec)
    for t in range(3):
        mixer.observe([0, 1], [1.0, 2.0 + t])
        mixer.step()
    exported = mixer.export_schedule()
    assert [s for s, _ in exported] == [0, 1, 2, 3]
    assert exported[-1][1] == mixer.proportions.tolist()
    static = odm.OnlineMixer(_names(2), "uniform")
    for _ in range(3):
        static.observe([0], [1.0])
        static.step()
    assert static.export_schedule() == [(0, [0.5, 0.5])], "unchanged proportions are not published again"


def test_history_every_thins_the_policys_publishes_but_keeps_overrides_and_the_live_proportions():
    def run(every: int | None) -> odm.OnlineMixer:
        mixer = odm.OnlineMixer(_names(2), Recorder(), history_every=every)
        for t in range(10):
            if t == 4:
                mixer.set_proportions([0.7, 0.3])
            if t == 6:
                mixer.release()
            mixer.observe([0, 1], [1.0, 2.0 + t])
            mixer.step()
        return mixer

    full, thin, none = run(1), run(3), run(None)
    # publishing (what the data pipeline sees) does not depend on how much history is kept
    for other in (thin, none):
        assert other.schedule.state_dict() == full.schedule.state_dict()
        np.testing.assert_array_equal(other.proportions, full.proportions)
    steps = [s for s, _ in full.history]
    # every change: the policy's at steps 1-4, the override (also at 4, held through 6), the release at 6, ...
    assert steps == [0, 1, 2, 3, 4, 4, 6, 7, 8, 9, 10]
    kept = {s: p.tolist() for s, p in full.history}  # the later entry of a step wins
    # policy updates 3, 6, 9 (steps 3, 9 and, during the override, none) plus the override and the release
    assert [s for s, _ in thin.history] == [0, 3, 4, 6, 9]
    assert all(p.tolist() == kept[s] for s, p in thin.history)
    assert [s for s, _ in none.history] == [0, 4, 6]
    assert thin.state_dict()["history"] == thin.export_schedule()
    with pytest.raises(ValueError, match=r"`history_every` must be an integer >= 1 or None, got 0"):
        odm.OnlineMixer(_names(2), history_every=0)


def test_sample_draws_the_proportions_and_exact_rows_give_exact_counts():
    mixer = odm.OnlineMixer(_names(3), odm.policies.Fixed([0.2, 0.3, 0.5]), seed=1)
    freq = np.bincount(mixer.sample(20_000), minlength=3) / 20_000
    np.testing.assert_allclose(freq, [0.2, 0.3, 0.5], atol=0.015)
    exact = odm.OnlineMixer(_names(3), Recorder(inner=odm.policies.Fixed([0.2, 0.3, 0.5]), exact=True))
    exact.observe([0], [1.0])
    exact.step()  # the policy's rows are now published as exact-count rows
    assert exact.schedule.latest().mode == odm.schedule.MODE_EXACT
    for _ in range(5):
        np.testing.assert_array_equal(np.bincount(exact.sample(10), minlength=3), [2, 3, 5])
    with pytest.raises(ValueError, match=r"`n` must be an integer >= 0, got -1"):
        mixer.sample(-1)


def test_the_mixer_state_round_trip_continues_the_same_trajectory(assert_resumes_identically):
    def run(mixer: odm.OnlineMixer, n: int) -> list:
        out = []
        for _ in range(n):
            t = mixer.num_steps
            ids = mixer.sample(16)
            mixer.observe(ids, np.sin(ids + 0.1 * t) + 2.0)
            mixer.step()
            out.append(mixer.proportions.tobytes())
        return out

    assert_resumes_identically(lambda: odm.OnlineMixer(_names(4), ChaseLoss(), seed=3), run, before=7, after=9)


def _exp3_run(mixer: odm.OnlineMixer, n: int) -> list:
    out = []
    for _ in range(n):
        t = mixer.num_steps
        ids = mixer.sample(16)
        mixer.observe(torch.from_numpy(ids), torch.from_numpy(np.sin(ids + 0.1 * t) + 2.0), mix_step=t)
        mixer.step()
        out.append(mixer.proportions.tobytes())
    return out


@pytest.mark.parametrize("path", ["host", "device"])
@pytest.mark.parametrize("before", [9, 10, 11])
def test_a_checkpoint_between_updates_keeps_the_statistics_observed_since_the_last_one(
    assert_resumes_identically, monkeypatch, path, before
):
    if path == "device":  # the torch accumulator CUDA losses take, on CPU tensors
        monkeypatch.setattr(odm.feedback, "_CPU_ON_HOST", False)

    def make() -> odm.OnlineMixer:
        return odm.OnlineMixer(_names(4), "exp3", update_every=4, seed=3)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is dropped, so nothing is warned about
        assert_resumes_identically(make, _exp3_run, before=before, after=9)
    # and the check can fail: without the pending statistics the next update differs
    whole = _exp3_run(make(), 20)
    first = make()
    _exp3_run(first, 10)
    state = first.state_dict()
    assert state["pending"] is not None
    second = make()
    second.load_state_dict(state | {"pending": None})
    assert _exp3_run(second, 10) != whole[10:]
    assert first.state_dict() == state, "state_dict() changes nothing"


def test_statistics_observed_after_the_last_step_are_not_saved_because_their_batches_are_replayed():
    """The cut: a checkpoint holds what was stepped on; a batch observed but not stepped on comes again."""

    def make() -> odm.OnlineMixer:
        return odm.OnlineMixer(_names(3), ChaseLoss(), update_every=2)

    whole, first = make(), make()
    for mixer in (whole, first):
        _exp3_run(mixer, 3)  # one step into the next update's statistics
        mixer.observe([0, 1, 2, 2], [1.0, 2.0, 5.0, 6.0], mix_step=3)
    state = first.state_dict()
    assert state["pending"] is not None and state["cut_batch"] == 2
    second = make()
    second.load_state_dict(state)
    second.observe([0, 1, 2, 2], [1.0, 2.0, 5.0, 6.0], mix_step=3)  # the replayed batch 3
    for mixer in (whole, second):
        mixer.step()
    assert whole.proportions.tobytes() == second.proportions.tobytes()
    with pytest.raises(ValueError, match=r"`mixer.pending` must be a list of 25 numbers"):
        make().load_state_dict(state | {"pending": [0.0] * 3})


def test_a_checkpoint_from_other_domains_is_refused_with_the_difference():
    state = odm.OnlineMixer(["a", "b"], ChaseLoss()).state_dict()
    with pytest.raises(ValueError, match=r"the checkpoint has \['b'\] which this run lacks"):
        odm.OnlineMixer(["a", "c"], ChaseLoss()).load_state_dict(state)


class _ClipFloor:
    """A hand-made constraints object: ``max(p, 0.1)`` renormalised (not a projection; enough to see wiring)."""

    def __init__(self) -> None:
        self.calls = 0

    def project(self, p: np.ndarray) -> np.ndarray:
        self.calls += 1
        q = np.maximum(p, 0.1)
        return q / q.sum()


def test_every_published_vector_goes_through_the_constraints_object():
    rule = _ClipFloor()
    mixer = odm.OnlineMixer(_names(3), odm.policies.Fixed([0.9, 0.1, 0.0]), constraints=rule)
    assert mixer.proportions[2] > 0.08 and mixer.history[0][1][2] > 0.08
    mixer.set_proportions([0.0, 0.0, 1.0])
    assert mixer.proportions.min() > 0.08
    learned = odm.OnlineMixer(_names(3), ChaseLoss(), constraints=_ClipFloor())
    for _ in range(30):
        learned.observe([0, 1, 2], [20.0, 0.0, 0.0])
        learned.step()
        assert learned.proportions.min() > 0.08
    with pytest.raises(TypeError, match="either `constraints` or"):
        odm.OnlineMixer(_names(3), constraints=rule, floors=0.1)
    with pytest.raises(TypeError, match=r"must have a \.project\(p\) method"):
        odm.OnlineMixer(_names(3), constraints=object())


def test_floors_ceilings_and_frozen_domains_hold_for_every_update():
    mixer = odm.OnlineMixer(_names(4), ChaseLoss(), floors={"d0": 0.05, "d1": 0.05}, ceilings=0.6, frozen={"d3": 0.2})
    rng = np.random.default_rng(0)
    for _ in range(200):
        ids = mixer.sample(16)
        mixer.observe(ids, rng.gamma(1.0, 1.0, 16) + 5.0 * (ids == 2))
        mixer.step()
        p = mixer.proportions
        assert p[0] >= 0.05 - 1e-12 and p[1] >= 0.05 - 1e-12
        assert p.max() <= 0.6 + 1e-12
        assert p[3] == pytest.approx(0.2, abs=1e-12)
        assert p.sum() == pytest.approx(1.0, abs=1e-12)
    assert p[2] == pytest.approx(0.6), "the policy chases d2's loss up to its ceiling"
    with pytest.raises(ValueError, match=r"unknown domain\(s\) \['zz'\]"):
        odm.OnlineMixer(_names(2), floors={"zz": 0.1})
    with pytest.raises(ValueError, match="infeasible constraints"):
        odm.OnlineMixer(_names(2), floors=0.6)


def test_frozen_domain_names_hold_the_initial_proportions_and_overrides_are_projected_too():
    mixer = odm.OnlineMixer(_names(3), odm.policies.Fixed([0.5, 0.3, 0.2]), frozen=["d2"])
    assert mixer.set_proportions([1.0, 0.0, 0.0]) == 0
    np.testing.assert_allclose(mixer.proportions, [0.8, 0.0, 0.2])
    with pytest.raises(ValueError, match=r"`frozen` names unknown domains \['x'\]"):
        odm.OnlineMixer(_names(3), frozen="x")


@pytest.mark.parametrize("name", default_policy_names())
def test_every_policy_that_builds_from_its_name_runs_through_the_mixer(name):
    mixer = odm.OnlineMixer(_names(5), name, seed=0)
    rng = np.random.default_rng(0)
    for _ in range(60):
        if mixer.wants_eval():
            mixer.observe_eval(rng.gamma(2.0, 1.0, 5) * 10, np.full(5, 10.0))
        ids = mixer.sample(16)
        mixer.observe(ids, rng.gamma(2.0, 1.0, 16) + ids)
        mixer.step()
        p = mixer.proportions
        assert np.all(np.isfinite(p)) and np.all(p >= 0) and p.sum() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("update_every", [1, 3])
def test_an_exported_schedule_replays_the_same_proportions_through_scheduled(update_every):
    learned = odm.OnlineMixer(_names(3), ChaseLoss(), update_every=update_every, seed=2)
    rng = np.random.default_rng(2)
    original = []
    for _ in range(30):
        ids = learned.sample(8)
        learned.observe(ids, rng.gamma(2.0, 1.0, 8) + ids)
        learned.step()
        original.append(learned.proportions)
    policy = odm.policies.Scheduled(learned.export_schedule(), steps_per_update=update_every)
    replay = odm.OnlineMixer(_names(3), policy, update_every=update_every)
    for t in range(30):
        replay.observe([0], [1.0])
        replay.step()
        np.testing.assert_array_equal(replay.proportions, original[t])


@pytest.mark.parametrize("loss_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("id_dtype", [torch.uint8, torch.int32, torch.int64])
def test_any_float_loss_and_integer_id_dtype_is_accepted(path, loss_dtype, id_dtype):
    rec = Recorder()
    mixer = odm.OnlineMixer(_names(3), rec)
    mixer.observe(torch.tensor([0, 2, 2], dtype=id_dtype), torch.tensor([1.0, 2.0, 4.0], dtype=loss_dtype))
    mixer.step()
    np.testing.assert_array_equal(rec.seen[0].loss_sum, [1.0, 0.0, 6.0])
    np.testing.assert_array_equal(rec.seen[0].count, [1.0, 0.0, 2.0])


def test_num_batches_counts_the_observe_calls_behind_each_update_and_not_the_evaluations():
    rec = Recorder()
    mixer = odm.OnlineMixer(_names(2), rec, update_every=2)
    for b in range(3):
        mixer.observe([0, 1], [1.0, 2.0], mix_step=b)
    mixer.step()
    mixer.observe([0], [1.0], mix_step=3)
    mixer.observe_eval([1.0, 1.0], [1.0, 1.0])
    mixer.step()
    mixer.observe([1], [1.0], mix_step=4)
    mixer.step()
    mixer.observe([1], [1.0], mix_step=5)
    mixer.step()
    assert [s.num_batches for s in rec.seen] == [4, 2]


@pytest.mark.parametrize(
    ("delay", "update_every", "updates"), [(0, 1, 0), (6, 1, 6), (6, 4, 2), (5, 4, 2), (4, 4, 1), (8, 4, 2), (0, 4, 0)]
)
def test_the_policy_is_told_the_publish_delay_in_updates(delay, update_every, updates):
    told = []

    class Told(ChaseLoss):
        def set_publish_delay(self, delay: int) -> None:
            told.append(delay)

    odm.OnlineMixer(_names(2), Told(), delay=delay, update_every=update_every)
    assert told == [updates]
