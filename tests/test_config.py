"""Config dataclasses from plain dicts: unknown keys and wrong types name the key."""

import json
import math

import pytest

from vaeflow.config import ConfigError, ModelConfig, from_dict, load_config, to_dict


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
    from vaeflow.run.train import _lr_lambda

    cfg = from_dict(
        Config,
        {"train": {"lr_schedule": "multistep", "lr_milestones": [3, 5], "lr_decay": 0.1}},
    )
    factor = _lr_lambda(cfg)
    got = [factor(s) for s in range(7)]
    assert got == pytest.approx([1, 1, 1, 0.1, 0.1, 0.01, 0.01])


def _factors(train: dict, steps: int) -> list[float]:
    from vaeflow.config import Config
    from vaeflow.run.train import _lr_lambda

    factor = _lr_lambda(from_dict(Config, {"train": train}))
    return [factor(s) for s in range(steps)]


def test_cosine_schedule_known_answers():
    # steps = 4: progress s / 4; factor = r + (1 - r) (1 + cos(pi s / 4)) / 2, r = 0.1.
    got = _factors({"lr_schedule": "cosine", "steps": 4, "min_lr_ratio": 0.1}, 6)
    c = [0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(5)]
    assert got == pytest.approx([0.1 + 0.9 * v for v in c] + [0.1])  # held after the end


def test_exponential_schedule_known_answers():
    got = _factors({"lr_schedule": "exponential", "lr_decay": 0.5, "lr_decay_every": 2}, 7)
    assert got == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25, 0.125])


def test_warmup_multiplies_any_schedule():
    # Linear warm-up (s + 1) / 4 over the first 4 steps, times the schedule's own factor.
    assert _factors({"lr_warmup_steps": 4}, 6) == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])
    got = _factors(
        {"lr_warmup_steps": 4, "lr_schedule": "exponential", "lr_decay": 0.5, "lr_decay_every": 2},
        5,
    )
    assert got == pytest.approx([0.25, 0.5, 0.375, 0.5, 0.25])


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


# ----- data: the standard static MNIST and binarisation names ----------------------------


def test_dataset_tables_agree_with_the_data_layer() -> None:
    """config.py keeps its own copy of the per-dataset facts (layering); they must agree."""
    from vaeflow import config as config_module
    from vaeflow.data import DATASETS

    assert set(config_module._DATA_SHAPES) == set(DATASETS)
    for name, spec in DATASETS.items():
        assert config_module._DATA_SHAPES[name] == spec.x_shape
        expected = spec.binarizations if spec.kind == "binary" else None
        assert config_module.DATA_BINARIZATIONS[name] == expected


def test_binarized_mnist_takes_only_the_given_binarization() -> None:
    cfg = load_config(None, ["data.dataset=binarized_mnist", "data.binarization=given"])
    assert cfg.data.dataset == "binarized_mnist"
    with pytest.raises(ConfigError, match="binarization = 'dynamic' does not fit.*given"):
        load_config(None, ["data.dataset=binarized_mnist"])
    with pytest.raises(ConfigError, match="'given' does not fit data.dataset = 'mnist'"):
        load_config(None, ["data.binarization=given"])


def test_retired_static_binarization_says_what_to_use() -> None:
    with pytest.raises(ConfigError, match="retired.*binarized_mnist.*fixed_seed"):
        load_config(None, ["data.binarization=static"])


def test_kl_warmup_can_start_above_zero() -> None:
    """Rezende & Mohamed 2015's beta_t = min(1, 0.01 + t/10000): kl_warmup_start = 0.01."""
    from vaeflow.run.train import _beta

    cfg = load_config(None, ["train.kl_warmup_steps=10000", "train.kl_warmup_start=0.01"])
    assert [_beta(cfg, t) for t in (0, 5000, 9899)] == pytest.approx([0.01, 0.51, 0.9999])
    assert _beta(cfg, 9900) == _beta(cfg, 50000) == 1.0
    assert _beta(load_config(None, ["train.kl_warmup_steps=100"]), 50) == 0.5  # default 0


@pytest.mark.parametrize(
    "sets, match",
    [
        (["train.kl_warmup_start=0.01"], "kl_warmup_start = 0.01.*kl_warmup_steps = 0"),
        (["train.kl_warmup_steps=10", "train.kl_warmup_start=1.5"], "kl_warmup_start"),
        (['train.kl_warmup_target="joint"'], "kl_warmup_target.*kl_warmup_steps = 0"),
        (
            ['train.kl_warmup_target="joint"', "train.kl_warmup_steps=10", "train.free_bits=0.1"],
            "free_bits",
        ),
        (['train.kl_warmup_target="elbo"', "train.kl_warmup_steps=10"], "kl_warmup_target"),
        (["train.free_bits_batch_splits=2"], "free_bits_batch_splits.*without train.free_bits"),
        (
            ["train.free_bits=0.1", "data.batch_size=10", "train.free_bits_batch_splits=4"],
            "free_bits_batch_splits.*divide data.batch_size = 10",
        ),
        (["train.momentum=0.9"], "train.momentum = 0.9 is an RMSprop setting.*'adam'"),
        (['train.optimizer="adamax"', "train.alpha=0.9"], "train.alpha = 0.9 is an RMSprop"),
        (['train.optimizer="rmsprop"', "train.betas=[0.5, 0.9]"], "train.betas.*rmsprop"),
        (['train.optimizer="rmsprop"', "train.momentum=1.0"], "train.momentum must be"),
    ],
)
def test_warmup_start_and_rmsprop_settings_are_checked(sets: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, sets)
