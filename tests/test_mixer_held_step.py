"""The mixer's usual step against its general path.

When a step's only feedback is one unweighted, all-finite ``observe()`` on the host, in one process,
``OnlineMixer.step`` uses the sums and counts that observe() held (``DomainFeedback.held``) instead of packing,
reducing and unpacking the accumulator: with an update due and nothing pending it hands them to the policy as they
are, otherwise it adds them to the statistics pending since the last update. Every other step takes the general
path. The policy must be fed the same statistics either way: loss sums, counts and every counter bit for bit, the
drawn-under proportions up to rounding (the held step hands over the row itself, the general path
``n·p / Σ(n·p)``).

The reference mixer passes ``weight=1`` with every observe(): the same sums and counts, never held.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import Recorder

import odm
from odm.policies import default_policy_names, get_policy


def _script(rng: np.random.Generator, k: int, steps: int, *, packed: bool = False) -> list[list[tuple]]:
    """Per step, the calls before ``step()``: ``("obs", ids, losses)`` and ``("eval", sums, counts)``.
    ``packed``: ids and losses are ``[B, T]`` token rows with padding (id -1) at the end of some rows."""

    def obs(n: int | None = None) -> tuple:
        n = int(rng.integers(1, 24)) if n is None else n
        if not packed:
            return ("obs", rng.integers(0, k, n), rng.gamma(2.0, 1.5, n).astype(np.float32))
        ids = rng.integers(0, k, (n, 8))
        for row, length in enumerate(rng.integers(0, 9, n)):
            ids[row, length:] = -1
        return ("obs", ids, rng.gamma(2.0, 1.5, (n, 8)).astype(np.float32))

    def ev() -> tuple:
        counts = rng.integers(0, 5, k).astype(np.float64)
        return ("eval", counts * rng.uniform(1.0, 3.0, k), counts)

    patterns = {
        "one": lambda: [obs()],  # the held step
        "two": lambda: [obs(), obs()],  # gradient accumulation: the first observe() is folded into the rows
        "one, eval": lambda: [obs(), ev()],  # an evaluation after a held observe() folds it too
        "eval, one": lambda: [ev(), obs()],  # nothing held after another call
        "empty": lambda: [obs(0)],  # no samples: no update on either path
    }
    names = list(patterns)
    chosen = rng.choice(names, size=steps, p=[0.6, 0.1, 0.1, 0.1, 0.1])
    return [patterns[name]() for name in chosen]


def _run(policy: str, script: list[list[tuple]], k: int, *, held: bool, delay: int = 0, update_every: int = 1):
    inner = get_policy(policy)
    rec = Recorder(inner=inner, requires=inner.requires, wants=inner.wants_eval)
    mixer = odm.OnlineMixer([f"d{i}" for i in range(k)], rec, delay=delay, update_every=update_every, seed=3)
    published, batch, held_steps, fast, pend = [], 0, 0, [], []
    # Spies: count the held steps that update the policy at once, and those added to the pending statistics.
    update_held, pend_held = mixer._update_held, mixer._pend_held
    mixer._update_held = lambda *a: fast.append(1) or update_held(*a)
    mixer._pend_held = lambda *a, **kw: pend.append(1) or pend_held(*a, **kw)
    for calls in script:
        for call in calls:
            if call[0] == "obs":
                _, ids, losses = call
                weight = None if held else np.ones(ids.shape)
                key = "token_domain" if ids.ndim > 1 else "domain"
                mixer.observe({key: torch.from_numpy(ids), "mix_step": batch}, torch.from_numpy(losses), weight=weight)
                batch += 1
            else:
                mixer.observe_eval(call[1], call[2])
        is_held = mixer._feedback.held is not None
        assert not is_held or held  # the reference never holds
        held_steps += is_held
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # (held-out policies warn about missing evals)
            mixer.step()
        published.append(mixer.proportions)
    assert len(fast) + len(pend) == held_steps  # every held step took one of the two
    return rec.seen, published, held_steps, len(fast)


@pytest.mark.parametrize("policy", default_policy_names())
@pytest.mark.parametrize(("delay", "update_every"), [(0, 1), (2, 1), (1, 3)])
def test_the_held_step_feeds_every_policy_what_the_general_path_feeds_it(policy, delay, update_every):
    rng = np.random.default_rng([delay, update_every, len(policy)])
    k = int(rng.integers(2, 10))
    script = _script(rng, k, 60)
    seen, published, held_steps, fast = _run(policy, script, k, held=True, delay=delay, update_every=update_every)
    ref_seen, ref_published, _, ref_fast = _run(policy, script, k, held=False, delay=delay, update_every=update_every)
    assert held_steps >= 20 and ref_fast == 0
    # Both held paths ran (else this compares the general path with itself): with update_every = 1 most steps
    # update the policy at once (an empty batch is added to the pending statistics and updates nothing); with
    # update_every > 1 every held observation is added to the statistics pending since the last update.
    assert (fast >= 15) if update_every == 1 else (fast == 0)
    _assert_same_statistics(seen, ref_seen)
    np.testing.assert_allclose(published, ref_published, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("policy", ["exp3", "odm", "ucb1"])
def test_a_packed_batch_with_padding_is_held_and_credited_per_token_as_on_the_general_path(policy):
    rng = np.random.default_rng(len(policy))
    script = _script(rng, 4, 40, packed=True)
    seen, published, held_steps, fast = _run(policy, script, 4, held=True)
    ref_seen, ref_published, _, _ = _run(policy, script, 4, held=False)
    assert fast >= 15 and held_steps >= 15
    _assert_same_statistics(seen, ref_seen)
    np.testing.assert_allclose(published, ref_published, rtol=1e-9, atol=1e-15)


def _assert_same_statistics(seen: list, ref_seen: list) -> None:
    """Loss sums, counts and counters bit for bit; the drawn-under proportions up to rounding."""
    assert len(seen) == len(ref_seen) > 0
    for got, want in zip(seen, ref_seen):
        np.testing.assert_array_equal(got.loss_sum, want.loss_sum)
        np.testing.assert_array_equal(got.count, want.count)
        assert (got.step, got.num_samples, got.num_batches) == (want.step, want.num_samples, want.num_batches)
        if want.eval_loss is None:
            assert got.eval_loss is None
        else:
            np.testing.assert_array_equal(got.eval_loss, want.eval_loss)
        np.testing.assert_allclose(got.proportions, want.proportions, rtol=1e-14, atol=0)


def test_the_held_step_weighs_a_batch_with_the_row_it_was_drawn_under_not_the_newest():
    rec = Recorder(inner=odm.policies.EXP3(0.3))
    mixer = odm.OnlineMixer(["a", "b", "c"], rec, delay=2)  # a row published after batch b applies from b + 3
    rng = np.random.default_rng(0)
    older = 0
    for b in range(12):
        ids = torch.from_numpy(rng.integers(0, 3, 16))
        mixer.observe({"domain": ids, "mix_step": b}, torch.rand(16, dtype=torch.float64))
        drawn_under = mixer.schedule.lookup(b).proportions
        newest = mixer.proportions
        assert mixer._feedback.held is not None
        mixer.step()
        np.testing.assert_array_equal(rec.seen[-1].proportions, drawn_under)
        older += not np.array_equal(drawn_under, newest)
    assert older >= 8  # most batches were drawn under a row older than the newest


def test_the_proportions_a_held_step_hands_over_cannot_be_written_through():
    rec = Recorder(inner=odm.policies.EXP3())
    mixer = odm.OnlineMixer(["a", "b"], rec)
    for b in range(3):
        mixer.observe({"domain": torch.tensor([0, 1, 1]), "mix_step": b}, torch.tensor([1.0, 2.0, 3.0]))
        mixer.step()
    # Batch 0 was drawn under the initial row, the others under rows the policy published.
    for b, stats in enumerate(rec.seen):
        np.testing.assert_array_equal(stats.proportions, mixer.schedule.lookup(b).proportions)
        with pytest.raises(ValueError, match="read-only"):
            stats.proportions[0] = 0.0  # a policy bug must not change what the mixer believes it published
    resumed_rec = Recorder(inner=odm.policies.EXP3())
    resumed = odm.OnlineMixer(["a", "b"], resumed_rec)
    resumed.load_state_dict(mixer.state_dict())  # the newest row now comes from the checkpoint
    resumed.observe({"domain": torch.tensor([0, 1]), "mix_step": 3}, torch.tensor([1.0, 2.0]))
    resumed.step()
    with pytest.raises(ValueError, match="read-only"):
        resumed_rec.seen[-1].proportions[0] = 0.0


def test_a_held_step_whose_policy_update_raises_changes_nothing_and_can_be_retried():
    class Flaky(odm.policies.EXP3):
        fail = False

        def update(self, stats):
            if self.fail:
                raise RuntimeError("a policy bug")
            super().update(stats)

    policy = Flaky()
    mixer = odm.OnlineMixer(["a", "b"], policy, update_every=2)
    ref = odm.OnlineMixer(["a", "b"], "exp3", update_every=2)
    first, second = ({"domain": torch.tensor(ids), "mix_step": b} for b, ids in enumerate([[0, 1, 1], [0, 0, 1]]))
    for m in (mixer, ref):
        m.observe(first, torch.tensor([1.0, 2.0, 3.0]))
        m.step()  # statistics pending, no update yet
        m.observe(second, torch.tensor([4.0, 5.0, 6.0]))
    before = mixer.state_dict()
    policy.fail = True
    with pytest.raises(RuntimeError, match="a policy bug"):
        mixer.step()
    assert mixer.state_dict() == before  # the pending statistics were not added to in place
    policy.fail = False
    mixer.step()  # the same observation, retried
    ref.step()
    assert mixer.num_updates == ref.num_updates == 1
    np.testing.assert_array_equal(mixer.proportions, ref.proportions)
