"""The built-in demo: a tiny model trained on three synthetic domains under each policy.

Domains: ``easy`` (a linear rule), ``hard`` (a non-linear rule) and ``noise`` (targets are pure noise: its
loss stays high whatever the model does). A policy that chases high loss feeds the model noise; one that
follows learning progress moves away from it.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

import odm

DIM = 16


def make_domains(seed: int, n: int = 4096) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(DIM, generator=g)
    out: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for name in ("easy", "hard", "noise"):
        x = torch.randn(n, DIM, generator=g)
        if name == "easy":
            y = x @ w
        elif name == "hard":
            y = torch.sin(2 * (x @ w)) + (x[:, 0] * x[:, 1])
        else:
            y = torch.randn(n, generator=g) * 2.0
        out[name] = list(zip(x, y))
    return out


def train(policy: str | odm.Policy, *, steps: int, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Trains a small MLP for ``steps`` steps; returns held-out loss per domain, final proportions, seconds."""
    torch.manual_seed(seed)
    data = make_domains(seed)
    train_data = {d: v[:3584] for d, v in data.items()}
    held_out = {d: v[3584:] for d, v in data.items()}
    loader = odm.MixtureLoader(train_data, batch_size=32, policy=policy, seed=seed)
    model = nn.Sequential(nn.Linear(DIM, 64), nn.Tanh(), nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    for step, batch in enumerate(loader):
        if step >= steps:
            break
        x, y = batch["data"]
        loss = (model(x).squeeze(-1) - y).pow(2)  # per-sample losses
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        loader.mixer.observe(batch, loss)
        loader.mixer.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        ev = []
        for d in loader.domains:
            x = torch.stack([s[0] for s in held_out[d]])
            y = torch.stack([s[1] for s in held_out[d]])
            ev.append(float((model(x).squeeze(-1) - y).pow(2).mean()))
    return np.array(ev), loader.mixer.proportions, seconds


def demo_policies() -> list[str]:
    """The registered policies that build from their name alone."""
    names = []
    for name in odm.policies.policy_names():
        try:
            odm.policies.get_policy(name)
        except TypeError:
            continue
        names.append(name)
    return names


def run_demo(*, steps: int = 300, seed: int = 0) -> int:
    domains = list(make_domains(seed))
    print(f"odm demo: {steps} steps per policy, batch 32, domains {domains} (noise cannot be learned)\n")
    header = f"{'policy':<14}" + "".join(f"{'loss/' + d:>12}" for d in domains)
    header += "".join(f"{'p/' + d:>10}" for d in domains) + f"{'seconds':>9}"
    print(header)
    for name in demo_policies():
        losses, p, secs = train(name, steps=steps, seed=seed)
        row = f"{name:<14}" + "".join(f"{v:>12.3f}" for v in losses) + "".join(f"{v:>10.2f}" for v in p)
        print(row + f"{secs:>9.1f}")
    return 0
