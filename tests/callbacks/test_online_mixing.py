"""The Lightning callback on a real Trainer (CPU): feedback, gradient accumulation, logging, evaluation, errors."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from toys import DOMAINS, MeanLossSoftmax

import odm
from odm.callbacks import OnlineMixing
from odm.policies import EVAL_LOSS, TRAIN_LOSS, DomainStats, Policy

BATCH = 8


def toy_sources(seed: int = 0, n: int = 512) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Three regression domains — a linear rule, a non-linear rule, pure noise (cannot be learned) — as train
    samples ``{"x", "y", "id"}`` and held-out tensors ``(x, y)`` of 64 samples each."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, generator=g) / 4
    train, held = {}, {}
    for k, name in enumerate(DOMAINS):
        x = torch.randn(n + 64, 16, generator=g)
        if name == "easy":
            y = 2 * (x @ w)
        elif name == "hard":
            y = torch.sin(3 * (x @ w)) + x[:, 0] * x[:, 1]
        else:
            y = 2 * torch.randn(n + 64, generator=g)
        train[name] = [{"x": x[i], "y": y[i], "id": k * 100_000 + i} for i in range(n)]
        held[name] = (x[n:], y[n:])
    return train, held


class Regressor(pl.LightningModule):
    """A small MLP; returns per-sample losses (or only the scalar loss with ``scalar=True``)."""

    def __init__(self, *, scalar: bool = False, lr: float = 1e-2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
        self.scalar = scalar
        self.lr = lr
        self.losses_seen: list[tuple[int, float, int]] = []  # (domain of the batch, mean loss, batch size)

    def sample_losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (self.net(x).squeeze(-1) - y).pow(2)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
        losses = self.sample_losses(batch["x"], batch["y"])
        if self.scalar:
            self.losses_seen.append((int(batch["domain"][0]), float(losses.detach().mean()), len(losses)))
            return losses.mean()
        return {"loss": losses.mean(), "sample_losses": losses}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Recorder(Policy):
    """Uniform proportions; records every update's statistics. Asks for held-out losses at ``eval_at`` updates."""

    requires = frozenset({TRAIN_LOSS})

    def __init__(self, eval_at: tuple[int, ...] = (), on_update: Any = None) -> None:
        super().__init__()
        self.eval_at = eval_at
        self.on_update = on_update
        self.updates: list[DomainStats] = []
        self.extra: list[Any] = []

    def _init_state(self, num_domains: int) -> None:
        self._p = np.full(num_domains, 1.0 / num_domains)

    def wants_eval(self, step: int) -> bool:
        return step in self.eval_at

    def update(self, stats: DomainStats) -> None:
        self.updates.append(stats)
        if self.on_update is not None:
            self.extra.append(self.on_update())


class AsksForEval(Recorder):
    requires = frozenset({TRAIN_LOSS, EVAL_LOSS})


def trainer(tmp_path: Path, *, max_steps: int, callbacks: list[Any], **kwargs: Any) -> pl.Trainer:
    kwargs.setdefault("logger", False)
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


def read_csv_metrics(path: Path) -> list[dict[str, str]]:
    files = list(path.rglob("metrics.csv"))
    assert len(files) == 1, files
    with files[0].open() as f:
        return list(csv.DictReader(f))


