"""The examples run as documented (short runs)."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import odm

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_custom_loop_example_adds_few_marked_lines():
    source = (EXAMPLES / "custom_loop.py").read_text()
    code_lines = [line for line in source.splitlines() if "# odm" in line and not line.strip().startswith("#")]
    assert 0 < len(code_lines) < 15


def test_the_custom_loop_trains_and_reports_a_held_out_loss_per_domain(capsys):
    result = _load("custom_loop").main(["--steps", "120", "--policy", "exp3"])
    assert set(result) == {"linear", "wavy", "noise"}
    assert all(math.isfinite(v) for v in result.values())
    out = capsys.readouterr().out
    assert "step  100" in out and "final proportions" in out


@pytest.mark.slow
def test_the_custom_loop_runs_as_a_script_with_workers_and_saves_a_resumable_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    args = ["--steps", "40", "--workers", "2", "--checkpoint", str(ckpt)]
    cmd = [sys.executable, str(EXAMPLES / "custom_loop.py"), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    state = torch.load(ckpt, weights_only=True)["loader"]
    # The loop took 41 batches (the 41st ends it) but stepped on 40: the checkpoint resumes at batch 40.
    assert state["next_batch"] == 40
    loader = odm.MixtureLoader(_load("custom_loop").make_domains(), batch_size=32, policy="exp3", num_workers=2)
    loader.load_state_dict(state)
    assert loader.state_dict() == state, "the script's loader, mixer and policy are restored as saved"
    assert loader.mixer.num_updates == 40 and next(iter(loader))["mix_step"] == 40
