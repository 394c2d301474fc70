import hashlib
import random
import time

import numpy as np
import pytest
import torch

import odm
from odm.policies import Fixed

START_METHODS = ["fork", "spawn"]


class Jittery(torch.utils.data.Dataset):
    """A map-style dataset whose reads take random time, so worker timing varies run to run."""

    def __init__(self, base: int, n: int, jitter: float = 0.0):
        self.base, self.n, self.jitter = base, n, jitter

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self.jitter:
            time.sleep(random.random() * self.jitter)
        return {"id": self.base + i}


def sources(k=3, n=500, jitter=0.0):
    return {f"d{i}": Jittery(i * 100_000, n, jitter) for i in range(k)}


def fake_loss(batch) -> torch.Tensor:
    """A deterministic per-sample loss that differs by domain (domain 2 is 'hardest')."""
    return (batch["id"] % 7).double() / 7 + batch["domain"].double()


def drive(loader, n):
    """Takes ``n`` batches, feeding fake losses back; returns (mix_step, sample ids, proportions) per batch."""
    out = []
    it = iter(loader)
    for _ in range(n):
        batch = next(it)
        loader.mixer.observe(batch, fake_loss(batch))
        loader.mixer.step()
        out.append((batch["mix_step"], batch["id"].tolist(), loader.mixer.proportions.tolist()))
    return out


@pytest.mark.parametrize("start_method", START_METHODS)
def test_worker_draws_follow_the_proportions(start_method):
    p = np.array([0.6, 0.3, 0.1])
    loader = odm.MixtureLoader(
        sources(), batch_size=50, policy=Fixed(p), num_workers=2, multiprocessing_context=start_method
    )
    counts = np.zeros(3)
    it = iter(loader)
    for b in range(60):
        batch = next(it)
        assert batch["mix_step"] == b, "batches arrive in global batch order"
        assert (batch["id"] // 100_000 == batch["domain"]).all()
        counts += np.bincount(batch["domain"].numpy(), minlength=3)
    chi2 = ((counts - counts.sum() * p) ** 2 / (counts.sum() * p)).sum()
    assert chi2 < 13.82  # chi-square, 2 degrees of freedom, 0.1% level


@pytest.mark.slow
@pytest.mark.parametrize("start_method", START_METHODS)
def test_a_change_reaches_persistent_workers_from_the_promised_batch(start_method):
    loader = odm.MixtureLoader(
        sources(2),
        batch_size=16,
        policy=Fixed([1.0, 0.0]),
        num_workers=2,
        persistent_workers=True,
        multiprocessing_context=start_method,
    )
    for epoch in range(2):  # the second epoch reuses the same (persistent) worker processes
        it = iter(loader)
        first = next(it)
        loader.mixer.observe(first, fake_loss(first))
        switch_at = loader.mixer.set_proportions([0.0, 1.0] if epoch == 0 else [1.0, 0.0])
        assert switch_at == first["mix_step"] + 1 + loader.mixer.delay
        new_domain = 1 if epoch == 0 else 0
        for _ in range(3 * loader.mixer.delay):
            batch = next(it)
            expected = new_domain if batch["mix_step"] >= switch_at else 1 - new_domain
            assert (batch["domain"] == expected).all(), (epoch, batch["mix_step"], switch_at)
        del it


@pytest.mark.slow
def test_same_seed_gives_identical_batches_whatever_the_worker_timing(chase_loss):
    def run():
        random.seed()  # different jitter each run
        loader = odm.MixtureLoader(sources(jitter=0.002), batch_size=8, policy=chase_loss(), num_workers=2, seed=11)
        return drive(loader, 25)

    first, second = run(), run()
    assert first == second
    assert first[-1][2] != first[0][2], "the policy moved, so the draws depended on live proportions"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_resumed_loader_yields_exactly_the_batches_of_an_uninterrupted_run(
    num_workers, chase_loss, assert_resumes_identically
):
    def make():
        return odm.MixtureLoader(sources(n=40), batch_size=8, policy=chase_loss(), num_workers=num_workers, seed=3)

    # 40 samples per domain and 8 per batch: the resume point falls mid-pass and later passes restart.
    assert_resumes_identically(make, drive, before=7, after=12)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_batch_taken_but_not_stepped_on_is_replayed_after_a_resume(num_workers, chase_loss):
    """Loops that fetch ahead (Lightning) checkpoint the batch they last stepped on, not the newest fetched."""

    def make():
        return odm.MixtureLoader(sources(n=40), batch_size=8, policy=chase_loss(), num_workers=num_workers, seed=5)

    whole = drive(make(), 16)
    first = make()
    it = iter(first)
    batch = next(it)
    for _ in range(8):  # like Lightning: fetch the next batch, then train on the current one
        ahead = next(it)
        first.mixer.observe(batch, fake_loss(batch))
        first.mixer.step()
        batch = ahead
    assert batch["mix_step"] == 8  # fetched, not stepped on
    state = first.state_dict()
    assert state["next_batch"] == 8
    del it
    resumed = make()
    resumed.load_state_dict(state)
    assert drive(resumed, 8) == whole[8:]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_num_batches_gives_a_length_and_epochs_that_continue_the_stream(num_workers):
    loader = odm.MixtureLoader(sources(n=100), batch_size=4, num_workers=num_workers, seed=1, num_batches=5)
    assert len(loader) == 5
    epochs = [[b["mix_step"] for b in loader] for _ in range(3)]
    assert epochs == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]


