"""Data-parallel groups: 4 gloo processes as 2 data-parallel x 2 tensor-parallel ranks.

Rank ``r`` is data-parallel rank ``r // 2`` and tensor-parallel rank ``r % 2``. The two ranks of a tensor-parallel
group must see the same batches; the two data-parallel ranks disjoint shards; the statistics of each replica
must count once (not once per tensor-parallel rank); and the proportions must agree on all four ranks.
"""

from __future__ import annotations

import json
import socket
from datetime import timedelta

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

import odm

DP, TP = 2, 2
STEPS, BATCH = 12, 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, out_dir: str, num_workers: int) -> None:
    from conftest import Recorder

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=DP * TP, timeout=timedelta(seconds=20)
    )
    try:
        # Every rank creates every group, in the same order (torch.distributed requires it).
        dp_groups = [dist.new_group([t + TP * d for d in range(DP)]) for t in range(TP)]
        dp_rank, tp_rank = rank // TP, rank % TP
        data = {f"d{k}": [{"id": k * 10_000 + i} for i in range(400)] for k in range(3)}
        recorder = Recorder()
        loader = odm.MixtureLoader(
            data,
            batch_size=BATCH,
            policy=recorder,
            num_workers=num_workers,
            seed=0,
            dp_rank=dp_rank,
            dp_world_size=DP,
            process_group=dp_groups[tp_rank],
        )
        ids, proportions = [], []
        for _, batch in zip(range(STEPS), loader):
            ids.append(batch["id"].tolist())
            # Replicas see different losses; the two ranks of one replica compute the same ones (as under TP).
            loader.mixer.observe(batch, batch["domain"].double() * (dp_rank + 1) + 0.1)
            loader.mixer.step()
            proportions.append(loader.mixer.proportions.tolist())
        counts = [s.count.tolist() for s in recorder.seen]
        loss_sums = [s.loss_sum.tolist() for s in recorder.seen]
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"ids": ids, "p": proportions, "counts": counts, "loss_sums": loss_sums}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_data_parallel_by_two_tensor_parallel_ranks(tmp_path, num_workers):
    mp.spawn(_rank_main, args=(_free_port(), str(tmp_path), num_workers), nprocs=DP * TP, join=True)
    runs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(DP * TP)]
    # Tensor-parallel peers (same data-parallel rank) get identical batches.
    assert runs[0]["ids"] == runs[1]["ids"] and runs[2]["ids"] == runs[3]["ids"]
    # Data-parallel ranks read disjoint shards, none twice.
    first = [i for b in runs[0]["ids"] for i in b]
    second = [i for b in runs[2]["ids"] for i in b]
    assert not set(first) & set(second)
    assert len(set(first)) == len(first) == STEPS * BATCH
    # Each replica counts once: every update saw 2 replicas x BATCH samples, not 4 x BATCH.
    for run in runs:
        assert [sum(c) for c in run["counts"]] == [DP * BATCH] * STEPS
    # The statistics are the two replicas' (slow reference: recompute them from the ids each replica read).
    for step in range(STEPS):
        expected = np.zeros(3)
        for dp_rank, run in ((0, runs[0]), (1, runs[2])):
            for i in run["ids"][step]:
                expected[i // 10_000] += (i // 10_000) * (dp_rank + 1) + 0.1
        np.testing.assert_allclose(runs[0]["loss_sums"][step], expected)
    # Proportions agree on every rank after every step, and they moved.
    assert runs[0]["p"] == runs[1]["p"] == runs[2]["p"] == runs[3]["p"]
    assert runs[0]["p"][-1] != runs[0]["p"][0]
