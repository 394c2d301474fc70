"""One training run: a tiny byte-level LM trained under one policy, measured on the test split along the way."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from model import ByteLM, LMConfig, per_sequence_loss

import odm

from .data import ByteWindows, Corpus, eval_windows, evaluate

try:
    from tqdm.auto import tqdm
except ImportError:  # tqdm is a `bench` extra; without it, no progress bars
    tqdm = None

__all__ = ["LN2", "QUICK", "QUICK_MODEL", "RunConfig", "train_run"]

LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    # full run: 23 configurations x 3 seeds x 800 steps x ~0.2 s ≈ 3 CPU-hours (--jobs 2: ~1.5 h on 2 cores)
    steps: int = 800
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 50
    eval_every: int = 40
    eval_windows: int = 48  # per domain, for the reported held-out loss
    policy_eval_windows: int = 16  # per domain, for policies' own held-out evaluations
    model: LMConfig = dataclasses.field(default_factory=LMConfig)


def train_run(
    policy: odm.Policy,
    corpus: Corpus,
    cfg: RunConfig,
    *,
    seed: int,
    label: str = "",
    progress: bool = True,
    on_eval: Callable[[int, np.ndarray], None] | None = None,
) -> dict[str, Any]:
    """Trains one model under ``policy``; returns the curve, the proportions and the timings."""
    torch.manual_seed(seed)
    length = cfg.model.context + 1
    sources = {d: ByteWindows(corpus.train[d], length) for d in corpus.domains}
    loader = odm.MixtureLoader(sources, batch_size=cfg.batch_size, policy=policy, seed=seed)
    mixer = loader.mixer
    # The reported scores come from the test split only; a policy's own held-out evaluations (Aioli, Skill-It)
    # from the feedback split: different documents of different source groups (see corpus.py).
    measure = [eval_windows(corpus.test[d], length, cfg.eval_windows) for d in corpus.domains]
    held_out = [eval_windows(corpus.feedback[d], length, cfg.policy_eval_windows) for d in corpus.domains]
    model = ByteLM(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, frac))))

    wants_eval = getattr(mixer, "wants_eval", None)
    observe_eval = getattr(mixer, "observe_eval", None)
    curve: list[tuple[int, list[float]]] = []
    proportions: list[list[float]] = []
    k = len(corpus.domains)
    smoothed = np.full(k, np.nan)  # per-domain EMA of the training loss (nats), DoReMi's reference curve
    train_curve = np.zeros((cfg.steps, k))
    train_seconds = train_cpu_seconds = policy_eval_seconds = measure_seconds = 0.0
    num_policy_evals = 0
    bar = tqdm(total=cfg.steps, desc=f"{label} seed {seed}", leave=False, disable=not progress) if tqdm else None
    tick, cpu_tick = time.perf_counter(), time.process_time()
    for step, batch in enumerate(loader):
        if step >= cfg.steps:
            break
        proportions.append(mixer.schedule.lookup(int(batch["mix_step"]))[0].tolist())  # what it was drawn under
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = per_sequence_loss(model, batch["data"])
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        opt.step()
        mixer.observe(batch, loss)
        per_domain = np.bincount(batch["domain"].numpy(), weights=loss.detach().double().numpy(), minlength=k)
        seen = np.bincount(batch["domain"].numpy(), minlength=k)
        fresh = per_domain / np.maximum(seen, 1)
        smoothed = np.where(seen > 0, np.where(np.isnan(smoothed), fresh, 0.9 * smoothed + 0.1 * fresh), smoothed)
        train_curve[step] = smoothed
        if wants_eval is not None and observe_eval is not None and wants_eval():
            t0 = time.perf_counter()
            sums, counts = evaluate(model, held_out)
            observe_eval(sums, counts)
            policy_eval_seconds += time.perf_counter() - t0
            num_policy_evals += 1
        mixer.step()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            train_seconds += time.perf_counter() - tick
            train_cpu_seconds += time.process_time() - cpu_tick
            t0 = time.perf_counter()
            sums, counts = evaluate(model, measure)
            measure_seconds += time.perf_counter() - t0
            bpb = sums / counts / LN2
            curve.append((step + 1, np.round(bpb, 5).tolist()))
            if on_eval is not None:
                on_eval(step + 1, bpb)
            if bar is not None:
                bar.set_postfix(mean_bpb=f"{bpb.mean():.3f}")
            tick, cpu_tick = time.perf_counter(), time.process_time()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    final = np.array(curve[-1][1])
    return {
        "curve": curve,
        "proportions": proportions,
        "final_bpb": final.tolist(),
        "final_nats": (final * LN2).tolist(),
        "train_curve": train_curve,
        "train_seconds": train_seconds,  # training steps + the policy's own evaluations (wall-clock)
        "train_cpu_seconds": train_cpu_seconds,  # the same, CPU time of this process (robust to a busy machine)
        "policy_eval_seconds": policy_eval_seconds,
        "num_policy_evals": num_policy_evals,
        "measure_seconds": measure_seconds,  # the benchmark's own held-out measurements
    }


QUICK = dict(steps=200, eval_every=20, eval_windows=64, policy_eval_windows=16, warmup=20)
QUICK_MODEL = LMConfig(num_layers=2, width=64, num_heads=4, context=64)
