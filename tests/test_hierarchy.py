"""Bottom-up hierarchical VAEs (Burda et al. 2016) against closed forms and the one-layer VAE.

Linear-Gaussian two-layer model:

    z2 ~ N(0, I),   z1 | z2 ~ N(A z2 + a, S1),   x | z1 ~ N(B z1 + b, s0^2 I)
    =>  z1 ~ N(a, C1),  C1 = A A^T + S1;    x ~ N(B a + b, B C1 B^T + s0^2 I)

Exact posterior, factorised as the inference model is (z2 is independent of x given z1):

    q(z1 | x)  = p(z1 | x)  = N(P1 (B^T (x - b) / s0^2 + C1^-1 a), P1),
                 P1 = (C1^-1 + B^T B / s0^2)^-1
    q(z2 | z1) = p(z2 | z1) = N(P2 A^T S1^-1 (z1 - a), P2),   P2 = (I + A^T S1^-1 A)^-1

A with one non-zero entry per row and column (a scaled partial permutation), S1
diagonal and B with orthogonal columns make C1, P1, P2 diagonal, so the diagonal
Gaussian posteriors hold the exact posterior and every importance weight equals p(x).
"""

from __future__ import annotations

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
from vaeflow.models.bounds import Terms, elbo, free_bits_kl, iwae, log_likelihood
from vaeflow.models.hierarchy import BottomUpVAE, ConditionalGaussian, deterministic_net
from vaeflow.models.likelihoods import Gaussian
from vaeflow.models.posteriors import LOG_STD_BOUND, FlowPosterior, GaussianPosterior
from vaeflow.models.priors import FlowPrior, MixtureOfGaussiansPrior, StandardNormalPrior
from vaeflow.models.vae import VAE


def _set_head(head: nn.Linear, weight: Tensor, bias: Tensor, log_std: Tensor) -> None:
    d = weight.shape[0]
    with torch.no_grad():
        head.weight.zero_()
        head.weight[:d] = weight
        head.bias[:d] = bias
        head.bias[d:] = raw_log_std(log_std)


def _linear_gaussian_model(p: dict[str, Tensor], exact: bool = True) -> BottomUpVAE:
    """The two-layer model with the exact posterior written into its inference heads."""
    a_mat, a, s1, b_mat, b = p["A"], p["a"], p["s1"], p["B"], p["b"]
    c1 = a_mat @ a_mat.T + torch.diag(s1**2)
    p1 = torch.diag(1.0 / (1.0 / diagonal_of(c1) + diagonal_of(b_mat.T @ b_mat) / NOISE**2))
    m1 = p1 @ b_mat.T / NOISE**2
    c1_1 = p1 @ (torch.linalg.solve(c1, a) - b_mat.T @ b / NOISE**2)
    s1_inv = torch.diag(1.0 / s1**2)
    p2 = torch.diag(1.0 / (1.0 + diagonal_of(a_mat.T @ s1_inv @ a_mat)))
    m2 = p2 @ a_mat.T @ s1_inv

    q1, q2 = GaussianPosterior(N_X, D1), GaussianPosterior(D1, D2)
    _set_head(q1.head, m1, c1_1, 0.5 * torch.log(torch.diagonal(p1)))
    _set_head(q2.head, m2, -m2 @ a, 0.5 * torch.log(torch.diagonal(p2)))
    cond = ConditionalGaussian(nn.Identity(), D2, D1)
    _set_head(cond.head, a_mat, a, torch.log(s1))
    decoder = nn.Linear(D1, N_X)
    with torch.no_grad():
        decoder.weight.copy_(b_mat)
        decoder.bias.copy_(b)
    return BottomUpVAE(
        [nn.Identity(), nn.Identity()],
        [q1, q2],
        [cond],
        StandardNormalPrior(D2),
        decoder,
        Gaussian(event_ndim=1, fixed_std=NOISE),
        (N_X,),
    )


def test_exact_posterior_makes_every_bound_tight(float64):
    p = linear_gaussian_params()
    model = _linear_gaussian_model(p)
    x = torch.randn(8, N_X) * 2
    exact = linear_gaussian_log_px(x, p)
    # Every importance weight equals p(x): the ELBO is exact for every single sample.
    assert_exact_posterior_makes_every_bound_tight(model, x, exact)


