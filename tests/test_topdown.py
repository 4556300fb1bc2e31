"""Top-down (bidirectional inference) hierarchical VAEs (Kingma et al. 2016) against closed
forms, brute-force Jacobians and the training loop.

Linear-Gaussian two-layer model in the top-down parametrisation:

    z2 ~ N(0, I),   z1 | z2 ~ N(A z2 + a, S1),   x | z1 ~ N(B z1 + b, s0^2 I)

Exact posterior, factorised as the top-down inference model is (Gaussian conditioning):

    q(z2 | x)     = N(P2 A^T B^T Sx^-1 (x - B a - b), P2),
                    Sx = B S1 B^T + s0^2 I,   P2 = (I + A^T B^T Sx^-1 B A)^-1
    q(z1 | x, z2) = N(P1 (S1^-1 (A z2 + a) + B^T (x - b) / s0^2), P1),
                    P1 = (S1^-1 + B^T B / s0^2)^-1

A with one non-zero entry per row and column, S1 diagonal and B with orthogonal columns
make P1 and P2 diagonal, so the diagonal Gaussian posteriors hold the exact posterior and
every importance weight equals p(x). The model's maps are swapped for linear ones: the
bottom-up step gives the ``x`` part of each posterior, the top-down blocks the ``z2``
part and the priors, the merges pass the sample on.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from tests.bound_checks import (
    D1,
    D2,
    N_X,
    NOISE,
    assert_compiled_estimate_matches_eager,
    assert_exact_posterior_makes_every_bound_tight,
    assert_mismatched_posterior_orders_the_bounds,
    diagonal_of,
    linear_gaussian_log_px,
    linear_gaussian_params,
    raw_log_std,
)
from tests.flows.harness import perturb
from vaeflow.flows.registry import build_flow
from vaeflow.models.bounds import free_bits_kl, iwae
from vaeflow.models.likelihoods import Bernoulli, Gaussian
from vaeflow.models.topdown import (
    ConvHead,
    ConvStem,
    LearnedTop,
    TopDownLayer,
    TopDownVAE,
    add_per_example,
    resnet_topdown_layers,
    soft_clip_log_std,
)

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- linear maps


class LinearUp(nn.Module):
    """``u -> (u, W u + c)``: the stream passes unchanged, ``a`` = the posterior's x part."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(N_X, 2 * d)

    def forward(self, u: Tensor) -> tuple[Tensor, Tensor]:
        return u, self.lin(u)


