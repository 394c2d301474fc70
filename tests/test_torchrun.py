"""``examples/ddp_torchrun.py`` under a real ``torchrun --nproc_per_node 2`` (CPU, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import odm

ROOT = Path(__file__).resolve().parents[1]


def _torchrun() -> list[str]:
    """The ``torchrun`` next to this Python (the one of this environment), else its module form."""
    script = Path(sys.executable).parent / "torchrun"
    return [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]


def _launch(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [*_torchrun(), "--standalone", "--nproc_per_node", "2", str(ROOT / "examples" / "ddp_torchrun.py")]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([*cmd, "--out", str(out), *args], capture_output=True, text=True, timeout=150, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_torchrun_two_ranks_read_disjoint_shards_with_identical_proportions(tmp_path, workers):
    done = _launch(tmp_path, "--steps", "30", "--workers", str(workers))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert (r0["world_size"], r1["world_size"]) == (2, 2)
    assert len(r0["ids"]) == len(r1["ids"]) == 30 * 16
    # Disjoint shards: no sample read by both ranks, none twice within a rank (30 x 16 < one pass per rank).
    assert not set(r0["ids"]) & set(r1["ids"])
    assert len(set(r0["ids"])) == len(r0["ids"]) and len(set(r1["ids"])) == len(r1["ids"])
    # The policy moved, and identically on both ranks after every step (bit for bit).
    assert r0["proportions"] == r1["proportions"]
    assert r0["proportions"][-1] != r0["proportions"][0]
    # The one checkpoint rank 0 wrote resumes a loader with the same proportions.
    state = torch.load(tmp_path / "loader.pt", weights_only=True)
    assert state["next_batch"] == 30 and len(state["streams"]) == 2  # one block of stream rows per rank
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import ddp_torchrun
    finally:
        sys.path.pop(0)
    mixer = odm.OnlineMixer(list(ddp_torchrun.make_domains()), policy="exp3")
    mixer.load_state_dict(state["mixer"])
    assert mixer.proportions.tolist() == r0["proportions"][-1]
