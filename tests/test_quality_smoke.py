"""A seconds-long run of ``benchmarks/quality.py``'s real training loop on a tiny generated corpus."""

from __future__ import annotations

import importlib
import json
import math
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import odm

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str) -> Any:
    # imported by its own name from benchmarks/ (as the script imports `model`), so that --jobs worker processes,
    # which are spawned and unpickle their functions by module name, can import it too
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    return importlib.import_module(name)


quality = _load("quality")


def _write_corpus(root: Path) -> None:
    """Three domains of clearly different character: repeated prose, random letters, digit arithmetic."""
    rng = random.Random(0)
    makers = {
        "prose": lambda i: "the quick brown fox jumps over the lazy dog. " * 20 + f"doc {i}\n",
        "letters": lambda i: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(900)),
        "sums": lambda i: " ".join(
            f"{a}+{b}={a + b}" for a, b in ((rng.randrange(99), rng.randrange(99)) for _ in range(90))
        ),
    }
    for domain, make in makers.items():
        (root / domain).mkdir(parents=True)
        for split, n in (("train", 30), ("val", 6)):
            with (root / domain / f"{split}.jsonl").open("w") as f:
                for i in range(n):
                    f.write(json.dumps({"text": make(i)}) + "\n")


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    # a 22k-parameter model gains nothing from intra-op threads, and loses a lot on a busy 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("seeds", [[0, 1]])
def test_quality_run_writes_finite_results_for_every_policy_it_ran(tmp_path: Path, seeds: list[int]) -> None:
    data = tmp_path / "corpus"
    _write_corpus(data)
    names = set(odm.policies.policy_names())
    wanted = ["uniform", "natural", "odm-paper", "doremi", "aioli"]
    tiny = quality.LMConfig(num_layers=1, width=32, num_heads=2, context=32)
    result = quality.run(
        data, quick=True, policies=wanted, seeds=seeds, steps=12, out=tmp_path / "out", progress=False, model=tiny
    )
    stem = tmp_path / "out" / f"quality-{quality.hardware()}-{result['date'][:10].replace('-', '')}"
    saved = json.loads(stem.with_suffix(".json").read_text())
    assert saved["domains"] == ["letters", "prose", "sums"]
    assert "uniform" in stem.with_suffix(".md").read_text()
    assert stem.with_name(stem.name + "-proportions.png").stat().st_size > 0
    assert stem.with_name(stem.name + "-loss.png").stat().st_size > 0

    summary = saved["summary"]["policies"]
    # a registry name selects the policy and its benchmark variants (aioli -> aioli, aioli-short)
    ran = {"uniform", "natural"} | ({"odm-paper"} if "odm" in names else set())
    ran |= {p for p in ("doremi", "doremi-eta1", "aioli", "aioli-short") if p.split("-")[0] in names}
    assert set(summary) | set(saved["skipped"]) == ran
    assert {"uniform", "natural"} <= set(summary)
    for label, s in summary.items():
        assert s["seeds"] == seeds, label
        for key in ("mean_bpb", "weighted_bpb", "train_seconds"):
            assert all(math.isfinite(v) for v in s[key]), (label, key)
        assert set(s["per_domain_bpb"]) == {"letters", "prose", "sums"}
        assert np.isclose(sum(s["mean_proportions"]), 1.0)
    # units: bits per byte; a model that guesses uniformly over 256 bytes scores exactly 8
    for r in saved["runs"]:
        assert len(r["curve"]) >= 2 and r["curve"][-1][0] == 12
        assert 0 < np.mean(r["final_bpb"]) < 8.0
        assert np.mean(r["curve"][-1][1]) < np.mean(r["curve"][0][1])  # it learns
    # uniform's proportions are exactly 1/K at every step, and it reaches its own final mean within the budget
    assert np.allclose(summary["uniform"]["mean_proportions"], 1 / 3)
    assert summary["uniform"]["steps_to_uniform"][0] <= 1.0
    # the unweighted headline is the plain mean of the per-domain values
    for r in saved["runs"]:
        assert r["mean_bpb"] == pytest.approx(np.mean(r["final_bpb"]))
    if "aioli" in summary:  # the eval hook ran: Aioli asked for held-out losses and got them
        assert all(r["num_policy_evals"] > 0 for r in saved["runs"] if r["policy"] == "aioli")


