"""Monotone rational-quadratic spline flows (Neural Spline Flows).

Each transformed feature goes through a strictly increasing piecewise rational-quadratic
function on ``[-B, B]`` with ``K`` bins, and through the identity outside (linear
tails). The bin widths, heights and interior knot derivatives come from a conditioner
network: an MLP on the other half of the features (:class:`RQSplineCoupling`, both
directions one pass) or a MADE (:class:`RQSplineAutoregressive`, one-pass ``forward``,
sequential ``inverse``).

The derivative at the two outer knots is fixed to 1, so the spline joins the identity
tails with a continuous derivative, and the parameterisation is chosen so that all-zero
raw parameters give uniform bins and unit derivatives: the spline is then exactly the
identity, and a zero-initialised conditioner makes every layer start as the identity
(DESIGN.md convention 5).

References:
    Durkan et al. 2019, "Neural Spline Flows", arXiv:1906.04032, section 3.
    Gregory & Delbourgo 1982, "Piecewise rational quadratic interpolation to monotonic
    data", IMA J. Numer. Anal. 2(2) (the interpolant itself).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from ..nn import MLP
from .autoregressive import (
    ORDERS,
    PERMUTATIONS,
    _Autoregressive,
    _check_choice,
    _check_common,
    _stack,
    undo_permutations,
)
from .base import Composite, LULinear, RandomPermutation, ReversePermutation, Transform

__all__ = [
    "rational_quadratic_spline",
    "RQSplineCoupling",
    "RQSplineAutoregressive",
    "build_nsf_coupling",
    "build_nsf_autoregressive",
]

DEFAULT_TAIL_BOUND = 3.0
DEFAULT_NUM_BINS = 8


def _knots(unnormalized: Tensor, bound: float, min_size: float) -> tuple[Tensor, Tensor]:
    """Bin sizes (*, K) summing to ``2 * bound`` and knot positions (*, K + 1) from -B to B."""
    k = unnormalized.shape[-1]
    # Each bin gets at least min_size of the unit interval, the rest is shared by softmax.
    frac = min_size + (1 - min_size * k) * torch.softmax(unnormalized, dim=-1)
    cum = F.pad(torch.cumsum(frac, dim=-1), (1, 0), value=0.0)
    knots = 2 * bound * cum - bound
    # Pin the end knots exactly, so that +-B map to +-B without cumsum round-off and the
    # spline meets the identity tails exactly there.
    knots = torch.cat(
        [
            torch.full_like(knots[..., :1], -bound),
            knots[..., 1:-1],
            torch.full_like(knots[..., :1], bound),
        ],
        dim=-1,
    )
    return knots[..., 1:] - knots[..., :-1], knots


def _search(knots: Tensor, values: Tensor) -> Tensor:
    """Bin index (*, 1) of each value in ``[knots[0], knots[K]]``, always within ``0..K-1``."""
    idx = torch.searchsorted(knots.contiguous(), values[..., None].contiguous(), right=True) - 1
    # right=True puts a value equal to the last knot (exactly +B) at index K and one
    # equal to the first knot at 0; clamping folds +B into the last bin (xi = 1).
    return idx.clamp(0, knots.shape[-1] - 2)


def rational_quadratic_spline(
    inputs: Tensor,
    unnormalized_widths: Tensor,
    unnormalized_heights: Tensor,
    unnormalized_derivatives: Tensor,
    inverse: bool = False,
    tail_bound: float = DEFAULT_TAIL_BOUND,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    """Elementwise monotone rational-quadratic spline with identity tails.

    On ``[-B, B]`` the function interpolates ``K + 1`` knots ``(x_k, y_k)`` with
    derivatives ``d_k`` (Durkan et al. 2019, eq. 4): in bin ``k`` with
    ``xi = (x - x_k) / w_k`` and ``s_k = h_k / w_k``::

        y = y_k + h_k (s_k xi^2 + d_k xi (1 - xi)) / (s_k + (d_{k+1} + d_k - 2 s_k) xi (1 - xi))

    Outside ``[-B, B]`` it is the identity with log-derivative exactly 0. The outer
    derivatives ``d_0 = d_K = 1``, so value and slope are continuous at ``+-B``.

    Parameterisation: widths (and heights) are ``min + (1 - K min) softmax(raw)`` of
    ``2B``; interior derivatives are ``min_derivative + softplus(raw + c)`` with
    ``c = log(exp(1 - min_derivative) - 1)``, so that ``raw = 0`` gives exactly 1. With all
    raw parameters zero the spline is the identity.

    The inverse solves the quadratic ``a xi^2 + b xi + c = 0`` of Durkan et al. 2019,
    appendix A, for its root in ``[0, 1]``. The paper's form ``2c / (-b - sqrt(b^2 - 4ac))``
    cancels catastrophically when ``b < 0`` (it lost ~4 digits on steep bins in our
    tests), so the textbook sign-dependent choice between it and
    ``(-b + sqrt(b^2 - 4ac)) / (2a)`` is used; the discriminant is clamped at 0.
    Inputs exactly at ``+-B`` are treated as tails (the spline maps them to themselves
    with unit slope anyway), so they come back bit-exactly.

    Args:
        inputs: ``(*)``, any shape.
        unnormalized_widths: ``(*, K)`` raw bin widths.
        unnormalized_heights: ``(*, K)`` raw bin heights.
        unnormalized_derivatives: ``(*, K - 1)`` raw derivatives at the interior knots.
        inverse: evaluate the inverse function instead.
        tail_bound: ``B``; the spline acts on ``[-B, B]``.
        min_bin_width: lower bound on each bin width, as a fraction of ``2B``.
        min_bin_height: lower bound on each bin height, as a fraction of ``2B``.
        min_derivative: lower bound on the interior knot derivatives.

    Returns:
        ``outputs (*)`` and the elementwise ``log |d outputs / d inputs| (*)``.

    References:
        Durkan et al. 2019, arXiv:1906.04032, section 3.1 and appendix A.
    """
    k = unnormalized_widths.shape[-1]
    if k < 1:
        raise ValueError("rational_quadratic_spline needs at least one bin")
    expected = inputs.shape + (k,)
    if unnormalized_widths.shape != expected or unnormalized_heights.shape != expected:
        raise ValueError(
            f"widths/heights must have shape {tuple(expected)}, got "
            f"{tuple(unnormalized_widths.shape)} and {tuple(unnormalized_heights.shape)}"
        )
    if unnormalized_derivatives.shape != inputs.shape + (k - 1,):
        raise ValueError(
            f"derivatives must have shape {tuple(inputs.shape + (k - 1,))} (interior knots), "
            f"got {tuple(unnormalized_derivatives.shape)}"
        )
    if not tail_bound > 0:
        raise ValueError(f"tail_bound must be > 0, got {tail_bound}")
    if min_bin_width * k > 1 or min_bin_height * k > 1:
        raise ValueError(f"min_bin_width/min_bin_height too large for {k} bins")
    if not 0 < min_derivative < 1:
        raise ValueError(f"min_derivative must be in (0, 1), got {min_derivative}")

    bound = float(tail_bound)
    inside = (inputs > -bound) & (inputs < bound)
    # Evaluate the spline everywhere on inputs clamped into [-B, B] and select afterwards:
    # no boolean indexing (so all-tail or empty batches need no special case), and the
    # discarded branch stays finite, so torch.where cannot leak NaN into the gradients.
    v = inputs.clamp(-bound, bound)

    widths, cumwidths = _knots(unnormalized_widths, bound, min_bin_width)
    heights, cumheights = _knots(unnormalized_heights, bound, min_bin_height)
    shift = math.log(math.expm1(1.0 - min_derivative))
    inner = min_derivative + F.softplus(unnormalized_derivatives + shift)
    ones = inner.new_ones(*inner.shape[:-1], 1)
    derivs = torch.cat([ones, inner, ones], dim=-1)  # (*, K + 1): d_0 = d_K = 1

    idx = _search(cumheights if inverse else cumwidths, v)

    def pick(t: Tensor, offset: int = 0) -> Tensor:
        return t.gather(-1, idx + offset)[..., 0]

    x_k, w_k = pick(cumwidths), pick(widths)
    y_k, h_k = pick(cumheights), pick(heights)
    d_k, d_k1 = pick(derivs), pick(derivs, 1)
    s_k = h_k / w_k
    slack = d_k1 + d_k - 2 * s_k

    if inverse:
        dy = v - y_k
        a = h_k * (s_k - d_k) + dy * slack
        b = h_k * d_k - dy * slack
        c = -s_k * dy
        root = torch.sqrt((b * b - 4 * a * c).clamp_min(0.0))
        # The wanted root is (-b + root) / (2a) = 2c / (-b - root). Take whichever form
        # adds two numbers of the same sign: with b < 0 (steep bin ends) the second form
        # would subtract two nearly equal numbers. a > 0 whenever b < 0 for y in the bin,
        # and the division happens after the selection, so no inf/NaN reaches autograd.
        neg_b = b < 0
        num = torch.where(neg_b, root - b, 2 * c)
        den = torch.where(neg_b, 2 * a, -b - root)
        xi = num / den
        out = xi * w_k + x_k
    else:
        xi = (v - x_k) / w_k
        out = y_k + h_k * (s_k * xi * xi + d_k * xi * (1 - xi)) / (s_k + slack * xi * (1 - xi))

    t = xi * (1 - xi)
    denom = s_k + slack * t
    deriv_num = d_k1 * xi * xi + 2 * s_k * t + d_k * (1 - xi) * (1 - xi)
    logdet = 2 * torch.log(s_k) + torch.log(deriv_num) - 2 * torch.log(denom)
    if inverse:
        logdet = -logdet

    outputs = torch.where(inside, out, inputs)
    logdet = torch.where(inside, logdet, torch.zeros_like(logdet))
    return outputs, logdet


def _split_params(params: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(*, 3K - 1) -> widths (*, K), heights (*, K), derivatives (*, K - 1)``."""
    return params[..., :k], params[..., k : 2 * k], params[..., 2 * k :]


