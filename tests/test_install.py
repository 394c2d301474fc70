"""The core works without any extra, and each extra's absence is an ImportError that names the install command.

Each check runs in a fresh interpreter where the extra's packages are made unimportable
(``sys.modules[name] = None`` is how Python itself marks a module that must not be imported).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_without(missing: list[str], code: str) -> subprocess.CompletedProcess[str]:
    block = "".join(f"sys.modules[{m!r}] = None\n" for m in missing)
    return subprocess.run(
        [sys.executable, "-c", f"import sys\n{block}{code}"], capture_output=True, text=True, timeout=120
    )


def test_the_plain_loop_and_held_out_evaluation_need_no_extra() -> None:
    code = (
        "import odm, torch\n"
        "loader = odm.MixtureLoader({'a': list(range(20)), 'b': list(range(20))}, batch_size=4, num_batches=3)\n"
        "for batch in loader:\n"
        "    loader.mixer.observe(batch, torch.ones(4)); loader.mixer.step()\n"
        "print(odm.stats.evaluate_domains(lambda b: b, {'a': [torch.ones(2)]})[1].tolist())\n"
    )
    done = run_without(["lightning", "torchmetrics", "transformers", "matplotlib", "webdataset", "datasets"], code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[2.0]"


@pytest.mark.parametrize(
    ("missing", "code", "message"),
    [
        (["lightning"], "from odm.callbacks import OnlineMixing", "pip install 'torch-odm[lightning]'"),
        (["torchmetrics"], "odm.stats.DomainLoss", "pip install 'torch-odm[lightning]'"),
        (["transformers"], "import odm.callbacks.transformers", "pip install 'torch-odm[hf]'"),
        (["matplotlib"], "odm.plot_proportions(odm.OnlineMixer(['a']), 'p.png')", "pip install matplotlib"),
        (["webdataset"], "odm.sources.WebDatasetSource(['a.tar'])", "pip install 'torch-odm[webdataset]'"),
    ],
)
def test_a_missing_extra_names_its_install_command(missing: list[str], code: str, message: str) -> None:
    done = run_without(missing, f"import odm\n{code}")
    assert done.returncode != 0
    assert "ImportError: " in done.stderr and message in done.stderr, done.stderr[-2000:]


def test_the_dev_extra_installs_every_extra_the_tests_use() -> None:
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert project["name"] == "torch-odm"
    assert "torch-odm[all]" in extras["dev"]
    assert set(extras) - {"all", "dev"} == {e for e in extras["all"][0].split("[")[1].rstrip("]").split(",")}
    assert not any(d.split(">")[0] in ("lightning", "transformers", "webdataset") for d in project["dependencies"])
