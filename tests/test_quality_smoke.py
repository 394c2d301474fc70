"""Seconds-long runs of the quality benchmark's real training loop on tiny generated corpora.

What they pin down: every requested policy is built and trained (a policy the benchmark cannot build is a
failure, never counted as "ran"); the paired statistics, their standard errors and steps-to-target agree with
an independent computation; the three-way split never leaks (feedback and test documents never in train, the
test split never reachable by a policy); split runs merge into the result of one run; an interrupted run resumes.
"""

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
from scipy import stats as scipy_stats

import odm
from odm.policies import EVAL_LOSS, TRAIN_LOSS, DomainStats

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str) -> Any:
    # imported by its own name from benchmarks/ (as the scripts import `model`), so that --jobs worker processes,
    # which are spawned and unpickle their functions by module name, can import it too
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    return importlib.import_module(name)


quality = _load("quality")
runner = _load("mixing_quality.runner")
corpus_builder = _load("corpus")
TINY = quality.LMConfig(num_layers=1, width=32, num_heads=2, context=32)


def _write_corpus(root: Path, *, splits: tuple[str, ...] = ("train", "feedback", "test")) -> None:
    """Three domains of clearly different character: repeated prose, random letters, digit arithmetic."""
    rng = random.Random(0)
    makers = {
        "prose": lambda i: "the quick brown fox jumps over the lazy dog. " * 20 + f"doc {i}\n",
        "letters": lambda i: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(900)),
        "sums": lambda i: " ".join(
            f"{a}+{b}={a + b}" for a, b in ((rng.randrange(99), rng.randrange(99)) for _ in range(90))
        ),
    }
    sizes = {"train": 30, "feedback": 4, "test": 6, "val": 8}
    for domain, make in makers.items():
        (root / domain).mkdir(parents=True)
        for split in splits:
            with (root / domain / f"{split}.jsonl").open("w") as f:
                for i in range(sizes[split]):
                    f.write(json.dumps({"text": make(i)}) + "\n")


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    # a 22k-parameter model gains nothing from intra-op threads, and loses a lot on a busy 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_requested_policy_is_built_and_trained_and_writes_finite_results(tmp_path: Path) -> None:
    data = tmp_path / "corpus"
    _write_corpus(data)
    wanted = ["uniform", "natural", "odm-paper", "doremi", "aioli", "dynamix-natural", "velocitune"]
    result = quality.run(
        data, quick=True, labels=wanted, seeds=[0, 1], steps=12, out=tmp_path / "out", progress=False, model=TINY
    )
    stem = tmp_path / "out" / f"quality-{quality.hardware()}-{result['date'][:10].replace('-', '')}"
    saved = json.loads(stem.with_suffix(".json").read_text())
    # a policy the benchmark could not build is a failure here, not a run
    assert saved["skipped"] == {}
    summary = saved["summary"]["policies"]
    assert list(summary) == wanted
    assert saved["domains"] == ["letters", "prose", "sums"]
    assert "uniform" in stem.with_suffix(".md").read_text()
    assert stem.with_name(stem.name + "-proportions.png").stat().st_size > 0
    assert stem.with_name(stem.name + "-loss.png").stat().st_size > 0
    assert not stem.with_suffix(".partial.jsonl").exists()  # removed once the results are written
    for label, s in summary.items():
        assert s["seeds"] == [0, 1], label
        assert all(math.isfinite(v) for v in s["mean_bpb"] + s["weighted_bpb"]), label
        assert set(s["per_domain_bpb"]) == {"letters", "prose", "sums"}
        assert np.isclose(sum(s["mean_proportions"]), 1.0)
    # units: bits per byte; a model that guesses uniformly over 256 bytes scores exactly 8
    for r in saved["runs"]:
        assert len(r["curve"]) >= 2 and r["curve"][-1][0] == 12
        assert 0 < np.mean(r["final_bpb"]) < 8.0
        assert np.mean(r["curve"][-1][1]) < np.mean(r["curve"][0][1])  # it learns
    assert np.allclose(summary["uniform"]["mean_proportions"], 1 / 3)
    # DoReMi trains against uniform's run of the same seed: its compute counts that run too
    assert summary["doremi"]["reference_run"] == "uniform"
    uniform_cpu = np.mean([r["train_cpu_seconds"] for r in saved["runs"] if r["policy"] == "uniform"])
    own_cpu = np.mean([r["train_cpu_seconds"] for r in saved["runs"] if r["policy"] == "doremi"])
    assert summary["doremi"]["compute_cpu_seconds"][0] == pytest.approx(own_cpu + uniform_cpu)
    assert all(r["num_policy_evals"] > 0 for r in saved["runs"] if r["policy"] == "aioli")


