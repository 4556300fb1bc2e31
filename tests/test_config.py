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
