"""Runs the benchmark: every (policy, seed) pair, in this process or in ``jobs`` worker processes.

Runs that need a reference (DoReMi: uniform's training-loss curve of the same seed) start once uniform's run of
their seed is done. Each run is deterministic on one thread, so a split run merges into the result of one run
(``report.merge``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import multiprocessing
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import RESULTS_DIR, environment, hardware_tag
from model import ByteLM, LMConfig

import odm

from .data import Corpus, load_corpus
from .report import markdown, resummarise, write
from .specs import Spec, build_policy, discover, needs_reference
from .training import QUICK, QUICK_MODEL, RunConfig, train_run

try:
    from tqdm.auto import tqdm
except ImportError:  # tqdm is a `bench` extra; without it, no progress bars
    tqdm = None

__all__ = ["RESULTS", "TUNING_SEEDS", "hardware", "run", "run_one"]

RESULTS = RESULTS_DIR
# Seeds reserved for choosing defaults and variants; figures are reported on other seeds (see `seed_role`).
TUNING_SEEDS = (100, 101, 102)


def hardware() -> str:
    """The hardware part of result file names (``cpu2``; see ``_common.hardware_tag``)."""
    return hardware_tag()


def run_one(
    spec: Spec, seed: int, corpus: Corpus, cfg: RunConfig, reference: np.ndarray | None, progress: bool = False
) -> dict[str, Any] | str:
    """One (policy, seed) run: its result, or the reason it could not be built."""
    try:
        policy = build_policy(spec, corpus, reference, steps=cfg.steps)
    except RuntimeError as err:
        return str(err)
    r = train_run(policy, corpus, cfg, seed=seed, label=spec.label, progress=progress)
    r.update(policy=spec.label, name=spec.name, kwargs=dict(spec.kwargs), seed=seed)
    r["reference"] = "uniform" if needs_reference(spec) else None  # its compute includes that run
    return r


def _warm_up(corpus: Corpus, cfg: RunConfig) -> None:
    """A short untimed run, so the first timed run does not pay for allocator and kernel warm-up."""
    train_run(odm.policies.Uniform(), corpus, dataclasses.replace(cfg, steps=5, eval_every=5), seed=0, progress=False)


_WORKER: dict[str, Any] = {}  # a --jobs worker process's corpus


def _worker_init(data: Path, corpus_args: dict[str, Any], threads: int, cfg: RunConfig) -> None:
    torch.set_num_threads(threads)
    _WORKER["corpus"] = load_corpus(data, **corpus_args)
    _warm_up(_WORKER["corpus"], cfg)


def _worker_run(spec: Spec, seed: int, cfg: RunConfig, reference: np.ndarray | None) -> dict[str, Any] | str:
    return run_one(spec, seed, _WORKER["corpus"], cfg, reference)


def _run_parallel(
    jobs: list[tuple[Spec, int]],
    cfg: RunConfig,
    *,
    workers: int,
    data: Path,
    corpus_args: dict[str, Any],
    threads: int,
    on_done: Callable[[Spec, int, dict[str, Any] | str], None],
    reference: dict[int, np.ndarray],
) -> None:
    """Runs ``jobs`` on ``workers`` processes (``threads`` torch threads each); a job that needs a reference
    starts once uniform's run of its seed is done (``on_done`` fills ``reference``)."""
    waiting = [j for j in jobs if needs_reference(j[0])]
    context = multiprocessing.get_context("spawn")  # fork after torch has run threads can hang in OpenMP
    initargs = (data, corpus_args, threads, cfg)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init, initargs=initargs) as pool:
        pending = {
            pool.submit(_worker_run, spec, seed, cfg, None): (spec, seed)
            for spec, seed in jobs
            if (spec, seed) not in waiting
        }
        while pending or waiting:
            for job in [j for j in waiting if j[1] in reference or not pending]:
                waiting.remove(job)
                pending[pool.submit(_worker_run, *job, cfg, reference.get(job[1]))] = job
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                spec, seed = pending.pop(future)
                on_done(spec, seed, future.result())


