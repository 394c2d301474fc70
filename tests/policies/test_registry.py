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


def test_policy_class_is_the_public_lookup_and_names_the_known_ones():
    from odm.policies import EXP3S, policy_class, policy_names

    assert policy_class("exp3s") is EXP3S and policy_class("EXP3S") is EXP3S
    assert {"dynamix", "velocitune"} <= set(policy_names())
    with pytest.raises(ValueError, match="unknown policy 'exp4'; known policies: ado, aioli"):
        policy_class("exp4")


@pytest.mark.parametrize("name", default_policy_names())
def test_config_reports_every_constructor_argument_and_differs_when_one_does(name):
    import inspect

    from odm.policies import policy_class

    cls = policy_class(name)
    config = get_policy(name).config()
    assert config == get_policy(name).config()  # plain, comparable values
    for param in inspect.signature(cls.__init__).parameters.values():
        if param.name == "self" or param.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        assert param.name in config, param.name
        assert config[param.name] == param.default


def test_config_holds_the_given_arguments_positional_keyword_and_forwarded():
    from odm.policies import EXP3S, UCB1, DoReMi

    config = EXP3S(0.2, alpha=0.01, reward="progress").config()
    assert (config["gamma"], config["alpha"], config["reward"], config["scale_decay"]) == (0.2, 0.01, "progress", 0.999)
    assert UCB1(seed=np.int64(3)).config()["seed"] == 3
    assert UCB1(seed=3).config() != UCB1(seed=4).config()
    assert DoReMi(reference=np.array([1.0, 2.0])).config()["reference"] == [1.0, 2.0]
    assert DoReMi(reference=len).config()["reference"] == "<callable builtins.len>"


def test_set_publish_delay_is_a_no_op_by_default():
    policy = get_policy("exp3").bind(3)
    before = policy.state_dict()
    policy.set_publish_delay(4)
    np.testing.assert_equal(policy.state_dict(), before)  # NaN entries compare equal here