class SeenLosses(pl.Callback):
    """Records each step's domain ids and per-sample losses, as the model returned them."""

    def __init__(self) -> None:
        self.steps: list[tuple[np.ndarray, np.ndarray]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
        self.steps.append((batch["domain"].numpy(), outputs["sample_losses"].detach().double().numpy()))


def test_proportions_move_toward_the_noise_domain_and_per_domain_metrics_reach_the_csv_logger(tmp_path):
    torch.manual_seed(0)
    train, _ = toy_sources()
    loader = odm.MixtureLoader(train, batch_size=BATCH, policy=MeanLossSoftmax(), seed=0)
    steps, log_every = 60, 10
    seen = SeenLosses()
    logger = CSVLogger(tmp_path, name="run")
    callbacks = [OnlineMixing(loader, log_every=log_every), seen]
    trainer(tmp_path, max_steps=steps, callbacks=callbacks, logger=logger).fit(Regressor(), train_dataloaders=loader)

    p = loader.mixer.proportions
    assert loader.mixer.num_updates == steps
    assert p.argmax() == DOMAINS.index("noise") and p[2] > 0.5, p  # a loss-chasing policy feeds the noise
    rows = [r for r in read_csv_metrics(tmp_path) if r.get("mix/p/noise")]
    assert [int(r["step"]) for r in rows] == list(range(log_every, steps + 1, log_every))
    for w, r in enumerate(rows):
        assert sum(float(r[f"mix/p/{d}"]) for d in DOMAINS) == pytest.approx(1.0)
        # mix/loss/<domain>: the mean per-sample loss of that domain over the steps since the previous log.
        ids = np.concatenate([d for d, _ in seen.steps[w * log_every : (w + 1) * log_every]])
        losses = np.concatenate([v for _, v in seen.steps[w * log_every : (w + 1) * log_every]])
        for k, d in enumerate(DOMAINS):
            if (ids == k).any():
                assert float(r[f"mix/loss/{d}"]) == pytest.approx(losses[ids == k].mean(), rel=1e-6)
            else:
                assert r[f"mix/loss/{d}"] == ""  # not drawn in this window: not logged
    assert [float(rows[-1][f"mix/p/{d}"]) for d in DOMAINS] == pytest.approx(p.tolist())
    assert float(rows[-1]["mix/loss/noise"]) > float(rows[-1]["mix/loss/easy"])


def test_the_callback_feeds_the_mixer_exactly_what_a_hand_written_loop_feeds_it(tmp_path):
    steps = 25
    train, _ = toy_sources()

    torch.manual_seed(0)
    loader = odm.MixtureLoader(train, batch_size=BATCH, policy=MeanLossSoftmax(), seed=3)
    trainer(tmp_path, max_steps=steps, callbacks=[OnlineMixing(loader)]).fit(Regressor(), train_dataloaders=loader)

    # Reference: the same model, optimiser and data in a plain loop that calls the mixer itself.
    torch.manual_seed(0)
    ref = odm.MixtureLoader(train, batch_size=BATCH, policy=MeanLossSoftmax(), seed=3)
    model = Regressor()
    opt = model.configure_optimizers()
    for i, batch in enumerate(ref):
        if i == steps:
            break
        losses = model.sample_losses(batch["x"], batch["y"])
        opt.zero_grad()
        losses.mean().backward()
        opt.step()
        ref.mixer.observe(batch, losses)
        ref.mixer.step()

    got, want = loader.mixer.export_schedule(), ref.mixer.export_schedule()
    assert len(got) == len(want) > 1
    for (s1, p1), (s2, p2) in zip(got, want):
        assert s1 == s2
        np.testing.assert_allclose(p1, p2, rtol=0, atol=1e-12)


def test_with_gradient_accumulation_the_mixer_steps_once_per_optimizer_step_on_every_micro_batch(tmp_path):
    train, _ = toy_sources()
    policy = Recorder()
    loader = odm.MixtureLoader(train, batch_size=BATCH, policy=policy)
    trainer(tmp_path, max_steps=5, callbacks=[OnlineMixing(loader)], accumulate_grad_batches=3).fit(
        Regressor(), train_dataloaders=loader
    )
    assert loader.mixer.num_steps == 5
    assert [u.count.sum() for u in policy.updates] == [3 * BATCH] * 5


def test_a_scalar_loss_is_enough_for_one_domain_batches_and_is_not_scaled_by_accumulation(tmp_path):
    train, _ = toy_sources()
    policy = Recorder()
    loader = odm.MixtureLoader(train, batch_size=BATCH, policy=policy, granularity="batch")
    model = Regressor(scalar=True)
    trainer(tmp_path, max_steps=4, callbacks=[OnlineMixing(loader)], accumulate_grad_batches=2).fit(
        model, train_dataloaders=loader
    )
    assert len(policy.updates) == 4 and len(model.losses_seen) == 8
    for u, pair in zip(policy.updates, zip(model.losses_seen[::2], model.losses_seen[1::2])):
        want_sum, want_count = np.zeros(3), np.zeros(3)
        for d, mean, n in pair:
            want_sum[d] += mean * n
            want_count[d] += n
        np.testing.assert_allclose(u.loss_sum, want_sum, rtol=1e-6)
        np.testing.assert_array_equal(u.count, want_count)


def test_the_mixers_update_every_updates_the_policy_every_n_optimizer_steps_with_all_losses_in_between(tmp_path):
    train, _ = toy_sources()
    policy = Recorder()
    loader = odm.MixtureLoader(train, batch_size=BATCH, policy=policy, update_every=3)
    trainer(tmp_path, max_steps=9, callbacks=[OnlineMixing(loader)]).fit(Regressor(), train_dataloaders=loader)
    assert loader.mixer.num_steps == 9
    assert [u.count.sum() for u in policy.updates] == [3 * BATCH] * 3


def test_with_update_every_the_callback_evaluates_only_before_the_steps_that_update(tmp_path):
    train, held = toy_sources()
    policy = AsksForEval(eval_at=(1, 2, 3))  # wants held-out losses at every update
    loader = odm.MixtureLoader(train, batch_size=BATCH, policy=policy, update_every=3)
    evaluated_at: list[int] = []

    def eval_fn(module: Regressor, batch: Any) -> torch.Tensor:
        evaluated_at.append(loader.mixer.num_steps + 1)  # the optimizer step this evaluation precedes
        return module.sample_losses(*batch)

    callback = OnlineMixing(loader, eval_loaders=held_out_loaders(held), eval_fn=eval_fn, eval_max_batches=1)
    trainer(tmp_path, max_steps=9, callbacks=[callback]).fit(Regressor(), train_dataloaders=loader)
    assert evaluated_at == [3] * 3 + [6] * 3 + [9] * 3  # one batch of each of 3 domains, at updates only
    assert [u.eval_loss is not None for u in policy.updates] == [True] * 3


def held_out_loaders(held: dict[str, Any], batch_size: int = 16) -> dict[str, Any]:
    return {
        d: torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)
        for d, (x, y) in held.items()
    }


