"""``MixtureLoader(num_workers=0)`` reads its dataset directly, without torch's single-process iterator.

Every test compares that fast path with the DataLoader path of the same loader (forced by ``pin_memory=True``,
which the fast path does not honour; on a machine without an accelerator torch warns and pins nothing): the same
batches, the same ``state_dict()``s, the same resumes, the same draw from the torch RNG per ``iter()``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.utils.data.dataloader as torch_dataloader
from conftest import ChaseLoss

import odm

# pin_memory on a machine without an accelerator: torch warns that it pins nothing.
pytestmark = pytest.mark.filterwarnings("ignore:.*pin_memory.*:UserWarning")


def sources(n: int = 30) -> dict[str, Any]:
    return {f"d{i}": [{"id": i * 1000 + j, "x": float(j)} for j in range(n)] for i in range(3)}


def make(*, dataloader_path: bool, **kwargs: Any) -> odm.MixtureLoader:
    extra = {"pin_memory": True} if dataloader_path else {}
    return odm.MixtureLoader(sources(), batch_size=7, policy=ChaseLoss(), seed=4, **kwargs, **extra)


def same(a: Any, b: Any) -> bool:
    """Deep equality over dicts, lists, tensors and arrays (the same type at every level)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    return bool(a == b)


def drive(loader: odm.MixtureLoader, n: int, *, ahead: bool = True) -> tuple[list[Any], list[Any]]:
    """Takes up to ``n`` batches like Lightning (fetch the next batch, then train on the current one), feeding
    losses back; returns the batches and the ``state_dict()`` after each step."""
    batches, states = [], []
    it = iter(loader)
    current = next(it, None)
    while current is not None and len(batches) < n:
        following = next(it, None) if ahead else None
        loader.mixer.observe(current, current["x"] + current["domain"].double())
        loader.mixer.step()
        batches.append(current)
        states.append(loader.state_dict())
        current = following if ahead else next(it, None)
    return batches, states


class CountingIter(torch_dataloader._SingleProcessDataLoaderIter):
    made = 0

    def __init__(self, loader: Any) -> None:
        CountingIter.made += 1
        super().__init__(loader)


def test_only_the_dataloader_path_builds_torchs_single_process_iterator(monkeypatch):
    monkeypatch.setattr(torch_dataloader, "_SingleProcessDataLoaderIter", CountingIter)
    CountingIter.made = 0
    next(iter(make(dataloader_path=False)))
    assert CountingIter.made == 0
    next(iter(make(dataloader_path=True)))
    assert CountingIter.made == 1


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"num_batches": 4}, {"exhausted": "stop"}, {"exhausted": "drop"}, {"max_passes": 2}],
    ids=["stream", "epochs", "stop", "drop", "max_passes"],
)
def test_the_fast_path_yields_the_batches_and_states_of_the_dataloader_path(kwargs):
    # 30 samples per domain, 7 per batch: passes end inside batches; "stop" and "drop" end the stream.
    for ahead in (True, False):
        fast, slow = make(dataloader_path=False, **kwargs), make(dataloader_path=True, **kwargs)
        for epoch in range(3):  # with num_batches, three epochs that continue the stream
            got, want = drive(fast, 40, ahead=ahead), drive(slow, 40, ahead=ahead)
            assert len(got[0]) == len(want[0]) > 0, (epoch, ahead)
            assert same(got, want), (epoch, ahead)
            if "num_batches" not in kwargs:
                break


@pytest.mark.parametrize("resume_on", ["fast", "dataloader"])
def test_a_state_of_either_path_resumes_either_path_identically(resume_on):
    whole, _ = drive(make(dataloader_path=False), 20)
    for saved_on in (False, True):
        first = make(dataloader_path=saved_on)
        _, states = drive(first, 9)  # the loop fetched batch 9 ahead: it is replayed after the resume
        resumed = make(dataloader_path=resume_on == "dataloader")
        resumed.load_state_dict(states[-1])
        rest, _ = drive(resumed, 11)
        assert same(rest, whole[9:]), (saved_on, resume_on)


def test_each_iter_draws_the_same_seed_from_the_torch_rng_as_the_dataloader_path():
    draws = []
    for dataloader_path in (False, True):
        loader = make(dataloader_path=dataloader_path)
        torch.manual_seed(0)
        next(iter(loader))
        next(iter(loader))
        draws.append(torch.rand(4))
    assert torch.equal(draws[0], draws[1])
    torch.manual_seed(0)
    assert not torch.equal(draws[0], torch.rand(4))  # each iter() did draw
