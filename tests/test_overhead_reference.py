"""The floor ``benchmarks/overhead_breakdown.py`` compares the mixer with must compute what the mixer computes:
its hand-written EXP3 publishes the proportions ``policy="exp3"`` publishes, batch for batch (else the gap it
measures would be a gap in work, not in bookkeeping)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

import odm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
from overhead_breakdown import _BareEXP3  # noqa: E402


def _sources() -> dict[str, list[int]]:
    return {f"d{i}": list(range(i * 1000, i * 1000 + 300)) for i in range(5)}


def test_the_bare_exp3_reference_publishes_what_the_mixer_publishes():
    real = odm.MixtureLoader(_sources(), batch_size=16, policy="exp3", seed=4)
    bare = odm.MixtureLoader(_sources(), batch_size=16, policy="exp3", seed=4)
    reference = _BareEXP3(bare.mixer)
    rng = np.random.default_rng(0)
    moved = 0
    for a, b in zip(real, bare):
        assert torch.equal(a["data"], b["data"])  # both loaders draw under the rows published so far
        losses = torch.from_numpy(rng.uniform(0.5, 3.0, len(a["domain"])) + a["domain"].numpy())
        real.mixer.observe(a, losses)
        real.mixer.step()
        reference.on_train_batch_end(None, None, {"sample_losses": losses}, b, 0)
        np.testing.assert_allclose(bare.mixer.schedule.latest().proportions, real.mixer.proportions, rtol=1e-12)
        assert bare.mixer.schedule.latest_effective_from() == real.mixer.schedule.latest_effective_from()
        moved += not np.allclose(real.mixer.proportions, 0.2)
        if a["mix_step"] == 60:
            break
    assert moved > 50  # the policy moved: the comparison is not between two uniform vectors
