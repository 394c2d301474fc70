"""Every policy accepts NumPy scalars wherever it accepts Python numbers (a config read with numpy, a value
computed from an array), and huge finite proportions are not "all zero"."""

from __future__ import annotations

import numpy as np
import pytest

from odm.policies import (
    ADO,
    EXP3,
    EXP3S,
    ODM,
    UCB1,
    Aioli,
    DiscountedUCB,
    DoReMi,
    DynamixSFT,
    Fixed,
    SkillIt,
    SlidingWindowUCB,
    Temperature,
    Velocitune,
    check_proportions,
)  # fmt: skip

CASES = [
    (ODM, {"alpha": np.float32(0.5), "warmup_steps": np.int64(3)}),
    (EXP3, {"gamma": np.float32(0.2), "eta": np.float64(0.1)}),
    (EXP3S, {"gamma": np.float32(0.2), "alpha": np.float32(0.01)}),
    (UCB1, {"c": np.float32(1.0), "seed": np.int64(3)}),
    (DiscountedUCB, {"discount": np.float32(0.9)}),
    (SlidingWindowUCB, {"window": np.int64(10)}),
    (Aioli, {"round_steps": np.int64(100), "sweeps": np.int32(1), "eta": np.float32(0.3), "seed": np.int64(1)}),
    (ADO, {"start_step": np.int64(10), "update_interval": np.int64(5), "floor": np.float32(0.01)}),
    (DoReMi, {"eta": np.float32(0.5), "reference": [1.0, 1.0], "smoothing": np.float64(0.01)}),
    (SkillIt, {"eta": np.float32(0.5), "window": np.int64(2), "eval_every": np.int32(3)}),
    (DynamixSFT, {"temperature": np.float32(0.5), "eval_every": np.int64(4)}),
    (Velocitune, {"eta": np.float32(0.5), "update_interval": np.int64(5), "horizon": np.int64(100)}),
]


@pytest.mark.parametrize(("cls", "kwargs"), CASES, ids=[c.__name__ for c, _ in CASES])
def test_numpy_scalars_are_accepted(cls, kwargs):
    policy = cls(**kwargs).bind(2)
    p = policy.proportions
    assert p.shape == (2,) and abs(p.sum() - 1) < 1e-12


def test_numpy_scalars_are_accepted_by_static_policies():
    np.testing.assert_allclose(
        Temperature([1.0, 3.0], tau=np.float32(2.0)).proportions, np.array([1, 3**0.5]) / (1 + 3**0.5)
    )


def test_huge_finite_proportions_are_not_all_zero():
    np.testing.assert_array_equal(Fixed([1e308, 1e308]).proportions, [0.5, 0.5])
    np.testing.assert_allclose(check_proportions([1e308, 1e308, 0.0, 5e307]), [0.4, 0.4, 0.0, 0.2])
    with pytest.raises(ValueError, match="all zero"):
        Fixed([0.0, 0.0])
