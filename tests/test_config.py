"""Config dataclasses from plain dicts: unknown keys and wrong types name the key."""

import json

import pytest

from vaeflow.config import ConfigError, ModelConfig, from_dict, to_dict


def test_defaults_round_trip_through_plain_dicts():
    cfg = ModelConfig()
    d = to_dict(cfg)
    json.dumps(d)  # plain, JSON-safe
    assert from_dict(ModelConfig, d) == cfg


def test_nested_values_and_conversions():
    cfg = from_dict(
        ModelConfig,
        {
            "x_shape": [1, 28, 28],
            "latent_dim": 16,
            "posterior": {"flow": "iaf", "num_layers": 2, "options": {"num_hidden": 1}},
            "prior": {"name": "flow", "flow": "realnvp"},
        },
    )
    assert cfg.x_shape == (1, 28, 28) and cfg.posterior.flow == "iaf"
    assert cfg.posterior.options == {"num_hidden": 1} and cfg.prior.flow == "realnvp"
    assert cfg.prior.num_layers == 4  # default kept


@pytest.mark.parametrize(
    "data, match",
    [
        ({"latnet_dim": 3}, r"unknown config key\(s\) latnet_dim; allowed: .*latent_dim"),
        ({"prior": {"nme": "flow"}}, r"unknown config key\(s\) prior\.nme"),
        ({"latent_dim": "32"}, r"latent_dim: expected int, got str"),
        ({"latent_dim": True}, r"latent_dim: expected int, got a boolean"),
        ({"x_shape": 28}, r"x_shape: expected a list"),
        ({"x_shape": [1, "a"]}, r"x_shape\[1\]: expected int"),
        ({"posterior": {"flow": 3}}, r"posterior\.flow: 3 matches none of"),
        ({"prior": 5}, r"prior: expected a table"),
    ],
)
def test_errors_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(ModelConfig, data)


def test_multistep_schedule_decays_at_each_milestone():
    from vaeflow.config import Config
    from vaeflow.train import _lr_lambda

    cfg = from_dict(
        Config,
        {"train": {"lr_schedule": "multistep", "lr_milestones": [3, 5], "lr_decay": 0.1}},
    )
    factor = _lr_lambda(cfg)
    got = [factor(s) for s in range(7)]
    assert got == pytest.approx([1, 1, 1, 0.1, 0.1, 0.01, 0.01])


@pytest.mark.parametrize(
    "train, match",
    [
        ({"lr_schedule": "multistep"}, r"needs train\.lr_milestones"),
        ({"lr_schedule": "multistep", "lr_milestones": [5, 5]}, r"strictly increasing"),
    ],
)
def test_multistep_schedule_errors(train, match):
    from vaeflow.config import Config, validate

    with pytest.raises(ConfigError, match=match):
        validate(from_dict(Config, {"train": train}))


def test_milestones_without_multistep_are_refused():
    from vaeflow.config import Config, validate

    with pytest.raises(ConfigError, match=r'only used by lr_schedule = "multistep"'):
        validate(from_dict(Config, {"train": {"lr_schedule": "cosine", "lr_milestones": [5]}}))
