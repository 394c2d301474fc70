"""The loader's bad inputs and faults, each with its exact outcome: the error type and the words that name the
problem, or the exact data. (Faults across two real ranks are in ``test_loader_distributed.py``.)"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import roundtrip

import odm
from odm.loader_state import SlotRows


def uneven_sources() -> dict[str, list[dict[str, int]]]:
    """Two small domains whose shards run out after a few batches (at different batches on each rank)."""
    return {"a": [{"id": i} for i in range(23)], "b": [{"id": 1000 + i} for i in range(41)]}


def mixture(**kwargs) -> odm.MixtureLoader:  # type: ignore[no-untyped-def]
    args = {"batch_size": 4, "seed": 0}
    args.update(kwargs)
    sources = args.pop("sources", None) or {"a": list(range(40)), "b": list(range(100, 140))}
    return odm.MixtureLoader(sources, **args)


def stepped(loader: odm.MixtureLoader, n: int) -> list[tuple[int, list[int]]]:
    """Takes ``n`` batches, observing and stepping on each: ``[(mix_step, data)]``."""
    out = []
    for _, batch in zip(range(n), loader):
        loader.mixer.observe(batch, batch["domain"].double())
        loader.mixer.step()
        out.append((batch["mix_step"], batch["data"].tolist()))
    return out


# -- a live iterator -----------------------------------------------------------------------------------------
def test_loading_while_an_iterator_is_live_is_refused_and_changes_nothing():
    loader = mixture()
    state = loader.state_dict()
    it = iter(loader)
    next(it)
    with pytest.raises(RuntimeError, match="while an iterator of this loader is live"):
        loader.load_state_dict(state)
    assert next(it)["mix_step"] == 1, "the live iterator goes on undisturbed"


def test_loading_after_the_iterator_is_gone_restarts_at_the_restored_batch():
    loader = mixture()
    stepped(loader, 3)
    state = loader.state_dict()
    stepped(loader, 4)  # the for loop inside ended: its iterator is closed
    loader.load_state_dict(state)
    assert next(iter(loader))["mix_step"] == 3


# -- checkpoint validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("saved", "here", "words"),
    [
        ({"seed": 1}, {"seed": 2}, "seed=1 in the checkpoint, seed=2 here"),
        ({"batch_size": 4}, {"batch_size": 8}, "batch_size=4 in the checkpoint, batch_size=8 here"),
        ({"granularity": "sample"}, {"granularity": "batch"}, "granularity='sample' in the checkpoint"),
        (
            {"prefetch_factor": 2, "num_workers": 1},
            {"prefetch_factor": 4, "num_workers": 1},
            "delay=4 in the checkpoint, delay=6 here (the publish delay",
        ),
        ({"delay": 3}, {"delay": 5}, "delay=3 in the checkpoint, delay=5 here"),
        ({"num_workers": 0}, {"num_workers": 2}, "num_workers=0 in the checkpoint, num_workers=2 here"),
        ({"exhausted": "restart"}, {"exhausted": "stop"}, "exhausted='restart' in the checkpoint"),
        ({"max_passes": 2}, {"max_passes": 3}, "max_passes=[2, 2] in the checkpoint, max_passes=[3, 3] here"),
        ({"dp_rank": 0, "dp_world_size": 1}, {"dp_rank": 0, "dp_world_size": 2}, "dp_world_size=1 in the checkpoint"),
    ],
)
def test_a_checkpoint_of_another_configuration_is_refused_with_the_difference(saved, here, words):
    state = mixture(**saved).state_dict()
    loader = mixture(**here)
    with pytest.raises(ValueError, match="differs from this one in what determines the batches") as info:
        loader.load_state_dict(state)
    assert words in str(info.value)


def test_every_difference_is_listed_at_once():
    state = mixture(seed=1, batch_size=4).state_dict()
    with pytest.raises(ValueError, match=r"batch_size=4 in the checkpoint, batch_size=2 here; seed=1 .*seed=7 here"):
        mixture(seed=7, batch_size=2).load_state_dict(state)


class Table(torch.utils.data.Dataset):
    """A map-style dataset of ``n`` integers."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def test_a_map_style_source_of_another_length_is_refused():
    # its shuffles are permutations of range(len): another length, other passes
    state = mixture(sources={"a": Table(40), "b": [1, 2]}).state_dict()
    with pytest.raises(
        ValueError,
        match=r"sources=\['MapSource\(len=40\)', 'IterableSource'\] in the checkpoint, "
        r"sources=\['MapSource\(len=41\)', 'IterableSource'\] here",
    ):
        mixture(sources={"a": Table(41), "b": [1, 2]}).load_state_dict(state)


