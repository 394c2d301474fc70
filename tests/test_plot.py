"""Proportions over time from a plain loop: the trajectory, its CSV and its plot."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

import odm
from odm.plot import proportions_over_time


def run(steps: int = 30) -> odm.OnlineMixer:
    """A loss-chasing bandit fed fixed per-domain losses: its proportions change at every step."""
    mixer = odm.OnlineMixer(["web", "code", "math"], policy="exp3", seed=0)
    for _ in range(steps):
        domains = mixer.sample(16)
        mixer.observe(domains, np.array([0.5, 1.0, 2.0])[domains])
        mixer.step()
    return mixer


def test_the_trajectory_is_the_mixers_record_of_changes_in_domain_order() -> None:
    mixer = run()
    steps, p = proportions_over_time(mixer)
    assert steps.tolist() == [s for s, _ in mixer.export_schedule()]
    assert p.shape == (len(steps), 3) and np.allclose(p.sum(axis=1), 1)
    assert p[-1].tolist() == mixer.proportions.tolist()
    assert p[-1, 2] > p[0, 2], "the highest-loss domain gained"


def test_the_csv_has_a_row_per_change_and_reads_back_bit_for_bit(tmp_path: Path) -> None:
    mixer = run()
    path = odm.write_proportions_csv(mixer, tmp_path / "sub" / "p.csv")
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["step", "web", "code", "math"]
    steps, p = proportions_over_time(mixer)
    assert [int(r[0]) for r in rows[1:]] == steps.tolist()
    assert np.array([[float(v) for v in r[1:]] for r in rows[1:]]).tolist() == p.tolist()


def test_plot_proportions_writes_a_png_for_a_mixer_or_a_loader(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = odm.plot_proportions(run(), tmp_path / "p.png", title="exp3")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loader = odm.MixtureLoader({"a": list(range(10)), "b": list(range(10))}, batch_size=2)
    assert odm.plot_proportions(loader, tmp_path / "l.png").stat().st_size > 0


def test_the_helpers_refuse_what_is_not_a_mixer(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="expected an odm.OnlineMixer or an odm.MixtureLoader, got list"):
        odm.write_proportions_csv([0.5, 0.5], tmp_path / "p.csv")