def test_a_policy_the_benchmark_cannot_build_is_reported_as_skipped_never_as_ran(tmp_path: Path) -> None:
    data = tmp_path / "corpus"
    _write_corpus(data)
    broken = quality.Spec("exp3-broken", "exp3", {"no_such_argument": 1})
    specs = [quality.Spec("uniform", "uniform"), broken]
    result = quality.run(
        data, quick=True, specs=specs, seeds=[0], steps=6, out=tmp_path / "out", progress=False, model=TINY
    )
    assert "no_such_argument" in result["skipped"]["exp3-broken"]
    assert list(result["summary"]["policies"]) == ["uniform"]
    assert [r["policy"] for r in result["runs"]] == ["uniform"]
    assert "exp3-broken" in quality.markdown(result).split("Skipped:")[1]
    with pytest.raises(RuntimeError, match="no policy ran"):
        quality.run(
            data, quick=True, specs=[broken], seeds=[0], steps=6, out=tmp_path / "o2", progress=False, model=TINY
        )


def _steps_to_target(curve: list[tuple[int, list[float]]], target: float) -> float:
    """Independent reference: the crossing of the piecewise-linear mean curve through ``target``."""
    steps = np.array([0.0] + [s for s, _ in curve])
    values = np.array([np.inf] + [float(np.mean(b)) for _, b in curve])
    below = np.flatnonzero(values <= target + 1e-5)
    if below.size == 0:
        return math.inf
    i = int(below[0])
    if not np.isfinite(values[i - 1]):
        return float(steps[i])
    return float(np.interp(target, [values[i], values[i - 1]], [steps[i], steps[i - 1]]))


def test_paired_deltas_standard_errors_and_steps_to_target_match_an_independent_computation(tmp_path: Path) -> None:
    data = tmp_path / "corpus"
    _write_corpus(data)
    seeds = [0, 1, 2]
    result = quality.run(
        data,
        quick=True,
        labels=["uniform", "natural", "exp3s-progress"],
        seeds=seeds,
        steps=20,
        out=tmp_path / "out",
        progress=False,
        model=TINY,
    )
    summary = result["summary"]
    final = {(r["policy"], r["seed"]): np.mean(r["final_bpb"]) for r in result["runs"]}
    curves = {(r["policy"], r["seed"]): r["curve"] for r in result["runs"]}
    best = min(("uniform", "natural"), key=lambda p: np.mean([final[p, s] for s in seeds]))
    assert summary["best_static"] == best
    for label in ("natural", "exp3s-progress"):
        s = summary["policies"][label]
        for base, key in (
            ("uniform", "delta_vs_uniform"),
            ("natural", "delta_vs_natural"),
            (best, "delta_vs_best_static"),
        ):
            d = np.array([final[label, seed] - final[base, seed] for seed in seeds])
            se = math.sqrt(sum((x - d.mean()) ** 2 for x in d) / (len(d) - 1) / len(d))
            half = scipy_stats.t.ppf(0.975, len(d) - 1) * se
            got = s[key]
            assert got["mean"] == pytest.approx(d.mean(), abs=1e-12), (label, key)
            assert got["se"] == pytest.approx(se, rel=1e-9), (label, key)
            assert got["low"] == pytest.approx(d.mean() - half, rel=1e-3, abs=1e-9), (label, key)
            assert got["high"] == pytest.approx(d.mean() + half, rel=1e-3, abs=1e-9), (label, key)
            assert got["significant"] == bool(abs(d.mean()) > half)
            assert got["beyond_se"] == bool(abs(d.mean()) > se)
            expected = [_steps_to_target(curves[label, seed], final[base, seed]) / 20 for seed in seeds]
            assert s[f"steps_to_{'best_static' if key.endswith('static') else base}"][1] == pytest.approx(expected)
    # the goal line names exactly the online policies beyond one SE below both static baselines
    expected_goal = [
        label
        for label, s in summary["policies"].items()
        if s["online"]
        and s["delta_vs_uniform"]["mean"] < -s["delta_vs_uniform"]["se"]
        and s["delta_vs_natural"]["mean"] < -s["delta_vs_natural"]["se"]
    ]
    assert quality.goal(summary) == expected_goal


def test_t_critical_matches_students_t_and_paired_needs_two_seeds_for_an_error() -> None:
    for df in (1, 2, 3, 5, 10, 29, 30, 31, 40, 100, 1000):
        assert quality.t_critical(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), rel=2e-3), df
    one = quality.paired({0: 1.0}, {0: 2.0})
    assert one.mean == -1.0 and math.isnan(one.se) and not one.significant and not one.beyond_se
    assert quality.paired({0: 1.0}, {1: 2.0}) is None