def test_steps_to_reach_interpolates_between_evaluations_and_reports_never_as_inf() -> None:
    curve = [(10, [3.0, 3.0]), (20, [2.0, 2.0]), (30, [1.0, 1.0])]
    assert quality.steps_to_reach(curve, 1.5) == pytest.approx(25.0)
    assert quality.steps_to_reach(curve, 3.5) == 10.0
    assert math.isinf(quality.steps_to_reach(curve, 0.5))


def test_load_corpus_names_the_folder_and_how_to_build_one_when_empty(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="corpus.py"):
        quality.load_corpus(tmp_path)


def test_report_merges_split_runs_into_the_result_of_one_run_and_refuses_mismatches(tmp_path: Path) -> None:
    data = tmp_path / "corpus"
    _write_corpus(data)
    tiny = quality.LMConfig(num_layers=1, width=32, num_heads=2, context=32)

    def bench(policies: list[str], out: str) -> Path:
        quality.run(
            data,
            quick=True,
            policies=policies,
            seeds=[0],
            steps=8,
            out=tmp_path / out,
            progress=False,
            model=tiny,
            tag="t",
        )
        return next((tmp_path / out).glob("quality-t-*.json"))

    both, first, second = bench(["uniform", "natural"], "both"), bench(["uniform"], "a"), bench(["natural"], "b")
    merged = quality.report([first, second], out=tmp_path / "merged", tag="m")
    whole = json.loads(both.read_text())
    # uniform is deterministic on one thread, so the split runs reproduce the joint run exactly
    assert list(merged["summary"]["policies"]) == ["uniform", "natural"]
    for label in ("uniform", "natural"):
        for key in ("mean_bpb", "weighted_bpb", "per_domain_bpb", "delta_vs_uniform", "steps_to_uniform"):
            assert merged["summary"]["policies"][label][key] == whole["summary"]["policies"][label][key], key
    assert next((tmp_path / "merged").glob("quality-m-*.md")).read_text().count("natural") >= 1
    # the same (policy, seed) twice is kept once when identical ...
    again = quality.report([both, first], out=tmp_path / "again", tag="a2")
    assert [r["policy"] for r in again["runs"]] == ["uniform", "natural"]
    # ... and refused when it differs, or when the configurations differ
    changed = json.loads(first.read_text())
    changed["runs"][0]["final_bpb"][0] += 0.01
    (tmp_path / "changed.json").write_text(json.dumps(changed))
    with pytest.raises(ValueError, match="'uniform' seed 0 ran in more than one input with different results"):
        quality.report([both, tmp_path / "changed.json"], out=tmp_path / "x", tag="x")
    changed = json.loads(first.read_text())
    changed["config"]["steps"] = 9
    (tmp_path / "steps.json").write_text(json.dumps(changed))
    with pytest.raises(ValueError, match="`config` differ"):
        quality.report([both, tmp_path / "steps.json"], out=tmp_path / "x", tag="x")


def test_parallel_jobs_reproduce_the_sequential_runs_including_reference_policies(tmp_path: Path) -> None:
    data = tmp_path / "corpus"
    _write_corpus(data)
    tiny = quality.LMConfig(num_layers=1, width=32, num_heads=2, context=32)
    # DoReMi needs uniform's curve of the same seed, so its runs wait for uniform's in the parallel schedule
    common = {"quick": True, "policies": ["uniform", "natural", "doremi"], "seeds": [0, 1], "steps": 8}
    common |= {"progress": False, "model": tiny}
    one = quality.run(data, out=tmp_path / "one", **common)
    two = quality.run(data, out=tmp_path / "two", jobs=2, **common)
    assert "2 jobs" in two["machine"]
    key = [(r["policy"], r["seed"]) for r in one["runs"]]
    assert key == [(r["policy"], r["seed"]) for r in two["runs"]]
    assert {p for p, _ in key} == {"uniform", "natural", "doremi", "doremi-eta1"} - set(one["skipped"])
    for a, b in zip(one["runs"], two["runs"], strict=True):
        assert a["curve"] == b["curve"], (a["policy"], a["seed"])
        assert a["proportions"] == b["proportions"], (a["policy"], a["seed"])