def test_the_policy_gets_held_out_losses_exactly_when_it_asks_in_eval_mode_without_grad(tmp_path):
    train, held = toy_sources()
    model = Regressor()
    model.net.insert(1, nn.Dropout(0.5))
    model.net[1].eval()  # a submodule kept in eval mode on purpose must stay so

    def reference_losses() -> np.ndarray:  # runs inside the update, right after the callback's evaluation
        was = model.training
        model.eval()
        with torch.no_grad():
            out = np.array([float(model.sample_losses(x, y).double().mean()) for x, y in held.values()])
        model.train(was)
        model.net[1].eval()
        return out

    policy = AsksForEval(eval_at=(2, 5, 6), on_update=reference_losses)
    seen: list[tuple[bool, bool]] = []

    def eval_fn(module: Regressor, batch: Any) -> torch.Tensor:
        seen.append((module.training, torch.is_grad_enabled()))
        x, y = batch
        return module.sample_losses(x, y)

    loader = odm.MixtureLoader(train, batch_size=BATCH, policy=policy)
    callback = OnlineMixing(loader, eval_loaders=held_out_loaders(held), eval_fn=eval_fn)
    modes: list[tuple[bool, bool]] = []

    class Modes(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            modes.append((pl_module.training, pl_module.net[1].training))

    trainer(tmp_path, max_steps=7, callbacks=[callback, Modes()]).fit(model, train_dataloaders=loader)

    assert [u.step for u in policy.updates if u.eval_loss is not None] == [2, 5, 6]
    for u, ref in zip(policy.updates, policy.extra):
        if u.eval_loss is not None:
            np.testing.assert_allclose(u.eval_loss, ref, rtol=1e-6)
    assert seen and set(seen) == {(False, False)}
    assert len(seen) == 3 * 3 * 4  # three evaluations, three domains, 64 samples in batches of 16
    assert set(modes) == {(True, False)}


def test_eval_every_evaluates_on_schedule_for_a_policy_that_never_asks(tmp_path):
    train, held = toy_sources()
    policy = Recorder()
    loader = odm.MixtureLoader(train, batch_size=BATCH, policy=policy)
    callback = OnlineMixing(
        loader,
        eval_loaders={"easy": held_out_loaders(held)["easy"]},
        eval_every=3,
        eval_fn=lambda m, b: m.sample_losses(*b),
        eval_max_batches=2,
    )
    trainer(tmp_path, max_steps=7, callbacks=[callback]).fit(Regressor(), train_dataloaders=loader)
    evaluated = [u for u in policy.updates if u.eval_loss is not None]
    assert [u.step for u in evaluated] == [3, 6]
    for u in evaluated:  # only `easy` has held-out data
        assert np.isfinite(u.eval_loss[0]) and np.isnan(u.eval_loss[1:]).all()


class Returns(pl.LightningModule):
    def __init__(self, make: Any) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.make = make

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        losses = (batch["x"].sum(-1) * self.w - batch["y"]).pow(2)
        return self.make(losses)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda losses: losses.mean(), ValueError, "mixes domains"),
        (lambda losses: {"loss": losses.mean(), "sample_losses": losses[:3]}, ValueError, r"shape \[8\]"),
        (lambda losses: {"loss": losses.mean(), "sample_losses": losses.tolist()}, ValueError, "1-D tensor"),
    ],
)
def test_malformed_training_step_outputs_raise_and_show_what_to_return(tmp_path, make, error, match):
    train, _ = toy_sources()
    loader = odm.MixtureLoader(train, batch_size=BATCH)
    with pytest.raises(error, match=match) as info:
        trainer(tmp_path, max_steps=2, callbacks=[OnlineMixing(loader)]).fit(Returns(make), train_dataloaders=loader)
    assert "reduction='none'" in str(info.value) and "sample_losses" in str(info.value)