def _check_spline_options(num_bins: int, tail_bound: float) -> None:
    if not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
    if not tail_bound > 0:
        raise ValueError(f"tail_bound must be > 0, got {tail_bound!r}")


class RQSplineCoupling(Transform):
    """Rational-quadratic spline coupling layer for vectors ``(*, D)``.

    The features with ``mask == False`` pass through unchanged and, together with the
    context, feed an MLP that outputs ``3K - 1`` spline parameters for each feature with
    ``mask == True``; those go through :func:`rational_quadratic_spline`. Both directions
    are one network pass. The MLP's last layer is zero, so the layer starts as the
    identity.

    Args:
        features: ``D >= 2``.
        hidden: MLP width.
        num_hidden: MLP hidden layers.
        context_features: ``C`` (0: unconditional).
        num_bins: ``K``.
        tail_bound: ``B``.
        parity: with ``mask=None``, transform the features whose index has parity
            ``1 - parity`` (``parity=0``: even features condition, odd ones move).
        mask: explicit bool ``(D,)``, ``True`` for the transformed features (overrides
            ``parity``); must have at least one ``True`` and one ``False``.
        activation: MLP non-linearity.

    References:
        Durkan et al. 2019, arXiv:1906.04032, section 3.2 (coupling transform).
        Dinh et al. 2017, arXiv:1605.08803 (coupling layers).
    """

    def __init__(
        self,
        features: int,
        hidden: int = 64,
        num_hidden: int = 2,
        context_features: int = 0,
        num_bins: int = DEFAULT_NUM_BINS,
        tail_bound: float = DEFAULT_TAIL_BOUND,
        parity: int = 0,
        mask: Tensor | None = None,
        activation: str = "relu",
    ) -> None:
        super().__init__(features, context_features)
        _check_spline_options(num_bins, tail_bound)
        if features < 2:
            raise ValueError(f"RQSplineCoupling needs features >= 2, got {features}")
        if mask is None:
            mask = torch.arange(features) % 2 != parity
        mask = torch.as_tensor(mask, dtype=torch.bool).reshape(-1)
        if mask.numel() != features or mask.all() or not mask.any():
            raise ValueError(f"mask must be a ({features},) bool with both values, got {mask}")
        self.num_bins = num_bins
        self.tail_bound = float(tail_bound)
        self.register_buffer("transform_mask", mask)
        self.register_buffer("identity_idx", torch.nonzero(~mask).reshape(-1))
        self.register_buffer("transform_idx", torch.nonzero(mask).reshape(-1))
        # Putting [identity, transformed] back in place is a gather by this inverse index.
        order = torch.cat([self.identity_idx, self.transform_idx])
        self.register_buffer("unsort_idx", torch.argsort(order))
        n_id, n_tr = self.identity_idx.numel(), self.transform_idx.numel()
        self.conditioner = MLP(
            n_id + context_features,
            n_tr * (3 * num_bins - 1),
            hidden=hidden,
            num_hidden=num_hidden,
            activation=activation,
            zero_last=True,
        )

    def _spline_pass(
        self, x: Tensor, context: Tensor | None, inverse: bool
    ) -> tuple[Tensor, Tensor]:
        x_id = x.index_select(-1, self.identity_idx)
        x_tr = x.index_select(-1, self.transform_idx)
        h = x_id if context is None else torch.cat([x_id, context], dim=-1)
        params = self.conditioner(h).reshape(*x_tr.shape, 3 * self.num_bins - 1)
        y_tr, ld = rational_quadratic_spline(
            x_tr,
            *_split_params(params, self.num_bins),
            inverse=inverse,
            tail_bound=self.tail_bound,
        )
        y = torch.cat([x_id, y_tr], dim=-1).index_select(-1, self.unsort_idx)
        return y, ld.sum(-1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data -> noise: ``x (*, D) -> u (*, D)``, ``log|det du/dx| (*)``."""
        _, context = self.check_input(x, context)
        return self._spline_pass(x, context, inverse=False)

    def inverse(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Noise -> data: ``u (*, D) -> x (*, D)``, ``log|det dx/du| (*)``."""
        _, context = self.check_input(u, context, inverse=True)
        return self._spline_pass(u, context, inverse=True)


class RQSplineAutoregressive(_Autoregressive):
    """Autoregressive rational-quadratic spline layer: feature ``i``'s spline from ``x_<i``.

    A MADE outputs ``3K - 1`` parameters per feature. ``forward`` (data -> noise) is one
    network pass; ``inverse`` is ``D`` sequential passes (as for MAF). Starts as the
    identity (zero MADE output layer).

    Args:
        features: ``D``.
        hidden: MADE hidden width.
        num_hidden: MADE hidden layers.
        context_features: ``C`` (0: unconditional).
        num_bins: ``K``.
        tail_bound: ``B``.
        order: ``"natural"``, ``"random"`` or an explicit permutation (ranks).
        seed: seed of a random order.
        activation: MADE non-linearity.

    References:
        Durkan et al. 2019, arXiv:1906.04032, section 3.2 (autoregressive transform).
        Papamakarios et al. 2017, arXiv:1705.07057 (MAF, the affine special case).
    """

    def __init__(
        self,
        features: int,
        hidden: int = 64,
        num_hidden: int = 2,
        context_features: int = 0,
        num_bins: int = DEFAULT_NUM_BINS,
        tail_bound: float = DEFAULT_TAIL_BOUND,
        order: str | Tensor = "natural",
        seed: int = 0,
        activation: str = "relu",
    ) -> None:
        _check_spline_options(num_bins, tail_bound)
        # params_per_feature must be known before the MADE is built by the base class.
        self.params_per_feature = 3 * num_bins - 1
        super().__init__(features, hidden, num_hidden, context_features, order, seed, activation)
        self.num_bins = num_bins
        self.tail_bound = float(tail_bound)

    def _spline(self, x: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        y, ld = rational_quadratic_spline(
            x, *_split_params(params, self.num_bins), inverse=inverse, tail_bound=self.tail_bound
        )
        return y, ld.sum(-1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data -> noise in one pass: ``x (*, D) -> u (*, D)``, ``log|det du/dx| (*)``."""
        _, context = self.check_input(x, context)
        return self._spline(x, self.made(x, context), inverse=False)

    def inverse(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Noise -> data in ``D`` passes: ``u (*, D) -> x (*, D)``, ``log|det dx/du| (*)``."""
        _, context = self.check_input(u, context, inverse=True)
        return self._sequential_inverse(
            u, context, lambda u, params: self._spline(u, params, inverse=True)
        )


# -- builders ------------------------------------------------------------------------------

COUPLING_PERMUTATIONS = ("reverse", "random", "none", "lu")


def build_nsf_coupling(
    features: int,
    num_layers: int,
    hidden: int,
    context_features: int = 0,
    *,
    num_hidden: int = 2,
    num_bins: int = DEFAULT_NUM_BINS,
    tail_bound: float = DEFAULT_TAIL_BOUND,
    permutation: str = "reverse",
    activation: str = "relu",
    seed: int = 0,
) -> Transform:
    """Neural spline flow with coupling layers (both directions one pass per layer).

    Masks alternate so that every feature is transformed in one of any two consecutive
    layers: with ``"reverse"`` or ``"none"`` the builder tracks where each original
    feature sits after the permutations and transforms the original odd features in
    even layers and the original even ones in odd layers (a plain position-parity
    alternation would transform the same features twice in a row after a reversal of
    an even ``D``). With ``"random"`` or ``"lu"`` the mask alternates position parity,
    and the mixing map between layers varies the split.

    Args:
        features: ``D >= 2``.
        num_layers: number of coupling layers.
        hidden: conditioner MLP width.
        context_features: ``C`` (0: unconditional).
        num_hidden: MLP hidden layers (default 2).
        num_bins: ``K`` (default 8).
        tail_bound: ``B`` (default 3.0).
        permutation: between layers, ``"reverse"`` (default), ``"random"``, ``"none"``, or
            ``"lu"`` (a learned :class:`~vaeflow.flows.base.LULinear`, identity at init);
            a final fixed permutation undoes the composition of the permutations.
        activation: MLP non-linearity (default ``"relu"``).
        seed: seed of random permutations.

    Returns:
        A :class:`Composite`, exactly the identity at init.

    References:
        Durkan et al. 2019, arXiv:1906.04032.
    """
    _check_common(features, num_layers, hidden, context_features)
    _check_spline_options(num_bins, tail_bound)
    _check_choice("permutation", permutation, COUPLING_PERMUTATIONS)
    if features < 2:
        raise ValueError(f"build_nsf_coupling needs features >= 2, got {features}")
    layers: list[Transform] = []
    # where[p] = original index of the feature now at position p (permutations only).
    where = torch.arange(features)
    for i in range(num_layers):
        if i > 0:
            if permutation == "reverse":
                perm = ReversePermutation(features)
            elif permutation == "random":
                perm = RandomPermutation(features, seed=seed + 1000 + i)
            else:
                perm = LULinear(features) if permutation == "lu" else None
            if perm is not None:
                layers.append(perm)
            if isinstance(perm, ReversePermutation | RandomPermutation):
                where = where[perm.perm]
        # Reversals map the two parity classes onto each other or onto themselves, so
        # alternating by original index keeps them alternating; a random permutation is
        # there to vary the split, so alternate by position instead.
        ref = torch.arange(features) if permutation == "random" else where
        mask = ref % 2 != i % 2
        layers.append(
            RQSplineCoupling(
                features,
                hidden,
                num_hidden,
                context_features,
                num_bins,
                tail_bound,
                mask=mask,
                activation=activation,
            )
        )
    return Composite(undo_permutations(layers, where))


def build_nsf_autoregressive(
    features: int,
    num_layers: int,
    hidden: int,
    context_features: int = 0,
    *,
    num_hidden: int = 2,
    num_bins: int = DEFAULT_NUM_BINS,
    tail_bound: float = DEFAULT_TAIL_BOUND,
    order: str = "natural",
    permutation: str = "reverse",
    activation: str = "relu",
    seed: int = 0,
) -> Transform:
    """Neural spline flow with autoregressive layers (density direction one pass).

    ``forward`` (data -> noise) is one MADE pass per layer; ``inverse`` costs ``D``.

    Args:
        features: ``D``.
        num_layers: number of autoregressive spline layers.
        hidden: MADE hidden width.
        context_features: ``C`` (0: unconditional).
        num_hidden: MADE hidden layers (default 2).
        num_bins: ``K`` (default 8).
        tail_bound: ``B`` (default 3.0).
        order: ``"natural"`` (default) or ``"random"`` (layer ``i`` uses ``seed + i``).
        permutation: between layers, ``"reverse"`` (default), ``"random"`` or ``"none"``;
            a final fixed permutation undoes their composition, so feature ``i`` comes
            out at position ``i``.
        activation: MADE non-linearity (default ``"relu"``).
        seed: base seed for random orders and permutations.

    Returns:
        A :class:`Composite`, exactly the identity at init.

    References:
        Durkan et al. 2019, arXiv:1906.04032.
    """
    _check_common(features, num_layers, hidden, context_features)
    _check_spline_options(num_bins, tail_bound)
    _check_choice("order", order, ORDERS)
    _check_choice("permutation", permutation, PERMUTATIONS)

    def layer(i: int) -> Transform:
        return RQSplineAutoregressive(
            features,
            hidden,
            num_hidden,
            context_features,
            num_bins,
            tail_bound,
            order,
            seed + i,
            activation,
        )

    return _stack(layer, features, num_layers, permutation, seed)