def test_steps_to_reach_interpolates_between_evaluations_and_reports_never_as_inf() -> None:
    curve = [(10, [3.0, 3.0]), (20, [2.0, 2.0]), (30, [1.0, 1.0])]
    assert quality.steps_to_reach(curve, 1.5) == pytest.approx(25.0)
    assert quality.steps_to_reach(curve, 3.5) == 10.0
    assert math.isinf(quality.steps_to_reach(curve, 0.5))
    # only the scored domains count (the junk domain is never part of the target)
    assert quality.steps_to_reach([(10, [3.0, 9.0]), (20, [1.0, 9.0])], 2.0, [0]) == pytest.approx(15.0)


def test_corpus_split_is_by_source_group_and_never_puts_a_held_out_document_in_train(tmp_path: Path) -> None:
    # 40 packages of 5 files each: documents of one package always share a split
    docs = [(f"pkg{p}/mod{m}.py", f"# package {p} module {m}\n" + "x = 1\n" * 50) for p in range(40) for m in range(5)]
    stats = corpus_builder.write_domain("code_python", docs, tmp_path, max_bytes=10**9, held_out_bytes=10**9)
    ids = {
        split: [json.loads(line)["id"] for line in (tmp_path / "code_python" / f"{split}.jsonl").open()]
        for split in ("train", "feedback", "test")
    }
    assert sorted(i for v in ids.values() for i in v) == sorted(i for i, _ in docs)  # every document exactly once
    groups = {split: {i.split("/")[0] for i in v} for split, v in ids.items()}
    assert not groups["train"] & groups["feedback"] and not groups["train"] & groups["test"]
    assert not groups["feedback"] & groups["test"]
    assert groups["test"] and groups["feedback"]  # 40 groups at 5% + 5%: each held-out split has some
    assert stats["test_groups"] == len(groups["test"])
    for split, v in ids.items():
        assert all(corpus_builder.split_of("code_python", i) == split for i in v)
    # single-file sources group consecutive runs into blocks; fortune files and botocore services by source
    assert corpus_builder.group_of("dictionary", "gcide:17") == corpus_builder.group_of("dictionary", "gcide:16")
    assert corpus_builder.group_of("dictionary", "gcide:17") != corpus_builder.group_of("dictionary", "gcide:8")
    assert corpus_builder.group_of("json_data", "s3/2006-03-01:3") == "s3"
    assert corpus_builder.group_of("quotes_en", "fortunes/zippy:2") == "fortunes/zippy"


class _Spy(odm.Policy):
    """Uniform proportions; records every update's statistics, asks for a held-out evaluation every update."""

    requires = frozenset({TRAIN_LOSS, EVAL_LOSS})

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[DomainStats] = []

    def _init_state(self, num_domains: int) -> None:
        self._p = np.full(num_domains, 1.0 / num_domains)

    def wants_eval(self, step: int) -> bool:
        return True

    def update(self, stats: DomainStats) -> None:
        self.seen.append(stats)


def test_policies_are_evaluated_on_the_feedback_split_and_never_reach_the_test_split(tmp_path: Path) -> None:
    # feedback = training text (the model learns it: low loss); test = random bytes (~8 bits per byte at best).
    # A policy evaluated on test would see ~8 bits; the reported scores must be the ~8 bits of test.
    rng = np.random.default_rng(0)
    for domain in ("a", "b"):
        (tmp_path / domain).mkdir()
        text = "abab cdcd " * 400
        for split, content in (("train", [text] * 4), ("feedback", [text]), ("test", None)):
            with (tmp_path / domain / f"{split}.jsonl").open("w") as f:
                rows = content or ["".join(chr(c) for c in rng.integers(0x21, 0x7F, size=3000)) for _ in range(2)]
                for row in rows:
                    f.write(json.dumps({"text": row}) + "\n")
    corpus = quality.load_corpus(tmp_path)
    # the training bytes hold nothing but the training documents
    for d in corpus.domains:
        assert set(np.unique(corpus.train[d]).tolist()) <= set(b"abcd \n")
    cfg = quality.RunConfig(steps=60, eval_every=30, eval_windows=8, policy_eval_windows=8, warmup=5, model=TINY)
    spy = _Spy()
    r = quality.train_run(spy, corpus, cfg, seed=0, progress=False)
    evals = [s.eval_loss for s in spy.seen if s.eval_loss is not None]
    assert len(evals) == 60  # the policy asked every update and was answered every update
    assert np.all(evals[-1] / math.log(2) < 3.0)  # it saw the feedback split (learnt text), not random bytes
    assert np.all(np.array(r["final_bpb"]) > 5.0)  # the reported scores come from the random test bytes