def test_a_resume_mid_epoch_yields_the_rest_of_that_epoch(chase_loss):
    def make():
        return odm.MixtureLoader(sources(n=100), batch_size=4, policy=chase_loss(), seed=1, num_batches=5)

    whole = make()
    expected = []
    for _ in range(2):
        for batch in whole:
            whole.mixer.observe(batch, fake_loss(batch))
            whole.mixer.step()
            expected.append(batch["id"].tolist())
    first = make()
    for i, batch in enumerate(first):
        first.mixer.observe(batch, fake_loss(batch))
        first.mixer.step()
        if i == 2:
            break
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    got = []
    for _ in range(2):  # the rest of epoch 0 (batches 3, 4), then all of epoch 1
        for batch in resumed:
            resumed.mixer.observe(batch, fake_loss(batch))
            resumed.mixer.step()
            got.append((batch["mix_step"], batch["id"].tolist()))
    assert [s for s, _ in got] == [3, 4, 5, 6, 7, 8, 9]
    assert [ids for _, ids in got] == expected[3:]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_new_epoch_continues_the_stream_instead_of_restarting_it(num_workers):
    loader = odm.MixtureLoader(sources(n=100), batch_size=4, num_workers=num_workers, seed=1)
    seen = []
    for _ in range(3):
        for i, batch in enumerate(loader):
            seen.append((batch["mix_step"], tuple(batch["id"].tolist())))
            if i == 3:
                break
    assert [s for s, _ in seen] == list(range(12))
    ids = [x for _, batch_ids in seen for x in batch_ids]
    assert len(ids) == len(set(ids)), "no sample repeats within the first pass"


def test_a_checkpoint_from_other_domains_or_workers_is_refused_with_the_difference():
    base = odm.MixtureLoader(sources(3), batch_size=4)
    state = base.state_dict()
    other = odm.MixtureLoader({"d0": [1], "d1": [2], "web": [3]}, batch_size=4)
    with pytest.raises(ValueError, match=r"checkpoint has \['d2'\] which this run lacks.*this run has \['web'\]"):
        other.load_state_dict(state)
    workers = odm.MixtureLoader(sources(3), batch_size=4, num_workers=2)
    with pytest.raises(ValueError, match="num_workers=0.*num_workers=2"):
        workers.load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"shuffle": True}, TypeError, "does not take `shuffle`"),
        ({"sampler": [0]}, TypeError, "does not take `sampler`"),
        ({"num_workers": -1}, ValueError, "num_workers"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"policy": "no-such-policy"}, ValueError, "unknown policy 'no-such-policy'; known policies: "),
        ({"policy": 3}, TypeError, "policy"),
        ({"floors": {"zz": 0.1}}, ValueError, r"unknown domain\(s\) \['zz'\]"),
        ({"ceilings": 0.2}, ValueError, "infeasible constraints"),
        ({"history_every": 0}, ValueError, "history_every"),
    ],
)
def test_loader_arguments_are_checked_at_construction(kwargs, error, match):
    args = {"batch_size": 2}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        odm.MixtureLoader(sources(2), **args)


def test_bounds_given_to_the_loader_hold_for_every_batch_it_draws(chase_loss):
    # chase_loss wants the hardest domain (d2 in fake_loss); the bounds keep d0 and d1 fed and cap d2
    loader = odm.MixtureLoader(
        sources(), batch_size=40, policy=chase_loss(), floors={"d0": 0.15, "d1": 0.15}, ceilings=0.6, seed=3
    )
    counts = np.zeros(3)
    for _, ids, p in drive(loader, 60):
        assert min(p[:2]) >= 0.15 - 1e-12 and max(p) <= 0.6 + 1e-12
        counts += np.bincount(np.array(ids) // 100_000, minlength=3)
    assert loader.mixer.proportions[2] == pytest.approx(0.6), "the policy chased d2 up to its ceiling"
    assert counts[2] / counts.sum() > 0.45 and min(counts[:2]) / counts.sum() > 0.1


@pytest.mark.parametrize("start_method", START_METHODS)
def test_a_failing_source_surfaces_in_the_main_process_with_its_domain(start_method):
    loader = odm.MixtureLoader(
        {"good": list(range(100)), "bad": Broken()},
        batch_size=8,
        num_workers=2,
        multiprocessing_context=start_method,
        timeout=120,
    )
    with pytest.raises(RuntimeError, match="domain 'bad' raised KeyError"):
        for _ in loader:
            pass


class Broken(torch.utils.data.Dataset):
    def __len__(self):
        return 50

    def __getitem__(self, i):
        if i % 10 == 9:
            raise KeyError(f"record {i} is corrupt")
        return i


def test_batches_hash_stably_across_processes():
    # Guards the test helpers above: sample ids, not object identities, are compared.
    loader = odm.MixtureLoader(sources(2), batch_size=4, seed=2)
    batch = next(iter(loader))
    digest = hashlib.sha1(str(batch["id"].tolist()).encode()).hexdigest()
    again = next(iter(odm.MixtureLoader(sources(2), batch_size=4, seed=2)))
    assert digest == hashlib.sha1(str(again["id"].tolist()).encode()).hexdigest()
