"""Online data mixing in a Lightning Fabric loop: the same mixer calls as any hand-written loop.

    python examples/fabric_loop.py                      # EXP3 on three synthetic domains, a few seconds on CPU
    python examples/fabric_loop.py --policy aioli       # a policy that asks for held-out losses

Per step: ``mixer.observe(batch, per_sample_losses)`` (no host sync), then — only when the policy asks —
``mixer.observe_eval(*evaluate_domains(...))``, then ``mixer.step()`` (one all_reduce under DDP, then the
update). The loader's ``state_dict()`` checkpoints the mixer and the stream positions, cut at the last batch the
mixer stepped on — exact however far ahead the loop or its workers fetch, and under DDP the file rank 0 writes
resumes every rank (``state_dict()`` is not a collective, so saving on rank 0 alone is fine too).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from torch import nn

import odm
from odm.stats import evaluate_domains

DOMAINS = ("easy", "hard", "noise")


def make_domains(n: int = 2048, seed: int = 0) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    """Train samples ``{"x", "y"}`` and held-out batches per domain: a linear rule, a non-linear one, noise."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, generator=g) / 4
    train, held = {}, {}
    for name in DOMAINS:
        x = torch.randn(n + 128, 16, generator=g)
        y = {"easy": 2 * (x @ w), "hard": torch.sin(3 * (x @ w)) + x[:, 0] * x[:, 1]}.get(name)
        y = 2 * torch.randn(n + 128, generator=g) if y is None else y
        train[name] = [{"x": x[i], "y": y[i]} for i in range(n)]
        held[name] = [(x[n + i : n + i + 64], y[n + i : n + i + 64]) for i in (0, 64)]
    return train, held


def per_sample_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x).squeeze(-1) - y).pow(2)


def main(*, policy: str = "exp3", steps: int = 300, batch_size: int = 32, checkpoint: Path | None = None) -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    fabric.seed_everything(0)
    train, held = make_domains()
    mixture = odm.MixtureLoader(train, batch_size=batch_size, policy=policy, seed=0)
    mixer = mixture.mixer
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(mixture)

    for step, batch in enumerate(loader, start=1):
        losses = per_sample_loss(model, batch["x"], batch["y"])
        optimizer.zero_grad()
        fabric.backward(losses.mean())
        optimizer.step()

        mixer.observe(batch, losses)  # per-domain sums stay on the loss's device
        if mixer.wants_eval():  # only policies that need held-out loss (Aioli, Skill-It) ever ask
            model.eval()
            mixer.observe_eval(*evaluate_domains(lambda b: per_sample_loss(model, *b), held, device=fabric.device))
            model.train()
        mixer.step()  # reduce, update the policy, publish the next proportions

        if step % 100 == 0:
            share = "  ".join(f"{d}={p:.2f}" for d, p in zip(mixer.domains, mixer.proportions))
            fabric.print(f"step {step:4d}  loss {losses.mean().item():.3f}  proportions {share}")
        if step == steps:
            break

    path = checkpoint or Path(tempfile.mkdtemp()) / "mixing.ckpt"
    fabric.save(path, {"model": model, "optimizer": optimizer, "mixture": mixture})

    # Resume: fresh objects, fabric.load restores them in place; the stream continues after the last batch.
    again = odm.MixtureLoader(train, batch_size=batch_size, policy=policy, seed=0)
    fabric.load(path, {"mixture": again})
    nxt = next(iter(again))
    assert nxt["mix_step"] == steps and again.mixer.export_schedule() == mixer.export_schedule()
    fabric.print(f"saved {path}; a resumed loader continues at batch {nxt['mix_step']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="exp3", help=f"one of {odm.policies.policy_names()}")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    main(policy=args.policy, steps=args.steps)
