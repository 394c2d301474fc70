"""Exact resume through Lightning: stop at step N with a checkpoint, resume with ``ckpt_path``, and the batches,
proportions and weights equal an uninterrupted run's (Lightning fetches one batch ahead; workers prefetch)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from toys import toy_sources

import odm
from odm.callbacks import OnlineMixing
from odm.policies import Policy, get_policy

BATCH = 8
BEFORE, AFTER = 9, 9


def make_policy(name: str) -> Policy:
    return get_policy(name, eta=0.5) if name == "exp3" else get_policy(name)


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        losses = (self.net(batch["x"]).squeeze(-1) - batch["y"]).pow(2)
        return {"loss": losses.mean(), "sample_losses": losses}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class Trajectory(pl.Callback):
    """Per optimizer step: the batch's ``mix_step``, a hash of its content, and the proportions after the step."""

    def __init__(self, mixer: odm.OnlineMixer) -> None:
        self.mixer = mixer
        self.steps: list[tuple[int, str, list[float]]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
        h = hashlib.sha256()
        for key in ("domain", "id", "x", "y"):
            h.update(batch[key].numpy().tobytes())
        self.steps.append((int(batch["mix_step"]), h.hexdigest()[:16], self.mixer.proportions.tolist()))


def fit(
    tmp_path: Path,
    policy: str,
    num_workers: int,
    max_steps: int,
    *,
    give: str = "loader",
    update_every: int = 1,
    num_batches: int | None = None,
    max_epochs: int | None = None,
    **kwargs: Any,
) -> tuple[Any, ...]:
    torch.manual_seed(0)
    granularity = "batch" if policy == "odm" else "sample"
    loader = odm.MixtureLoader(
        toy_sources(),
        batch_size=BATCH,
        policy=make_policy(policy),
        num_workers=num_workers,
        granularity=granularity,
        update_every=update_every,
        num_batches=num_batches,
    )
    model = Regressor()
    record = Trajectory(loader.mixer)
    callbacks = [OnlineMixing(loader if give == "loader" else loader.mixer), record, *kwargs.pop("callbacks", [])]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
    )
    trainer.fit(model, train_dataloaders=loader, **kwargs)
    return record.steps, loader.mixer, model


@pytest.mark.slow
@pytest.mark.parametrize(
    ("policy", "num_workers", "give", "every"),
    # every=4: the checkpoint after step 9 falls between two policy updates (the losses of step 9 are pending)
    [("exp3", 0, "loader", 1), ("exp3", 2, "loader", 1), ("odm", 0, "mixer", 1), ("exp3", 0, "loader", 4)],
)
def test_a_run_resumed_from_a_mid_run_checkpoint_matches_an_uninterrupted_run(
    tmp_path, policy, num_workers, give, every
):
    run = {"give": give, "update_every": every}
    whole, whole_mixer, whole_model = fit(tmp_path / "whole", policy, num_workers, BEFORE + AFTER, **run)

    save = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=BEFORE, save_top_k=-1)
    first, _, _ = fit(tmp_path / "first", policy, num_workers, BEFORE, callbacks=[save], **run)
    ckpt = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert [p.name for p in ckpt] == [f"epoch=0-step={BEFORE}.ckpt"]
    rest, rest_mixer, rest_model = fit(tmp_path / "rest", policy, num_workers, BEFORE + AFTER, ckpt_path=ckpt[0], **run)

    assert [s[0] for s in whole] == list(range(BEFORE + AFTER))
    assert len(first) == BEFORE and len(rest) == AFTER
    for i, (a, b) in enumerate(zip(whole, first + rest)):
        assert a == b, f"step {i} differs after resume: {a} != {b}"
    assert whole_mixer.export_schedule() == rest_mixer.export_schedule()
    for pa, pb in zip(whole_model.parameters(), rest_model.parameters()):
        assert torch.equal(pa, pb)
    moved = np.abs(np.array(whole[-1][2]) - 1 / 3).max()
    assert moved > 0.01, f"the policy barely moved ({whole[-1][2]}): the test would not catch a wrong resume"


@pytest.mark.slow
def test_epochs_of_num_batches_end_and_a_resume_mid_epoch_continues_exactly(tmp_path):
    epochs = {"num_batches": 6, "max_epochs": 3}
    whole, whole_mixer, _ = fit(tmp_path / "whole", "exp3", 2, -1, **epochs)
    assert [s[0] for s in whole] == list(range(18)), "three epochs of six batches, then fit() ends"
    save = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=1)
    fit(tmp_path / "first", "exp3", 2, 4, callbacks=[save], **epochs)  # stops mid epoch 0
    ckpt = next((tmp_path / "ckpt").glob("*.ckpt"))
    rest, rest_mixer, _ = fit(tmp_path / "rest", "exp3", 2, -1, ckpt_path=ckpt, **epochs)
    assert rest == whole[4:]
    assert rest_mixer.export_schedule() == whole_mixer.export_schedule()


class LoaderAtSave(pl.Callback):
    """Records, at checkpoint time, the mixer's cut and the loader state's next batch."""

    def __init__(self) -> None:
        self.at_save: list[tuple[int, int]] = []

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        loader = trainer.train_dataloader
        self.at_save.append((loader.mixer.cut_batch, loader.state_dict()["next_batch"]))


@pytest.mark.slow
def test_the_checkpoint_holds_the_loader_cut_at_the_last_stepped_batch_and_the_mixer_once(tmp_path):
    save = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=BEFORE, save_top_k=-1)
    probe = LoaderAtSave()
    fit(tmp_path / "first", "exp3", 2, BEFORE, callbacks=[probe, save])
    # Lightning's fetcher (and two workers) had taken batches past BEFORE - 1; the state stops at the cut.
    assert probe.at_save == [(BEFORE - 1, BEFORE)]
    ckpt = torch.load(next((tmp_path / "ckpt").glob("*.ckpt")), weights_only=True)
    (saved,) = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]  # Lightning saved it by itself
    assert saved["next_batch"] == BEFORE and saved["mixer"]["num_steps"] == BEFORE
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("OnlineMixing")]
    assert state["mixer"] is None, "the mixer is saved once, inside the loader's state"