def _perturbed_model(p: dict[str, Tensor]) -> BottomUpVAE:
    """The exact posterior of a nearby model, widened 1.5x at both layers: a clear gap,
    over-dispersed so the importance weights have finite variance."""
    model = _linear_gaussian_model(p)
    with torch.no_grad():
        model.decoder.weight.add_(0.3 * torch.randn(N_X, D1))
        model.conditionals[0].head.bias[:D1] += 0.3
        for post, d in zip(model.posteriors, (D1, D2), strict=True):
            log_std = LOG_STD_BOUND * torch.tanh(post.head.bias[d:] / LOG_STD_BOUND)
            post.head.bias[d:] = raw_log_std(log_std + math.log(1.5))
    return model


def _model_params(model: BottomUpVAE) -> dict[str, Tensor]:
    """The generative parameters actually in the (perturbed) model, for the closed form."""
    head = model.conditionals[0].head
    return {
        "A": head.weight[:D1].detach(),
        "a": head.bias[:D1].detach(),
        "s1": torch.exp(LOG_STD_BOUND * torch.tanh(head.bias[D1:] / LOG_STD_BOUND)).detach(),
        "B": model.decoder.weight.detach(),
        "b": model.decoder.bias.detach(),
    }


def test_mismatched_posterior_orders_the_bounds(float64):
    """E[ELBO] <= E[IWAE_10] <= E[IWAE_100] <= log p(x), and IWAE_5000 ~ log p(x)."""
    model = _perturbed_model(linear_gaussian_params())
    x = torch.randn(3, N_X)
    exact = linear_gaussian_log_px(x, _model_params(model))
    assert_mismatched_posterior_orders_the_bounds(model, x, exact)


def _small_vae_parts(h: int = 7, d: int = 3):
    enc = deterministic_net(N_X, [h, h])
    post = GaussianPosterior(h, d)
    prior = StandardNormalPrior(d)
    dec = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, N_X))
    return enc, post, prior, dec, Gaussian(event_ndim=1, fixed_std=NOISE)