class LinearPrior(nn.Module):
    def __init__(self, h: int, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(h, 2 * d)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        mu, raw = self.lin(h).chunk(2, -1)
        return mu, soft_clip_log_std(raw)


class LinearPosterior(LinearPrior):
    def forward(self, h: Tensor, a: Tensor) -> tuple[Tensor, Tensor, None]:
        mu, raw = add_per_example(self.lin(h), a).chunk(2, -1)
        return mu, soft_clip_log_std(raw), None


class TakeSample(nn.Module):
    """``(h, z) -> z``: the layer below (or the head) reads the sample."""

    def forward(self, h: Tensor, z: Tensor) -> Tensor:
        return z


def _set(lin: nn.Linear, weight: Tensor, bias: Tensor, log_std: Tensor | None) -> None:
    d = weight.shape[0]
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
        lin.weight[:d] = weight
        lin.bias[:d] = bias
        if log_std is not None:
            lin.bias[d:] = raw_log_std(log_std)


def _linear_model(p: dict[str, Tensor]) -> TopDownVAE:
    """The two-layer model with the exact posterior written into its maps."""
    a_mat, a, s1, b_mat, b = p["A"], p["a"], p["s1"], p["B"], p["b"]
    s1_inv = torch.diag(1.0 / s1**2)
    sx = b_mat @ torch.diag(s1**2) @ b_mat.T + NOISE**2 * torch.eye(N_X)
    gain = a_mat.T @ b_mat.T @ torch.linalg.inv(sx)  # A^T B^T Sx^-1
    p2 = torch.diag(1.0 / (1.0 + diagonal_of(gain @ b_mat @ a_mat)))
    p1 = torch.diag(1.0 / (1.0 / s1**2 + diagonal_of(b_mat.T @ b_mat) / NOISE**2))

    top = TopDownLayer(
        LinearUp(D2), LinearPrior(1, D2), LinearPosterior(1, D2), TakeSample(), (D2,)
    )
    bottom = TopDownLayer(
        LinearUp(D1), LinearPrior(D2, D1), LinearPosterior(D2, D1), TakeSample(), (D1,)
    )
    # z2: prior N(0, I) (zero maps); posterior entirely from the bottom-up x part.
    _set(top.up.lin, p2 @ gain, -p2 @ gain @ (b_mat @ a + b), 0.5 * torch.log(torch.diagonal(p2)))
    _set(top.prior.lin, torch.zeros(D2, 1), torch.zeros(D2), torch.zeros(D2))
    _set(top.posterior.lin, torch.zeros(D2, 1), torch.zeros(D2), None)
    # z1: prior A z2 + a; posterior mean = (P1 S1^-1 A) z2 [top-down] + x part [bottom-up].
    _set(bottom.prior.lin, a_mat, a, torch.log(s1))
    _set(bottom.posterior.lin, p1 @ s1_inv @ a_mat, torch.zeros(D1), None)
    m1 = p1 @ b_mat.T / NOISE**2
    _set(bottom.up.lin, m1, p1 @ s1_inv @ a - m1 @ b, 0.5 * torch.log(torch.diagonal(p1)))
    head = nn.Linear(D1, N_X)
    with torch.no_grad():
        head.weight.copy_(b_mat)
        head.bias.copy_(b)
    return TopDownVAE(
        nn.Identity(),
        [bottom, top],
        LearnedTop(1),
        head,
        Gaussian(event_ndim=1, fixed_std=NOISE),
        (N_X,),
    )


def test_exact_posterior_makes_every_bound_tight(float64):
    p = linear_gaussian_params()
    model = _linear_model(p)
    x = torch.randn(8, N_X) * 2
    exact = linear_gaussian_log_px(x, p)
    # Every importance weight equals p(x): the ELBO is exact for every single sample.
    assert_exact_posterior_makes_every_bound_tight(model, x, exact)


def _model_params(model: TopDownVAE) -> dict[str, Tensor]:
    """The generative parameters actually in the (perturbed) model, for the closed form."""
    lin = model.layers[0].prior.lin
    return {
        "A": lin.weight[:D1].detach(),
        "a": lin.bias[:D1].detach(),
        "s1": torch.exp(soft_clip_log_std(lin.bias[D1:])).detach(),
        "B": model.head.weight.detach(),
        "b": model.head.bias.detach(),
    }


def test_mismatched_posterior_orders_the_bounds(float64):
    """E[ELBO] <= E[IWAE_10] <= E[IWAE_100] <= log p(x), and IWAE_5000 ~ log p(x): the
    exact posterior of a nearby model, widened 1.5x at both layers (over-dispersed, so the
    importance weights have finite variance)."""
    model = _linear_model(linear_gaussian_params())
    with torch.no_grad():
        model.head.weight.add_(0.3 * torch.randn(N_X, D1))
        model.layers[0].prior.lin.bias[:D1] += 0.3
        for layer, d in zip(model.layers, (D1, D2), strict=True):
            log_std = soft_clip_log_std(layer.up.lin.bias[d:])
            layer.up.lin.bias[d:] = raw_log_std(log_std + math.log(1.5))
    x = torch.randn(3, N_X)
    exact = linear_gaussian_log_px(x, _model_params(model))
    assert_mismatched_posterior_orders_the_bounds(model, x, exact)


def test_linear_model_samples_from_the_prior(float64):
    """Ancestral samples have the marginal moments of x: mean B a + b and covariance
    B (A A^T + S1) B^T + s0^2 I."""
    p = linear_gaussian_params()
    model = _linear_model(p)
    xs = model.sample(40000, mean=False)
    c1 = p["A"] @ p["A"].T + torch.diag(p["s1"] ** 2)
    cov = p["B"] @ c1 @ p["B"].T + NOISE**2 * torch.eye(N_X)
    assert torch.allclose(xs.mean(0), p["B"] @ p["a"] + p["b"], atol=0.05)
    assert torch.allclose(torch.cov(xs.T), cov, atol=0.1)


# ----------------------------------------------------------------------------- conv model

IMG = (1, 8, 8)  # stem: 4x4; two resolutions: z_1 at 4x4, z_2 at 2x2


# Posterior flows of the groups: a MADE over the channels at every position (``iaf``), or
# the paper's masked-conv IAF over the whole feature map (``conv_iaf``).
FLOWS = [None, "iaf", "conv_iaf"]
FLOW_IDS = ["gaussian", "iaf", "conv_iaf"]


def _conv_model(flow: str | None, latent: int = 3, width: int = 6, ctx: int = 4) -> TopDownVAE:
    def make_flow(shape):
        if flow is None:
            return None
        return build_flow(flow, shape if flow == "conv_iaf" else latent, 1, 6, ctx)

    layers = resnet_topdown_layers(
        width, latent, [1, 1], (4, 4), make_flow, ctx if flow else 0, "elu", True, 0.1
    )
    return TopDownVAE(
        ConvStem(1, width, True, False),
        layers,
        LearnedTop(width, (2, 2)),
        ConvHead(width, 1, "elu", True),
        Bernoulli(event_ndim=3),
        IMG,
    )


def _binary(b: int) -> Tensor:
    return (torch.rand(b, *IMG) > 0.5).to(torch.get_default_dtype())


@pytest.mark.parametrize("flow", ["iaf", "conv_iaf"])
@pytest.mark.parametrize("layer_index", [0, 1])
def test_iaf_log_q_matches_a_brute_force_jacobian(float64, layer_index, flow):
    """log q(z_l | x, z_{>l}) of a group with an IAF, its context from both passes:
    ``log N(noise; 0, I) - log|det dz/d noise|`` with the Jacobian of the whole group's
    map (every position and channel) by autograd. The per-position IAF keeps positions
    apart; the conv IAF (the paper's) mixes neighbouring ones."""
    model = _conv_model(flow)
    with torch.no_grad():
        perturb(model)
    x = _binary(1)
    layer = model.layers[layer_index]
    feats = model.encode(x)
    h = model.top(1)
    if layer_index == 0:  # the stream below z_2: merge a sample of the top layer
        h = model.layers[1].merge(h, model.layers[1].sample_posterior(h, feats[1])[0])
    a = feats[layer_index]
    noise = torch.randn(1, *layer.latent_shape)
    z, log_q, log_q_dims, log_p_dims, ld, mu, log_std = layer.sample_posterior(h, a, noise)

    def z_of(n: Tensor) -> Tensor:
        return layer.sample_posterior(h, a, n.reshape(noise.shape))[0].reshape(-1)

    jac = torch.autograd.functional.jacobian(z_of, noise.reshape(-1))
    assert jac.shape == (layer.latent_size, layer.latent_size)
    z_dim, hw = layer.latent_shape[0], layer.latent_size // layer.latent_shape[0]
    by_position = jac.reshape(z_dim, hw, z_dim, hw).abs().sum((0, 2))
    across = (by_position - by_position.diagonal().diag()).abs().max()
    assert (across > 0) == (flow == "conv_iaf")
    _, logabsdet = torch.linalg.slogdet(jac)
    base = torch.distributions.Normal(0.0, 1.0).log_prob(noise).sum()
    assert torch.allclose(log_q, (base - logabsdet).reshape(1), atol=1e-10, rtol=0)
    assert torch.allclose(log_q_dims.flatten(1).sum(-1), log_q, atol=1e-12)
    # the flow's own log-det: dz/d eps = J / sigma
    assert torch.allclose(ld, (logabsdet - log_std.sum()).reshape(1), atol=1e-10, rtol=0)
    assert (ld.abs() > 1e-3).all(), "the perturbed IAF should not be volume preserving"
    # the flow is given the group's context map as it is (conv IAF) or per position (IAF)
    b_mu, b_log_std, ctx_map = layer.posterior(h, a)
    eps = b_mu + b_log_std.exp() * noise
    if flow == "conv_iaf":
        want = layer.flow.inverse(eps, ctx_map)[0]
    else:
        want = layer.flow.inverse(eps.movedim(1, -1), ctx_map.movedim(1, -1))[0].movedim(-1, 1)
    torch.testing.assert_close(z, want, rtol=0, atol=1e-12)
    # the context (from both passes) moves the sample: change a's context channels only
    a2 = a.clone()
    a2[:, 2 * 3 :] += 1.0
    z2 = layer.sample_posterior(h, a2, noise)[0]
    assert not torch.allclose(z, z2)
    assert torch.equal(layer.posterior(h, a2)[0], mu)  # ... while the base mean is unchanged


@pytest.mark.parametrize("flow", FLOWS, ids=FLOW_IDS)
def test_gradients_reach_every_group(flow):
    model = _conv_model(flow)
    with torch.no_grad():
        perturb(model, scale=0.1)
    terms = model(_binary(4), k=2)
    (-iwae(terms).mean()).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    # both paths of the bottom group: its prior and posterior see the top group's sample
    model.zero_grad()
    model(_binary(4), k=2).layer_kl[0].sum().backward()
    for part in (model.layers[1].up, model.layers[1].posterior, model.layers[1].merge):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


@pytest.mark.parametrize("flow", FLOWS, ids=FLOW_IDS)
def test_terms_shapes_layer_kl_and_free_bits_per_group(flow):
    model = _conv_model(flow)
    with torch.no_grad():
        perturb(model, scale=0.1)
    terms = model(_binary(5), k=3)
    assert model.latent_dims == (3 * 4 * 4, 3 * 2 * 2)
    for t in (terms.log_px_z, terms.log_pz, terms.log_qz, terms.flow_logdet, *terms.layer_kl):
        assert t.shape == (3, 5)
    assert len(terms.layer_kl) == 2
    assert torch.allclose(sum(terms.layer_kl), terms.kl, atol=1e-4)
    assert model.kl_splits_over_dimensions
    kl_dims = terms.kl_dims
    assert kl_dims.shape == (3, 5, model.latent_dim)
    d1 = model.latent_dims[0]
    assert torch.allclose(kl_dims[..., :d1].sum(-1), terms.layer_kl[0], atol=1e-4)
    assert torch.allclose(kl_dims[..., d1:].sum(-1), terms.layer_kl[1], atol=1e-4)
    # Free bits per group of 4 dimensions (a quarter feature map of z_1, one of z_2): a
    # floor above every group's KL gives the floors; each group's term is its own.
    groups = kl_dims.reshape(3, 5, -1, 4).sum(-1).mean(0)  # (B, G)
    high = groups.mean(0).max().item() / 4 + 1.0
    n_groups = groups.shape[1]
    assert n_groups == (48 + 12) // 4
    assert torch.allclose(free_bits_kl(terms, high, 4), torch.full((5,), high * 4 * n_groups))
    floor = groups.mean(0).median().item() / 4  # about half the groups floored
    got = free_bits_kl(terms, floor, 4)
    floored = groups.mean(0, keepdim=True) < floor * 4
    want = torch.where(floored, torch.full_like(groups, floor * 4), groups).sum(-1)
    assert 0 < floored.sum() < n_groups
    assert torch.allclose(got, want, atol=1e-5)


def test_memory_flat_in_k_and_shared_estimator():
    """The bottom-up pass runs once per batch; the top-down pass sees one chunk of
    ``n * B`` rows at a time."""
    model = _conv_model("iaf")
    calls, rows = [], []
    model.stem.register_forward_hook(lambda m, i, o: calls.append(1))
    model.layers[1].prior.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    x = _binary(3)
    ll = model.log_likelihood(x, k=50, chunk=8)
    assert ll.log_px.shape == (3,) and torch.isfinite(ll.log_px).all()
    assert len(calls) == 1 and max(rows) <= 8 * 3
    assert (ll.elbo <= ll.log_px).all()
    assert model.stats_sampler(x)(4).shape == (6, 3)


def test_compiled_log_likelihood_equals_eager():
    """``eval.compile`` (``vaeflow eval --compile``) on the top-down model: the bottom-up
    pass, then each chunk's top-down pass, conv-IAF groups, likelihood and reduction as one
    compiled graph give the eager estimate (same noise under inductor's fallback_random)."""
    model = _conv_model("conv_iaf").eval()
    assert_compiled_estimate_matches_eager(model, _binary(3))


@pytest.mark.parametrize("flow", ["iaf", "conv_iaf"])
def test_sample_reconstruct_posterior_mean_shapes(flow):
    model = _conv_model(flow)
    x = _binary(4)
    assert model.sample(5).shape == (5, *IMG)
    assert model.sample(2, mean=False, temperature=0.5).shape == (2, *IMG)
    assert model.reconstruct(x).shape == (4, *IMG)
    m, v = model.posterior_mean(x, samples=3)
    assert m.shape == v.shape == (4, model.latent_dim) and (v >= 0).all()
    s = model.posterior.sample(model.encode(x), 2)
    assert s.z.shape == (2, 4, model.latent_dim) and s.flow_logdet.shape == (2, 4)


def test_reconstructions_from_a_layer_keep_the_groups_above_and_sample_those_below():
    """From layer 2 of two: z_2 from the posterior, z_1 from p(z_1 | z_2); the bottom
    group's bottom-up features are then never read (NaN there stays out), while the
    ordinary reconstruction (layer 1) reads them. The same draws by hand agree."""
    model = _conv_model("iaf")
    with torch.no_grad():
        perturb(model, scale=0.1)
    x = _binary(3)
    feats = model.encode(x)
    torch.manual_seed(5)
    got = model.reconstruct_from_layer(x, 2)
    torch.manual_seed(5)
    with torch.no_grad():
        h = model.top(3)
        h = model.layers[1].merge(h, model.layers[1].sample_posterior(h, feats[1])[0])
        h = model.layers[0].merge(h, model.layers[0].sample_prior(h))
        want = model.likelihood(model.head(h)).mean
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    poisoned = (torch.full_like(feats[0], float("nan")), feats[1])
    model.encode = lambda x: poisoned
    assert torch.isfinite(model.reconstruct_from_layer(x, 2)).all()
    assert torch.isnan(model.reconstruct_from_layer(x, 1)).all()
    with pytest.raises(ValueError, match=r"layer must be in 1\.\.2"):
        model.reconstruct_from_layer(x, 3)


def test_wrong_shapes_are_clear_errors():
    model = _conv_model(None)
    with pytest.raises(ValueError, match=r"TopDownVAE expects data of shape \(B, 1, 8, 8\)"):
        model(torch.zeros(2, 1, 9, 9))
    with pytest.raises(ValueError, match="flow acts on"):
        TopDownLayer(
            nn.Identity(),
            nn.Identity(),
            nn.Identity(),
            nn.Identity(),
            (3, 2, 2),
            build_flow("iaf", 4, 1, 8),
        )
    with pytest.raises(ValueError, match="context vector only"):
        TopDownLayer(
            nn.Identity(),
            nn.Identity(),
            nn.Identity(),
            nn.Identity(),
            (2, 4, 4),
            build_flow("realnvp_image", (2, 4, 4), 1, 8, context_features=3),
        )


# ----------------------------------------------------------------------------- config, CLI

DATA = os.environ.get("VAEFLOW_DATA") or str(ROOT.parent / "shared" / "datasets")
TINY = [
    f'data.root="{DATA}"',
    "data.batch_size=16",
    "data.eval_batch_size=100",
    "model.topdown={channels=8, latent_channels=2, layers_per_resolution=[1, 1]}",
    'model.posterior.flow="iaf"',
    "model.posterior.num_layers=1",
    "model.posterior.hidden=8",
    "model.posterior.context_features=4",
    # free bits per feature map of z_1 (7x7), 49 * 0.002 nats each (z_2's maps are 7x7 too)
    "train.free_bits=0.002",
    "train.free_bits_group_size=49",
    'train.optimizer="adamax"',
    "train.val_every=4",
    "train.val_k=3",
    "train.val_size=100",
    "train.ckpt_every=2",
    "train.log_every=1",
    "train.image_every=4",
    'train.device="cpu"',
    "eval.n_test=20",
]


def test_config_builds_it_and_rejects_what_does_not_fit():
    from vaeflow.config import ConfigError, load_config
    from vaeflow.models.build import build_model

    cfg = load_config(None, TINY)
    model = build_model(cfg.model)
    assert isinstance(model, TopDownVAE)
    assert model.latent_dims == (2 * 14 * 14, 2 * 7 * 7) and cfg.model.total_latent_dim == 490
    bad = [
        ("model.topdown={chanels=8}", "model.topdown.chanels"),
        ("model.latent_dim=5", "model.latent_dim"),
        ('model.prior.name="mog"', "model.prior"),
        ("model.topdown={layers_per_resolution=[1, 1, 1]}", "divisible by 8"),
        ("model.topdown={layers_per_resolution=[]}", "model.topdown.layers_per_resolution"),
        ("train.free_bits_group_size=196", "free_bits_group_size"),  # z_2 has 98 dims
        ("train.prior_lr_scale=0.5", "train.prior_lr_scale"),
        ('model.posterior.flow="realnvp_image"', "model.posterior.flow"),
    ]
    for override, key in bad:
        with pytest.raises(ConfigError, match=re.escape(key)):
            build_model(load_config(None, [*TINY, override]).model)
    # The paper's conv IAF runs on each whole group, with the group's context map.
    conv = build_model(load_config(None, [*TINY, 'model.posterior.flow="conv_iaf"']).model)
    for layer, hw in zip(conv.layers, (14, 7), strict=True):
        assert layer.flow.event_shape == (2, hw, hw) and layer.flow.takes_context_map
    assert conv.kl_splits_over_dimensions


def test_trains_resumes_and_evaluates_through_the_cli(tmp_path, capsys):
    from vaeflow.cli import main as cli_main
    from vaeflow.run.logger import read_metrics

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[run]\nname = "td"\nroot = "{tmp_path}"\n')
    args = ["train", str(cfg), "--no-eval"] + [a for s in TINY for a in ("--set", s)]
    assert cli_main([*args, "--set", "train.steps=2"]) == 0
    with pytest.warns(UserWarning, match="changed config"):
        assert cli_main([*args, "--set", "train.steps=4", "--resume"]) == 0
    logged = [r for r in read_metrics(tmp_path / "td") if "train/kl_nats" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    for r in logged:  # the per-group KLs are logged and add up to the total
        assert r["train/kl_layer1_nats"] + r["train/kl_layer2_nats"] == pytest.approx(
            r["train/kl_nats"], abs=1e-3
        )
    from tests.test_hierarchy import _check_hierarchy_logs

    _check_hierarchy_logs(tmp_path / "td", layers=2, sizes=(2 * 14 * 14, 2 * 7 * 7))
    assert cli_main(["eval", str(tmp_path / "td"), "--k", "6", "--chunk", "4"]) == 0
    capsys.readouterr()
    summary = json.loads((tmp_path / "td/summary.json").read_text())
    assert summary["test/n_examples"] == 20 and summary["test/latent_dim"] == 490
    assert math.isfinite(summary["test/nll_iw6_nats"])
    assert summary["test/elbo_nats"] <= -summary["test/nll_iw6_nats"] + 1e-6
    assert all(math.isfinite(summary[f"test/kl_layer{i}_nats"]) for i in (1, 2))
    # active units per group, bottom first, add up to the model's
    groups = [summary[f"test/active_units_layer{i}"] for i in (1, 2)]
    assert sum(groups) == summary["test/active_units"] and groups[1] <= 98
    # vaeflow sample draws from the hierarchy's prior and writes a grid, at two temperatures
    for temperature in ("1.0", "0.5"):
        before = set((tmp_path / "td").rglob("*.png"))
        assert (
            cli_main(["sample", str(tmp_path / "td"), "--n", "4", "--temperature", temperature])
            == 0
        )
        assert set((tmp_path / "td").rglob("*.png")) - before, temperature
