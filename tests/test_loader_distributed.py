"""Two real ranks (gloo, two processes) reading one mixture: disjoint data, identical proportions."""

import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import odm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out_dir: str, num_workers: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        data = {f"d{k}": [{"id": k * 10_000 + i} for i in range(400)] for k in range(3)}
        loader = odm.MixtureLoader(data, batch_size=8, num_workers=num_workers, seed=0)
        ids = []
        # 20 batches of 8 stay inside each rank's first pass (200 samples per domain and rank).
        for _, batch in zip(range(20), loader):
            ids.extend(batch["id"].tolist())
            # Ranks see different losses; the all-reduced statistics keep the proportions equal.
            loader.mixer.observe(batch, batch["domain"].double() * (rank + 1))
            loader.mixer.step()
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"ids": ids, "p": loader.mixer.proportions.tolist()}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_ranks_read_disjoint_shards_of_every_domain(tmp_path, num_workers):
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path), num_workers), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["ids"] and r1["ids"]
    assert not set(r0["ids"]) & set(r1["ids"]), "ranks must not read the same samples"
    assert len(set(r0["ids"])) == len(r0["ids"]), "no sample repeats within a rank's pass"
    assert r0["p"] == r1["p"]


def _resume_main(rank: int, world: int, port: int, out_dir: str) -> None:
    from conftest import ChaseLoss

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        data = {f"d{k}": [{"id": k * 10_000 + i} for i in range(300)] for k in range(3)}

        def make():
            return odm.MixtureLoader(data, batch_size=4, policy=ChaseLoss(), num_workers=2, seed=1)

        def run(loader, n):
            out, it = [], iter(loader)
            for _ in range(n):
                batch = next(it)
                loader.mixer.observe(batch, (batch["id"] % 5).double() + rank)
                loader.mixer.step()
                out.append(batch["id"].tolist())
            return out

        first = make()
        run(first, 5)
        state = first.state_dict()  # a collective: every rank's streams end up in rank 0's copy
        if rank == 0:
            torch.save(state, f"{out_dir}/ckpt.pt")
        expected = run(first, 6)
        dist.barrier()
        resumed = make()
        resumed.load_state_dict(torch.load(f"{out_dir}/ckpt.pt", weights_only=True))  # rank 0's file
        got = run(resumed, 6)
        with open(f"{out_dir}/resume{rank}.json", "w") as f:
            json.dump({"expected": expected, "got": got}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_every_rank_resumes_exactly_from_the_checkpoint_rank_zero_wrote(tmp_path):
    mp.spawn(_resume_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        res = json.loads((tmp_path / f"resume{r}.json").read_text())
        assert res["got"] == res["expected"], f"rank {r} resumed differently"