def run(
    data: Path,
    *,
    quick: bool = False,
    policies: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int | None = None,
    out: Path = RESULTS,
    max_train_mb: float | None = None,
    progress: bool = True,
    tag: str | None = None,
    model: LMConfig | None = None,
    jobs: int = 1,
    domains: Sequence[str] | None = None,
    caps: Sequence[str] | None = None,
    junk: int = 0,
    specs: Sequence[Spec] | None = None,
    labels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Runs the benchmark and writes ``quality-<tag or hardware>-<date>.{json,md}`` and the plots; returns the
    result.

    ``domains``, ``caps`` and ``junk`` set the regime (see :func:`data.load_corpus`). ``specs`` replaces the
    discovered policies (``policies`` selects among them). ``jobs > 1`` trains that many runs at once in worker
    processes of ``torch.get_num_threads() // jobs`` threads (at least 1); each run is the same as in one
    process with that many threads. A policy that cannot be built is listed under ``skipped`` with the reason,
    never among the runs. ``labels`` selects policies by their exact label (``doremi`` without ``doremi-eta1``).

    Every finished run is appended to ``<out>/<stem>.partial.jsonl`` with the run's configuration; a rerun of
    the same command (same configuration and regime) takes the runs found there instead of training them again,
    so an interrupted benchmark resumes (training is deterministic on one thread). The file is removed once the
    results are written.
    """
    corpus_args: dict[str, Any] = dict(max_train_mb=max_train_mb, domains=domains, caps=caps, junk=junk)
    corpus = load_corpus(data, **corpus_args)
    cfg = RunConfig(**QUICK, model=QUICK_MODEL) if quick else RunConfig()
    if model is not None:
        cfg = dataclasses.replace(cfg, model=model)
    if steps is not None:
        every = max(1, min(cfg.eval_every, steps // 10 or 1), steps // 20)  # 10 to 20 evaluations per run
        cfg = dataclasses.replace(cfg, steps=steps, eval_every=every)
    specs = sorted(specs, key=lambda s: s.label != "uniform") if specs is not None else discover(policies)
    if labels:
        unknown = [x for x in labels if x not in {s.label for s in discover(None)}]
        if unknown:
            raise ValueError(f"unknown label(s) {unknown}; labels: {[s.label for s in discover(None)]}")
        specs = [s for s in discover(None) if s.label in labels]
    mb = ", ".join(f"{d} {len(corpus.train[d]) / 1e6:.2f}" for d in corpus.domains)
    print(f"data {data}: {len(corpus.domains)} domains (train MB: {mb})")
    print(f"policies: {[s.label for s in specs]}; seeds {list(seeds)}; {cfg.steps} steps; model {cfg.model}")
    done: dict[tuple[str, int], dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    reference: dict[int, np.ndarray] = {}
    start = time.perf_counter()
    jobs_list = [(spec, seed) for spec in specs for seed in seeds]  # uniform first (see `discover`)
    env = environment()
    date = datetime.datetime.now(datetime.UTC)
    stem = out / f"quality-{tag or hardware_tag(env)}-{date:%Y%m%d}"
    cfg_dict = dataclasses.asdict(cfg)
    cfg_dict["model"] = dataclasses.asdict(cfg.model)
    regime = {"domains": domains, "caps": corpus.caps, "junk_bytes": int(junk), "max_train_mb": max_train_mb}
    key = json.loads(json.dumps({"config": cfg_dict, "regime": regime, "data": str(data)}))
    partial = stem.with_suffix(".partial.jsonl")
    resumed: dict[tuple[str, int], dict[str, Any]] = {}
    if partial.exists():
        for line in partial.read_text().splitlines():
            entry = json.loads(line)
            if entry["key"] == key:
                r = entry["run"]
                r["train_curve"] = np.array(r["train_curve"], dtype=np.float64)
                resumed[(r["policy"], r["seed"])] = r
        print(f"resuming: {len(resumed)} finished run(s) in {partial}")
    out.mkdir(parents=True, exist_ok=True)
    outer = tqdm(total=len(jobs_list), desc="runs", disable=not progress) if tqdm else None

    def on_done(spec: Spec, seed: int, r: dict[str, Any] | str) -> None:
        if outer is not None:
            outer.update(1)
        if isinstance(r, str):
            if spec.label not in skipped:
                print(f"skip {spec.label}: {r}")
            skipped[spec.label] = r
            return
        if (spec.label, seed) not in resumed:
            with partial.open("a") as f:
                f.write(json.dumps({"key": key, "run": r}, default=lambda x: np.asarray(x).tolist()) + "\n")
        train_curve = r.pop("train_curve")
        if spec.label == "uniform":
            # steps before a domain's first draw (NaN) borrow its first smoothed value
            first = train_curve[np.argmax(~np.isnan(train_curve), axis=0), np.arange(train_curve.shape[1])]
            reference[seed] = np.where(np.isnan(train_curve), first, train_curve)
        done[(spec.label, seed)] = r

    for spec, seed in list(jobs_list):
        if (spec.label, seed) in resumed:
            jobs_list.remove((spec, seed))
            on_done(spec, seed, resumed[(spec.label, seed)])
    threads = max(1, torch.get_num_threads() // jobs)
    if jobs > 1:
        _run_parallel(
            jobs_list,
            cfg,
            workers=jobs,
            data=data,
            corpus_args=corpus_args,
            threads=threads,
            on_done=on_done,
            reference=reference,
        )
    else:
        _warm_up(corpus, cfg)
        for spec, seed in jobs_list:
            if spec.label in skipped:
                continue
            on_done(spec, seed, run_one(spec, seed, corpus, cfg, reference.get(seed), progress))
    if outer is not None:
        outer.close()
    runs = [done[(spec.label, seed)] for spec in specs for seed in seeds if (spec.label, seed) in done]
    if not runs:
        raise RuntimeError(f"no policy ran; skipped: {skipped}")
    date = datetime.datetime.now(datetime.UTC)
    result: dict[str, Any] = {
        "command": "python benchmarks/quality.py " + " ".join(sys.argv[1:])
        if Path(sys.argv[0]).name == "quality.py"
        else "quality.run()",
        "hardware": hardware_tag(env),
        "machine": f"{env['cpu']}, {env['cpus']} usable cores, torch {torch.__version__}, "
        + (f"{jobs} jobs x {threads} thread(s)" if jobs > 1 else f"{torch.get_num_threads()} thread(s)"),
        "date": date.strftime("%Y-%m-%d %H:%M UTC"),
        "environment": env,
        "config": cfg_dict,
        "num_parameters": ByteLM(cfg.model).num_parameters(),
        "seeds": list(seeds),
        "seed_role": "tuning" if set(seeds) & set(TUNING_SEEDS) else "reporting",
        "domains": corpus.domains,
        "train_bytes": corpus.train_bytes.tolist(),
        "natural_bytes": corpus.natural_bytes.tolist(),
        "scored_domains": corpus.scored,
        "regime": regime,
        "test_bytes": [len(corpus.test[d]) for d in corpus.domains],
        "feedback_bytes": [len(corpus.feedback[d]) for d in corpus.domains],
        "weights": "natural proportions and the byte-weighted mean use natural_bytes (uncapped domain sizes, "
        "or what a --cap left)",
        "corpus": corpus.manifest,
        "skipped": skipped,
        "total_seconds": time.perf_counter() - start,
        "runs": [
            {k: v for k, v in r.items() if k != "proportions"}
            | {"proportions": np.round(r["proportions"][:: max(1, cfg.steps // 100)], 4).tolist()}
            for r in runs
        ],
    }
    resummarise(result)
    written = write(result, stem)
    partial.unlink(missing_ok=True)
    print()
    print(markdown(result))
    for path in written:
        print(f"wrote {path}")
    return result
