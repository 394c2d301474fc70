"""The callback under Lightning DDP (CPU, gloo, 2 processes): ranks agree, log once, see different data.

The test runs this file as a script in a subprocess (Lightning's DDP launcher then starts rank 1 by running the
same command again), because DDP cannot start inside the pytest process. Each rank writes what it saw to JSON.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger
from torch import nn
from toys import DOMAINS, MeanLossSoftmax, toy_sources

import odm
from odm.callbacks import OnlineMixing
from odm.policies import EVAL_LOSS, TRAIN_LOSS, DomainStats

BATCH, STEPS, LOG_EVERY, EVAL_AT = 8, 12, 4, (3, 7)


class EvalRecordingSoftmax(MeanLossSoftmax):
    """The loss-chasing test policy, asking for held-out losses at ``EVAL_AT`` and recording them."""

    requires = frozenset({TRAIN_LOSS, EVAL_LOSS})

    def _init_state(self, num_domains: int) -> None:
        super()._init_state(num_domains)
        self.evals: list[tuple[int, list[float]]] = []

    def wants_eval(self, step: int) -> bool:
        return step in EVAL_AT

    def update(self, stats: DomainStats) -> None:
        if stats.eval_loss is not None:
            self.evals.append((stats.step, stats.eval_loss.tolist()))
        super().update(stats)


class CountingLogger(Logger):
    """Counts ``log_metrics`` calls on the rank it lives on (no ``rank_zero_only``: double logging shows)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.calls: list[int] = []

    @property
    def name(self) -> str:
        return "counting"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append(int(step or 0))


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
        self.seen: list[dict[str, Any]] = []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        losses = (self.net(batch["x"]).squeeze(-1) - batch["y"]).pow(2)
        self.seen.append(
            {
                "mix_step": int(batch["mix_step"]),
                "ids": batch["id"].tolist(),
                "domain": batch["domain"].tolist(),
                "losses": losses.detach().double().tolist(),
            }
        )
        return {"loss": losses.mean(), "sample_losses": losses}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def main(out: Path) -> None:
    """One DDP run; every rank writes ``rank<r>.json``."""
    torch.manual_seed(0)
    loader = odm.MixtureLoader(toy_sources(), batch_size=BATCH, policy=EvalRecordingSoftmax(), seed=0)
    counting = CountingLogger(out)
    # Held-out "losses" that name the rank (1.0 on rank 0, 2.0 on rank 1): the reduced mean must be 1.5.
    held = {d: [torch.zeros(4)] for d in DOMAINS}
    callback = OnlineMixing(
        loader,
        log_every=LOG_EVERY,
        eval_loaders=held,
        eval_fn=lambda module, batch: batch + 1.0 + module.global_rank,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=STEPS,
        callbacks=[callback],
        logger=[CSVLogger(out, name="csv"), counting],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=out,
    )
    model = Regressor()
    trainer.fit(model, train_dataloaders=loader)
    policy = loader.mixer.policy
    assert isinstance(policy, EvalRecordingSoftmax)
    record = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "schedule": loader.mixer.export_schedule(),
        "proportions": loader.mixer.proportions.tolist(),
        "evals": policy.evals,
        "log_calls": counting.calls,
        "seen": model.seen,
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
    trainer.strategy.barrier()  # rank zero (the launched process) exits only after every rank wrote its file


@pytest.mark.slow
def test_under_ddp_ranks_agree_on_proportions_log_once_and_see_different_data(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for _ in range(2):  # a second try only when another process took the rendezvous port first
        done = subprocess.run(
            [sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
        )
        if done.returncode == 0 or "address already in use" not in done.stderr.lower():
            break
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]

    # Same reduced statistics on every rank → identical proportions, bit for bit, and a policy that moved.
    assert ranks[0]["schedule"] == ranks[1]["schedule"]
    assert len(ranks[0]["schedule"]) > 1 and ranks[0]["proportions"] != [1 / 3] * 3

    # Ranks saw different data: the same batch indices, disjoint samples.
    seen = [r["seen"] for r in ranks]
    assert [s["mix_step"] for s in seen[0]] == [s["mix_step"] for s in seen[1]] == list(range(STEPS))
    ids = [{i for s in rank for i in s["ids"]} for rank in seen]
    assert ids[0] and ids[1] and not ids[0] & ids[1]

    # Held-out sums and counts were reduced across ranks: (4·1.0 + 4·2.0) / 8 for every domain.
    assert ranks[0]["evals"] == ranks[1]["evals"] == [[step, [1.5] * 3] for step in EVAL_AT]

    # Logged once: rank zero wrote every LOG_EVERY steps, rank one never.
    steps = list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    assert ranks[0]["log_calls"] == steps and ranks[1]["log_calls"] == []
    files = list(tmp_path.rglob("metrics.csv"))
    assert len(files) == 1
    with files[0].open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("mix/p/noise")]
    assert [int(r["step"]) for r in rows] == steps
    # mix/loss/<domain> is the mean over both ranks' samples of the window (sums and counts all-reduced).
    for w, row in enumerate(rows):
        window = [s for rank in seen for s in rank[w * LOG_EVERY : (w + 1) * LOG_EVERY]]
        dom = np.concatenate([s["domain"] for s in window])
        loss = np.concatenate([s["losses"] for s in window])
        for k, d in enumerate(DOMAINS):
            if (dom == k).any():
                assert float(row[f"mix/loss/{d}"]) == pytest.approx(loss[dom == k].mean(), rel=1e-6)
    schedule_p = ranks[0]["proportions"]
    assert [float(rows[-1][f"mix/p/{d}"]) for d in DOMAINS] == pytest.approx(schedule_p)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
