"""Token-level mixing of packed sequences: token shares, per-token attribution, exact resume mid-document."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import Recorder

from odm import OnlineMixer, ProportionSchedule
from odm.packing import PackedMixtureDataset, PackingIterator
from odm.sources import MapSource

# A token id says where it comes from: domain * _DOM + document * _DOC + position in the document.
_DOM, _DOC = 10**9, 10**5


def _corpus(means: list[float], num_docs: int = 300, seed: int = 0) -> dict[str, MapSource]:
    """Documents with lognormal lengths (sigma 1, median ``mean``), in a fixed order per domain."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, m in enumerate(means):
        lengths = np.clip(rng.lognormal(np.log(m), 1.0, num_docs).astype(np.int64), 1, _DOC - 1)
        docs = [k * _DOM + i * _DOC + np.arange(n, dtype=np.int64) for i, n in enumerate(lengths)]
        out[f"d{k}"] = MapSource(docs, shuffle=False)
    return out


def _docs(source: MapSource) -> list[np.ndarray]:
    return [source.dataset[i] for i in range(len(source.dataset))]


def _observe_per_token(mixer: OnlineMixer, batch: dict, per_token_losses: torch.Tensor) -> None:
    """Stand-in for ``mixer.observe(batch, per_token_losses)`` until the mixer credits ``token_domain`` itself:
    every non-padding token is one observation of its own domain."""
    td = batch["token_domain"].reshape(-1)
    keep = td >= 0
    mixer.observe(td[keep], per_token_losses.reshape(-1)[keep], mix_step=batch["mix_step"])


@pytest.mark.parametrize("seed", [0, 1])
def test_token_shares_meet_the_target_within_one_percent_over_1000_batches(seed):
    # Medians 400 and 4000 tokens: a document-level mixture would be off by ~10x in tokens.
    sources = _corpus([400.0, 4000.0, 1200.0], seed=seed)
    schedule = ProportionSchedule(3, initial=[0.5, 0.2, 0.3])
    schedule.publish([0.1, 0.6, 0.3], effective_from=500)
    it = iter(PackedMixtureDataset(sources, batch_size=4, pack_length=1024, schedule=schedule, seed=seed))
    tokens = np.zeros(3)
    docs_started = np.zeros(3)
    for _ in range(1000):
        batch = next(it)
        td = batch["token_domain"].numpy()
        assert (td >= 0).all()
        tokens += np.bincount(td.ravel(), minlength=3)
        starts = batch["position_ids"].numpy() == 0
        docs_started += np.bincount(td[starts & (batch["input_ids"].numpy() % _DOC == 0)], minlength=3)
    target = 0.5 * np.array([0.5, 0.2, 0.3]) + 0.5 * np.array([0.1, 0.6, 0.3])
    realised = tokens / tokens.sum()
    assert tokens.sum() == 1000 * 4 * 1024
    np.testing.assert_array_less(np.abs(realised - target), 0.01 * target)
    # The documents drawn are far from the token target: mixing documents would not have met it.
    assert np.abs(docs_started / docs_started.sum() - target).max() > 0.1


def test_a_domain_with_zero_proportion_gets_no_tokens():
    schedule = ProportionSchedule(3, initial=[0.5, 0.0, 0.5])
    it = iter(PackedMixtureDataset(_corpus([50, 50, 50]), batch_size=2, pack_length=64, schedule=schedule))
    seen = np.concatenate([next(it)["token_domain"].numpy().ravel() for _ in range(50)])
    assert 1 not in seen and {0, 2} <= set(seen.tolist())


