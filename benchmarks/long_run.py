"""Long runs: memory and checkpoint cost of an ``OnlineMixer`` after 10³ … 10⁶ policy updates.

One mixer at K = 22 (The Pile's domain count) with a policy that moves at every update (EXP3.S by default,
so every update publishes a new row and the history is as long as it gets) runs ``observe`` + ``step`` on small
random batches. At 10³, 10⁴, 10⁵ and 10⁶ updates it records the process's resident memory (``VmRSS``, after a
garbage collection), the median time of ``mixer.state_dict()`` over 5 calls, and the size of that state as
``torch.save`` writes it. A bounded history makes all three independent of the run length; the target is
≤ 20 MB added over 10⁶ updates and ``state_dict()`` ≤ 50 ms.

Run: ``python benchmarks/long_run.py [--updates 1000000] [--policy exp3s]`` (~3–6 minutes on 2 busy cores).
Writes ``benchmarks/results/long_run-<hardware>-<yyyymmdd>.{json,md}``.
"""

from __future__ import annotations

import argparse
import gc
import io
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, median, write_results

import odm

TARGET = {"updates": 10**6, "num_domains": 22, "added_mb": 20.0, "state_dict_ms": 50.0}


def rss_mb() -> float:
    """Resident memory of this process in MB (Linux ``/proc``), after a garbage collection."""
    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (this benchmark reads Linux's /proc)")


def measure(mixer: odm.OnlineMixer, repeats: int = 5) -> dict[str, Any]:
    """``state_dict()`` time (every repeat, ms), its saved size (MB) and the history held."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state = mixer.state_dict()
        times.append((time.perf_counter() - t0) * 1e3)
    buf = io.BytesIO()
    torch.save(state, buf)
    return {
        "state_dict_ms": times,
        "saved_mb": buf.tell() / 2**20,
        "history_rows": len(mixer.history),
        "history_thinned": mixer.history.num_thinned,
        "schedule_rows": mixer.schedule.num_rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=TARGET["updates"])
    parser.add_argument("--num-domains", type=int, default=TARGET["num_domains"])
    parser.add_argument("--policy", default="exp3s", help="a policy that moves every update (default exp3s)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    k = args.num_domains
    rng = np.random.default_rng(args.seed)
    mixer = odm.OnlineMixer([f"d{i}" for i in range(k)], args.policy, seed=args.seed)
    # Batches are drawn up front (a pool reused round-robin) so the loop measures the mixer, not the draws.
    pool = [
        (torch.from_numpy(rng.integers(0, k, args.batch_size)), torch.from_numpy(rng.gamma(2.0, 1.0, args.batch_size)))
        for _ in range(256)
    ]
    marks = sorted({m for m in (10**3, 10**4, 10**5, 10**6, args.updates) if m <= args.updates})
    base = rss_mb()
    rows, results = [], []
    done, t_start = 0, time.perf_counter()
    for mark in marks:
        while mixer.num_updates < mark:
            ids, loss = pool[done % len(pool)]
            mixer.observe(ids, loss, mix_step=done)
            mixer.step()
            done += 1
        got = measure(mixer)
        got.update(updates=mark, rss_added_mb=rss_mb() - base, elapsed_s=time.perf_counter() - t_start)
        results.append(got)
        rows.append(
            [
                f"{mark:,}",
                f"{got['rss_added_mb']:.1f}",
                f"{median(got['state_dict_ms']):.1f}",
                f"{got['saved_mb']:.2f}",
                f"{got['history_rows']:,} ({got['history_thinned']:,} thinned)",
            ]
        )
        print(f"{mark:>9,} updates: +{got['rss_added_mb']:.1f} MB, state_dict {median(got['state_dict_ms']):.1f} ms")
    table = markdown_table(
        ["policy updates", "memory added (MB)", "state_dict() (ms, median of 5)", "saved (MB)", "history rows"], rows
    )
    last = results[-1]
    verdict = (
        f"At {last['updates']:,} updates, K = {k}: +{last['rss_added_mb']:.1f} MB "
        f"(target <= {TARGET['added_mb']:.0f}), state_dict() {median(last['state_dict_ms']):.1f} ms "
        f"(target <= {TARGET['state_dict_ms']:.0f})."
    )
    notes = (
        f"`{args.policy}` at K = {k}, batch {args.batch_size}, one update per step; memory is the process's VmRSS "
        "over its value after building the mixer. " + verdict
    )
    print(table)
    print(verdict)
    write_results("long_run", config=vars(args), results=results, table=table, notes=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
