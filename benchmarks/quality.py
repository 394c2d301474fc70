"""Mixing quality: does an online policy train a better model than uniform sampling for the same budget?

    python benchmarks/corpus.py --max-mb 5 && python benchmarks/quality.py --quick   # minutes
    python benchmarks/quality.py --jobs 2                                            # the full run
    python benchmarks/quality.py --data DIR --policies uniform odm --seeds 3 --steps 500

Protocol (``shared/design/BENCHMARKS.md`` §3): a tiny byte-level decoder LM (``model.py``) trains on a
multi-domain corpus (one folder per domain holding ``train.jsonl`` / ``val.jsonl``, ``{"text": ...}`` per line;
default: the corpus ``corpus.py`` builds). Every policy gets the same model, optimiser, schedule, batch size
and number of steps; only the proportions differ. Per policy and seed it records held-out **bits per byte**
per domain along the run; it reports, mean ± std over seeds:

* the mean over domains of the final held-out bits per byte (unweighted: the headline, Aioli's "average test
  perplexity" criterion; each domain counts once whatever its size) and the byte-weighted mean (weights = the
  domains' natural sizes before the build's cap, the weights natural proportions sample with);
* the steps a policy needs to reach uniform's final mean of the same seed (the ODM paper's criterion), as a
  fraction of the budget (linear interpolation between evaluations; median over seeds; inf = never);
* wall-clock: training plus whatever the policy costs (its held-out evaluations included), and the
  benchmark's own evaluations separately.

Reading the results: the paired Δ cancels the initialisation, not the data order. In short runs of the small
model the learning curve drops in steps whose timing depends on which windows come first, so proportions that
differ by a few percent move the final mean by ±0.1–0.15 bpb per seed (measured at ``--quick``: fixed
proportions jittered by ~10% around 1/K gave paired differences of +0.28, −0.08, −0.08 bpb over seeds 0–2).
Below that noise floor, differences need longer runs or more seeds.

The training loop uses odm the way users do: an ``odm.MixtureLoader`` over per-domain map-style datasets of
byte windows, ``loader.mixer.observe(batch, per_sequence_loss)`` and ``mixer.step()`` every step, and — for
policies that ask for held-out losses — ``mixer.wants_eval()`` → per-domain evaluation →
``mixer.observe_eval(sums, counts)``. DoReMi's reference is uniform's per-domain smoothed training loss at the
same step, same seed (see :class:`CurveReference`). Policies are discovered from
``odm.policies.policy_names()``; one that cannot be built is skipped with the reason printed and recorded.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import inspect
import json
import math
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import ByteLM, LMConfig, per_sequence_loss

import odm
from odm.policies import REFERENCE_LOSS

try:
    from tqdm.auto import tqdm
except ImportError:  # tqdm is a `bench` extra; without it, no progress bars
    tqdm = None

DEFAULT_DATA = Path(os.environ.get("ODM_CORPUS", Path.home() / ".cache" / "odm" / "corpus"))
RESULTS = Path(__file__).resolve().parent / "results"
LN2 = math.log(2.0)


# -- data ------------------------------------------------------------------------------------------------------


class ByteWindows(torch.utils.data.Dataset):
    """Non-overlapping windows of ``length`` bytes (stride ``length - 1``) over one domain's text."""

    def __init__(self, data: np.ndarray, length: int) -> None:
        self.data = torch.from_numpy(data)
        self.length = length
        self.count = max(0, (len(data) - 1) // (length - 1))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> torch.Tensor:
        start = i * (self.length - 1)
        return self.data[start : start + self.length].long()


def _documents(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _join(docs: Sequence[str], max_bytes: int | None = None) -> np.ndarray:
    """Documents as one byte array (separated by a blank line), at most ``max_bytes`` (whole documents, then cut)."""
    chunks: list[bytes] = []
    total = 0
    for text in docs:
        raw = text.encode("utf-8") + b"\n\n"
        chunks.append(raw)
        total += len(raw)
        if max_bytes is not None and total >= max_bytes:
            break
    data = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    return (data if max_bytes is None else data[:max_bytes]).copy()


def read_domain(path: Path, max_bytes: int | None = None) -> np.ndarray:
    """The documents of a JSONL file as one byte array (documents separated by a blank line)."""
    return _join(_documents(path), max_bytes)


JUNK = "junk"  # the name of the added random-bytes domain (``--junk``); never part of the scored mean


def junk_bytes(size: int, *, seed: int) -> np.ndarray:
    """``size`` uniformly random bytes: 8 bits per byte is the best any model can do, and nothing transfers."""
    return np.random.default_rng(seed).integers(0, 256, size=size, dtype=np.uint8)


@dataclasses.dataclass
class Corpus:
    """One domain per key: ``train`` (what the loader draws), ``feedback`` (held-out text a policy may be
    evaluated on while it trains) and ``test`` (held-out text used only for the reported scores).

    ``caps``: the per-domain training caps applied (bytes), ``scored``: the domains of the headline mean (all but
    the junk domain)."""

    domains: list[str]
    train: dict[str, np.ndarray]
    feedback: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    manifest: dict[str, Any]
    caps: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def scored(self) -> list[str]:
        return [d for d in self.domains if d != JUNK]

    @property
    def train_bytes(self) -> np.ndarray:
        return np.array([len(self.train[d]) for d in self.domains], dtype=np.float64)

    @property
    def natural_bytes(self) -> np.ndarray:
        """Each domain's natural size: the bytes its packages hold before the build's cap (``available_bytes``
        in ``corpus.py``'s manifest), else the training bytes read; a domain capped by ``caps`` (the
        data-constrained regime) counts what is left of it. Natural proportions and the byte-weighted mean use
        these, so a capped quick build keeps the real corpus' weights."""
        entries = self.manifest.get("domains", {})
        sizes = self.train_bytes.copy()
        if all("available_bytes" in entries.get(d, {}) for d in self.domains if d != JUNK):
            for i, d in enumerate(self.domains):
                if d != JUNK:
                    sizes[i] = entries[d]["available_bytes"]
        for i, d in enumerate(self.domains):
            if d in self.caps:
                sizes[i] = min(sizes[i], len(self.train[d]))
        return sizes


def _split_val(docs: list[str], domain: str) -> tuple[list[str], list[str]]:
    """A two-way corpus' ``val.jsonl`` split by document: even sha1 -> feedback, odd -> test."""
    halves: tuple[list[str], list[str]] = ([], [])
    for i, text in enumerate(docs):
        h = int(hashlib.sha1(f"{domain}/{i}/{text[:256]}".encode()).hexdigest(), 16)
        halves[h % 2].append(text)
    return halves


def parse_caps(items: Sequence[str] | None, domains: Sequence[str]) -> dict[str, int]:
    """``["code_go=40000", "quotes_en=2e4"]`` -> ``{"code_go": 40000, ...}``; ``all=N`` caps every domain.

    Raises:
        ValueError: naming the item for a malformed one, an unknown domain or a size below 2 windows.
    """
    caps: dict[str, int] = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        try:
            size = int(float(value))
        except ValueError:
            size = -1
        if not sep or size < 1:
            raise ValueError(f"--cap {item!r}: expected DOMAIN=BYTES with BYTES >= 1 (e.g. quotes_en=40000)")
        if name == "all":
            caps.update({d: size for d in domains if d not in caps})
        elif name not in domains:
            raise ValueError(f"--cap {item!r}: unknown domain {name!r}; domains: {list(domains)}")
        else:
            caps[name] = size
    return caps


def load_corpus(
    data: Path,
    *,
    max_train_mb: float | None = None,
    domains: Sequence[str] | None = None,
    caps: Sequence[str] | dict[str, int] | None = None,
    junk: int = 0,
) -> Corpus:
    """Reads ``data/<domain>/{train,feedback,test}.jsonl`` for every domain folder that has them.

    A folder with ``train.jsonl`` and ``val.jsonl`` only (a two-way corpus) has its validation documents split
    in two by document hash: feedback and test never share a document. ``domains`` selects a subset, ``caps``
    (``DOMAIN=BYTES`` items or a dict) cuts those domains' training text, and ``junk > 0`` adds a domain
    ``junk`` of that many random training bytes (and random held-out bytes).

    Raises:
        FileNotFoundError: if ``data`` holds no domain folder with the files (with how to build one).
        ValueError: for an unknown domain in ``domains`` or ``caps``.
    """
    def usable(p: Path) -> bool:
        return (p / "train.jsonl").is_file() and (
            all((p / f"{s}.jsonl").is_file() for s in ("feedback", "test")) or (p / "val.jsonl").is_file()
        )

    found = sorted(p.name for p in data.iterdir() if usable(p)) if data.is_dir() else []
    if not found:
        raise FileNotFoundError(
            f"no corpus in {data}: expected one folder per domain with train.jsonl, feedback.jsonl and test.jsonl "
            "(or train.jsonl and val.jsonl); build one with `python benchmarks/corpus.py --max-mb 5` or pass --data DIR"
        )
    if domains:
        unknown = [d for d in domains if d not in found]
        if unknown:
            raise ValueError(f"unknown domain(s) {unknown} in {data}; domains: {found}")
        found = [d for d in found if d in domains]
    cap = None if max_train_mb is None else int(max_train_mb * 1e6)
    caps = dict(caps) if isinstance(caps, dict) else parse_caps(caps, found)
    train, feedback, test = {}, {}, {}
    for d in found:
        limit = min(x for x in (cap, caps.get(d)) if x is not None) if (cap or d in caps) else None
        train[d] = read_domain(data / d / "train.jsonl", limit)
        if (data / d / "test.jsonl").is_file():
            feedback[d] = read_domain(data / d / "feedback.jsonl")
            test[d] = read_domain(data / d / "test.jsonl")
        else:
            fb, te = _split_val(_documents(data / d / "val.jsonl"), d)
            feedback[d], test[d] = _join(fb), _join(te)
    if junk > 0:
        found = [*found, JUNK]
        train[JUNK] = junk_bytes(int(junk), seed=1)
        feedback[JUNK] = junk_bytes(200_000, seed=2)
        test[JUNK] = junk_bytes(200_000, seed=3)
    manifest_path = data / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    return Corpus(found, train, feedback, test, manifest, caps)


def eval_windows(val: np.ndarray, length: int, count: int) -> torch.Tensor:
    """``count`` fixed windows spread evenly over a domain's held-out bytes (test or feedback split)."""
    n = max(1, (len(val) - 1) // (length - 1))
    idx = np.unique(np.linspace(0, n - 1, num=count, dtype=np.int64))
    ds = ByteWindows(val, length)
    rows = [ds[int(i)] for i in idx if len(ds[int(i)]) == length]
    if not rows:
        raise ValueError(f"a validation split of {len(val)} bytes is too short for windows of {length}")
    return torch.stack(rows)


@torch.no_grad()
def evaluate(model: torch.nn.Module, sets: Sequence[torch.Tensor], batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per-domain sums of per-window mean losses (nats per byte) and window counts."""
    was_training = model.training
    model.eval()
    sums = np.zeros(len(sets))
    counts = np.zeros(len(sets))
    for d, windows in enumerate(sets):
        for i in range(0, len(windows), batch):
            loss = per_sequence_loss(model, windows[i : i + batch])
            sums[d] += float(loss.sum())
            counts[d] += loss.numel()
    model.train(was_training)
    return sums, counts


# -- policies --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Spec:
    """One benchmarked configuration: a display label, a registry name and constructor arguments."""

    label: str
    name: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


# Variants the spec asks to compare (both ODM variants, loss- and progress-rewarded bandits); every other
# registered policy runs with its defaults. A variant whose arguments its policy does not take is skipped.
VARIANTS = [
    Spec("uniform", "uniform"),
    Spec("natural", "natural"),
    Spec("odm-paper", "odm", {"variant": "paper"}),
    Spec("odm-released", "odm", {"variant": "released"}),
    Spec("exp3s-progress", "exp3s", {"reward": "progress"}),
    Spec("exp3-progress", "exp3", {"reward": "progress"}),
    # the best static prior as the starting point of the best bandit: does adapting on top of it help?
    Spec("exp3s-progress-natural", "exp3s", {"reward": "progress", "prior": "natural"}),
    Spec("discounted_ucb-progress", "discounted_ucb", {"reward": "progress"}),
    # The alternatives the exploration and step-size defaults were decided against (see the policies' docstrings).
    Spec("ucb1-gamma0.1", "ucb1", {"gamma": 0.1}),
    Spec("discounted_ucb-gamma0.1", "discounted_ucb", {"gamma": 0.1}),
    Spec("doremi-eta1", "doremi", {"eta": 1.0}),
    # Round-based estimators with their defaults sized for long runs act only late (ADO starts fitting at step
    # 1000; one Aioli round of 250 steps spends 4·K·4 = 192 steps probing at K = 12): also run short settings.
    Spec("aioli-short", "aioli", {"round_steps": 100, "sweeps": 1, "probe_steps": 2}),
    Spec("ado-short", "ado", {"start_step": 50, "update_interval": 50}),
]
NEVER = {"fixed", "scheduled", "temperature"}  # need a user-given vector or trajectory: nothing to learn here


def discover(selected: Sequence[str] | None) -> list[Spec]:
    """The specs to run: the variants above plus every other registered policy (or only those named)."""
    names = odm.policies.policy_names()
    specs = [s for s in VARIANTS if s.name in names]
    covered = {s.label for s in specs} | {s.name for s in specs if "variant" in s.kwargs}
    specs += [Spec(n, n) for n in names if n not in covered and n not in NEVER]
    if selected:
        wanted = [s.lower() for s in selected]
        unknown = [w for w in wanted if not any(w in (s.label, s.name) for s in specs)]
        if unknown:
            print(f"not registered (skipped): {unknown}; registered: {names}")
        specs = [s for s in specs if s.label in wanted or s.name in wanted]
    # uniform first: DoReMi's reference and the steps-to-baseline target come from it
    return sorted(specs, key=lambda s: s.label != "uniform")


def policy_class(name: str) -> type[odm.Policy]:
    """The class registered as ``name``, found through the public API (``odm.policies.__all__``)."""
    lookup = getattr(odm.policies, "policy_class", None)
    if lookup is not None:
        return lookup(name)  # type: ignore[no-any-return]
    for attr in odm.policies.__all__:
        obj = getattr(odm.policies, attr)
        if isinstance(obj, type) and issubclass(obj, odm.Policy) and getattr(obj, "name", None) == name:
            return obj
    raise ValueError(f"unknown policy {name!r}; known policies: {odm.policies.policy_names()}")


def _reference_kwarg(cls: type) -> str | None:
    return next((p for p in inspect.signature(cls).parameters if "reference" in p), None)


class CurveReference:
    """DoReMi's reference: uniform's per-domain (EMA-smoothed) training loss at the same step, ``step -> (K,)``.

    The reference model is "the same model trained under uniform proportions"; comparing at equal steps makes
    the excess loss measure what the mixture does better or worse than uniform *so far*, rather than how far a
    young model is from a finished one (a final-loss reference makes every domain's excess positive early on).
    """

    def __init__(self, curve: np.ndarray) -> None:
        self.curve = np.asarray(curve, dtype=np.float64)

    def __call__(self, step: int) -> np.ndarray:
        return self.curve[min(max(step, 1), len(self.curve)) - 1]


def build_policy(spec: Spec, corpus: Corpus, reference: np.ndarray | None) -> odm.Policy:
    """Builds ``spec`` for this corpus; raises ``RuntimeError`` with a readable reason when it cannot.

    ``reference``: uniform's ``(steps, K)`` smoothed training-loss curve of the same seed, for policies that
    take a ``reference…`` argument (DoReMi).
    """
    kwargs = dict(spec.kwargs)
    if spec.name in ("natural", "temperature"):
        kwargs["sizes"] = corpus.natural_bytes
    if kwargs.get("prior") == "natural":  # a policy started from (and sharing back to) the natural proportions
        kwargs["prior"] = corpus.natural_bytes
    if spec.name == "entropy":  # the entropy prior estimates from a sample of each domain's training bytes
        kwargs["samples"] = [[corpus.train[d][:262_144].tobytes()] for d in corpus.domains]
    cls = policy_class(spec.name)  # the class, to inspect its signature
    key = _reference_kwarg(cls)
    if _needs_reference(spec):
        if key is None:
            raise RuntimeError(f"{cls.__name__} needs reference losses but takes no `reference…` argument")
        if reference is None:
            raise RuntimeError("needs reference losses: run `uniform` (same seeds) in the same invocation")
        kwargs[key] = CurveReference(reference)
    try:
        return odm.policies.get_policy(spec.name, **kwargs)
    except (TypeError, ValueError) as err:
        raise RuntimeError(f"cannot build {spec.name}({', '.join(map(str, kwargs))}): {err}") from None


# -- one run ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunConfig:
    # full run: 23 configurations x 3 seeds x 800 steps x ~0.2 s ≈ 3 CPU-hours (--jobs 2: ~1.5 h on 2 cores)
    steps: int = 800
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 50
    eval_every: int = 40
    eval_windows: int = 48  # per domain, for the reported held-out loss
    policy_eval_windows: int = 16  # per domain, for policies' own held-out evaluations
    model: LMConfig = dataclasses.field(default_factory=LMConfig)


def train_run(
    policy: odm.Policy,
    corpus: Corpus,
    cfg: RunConfig,
    *,
    seed: int,
    label: str = "",
    progress: bool = True,
    on_eval: Callable[[int, np.ndarray], None] | None = None,
) -> dict[str, Any]:
    """Trains one model under ``policy``; returns the curve, the proportions and the timings."""
    torch.manual_seed(seed)
    length = cfg.model.context + 1
    sources = {d: ByteWindows(corpus.train[d], length) for d in corpus.domains}
    loader = odm.MixtureLoader(sources, batch_size=cfg.batch_size, policy=policy, seed=seed)
    mixer = loader.mixer
    # The reported scores come from the test split only; a policy's own held-out evaluations (Aioli, Skill-It)
    # from the feedback split: different documents of different source groups (see corpus.py).
    measure = [eval_windows(corpus.test[d], length, cfg.eval_windows) for d in corpus.domains]
    held_out = [eval_windows(corpus.feedback[d], length, cfg.policy_eval_windows) for d in corpus.domains]
    model = ByteLM(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, frac))))

    wants_eval = getattr(mixer, "wants_eval", None)
    observe_eval = getattr(mixer, "observe_eval", None)
    curve: list[tuple[int, list[float]]] = []
    proportions: list[list[float]] = []
    k = len(corpus.domains)
    smoothed = np.full(k, np.nan)  # per-domain EMA of the training loss (nats), DoReMi's reference curve
    train_curve = np.zeros((cfg.steps, k))
    train_seconds = train_cpu_seconds = policy_eval_seconds = measure_seconds = 0.0
    num_policy_evals = 0
    bar = tqdm(total=cfg.steps, desc=f"{label} seed {seed}", leave=False, disable=not progress) if tqdm else None
    tick, cpu_tick = time.perf_counter(), time.process_time()
    for step, batch in enumerate(loader):
        if step >= cfg.steps:
            break
        proportions.append(mixer.schedule.lookup(int(batch["mix_step"]))[0].tolist())  # what it was drawn under
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = per_sequence_loss(model, batch["data"])
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        opt.step()
        mixer.observe(batch, loss)
        per_domain = np.bincount(batch["domain"].numpy(), weights=loss.detach().double().numpy(), minlength=k)
        seen = np.bincount(batch["domain"].numpy(), minlength=k)
        fresh = per_domain / np.maximum(seen, 1)
        smoothed = np.where(seen > 0, np.where(np.isnan(smoothed), fresh, 0.9 * smoothed + 0.1 * fresh), smoothed)
        train_curve[step] = smoothed
        if wants_eval is not None and observe_eval is not None and wants_eval():
            t0 = time.perf_counter()
            sums, counts = evaluate(model, held_out)
            observe_eval(sums, counts)
            policy_eval_seconds += time.perf_counter() - t0
            num_policy_evals += 1
        mixer.step()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            train_seconds += time.perf_counter() - tick
            train_cpu_seconds += time.process_time() - cpu_tick
            t0 = time.perf_counter()
            sums, counts = evaluate(model, measure)
            measure_seconds += time.perf_counter() - t0
            bpb = sums / counts / LN2
            curve.append((step + 1, np.round(bpb, 5).tolist()))
            if on_eval is not None:
                on_eval(step + 1, bpb)
            if bar is not None:
                bar.set_postfix(mean_bpb=f"{bpb.mean():.3f}")
            tick, cpu_tick = time.perf_counter(), time.process_time()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    final = np.array(curve[-1][1])
    return {
        "curve": curve,
        "proportions": proportions,
        "final_bpb": final.tolist(),
        "final_nats": (final * LN2).tolist(),
        "train_curve": train_curve,
        "train_seconds": train_seconds,  # training steps + the policy's own evaluations (wall-clock)
        "train_cpu_seconds": train_cpu_seconds,  # the same, CPU time of this process (robust to a busy machine)
        "policy_eval_seconds": policy_eval_seconds,
        "num_policy_evals": num_policy_evals,
        "measure_seconds": measure_seconds,  # the benchmark's own held-out measurements
    }


# -- aggregation -----------------------------------------------------------------------------------------------


def steps_to_reach(curve: Sequence[tuple[int, Sequence[float]]], target: float) -> float:
    """First step at which the mean-over-domains curve reaches ``target`` (linear interpolation); inf if never."""
    prev_step, prev_val = 0, math.inf
    for step, bpb in curve:
        val = float(np.mean(bpb))
        if val <= target + 1e-5:  # curves are stored to 5 decimals
            if math.isinf(prev_val):
                return float(step)
            return min(step, prev_step + (step - prev_step) * (prev_val - target) / max(prev_val - val, 1e-12))
        prev_step, prev_val = step, val
    return math.inf


def summarise(runs: list[dict[str, Any]], domains: list[str], weights: np.ndarray, steps: int) -> dict[str, Any]:
    """Per policy, mean ± std over seeds of every reported metric."""
    w = weights / weights.sum()
    for r in runs:
        final = np.array(r["final_bpb"])
        r["mean_bpb"] = float(final.mean())
        r["weighted_bpb"] = float(final @ w)
    uniform = [r for r in runs if r["policy"] == "uniform"]
    target = float(np.mean([r["mean_bpb"] for r in uniform])) if uniform else None
    per_seed = {r["seed"]: r["mean_bpb"] for r in uniform}
    # CPU time, not wall-clock: on a shared machine wall-clock mostly measures the neighbours
    base_seconds = (
        float(np.mean([r.get("train_cpu_seconds", r["train_seconds"]) for r in uniform])) if uniform else None
    )
    out: dict[str, Any] = {"uniform_final_mean_bpb": target, "policies": {}}
    for label in dict.fromkeys(r["policy"] for r in runs):
        rs = [r for r in runs if r["policy"] == label]
        finals = np.array([r["final_bpb"] for r in rs])
        if target is not None:
            for r in rs:
                # paired by seed (same initialisation and data order): less noisy than the mean over seeds
                own = per_seed.get(r["seed"], target)
                r["steps_to_uniform"] = steps_to_reach(r["curve"], own) / steps
        ratio = [r.get("steps_to_uniform", math.nan) for r in rs]
        secs = np.array([r["train_seconds"] for r in rs])
        cpu = np.array([r.get("train_cpu_seconds", r["train_seconds"]) for r in rs])
        # paired by seed: the same initialisation and data order as uniform's run, so seed noise cancels
        paired = [r["mean_bpb"] - per_seed[r["seed"]] for r in rs if r["seed"] in per_seed]
        props = np.array([np.mean(r["proportions"], axis=0) for r in rs])
        out["policies"][label] = {
            "seeds": [r["seed"] for r in rs],
            "mean_bpb": [float(np.mean([r["mean_bpb"] for r in rs])), float(np.std([r["mean_bpb"] for r in rs]))],
            "weighted_bpb": [
                float(np.mean([r["weighted_bpb"] for r in rs])),
                float(np.std([r["weighted_bpb"] for r in rs])),
            ],
            "per_domain_bpb": {
                d: [float(finals[:, i].mean()), float(finals[:, i].std())] for i, d in enumerate(domains)
            },
            "steps_to_uniform": [float(np.median(ratio)), [float(x) for x in ratio]],
            "delta_vs_uniform": [float(np.mean(paired)), float(np.std(paired))] if paired else None,
            "train_seconds": [float(secs.mean()), float(secs.std())],
            "train_cpu_seconds": [float(cpu.mean()), float(cpu.std())],
            "overhead_vs_uniform": None if not base_seconds else float(cpu.mean() / base_seconds - 1),
            "mean_proportions": props.mean(axis=0).tolist(),
        }
    return out


def _fmt_ratio(x: float) -> str:
    return "never" if not math.isfinite(x) or x > 1 else f"{x:.2f}"


def markdown(result: dict[str, Any]) -> str:
    """The results as Markdown: headline table, per-domain table, the command and the corpus versions."""
    summary, domains = result["summary"], result["domains"]
    cfg = result["config"]
    lines = [
        f"# Mixing quality — {result['hardware']}, {result['date']}",
        "",
        f"`{result['command']}` — {result.get('machine', result['hardware'])}",
        "",
        f"{len(domains)} domains, byte-level LM {cfg['model']} ({result['num_parameters']:,} parameters), "
        f"{cfg['steps']} steps × batch {cfg['batch_size']}, seeds {result['seeds']}. Held-out **bits per byte**, "
        "mean ± std over seeds. Headline: the unweighted mean over domains. *steps→uniform*: median over seeds "
        "of the fraction of the budget a policy needs to reach uniform's final mean of the same seed (lower is "
        "better; `never` = not within the "
        "budget). *Δ vs uniform*: mean ± std over seeds of the difference to uniform's run of the same seed "
        "(same initialisation; seed noise cancels). *overhead*: training CPU time (the policy's held-out "
        "evaluations included) vs uniform; approximate (a shared 2-core machine).",
        "",
        "Byte-weighted weights (natural sizes, MB): "
        + ", ".join(f"{d} {b / 1e6:.1f}" for d, b in zip(domains, result["natural_bytes"], strict=True))
        + ".",
        "",
        "| policy | mean bpb (headline) | Δ vs uniform (paired) | byte-weighted bpb | steps→uniform | overhead |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    rows = sorted(summary["policies"].items(), key=lambda kv: kv[1]["mean_bpb"][0])
    for label, s in rows:
        d = s["delta_vs_uniform"]
        delta = "" if d is None else f"{d[0]:+.4f} ± {d[1]:.4f}"
        over = "" if s["overhead_vs_uniform"] is None else f"{100 * s['overhead_vs_uniform']:+.0f}%"
        lines.append(
            f"| {label} | {s['mean_bpb'][0]:.4f} ± {s['mean_bpb'][1]:.4f} | {delta} | "
            f"{s['weighted_bpb'][0]:.4f} ± {s['weighted_bpb'][1]:.4f} | "
            f"{_fmt_ratio(s['steps_to_uniform'][0])} | {over} |"
        )
    lines += ["", "Per-domain held-out bits per byte (mean over seeds) and mean proportions over the run:", ""]
    lines.append("| policy | " + " | ".join(domains) + " |")
    lines.append("| --- |" + " --- |" * len(domains))
    for label, s in rows:
        cells = [
            f"{s['per_domain_bpb'][d][0]:.3f} ({100 * p:.0f}%)"
            for d, p in zip(domains, s["mean_proportions"], strict=True)
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if result["skipped"]:
        lines += ["", "Skipped:", ""] + [f"* `{k}`: {v}" for k, v in result["skipped"].items()]
    packages = {
        p: v for e in result.get("corpus", {}).get("domains", {}).values() for p, v in e.get("packages", {}).items()
    }
    if packages:
        lines += ["", "Corpus packages: " + ", ".join(f"{p} {v}" for p, v in sorted(packages.items()))]
    return "\n".join(lines) + "\n"


def plots(result: dict[str, Any], runs: list[dict[str, Any]], stem: Path) -> list[Path]:
    """Stacked-area proportions per policy (seed of the first run) and mean held-out bpb vs steps."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install odm[bench]): no plots")
        return []
    domains = result["domains"]
    labels = list(result["summary"]["policies"])
    first = {label: next(r for r in runs if r["policy"] == label) for label in labels}
    cols = min(4, len(labels))
    rows = math.ceil(len(labels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), sharex=True, sharey=True, squeeze=False)
    colors = plt.get_cmap("tab20")(np.arange(len(domains)) % 20)
    for ax, label in zip(axes.flat, labels, strict=False):
        p = np.array(first[label]["proportions"])
        x = np.linspace(0, result["config"]["steps"], len(p), endpoint=False)  # proportions may be subsampled
        ax.stackplot(x, p.T, labels=domains, colors=colors, linewidth=0)
        ax.set_title(label, fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_xlim(0, result["config"]["steps"])
    for ax in axes.flat[len(labels) :]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(6, len(domains)), fontsize=7)
    fig.suptitle(f"proportions over steps (seed {first[labels[0]]['seed']})", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    props_path = stem.with_name(stem.name + "-proportions.png")
    fig.savefig(props_path, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label in labels:
        curves = [r["curve"] for r in runs if r["policy"] == label]
        steps = [s for s, _ in curves[0]]
        mean = np.mean([[np.mean(b) for _, b in c] for c in curves], axis=0)
        ax.plot(
            steps, mean, label=label, lw=2 if label == "uniform" else 1.2, color="k" if label == "uniform" else None
        )
    ax.set_xlabel("step")
    ax.set_ylabel("mean held-out bits per byte (over domains)")
    base = result["summary"]["uniform_final_mean_bpb"]
    if base is not None:
        ax.axhline(base, color="k", ls=":", lw=0.8)
        lo = min(np.mean(r["final_bpb"]) for r in runs)
        ax.set_ylim(lo - 0.1, base + 1.0)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    loss_path = stem.with_name(stem.name + "-loss.png")
    fig.savefig(loss_path, dpi=110)
    plt.close(fig)
    return [props_path, loss_path]


def hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().lower().replace(" ", "-")
    return f"cpu{os.cpu_count()}"


# -- entry point -----------------------------------------------------------------------------------------------

QUICK = dict(steps=200, eval_every=20, eval_windows=64, policy_eval_windows=16, warmup=20)
QUICK_MODEL = LMConfig(num_layers=2, width=64, num_heads=4, context=64)


def _needs_reference(spec: Spec) -> bool:
    cls = policy_class(spec.name)
    return _reference_kwarg(cls) is not None or REFERENCE_LOSS in cls.requires


def run_one(
    spec: Spec, seed: int, corpus: Corpus, cfg: RunConfig, reference: np.ndarray | None, progress: bool = False
) -> dict[str, Any] | str:
    """One (policy, seed) run: its result, or the reason it could not be built."""
    try:
        policy = build_policy(spec, corpus, reference)
    except RuntimeError as err:
        return str(err)
    r = train_run(policy, corpus, cfg, seed=seed, label=spec.label, progress=progress)
    r.update(policy=spec.label, name=spec.name, kwargs=dict(spec.kwargs), seed=seed)
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
    waiting = [j for j in jobs if _needs_reference(j[0])]
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
) -> dict[str, Any]:
    """Runs the benchmark and writes ``quality-<hardware>-<date>.{json,md}`` and the plots; returns the result.

    ``jobs > 1`` trains that many runs at once in worker processes of ``torch.get_num_threads() // jobs`` threads
    (at least 1); each run is the same as in one process with that many threads.
    """
    corpus_args: dict[str, Any] = dict(max_train_mb=max_train_mb, domains=domains, caps=caps, junk=junk)
    corpus = load_corpus(data, **corpus_args)
    cfg = RunConfig(**QUICK, model=QUICK_MODEL) if quick else RunConfig()
    if model is not None:
        cfg = dataclasses.replace(cfg, model=model)
    if steps is not None:
        every = max(1, min(cfg.eval_every, steps // 10 or 1), steps // 20)  # 10 to 20 evaluations per run
        cfg = dataclasses.replace(cfg, steps=steps, eval_every=every)
    specs = discover(policies)
    mb = ", ".join(f"{d} {len(corpus.train[d]) / 1e6:.1f}" for d in corpus.domains)
    print(f"data {data}: {len(corpus.domains)} domains (train MB: {mb})")
    print(f"policies: {[s.label for s in specs]}; seeds {list(seeds)}; {cfg.steps} steps; model {cfg.model}")
    done: dict[tuple[str, int], dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    reference: dict[int, np.ndarray] = {}
    start = time.perf_counter()
    jobs_list = [(spec, seed) for spec in specs for seed in seeds]  # uniform first (see `discover`)
    outer = tqdm(total=len(jobs_list), desc="runs", disable=not progress) if tqdm else None

    def on_done(spec: Spec, seed: int, r: dict[str, Any] | str) -> None:
        if outer is not None:
            outer.update(1)
        if isinstance(r, str):
            if spec.label not in skipped:
                print(f"skip {spec.label}: {r}")
            skipped[spec.label] = r
            return
        train_curve = r.pop("train_curve")
        if spec.label == "uniform":
            # steps before a domain's first draw (NaN) borrow its first smoothed value
            first = train_curve[np.argmax(~np.isnan(train_curve), axis=0), np.arange(train_curve.shape[1])]
            reference[seed] = np.where(np.isnan(train_curve), first, train_curve)
        done[(spec.label, seed)] = r

    if jobs > 1:
        threads = max(1, torch.get_num_threads() // jobs)
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
    runs = [done[(spec.label, seed)] for spec, seed in jobs_list if (spec.label, seed) in done]
    if not runs:
        raise RuntimeError(f"no policy ran; skipped: {skipped}")
    summary = summarise(runs, corpus.domains, corpus.natural_bytes, cfg.steps)
    date = datetime.datetime.now(datetime.UTC)
    cfg_dict = dataclasses.asdict(cfg)
    cfg_dict["model"] = dataclasses.asdict(cfg.model)
    result: dict[str, Any] = {
        "command": "python benchmarks/quality.py " + " ".join(sys.argv[1:])
        if __name__ == "__main__"
        else "quality.run()",
        "hardware": hardware(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        + (
            f"{jobs} jobs x {max(1, torch.get_num_threads() // jobs)} thread(s)"
            if jobs > 1
            else f"{torch.get_num_threads()} thread(s)"
        ),
        "date": date.strftime("%Y-%m-%d %H:%M UTC"),
        "config": cfg_dict,
        "num_parameters": ByteLM(cfg.model).num_parameters(),
        "seeds": list(seeds),
        "domains": corpus.domains,
        "train_bytes": corpus.train_bytes.tolist(),
        "natural_bytes": corpus.natural_bytes.tolist(),
        "scored_domains": corpus.scored,
        "regime": {"domains": domains, "caps": corpus.caps, "junk_bytes": int(junk), "max_train_mb": max_train_mb},
        "test_bytes": [len(corpus.test[d]) for d in corpus.domains],
        "feedback_bytes": [len(corpus.feedback[d]) for d in corpus.domains],
        "weights": "natural proportions and the byte-weighted mean use natural_bytes (uncapped domain sizes)",
        "corpus": corpus.manifest,
        "skipped": skipped,
        "summary": summary,
        "total_seconds": time.perf_counter() - start,
        "runs": [
            {k: v for k, v in r.items() if k != "proportions"}
            | {"proportions": np.round(r["proportions"][:: max(1, cfg.steps // 100)], 4).tolist()}
            for r in runs
        ],
    }
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"quality-{tag or hardware()}-{date:%Y%m%d}"
    stem.with_suffix(".json").write_text(json.dumps(result, default=float))
    stem.with_suffix(".md").write_text(markdown(result))
    pictures = plots(result, runs, stem)
    print()
    print(markdown(result))
    for path in [stem.with_suffix(".json"), stem.with_suffix(".md"), *pictures]:
        print(f"wrote {path}")
    return result


def merge(results: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """One result from several runs of the same benchmark (e.g. the policies split over two processes).

    The inputs must share the configuration, the corpus and its domains; a (policy, seed) pair present in more
    than one is kept once when its results agree exactly (training is deterministic on one thread) and refused
    when they differ. ``names`` label the inputs in error messages.
    """
    first = results[0]
    for key in ("config", "domains", "natural_bytes", "corpus"):
        for name, other in zip(names[1:], results[1:], strict=True):
            if other.get(key) != first.get(key):
                raise ValueError(f"cannot merge {names[0]} and {name}: their `{key}` differ")
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    for name, result in zip(names, results, strict=True):
        for r in result["runs"]:
            key = (r["policy"], r["seed"])
            if key in runs and runs[key]["final_bpb"] != r["final_bpb"]:
                delta = np.max(np.abs(np.subtract(runs[key]["final_bpb"], r["final_bpb"])))
                raise ValueError(
                    f"policy {key[0]!r} seed {key[1]} ran in more than one input with different results "
                    f"(max per-domain difference {delta:.5f} bpb, last in {name}); merge only one of them"
                )
            runs.setdefault(key, r)
    merged = dict(first)
    merged["command"] = " + ".join(dict.fromkeys(r["command"] for r in results))
    merged["date"] = max(r["date"] for r in results)
    merged["seeds"] = sorted({s for r in results for s in r["seeds"]})
    merged["skipped"] = {k: v for r in results for k, v in r.get("skipped", {}).items()}
    merged["total_seconds"] = sum(r.get("total_seconds", 0.0) for r in results)
    # uniform first: the paired deltas and the steps-to-baseline target come from it
    merged["runs"] = sorted(runs.values(), key=lambda r: r["policy"] != "uniform")
    return merged


def report(paths: Sequence[Path], out: Path | None = None, tag: str | None = None) -> dict[str, Any]:
    """Re-summarises saved results JSON (e.g. after a change to the metrics) and rewrites their Markdown and plots.

    One path without ``tag`` is rewritten in place; several are merged (see :func:`merge`) into
    ``quality-<tag>-<date>`` under ``out`` (default: beside the first).
    """
    results = [json.loads(p.read_text()) for p in paths]
    result = merge(results, [str(p) for p in paths]) if len(paths) > 1 else results[0]
    runs = result["runs"]
    weights = np.array(result.get("natural_bytes", result["train_bytes"]), dtype=np.float64)
    result.setdefault("natural_bytes", weights.tolist())
    result["summary"] = summarise(runs, result["domains"], weights, result["config"]["steps"])
    if len(paths) == 1 and tag is None:
        path = paths[0]
    else:
        day = result["date"][:10].replace("-", "")
        path = (out or paths[0].parent) / f"quality-{tag or result['hardware']}-{day}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, default=float))
    stem = path.with_suffix("")
    stem.with_suffix(".md").write_text(markdown(result))
    plots(result, runs, stem)
    print(markdown(result))
    print(f"wrote {path}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"corpus folder (default {DEFAULT_DATA})")
    parser.add_argument("--quick", action="store_true", help="smaller model, 200 steps: minutes, for a first look")
    parser.add_argument("--policies", nargs="+", help="labels or registry names (default: all registered)")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (first-seed..first-seed+N-1), default 3")
    parser.add_argument("--first-seed", type=int, default=0, help="the first seed (default 0; tuning seeds: 100)")
    parser.add_argument("--domains", nargs="+", help="a subset of the corpus' domains (a second composition)")
    parser.add_argument(
        "--cap",
        nargs="+",
        metavar="DOMAIN=BYTES",
        help="cut these domains' training text (all=BYTES: every domain): the data-constrained regime",
    )
    parser.add_argument("--junk", type=float, default=0, help="add a domain `junk` of this many random bytes")
    parser.add_argument("--steps", type=int, help="training steps per run (default 800; quick 200)")
    parser.add_argument("--max-train-mb", type=float, help="read at most this many MB of training text per domain")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads in all")
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs trained at once, in worker processes sharing --threads (e.g. 2)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    parser.add_argument("--tag", help="file name tag instead of the hardware name")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--report",
        type=Path,
        nargs="+",
        help="no training: re-summarise a results JSON in place, or merge several into one (with --tag/--out)",
    )
    args = parser.parse_args(argv)
    if args.report is not None:
        try:
            report(args.report, out=args.out if args.out != RESULTS else None, tag=args.tag)
        except ValueError as err:
            parser.error(str(err))
        return 0
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.jobs < 1 or args.threads < 1:
        parser.error(f"--jobs and --threads must be >= 1, got {args.jobs} and {args.threads}")
    torch.set_num_threads(args.threads)
    run(
        args.data,
        quick=args.quick,
        policies=args.policies,
        seeds=range(args.first_seed, args.first_seed + args.seeds),
        steps=args.steps,
        out=args.out,
        max_train_mb=args.max_train_mb,
        progress=not args.no_progress,
        tag=args.tag,
        jobs=args.jobs,
        domains=args.domains,
        caps=args.cap,
        junk=int(args.junk),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
