"""Exact resume under Lightning DDP (CPU, gloo, 2 processes), with the checkpoint between two policy updates.

Three DDP runs of this file as a script (Lightning's launcher starts rank 1 by running the same command again):
``whole`` trains ``STEPS`` steps; ``first`` trains ``BEFORE`` steps and checkpoints; ``rest`` resumes from that
checkpoint to ``STEPS``. On every rank, the batches and proportions of ``first + rest`` must be ``whole``'s.
With ``update_every=UPDATE_EVERY`` the checkpoint after step ``BEFORE`` falls between two updates, so the
losses both ranks observed since the last update must be saved (summed over the ranks) and restored once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from toys import MeanLossSoftmax, toy_sources

import odm
from odm.callbacks import OnlineMixing

BATCH, STEPS, BEFORE, UPDATE_EVERY = 8, 12, 6, 4


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
        self.seen: list[dict[str, Any]] = []
        self.mixer: odm.OnlineMixer | None = None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        losses = (self.net(batch["x"]).squeeze(-1) - batch["y"]).pow(2)
        return {"loss": losses.mean(), "sample_losses": losses}

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        assert self.mixer is not None  # runs after the callbacks' hooks: the proportions after this step
        self.seen.append(
            {"mix_step": int(batch["mix_step"]), "ids": batch["id"].tolist(), "p": self.mixer.proportions.tolist()}
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def main(out: Path, mode: str) -> None:
    torch.manual_seed(0)
    loader = odm.MixtureLoader(
        toy_sources(), batch_size=BATCH, policy=MeanLossSoftmax(), seed=0, update_every=UPDATE_EVERY
    )
    model = Regressor()
    model.mixer = loader.mixer
    callbacks: list[pl.Callback] = [OnlineMixing(loader)]
    if mode == "first":
        callbacks.append(ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=BEFORE, save_top_k=-1))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=BEFORE if mode == "first" else STEPS,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=mode == "first",
        default_root_dir=out / mode,
    )
    ckpt = next((out / "ckpt").glob("*.ckpt")) if mode == "rest" else None
    trainer.fit(model, train_dataloaders=loader, ckpt_path=ckpt)
    (out / f"{mode}{trainer.global_rank}.json").write_text(json.dumps(model.seen))
    trainer.strategy.barrier()


def _launch(out: Path, mode: str) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for _ in range(2):  # a second try only when another process took the rendezvous port first
        done = subprocess.run(
            [sys.executable, __file__, str(out), mode], env=env, capture_output=True, text=True, timeout=300
        )
        if done.returncode == 0 or "address already in use" not in done.stderr.lower():
            break
    assert done.returncode == 0, f"{mode}: {done.stderr[-4000:]}"


@pytest.mark.slow
def test_a_ddp_run_resumed_between_policy_updates_continues_exactly_on_every_rank(tmp_path):
    for mode in ("whole", "first", "rest"):
        _launch(tmp_path, mode)
    for rank in (0, 1):
        whole, first, rest = (
            json.loads((tmp_path / f"{m}{rank}.json").read_text()) for m in ("whole", "first", "rest")
        )
        assert [s["mix_step"] for s in whole] == list(range(STEPS))
        assert len(first) == BEFORE and len(rest) == STEPS - BEFORE
        for i, (a, b) in enumerate(zip(whole, first + rest, strict=True)):
            assert a == b, f"rank {rank}, step {i} differs after resume"
    whole0, whole1 = (json.loads((tmp_path / f"whole{r}.json").read_text()) for r in (0, 1))
    assert [s["p"] for s in whole0] == [s["p"] for s in whole1], "ranks agree on the proportions"
    assert not {i for s in whole0 for i in s["ids"]} & {i for s in whole1 for i in s["ids"]}, "and see other data"
    # the update after the checkpoint (step 8) moved the proportions: the pending losses mattered
    assert whole0[BEFORE + 1]["p"] != whole0[BEFORE - 1]["p"]


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