def test_a_batch_without_domain_ids_raises_a_type_error_naming_the_loader(tmp_path):
    data = [{"x": torch.randn(16), "y": torch.randn(())} for _ in range(32)]
    plain = torch.utils.data.DataLoader(data, batch_size=BATCH)
    mixer = odm.OnlineMixer(DOMAINS)
    with pytest.raises(TypeError, match="MixtureLoader"):
        trainer(tmp_path, max_steps=2, callbacks=[OnlineMixing(mixer)]).fit(
            Returns(lambda v: {"loss": v.mean(), "sample_losses": v}), train_dataloaders=plain
        )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"update_every": 2}, TypeError, "update_every"),  # one cadence: the mixer's
        ({"log_every": -1}, ValueError, "log_every"),
        ({"eval_every": 2}, ValueError, "eval_loaders"),
        ({"eval_loaders": {"easy": []}}, ValueError, "eval_fn"),
        ({"eval_loaders": {"web": []}, "eval_fn": lambda m, b: b}, ValueError, "unknown domains"),
        ({"eval_loaders": [[]], "eval_fn": lambda m, b: b}, TypeError, "mapping"),
    ],
)
def test_bad_arguments_raise_at_construction_naming_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        OnlineMixing(odm.OnlineMixer(DOMAINS), **kwargs)


def test_a_policy_that_requires_held_out_losses_needs_eval_loaders():
    with pytest.raises(ValueError, match="eval_loaders"):
        OnlineMixing(odm.OnlineMixer(DOMAINS, policy=AsksForEval()))
    with pytest.raises(TypeError, match="OnlineMixer or an odm.MixtureLoader"):
        OnlineMixing(DOMAINS)  # type: ignore[arg-type]


def test_importing_odm_does_not_import_lightning():
    import subprocess
    import sys

    code = "import sys, odm, odm.stats; assert 'lightning' not in sys.modules, 'lightning imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import odm.callbacks  # noqa: F401


def test_the_mixer_is_saved_once_by_the_train_loader_and_the_callback_saves_it_only_without_one(tmp_path):
    train, _ = toy_sources()
    loader = odm.MixtureLoader(train, batch_size=BATCH, policy=MeanLossSoftmax())
    callback = OnlineMixing(loader)
    trainer(tmp_path, max_steps=5, callbacks=[callback]).fit(Regressor(), train_dataloaders=loader)
    assert callback.state_dict() == {"version": 2, "mixer": None}  # Lightning saves loader.state_dict()
    assert loader.state_dict()["next_batch"] == 5  # cut at the last batch stepped on, not Lightning's fetch-ahead

    # A mixer driven beside a plain DataLoader: the callback's state holds it.
    mixer = odm.OnlineMixer(DOMAINS, policy=MeanLossSoftmax())
    plain = torch.utils.data.DataLoader(
        [{**s, "domain": k} for k, d in enumerate(DOMAINS) for s in train[d][:64]], batch_size=BATCH, shuffle=True
    )
    alone = OnlineMixing(mixer)
    trainer(tmp_path, max_steps=5, callbacks=[alone]).fit(Regressor(), train_dataloaders=plain)
    state = alone.state_dict()
    assert state["mixer"] is not None and state["mixer"]["num_steps"] == 5
    fresh = odm.OnlineMixer(DOMAINS, policy=MeanLossSoftmax())
    OnlineMixing(fresh).load_state_dict(state)
    assert fresh.export_schedule() == mixer.export_schedule()
    with pytest.raises(ValueError, match="version"):
        alone.load_state_dict({**state, "version": 99})


