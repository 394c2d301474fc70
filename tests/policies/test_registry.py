import numpy as np
import pytest

from odm.policies import DomainStats, default_policy_names, get_policy


def test_the_registry_holds_every_documented_family():
    expected = {"uniform", "odm", "exp3", "exp3s", "ucb1", "discounted_ucb", "sliding_window_ucb", "aioli", "ado"}
    assert expected <= set(default_policy_names())


@pytest.mark.parametrize("name", default_policy_names())
@pytest.mark.parametrize("k", [2, 22, 1000])
def test_every_name_only_policy_binds_at_any_domain_count_and_stays_on_the_simplex(name, k):
    policy = get_policy(name).bind(k)
    rng = np.random.default_rng(k)
    for step in range(1, 6):
        count = rng.integers(0, 3, k).astype(float)
        stats = DomainStats(
            loss_sum=count * rng.uniform(1, 4, k),
            count=count,
            proportions=policy.proportions,
            step=step,
            num_samples=int(count.sum()) * step,
            eval_loss=rng.uniform(1, 4, k) if policy.wants_eval(step) else None,
        )
        policy.update(stats)
        p = policy.proportions
        assert p.shape == (k,) and np.all(np.isfinite(p)) and np.all(p >= 0)
        assert p.sum() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("name", ["fixed", "natural", "temperature"])
def test_a_policy_that_needs_data_says_so_when_named_alone(name):
    with pytest.raises(TypeError, match="cannot be built from its name alone"):
        get_policy(name)
