"""Known answers for the convolutional IAF (Kingma et al. 2016; openai/iaf ``tf_utils/layers.py``).

The registry's generic checks (round trip, brute-force log-det with a context vector,
identity at init, per-position log-dets) run on ``conv_iaf`` in test_registry.py; here:
the masks against the code's construction, the triangular Jacobian in the stated order,
context feature maps, and the code's parametrisation ``z = (z - 0.1 m) / exp(0.1 s)``.
"""

import pytest
import torch

from tests.flows.harness import EXACT_TOL, perturb
from vaeflow.flows.base import ShapeError
from vaeflow.flows.conv_autoregressive import (
    ConvAffineAutoregressive,
    build_conv_iaf,
    channel_ar_mask,
    conv_ar_mask,
    conv_ar_ranks,
)
from vaeflow.flows.registry import build_flow

SHAPE = (2, 3, 3)


def test_channel_mask_matches_the_codes_blocks():
    """get_linear_ar_mask(n_in, n_out): blocks of max/min units, one per latent channel."""
    # 2 -> 4, hidden layer: output block o // 2 reads inputs <= it.
    assert channel_ar_mask(2, 4, zero_diagonal=False).tolist() == [
        [1, 0],
        [1, 0],
        [1, 1],
        [1, 1],
    ]
    # 4 -> 2, output layer (zero diagonal): output o reads input blocks i // 2 < o.
    assert channel_ar_mask(4, 2, zero_diagonal=True).tolist() == [[0, 0, 0, 0], [1, 1, 0, 0]]
    # Equal widths: lower triangular, strictly so with the zero diagonal.
    torch.testing.assert_close(channel_ar_mask(3, 3, False), torch.ones(3, 3).tril())
    torch.testing.assert_close(channel_ar_mask(3, 3, True), torch.ones(3, 3).tril(-1))
    with pytest.raises(ValueError, match="divide each other"):
        channel_ar_mask(3, 4, False)


def test_conv_mask_is_zero_before_the_centre_and_one_after():
    mask = conv_ar_mask(3, 2, 2, zero_diagonal=True)
    assert mask.shape == (2, 2, 3, 3)
    spatial = torch.tensor([[0.0, 0, 0], [0, 0, 1], [1, 1, 1]])
    for o in range(2):
        for i in range(2):
            expected = spatial.clone()
            expected[1, 1] = float(i < o)
            torch.testing.assert_close(mask[o, i], expected)
    with pytest.raises(ValueError, match="odd"):
        conv_ar_mask(2, 2, 2, zero_diagonal=False)


def test_ranks_run_positions_backwards_and_channels_forwards():
    r = conv_ar_ranks((2, 2, 2))
    # The bottom-right position comes first, its channel 0 before channel 1.
    assert r[:, 1, 1].tolist() == [0, 1]
    assert r[:, 0, 0].tolist() == [6, 7]
    assert sorted(r.flatten().tolist()) == list(range(8))


def _jacobian(layer, x, ctx):
    return torch.autograd.functional.jacobian(
        lambda v: layer(v.reshape(1, *SHAPE), ctx)[0].reshape(-1), x.reshape(-1)
    )


@pytest.mark.parametrize("reverse", [False, True], ids=["code_order", "reversed"])
def test_jacobian_is_triangular_in_the_stated_order(reverse):
    """Output element of rank r depends only on inputs of rank < r (and itself through the
    scale exp(-s)); the code's masks reach the right and lower neighbours and the earlier
    channels at the same position, never the upper-left ones."""
    layer = perturb(
        ConvAffineAutoregressive(SHAPE, hidden=4, context_features=3, reverse=reverse),
        scale=0.5,
    )
    x = torch.randn(*SHAPE)
    ctx = torch.randn(1, 3, *SHAPE[1:])
    jac = _jacobian(layer, x, ctx)
    order = layer.ranks().flatten().argsort()
    tri = jac[order][:, order]
    assert tri.triu(1).abs().max() == 0
    _, ld = layer.forward_dims(x[None], ctx)
    torch.testing.assert_close(tri.diagonal(), ld.flatten()[order].exp(), rtol=0, atol=1e-12)
    # Dependencies the masks allow are really there (the conditioner is not trivial).
    strict = tri.tril(-1)
    assert (strict != 0).sum() > strict.numel() // 4

    def dep(out, inp):  # |d u[out] / d x[inp]| for (channel, row, col) elements
        flat = [c * 9 + i * 3 + j for c, i, j in (out, inp)]
        return jac[flat[0], flat[1]].abs().item()

    # (channel, row, col): code order reads the next position and earlier channels.
    a, b = ((1, 1, 1), (0, 1, 1)), ((0, 1, 1), (0, 1, 2))
    if reverse:
        a, b = ((0, 1, 1), (1, 1, 1)), ((0, 1, 1), (0, 1, 0))
    assert dep(*a) > 0 and dep(*b) > 0
    assert dep(b[1], b[0]) == 0 and dep(a[1], a[0]) == 0


