"""Two real ranks (gloo, two processes) reading one mixture: disjoint data, identical proportions, one
checkpoint for every rank, ranks that agree or fail together, and stop together."""

import json
import re
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import odm

TIMEOUT = timedelta(seconds=20)  # a hang fails fast


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=TIMEOUT)


def _spawn(fn, tmp_path, *args) -> None:  # type: ignore[no-untyped-def]
    mp.spawn(fn, args=(2, _free_port(), str(tmp_path), *args), nprocs=2, join=True)


def _rank_main(rank: int, world: int, port: int, out_dir: str, num_workers: int) -> None:
    _init(rank, world, port)
    try:
        data = {f"d{k}": [{"id": k * 10_000 + i} for i in range(400)] for k in range(3)}
        loader = odm.MixtureLoader(data, batch_size=8, num_workers=num_workers, seed=0)
        ids, domains = [], []
        # 20 batches of 8 stay inside each rank's first pass (200 samples per domain and rank).
        for _, batch in zip(range(20), loader):
            ids.extend(batch["id"].tolist())
            domains.extend(batch["domain"].tolist())
            # Ranks see different losses; the all-reduced statistics keep the proportions equal.
            loader.mixer.observe(batch, batch["domain"].double() * (rank + 1))
            loader.mixer.step()
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"ids": ids, "domains": domains, "p": loader.mixer.proportions.tolist()}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_ranks_read_disjoint_shards_of_every_domain(tmp_path, num_workers):
    _spawn(_rank_main, tmp_path, num_workers)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["ids"] and r1["ids"]
    assert not set(r0["ids"]) & set(r1["ids"]), "ranks must not read the same samples"
    assert len(set(r0["ids"])) == len(r0["ids"]), "no sample repeats within a rank's pass"
    assert r0["domains"] != r1["domains"], "each rank draws its own domain sequence (the rank is in the draw key)"
    assert r0["p"] == r1["p"]


def _resume_main(rank: int, world: int, port: int, out_dir: str) -> None:
    from conftest import ChaseLoss

    _init(rank, world, port)
    try:
        data = {f"d{k}": [{"id": k * 10_000 + i} for i in range(300)] for k in range(3)}

        def make():
            return odm.MixtureLoader(data, batch_size=4, policy=ChaseLoss(), num_workers=2, seed=1)

        def run(loader, n, it=None):
            out, it = [], it or iter(loader)
            for _ in range(n):
                batch = next(it)
                loader.mixer.observe(batch, (batch["id"] % 5).double() + rank)
                loader.mixer.step()
                out.append(batch["id"].tolist())
            return out, it

        first = make()
        _, it = run(first, 5)
        if rank == 0:  # rank 0 alone: no collective, so no hang
            torch.save(first.state_dict(), f"{out_dir}/ckpt.pt")
        expected, _ = run(first, 6, it)
        dist.barrier()
        resumed = make()
        resumed.load_state_dict(torch.load(f"{out_dir}/ckpt.pt", weights_only=True))  # rank 0's file
        got, _ = run(resumed, 6)
        with open(f"{out_dir}/resume{rank}.json", "w") as f:
            json.dump({"expected": expected, "got": got}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_every_rank_resumes_exactly_from_the_checkpoint_rank_zero_alone_wrote(tmp_path):
    _spawn(_resume_main, tmp_path)
    for r in range(2):
        res = json.loads((tmp_path / f"resume{r}.json").read_text())
        assert res["got"] == res["expected"], f"rank {r} resumed differently"


def _stop_main(rank: int, world: int, port: int, out_dir: str, exhausted: str) -> None:
    _init(rank, world, port)
    try:
        from test_reliability_loader import uneven_sources

        loader = odm.MixtureLoader(uneven_sources(), batch_size=4, seed=3, exhausted=exhausted)
        steps = []
        for batch in loader:
            loader.mixer.observe(batch, batch["domain"].double())
            loader.mixer.step()
            steps.append((batch["mix_step"], batch["id"].tolist()))
        with open(f"{out_dir}/{exhausted}{rank}.json", "w") as f:
            json.dump(steps, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("exhausted", ["stop", "drop"])
def test_ranks_whose_shards_run_out_on_different_batches_stop_together(tmp_path, exhausted):
    from test_reliability_loader import uneven_sources

    # Each rank's stream alone (its shard, without torch.distributed): they run out on different batches.
    alone = []
    for r in range(2):
        loader = odm.MixtureLoader(
            uneven_sources(), batch_size=4, seed=3, exhausted=exhausted, dp_rank=r, dp_world_size=2
        )
        alone.append([(b["mix_step"], b["id"].tolist()) for b in loader])
    assert len(alone[0]) != len(alone[1])
    n = min(len(a) for a in alone)
    _spawn(_stop_main, tmp_path, exhausted)
    for r in range(2):
        got = [tuple(s) for s in json.loads((tmp_path / f"{exhausted}{r}.json").read_text())]
        assert [(s, ids) for s, ids in got] == [(s, ids) for s, ids in alone[r][:n]], f"rank {r}"


def _disagree_main(rank: int, world: int, port: int, out_dir: str) -> None:
    _init(rank, world, port)
    data = {"a": list(range(64)), "b": list(range(100, 164))}
    cases = {  # each rank builds its loader from its own settings, as a buggy script would
        "seed": {"seed": 5 + rank},
        "batch_size": {"batch_size": 4 + 4 * rank},
        "num_workers": {"num_workers": 0 if rank == 0 else 1},
        "granularity": {"granularity": ("sample", "batch")[rank]},
    }
    errors = {}
    try:
        for name, kwargs in cases.items():
            loader = odm.MixtureLoader(data, **{"batch_size": 4, **kwargs})
            try:
                iter(loader)
                errors[name] = None
            except ValueError as err:
                errors[name] = str(err)
        # Before any step, under DDP, rank 0 alone cannot know the other ranks' positions: a clear error.
        loader = odm.MixtureLoader(data, batch_size=4)
        next(iter(loader))
        if rank == 0:
            try:
                loader.state_dict()
                errors["state_dict"] = None
            except RuntimeError as err:
                errors["state_dict"] = str(err)
        with open(f"{out_dir}/errors{rank}.json", "w") as f:
            json.dump(errors, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_that_disagree_fail_on_every_rank_naming_the_field_and_each_value(tmp_path):
    _spawn(_disagree_main, tmp_path)
    values = {
        "seed": ("5", "6"),
        "batch_size": ("4", "8"),
        "num_workers": ("0", "1"),
        "granularity": ("sample", "batch"),
    }
    for r in range(2):
        errors = json.loads((tmp_path / f"errors{r}.json").read_text())
        for name, (v0, v1) in values.items():
            assert errors[name] is not None, f"rank {r}: differing {name} was accepted"
            assert f"loader.{name}" in errors[name], errors[name]
            for rank, value in ((0, v0), (1, v1)):  # strings may be shown quoted or not
                assert re.search(rf"rank {rank}: '?{value}'?[;)]", errors[name]), errors[name]
    state_error = json.loads((tmp_path / "errors0.json").read_text())["state_dict"]
    assert state_error is not None and "loader.mixer.step()" in state_error
