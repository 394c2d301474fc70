"""``OnlineMixingTrainer`` with a real ``transformers.Trainer`` and a tiny GPT-2 built from a config (no download).

The DDP test runs this file as a script under ``torchrun`` (2 CPU processes, gloo): the Trainer's usual launch.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the [hf] extra is not installed")

from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments  # noqa: E402

import odm  # noqa: E402
from odm.callbacks.transformers import (  # noqa: E402
    LOADER_STATE_NAME,
    OnlineMixingMixin,
    OnlineMixingTrainer,
    causal_lm_sample_losses,
)

DOMAINS = ["digits", "letters", "noise"]
SEQ, BATCH = 16, 4


def byte_sequences(domain: str, n: int = 48) -> list[dict[str, torch.Tensor]]:
    """``n`` byte sequences of one domain: counting digits, the alphabet from a random offset, random bytes."""
    g = torch.Generator().manual_seed(DOMAINS.index(domain))
    out = []
    for _ in range(n):
        start = int(torch.randint(0, 26, (1,), generator=g))
        if domain == "digits":
            ids = 48 + (torch.arange(SEQ) + start) % 10
        elif domain == "letters":
            ids = 97 + (torch.arange(SEQ) + start) % 26
        else:
            ids = torch.randint(0, 256, (SEQ,), generator=g)
        out.append({"input_ids": ids})
    return out


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    ids = torch.stack([s["input_ids"] for s in samples])
    labels = ids.clone()
    labels[:, : SEQ // 4] = -100  # a prompt part that is not predicted: token counts differ from SEQ - 1
    return {"input_ids": ids, "labels": labels}


def make_loader(policy: Any = "exp3", **kwargs: Any) -> odm.MixtureLoader:
    sources = {d: byte_sequences(d) for d in DOMAINS}
    return odm.MixtureLoader(sources, batch_size=BATCH, policy=policy, seed=1, collate_fn=collate, **kwargs)


def make_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=256, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def make_args(out: Path, **kwargs: Any) -> TrainingArguments:
    defaults: dict[str, Any] = dict(
        max_steps=6, learning_rate=1e-3, logging_steps=2, save_steps=3, report_to=[], use_cpu=True,
        disable_tqdm=True, seed=0, per_device_train_batch_size=BATCH,
    )  # fmt: skip
    defaults.update(kwargs)
    return TrainingArguments(str(out), **defaults)


class Recording(TrainerCallback):
    """Keeps what reaches the Trainer's callbacks: the proportions after each optimizer step, and the logs."""

    def __init__(self, mixer: odm.OnlineMixer) -> None:
        self.mixer = mixer
        self.proportions: dict[int, list[float]] = {}
        self.logs: list[dict[str, float]] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.proportions[state.global_step] = self.mixer.proportions.tolist()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        self.logs.append(dict(logs or {}))


