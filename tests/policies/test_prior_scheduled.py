"""EntropyPrior (conditional entropy estimator against a counting reference) and Scheduled replay."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from odm import OnlineMixer
from odm.policies import DomainStats, EntropyPrior, Scheduled, get_policy
from odm.policies.prior import conditional_entropy


def reference_entropy(samples: list, order: int) -> float:
    """H(X | previous `order` symbols) by counting tuples with Counters."""
    joint: Counter = Counter()
    context: Counter = Counter()
    for sample in samples:
        symbols = list(sample.encode("utf-8")) if isinstance(sample, str) else list(sample)
        for j in range(order, len(symbols)):
            ctx = tuple(symbols[j - order : j])
            joint[(ctx, symbols[j])] += 1
            context[ctx] += 1
    n = sum(joint.values())
    return -sum(c / n * math.log(c / context[ctx]) for (ctx, _), c in joint.items())


@pytest.mark.parametrize("order", [0, 1, 2])
@pytest.mark.parametrize("seed", range(6))
def test_conditional_entropy_matches_the_counting_reference(seed: int, order: int) -> None:
    rng = np.random.default_rng(seed)
    vocab = int(rng.integers(2, 50))
    samples = [rng.integers(0, vocab, int(rng.integers(0, 80))).tolist() for _ in range(20)]
    assert conditional_entropy(samples, order=order) == pytest.approx(reference_entropy(samples, order), abs=1e-12)


def test_text_is_read_as_utf8_bytes_and_bytes_as_bytes() -> None:
    text = ["über alles", "naïve café", "plain ascii text"]
    assert conditional_entropy(text) == pytest.approx(reference_entropy(text, 1), abs=1e-12)
    assert conditional_entropy([t.encode() for t in text]) == conditional_entropy(text)


def test_proportions_are_proportional_to_the_entropies_of_each_domain() -> None:
    rng = np.random.default_rng(0)
    low = ["ab" * 50, "ba" * 50]  # each byte determines the next: H = 0 bits of surprise beyond the context
    high = [bytes(rng.integers(0, 256, 400, dtype=np.uint8)) for _ in range(5)]
    mid = [rng.integers(0, 4, 400).tolist() for _ in range(5)]
    prior = EntropyPrior({"low": low, "high": high, "mid": mid})
    h = [reference_entropy(d, 1) for d in (low, high, [list(m) for m in mid])]
    np.testing.assert_allclose(prior.entropies, h, atol=1e-12)
    np.testing.assert_allclose(prior.proportions, np.array(h) / sum(h), rtol=1e-12)
    assert prior.proportions[0] == 0.0 and prior.proportions[1] > prior.proportions[2]
    prior.update(DomainStats.from_losses([1.0, 2.0, 3.0], prior.proportions))  # static
    np.testing.assert_allclose(prior.proportions, np.array(h) / sum(h), rtol=1e-12)


def test_precomputed_entropies_are_normalised() -> None:
    np.testing.assert_allclose(EntropyPrior(entropies=[2.0, 6.0]).proportions, [0.25, 0.75])


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((), {}, TypeError, "needs exactly one of `samples`"),
        (([["ab"]],), {"entropies": [1.0]}, TypeError, "needs exactly one"),
        ((["abc", "def"],), {}, TypeError, "one list of samples per domain"),
        (([[[0.5, 1.5]]],), {}, TypeError, "integer token ids"),
        ((), {"entropies": [0.0, 0.0]}, ValueError, "must not be all zero"),
        ((), {"entropies": [1.0, -1.0]}, ValueError, "non-negative"),
        ((), {"entropies": [1.0], "order": -1}, ValueError, "`order` must be an integer >= 0"),
        (([["a"], ["abc"]],), {}, ValueError, "no sample has more than 1 symbols"),
    ],
)
def test_bad_entropy_prior_input_raises_a_clear_error(args: tuple, kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        EntropyPrior(*args, **kwargs)


def test_a_name_alone_cannot_build_the_data_driven_priors() -> None:
    for name in ("entropy", "scheduled"):
        with pytest.raises(TypeError, match="cannot be built from its name alone"):
            get_policy(name)


def test_scheduled_replays_a_trajectory_stepwise_constant() -> None:
    trajectory = [(0, [1, 0, 0]), (3, [0, 1, 0]), (3, [0, 0.5, 0.5]), (7, [0, 0, 1])]
    policy = Scheduled(trajectory)
    np.testing.assert_array_equal(policy.proportions, [1, 0, 0])
    expected = {1: [1, 0, 0], 2: [1, 0, 0], 3: [0, 0.5, 0.5], 6: [0, 0.5, 0.5], 7: [0, 0, 1], 100: [0, 0, 1]}
    for step, p in expected.items():
        policy.update(DomainStats.from_losses([1.0, 1.0, 1.0], policy.proportions, step=step))
        np.testing.assert_array_equal(policy.proportions, p)


def test_scheduled_counts_trajectory_steps_per_update() -> None:
    policy = Scheduled({0: [0.5, 0.5], 4: [0.1, 0.9]}, steps_per_update=4)
    policy.update(DomainStats.from_losses([1.0, 1.0], [0.5, 0.5], step=1))
    np.testing.assert_array_equal(policy.proportions, [0.1, 0.9])


@pytest.mark.parametrize("update_every", [1, 3])
def test_replaying_an_exported_schedule_reproduces_the_original_run(chase_loss: type, update_every: int) -> None:
    rng = np.random.default_rng(0)
    original = OnlineMixer(["a", "b", "c"], policy=chase_loss(), update_every=update_every)
    seen = []
    for _ in range(30):
        domains = rng.integers(0, 3, 8)
        losses = rng.uniform(0, 5, 8)
        original.observe(domains, losses)
        original.step()
        seen.append((domains, losses))
    schedule = original.export_schedule()
    replay = OnlineMixer(["a", "b", "c"], policy=Scheduled(schedule, steps_per_update=update_every),
                         update_every=update_every)  # fmt: skip
    for domains, losses in seen:
        replay.observe(domains, losses)
        replay.step()
    for (s1, p1), (s2, p2) in zip(original.history, replay.history, strict=True):
        assert s1 == s2
        # the schedule renormalises what it stores, which may move the last bit once more
        np.testing.assert_allclose(p1, p2, rtol=1e-15, atol=0)
    # the policy itself replays the exported rows bit for bit
    policy = Scheduled(schedule, steps_per_update=update_every)
    rows = dict(schedule)
    for t in range(1, len(seen) // update_every + 1):
        policy.update(DomainStats.from_losses([1.0, 1.0, 1.0], policy.proportions, step=t))
        latest = max(s for s in rows if s <= t * update_every)
        assert policy.proportions.tolist() == rows[latest]


@pytest.mark.parametrize(
    ("trajectory", "match"),
    [
        ([], "at least one"),
        ([(0, [0.5, 0.5]), (2, [1.0])], "must have one entry per domain"),
        ([(3, [0.5, 0.5]), (2, [0.5, 0.5])], "non-decreasing"),
        ([(-1, [0.5, 0.5])], "non-negative integer"),
        ([(0.5, [0.5, 0.5])], "non-negative integer"),
        ([(0, [0.5, -0.5])], "non-negative"),
        ([(0, [0.5, 0.5], 1)], r"\(step, proportions\) pair"),
    ],
)
def test_bad_trajectories_raise_a_clear_error(trajectory: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Scheduled(trajectory)


def test_a_state_dict_of_another_trajectory_is_refused(assert_resumes_identically) -> None:
    one = Scheduled([(0, [0.5, 0.5]), (5, [0.2, 0.8])])
    with pytest.raises(ValueError, match="another trajectory"):
        Scheduled([(0, [0.5, 0.5])]).load_state_dict(one.state_dict())

    def run(policy: Scheduled, n: int) -> list:
        out = []
        for _ in range(n):
            policy._calls = getattr(policy, "_calls", 0) + 1
            policy.update(DomainStats.from_losses([1.0, 1.0], policy.proportions, step=policy._calls))
            out.append(policy.proportions.tolist())
        return out

    assert_resumes_identically(lambda: Scheduled([(0, [0.5, 0.5]), (5, [0.2, 0.8])]), run, before=0, after=8)