def test_zero_and_one_worker_read_the_same_one_shard_so_either_resumes_the_other():
    first = mixture(num_workers=0, delay=4)  # the default delay follows num_workers
    stepped(first, 3)
    resumed = mixture(num_workers=1, delay=4)
    resumed.load_state_dict(first.state_dict())
    assert stepped(resumed, 4) == stepped(first, 4)


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda s: s.pop("streams"), "loader state is missing 'streams'"),
        (lambda s: s["config"].pop("seed"), "loader state is missing 'config.seed'"),
        (lambda s: s.pop("mixer"), "loader state is missing 'mixer'"),
        (lambda s: s.update(version=2), r"loader state has version 2, expected one of \[3, 4\]"),
        (lambda s: s.update(config=[1, 2]), "loader state.config must be a mapping"),
        (lambda s: s.update(next_batch=-4), "`next_batch` must be an integer >= 0, got -4"),
        (
            lambda s: s.update(streams=s["streams"] * 2),
            r"streams must hold one block per data-parallel replica \(1 "
            r"here\), got 2",
        ),
        (lambda s: s["streams"][0][0].__setitem__(3, -5), r"streams\[0\]\[0\] = \[4, 0, 0, -5, .* out of range"),
        (lambda s: s["streams"][0][0].__setitem__(5, 2), r"streams\[0\]\[0\] = .* out of range.*active 0/1"),
        (lambda s: s["streams"][0][0].__setitem__(1, 0.5), r"streams\[0\]\[0\] must be 7 integers"),
        (lambda s: s["streams"][0].append([-1] * 7), r"streams\[0\] must hold 1 slot rows"),
    ],
)
def test_a_missing_or_tampered_entry_is_refused_naming_its_key_path(edit, words):
    loader = mixture()
    stepped(loader, 4)
    state = copy.deepcopy(loader.state_dict())
    edit(state)
    fresh = mixture()
    with pytest.raises(ValueError, match=words):
        fresh.load_state_dict(state)
    assert next(iter(fresh))["mix_step"] == 0, "a refused checkpoint leaves the loader as it was"


def test_a_fresh_slot_row_that_holds_positions_is_refused():
    state = mixture(num_workers=2).state_dict()
    state["streams"][0][1] = [-1, 0, 0, 3, 0, 1, 1]
    with pytest.raises(ValueError, match=r"streams\[0\]\[1\] is marked fresh \(-1\) but holds positions"):
        mixture(num_workers=2).load_state_dict(state)


def test_a_tampered_mixer_entry_is_refused_naming_its_key_path():
    loader = mixture(policy="exp3")
    stepped(loader, 4)
    state = loader.state_dict()
    state["mixer"]["num_steps"] = -1
    with pytest.raises(ValueError, match=r"mixer\.num_steps"):
        mixture(policy="exp3").load_state_dict(state)


# -- the cut -------------------------------------------------------------------------------------------------
def test_the_state_right_after_loading_is_the_loaded_state():
    loader = mixture(policy="exp3", num_workers=2)
    stepped(loader, 5)
    state = loader.state_dict()
    again = mixture(policy="exp3", num_workers=2)
    again.load_state_dict(state)
    assert again.state_dict() == state


def test_before_any_step_a_single_process_cuts_at_the_newest_batch_taken():
    loader = mixture()
    it = iter(loader)
    for _ in range(3):
        next(it)
    assert loader.state_dict()["next_batch"] == 3


def test_a_cut_further_back_than_the_rows_kept_is_an_error_not_a_wrong_checkpoint(monkeypatch):
    monkeypatch.setattr(SlotRows, "CAPACITY", 4)
    loader = mixture(sources={"a": list(range(400)), "b": list(range(400))})
    it = iter(loader)
    batch = next(it)
    loader.mixer.observe(batch, batch["domain"].double())
    for _ in range(6):  # the loop runs 6 batches past the one it observed
        next(it)
    loader.mixer.step()  # the cut: batch 0, whose rows were dropped
    with pytest.raises(RuntimeError, match="stream positions at batch 0 are no longer known.*more than 4 batches"):
        loader.state_dict()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_many_more_steps_than_rows_kept_between_checkpoints_still_resume_exactly(monkeypatch, num_workers):
    # One process reads the stream rows at the cut only when a checkpoint asks (not at every step): the rows of
    # the batches stepped on since must survive the ring's bound, or the resume would be wrong.
    monkeypatch.setattr(SlotRows, "CAPACITY", 4)
    sources = {"a": list(range(400)), "b": list(range(1000, 1400))}
    loader = mixture(sources=sources, policy="exp3", num_workers=num_workers)
    it = iter(loader)
    for _ in range(30):  # 30 steps, no checkpoint in between
        batch = next(it)
        loader.mixer.observe(batch, batch["domain"].double())
        loader.mixer.step()
    state = loader.state_dict()
    assert state["next_batch"] == 30
    expected = [next(it)["data"].tolist() for _ in range(10)]
    again = mixture(sources=sources, policy="exp3", num_workers=num_workers)
    again.load_state_dict(state)
    assert [b["data"].tolist() for _, b in zip(range(10), again)] == expected


