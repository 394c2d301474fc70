"""Proportions over time, from any loop: a CSV table and a plot of a mixer's trajectory.

The mixer records every change of its published proportions (``mixer.export_schedule()``: ``[(step,
proportions), …]``, each entry in force from its ``step`` — a count of ``mixer.step()`` calls — until the
next). These helpers turn that record into a table (one row per change) and a stacked step plot, so a plain
training loop gets what the Lightning callback and the Hugging Face trainer log as ``mix/p/<domain>``.

* :func:`proportions_over_time` — ``(steps, proportions)`` arrays;
* :func:`write_proportions_csv` — ``step,<domain>,…`` rows (no extra dependency);
* :func:`plot_proportions` — a PNG (needs ``matplotlib``: ``pip install matplotlib`` or the ``[bench]`` extra).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_proportions", "proportions_over_time", "write_proportions_csv"]


def _mixer(obj: Any) -> Any:
    """The :class:`odm.OnlineMixer` of ``obj`` (a mixer, or anything holding one as ``.mixer``)."""
    mixer = getattr(obj, "mixer", obj)
    if not callable(getattr(mixer, "export_schedule", None)) or not hasattr(mixer, "domains"):
        raise TypeError(f"expected an odm.OnlineMixer or an odm.MixtureLoader, got {type(obj).__name__}")
    return mixer


def proportions_over_time(mixer: Any) -> tuple[np.ndarray, np.ndarray]:
    """The mixer's proportions trajectory as arrays.

    Args:
        mixer: an :class:`odm.OnlineMixer` (or an :class:`odm.MixtureLoader`).

    Returns:
        ``(steps, proportions)``: ``steps`` ``(n,)`` int64, the ``mixer.step()`` count from which each row
        holds; ``proportions`` ``(n, K)`` float64, one row per recorded change (in domain order).

    Example:
        >>> import odm
        >>> mixer = odm.OnlineMixer(["web", "code"])
        >>> _ = mixer.set_proportions([0.8, 0.2])
        >>> steps, p = proportions_over_time(mixer)
        >>> steps.tolist(), p.tolist()
        ([0, 0], [[0.5, 0.5], [0.8, 0.2]])
    """
    schedule = _mixer(mixer).export_schedule()
    steps = np.array([int(s) for s, _ in schedule], dtype=np.int64)
    proportions = np.array([list(p) for _, p in schedule], dtype=np.float64).reshape(len(schedule), -1)
    return steps, proportions


def write_proportions_csv(mixer: Any, path: str | os.PathLike[str]) -> Path:
    """Writes the trajectory as CSV: a header ``step,<domain>,…`` and one row per change.

    Example:
        >>> import odm, tempfile, pathlib
        >>> mixer = odm.OnlineMixer(["web", "code"])
        >>> out = write_proportions_csv(mixer, pathlib.Path(tempfile.mkdtemp()) / "p.csv")
        >>> out.read_text().splitlines()
        ['step,web,code', '0,0.5,0.5']
    """
    mixer = _mixer(mixer)
    steps, proportions = proportions_over_time(mixer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", *mixer.domains])
        for s, row in zip(steps.tolist(), proportions.tolist(), strict=True):
            writer.writerow([s, *(repr(float(v)) for v in row)])
    return path


def plot_proportions(
    mixer: Any, path: str | os.PathLike[str], *, title: str | None = None, until: int | None = None
) -> Path:
    """Draws the proportions over training steps as stacked areas (one colour per domain) into a PNG.

    Args:
        mixer: an :class:`odm.OnlineMixer` (or an :class:`odm.MixtureLoader`).
        path: the image file to write (its folder is created).
        title: the figure title; default ``"<policy> — proportions over training steps"``.
        until: the last step on the x axis; default the mixer's number of ``step()`` calls (at least the last
            recorded change).

    Returns:
        ``path``.

    Raises:
        ImportError: ``matplotlib`` is not installed (the message names the fix).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("odm.plot_proportions needs matplotlib: pip install matplotlib") from err
    mixer = _mixer(mixer)
    steps, proportions = proportions_over_time(mixer)
    # Each row holds from its step to the next row's; a later row at the same step replaces it.
    end = int(until) if until is not None else max(int(mixer.num_steps), int(steps[-1]) + 1)
    xs = np.append(steps, max(end, int(steps[-1]))).astype(np.float64)
    ys = np.vstack([proportions, proportions[-1:]])
    fig, ax = plt.subplots(figsize=(7, 3.6))
    colours = plt.get_cmap("tab20" if mixer.num_domains > 10 else "tab10")
    ax.stackplot(xs, ys.T, labels=mixer.domains, step="post", colors=[colours(i) for i in range(mixer.num_domains)])
    ax.set_xlim(0, max(xs[-1], 1))
    ax.set_ylim(0, 1)
    ax.set_xlabel("training step (mixer.step() calls)")
    ax.set_ylabel("proportion of samples")
    ax.set_title(title or f"{type(mixer.policy).__name__} — proportions over training steps")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, title="domain")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
