"""``model.init = "he_normal"``: the VampPrior code's ``he_init`` (jmtomczak/vae_vampprior,
``utils/nn.py``): every linear layer of the encoder, the decoder and the Gaussian head
gets weights ``N(0, 2 / fan_in)``; biases, convolutions, the prior (pseudo-inputs, flows)
and the posterior's flow keep the initialisation they were built with."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from vaeflow.config import ConfigError, load_config
from vaeflow.models.build import build_model
from vaeflow.models.init import he_normal_

REPO = Path(__file__).resolve().parents[1]
FLOW_PRIORS = REPO / "experiments" / "flow_priors" / "config.toml"
SYLVESTER = REPO / "experiments" / "vandenberg2018_sylvester" / "config.toml"
TWO_LAYER = REPO / "experiments" / "burda2016_iwae" / "two_layer.toml"

# The flow_priors VAE with the VampPrior and an IAF posterior: every kind of part.
VAMP_IAF = [
    'model.prior.name="vamp"',
    "model.prior.num_components=20",
    'model.posterior.flow="iaf"',
]


def _build(init: str, overrides: list[str] = VAMP_IAF) -> nn.Module:
    cfg = load_config(FLOW_PRIORS, [*overrides, f'model.init="{init}"'])
    torch.manual_seed(0)
    return build_model(cfg.model)


def _kept(name: str) -> bool:
    """Parameters he_normal_ leaves alone: the prior's and the posterior flow's."""
    return name.startswith(("prior.", "posterior.flow.", "posterior.context."))


def _check_he_normal(w: torch.Tensor, fan_in: int, name: str) -> None:
    """``w`` looks like N(0, 2 / fan_in): mean, std and kurtosis (3 for a normal, 1.8 for
    a uniform of the same std) within 5 standard errors of the sample statistics."""
    w = w.detach().double().reshape(-1)
    n = w.numel()
    std = (2.0 / fan_in) ** 0.5
    assert abs(w.mean().item()) < 5 * std / n**0.5, name
    assert abs(w.std().item() / std - 1) < 5 / (2 * n) ** 0.5, name
    kurtosis = ((w - w.mean()) ** 4).mean() / w.var(unbiased=False) ** 2
    assert abs(kurtosis.item() - 3) < 5 * (24 / n) ** 0.5, name


def test_he_normal_sets_the_networks_and_keeps_the_rest():
    torch_init = _build("torch").state_dict()
    model = _build("he_normal")
    state = model.state_dict()
    linears = {
        f"{name}.weight": m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not _kept(f"{name}.weight")
    }
    # encoder: 2 gated layers; the posterior base's head; decoder: 2 gated + output
    assert len(linears) == 6, sorted(linears)
    assert any(k.startswith("prior.") for k in state) and any("made" in k for k in state)
    for key, before in torch_init.items():
        after = state[key]
        if key in linears:
            assert not torch.equal(after, before), key
            _check_he_normal(after, linears[key].in_features, key)
        else:  # biases, the pseudo-inputs, the IAF and its context layer, buffers
            assert torch.equal(after, before), key


def test_he_normal_counts_layers_and_leaves_convolutions_alone():
    """As the code's convolutional models: ``he_init`` on the linear layers only."""
    model = _build("torch")
    assert he_normal_(model) == 6
    sylvester = load_config(SYLVESTER)
    torch.manual_seed(0)
    before = build_model(sylvester.model).state_dict()
    torch.manual_seed(0)
    model = build_model(load_config(SYLVESTER, ['model.init="he_normal"']).model)
    linears = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
    assert linears and convs
    for key, value in model.state_dict().items():
        if key in linears and not _kept(key):
            _check_he_normal(value, linears[key].in_features, key)
        else:
            assert torch.equal(value, before[key]), key


def test_he_normal_covers_the_hierarchy():
    """Burda et al.'s two-layer model: the conditional Gaussians' heads and networks."""
    torch.manual_seed(0)
    model = build_model(load_config(TWO_LAYER, ['model.init="he_normal"']).model)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 12 and any(n == "conditionals.0.head" for n, _ in linears)
    for name, m in linears:
        _check_he_normal(m.weight, m.in_features, name)


@pytest.mark.parametrize("init", ["he_normal", "glorot_uniform"])
def test_weight_normalised_layers_are_refused(init: str) -> None:
    """A weight-normalised head computes its weight: writing into it would be lost."""
    with pytest.raises(ConfigError, match=rf"model\.init = '{init}'.*weight-normalised"):
        plain = [
            f'model.{net}.options={{hidden=[300],activation="tanh"}}'
            for net in ("encoder", "decoder")
        ]
        _build(init, [*plain, "model.posterior.weight_norm=true"])