def test_feedback_for_a_batch_the_loader_never_served_is_refused_naming_the_batch():
    loader = mixture()
    batch = next(iter(loader))
    with pytest.raises(ValueError, match="`mix_step`=7 names a batch the loader has not served"):
        loader.mixer.observe(batch["domain"], batch["domain"].double(), mix_step=7)


# -- arguments -----------------------------------------------------------------------------------------------
def test_len_without_num_batches_is_a_type_error_that_names_the_fix():
    with pytest.raises(TypeError, match=r"pass `num_batches=N`"):
        len(mixture())


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"num_batches": 0}, ValueError, "`num_batches` must be an integer >= 1 or None, got 0"),
        ({"num_workers": 1.5}, TypeError, "`num_workers` must be an integer >= 0, got 1.5"),
        ({"dp_rank": 1}, ValueError, "pass `dp_rank` and `dp_world_size` together"),
        ({"dp_rank": 2, "dp_world_size": 2}, ValueError, r"`dp_rank` must be in \[0, dp_world_size=2\), got 2"),
        ({"prefetch_factor": 0, "num_workers": 1}, ValueError, "`prefetch_factor` must be an integer >= 1"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, error, words):
    with pytest.raises(error, match=words):
        mixture(**kwargs)


def test_numpy_integers_are_accepted_as_counts():
    loader = mixture(num_batches=np.int64(2), num_workers=np.int64(0), batch_size=np.int64(4))
    assert len(loader) == 2 and [b["mix_step"] for b in loader] == [0, 1]


def test_explicit_dp_ranks_read_disjoint_shards_and_model_parallel_peers_identical_batches():
    def run(dp_rank: int) -> list[list[int]]:
        loader = mixture(dp_rank=dp_rank, dp_world_size=2, num_batches=4)
        return [b["data"].tolist() for b in loader]

    r0, r1, r0_peer = run(0), run(1), run(0)
    assert r0 == r0_peer, "two model-parallel peers of one replica get the same batches"
    assert not {x for b in r0 for x in b} & {x for b in r1 for x in b}


# -- running out ---------------------------------------------------------------------------------------------
def test_stop_ends_at_the_first_domain_to_run_out_while_drop_goes_on_with_the_rest():
    stop = [b["data"].tolist() for b in mixture(sources=uneven_sources_plain(), exhausted="stop")]
    drop = [b["data"].tolist() for b in mixture(sources=uneven_sources_plain(), exhausted="drop")]
    flat_stop, flat_drop = [x for b in stop for x in b], [x for b in drop for x in b]
    assert sorted(flat_drop) == sorted(list(range(22)) + list(range(1000, 1037))), "drop reads every sample once"
    assert len(flat_stop) < 22 + 37 and all(len(b) == 4 for b in stop)
    assert drop[: len(stop)] == stop, "both draw the same batches until stop stops"
    a_read = sum(x < 1000 for x in flat_stop)
    b_read = len(flat_stop) - a_read
    assert a_read > 22 - 4 or b_read > 37 - 4, "stop stopped only because a domain could not fill the next batch"


def test_stop_with_two_workers_ends_at_the_first_slot_that_runs_out_and_stays_stopped():
    loader = mixture(sources=uneven_sources_plain(), exhausted="stop", num_workers=2)
    steps = [b["mix_step"] for b in loader]
    assert steps == list(range(len(steps))) and steps, "no batch after the first one that could not be made"
    assert [b["mix_step"] for b in loader] == []


def uneven_sources_plain() -> dict[str, list[int]]:
    return {"a": list(range(22)), "b": list(range(1000, 1037))}


def test_a_loader_that_was_never_iterated_resumes_from_batch_zero():
    state = mixture().state_dict()
    assert state["next_batch"] == 0 and state["streams"] == [[[-1] * 7]]
    loader = mixture()
    loader.load_state_dict(state)
    assert [b["data"].tolist() for b in mixture(num_batches=3)] == [
        b["data"].tolist() for _, b in zip(range(3), loader)
    ]


def test_the_checkpoint_holds_what_determines_the_batches():
    config = mixture(num_workers=2, prefetch_factor=3).state_dict()["config"]
    assert config == {
        "domains": ["a", "b"],
        "batch_size": 4,
        "granularity": "sample",
        "seed": 0,
        "delay": 8,
        "num_workers": 2,
        "num_slots": 2,
        "dp_world_size": 1,
        "exhausted": "restart",
        "max_passes": [None, None],
        "sources": ["IterableSource", "IterableSource"],
    }

    loader = mixture(num_workers=2, policy="exp3")
    stepped(loader, 3)
    state = loader.state_dict()
    assert roundtrip(state) == state, "plain values: the state loads with torch.load(weights_only=True)"
