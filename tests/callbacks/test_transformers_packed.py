"""``OnlineMixingTrainer`` on packed sequences (``MixtureLoader(pack_length=T)``): per-token feedback, no loss
across documents, exact resume — a real ``transformers.Trainer`` and a tiny GPT-2 built from a config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="the [hf] extra is not installed")

from test_transformers import BATCH, DOMAINS, SEQ, assert_resumes_exactly, make_args, make_model
from test_transformers import train as train_any

import odm
from odm.callbacks.transformers import (
    OnlineMixingTrainer,
    causal_lm_token_losses,
    packed_labels,
)
from odm.feedback import FeedbackRows


def documents(domain: str, n: int = 40) -> list[list[int]]:
    """``n`` documents of 3 to 11 tokens: digits, letters or random bytes (so rows hold several documents)."""
    g = torch.Generator().manual_seed(DOMAINS.index(domain))
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 12, (1,), generator=g))
        start = int(torch.randint(0, 26, (1,), generator=g))
        if domain == "digits":
            ids = 48 + (torch.arange(length) + start) % 10
        elif domain == "letters":
            ids = 97 + (torch.arange(length) + start) % 26
        else:
            ids = torch.randint(0, 256, (length,), generator=g)
        out.append(ids.tolist())
    return out


def make_packed_loader(**kwargs: Any) -> odm.MixtureLoader:
    sources = {d: documents(d) for d in DOMAINS}
    return odm.MixtureLoader(sources, batch_size=BATCH, pack_length=SEQ, policy="exp3", seed=1, **kwargs)


class PackedRecordingTrainer(OnlineMixingTrainer):
    """Records every packed micro-batch: (mix_step, token domains, input ids, position ids)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[tuple[int, list[list[int]], list[list[int]], list[list[int]]]] = []

    def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        self.batches.append(
            (
                int(inputs["mix_step"]),
                inputs["token_domain"].tolist(),
                inputs["input_ids"].tolist(),
                inputs["position_ids"].tolist(),
            )
        )
        return super().training_step(model, inputs, *args, **kwargs)


def train(out: Path, *, resume: Path | None = None, loader: odm.MixtureLoader | None = None, **kwargs: Any):  # type: ignore[no-untyped-def]
    loader = loader if loader is not None else make_packed_loader()
    return train_any(out, resume=resume, loader=loader, trainer_cls=PackedRecordingTrainer, **kwargs)


def test_token_losses_sit_at_their_target_token_and_match_a_token_by_token_loop() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, -100, 4, 5], [6, -100, 1, 2, -100]])
    losses, mask = causal_lm_token_losses(logits, labels)
    logp = torch.log_softmax(logits.double(), dim=-1)
    for i in range(2):
        for t in range(5):
            predicted = t > 0 and labels[i, t] != -100
            assert bool(mask[i, t]) == predicted
            want = float(-logp[i, t - 1, labels[i, t]]) if predicted else 0.0
            assert float(losses[i, t]) == pytest.approx(want, rel=1e-5)
    # Labels already shifted (a collator's shift_labels): the same losses at the same target positions.
    shifted = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    again, again_mask = causal_lm_token_losses(logits, shifted, shift=False)
    assert torch.equal(again_mask, mask) and torch.allclose(again, losses)


def test_packed_labels_ignore_padding_and_every_segment_start() -> None:
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    domains = torch.tensor([[0, 0, 1, 1, 1, -1]])
    positions = torch.tensor([[3, 4, 0, 1, 2, 0]])  # a document carried into the row, then a new one, then padding
    assert packed_labels(ids, domains, positions).tolist() == [[5, 6, -100, 8, 9, -100]]
    with pytest.raises(ValueError, match="one \\[B, T\\] shape"):
        packed_labels(ids, domains[:, :4], positions)


def test_a_packed_run_credits_each_domain_exactly_its_predicted_tokens(tmp_path: Path) -> None:
    # update_every beyond the run: everything observed stays in the mixer's pending statistics.
    loader = make_packed_loader(update_every=1000)
    trainer, recording = train(tmp_path, loader=loader, max_steps=4, save_steps=100, logging_steps=2)
    assert [b[0] for b in trainer.batches] == [0, 1, 2, 3]
    counts = FeedbackRows.unpack(np.asarray(loader.mixer.state_dict()["pending"]), len(DOMAINS)).count
    # Independently: a token is predicted when it is not the first of its row and not the first of a segment
    # (position id 0: a document start), and it counts for its own domain.
    expected = np.zeros(len(DOMAINS))
    starts = 0
    for _, domains, _, positions in trainer.batches:
        for row_domains, row_positions in zip(domains, positions, strict=True):
            for t in range(1, SEQ):
                starts += row_positions[t] == 0
                if row_positions[t] != 0 and row_domains[t] >= 0:
                    expected[row_domains[t]] += 1
    assert starts > 0, "the batches hold document boundaries inside rows"
    np.testing.assert_array_equal(counts, expected)
    assert expected.sum() < 4 * BATCH * (SEQ - 1)
    train_logs = [log for log in recording.logs if "loss" in log]
    assert train_logs and all(np.isfinite(log["loss"]) for log in train_logs)
    assert all(f"mix/loss/{d}" in train_logs[-1] for d in DOMAINS)


class ItemCountingTrainer(PackedRecordingTrainer):
    """Records the token count the Trainer normalises each micro-batch's loss by (``num_items_in_batch``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.num_items: list[int] = []

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any) -> Any:
        self.num_items.append(int(kwargs["num_items_in_batch"]))
        return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)


def test_under_gradient_accumulation_the_loss_is_normalised_by_the_predicted_tokens_of_the_whole_step(
    tmp_path: Path,
) -> None:
    loader = make_packed_loader()
    trainer = ItemCountingTrainer(
        loader, model=make_model(), args=make_args(tmp_path, max_steps=3, save_steps=100, gradient_accumulation_steps=2)
    )
    trainer.train()
    # Independently: the predicted tokens of both micro-batches of each optimizer step (not the first of a row, not
    # a document start, not padding).
    per_batch = [
        sum(
            row_positions[t] != 0 and row_domains[t] >= 0
            for row_domains, row_positions in zip(domains, positions)
            for t in range(1, SEQ)
        )
        for _, domains, _, positions in trainer.batches
    ]
    expected = [per_batch[i] + per_batch[i + 1] for i in range(0, len(per_batch), 2) for _ in range(2)]
    assert trainer.num_items == expected


@pytest.mark.parametrize(("accumulation", "num_workers"), [(1, 0), (2, 2)])
def test_a_packed_run_resumes_with_the_uninterrupted_runs_batches_and_proportions(
    tmp_path: Path, accumulation: int, num_workers: int
) -> None:
    assert_resumes_exactly(tmp_path, train, make_packed_loader, accumulation, num_workers)