def test_the_fabric_example_runs_and_resumes_its_loader():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "examples" / "fabric_loop.py"
    spec = importlib.util.spec_from_file_location("fabric_loop", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(steps=40, batch_size=16)  # asserts the resumed loader continues at batch 40


def test_a_callback_driving_another_mixer_than_the_train_loaders_warns(tmp_path):
    train, _ = toy_sources()
    loader = odm.MixtureLoader(train, batch_size=BATCH)
    other = odm.OnlineMixer(DOMAINS)
    with pytest.warns(UserWarning, match="MixtureLoader with another mixer than this OnlineMixing's"):
        trainer(tmp_path, max_steps=2, callbacks=[OnlineMixing(other)]).fit(Regressor(), train_dataloaders=loader)


class PackedLM(pl.LightningModule):
    """A per-token model over packed rows: returns one loss per token (``[B, T]``), as packed LMs do."""

    def __init__(self, vocab: int = 64) -> None:
        super().__init__()
        self.vocab = vocab
        self.emb = nn.Embedding(vocab, 8)
        self.out = nn.Linear(8, vocab)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        ids = batch["input_ids"] % self.vocab
        logits = self.out(self.emb(ids))
        target = torch.roll(ids, -1, dims=1)
        losses = nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # [B, T]
        return {"loss": losses.mean(), "sample_losses": losses}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SeenTokens(pl.Callback):
    def __init__(self) -> None:
        self.steps: list[tuple[np.ndarray, np.ndarray]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
        self.steps.append((batch["token_domain"].numpy(), outputs["sample_losses"].detach().double().numpy()))


def packed_sources(seed: int = 0) -> dict[str, list[list[int]]]:
    rng = np.random.default_rng(seed)
    return {
        name: [list(range(k * 1000, k * 1000 + int(n))) for n in rng.integers(3, 3 + 20 * (k + 1), 50)]
        for k, name in enumerate(["short", "medium", "long"])
    }


def test_packed_batches_credit_every_tokens_loss_to_its_own_domain_through_the_callback(tmp_path):
    steps = 6
    policy = Recorder()
    loader = odm.MixtureLoader(packed_sources(), batch_size=2, pack_length=32, policy=policy, seed=1)
    seen = SeenTokens()
    torch.manual_seed(0)
    trainer(tmp_path, max_steps=steps, callbacks=[OnlineMixing(loader), seen]).fit(PackedLM(), train_dataloaders=loader)

    assert len(policy.updates) == len(seen.steps) == steps
    for stats, (ids, losses) in zip(policy.updates, seen.steps):
        # Reference: token by token, each token's loss added to its own domain.
        want_sum, want_count = np.zeros(3), np.zeros(3)
        for d, loss in zip(ids.ravel().tolist(), losses.ravel().tolist()):
            if d >= 0:
                want_sum[d] += loss
                want_count[d] += 1
        np.testing.assert_allclose(stats.loss_sum, want_sum, rtol=1e-6)
        np.testing.assert_array_equal(stats.count, want_count)


def test_a_packed_batch_with_only_a_scalar_loss_is_refused_with_the_fix(tmp_path):
    class ScalarOnly(PackedLM):
        def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
            return super().training_step(batch, batch_idx)["loss"]

    loader = odm.MixtureLoader(packed_sources(), batch_size=2, pack_length=32, policy=Recorder(), seed=1)
    with pytest.raises(TypeError, match=r"packed batch mixes domains.*per-token losses as 'sample_losses'.*\[2, 32\]"):
        trainer(tmp_path, max_steps=2, callbacks=[OnlineMixing(loader)]).fit(ScalarOnly(), train_dataloaders=loader)
