import numpy as np
import pytest
import torch

from odm.dataset import MixtureDataset, largest_remainder
from odm.schedule import MODE_EXACT, ProportionSchedule

# Chi-square critical values at the 0.1% level (df -> value), from standard tables.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 7: 24.32}


def tagged(domain: int, n: int = 1000) -> list[dict]:
    return [{"id": domain * 100_000 + i} for i in range(n)]


def dataset(k=4, p=None, **kw):
    schedule = ProportionSchedule(k, initial=p)
    kw.setdefault("batch_size", 64)
    return MixtureDataset({f"d{i}": tagged(i) for i in range(k)}, schedule=schedule, **kw), schedule


def chi_square(counts: np.ndarray, p: np.ndarray) -> float:
    expected = counts.sum() * p
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a zero-proportion domain was drawn"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sample_draws_follow_the_published_proportions(seed):
    p = np.array([0.5, 0.3, 0.15, 0.05])
    ds, _ = dataset(p=p, seed=seed)
    it = iter(ds)
    ids = torch.cat([next(it)["domain"] for _ in range(200)]).numpy()
    assert chi_square(np.bincount(ids, minlength=4), p) < CHI2_999[3]


def test_each_sample_comes_from_the_domain_its_id_names():
    ds, _ = dataset(p=[0.4, 0.3, 0.2, 0.1])
    it = iter(ds)
    for _ in range(20):
        batch = next(it)
        assert (batch["id"] // 100_000 == batch["domain"]).all()


def test_batch_granularity_draws_one_domain_per_batch_with_the_proportions():
    p = np.array([0.6, 0.3, 0.1, 0.0])
    ds, _ = dataset(p=p, granularity="batch", batch_size=4)
    it = iter(ds)
    firsts = []
    for _ in range(600):
        d = next(it)["domain"]
        assert (d == d[0]).all()
        firsts.append(int(d[0]))
    assert chi_square(np.bincount(firsts, minlength=4), p) < CHI2_999[2]


def test_exact_mode_rows_give_largest_remainder_counts_in_every_batch():
    ds, schedule = dataset(batch_size=10)
    schedule.publish([0.55, 0.25, 0.15, 0.05], effective_from=0, mode=MODE_EXACT)
    it = iter(ds)
    for _ in range(5):
        counts = np.bincount(next(it)["domain"].numpy(), minlength=4)
        assert counts.tolist() == largest_remainder(np.array([0.55, 0.25, 0.15, 0.05]), 10).tolist()


def test_largest_remainder_sums_to_the_total_and_rounds_the_exact_counts():
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = rng.dirichlet(np.ones(7))
        total = int(rng.integers(1, 50))
        counts = largest_remainder(p, total)
        assert counts.sum() == total
        assert np.all(np.abs(counts - p * total) < 1)


def test_same_seed_gives_identical_batches_and_another_seed_does_not():
    def ids(seed):
        it = iter(dataset(p=[0.4, 0.3, 0.2, 0.1], seed=seed)[0])
        return [next(it)["id"].tolist() for _ in range(10)]

    assert ids(3) == ids(3)
    assert ids(3) != ids(4)


def test_changing_proportions_changes_the_mapping_not_the_uniforms():
    # The same counter-based uniforms are mapped through another CDF: with p and its reverse on two domains,
    # a sample drawn as domain 0 under p=[0.5, 0.5] stays domain 0 under p=[0.7, 0.3] (u < 0.5 < 0.7).
    a, _ = dataset(k=2, p=[0.5, 0.5], seed=7)
    b, _ = dataset(k=2, p=[0.7, 0.3], seed=7)
    da, db = next(iter(a))["domain"], next(iter(b))["domain"]
    assert bool(((da == 0) <= (db == 0)).all())


def test_non_mapping_samples_sit_under_data_and_batches_carry_domain_and_mix_step():
    ds = MixtureDataset({"a": list(range(10)), "b": list(range(10, 20))}, batch_size=3)
    it = iter(ds)
    first, second = next(it), next(it)
    assert sorted(first) == ["data", "domain", "mix_step"]
    assert first["domain"].dtype == torch.long and first["domain"].shape == (3,)
    assert (first["mix_step"], second["mix_step"]) == (0, 1)


def test_restart_repeats_a_domain_with_a_new_pass():
    ds = MixtureDataset({"a": [0, 1, 2]}, batch_size=2)
    it = iter(ds)
    got = [x for _ in range(6) for x in next(it)["data"].tolist()]
    assert got == [0, 1, 2] * 4


def _stop_drop_sources() -> dict[str, list[int]]:
    return {"a": list(range(5)), "b": list(range(100, 200))}


def test_stop_ends_the_iteration_at_the_batch_that_needs_a_spent_domain():
    # The domain ids of each batch are the same under every `exhausted` mode until a pass ends: take them from
    # an endless (restart) run, find the first batch that asks for a 6th sample of "a", and expect exactly the
    # batches before it, identical, and nothing else.
    restart = iter(MixtureDataset(_stop_drop_sources(), batch_size=4, seed=3))
    reference, used = [], 0
    while True:
        batch = next(restart)
        used += int((batch["domain"] == 0).sum())
        if used > 5:
            break
        reference.append(batch["data"].tolist())
    batches = list(MixtureDataset(_stop_drop_sources(), batch_size=4, seed=3, exhausted="stop"))
    assert [b["data"].tolist() for b in batches] == reference
    assert all(len(b["data"]) == 4 for b in batches)  # the partial batch is dropped, not returned short


def test_drop_reads_every_sample_once_and_never_stops_early():
    batches = list(MixtureDataset(_stop_drop_sources(), batch_size=4, seed=3, exhausted="drop"))
    values = [x for b in batches for x in b["data"].tolist()]
    assert sorted(values) == list(range(5)) + list(range(100, 200))
    assert [len(b["data"]) for b in batches] == [4] * 26 + [1]


def test_two_ranks_draw_different_domain_sequences_from_one_seed():
    def ids(rank: int) -> list[list[int]]:
        ds, _ = dataset(k=4, batch_size=16, seed=5)
        ds.rank, ds.world_size = rank, 2
        it = iter(ds)
        return [next(it)["domain"].tolist() for _ in range(10)]

    r0, r1 = ids(0), ids(1)
    assert r0 != r1, "the rank must be part of the draw key: identical ranks halve the effective batch"
    assert all(a != b for a, b in zip(r0, r1))  # every batch differs, not just one
    assert ids(0) == r0  # and each rank's draws are reproducible


def test_drop_removes_a_spent_domain_and_renormalises_the_rest():
    ds = MixtureDataset(
        {"a": list(range(6)), "b": list(range(100, 130)), "c": list(range(200, 230))}, batch_size=4, exhausted="drop"
    )
    batches = list(ds)
    values = [x for b in batches for x in b["data"].tolist()]
    assert sorted(values) == sorted(set(values)), "no sample repeats when domains drop"
    assert set(values) == set(range(6)) | set(range(100, 130)) | set(range(200, 230))
    for b in batches:
        assert (b["data"] // 100 == b["domain"]).all()


def test_max_passes_budget_drops_a_domain_after_that_many_passes():
    ds = MixtureDataset({"a": [0, 1], "b": list(range(100, 400))}, batch_size=8, max_passes={"a": 3})
    it = iter(ds)
    batches = [next(it) for _ in range(60)]
    a_items = [x for b in batches for x, d in zip(b["data"].tolist(), b["domain"].tolist()) if d == 0]
    assert sorted(a_items) == [0, 0, 0, 1, 1, 1]


def test_all_domains_spent_ends_the_iteration():
    ds = MixtureDataset({"a": [0, 1, 2], "b": [10, 11]}, batch_size=2, max_passes=2)
    values = [x for b in ds for x in b["data"].tolist()]
    assert sorted(values) == [0, 0, 1, 1, 2, 2, 10, 10, 11, 11]


def test_a_zero_proportion_domain_is_never_drawn():
    ds, _ = dataset(p=[0.0, 1.0, 0.0, 0.0], batch_size=256)
    it = iter(ds)
    assert all((next(it)["domain"] == 1).all() for _ in range(20))


def test_a_source_that_raises_names_its_domain():
    def broken():
        yield 1
        raise OSError("disk on fire")

    ds = MixtureDataset({"ok": [1, 2, 3], "bad": broken}, batch_size=16)
    with pytest.raises(RuntimeError, match="domain 'bad' raised OSError: disk on fire"):
        next(iter(ds))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"sources": {}}, ValueError, "at least one domain"),
        ({"sources": [1, 2]}, TypeError, "mapping"),
        ({"sources": {"a": 5}}, TypeError, "domain 'a'.*iterable"),
        ({"sources": {"a": iter([1, 2])}}, TypeError, "one-shot iterator"),
        ({"sources": {"a": "some/file.jsonl"}}, TypeError, "a string is not a source"),
        ({"sources": {1: [1]}}, TypeError, "non-empty strings"),
        ({"batch_size": 0}, ValueError, "`batch_size` must be an integer >= 1, got 0"),
        ({"granularity": "token"}, ValueError, "granularity.*'token'"),
        ({"exhausted": "loop"}, ValueError, "exhausted.*'loop'"),
        ({"max_passes": 0}, ValueError, "max_passes"),
        ({"max_passes": {"zzz": 1}}, ValueError, "unknown domains \\['zzz'\\]"),
        ({"seed": -1}, ValueError, "seed"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, error, match):
    args = {"sources": {"a": [1, 2, 3]}, "batch_size": 2}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        MixtureDataset(**args)


def test_a_schedule_for_another_domain_count_is_refused():
    with pytest.raises(ValueError, match="3 domains but `sources` has 1"):
        MixtureDataset({"a": [1]}, batch_size=1, schedule=ProportionSchedule(3))