def test_one_layer_hierarchy_is_the_vae():
    enc, post, prior, dec, lik = _small_vae_parts()
    vae = VAE(enc, post, prior, dec, lik, (N_X,))
    hier = BottomUpVAE([enc], [post], [], prior, dec, lik, (N_X,))
    x = torch.randn(4, N_X)
    torch.manual_seed(3)
    a = vae(x, k=5)
    torch.manual_seed(3)
    b = hier(x, k=5)
    for name in ("log_px_z", "log_pz", "log_qz", "log_pz_dims", "log_qz_dims", "flow_logdet"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert len(b.layer_kl) == 1 and torch.equal(b.layer_kl[0], a.kl)
    assert hier.latent_dim == vae.latent_dim
    torch.manual_seed(4)
    la = vae.log_likelihood(x, k=50, chunk=20)
    torch.manual_seed(4)
    lb = hier.log_likelihood(x, k=50, chunk=20)
    assert torch.equal(la.log_px, lb.log_px) and torch.equal(la.elbo, lb.elbo)
    torch.manual_seed(5)
    ma = vae.posterior_mean(x)
    torch.manual_seed(5)
    mb = hier.posterior_mean(x)
    assert torch.equal(ma[0], mb[0]) and torch.equal(ma[1], mb[1])


def _two_layer(posterior: str, prior: str, h1: int = 10, h2: int = 6) -> BottomUpVAE:
    """x -> (2 tanh layers) -> z1 (4) -> (2 tanh layers) -> z2 (3), Burda's shape in small."""
    dims = (4, 3)
    encoders = [deterministic_net(N_X, [h1, h1]), deterministic_net(dims[0], [h2, h2])]

    def make_post(h: int, d: int) -> nn.Module:
        if posterior == "gaussian":
            return GaussianPosterior(h, d)
        return FlowPosterior(h, d, build_flow(posterior, d, 2, 8, context_features=5))

    posts = [make_post(h1, dims[0]), make_post(h2, dims[1])]
    cond = ConditionalGaussian(deterministic_net(dims[1], [h2, h2]), h2, dims[0])
    if prior == "standard":
        top = StandardNormalPrior(dims[1])
    elif prior == "mog":
        top = MixtureOfGaussiansPrior(dims[1], 4)
    else:
        top = FlowPrior.from_registry(dims[1], "maf", num_layers=2, hidden=8)
    dec = nn.Sequential(deterministic_net(dims[0], [h1, h1]), nn.Linear(h1, N_X))
    return BottomUpVAE(encoders, posts, [cond], top, dec, Gaussian(1, fixed_std=NOISE), (N_X,))


@pytest.mark.parametrize("prior", ["standard", "flow"])
@pytest.mark.parametrize("posterior", ["gaussian", "iaf"])
def test_gradients_reach_every_layer(posterior, prior):
    model = _two_layer(posterior, prior)
    with torch.no_grad():
        perturb(model)  # off the identity init, so zero-initialised layers pass gradients
    x = torch.randn(6, N_X)
    terms = model(x, k=3)
    assert terms.log_qz.shape == (3, 6)
    (-iwae(terms).mean()).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    # The per-layer KLs add up to the total; the conditionals always split, so kl_dims
    # exists exactly when the posteriors split and the prior factorises.
    assert len(terms.layer_kl) == 2
    assert torch.allclose(sum(terms.layer_kl), terms.kl, atol=1e-5)
    assert (terms.kl_dims is not None) == model.kl_splits_over_dimensions
    assert model.kl_splits_over_dimensions == (prior == "standard")
    if terms.kl_dims is not None:
        assert terms.kl_dims.shape == (3, 6, model.latent_dim)
        # concatenated bottom layer first: each layer's slice sums to its own KL
        d1 = model.latent_dims[0]
        assert torch.allclose(terms.kl_dims[..., :d1].sum(-1), terms.layer_kl[0], atol=1e-5)
        assert torch.allclose(terms.kl_dims[..., d1:].sum(-1), terms.layer_kl[1], atol=1e-5)


@pytest.mark.parametrize("posterior", ["gaussian", "iaf"])
def test_a_mixture_top_prior_splits_by_the_chain_rule(posterior):
    """With ``kl_chain_rule`` (free bits per group) a mixture top prior gives per-dimension
    terms too: its conditionals; each layer's slice still sums to that layer's KL."""
    model = _two_layer(posterior, "mog")
    with torch.no_grad():
        perturb(model)
    x = torch.randn(6, N_X)
    torch.manual_seed(3)
    off = model(x, k=3)
    assert off.kl_dims is None and not model.kl_splits_over_dimensions
    model.kl_chain_rule = True
    assert model.kl_splits_over_dimensions
    torch.manual_seed(3)
    terms = model(x, k=3)
    # The same samples: the chain terms add up to the prior's own log-density.
    torch.testing.assert_close(terms.log_pz, off.log_pz)
    torch.testing.assert_close(terms.layer_kl[1], off.layer_kl[1])
    d1 = model.latent_dims[0]
    assert torch.allclose(terms.kl_dims[..., :d1].sum(-1), terms.layer_kl[0], atol=1e-5)
    assert torch.allclose(terms.kl_dims[..., d1:].sum(-1), terms.layer_kl[1], atol=1e-5)


@pytest.mark.parametrize("posterior", ["gaussian", "iaf"])
def test_upper_layer_kl_reaches_the_first_layer_through_its_sample(posterior):
    """The reparameterised z1 feeds q(z2|z1) and p(z1|z2): the top layer's KL has a
    pathwise gradient into the first layer's encoder and posterior (a detached z1 would
    still pass the all-parameters check above, through the decoder)."""
    model = _two_layer(posterior, "standard")
    with torch.no_grad():
        perturb(model)
    terms = model(torch.randn(6, N_X), k=3)
    terms.layer_kl[1].sum().backward()
    for name, param in [
        *model.encoders[0].named_parameters(),
        *model.posteriors[0].named_parameters(),
    ]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_ancestral_samples_feed_each_layer_its_own_sample():
    """z2's posterior is conditioned on the z1 sample of the same index (one z2 per z1)."""
    model = _two_layer("gaussian", "standard")
    seen = []
    model.encoders[1].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    h = model.encode(torch.randn(6, N_X))
    samples = model.sample_posterior(h, 5)
    assert [s.z.shape for s in samples] == [(5, 6, 4), (5, 6, 3)]
    assert torch.equal(seen[0], samples[0].z)
    # q(z2 | z1) depends on z1: its means differ across the K samples of one example.
    assert samples[1].mu.shape == (5, 6, 3)
    assert (samples[1].mu.std(0) > 0).all()


def test_existing_bounds_run_unchanged_and_memory_stays_flat_in_k():
    model = _two_layer("gaussian", "standard")
    x = torch.randn(4, N_X)
    terms = model(x, k=2)
    assert isinstance(terms, Terms)
    for value in (elbo(terms), iwae(terms), elbo(terms, beta=0.5)):
        assert value.shape == (4,)
    d = model.latent_dim
    one_group = elbo(terms, free_bits=100.0, num_dims=d, group_size=d)
    assert torch.allclose(one_group, terms.log_px_z.mean(0) - 100.0 * d)
    assert free_bits_kl(terms, 0.5, group_size=1).shape == (4,)
    assert free_bits_kl(terms, 0.5, group_size=d).shape == (4,)

    calls, rows = [], []
    model.encoders[0].register_forward_hook(lambda m, i, o: calls.append(1))
    model.encoders[1].register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    ll = log_likelihood(model, x, k=250, chunk=40)
    assert ll.log_px.shape == (4,) and torch.isfinite(ll.log_px).all()
    assert len(calls) == 1, "the first encoder runs once per batch"
    assert max(rows) <= 40, "upper layers see one chunk of samples at a time"
    assert (ll.elbo <= ll.log_px).all()
    assert model.stats_sampler(x)(10).shape == (6, 4)  # the shared reducing sampler


def test_sample_reconstruct_and_posterior_mean_shapes():
    model = _two_layer("iaf", "flow")
    x = torch.randn(5, N_X)
    assert model.sample(7).shape == (7, N_X)
    assert model.sample(3, mean=False, temperature=0.5).shape == (3, N_X)
    assert model.reconstruct(x).shape == (5, N_X)
    m, v = model.posterior_mean(x, samples=4)
    assert m.shape == v.shape == (5, model.latent_dim) == (5, 7)
    assert (v >= 0).all()


def test_posterior_mean_of_every_layer(float64):
    """E[z1 | x] is the first layer's exact mean; E[z2 | x] = M2 (E[z1 | x] - a) (the mean
    of q(z2|z1) is linear in z1), estimated by Monte Carlo with its sampling variance."""
    model = _linear_gaussian_model(linear_gaussian_params())
    x = torch.randn(4, N_X)
    m, v = model.posterior_mean(x, samples=4000)
    assert m.shape == v.shape == (4, D1 + D2)
    mu1 = model.posteriors[0].params(x)[0]
    assert torch.equal(m[:, :D1], mu1) and torch.equal(v[:, :D1], torch.zeros_like(mu1))
    mu2 = model.posteriors[1].params(mu1)[0]  # linear mean map: E[mu2(z1)] = mu2(E z1)
    # the estimate's variance is Var_q[z2 | x] / samples, Var_q = M2 P1 M2^T + P2 (diagonal)
    m2 = model.posteriors[1].head.weight[:D2]
    p1 = torch.exp(2 * model.posteriors[0].params(x)[1])  # (4, D1)
    p2 = torch.exp(2 * model.posteriors[1].params(mu1)[1])
    var_z2 = p1 @ (m2**2).T + p2
    assert torch.allclose(v[:, D1:] * 4000, var_z2, rtol=0.15), (v[:, D1:] * 4000, var_z2)
    assert ((m[:, D1:] - mu2).abs() < 4 * v[:, D1:].sqrt()).all(), (m[:, D1:], mu2)


def test_layer_sizes_must_match():
    with pytest.raises(ValueError, match="conditionals"):
        BottomUpVAE(
            [nn.Identity(), nn.Identity()],
            [GaussianPosterior(N_X, D1), GaussianPosterior(D1, D2)],
            [ConditionalGaussian(nn.Identity(), D2, D1 + 1)],
            StandardNormalPrior(D2),
            nn.Linear(D1, N_X),
            Gaussian(1, fixed_std=NOISE),
            (N_X,),
        )


def test_terms_check_the_shape_of_each_layer_kl():
    t = torch.zeros(3, 2)
    assert Terms(t, t, t, layer_kl=(t, t)).layer_kl == (t, t)
    with pytest.raises(ValueError, match=r"layer_kl\[1\]"):
        Terms(t, t, t, layer_kl=(t, torch.zeros(2, 3)))


# ----------------------------------------------------------------------------- config

TWO_LAYER = Path(__file__).resolve().parents[1] / "experiments/burda2016_iwae/two_layer.toml"


def test_burda_two_layer_config_builds_the_papers_architecture():
    from vaeflow.config import load_config
    from vaeflow.models.build import build_model

    model = build_model(load_config(TWO_LAYER).model)
    assert isinstance(model, BottomUpVAE) and model.latent_dims == (100, 50)
    linear = [m for m in model.encoders[0].modules() if isinstance(m, nn.Linear)]
    # yburda/iwae experiments.py --layers 2: q 200-200 / 100-100, p 100-100 / 200-200
    assert [(m.in_features, m.out_features) for m in linear] == [(784, 200), (200, 200)]
    widths = [
        [m.out_features for m in net.modules() if isinstance(m, nn.Linear)]
        for net in (model.encoders[1], model.conditionals[0].net)
    ]
    assert widths == [[100, 100], [100, 100]]
    linear = [m for m in model.decoder.modules() if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linear][:2] == [200, 200]
    assert all(isinstance(m, nn.Tanh) for m in model.encoders[1] if not isinstance(m, nn.Linear))
    assert (model.posteriors[1].head.in_features, model.conditionals[0].head.out_features) == (
        100,
        200,  # mean and log-std of z1's 100 units
    )


def test_layer_activation_applies_in_both_directions():
    from vaeflow.config import load_config
    from vaeflow.models.build import build_model

    cfg = load_config(TWO_LAYER, ['model.upper_layers=[{latent_dim=5, activation="relu"}]'])
    model = build_model(cfg.model)
    for net in (model.encoders[1], model.conditionals[0].net):
        acts = [m for m in net if not isinstance(m, nn.Linear)]
        assert acts and all(isinstance(m, nn.ReLU) for m in acts), net


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.upper_layers=[{latent_dim=4, hiden=[8]}]", "model.upper_layers[0].hiden"),
        ("model.upper_layers=[{latent_dim=0}]", "model.upper_layers[0].latent_dim"),
        ('model.upper_layers=[{activation="nope"}]', "model.upper_layers[0].activation"),
        ('model.prior.name="vamp"', "model.prior.name"),
    ],
)
def test_hierarchy_config_errors_name_the_key(override, key):
    from vaeflow.config import ConfigError, load_config
    from vaeflow.models.build import build_model

    with pytest.raises(ConfigError, match=re.escape(key)):
        build_model(load_config(TWO_LAYER, [override]).model)


