"""Token-level mixing of packed sequences: token shares, per-token attribution, exact resume mid-document."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import Recorder, roundtrip

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
        mixer.observe(batch, losses)  # each token's loss to batch["token_domain"]
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
        ds.attach_state, ds.start_rows = True, resume
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


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_mixture_loader_packs_by_token_shares_and_resumes_exactly_mid_document(num_workers):
    from odm import MixtureLoader

    sources = _corpus([60.0, 500.0, 150.0], num_docs=40)

    def make() -> MixtureLoader:
        return MixtureLoader(sources, batch_size=2, pack_length=64, policy=Recorder(), num_workers=num_workers, seed=2)

    def run(loader: MixtureLoader, n: int) -> list[dict]:
        out = []
        for _, batch in zip(range(n), loader):
            out.append(batch)
            losses = (batch["token_domain"] + 1).double() * (1 + batch["position_ids"] % 3)
            loader.mixer.observe(batch, losses)
            loader.mixer.step()
        return out

    whole = run(make(), 16)
    assert whole[-1]["mix_step"] == 15 and whole[0]["input_ids"].shape == (2, 64)
    first = make()
    run(first, 9)
    state = roundtrip(first.state_dict())
    del first
    second = make()
    second.load_state_dict(state)
    rest = run(second, 7)
    for a, b in zip(whole[9:], rest):
        _same_batch(a, b)
    # The policy learned from per-token losses: its proportions moved away from uniform.
    assert not np.allclose(second.mixer.proportions, 1 / 3)


def test_the_mixture_loader_refuses_sample_settings_with_pack_length():
    from odm import MixtureLoader

    with pytest.raises(ValueError, match=r"pack_length.*\['granularity'\]"):
        MixtureLoader({"a": [[1, 2]]}, batch_size=1, pack_length=4, granularity="batch")


def _packed_rank_main(rank: int, port: int, out: str) -> None:
    import json
    from datetime import timedelta

    import torch.distributed as dist

    from odm import MixtureLoader

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=20)
    )
    try:
        loader = MixtureLoader(_corpus([40.0, 300.0], num_docs=80), batch_size=2, pack_length=64, policy="exp3s")
        docs, props = [], []
        for _, batch in zip(range(10), loader):
            docs.extend(sorted(set((batch["input_ids"].ravel() // _DOC).tolist())))
            loader.mixer.observe(batch, (batch["token_domain"] + 1).double() * (rank + 1))
            loader.mixer.step()
            props.append(loader.mixer.proportions.tolist())
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump({"docs": docs, "p": props, "streams": loader.state_dict()["streams"]}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_packed_batches_under_two_gloo_ranks_read_disjoint_documents_with_identical_proportions(tmp_path):
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_packed_rank_main, args=(port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["p"] == r1["p"] and r0["p"][-1] != r0["p"][0]
    # A document cut at a batch boundary shows up in two batches of its rank, never in the other rank's.
    assert not set(r0["docs"]) & set(r1["docs"])
    # Rank 0's checkpoint holds both ranks' packing rows (deficits, carried documents), gathered in step().
    assert r0["streams"] == r1["streams"] and len(r0["streams"]) == 2 and r0["streams"][0] != r0["streams"][1]
