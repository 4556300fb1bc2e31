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
(docs/design.md §3.5).

References:
    Durkan et al. 2019, "Neural Spline Flows", arXiv:1906.04032, section 3.
    Gregory & Delbourgo 1982, "Piecewise rational quadratic interpolation to monotonic
    data", IMA J. Numer. Anal. 2(2) (the interpolant itself).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from ..layers import MLP
from .autoregressive import (
    ORDERS,
    PERMUTATIONS,
    _Autoregressive,
    _check_choice,
    _check_common,
    _stack,
    undo_permutations,
)
from .base import (
    Composite,
    LULinear,
    RandomPermutation,
    ReversePermutation,
    Transform,
    merge_by_parity,
    parity_of,
    split_by_parity,
)

__all__ = [
    "rational_quadratic_spline",
    "RQSplineCoupling",
    "RQSplineAutoregressive",
    "build_nsf_coupling",
    "build_nsf_autoregressive",
]

DEFAULT_TAIL_BOUND = 3.0
DEFAULT_NUM_BINS = 8
DEFAULT_MIN_BIN_WIDTH = 1e-3
DEFAULT_MIN_BIN_HEIGHT = 1e-3
DEFAULT_MIN_DERIVATIVE = 1e-3


def _softplus_shift(min_derivative: float) -> float:
    """``c`` with ``min_derivative + softplus(0 + c) = 1``: zero raw derivatives give slope 1."""
    return math.log(math.expm1(1.0 - min_derivative))


