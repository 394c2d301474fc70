"""Changing the domain set across a resume: common domains keep their policy state, a new one starts fresh."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import roundtrip

from odm import OnlineMixer
from odm.policies import get_policy
from odm.policies.base import from_plain
from odm.remap import remap_mixer_state, remap_proportions

OLD = ["a", "b", "c"]
NEW = ["c", "a", "d"]  # b retired, d added, order changed


def _train(policy, steps: int = 40, domains: list[str] = OLD) -> OnlineMixer:
    mixer = OnlineMixer(domains, policy=policy)
    rng = np.random.default_rng(0)
    for t in range(steps):
        ids = mixer.sample(32)
        mixer.observe(ids, rng.random(32) + 0.7 * ids, mix_step=t)
        mixer.step()
    return mixer


def _inner(mixer: OnlineMixer) -> dict:
    return from_plain(mixer.policy.state_dict())["state"]


def _reference(saved, fresh, domain_axes: tuple[int, ...]):
    """Slow reference: element by element, each index along a domain axis mapped by domain *name*."""
    saved, fresh = np.asarray(saved, dtype=np.float64), np.asarray(fresh, dtype=np.float64)
    out = np.empty_like(fresh)
    for idx in np.ndindex(*fresh.shape):
        names = [NEW[idx[ax]] for ax in domain_axes]
        if all(n in OLD for n in names):
            src = list(idx)
            for ax in domain_axes:
                src[ax] = OLD.index(NEW[idx[ax]])
            out[idx] = saved[tuple(src)]
        else:
            out[idx] = fresh[idx]
    return out


# Per-domain entries of each policy's state and their domain axes (written out by hand, not derived).
CASES = {
    "exp3": {"gains": (0,), "smoothed_loss": (0,), "progress": (0,)},
    "exp3s": {"log_weights": (0,), "smoothed_loss": (0,), "progress": (0,)},
    "ucb1": {"means": (0,), "pulls": (0,), "smoothed_loss": (0,), "progress": (0,)},
    "discounted_ucb": {"means": (0,), "pulls": (0,), "sums": (0,), "smoothed_loss": (0,), "progress": (0,)},
    "sliding_window_ucb": {
        "means": (0,),
        "pulls": (0,),
        "sums": (0,),
        "smoothed_loss": (0,),
        "progress": (0,),
        "window_sums": (1,),
        "window_pulls": (1,),
    },
    "odm": {"estimates": (0,)},
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_common_domains_keep_their_policy_state_and_a_new_domain_starts_from_a_fresh_policy(name):
    old = _train(name)
    mixer = OnlineMixer(NEW, policy=name)
    fresh = _inner(mixer)
    mixer.load_state_dict(remap_mixer_state(roundtrip(old.state_dict()), domains=NEW, policy=mixer.policy))
    saved, got = _inner(old), _inner(mixer)
    for key, axes in CASES[name].items():
        np.testing.assert_array_equal(np.asarray(got[key], dtype=np.float64), _reference(saved[key], fresh[key], axes))
    for key in set(got) - set(CASES[name]):  # counters and settings carry over as saved
        assert np.array_equal(np.asarray(got[key]), np.asarray(saved[key])), key


def test_proportions_keep_the_common_domains_ratio_and_give_a_new_domain_its_prior_share():
    old = _train("exp3s")
    p_old = old.proportions
    mixer = OnlineMixer(NEW, policy="exp3s")
    mixer.load_state_dict(remap_mixer_state(old.state_dict(), domains=NEW, policy=mixer.policy))
    p = mixer.proportions
    assert p[2] == pytest.approx(1 / 3)  # d: a fresh EXP3.S over 3 domains starts uniform
    assert p[0] / p[1] == pytest.approx(p_old[2] / p_old[0])  # c : a as before
    assert p.sum() == pytest.approx(1.0)
    # The schedule the data pipeline reads holds the same vector; the history gives d 0 before the resume.
    latest = mixer.schedule.latest()
    np.testing.assert_allclose(getattr(latest, "proportions", latest[-1]), p)
    assert all(row[2] == 0.0 for _, row in mixer.export_schedule())


def test_the_remapped_mixer_keeps_learning_and_the_new_domain_is_drawn():
    old = _train("exp3s")
    mixer = OnlineMixer(NEW, policy="exp3s")
    mixer.load_state_dict(remap_mixer_state(old.state_dict(), domains=NEW, policy=mixer.policy))
    before = mixer.proportions
    rng = np.random.default_rng(1)
    drawn = np.zeros(3)
    for t in range(30):
        ids = mixer.sample(32)
        drawn += np.bincount(ids, minlength=3)
        mixer.observe(ids, rng.random(32) + ids, mix_step=t)
        mixer.step()
    assert drawn[2] > 0 and not np.array_equal(mixer.proportions, before)


def test_a_static_policy_takes_the_new_runs_own_proportions():
    old = _train(get_policy("fixed", proportions=[0.7, 0.2, 0.1]))
    mixer = OnlineMixer(NEW, policy=get_policy("fixed", proportions=[0.1, 0.3, 0.6]))
    mixer.load_state_dict(remap_mixer_state(old.state_dict(), domains=NEW, policy=mixer.policy))
    np.testing.assert_allclose(mixer.proportions, [0.1, 0.3, 0.6])


@pytest.mark.filterwarnings("ignore:odm. Aioli learns from held-out losses")
@pytest.mark.parametrize(("name", "entry"), [("ado", "bin"), ("aioli", "recent")])
def test_a_policy_whose_state_is_not_laid_out_per_domain_is_refused_naming_the_entry(name, entry):
    old = _train(name, steps=60)
    mixer = OnlineMixer(NEW, policy=name)
    with pytest.raises(ValueError, match=f"'{entry}'.*cannot be carried over"):
        remap_mixer_state(old.state_dict(), domains=NEW, policy=mixer.policy)


def test_pending_statistics_and_an_override_are_not_carried():
    old = OnlineMixer(OLD, policy="exp3s", update_every=4)
    old.observe([0, 1], [1.0, 2.0], mix_step=0)
    old.step()
    old.set_proportions([0.5, 0.25, 0.25])
    state = remap_mixer_state(old.state_dict(), domains=NEW, policy=OnlineMixer(NEW, policy="exp3s").policy)
    assert state["pending"] is None and state["override"] is None


def test_no_domain_in_common_is_refused():
    old = _train("exp3s", steps=2)
    with pytest.raises(ValueError, match="none in common"):
        remap_mixer_state(old.state_dict(), domains=["x", "y"], policy=OnlineMixer(["x", "y"]).policy)


def test_remap_proportions_matches_a_hand_computed_case():
    p = remap_proportions([0.5, 0.3, 0.2], OLD, NEW, [0.25, 0.25, 0.5])
    # d takes its prior 0.5; c and a split the other 0.5 as 0.2 : 0.5.
    np.testing.assert_allclose(p, [0.5 * 0.2 / 0.7, 0.5 * 0.5 / 0.7, 0.5])


def test_the_mixer_refuses_another_domain_set_unless_asked_to_remap():
    old = _train("exp3s")
    mixer = OnlineMixer(NEW, policy="exp3s")
    with pytest.raises(ValueError, match="domains='remap'"):
        mixer.load_state_dict(old.state_dict())
    mixer.load_state_dict(old.state_dict(), domains="remap")
    assert mixer.proportions[2] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="domains"):
        mixer.load_state_dict(old.state_dict(), domains="maybe")


def test_a_loader_resumed_on_another_domain_set_keeps_the_common_streams_and_starts_the_new_one():
    from odm import MixtureLoader

    data = {d: [f"{d}{i}" for i in range(50)] for d in ["a", "b", "c", "d"]}

    def loader(domains: list[str]) -> MixtureLoader:
        return MixtureLoader({d: data[d] for d in domains}, batch_size=4, policy="exp3s", seed=1, collate_fn=list)

    first = loader(OLD)
    seen: dict[str, list[str]] = {d: [] for d in data}
    for _, batch in zip(range(12), first):
        for x in batch["data"]:
            seen[x[0]].append(x)
        first.mixer.observe(batch, batch["domain"].double())
        first.mixer.step()
    state = first.state_dict()
    second = loader(NEW)
    with pytest.raises(ValueError, match="domains='remap'"):
        second.load_state_dict(state)
    second.load_state_dict(state, domains="remap")
    after: dict[str, list[str]] = {d: [] for d in data}
    for _, batch in zip(range(30), second):
        for x in batch["data"]:
            after[x[0]].append(x)
    # A common domain continues its pass where it stopped: nothing it read before comes again in this pass.
    for d in ("a", "c"):
        assert seen[d] and after[d]
        assert not set(seen[d]) & set(after[d][: 50 - len(seen[d])])
    assert after["d"] and not after["b"]  # the new domain is read from its start; the retired one never
