"""Every ``python`` code block of the README runs as written.

The blocks run in order in one namespace, as a reader pasting them into one session would. Names a block leaves
to the reader (``model``, ``loss_fn``, ``sources``…) get the small stand-ins below, chosen by what the block
uses. The only edits to the README's text are the step counts in ``SHORTER`` (a test cannot train 1000 steps).
"""

from __future__ import annotations

import re
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"
SHORTER = {
    "num_batches=1000": "num_batches=30",
    "num_batches=500": "num_batches=3",
    "range(1000)": "range(30)",
    "max_steps=1000": "max_steps=4",
    "save_steps=500": "save_steps=2",
}


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def shortened(block: str) -> str:
    for long, short in SHORTER.items():
        block = block.replace(long, short)
    return block


# -- stand-ins for the names a snippet leaves to the reader --------------------------------------------------
def regression_sources() -> dict[str, list[dict[str, torch.Tensor]]]:
    """``sources = {"web": [...], "code": [...]}``: samples are mappings with ``x`` and ``y``."""
    g = torch.Generator().manual_seed(0)
    return {d: [{"x": torch.randn(4, generator=g), "y": torch.randn((), generator=g)} for _ in range(64)]
            for d in ("web", "code")}  # fmt: skip


def toy_module(ns: dict[str, Any]) -> nn.Module:
    """A model for snippets 1 and 2: a linear regressor; as a LightningModule its ``training_step`` is the one
    snippet 2 defines."""
    import lightning.pytorch as pl

    class Toy(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x).squeeze(-1)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return ns["training_step"](self, batch, batch_idx)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return Toy()


def lightning_trainer(**kwargs: Any) -> Any:
    """``Trainer`` (snippet 2 leaves its import to the reader), quiet and without files."""
    import lightning.pytorch as pl

    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return pl.Trainer(**{**quiet, **kwargs})


def token_sources_collate_and_model() -> tuple[dict[str, list[torch.Tensor]], Any, nn.Module]:
    """For the Hugging Face snippet: byte sequences per domain, a collate giving ``input_ids``/``labels``, and
    a 2-layer GPT-2 with a 256-token vocabulary built from a config."""
    from transformers import GPT2Config, GPT2LMHeadModel

    g = torch.Generator().manual_seed(0)
    sources = {d: [torch.randint(lo, lo + 20, (16,), generator=g) for _ in range(32)] for d, lo in (("web", 97),
               ("code", 48))}  # fmt: skip

    def collate(samples: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = torch.stack(samples)
        return {"input_ids": ids, "labels": ids.clone()}

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    return sources, collate, GPT2LMHeadModel(config)


def webdataset_and_jsonl_files(folder: Path) -> None:
    """The files the sources snippet names: ``web-000.tar`` … ``web-099.tar`` and ``qa.jsonl``."""
    for i in range(100):
        member = folder / f"{i:03d}.txt"
        member.write_text(f"web document {i}")
        with tarfile.open(folder / f"web-{i:03d}.tar", "w") as tar:
            tar.add(member, arcname=member.name)
        member.unlink()
    (folder / "qa.jsonl").write_text('{"text": "question one"}\n{"text": "question two"}\n')


def stand_ins(block: str, ns: dict[str, Any], folder: Path) -> None:
    if "OnlineMixingTrainer" in block:
        pytest.importorskip("transformers")
        ns["sources"], ns["collate"], ns["model"] = token_sources_collate_and_model()
    elif "loss_fn(" in block:
        ns["sources"] = regression_sources()
        ns["model"] = toy_module(ns)
        ns["loss_fn"] = lambda pred, y: (pred - y) ** 2  # reduction="none": one loss per sample
        ns["opt"] = torch.optim.SGD(ns["model"].parameters(), lr=0.01)
        ns["Trainer"] = lightning_trainer
    elif "train_on(" in block:
        ns["train_on"] = lambda domains: np.array([1.0, 2.0, 0.5])[domains]  # one loss per example
        ns["checkpoint"] = {}
    elif "WebDatasetSource(" in block:
        pytest.importorskip("webdataset")
        webdataset_and_jsonl_files(folder)


def test_the_readme_has_the_snippets_this_test_knows() -> None:
    blocks = python_blocks()
    assert len(blocks) >= 5
    for marker in ("MixtureLoader(", "OnlineMixing(", "OnlineMixingTrainer", "mixer.sample(", "simulate("):
        assert any(marker in b for b in blocks), f"no README block uses {marker}"


def test_every_readme_python_block_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # blocks that write (checkpoints) or read files (shards) do it here
    ns: dict[str, Any] = {"__name__": "readme"}
    for i, block in enumerate(python_blocks()):
        stand_ins(block, ns, tmp_path)
        capsys.readouterr()
        try:
            exec(compile(shortened(block), f"README.md python block {i + 1}", "exec"), ns)
        except Exception as err:
            raise AssertionError(f"README python block {i + 1} failed:\n{block}") from err
        if "for batch in loader:" in block:  # snippet 1 ends: one epoch of num_batches
            assert ns["loader"].mixer.num_steps == 30 and int(ns["batch"]["mix_step"]) == 29
        if "max_epochs=2" in block:  # snippet 2 ends: two epochs of num_batches
            assert ns["loader"].mixer.num_steps == 6
        if "OnlineMixingTrainer" in block:
            assert (tmp_path / "out" / "checkpoint-2" / "odm_loader.pt").is_file()
            assert ns["loader"].mixer.num_steps == 4, "one mixer step per optimizer step"
        if "mixer.sample(" in block:
            assert ns["checkpoint"]["mixer"]["num_steps"] == 30  # range(1000), shortened
        if "simulate(" in block:  # the output shown under the block is what it prints
            shown = re.search(re.escape(block) + r"```\n```\n(.*?)```", README.read_text(), flags=re.S)
            assert shown is not None, "the simulate block is followed by its output"
            expected = [line.split("#")[0].strip() for line in shown.group(1).splitlines()]
            assert capsys.readouterr().out.splitlines() == expected