@functools.lru_cache(maxsize=128)
def _knot_constants(
    k: int, bound: float, min_sizes: tuple[float, ...], device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Constants that turn cumulative softmax fractions into knots in one ``addcmul``.

    Knot ``j`` of a set with minimum bin size ``m`` (a fraction of ``2B``) and softmax
    cumulative sums ``S_j`` (``S_0 = 0``) is ``-B + 2B (m j + (1 - K m) S_j)``, i.e.
    ``offset_j + scale_j * S_j`` with ``offset_j = 2B m j - B`` and ``scale_j = 2B (1 - K m)``.
    At the two ends ``scale`` is 0 and ``offset`` is exactly ``-B`` / ``B``, so the end knots
    are pinned without cumsum round-off. Returns ``offset`` and ``scale`` of shape
    ``(len(min_sizes), K + 1)`` and ``pair = [0, 1]`` (long), for gathering bin ``k`` and
    ``k + 1`` together. Cached per device and dtype (made outside inference mode, so that
    autograd may save them), never modified.
    """
    with torch.inference_mode(False), torch.no_grad():
        j = torch.arange(k + 1, dtype=torch.float64)
        interior = ((j > 0) & (j < k)).to(torch.float64)
        offsets, scales = [], []
        for m in min_sizes:
            offset = 2 * bound * m * j - bound
            offset[0], offset[-1] = -bound, bound
            offsets.append(offset)
            scales.append(2 * bound * (1 - k * m) * interior)
        pair = torch.arange(2, device=device)
        return (
            torch.stack(offsets).to(device=device, dtype=dtype),
            torch.stack(scales).to(device=device, dtype=dtype),
            pair,
        )


def _constants() -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """:func:`_knot_constants`, uncached while torch.compile traces: Dynamo ignores the
    ``lru_cache`` wrapper (and warns that it does), and the traced graph holds the
    constants anyway."""
    return _knot_constants.__wrapped__ if torch.compiler.is_compiling() else _knot_constants


def _knot_table(unnormalized: Tensor, bound: float, min_sizes: tuple[float, ...]) -> Tensor:
    """Knots ``(*, S, K + 1)`` from ``-B`` to ``B`` of ``S`` sets of raw bin sizes ``(*, S, K)``.

    Each bin of set ``s`` gets at least ``min_sizes[s]`` of the interval, the rest is shared
    by a softmax. Four kernels for all sets together (softmax, cumsum, pad, addcmul).
    """
    k = unnormalized.shape[-1]
    cum = F.pad(torch.cumsum(torch.softmax(unnormalized, dim=-1), dim=-1), (1, 0))
    # Constants in at least float32: under bf16 autocast the conditioner's output is bf16
    # while softmax/cumsum run in float32, and bf16 offsets would merge neighbouring knots
    # (the minimum bin size lost, empty bins, -inf log-dets).
    dtype = torch.promote_types(cum.dtype, torch.float32)
    offset, scale, _ = _constants()(k, bound, min_sizes, cum.device, dtype)
    return torch.addcmul(offset, cum, scale)


def _knots(unnormalized: Tensor, bound: float, min_size: float) -> tuple[Tensor, Tensor]:
    """Bin sizes (*, K) summing to ``2 * bound`` and knot positions (*, K + 1) from -B to B.

    The same computation as inside the spline (so tests can probe the exact knots).
    """
    knots = _knot_table(unnormalized.unsqueeze(-2), bound, (min_size,)).squeeze(-2)
    return knots.diff(dim=-1), knots


def _rqs(
    inputs: Tensor,
    unnormalized_sizes: Tensor,
    unnormalized_derivatives: Tensor,
    inverse: bool,
    bound: float,
    min_bin_width: float,
    min_bin_height: float,
    min_derivative: float,
    with_logdet: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """The spline on packed parameters: raw widths and heights ``(*, 2, K)``, raw interior
    derivatives ``(*, K - 1)``. No validation (callers validate); see
    :func:`rational_quadratic_spline` for the maths. ``with_logdet=False`` returns
    ``None`` for the log-det and skips its computation (the passes of a sequential
    inversion before the last).

    Written for few kernels per call (these layers are launch-bound on a GPU and memory-
    bound on a CPU): all knots in one table, one ``gather`` for both ends of each element's
    bin, derivatives computed for the two gathered knots only, fused ``addcmul``s.
    """
    k = unnormalized_sizes.shape[-1]
    knots = _knot_table(unnormalized_sizes, bound, (min_bin_width, min_bin_height))
    # Raw derivatives padded with 0 at the two outer knots, where min_d + softplus(0 + c)
    # = 1: the spline meets the identity tails with unit slope (to one rounding).
    raw_d = F.pad(unnormalized_derivatives, (1, 1)).unsqueeze(-2)
    table = torch.cat([knots, raw_d], dim=-2)  # (*, 3, K + 1): x knots, y knots, raw d

    # Evaluate the spline everywhere on inputs clamped into [-B, B] and select afterwards:
    # no boolean indexing (so all-tail or empty batches need no special case), and the
    # discarded branch stays finite, so torch.where cannot leak NaN into the gradients.
    inside = inputs.abs() < bound
    v = inputs.clamp(-bound, bound)
    # Bin index = number of interior knots <= v, in 0..K-1 (v = B falls in the last bin).
    interior = knots[..., 1 if inverse else 0, 1:k]
    idx = (v.unsqueeze(-1) >= interior).sum(-1, keepdim=True)
    _, _, pair = _constants()(k, bound, (min_bin_width, min_bin_height), v.device, v.dtype)
    index = (idx + pair).unsqueeze(-2).expand(*idx.shape[:-1], 3, 2)
    xs, ys, rs = table.gather(-1, index).unbind(-2)  # each (*, 2): knot k and k + 1
    ds = F.softplus(rs + _softplus_shift(min_derivative)) + min_derivative
    x_k, x_k1 = xs.unbind(-1)
    y_k, y_k1 = ys.unbind(-1)
    d_k, d_k1 = ds.unbind(-1)
    w_k = x_k1 - x_k
    h_k = y_k1 - y_k
    s_k = h_k / w_k
    slack = torch.add(d_k + d_k1, s_k, alpha=-2.0)  # d_k + d_{k+1} - 2 s_k

    if inverse:
        # Solve a xi^2 + b xi + c = 0 (Durkan et al. 2019, appendix A) with c = -s dy.
        # The wanted root is (-b + root) / (2a) = 2 s dy / (b + root). Take whichever form
        # adds two numbers of the same sign: with b < 0 (steep bin ends) the second form
        # would subtract two nearly equal numbers. a > 0 whenever b < 0 for y in the bin,
        # and the division happens after the selection, so no inf/NaN reaches autograd.
        dy = v - y_k
        a = torch.addcmul(h_k * (s_k - d_k), dy, slack)
        b = torch.addcmul(h_k * d_k, dy, slack, value=-1.0)
        s_dy = s_k * dy
        root = torch.sqrt(torch.addcmul(b * b, a, s_dy, value=4.0).clamp_min(0.0))
        neg_b = b < 0
        xi = torch.where(neg_b, root - b, 2 * s_dy) / torch.where(neg_b, 2 * a, b + root)
        out = torch.addcmul(x_k, xi, w_k)
    else:
        xi = (v - x_k) / w_k

    if inverse and not with_logdet:
        return torch.where(inside, out, inputs), None
    one_minus = 1 - xi
    t = xi * one_minus
    xi2 = xi * xi
    denom = torch.addcmul(s_k, slack, t)
    if not inverse:
        out = torch.addcmul(y_k, h_k, torch.addcmul(s_k * xi2, d_k, t) / denom)
        if not with_logdet:
            return torch.where(inside, out, inputs), None
    # dy/dx = s^2 (d_{k+1} xi^2 + 2 s t + d_k (1 - xi)^2) / denom^2 (eq. 5 of the paper).
    deriv_num = torch.addcmul(
        torch.addcmul(d_k1 * xi2, s_k, t, value=2.0), d_k, one_minus * one_minus
    )
    logdet = torch.add(torch.log(deriv_num), torch.log(s_k / denom), alpha=2.0)
    if inverse:
        logdet = -logdet
    return torch.where(inside, out, inputs), torch.where(inside, logdet, 0.0)


def rational_quadratic_spline(
    inputs: Tensor,
    unnormalized_widths: Tensor,
    unnormalized_heights: Tensor,
    unnormalized_derivatives: Tensor,
    inverse: bool = False,
    tail_bound: float = DEFAULT_TAIL_BOUND,
    min_bin_width: float = DEFAULT_MIN_BIN_WIDTH,
    min_bin_height: float = DEFAULT_MIN_BIN_HEIGHT,
    min_derivative: float = DEFAULT_MIN_DERIVATIVE,
) -> tuple[Tensor, Tensor]:
    """Elementwise monotone rational-quadratic spline with identity tails.

    On ``[-B, B]`` the function interpolates ``K + 1`` knots ``(x_k, y_k)`` with
    derivatives ``d_k`` (Durkan et al. 2019, eq. 4): in bin ``k`` with
    ``xi = (x - x_k) / w_k`` and ``s_k = h_k / w_k``::

        y = y_k + h_k (s_k xi^2 + d_k xi (1 - xi)) / (s_k + (d_{k+1} + d_k - 2 s_k) xi (1 - xi))

    Outside ``[-B, B]`` it is the identity with log-derivative exactly 0. The outer
    derivatives ``d_0 = d_K = 1`` (computed as ``min_derivative + softplus(0 + c)``, i.e.
    1 to one rounding), so value and slope are continuous at ``+-B``.

    Parameterisation: widths (and heights) are ``min + (1 - K min) softmax(raw)`` of
    ``2B``; interior derivatives are ``min_derivative + softplus(raw + c)`` with
    ``c = log(exp(1 - min_derivative) - 1)``, so that ``raw = 0`` gives 1 (to one
    rounding). With all raw parameters zero the spline is the identity.

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

    return _rqs(
        inputs,
        torch.stack([unnormalized_widths, unnormalized_heights], dim=-2),
        unnormalized_derivatives,
        inverse,
        float(tail_bound),
        min_bin_width,
        min_bin_height,
        min_derivative,
    )


def _spline_from_params(
    x: Tensor,
    params: Tensor,
    num_bins: int,
    tail_bound: float,
    inverse: bool,
    with_logdet: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Layer entry point: ``x (*)``, conditioner output ``params (*, 3K - 1)`` laid out as
    ``[widths (K), heights (K), interior derivatives (K - 1)]`` -> ``y (*)``, ``log-det (*)``.

    One ``split`` (its backward is one ``cat``), no per-part slices.
    """
    sizes, derivs = params.split([2 * num_bins, num_bins - 1], dim=-1)
    return _rqs(
        x,
        sizes.unflatten(-1, (2, num_bins)),
        derivs,
        inverse,
        tail_bound,
        DEFAULT_MIN_BIN_WIDTH,
        DEFAULT_MIN_BIN_HEIGHT,
        DEFAULT_MIN_DERIVATIVE,
        with_logdet,
    )


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
        # Alternating masks (the default) split by a view instead of index gathers.
        self.transform_parity = parity_of(mask)
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
        q = self.transform_parity
        if q is None:
            x_id = x.index_select(-1, self.identity_idx)
            x_tr = x.index_select(-1, self.transform_idx)
        else:
            x_tr, x_id = split_by_parity(x, q)
        h = x_id if context is None else torch.cat([x_id, context], dim=-1)
        params = self.conditioner(h).reshape(*x_tr.shape, 3 * self.num_bins - 1)
        y_tr, ld = _spline_from_params(x_tr, params, self.num_bins, self.tail_bound, inverse)
        if q is None:
            y = torch.cat([x_id, y_tr], dim=-1).index_select(-1, self.unsort_idx)
        else:
            y = merge_by_parity(y_tr, x_id, q)
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
        *,
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
        super().__init__(
            features,
            hidden=hidden,
            num_hidden=num_hidden,
            context_features=context_features,
            order=order,
            seed=seed,
            activation=activation,
        )
        self.num_bins = num_bins
        self.tail_bound = float(tail_bound)

    def _spline(self, x: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        y, ld = _spline_from_params(x, params, self.num_bins, self.tail_bound, inverse)
        return y, ld.sum(-1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data -> noise in one pass: ``x (*, D) -> u (*, D)``, ``log|det du/dx| (*)``."""
        _, context = self.check_input(x, context)
        return self._spline(x, self.made(x, context), inverse=False)

    def inverse(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Noise -> data in ``D`` passes: ``u (*, D) -> x (*, D)``, ``log|det dx/du| (*)``."""
        _, context = self.check_input(u, context, inverse=True)
        k, bound = self.num_bins, self.tail_bound

        def invert(u: Tensor, params: Tensor) -> Tensor:
            return _spline_from_params(u, params, k, bound, inverse=True, with_logdet=False)[0]

        def logdet(u: Tensor, params: Tensor) -> Tensor:
            return self._spline(u, params, inverse=True)[1]

        return self._sequential_inverse(u, context, invert, logdet)


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
            hidden=hidden,
            num_hidden=num_hidden,
            context_features=context_features,
            num_bins=num_bins,
            tail_bound=tail_bound,
            order=order,
            seed=seed + i,
            activation=activation,
        )

    return _stack(layer, features, num_layers, permutation, seed)