def test_every_document_is_packed_whole_in_order_across_rows_and_batches():
    sources = _corpus([30.0, 300.0], num_docs=40)
    it = iter(PackedMixtureDataset(sources, batch_size=3, pack_length=100))
    batches = [next(it) for _ in range(60)]
    ids = np.concatenate([b["input_ids"].numpy().ravel() for b in batches])
    td = np.concatenate([b["token_domain"].numpy().ravel() for b in batches])
    np.testing.assert_array_equal(td, ids // _DOM)  # every token is credited to its own domain
    for k, name in enumerate(sources):
        got = ids[td == k]
        # The stream restarts its pass when it ends: the expected tokens are the documents, cycled.
        expected = np.concatenate(_docs(sources[name]) * 20)[: got.size]
        np.testing.assert_array_equal(got, expected)


def test_position_ids_and_cu_seqlens_mark_every_document_and_row_boundary():
    sources = _corpus([20.0, 90.0], num_docs=50)
    it = iter(PackedMixtureDataset(sources, batch_size=2, pack_length=64))
    for _ in range(30):
        batch = next(it)
        ids = batch["input_ids"].numpy().ravel()
        pos = batch["position_ids"].numpy().ravel()
        cu = batch["cu_seqlens"].numpy()
        # Reference: a segment starts at each row start and wherever the document changes.
        doc = ids // _DOC
        starts = [i for i in range(ids.size) if i % 64 == 0 or doc[i] != doc[i - 1]]
        assert cu.tolist() == [*starts, ids.size]
        assert batch["max_seqlen"] == int(np.diff(cu).max())
        for s, e in itertools.pairwise(cu):
            np.testing.assert_array_equal(pos[s:e], np.arange(e - s))
            # Within a segment the document's own positions run on without a gap.
            np.testing.assert_array_equal(ids[s:e] % _DOC - ids[s] % _DOC, np.arange(e - s))


def test_per_token_losses_are_credited_to_each_tokens_own_domain():
    sources = _corpus([25.0, 70.0, 40.0], num_docs=60)
    recorder = Recorder()
    mixer = OnlineMixer(list(sources), policy=recorder)
    it = iter(PackedMixtureDataset(sources, batch_size=2, pack_length=50, schedule=mixer.schedule))
    for _ in range(5):
        batch = next(it)
        losses = (batch["input_ids"] % 7).double() + 0.25 * batch["position_ids"]
        _observe_per_token(mixer, batch, losses)
        mixer.step()
        # Slow reference: walk every token and add its loss to its domain's sum.
        ref_sum, ref_count = np.zeros(3), np.zeros(3)
        for tok, pos, loss in zip(
            batch["input_ids"].ravel().tolist(), batch["position_ids"].ravel().tolist(), losses.ravel().tolist()
        ):
            assert loss == tok % 7 + 0.25 * pos
            ref_sum[tok // _DOM] += loss
            ref_count[tok // _DOM] += 1
        stats = recorder.seen[-1]
        np.testing.assert_allclose(stats.loss_sum, ref_sum, rtol=1e-12)
        np.testing.assert_array_equal(stats.count, ref_count)


def _run(it: PackingIterator, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def _same_batch(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("before", [1, 7, 13])
def test_resume_mid_document_is_exact(assert_resumes_identically, before):
    sources = _corpus([60.0, 500.0], num_docs=30, seed=before)

    def make() -> PackingIterator:
        schedule = ProportionSchedule(2, initial=[0.7, 0.3])
        schedule.publish([0.2, 0.8], effective_from=10)
        return iter(PackedMixtureDataset(sources, batch_size=2, pack_length=128, schedule=schedule, seed=3))

    probe = make()
    _run(probe, before)
    assert probe._carry is not None, "the checkpoint must fall inside a document for this test to mean anything"
    assert_resumes_identically(make, _run, before=before, after=12, compare=_same_batch)


def test_resume_restores_the_carried_document_not_the_next_one():
    sources = _corpus([500.0], num_docs=10)
    it = iter(PackedMixtureDataset(sources, batch_size=1, pack_length=32))
    next(it)
    state = it.state_dict()
    d, off = state["row"][-2:]
    assert (d, off) == (0, 32)
    fresh = iter(PackedMixtureDataset(sources, batch_size=1, pack_length=32))
    fresh.load_state_dict(state)
    assert next(fresh)["input_ids"][0, 0].item() == 32  # token 32 of document 0


def test_packing_under_dataloader_workers_is_deterministic_and_fills_every_row():
    sources = _corpus([40.0, 200.0], num_docs=80)

    def batches(num_workers: int) -> list[dict]:
        ds = PackedMixtureDataset(sources, batch_size=2, pack_length=64, seed=5)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers)
        out = []
        for _, b in zip(range(8), loader):
            out.append(b)
        return out

    a, b = batches(2), batches(2)
    for x, y in zip(a, b):
        _same_batch(x, y)
    assert [x["mix_step"] for x in a] == list(range(8))
    # Two workers read disjoint shards: no document appears in both slots' batches.
    docs = [set((x["input_ids"].numpy().ravel() // _DOC).tolist()) for x in a]
    even, odd = set().union(*docs[0::2]), set().union(*docs[1::2])
    assert not even & odd


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"pack_length": 0}, ValueError, "pack_length"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"pack_length": 2.5}, TypeError, "pack_length"),
        ({"tokens_key": ""}, TypeError, "tokens_key"),
        ({"seed": -1}, ValueError, "seed"),
    ],
)
def test_bad_arguments_are_refused_naming_the_argument(kwargs, error, words):
    args = {"batch_size": 2, "pack_length": 8} | kwargs
    with pytest.raises(error, match=words):
        PackedMixtureDataset({"a": [[1, 2, 3]]}, **args)


def test_bad_documents_name_their_domain():
    with pytest.raises(TypeError, match="'a'.*integer token ids"):
        next(iter(PackedMixtureDataset({"a": [[0.5, 1.5]]}, batch_size=1, pack_length=4)))
    with pytest.raises(KeyError, match="'a'.*'input_ids'"):
        next(iter(PackedMixtureDataset({"a": [{"text": "x"}]}, batch_size=1, pack_length=4)))
    with pytest.raises(ValueError, match="'b' has no tokens"):
        next(iter(PackedMixtureDataset({"a": [[1, 2]], "b": [[]]}, batch_size=1, pack_length=4)))


def test_resume_through_the_shared_block_under_two_workers_continues_bit_for_bit():
    """The contract a loader relies on: rows attached to each batch, written into ``resume``, restart every
    worker slot exactly where the taken batches left it (the slots mid-document)."""
    from odm.dataset import STATE_KEY

    sources = _corpus([50.0, 400.0], num_docs=60)

    def loader(resume: torch.Tensor | None):
        ds = PackedMixtureDataset(sources, batch_size=2, pack_length=96, seed=1)
        ds.attach_state, ds.resume = True, resume
        return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)

    whole = [b for _, b in zip(range(14), loader(None))]
    block = torch.full((3, PackedMixtureDataset(sources, batch_size=2, pack_length=96).state_width), -1)
    for _, batch in zip(range(7), loader(None)):
        state = batch.pop(STATE_KEY)
        block[1 + state["slot"]] = torch.tensor(state["row"])
        block[0, 0] = state["row"][0]
    assert (block[1:, -1] > 0).all(), "both slots must be mid-document at the cut"
    rest = [b for _, b in zip(range(7), loader(block))]
    for a, b in zip(whole[7:], rest):
        a.pop(STATE_KEY)
        b.pop(STATE_KEY)
        _same_batch(a, b)