def test_the_codes_parametrisation_known_answer():
    """tf_train.py IAFLayer.down: z = (z - 0.1 m) / exp(0.1 s), log q += 0.1 s. With a
    constant conditioner output m = 1, s = 2 and no clip: z = (eps - 0.1) e^-0.2 and
    log|det dz/d eps| = -0.2 per element."""
    flow = build_conv_iaf(SHAPE, num_layers=1, hidden=4, scale_bound=None)
    layer = flow.transform.transforms[0]
    with torch.no_grad():
        c = SHAPE[0]
        layer.out.bias[:c] = 1.0
        layer.out.bias[c:] = 2.0
    eps = torch.randn(5, *SHAPE)
    z, ld = flow.inverse(eps)
    torch.testing.assert_close(z, (eps - 0.1) * torch.exp(torch.tensor(-0.2)))
    torch.testing.assert_close(ld, torch.full((5,), -0.2 * 18))


def _bruteforce(fn, point, ctx):
    jac = torch.autograd.functional.jacobian(
        lambda v: fn(v.reshape(1, *SHAPE), ctx)[0].reshape(-1), point.reshape(-1)
    )
    return torch.linalg.slogdet(jac)[1]


@pytest.mark.parametrize("num_layers", [1, 2])
def test_context_map_log_dets_and_round_trip(num_layers):
    """With a context *map* (a different context at every position), both directions'
    log-dets equal the brute-force Jacobian's and the round trip is exact, in float64."""
    flow = perturb(build_flow("conv_iaf", SHAPE, num_layers, hidden=4, context_features=3), 0.3)
    _check_exact_with_a_context_map(flow, torch.randn(2, 3, *SHAPE[1:]))


def _check_exact_with_a_context_map(flow, ctx):
    """Round trip and both directions' log-dets against the brute-force Jacobian."""
    eps = torch.randn(2, *SHAPE)
    z, ld_inv = flow.inverse(eps, ctx)
    back, ld_fwd = flow(z, ctx)
    assert (back - eps).abs().max() < EXACT_TOL
    assert (ld_inv + ld_fwd).abs().max() < EXACT_TOL
    for i in range(2):
        c = ctx[i : i + 1]
        assert abs(_bruteforce(flow.inverse, eps[i], c) - ld_inv[i]) < EXACT_TOL
        assert abs(_bruteforce(flow, z[i], c) - ld_fwd[i]) < EXACT_TOL


def test_context_vector_is_the_constant_map_and_maps_are_read_per_position():
    flow = perturb(build_flow("conv_iaf", SHAPE, 2, hidden=4, context_features=3), 0.3)
    eps = torch.randn(4, 2, *SHAPE)
    vec = torch.randn(2, 3)  # broadcast against the leading (4, 2)
    as_map = vec[:, :, None, None].expand(2, 3, *SHAPE[1:])
    z_vec, ld_vec = flow.inverse(eps, vec)
    z_map, ld_map = flow.inverse(eps, as_map)
    torch.testing.assert_close(z_vec, z_map, rtol=0, atol=1e-12)
    torch.testing.assert_close(ld_vec, ld_map, rtol=0, atol=1e-12)
    moved = as_map.clone()
    moved[:, :, 0, 0] += 1.0  # the first position in raster order comes last in the order
    z_moved, _ = flow.inverse(eps, moved)
    assert (z_moved - z_map)[..., 0, 0].abs().max() > 0


