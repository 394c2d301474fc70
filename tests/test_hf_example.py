"""``examples/hf_trainer.py`` end to end in a short mode: text → tokenizer → datasets → odm → Trainer → plot."""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the [hf] extra is not installed")
pytest.importorskip("tokenizers", reason="the [hf] extra is not installed")
pytest.importorskip("datasets", reason="the [hf] extra is not installed")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer.py"


def test_the_hf_example_trains_on_tokenized_text_and_writes_the_proportions(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("hf_trainer", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--out", str(tmp_path), "--steps", "6", "--docs", "40"])
    assert set(result["held_out"]) == {"prose", "code", "arithmetic", "noise"}
    assert all(math.isfinite(v) and 0 < v < 10 for v in result["held_out"].values())
    rows = list(csv.reader((tmp_path / "proportions.csv").open()))
    assert rows[0] == ["step", "prose", "code", "arithmetic", "noise"] and len(rows) > 2, "the policy moved"
    assert (tmp_path / "checkpoints" / "checkpoint-6" / "odm_loader.pt").is_file()
    if importlib.util.find_spec("matplotlib"):
        assert result["plot"].stat().st_size > 0
