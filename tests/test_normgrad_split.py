"""``train.normgrad_split``: AdamNormGrad normalising each tensor of the VampPrior code
where vaeflow fuses two into one parameter (a gated layer's value and gate, a Gaussian
head's mean and scale), as the code's separate tensors are normalised.

The reference is the code's own layout: the same update on separate tensors. The fused
parameter with its split must move exactly as their concatenation, in the eager step
(``AdamNormGrad.step``), the compiled step's update (``update_unless``) and the stack's
(covered by tests/test_stack.py and tests/test_compiled_step.py with the option on).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from vaeflow.config import ConfigError, load_config
from vaeflow.layers import GatedConvTranspose2d, fused_parameters
from vaeflow.models.build import build_model
from vaeflow.run.optim import AdamNormGrad, init_state, update_unless
from vaeflow.run.train import _optimizer

REPO = Path(__file__).resolve().parents[1]
FLOW_PRIORS = REPO / "experiments" / "flow_priors" / "config.toml"
SYLVESTER = REPO / "experiments" / "vandenberg2018_sylvester" / "config.toml"
TWO_LAYER = REPO / "experiments" / "burda2016_iwae" / "two_layer.toml"

KW = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.01}


def _separate() -> list[nn.Parameter]:
    """The code's layout: a linear layer's two halves, a bias's, a transposed conv's two
    halves (output channels are dim 1 of its weight), and an unfused tensor."""
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (3, 4), (3,), (3,), (2, 3, 2, 2), (2, 3, 2, 2), (5,)]
    return [nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in shapes]


def _fuse(t: list[torch.Tensor]) -> list[torch.Tensor]:
    """vaeflow's layout of the same numbers."""
    return [torch.cat(t[0:2]), torch.cat(t[2:4]), torch.cat(t[4:6], dim=1), t[6]]


def _fused_opt(split: bool = True, **kw: object) -> tuple[list[nn.Parameter], AdamNormGrad]:
    fused = [nn.Parameter(p.detach().clone()) for p in _fuse(_separate())]
    splits = {fused[0]: (2, 0), fused[1]: (2, 0), fused[2]: (2, 1)} if split else None
    return fused, AdamNormGrad(fused, splits=splits, **KW, **kw)


def _grads(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    # halves of very different scales, so normalising them together is not the same
    scales = [1.0, 30.0, 0.1, 5.0, 2.0, 0.01, 1.0]
    return [
        s * torch.randn(p.shape, generator=g, dtype=torch.float64)
        for s, p in zip(scales, _separate(), strict=True)
    ]


@pytest.mark.parametrize("fused_kernel", [False, True])
def test_split_parameters_move_as_the_codes_separate_tensors(fused_kernel: bool) -> None:
    separate = _separate()
    opt_sep = AdamNormGrad(separate, fused=fused_kernel, **KW)
    fused, opt = _fused_opt(fused=fused_kernel)
    unsplit, opt_unsplit = _fused_opt(split=False, fused=fused_kernel)
    for step in range(3):
        grads = _grads(step)
        for p, gr in zip(separate, grads, strict=True):
            p.grad = gr.clone()
        for params in (fused, unsplit):
            for p, gr in zip(params, _fuse(grads), strict=True):
                p.grad = gr.clone()
        opt_sep.step()
        opt.step()
        opt_unsplit.step()
        for p, ref in zip(fused, _fuse(separate), strict=True):
            torch.testing.assert_close(p.detach(), ref.detach(), rtol=1e-13, atol=1e-13)
    # without the split the fused halves move differently (the test has teeth)
    assert not torch.allclose(unsplit[0], _fuse(separate)[0])
    assert torch.equal(unsplit[3], fused[3])  # an unfused tensor is untouched by it


def test_update_unless_splits_as_step() -> None:
    """The compiled step's update applies the same split as ``step()``."""
    a, opt_a = _fused_opt()
    b, opt_b = _fused_opt()
    init_state(opt_b)
    for step in range(3):
        grads = _fuse(_grads(step))
        for p, gr in zip(a, grads, strict=True):
            p.grad = gr.clone()
        opt_a.step()
        update_unless(opt_b, [b], [grads], torch.tensor(False))
        for pa, pb in zip(a, b, strict=True):
            torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-12)