def test_regimes_cap_domains_add_an_unscored_junk_domain_and_select_a_subset(tmp_path: Path) -> None:
    data = tmp_path / "corpus"
    _write_corpus(data)
    corpus = quality.load_corpus(data, caps=["prose=500"], junk=4000, domains=["prose", "sums"])
    assert corpus.domains == ["prose", "sums", "junk"] and corpus.scored == ["prose", "sums"]
    assert len(corpus.train["prose"]) == 500 and len(corpus.train["junk"]) == 4000
    assert corpus.natural_bytes[0] == 500  # natural proportions weigh what the cap left
    with pytest.raises(ValueError, match="unknown domain 'nope'"):
        quality.load_corpus(data, caps=["nope=5"])
    with pytest.raises(ValueError, match="DOMAIN=BYTES"):
        quality.load_corpus(data, caps=["prose"])
    with pytest.raises(ValueError, match=r"unknown domain\(s\) \['nope'\]"):
        quality.load_corpus(data, domains=["nope"])
    # the junk domain is trained on but never part of the scored mean
    result = quality.run(
        data,
        quick=True,
        labels=["uniform"],
        seeds=[0],
        steps=6,
        out=tmp_path / "o",
        progress=False,
        model=TINY,
        junk=4000,
    )
    run = result["runs"][0]
    assert result["domains"][-1] == "junk" and len(run["final_bpb"]) == 4
    assert run["mean_bpb"] == pytest.approx(np.mean(run["final_bpb"][:3]))


def test_a_two_way_corpus_splits_its_validation_documents_into_feedback_and_test(tmp_path: Path) -> None:
    _write_corpus(tmp_path, splits=("train", "val"))
    corpus = quality.load_corpus(tmp_path)
    for d in corpus.domains:
        fb, te = bytes(corpus.feedback[d]), bytes(corpus.test[d])
        val = [json.loads(line)["text"] for line in (tmp_path / d / "val.jsonl").open()]
        assert fb and te
        # every validation document is in exactly one of the two
        assert all((v.encode() in fb) != (v.encode() in te) for v in val)


def test_an_interrupted_run_resumes_from_its_finished_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "corpus"
    _write_corpus(data)

    class Crash(odm.policies.Uniform):
        def update(self, stats: DomainStats) -> None:
            raise KeyboardInterrupt  # an interruption after uniform's run finished

    crash = quality.Spec("crash", "uniform")
    common = {"quick": True, "seeds": [0], "steps": 6, "out": tmp_path / "o", "progress": False, "model": TINY}
    original = quality.build_policy
    try:
        runner.build_policy = lambda spec, *a, **k: Crash() if spec.label == "crash" else original(spec, *a, **k)
        with pytest.raises(KeyboardInterrupt):
            quality.run(data, specs=[quality.Spec("uniform", "uniform"), crash], tag="t", **common)
    finally:
        runner.build_policy = original
    assert len(list((tmp_path / "o").glob("*.partial.jsonl"))) == 1
    capsys.readouterr()
    resumed = quality.run(data, labels=["uniform"], tag="t", **common)
    assert "resuming: 1 finished run(s)" in capsys.readouterr().out
    fresh = quality.run(data, labels=["uniform"], tag="fresh", **common)
    assert resumed["runs"][0]["curve"] == fresh["runs"][0]["curve"]
    assert not list((tmp_path / "o").glob("*.partial.jsonl"))


def test_load_corpus_names_the_folder_and_how_to_build_one_when_empty(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="corpus.py"):
        quality.load_corpus(tmp_path)


def test_report_merges_split_runs_into_the_result_of_one_run_and_refuses_mismatches(tmp_path: Path) -> None:
    data = tmp_path / "corpus"
    _write_corpus(data)

    def bench(policies: list[str], out: str) -> Path:
        quality.run(
            data,
            quick=True,
            labels=policies,
            seeds=[0],
            steps=8,
            out=tmp_path / out,
            progress=False,
            model=TINY,
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
    # DoReMi needs uniform's curve of the same seed, so its runs wait for uniform's in the parallel schedule
    common = {"quick": True, "labels": ["uniform", "natural", "doremi"], "seeds": [0, 1], "steps": 8}
    common |= {"progress": False, "model": TINY}
    one = quality.run(data, out=tmp_path / "one", **common)
    two = quality.run(data, out=tmp_path / "two", jobs=2, **common)
    assert "2 jobs" in two["machine"]
    key = [(r["policy"], r["seed"]) for r in one["runs"]]
    assert key == [(r["policy"], r["seed"]) for r in two["runs"]]
    assert {p for p, _ in key} == {"uniform", "natural", "doremi"}
    for a, b in zip(one["runs"], two["runs"], strict=True):
        assert a["curve"] == b["curve"], (a["policy"], a["seed"])
        assert a["proportions"] == b["proportions"], (a["policy"], a["seed"])