def test_free_bits_groups_divide_the_whole_latent_vector():
    from vaeflow.config import ConfigError, load_config

    # 100 + 50: groups of 10 stay inside the layers, 150 is one group of everything
    for size in (10, 150):
        load_config(TWO_LAYER, ["train.free_bits=0.1", f"train.free_bits_group_size={size}"])
    # 100 does not divide 150; 30 does, but its fourth group would straddle z1 and z2
    for size in (100, 30):
        with pytest.raises(ConfigError, match=r"free_bits_group_size.*150.*\[100, 50\]"):
            load_config(TWO_LAYER, ["train.free_bits=0.1", f"train.free_bits_group_size={size}"])


@pytest.mark.parametrize(
    "objective",
    [
        ['train.objective="iwae"', "train.k=3"],
        # free bits in groups of 2 over the concatenated (6 + 4) latents: needs kl_dims
        ['train.objective="elbo"', "train.free_bits=0.01", "train.free_bits_group_size=2"],
    ],
    ids=["iwae", "elbo_free_bits"],
)
def test_two_layer_config_trains_through_the_loop(tmp_path, objective):
    from vaeflow.config import load_config
    from vaeflow.run.train import train

    data = os.environ.get("VAEFLOW_DATA") or str(TWO_LAYER.parents[3] / "shared" / "datasets")
    cfg = load_config(
        TWO_LAYER,
        [
            f'data.root="{data}"',
            "data.batch_size=16",
            "data.eval_batch_size=200",
            "model.latent_dim=6",
            'model.encoder.options={hidden=[16], activation="tanh"}',
            'model.decoder.options={hidden=[16], activation="tanh"}',
            'model.upper_layers=[{latent_dim=4, hidden=[8], posterior={flow="iaf", '
            "num_layers=1, hidden=8, context_features=4}}]",
            "train.steps=3",
            "train.lr_milestones=[2]",
            "train.val_every=3",
            "train.val_k=5",
            "train.val_size=200",
            "train.ckpt_every=3",
            "train.image_every=3",
            "train.log_every=1",
            'train.device="cpu"',
            *objective,
        ],
    )
    summary = train(cfg, tmp_path / "run")
    assert summary["step"] == 3 and summary["skipped_steps"] == 0
    assert math.isfinite(summary["val/iwae_k5_nats"]) and math.isfinite(summary["val/kl_nats"])
    from vaeflow.run.logger import read_metrics

    logged = [r for r in read_metrics(tmp_path / "run") if "train/kl_nats" in r]
    assert len(logged) == 3
    _check_hierarchy_logs(tmp_path / "run", layers=2, sizes=(6, 4))
    for r in logged:  # the per-layer KLs are logged and add up to the total
        assert r["train/kl_layer1_nats"] + r["train/kl_layer2_nats"] == pytest.approx(
            r["train/kl_nats"], abs=1e-4
        )
    # the evaluation reloads the checkpoint through build_model and scores the test split
    from vaeflow.run.evaluate import evaluate_run

    result = evaluate_run(tmp_path / "run", k=20, chunk=7, n_test=30, data_root=data)
    assert result["test/n_examples"] == 30 and result["test/latent_dim"] == 10  # 6 + 4
    assert math.isfinite(result["test/nll_iw20_nats"])
    assert result["test/elbo_nats"] <= -result["test/nll_iw20_nats"] + 1e-6
    layers = [result[f"test/active_units_layer{i}"] for i in (1, 2)]
    assert sum(layers) == result["test/active_units"] and layers[1] <= 4
    assert all(math.isfinite(result[f"test/kl_layer{i}_nats"]) for i in (1, 2))