class RecordingTrainer(OnlineMixingTrainer):
    """Records every micro-batch the model trains on: (mix_step, domain ids, input ids)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[tuple[int, list[int], list[list[int]]]] = []

    def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        self.batches.append((int(inputs["mix_step"]), inputs["domain"].tolist(), inputs["input_ids"].tolist()))
        return super().training_step(model, inputs, *args, **kwargs)


def train(  # type: ignore[no-untyped-def]
    out: Path,
    *,
    resume: Path | None = None,
    loader: odm.MixtureLoader | None = None,
    trainer_cls: type = RecordingTrainer,
    **kwargs: Any,
):
    loader = loader if loader is not None else make_loader()
    trainer = trainer_cls(loader, model=make_model(), args=make_args(out, **kwargs))
    recording = Recording(loader.mixer)
    trainer.add_callback(recording)
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    return trainer, recording


# -- per-sample losses -----------------------------------------------------------------------------------------
def test_per_sequence_losses_match_a_token_by_token_loop_and_their_weighted_mean_is_the_models_loss() -> None:
    model = make_model()
    batch = collate([s for d in DOMAINS for s in byte_sequences(d, 2)])
    batch["labels"][1, 5:] = -100  # uneven token counts
    with torch.no_grad():
        out = model(**batch)
    losses, tokens = causal_lm_sample_losses(out.logits, batch["labels"])
    logp = torch.log_softmax(out.logits.double(), dim=-1)
    for i in range(len(losses)):  # slow reference: one token at a time
        terms = [-logp[i, t, batch["labels"][i, t + 1]] for t in range(SEQ - 1) if batch["labels"][i, t + 1] != -100]
        assert tokens[i] == len(terms)
        assert float(losses[i]) == pytest.approx(float(sum(terms).detach() / len(terms)), rel=1e-5)
    assert float((losses * tokens).sum() / tokens.sum()) == pytest.approx(float(out.loss), rel=1e-5)


def test_a_sequence_without_predicted_tokens_weighs_nothing() -> None:
    losses, tokens = causal_lm_sample_losses(torch.zeros(2, 3, 4), torch.tensor([[1, -100, -100], [1, 2, 3]]))
    assert tokens.tolist() == [0.0, 2.0] and losses[0] == 0.0 and math.isfinite(float(losses[1]))


# -- training --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("accumulation", [1, 3])
def test_every_micro_batch_is_observed_and_the_mixer_steps_once_per_optimizer_step(
    tmp_path: Path, accumulation: int
) -> None:
    trainer, recording = train(tmp_path, gradient_accumulation_steps=accumulation, max_steps=4, save_steps=100)
    mixer = trainer.loader.mixer
    assert [b[0] for b in trainer.batches] == list(range(4 * accumulation)), "consecutive batches, none skipped"
    assert mixer.num_steps == 4
    # every sample of every micro-batch reached the mixer, and the proportions moved after each optimizer step
    assert mixer.state_dict()["num_samples"] == 4 * accumulation * BATCH
    assert len(recording.proportions) == 4
    assert len({tuple(p) for p in recording.proportions.values()}) == 4


def test_the_trainer_logs_carry_the_proportions_and_per_domain_losses(tmp_path: Path) -> None:
    trainer, recording = train(tmp_path, max_steps=4, logging_steps=2, save_steps=100)
    train_logs = [log for log in recording.logs if "loss" in log]
    assert len(train_logs) == 2
    for log, step in zip(train_logs, (2, 4), strict=True):
        # what the reporters receive (on_log) is what state.log_history keeps
        assert [p for k, p in log.items() if k.startswith("mix/p/")] == recording.proportions[step]
        assert {k for k in log if k.startswith("mix/loss/")} <= {f"mix/loss/{d}" for d in DOMAINS}
        assert all(0 < v < 10 for k, v in log.items() if k.startswith("mix/loss/"))
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["mix/p/noise"] for h in history] == [log["mix/p/noise"] for log in train_logs]


def test_mix_loss_is_the_token_weighted_mean_of_each_domains_sequences_since_the_last_log(tmp_path: Path) -> None:
    seen: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []

    class Spy(RecordingTrainer):
        def sample_losses(self, outputs: Any, labels: Any, *, shifted: bool = False) -> Any:
            losses, tokens = super().sample_losses(outputs, labels, shifted=shifted)
            seen.append((self.batches[-1][1], losses.clone(), tokens.clone()))
            return losses, tokens

    loader = make_loader()
    trainer = Spy(loader, model=make_model(), args=make_args(tmp_path, max_steps=2, logging_steps=2, save_steps=9))
    trainer.train()
    log = next(h for h in trainer.state.log_history if "loss" in h)
    for k, name in enumerate(DOMAINS):
        num = sum(float(lo[i] * to[i]) for ids, lo, to in seen for i, d in enumerate(ids) if d == k)
        den = sum(float(to[i]) for ids, lo, to in seen for i, d in enumerate(ids) if d == k)
        if den:
            assert log[f"mix/loss/{name}"] == pytest.approx(num / den, rel=1e-6)
        else:
            assert f"mix/loss/{name}" not in log


def assert_resumes_exactly(tmp_path: Path, train_fn: Any, make: Any, accumulation: int, num_workers: int) -> None:
    """Train 6 steps, and 3 more from the checkpoint at step 3: the second run sees the first run's batches and
    proportions from there on, and ends with the same parameters, bit for bit."""
    kwargs = dict(gradient_accumulation_steps=accumulation, max_steps=6, save_steps=3)
    whole, whole_rec = train_fn(tmp_path / "a", loader=make(num_workers=num_workers), **kwargs)
    checkpoint = tmp_path / "a" / "checkpoint-3"
    assert (checkpoint / LOADER_STATE_NAME).is_file()
    resumed, resumed_rec = train_fn(tmp_path / "b", resume=checkpoint, loader=make(num_workers=num_workers), **kwargs)
    assert resumed.batches == whole.batches[3 * accumulation :]
    assert resumed_rec.proportions == {s: p for s, p in whole_rec.proportions.items() if s > 3}
    assert len({tuple(p) for p in whole_rec.proportions.values()}) > 1, "the policy moved the proportions"
    assert resumed.loader.mixer.state_dict()["history"] == whole.loader.mixer.state_dict()["history"]
    for a, b in zip(whole.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(("accumulation", "num_workers"), [(1, 0), (2, 2)])
def test_resume_from_a_checkpoint_continues_with_the_uninterrupted_runs_batches_and_proportions(
    tmp_path: Path, accumulation: int, num_workers: int
) -> None:
    assert_resumes_exactly(tmp_path, train, make_loader, accumulation, num_workers)


def test_resume_with_true_takes_the_last_checkpoint_in_the_output_dir(tmp_path: Path) -> None:
    whole, _ = train(tmp_path / "a", max_steps=6, save_steps=3)
    train(tmp_path / "b", max_steps=3, save_steps=3)
    loader = make_loader()
    trainer = RecordingTrainer(loader, model=make_model(), args=make_args(tmp_path / "b", max_steps=6, save_steps=3))
    trainer.train(resume_from_checkpoint=True)
    assert trainer.batches == whole.batches[3:]


def test_an_epoch_based_run_ends_and_resumes_on_a_loader_with_num_batches(tmp_path: Path) -> None:
    if "num_batches" not in odm.MixtureLoader.__init__.__code__.co_varnames:
        pytest.skip("MixtureLoader(num_batches=) has not landed")
    args = dict(max_steps=-1, num_train_epochs=2, save_steps=5)
    whole, _ = train(tmp_path / "a", loader=make_loader(num_batches=4), **args)
    assert [b[0] for b in whole.batches] == list(range(8))
    resumed, _ = train(
        tmp_path / "b", resume=tmp_path / "a" / "checkpoint-5", loader=make_loader(num_batches=4), **args
    )
    assert resumed.batches == whole.batches[5:]


def test_a_policy_that_asks_for_held_out_losses_gets_each_domains_from_its_own_loader(tmp_path: Path) -> None:
    from conftest import Recorder

    from odm.policies import EVAL_LOSS, TRAIN_LOSS

    policy = Recorder(requires=frozenset({TRAIN_LOSS, EVAL_LOSS}), wants=lambda update: update == 2)
    held_out = {"noise": [collate(byte_sequences("noise", 4))], "digits": [collate(byte_sequences("digits", 4))]}
    expected: dict[str, float] = {}

    class Checked(OnlineMixingTrainer):
        def _mix_evaluate(self) -> None:  # the reference, computed the slow way at the same moment
            with torch.no_grad():
                for d, batches in held_out.items():
                    self.model.eval()
                    out = self.model(input_ids=batches[0]["input_ids"])
                    self.model.train()
                    expected[d] = float(causal_lm_sample_losses(out.logits, batches[0]["labels"])[0].mean())
            super()._mix_evaluate()

    trainer = Checked(
        make_loader(policy),
        model=make_model(),
        args=make_args(tmp_path, max_steps=3, save_steps=9),
        eval_loaders=held_out,
    )
    trainer.train()
    evals = [s.eval_loss for s in policy.seen]
    assert evals[0] is None and evals[2] is None, "evaluated only when the policy asked"
    assert evals[1] is not None and np.isnan(evals[1][DOMAINS.index("letters")]), "no loader, no held-out loss"
    for d in held_out:
        assert evals[1][DOMAINS.index(d)] == pytest.approx(expected[d], rel=1e-6)
    assert trainer.model.training, "train mode restored after the evaluation"


# -- errors ----------------------------------------------------------------------------------------------------
def test_the_trainer_refuses_what_it_cannot_train_on(tmp_path: Path) -> None:
    args = make_args(tmp_path)
    with pytest.raises(TypeError, match="must be an odm.MixtureLoader"):
        OnlineMixingTrainer(byte_sequences("digits"), model=make_model(), args=args)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not as `train_dataset`"):
        OnlineMixingTrainer(make_loader(), model=make_model(), args=args, train_dataset=byte_sequences("digits"))
    with pytest.raises(ValueError, match="needs per-domain held-out losses"):
        OnlineMixingTrainer(make_loader(policy="aioli"), model=make_model(), args=args)
    with pytest.raises(ValueError, match="unknown domains \\['web'\\]"):
        OnlineMixingTrainer(make_loader(), model=make_model(), args=args, eval_loaders={"web": []})


def test_batches_without_labels_get_an_error_that_says_what_is_needed(tmp_path: Path) -> None:
    sources = {d: byte_sequences(d) for d in DOMAINS}
    loader = odm.MixtureLoader(sources, batch_size=BATCH, collate_fn=lambda s: collate(s) | {"labels": None})
    trainer = OnlineMixingTrainer(loader, model=make_model(), args=make_args(tmp_path, max_steps=1))
    with pytest.raises(TypeError, match="`labels`"):
        trainer.train()


def test_resuming_from_a_checkpoint_without_loader_state_says_where_it_looked(tmp_path: Path) -> None:
    (tmp_path / "checkpoint-3").mkdir()
    trainer = OnlineMixingTrainer(make_loader(), model=make_model(), args=make_args(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"checkpoint-3 has no {LOADER_STATE_NAME}"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))


def test_the_mixin_composes_with_another_trainer_subclass(tmp_path: Path) -> None:
    calls: list[int] = []

    class CountingTrainer(transformers.Trainer):  # stands in for a TRL trainer that overrides compute_loss
        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, **kwargs: Any) -> Any:
            calls.append(1)
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)

    class Mixed(OnlineMixingMixin, CountingTrainer):
        pass

    loader = make_loader()
    Mixed(loader, model=make_model(), args=make_args(tmp_path, max_steps=2, save_steps=9)).train()
    assert len(calls) == 2 and loader.mixer.state_dict()["num_samples"] == 2 * BATCH


# -- DDP -------------------------------------------------------------------------------------------------------
def _ddp_main(out: str, resume: str | None) -> None:
    """One rank of the torchrun job: train (or resume), write what this rank saw."""
    args = make_args(
        Path(out), max_steps=6, save_steps=3, ddp_timeout=20, ddp_backend="gloo", ddp_find_unused_parameters=False
    )
    loader = make_loader()
    trainer = RecordingTrainer(loader, model=make_model(), args=args)
    recording = Recording(loader.mixer)
    trainer.add_callback(recording)
    trainer.train(resume_from_checkpoint=resume)
    rank = int(os.environ["RANK"])
    params = [p.detach().double().sum().item() for p in trainer.model.parameters()]
    seen = {"batches": trainer.batches, "proportions": recording.proportions, "params": params}
    (Path(out) / f"rank{rank}{'-resumed' if resume else ''}.json").write_text(json.dumps(seen))
    # Tear the group down before exit: gloo's threads left running at interpreter shutdown can abort the process
    # ("terminate called without an active exception", seen once in ~10 CI runs).
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _torchrun(out: Path, resume: Path | None) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    cmd += ["--standalone", "--nproc_per_node", "2", __file__, str(out)] + ([str(resume)] if resume else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.slow
def test_ddp_ranks_see_different_batches_agree_on_proportions_and_resume_exactly(tmp_path: Path) -> None:
    _torchrun(tmp_path, None)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["proportions"] == ranks[1]["proportions"], "every rank applies the same update"
    assert ranks[0]["params"] == ranks[1]["params"], "DDP kept the replicas identical"
    assert [b[0] for b in ranks[0]["batches"]] == list(range(6))
    assert all(a[2] != b[2] for a, b in zip(ranks[0]["batches"], ranks[1]["batches"], strict=True)), "own shards"
    _torchrun(tmp_path, tmp_path / "checkpoint-3")
    for r in range(2):
        resumed = json.loads((tmp_path / f"rank{r}-resumed.json").read_text())
        assert resumed["batches"] == ranks[r]["batches"][3:]
        assert resumed["proportions"] == {s: p for s, p in ranks[r]["proportions"].items() if int(s) > 3}
        assert np.allclose(resumed["params"], ranks[r]["params"], rtol=0, atol=0)


if __name__ == "__main__":
    _ddp_main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
