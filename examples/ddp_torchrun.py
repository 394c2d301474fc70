"""Online data mixing under DDP, launched by torchrun (CPU, gloo).

Every rank builds the same ``MixtureLoader``: each reads its own shard of every domain, and the mixer's one
``all_reduce`` per step makes the proportions identical on every rank. Rank 0 alone writes the checkpoint.

    torchrun --standalone --nproc_per_node 2 examples/ddp_torchrun.py --steps 50 --out /tmp/odm-ddp

``--out`` gets ``rank<r>.json`` per rank (sample ids read, proportions after each step) and ``loader.pt``.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import odm


def make_domains(n: int = 1024, dim: int = 8) -> dict[str, list[dict[str, torch.Tensor | int]]]:
    """Three regression domains (a linear rule, a non-linear rule, noise); every sample has a unique ``id``."""
    g = torch.Generator().manual_seed(0)  # the same data on every rank: the loader shards it
    w = torch.randn(dim, generator=g)
    out = {}
    for k, name in enumerate(("linear", "wavy", "noise")):
        x = torch.randn(n, dim, generator=g)
        y = {"linear": x @ w, "wavy": torch.sin(2 * x @ w), "noise": torch.randn(n, generator=g)}[name]
        out[name] = [{"x": x[i], "y": y[i], "id": k * 100_000 + i} for i in range(n)]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--policy", default="exp3")
    parser.add_argument("--out", required=True, help="folder for the per-rank records and the checkpoint")
    args = parser.parse_args(argv)

    # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. A short timeout: a hang fails fast.
    dist.init_process_group("gloo", timeout=timedelta(seconds=20))
    rank = dist.get_rank()
    try:
        torch.manual_seed(0)  # the same initial model on every rank (DDP also broadcasts it)
        loader = odm.MixtureLoader(
            make_domains(), batch_size=args.batch_size, policy=args.policy, seed=0, num_workers=args.workers
        )
        model = DistributedDataParallel(nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1)))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        ids, history = [], []
        for _, batch in zip(range(args.steps), loader):  # range first: no batch is fetched past the last step
            per_sample = (model(batch["x"]).squeeze(-1) - batch["y"]) ** 2
            optimizer.zero_grad()
            per_sample.mean().backward()
            optimizer.step()
            loader.mixer.observe(batch, per_sample)
            loader.mixer.step()  # one all_reduce: every rank feeds its policy the same global statistics
            ids.extend(batch["id"].tolist())
            history.append(loader.mixer.proportions.tolist())
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        if rank == 0:  # no collective: rank 0's state holds every rank's stream positions (gathered in step())
            torch.save(loader.state_dict(), out / "loader.pt")
        record = {"rank": rank, "world_size": dist.get_world_size(), "ids": ids, "proportions": history}
        (out / f"rank{rank}.json").write_text(json.dumps(record))
        if rank == 0:
            mix = " ".join(f"{d}={p:.3f}" for d, p in zip(loader.domains, loader.mixer.proportions))
            print(f"world {dist.get_world_size()}, {args.steps} steps, proportions {mix}", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