def test_bad_splits_are_refused() -> None:
    p = nn.Parameter(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"shape \(3, 4\) does not split into 2 equal parts"):
        AdamNormGrad([p], splits={p: (2, 0)})
    with pytest.raises(ValueError, match="along dim 2"):
        AdamNormGrad([p], splits={p: (2, 2)})
    with pytest.raises(ValueError, match="not optimised here"):
        AdamNormGrad([p], splits={nn.Parameter(torch.zeros(4)): (2, 0)})


def test_fused_parameters_of_the_models() -> None:
    """Which parameters hold two of the code's tensors: the gated layers and the Gaussian
    heads, nothing else (the decoder's output layer, the posterior flow, the prior)."""
    cfg = load_config(FLOW_PRIORS, ['model.posterior.flow="iaf"', 'model.prior.name="vamp"'])
    model = build_model(cfg.model)
    names = {id(p): n for n, p in model.named_parameters()}
    fused = {names[id(p)]: split for p, split in fused_parameters(model).items()}
    gated = [f"{net}.net.{i}.linear" for net in ("encoder", "decoder") for i in (0, 1)]
    layers = [*gated, "posterior.base.head"]
    assert set(fused) == {f"{layer}.{w}" for layer in layers for w in ("weight", "bias")}
    assert set(fused.values()) == {(2, 0)}
    # a gated transposed conv's weight is (in, out, kh, kw): its halves are along dim 1
    deconv = GatedConvTranspose2d(3, 4, 3)
    assert fused_parameters(deconv) == {deconv.conv.weight: (2, 1), deconv.conv.bias: (2, 0)}
    sylvester = build_model(load_config(SYLVESTER).model)
    assert (2, 1) in fused_parameters(sylvester).values()
    # the hierarchy's conditional Gaussians
    two_layer = build_model(load_config(TWO_LAYER).model)
    heads = [n for n, p in two_layer.named_parameters() if p in fused_parameters(two_layer)]
    assert len(heads) == 2 * 3, heads  # q(z1|x), q(z2|z1), p(z1|z2): weight and bias


def test_the_option_reaches_the_optimiser_and_only_adam_normgrad_takes_it() -> None:
    for split in (True, False):
        cfg = load_config(FLOW_PRIORS, [f"train.normgrad_split={str(split).lower()}"])
        model = build_model(cfg.model)
        opt = _optimizer(cfg, model)
        head = model.posterior.head.weight
        assert opt.split_of(head) == ((2, 0) if split else None)
        assert opt.split_of(model.decoder.net[-1].weight) is None
    with pytest.raises(ConfigError, match="normgrad_split.*'adam'"):
        load_config(FLOW_PRIORS, ['train.optimizer="adam"', "train.normgrad_split=true"])
    # a decoder whose output layer fuses a likelihood's two parameters is not split: refused
    with pytest.raises(ConfigError, match="normgrad_split.*'discretized_logistic'.*not split"):
        rgb = ['data.dataset="cifar10"', "model.x_shape=[3, 32, 32]"]
        rgb += ['model.likelihood="discretized_logistic"', "train.normgrad_split=true"]
        load_config(FLOW_PRIORS, rgb)


def test_resuming_with_the_other_split_is_refused(tmp_path: Path) -> None:
    """The split is not in the optimiser's state: a resume under the other setting would
    change the update rule unnoticed."""
    import json

    from vaeflow.run.train import _check_same_optimizer

    train = {"optimizer": "adam_normgrad", "normgrad_split": True}
    (tmp_path / "config.json").write_text(json.dumps({"train": train}))
    _check_same_optimizer(tmp_path, "adam_normgrad", True)
    with pytest.raises(ConfigError, match="normgrad_split = true; resuming it with false"):
        _check_same_optimizer(tmp_path, "adam_normgrad", False)
    # a run from before the option existed resumes without it, and only without it
    (tmp_path / "config.json").write_text(json.dumps({"train": {"optimizer": "adam_normgrad"}}))
    _check_same_optimizer(tmp_path, "adam_normgrad", False)
    with pytest.raises(ConfigError, match="normgrad_split = false"):
        _check_same_optimizer(tmp_path, "adam_normgrad", True)
