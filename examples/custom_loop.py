"""A plain PyTorch training loop with online data mixing.

The lines marked ``# odm`` are all this loop adds to an ordinary one (6 lines): a ``MixtureLoader`` instead
of a ``DataLoader``, per-sample losses, ``observe`` + ``step`` after each optimiser step, and the mixer's state
in the checkpoint.

    python examples/custom_loop.py --policy exp3 --steps 300
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import odm


def make_domains(n: int = 2048, dim: int = 8, seed: int = 0) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Three regression domains: a linear rule, a non-linear rule, and pure noise (nothing to learn)."""
    w = torch.randn(dim, generator=torch.Generator().manual_seed(1234))  # the rules are fixed; samples vary
    g = torch.Generator().manual_seed(seed)
    x = {d: torch.randn(n, dim, generator=g) for d in ("linear", "wavy", "noise")}
    y = {
        "linear": x["linear"] @ w,
        "wavy": torch.sin(2 * x["wavy"] @ w),
        "noise": torch.randn(n, generator=g),
    }
    return {d: list(zip(x[d], y[d])) for d in x}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="exp3", help=f"one of {odm.policies.policy_names()}")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=None, help="save model + loader state here at the end")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    data = make_domains(seed=args.seed)
    # odm: a MixtureLoader over {domain: samples} instead of DataLoader(dataset, batch_size=..., shuffle=True)
    loader = odm.MixtureLoader(data, batch_size=args.batch_size, policy=args.policy, num_workers=args.workers)  # odm
    mixer = loader.mixer  # odm
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.MSELoss(reduction="none")  # odm: per-sample losses (was reduction="mean")

    for step, batch in enumerate(loader):
        if step == args.steps:
            break
        x, y = batch["data"]
        per_sample = loss_fn(model(x).squeeze(-1), y)
        loss = per_sample.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        mixer.observe(batch, per_sample)  # odm: batch carries its domain ids and batch index
        mixer.step()  # odm: one host transfer (and one all_reduce under DDP), then the policy updates
        if step % 100 == 0:
            mix = " ".join(f"{d}={p:.2f}" for d, p in zip(mixer.domains, mixer.proportions))
            print(f"step {step:4d}  loss {loss.item():.3f}  proportions {mix}")

    if args.checkpoint:
        checkpoint = {"model": model.state_dict(), "loader": loader.state_dict()}  # odm: mixer + stream positions
        torch.save(checkpoint, args.checkpoint)

    with torch.no_grad():  # held-out loss per domain on fresh samples
        held_out = make_domains(n=256, seed=args.seed + 1)
        result = {}
        for d, samples in held_out.items():
            x = torch.stack([s[0] for s in samples])
            y = torch.stack([s[1] for s in samples])
            result[d] = float(loss_fn(model(x).squeeze(-1), y).mean())
    print("final proportions:", dict(zip(mixer.domains, mixer.proportions.round(3).tolist())))
    print("held-out loss:    ", {d: round(v, 3) for d, v in result.items()})
    return result


if __name__ == "__main__":
    main()
