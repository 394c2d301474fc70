"""Shared helpers for the benchmarks: what ran where, medians and ratios, and the results files.

Every benchmark records the hardware, the versions, its full config and the date next to its numbers, and
writes ``benchmarks/results/<name>-<hardware>-<yyyymmdd>.json`` and ``.md`` (see ``docs/benchmarks.md``).
Benchmarks run as scripts (``python benchmarks/<name>.py``), so the script's folder is on ``sys.path``::

    from _common import markdown_table, median, ratio, write_results

    table = markdown_table(["method", "items/s"], [["odm", "1.2 M"]])
    write_results("throughput", config={"K": 8}, results={"odm": [1.2e6]}, table=table)

Timings on shared machines are noisy: compare methods side by side in one run and quote ratios of medians.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_PACKAGES = ("odm", "torch", "numpy", "lightning", "torchdata", "webdataset", "torchmetrics")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _num_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _gpu() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # a broken CUDA install must not stop a CPU benchmark
        pass
    return None


def versions(packages: Iterable[str] = _PACKAGES) -> dict[str, str | None]:
    """Installed version of each package (``None`` where it is not installed)."""
    out: dict[str, str | None] = {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment() -> dict[str, Any]:
    """Hardware and software of this run: CPU model and usable cores, GPU, OS, Python, package versions."""
    return {
        "cpu": _cpu_model(),
        "cpus": _num_cpus(),
        "gpu": _gpu(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions(),
    }


def hardware_tag(env: dict[str, Any] | None = None) -> str:
    """Short hardware name for file names: ``cpu2`` (2 usable cores) or e.g. ``nvidia-h100-80gb-hbm3``."""
    env = environment() if env is None else env
    if env.get("gpu"):
        return "".join(c if c.isalnum() else "-" for c in str(env["gpu"]).lower()).strip("-")
    return f"cpu{env['cpus']}"


def median(values: Sequence[float]) -> float:
    """Median of the repeats (the figure to quote: robust to one repeat hit by a noisy neighbour)."""
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def ratio(a: float, b: float) -> float:
    """``a / b``, ``inf`` when ``b`` is 0 (a method that did not run)."""
    return a / b if b else float("inf")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Runs ``fn()`` once; returns ``(seconds, result)`` measured with ``time.perf_counter``."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def si(x: float, unit: str = "") -> str:
    """``1234567`` → ``"1.23 M"``: readable rates for tables."""
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g} {prefix}{unit}".rstrip()
    return f"{x:.3g} {unit}".rstrip()


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table (cells through ``str``); also readable printed to a terminal."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(
    name: str,
    *,
    config: dict[str, Any],
    results: Any,
    table: str,
    notes: str = "",
    directory: Path | None = None,
) -> tuple[Path, Path]:
    """Writes ``<name>-<hardware>-<yyyymmdd>.json`` (everything) and ``.md`` (the table) under ``results/``.

    Args:
        name: benchmark name (``"throughput"``).
        config: the full configuration (arguments, sizes, seeds): enough to rerun it.
        results: the raw figures (every repeat, not only medians), JSON-serialisable.
        table: the markdown table to show (also printed by the caller).
        notes: markdown put under the table (what was measured, caveats).
        directory: where to write (default ``benchmarks/results``).

    Returns:
        The paths of the JSON and markdown files.
    """
    env = environment()
    now = _dt.datetime.now(_dt.timezone.utc)
    directory = RESULTS_DIR if directory is None else directory
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{hardware_tag(env)}-{now:%Y%m%d}"
    record = {"name": name, "date": now.isoformat(timespec="seconds"), "environment": env, "config": config}
    record["results"] = results
    json_path, md_path = directory / f"{stem}.json", directory / f"{stem}.md"
    json_path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    versions_line = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    md = (
        f"# {name} — {now:%Y-%m-%d}\n\n"
        f"{env['cpu']} ({env['cpus']} usable cores){', ' + env['gpu'] if env['gpu'] else ''}; "
        f"Python {env['python']}; {versions_line}.\n\n"
        f"Config: `{json.dumps(config, default=str)}`\n\n{table}\n"
    )
    if notes:
        md += f"\n{notes.strip()}\n"
    md_path.write_text(md)
    return json_path, md_path