def test_bad_context_maps_and_shapes_fail_clearly():
    flow = build_flow("conv_iaf", SHAPE, 1, hidden=4, context_features=3)
    eps = torch.randn(2, *SHAPE)
    with pytest.raises(ShapeError, match="does not broadcast"):
        flow.inverse(eps, torch.randn(5, 3, *SHAPE[1:]))
    with pytest.raises(ShapeError):
        flow.inverse(eps, torch.randn(2, 3, 4, 4))  # wrong H, W: neither a map nor a vector
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        build_conv_iaf(4, 1, 4)
    with pytest.raises(ValueError, match="divide each other"):
        build_conv_iaf((3, 4, 4), 1, 4)
    with pytest.raises(ValueError, match="permutation"):
        build_conv_iaf(SHAPE, 2, 4, permutation="random")
    assert flow.takes_context_map and flow.splits_logdet


@pytest.mark.parametrize("reverse", [False, True], ids=["code_order", "reversed"])
def test_context_map_lines_up_with_the_positions(reverse):
    """The first position in a layer's order reads nothing before it, so its output
    depends on the context at that position only (also when the layer runs flipped)."""
    layer = perturb(
        ConvAffineAutoregressive(SHAPE, hidden=4, context_features=3, reverse=reverse), 0.5
    )
    first = (0, 0) if reverse else (2, 2)
    x = torch.randn(1, *SHAPE)
    ctx = torch.randn(1, 3, *SHAPE[1:])
    others = torch.randn_like(ctx)
    others[..., first[0], first[1]] = ctx[..., first[0], first[1]]
    u, _ = layer(x, ctx)
    u_others, _ = layer(x, others)
    torch.testing.assert_close(u[..., first[0], first[1]], u_others[..., first[0], first[1]])
    assert (u - u_others).abs().max() > 0


# -- weight_norm = "iaf_code": the code's weight-normalised masked convs -----------------------


def _code_iaf(num_layers: int = 2):
    from vaeflow.layers import weight_norm_data_init

    flow = build_flow(
        "conv_iaf", SHAPE, num_layers, hidden=4, context_features=4, weight_norm="iaf_code"
    )
    with torch.no_grad(), weight_norm_data_init():  # the code's data init, then exactness
        flow.inverse(torch.randn(8, *SHAPE), torch.randn(8, 4, *SHAPE[1:]))
    return flow


def test_iaf_code_weight_norm_is_exact_and_keeps_the_masks():
    """Round trip and both log-dets against the brute-force Jacobian in float64, with a
    context map; the masked weights stay masked (the Jacobian's triangular order is
    checked on the same masks above) and the output conv is not zero."""
    flow = _code_iaf()
    ctx = torch.randn(2, 4, *SHAPE[1:])
    _check_exact_with_a_context_map(flow, ctx)
    step = flow.transform.transforms[0]
    assert step.context is None and step.context_identity  # the context map as it is
    # ar_multiconv2d written out: elu(conv1(z) + context), elu(conv2(.)), 0.1 * out(.)
    x = torch.randn(2, *SHAPE)
    h = torch.nn.functional.elu(step.hidden_layers[0](x) + ctx)
    h = torch.nn.functional.elu(step.hidden_layers[1](h))
    m_raw, s_raw = step.out(h).reshape(2, 2, *SHAPE).unbind(1)
    m, s = step._params(x, torch.Size([2]), ctx)
    assert torch.allclose(m, 0.1 * m_raw, atol=1e-12)
    assert torch.allclose(s, 5.0 * torch.tanh(0.1 * s_raw / 5.0), atol=1e-12)  # default bound
    assert step.out.direction().abs().sum() > 0
    for conv in [*step.hidden_layers, step.out]:
        assert torch.equal(conv.direction() * (1 - conv.mask), torch.zeros_like(conv.weight))


def test_iaf_code_weight_norm_options_are_checked():
    with pytest.raises(ValueError, match="context_features"):
        build_flow("conv_iaf", SHAPE, 1, hidden=4, context_features=3, weight_norm="iaf_code")
    with pytest.raises(ValueError, match="weight_norm"):
        build_flow("conv_iaf", SHAPE, 1, hidden=4, weight_norm=True)
