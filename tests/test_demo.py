"""The ``odm demo`` command: the synthetic comparison runs, prints its table and writes its plot."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import odm
from odm.__main__ import main
from odm.demo import DOMAINS, compare, make_domains


def test_the_noise_domain_cannot_be_learned_and_the_others_can() -> None:
    data = make_domains(0)
    x, y = data["noise"]
    # the noise targets do not depend on the inputs: the best predictor is their mean, loss ≈ their variance
    assert abs(float(np.corrcoef(x[:, 0].numpy(), y.numpy())[0, 1])) < 0.1
    assert 3.0 < float(y.var()) < 5.0
    # every domain carries its one-hot tag, so the rules can be told apart
    for i, d in enumerate(DOMAINS):
        assert bool((data[d][0][:, -len(DOMAINS) + i] == 1).all())


def test_demo_prints_a_row_per_policy_and_writes_the_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plot = tmp_path / "demo.png"
    code = main(["demo", "--synthetic", "--steps", "60", "--policies", "uniform", "exp3", "--plot", str(plot)])
    out = capsys.readouterr().out
    assert code == 0
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if re.match(r"^(uniform|exp3)\s+\d", line)}
    assert set(rows) == {"uniform", "exp3"}
    # uniform's shares (columns p/easy..p/noise) are exactly 1/4
    shares = [float(v) for v in rows["uniform"][5:9]]
    assert shares == [0.25, 0.25, 0.25, 0.25]
    assert f"plot: {plot}" in out
    assert plot.stat().st_size > 0


def test_a_loss_rewarded_bandit_pours_samples_into_the_noise_domain_and_uniform_does_not() -> None:
    if "exp3" not in odm.policies.policy_names():
        pytest.skip("the EXP3 policy is not registered")
    runs, skipped = compare(["uniform", "exp3"], steps=200, seed=0)
    assert not skipped
    by = {r.policy: r for r in runs}
    noise = DOMAINS.index("noise")
    assert by["uniform"].share[noise] == pytest.approx(0.25)
    # the noise domain's loss (≈ 4) dwarfs the others': a loss reward chases it
    assert by["exp3"].share[noise] == by["exp3"].share.max() and by["exp3"].share[noise] > 0.3
    assert by["exp3"].proportions[-1, noise] > 0.4 > by["exp3"].proportions[0, noise]
    assert all(np.isfinite(r.held_out).all() for r in runs)


def test_demo_refuses_an_unknown_policy_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown policies.*uniform"):
        compare(["no-such-policy"], steps=1)


def test_the_command_line_reports_an_unknown_policy_as_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--synthetic", "--steps", "1", "--policies", "no-such-policy"])
    assert exit_info.value.code == 2
    assert "unknown policies ['no-such-policy']" in capsys.readouterr().err


def test_the_default_demo_stays_synthetic_even_with_a_corpus_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "manifest.json").write_text("{}")
    monkeypatch.setattr(odm.demo, "CORPUS_CACHE", tmp_path)
    plot = tmp_path / "p.png"
    assert main(["demo", "--steps", "5", "--policies", "uniform", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "odm demo: a small MLP" in out and "quality" not in out
    # the table says what its columns mean
    assert "p/<domain>:" in out and "learnable:" in out
    assert plot.stat().st_size > 0


FAKE_BENCHMARK = """
import sys, pathlib
args = sys.argv[1:]
out = pathlib.Path(args[args.index("--out") + 1])
out.mkdir(parents=True, exist_ok=True)
(out / "quality-demo-20990101-proportions.png").write_bytes(b"fake png")
print("fake benchmark", " ".join(args))
"""


def test_the_real_demo_runs_the_checkouts_benchmark_as_a_process_and_honours_plot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / "quality.py"
    script.write_text(FAKE_BENCHMARK)
    monkeypatch.setattr(odm.demo, "_quality_script", lambda: script)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "manifest.json").write_text("{}")
    plot = tmp_path / "real.png"
    code = main(["demo", "--data", str(corpus), "--steps", "7", "--policies", "uniform", "--plot", str(plot)])
    out = capfd.readouterr().out
    assert code == 0
    assert "expected time" in out
    assert f"fake benchmark --data {corpus} --quick --steps 7 --seeds 1 --first-seed 0" in out
    assert plot.read_bytes() == b"fake png"


def test_the_real_demo_without_a_checkout_or_corpus_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(odm.demo, "_quality_script", lambda: None)
    assert main(["demo", "--real"]) == 1
    assert "source checkout" in capsys.readouterr().out
    monkeypatch.setattr(odm.demo, "_quality_script", lambda: tmp_path / "quality.py")
    with pytest.raises(SystemExit):
        main(["demo", "--data", str(tmp_path)])
    assert "corpus.py" in capsys.readouterr().err


def test_the_installed_library_never_imports_benchmark_code() -> None:
    source = Path(odm.demo.__file__).read_text()
    assert "exec_module" not in source and "spec_from_file_location" not in source