def _check_hierarchy_logs(run: Path, layers: int, sizes: tuple[int, ...]) -> None:
    """What a hierarchy's run logs (issue 13, "Logging a hierarchy"), read back from its
    event file and samples/: validation KL and active units per layer, reconstructions
    through every layer above the first and prior samples at two temperatures, all in the
    ``val`` tag group (TensorBoard orders groups by name, docs/design.md §6)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars, images = set(acc.Tags()["scalars"]), set(acc.Tags()["images"])
    for i, size in enumerate(sizes, start=1):
        kl = acc.Scalars(f"val/kl_layer{i}_nats")
        assert kl and all(math.isfinite(e.value) and e.value > -1e-3 for e in kl)
        active = [e.value for e in acc.Scalars(f"val/active_units_layer{i}")]
        assert active and all(0 <= a <= size for a in active)
    assert f"val/kl_layer{layers + 1}_nats" not in scalars
    want = {f"val/reconstructions_from_layer{i}" for i in range(2, layers + 1)}
    want |= {"val/reconstructions", "val/prior_samples_t1", "val/prior_samples_t0.7"}
    assert want <= images, want - images
    assert "val/reconstructions_from_layer1" not in images  # that is val/reconstructions
    pngs = {p.name for p in (run / "samples").glob("*.png")}
    for tag in want:
        assert any(n.startswith(tag.replace("/", "_") + "_") for n in pngs), tag


def test_three_layers_sum_every_layers_terms():
    """L = 3: Terms equal the chain's densities written out by hand from the same draws
    (p(z3) p(z2|z3) p(z1|z2) p(x|z1) and q(z1|x) q(z2|z1) q(z3|z2))."""
    dims = (4, 3, 2)
    model = _three_layer_chain(dims)
    x = torch.randn(5, N_X)
    torch.manual_seed(7)
    terms = model(x, k=4)
    torch.manual_seed(7)
    s = model.sample_posterior(model.encode(x), 4)
    z1, z2, z3 = (t.z for t in s)
    assert [z.shape for z in (z1, z2, z3)] == [(4, 5, 4), (4, 5, 3), (4, 5, 2)]
    log_q = (
        model.posteriors[0].log_prob(z1, model.encoders[0](x))
        + _log_q_rows(model.posteriors[1], z2, model.encoders[1](z1))
        + _log_q_rows(model.posteriors[2], z3, model.encoders[2](z2))
    )
    log_p = (
        model.prior.log_prob(z3)
        + model.conditionals[1].log_prob(z2, z3)
        + model.conditionals[0].log_prob(z1, z2)
    )
    assert torch.allclose(terms.log_qz, log_q, atol=1e-5)
    assert torch.allclose(terms.log_pz, log_p, atol=1e-5)
    assert len(terms.layer_kl) == 3
    assert torch.allclose(sum(terms.layer_kl), terms.kl, atol=1e-5)
    assert terms.kl_dims.shape == (4, 5, 9)
    assert model.sample(3).shape == (3, N_X)
    assert torch.isfinite(model.log_likelihood(x, k=30, chunk=8).log_px).all()


def _log_q_rows(posterior: GaussianPosterior, z: Tensor, h: Tensor) -> Tensor:
    """log q(z | h) where each sample row has its own features: z (K, B, D), h (K, B, H)."""
    mu, log_std = posterior.params(h)
    return torch.distributions.Normal(mu, torch.exp(log_std)).log_prob(z).sum(-1)


def test_compiled_log_likelihood_equals_eager():
    """eval.compile works through the shared estimator: with inductor's fallback_random
    the compiled chunk draws the same ancestral noise as eager (as tests/test_vae.py)."""

    model = _two_layer("iaf", "flow").eval()
    x = torch.randn(4, N_X)
    assert_compiled_estimate_matches_eager(model, x)


def test_evaluation_counts_active_units_per_layer(float64):
    """q(z2|z1) with zero weights has a constant mean: z2's 2 units are inactive, z1's 3
    (a linear function of x) are active; the per-layer KLs are reported too."""
    from vaeflow.run.evaluate import evaluate_model

    model = _linear_gaussian_model(linear_gaussian_params())
    with torch.no_grad():
        model.posteriors[1].head.weight.zero_()
    out = evaluate_model(model, torch.randn(200, N_X) * 2, k=10, chunk=5, batch_size=50)
    assert (out["test/active_units_layer1"], out["test/active_units_layer2"]) == (D1, 0)
    assert out["test/active_units"] == D1 and out["test/latent_dim"] == D1 + D2
    assert out["test/kl_layer1_nats"] > 0 and out["test/kl_layer2_nats"] > 0


def test_reconstructions_from_a_layer_keep_it_and_regenerate_the_layers_below():
    """reconstruct_from_layer(x, l): posterior draws up to z_l, then z_{l-1} ... z_1 from
    the prior conditionals, decoded; l = 1 is the ordinary reconstruction. Checked against
    the same draws made by hand (same seed), for every layer of a three-layer chain."""
    dims = (4, 3, 2)
    model = _three_layer_chain(dims)
    x = torch.randn(5, N_X)
    outs = []
    for layer in (1, 2, 3):
        torch.manual_seed(11)
        got = model.reconstruct_from_layer(x, layer)
        torch.manual_seed(11)
        with torch.no_grad():
            z = model.sample_posterior(model.encode(x), 1)[layer - 1].z[0]
            for below in reversed(range(layer - 1)):
                z = model.conditionals[below].sample(z)
            want = model.decoder(z)  # the Gaussian likelihood's mean
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        outs.append(got)
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    for bad in (0, 4):
        with pytest.raises(ValueError, match=r"layer must be in 1\.\.3"):
            model.reconstruct_from_layer(x, bad)


def _three_layer_chain(dims: tuple[int, int, int], h: int = 6) -> BottomUpVAE:
    """A three-layer bottom-up chain of Gaussian layers (hidden width ``h``) over
    Gaussian data, the standard normal at the top."""
    ins = (N_X, *dims[:-1])
    return BottomUpVAE(
        [deterministic_net(i, [h]) for i in ins],
        [GaussianPosterior(h, d) for d in dims],
        [ConditionalGaussian(deterministic_net(dims[i + 1], [h]), h, dims[i]) for i in range(2)],
        StandardNormalPrior(dims[-1]),
        nn.Linear(dims[0], N_X),
        Gaussian(1, fixed_std=NOISE),
        (N_X,),
    )
