"""The one place that knows every flow family: ``FLOWS`` and :func:`build_flow`.

Configs and tests both go through this registry, so a family that is registered is a
family that is tested (``tests/flows/test_registry.py`` runs the generic checks on every
entry), and a typo in a config names the families that do exist.

Example:
    >>> import torch
    >>> from vaeflow.flows import FlowDensity, build_flow
    >>> flow = build_flow("realnvp", features=2, num_layers=4, hidden=32)
    >>> density = FlowDensity(flow)
    >>> density.log_prob(torch.randn(8, 2)).shape
    torch.Size([8])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass

from .autoregressive import build_gated_iaf, build_iaf, build_maf
from .base import Transform
from .continuous import build_ffjord
from .conv_autoregressive import build_conv_iaf
from .coupling import build_nice, build_realnvp
from .glow import build_glow, build_realnvp_image
from .planar import (
    build_planar,
    build_radial,
    build_sylvester_householder,
    build_sylvester_orthogonal,
    build_sylvester_triangular,
)
from .residual import build_residual
from .spline import build_nsf_autoregressive, build_nsf_coupling

__all__ = ["FLOWS", "FlowSpec", "build_flow", "flow_names"]


@dataclass(frozen=True)
class FlowSpec:
    """What a registered family is and how it may be used.

    Attributes:
        builder: ``builder(features, num_layers, hidden, context_features, **options)``.
        data: ``"vector"`` (features is an int ``D``) or ``"image"`` (a ``(C, H, W)`` tuple).
        density: ``forward`` (data -> noise) exists, so it can score data (priors,
            density estimation).
        sampling: ``inverse`` (noise -> data) exists, so it can draw samples (posteriors).
        exact: both directions and the log-det are closed-form (float64 error ~1e-13);
            ``False`` for iterative inverses, ODE solves or stochastic log-dets.
        one_pass: which direction(s) cost a single network pass (the other is sequential
            or iterative): ``"both"``, ``"density"``, ``"sampling"``.
        summary: one line for ``vaeflow`` listings and the README table.
    """

    builder: Callable[..., Transform]
    _: KW_ONLY  # the flags below are easy to swap by position: name them
    data: str
    density: bool
    sampling: bool
    exact: bool
    one_pass: str
    summary: str


FLOWS: dict[str, FlowSpec] = {
    "nice": FlowSpec(
        build_nice,
        data="vector",
        density=True,
        sampling=True,
        exact=True,
        one_pass="both",
        summary="additive coupling, volume preserving (Dinh et al. 2015)",
    ),
    "realnvp": FlowSpec(
        build_realnvp,
        data="vector",
        density=True,
        sampling=True,
        exact=True,
        one_pass="both",
        summary="affine coupling (Dinh et al. 2017)",
    ),
    "realnvp_image": FlowSpec(
        build_realnvp_image,
        data="image",
        density=True,
        sampling=True,
        exact=True,
        one_pass="both",
        summary="checkerboard/channel affine coupling, multi-scale (Dinh et al. 2017)",
    ),
    "glow": FlowSpec(
        build_glow,
        data="image",
        density=True,
        sampling=True,
        exact=True,
        one_pass="both",
        summary="ActNorm + 1x1 conv + affine coupling, multi-scale (Kingma & Dhariwal 2018)",
    ),
    "maf": FlowSpec(
        build_maf,
        data="vector",
        density=True,
        sampling=True,
        exact=True,
        one_pass="density",
        summary="masked autoregressive flow (Papamakarios et al. 2017)",
    ),
    "iaf": FlowSpec(
        build_iaf,
        data="vector",
        density=True,
        sampling=True,
        exact=True,
        one_pass="sampling",
        summary="inverse autoregressive flow, affine (Kingma et al. 2016)",
    ),
    "gated_iaf": FlowSpec(
        build_gated_iaf,
        data="vector",
        density=True,
        sampling=True,
        exact=True,
        one_pass="sampling",
        summary="inverse autoregressive flow, gated update (Kingma et al. 2016)",
    ),
    "conv_iaf": FlowSpec(
        build_conv_iaf,
        data="image",
        density=True,
        sampling=True,
        exact=True,
        one_pass="sampling",
        summary="IAF with masked 3x3 convs over a feature map (Kingma et al. 2016)",
    ),
    "nsf_coupling": FlowSpec(
        build_nsf_coupling,
        data="vector",
        density=True,
        sampling=True,
        exact=True,
        one_pass="both",
        summary="rational-quadratic spline coupling (Durkan et al. 2019)",
    ),
    "nsf_autoregressive": FlowSpec(
        build_nsf_autoregressive,
        data="vector",
        density=True,
        sampling=True,
        exact=True,
        one_pass="density",
        summary="rational-quadratic spline autoregressive (Durkan et al. 2019)",
    ),
    "planar": FlowSpec(
        build_planar,
        data="vector",
        density=False,
        sampling=True,
        exact=True,
        one_pass="sampling",
        summary="planar flow (Rezende & Mohamed 2015)",
    ),
    "radial": FlowSpec(
        build_radial,
        data="vector",
        density=False,
        sampling=True,
        exact=True,
        one_pass="sampling",
        summary="radial flow (Rezende & Mohamed 2015)",
    ),
    "sylvester_orthogonal": FlowSpec(
        build_sylvester_orthogonal,
        data="vector",
        density=False,
        sampling=True,
        exact=True,
        one_pass="sampling",
        summary="orthogonal Sylvester flow (van den Berg et al. 2018)",
    ),
    "sylvester_householder": FlowSpec(
        build_sylvester_householder,
        data="vector",
        density=False,
        sampling=True,
        exact=True,
        one_pass="sampling",
        summary="Householder Sylvester flow (van den Berg et al. 2018)",
    ),
    "sylvester_triangular": FlowSpec(
        build_sylvester_triangular,
        data="vector",
        density=False,
        sampling=True,
        exact=True,
        one_pass="sampling",
        summary="triangular Sylvester flow (van den Berg et al. 2018)",
    ),
    "residual": FlowSpec(
        build_residual,
        data="vector",
        density=True,
        sampling=True,
        exact=False,
        one_pass="density",
        summary="invertible residual blocks (Behrmann et al. 2019; Chen et al. 2019)",
    ),
    "ffjord": FlowSpec(
        build_ffjord,
        data="vector",
        density=True,
        sampling=True,
        exact=False,
        one_pass="both",
        summary="continuous-time flow (Grathwohl et al. 2019)",
    ),
}


def flow_names(data: str | None = None) -> list[str]:
    """Registered names, optionally only those for ``"vector"`` or ``"image"`` data."""
    return sorted(n for n, s in FLOWS.items() if data is None or s.data == data)


def build_flow(
    name: str,
    features: int | Sequence[int],
    num_layers: int = 4,
    hidden: int = 64,
    context_features: int = 0,
    **options: object,
) -> Transform:
    """Build a registered flow family.

    Args:
        name: a key of :data:`FLOWS`.
        features: ``D`` for vector flows; ``(C, H, W)`` for image flows.
        num_layers: number of layers (couplings, autoregressive layers, blocks...).
        hidden: width of the conditioner networks (ignored by planar/radial/Sylvester).
        context_features: width of the context vector (0: unconditional).
        **options: family-specific options; unknown ones are an error naming them.

    Returns:
        A :class:`~vaeflow.flows.base.Transform` (data -> noise), the identity at init
        (except where a family documents otherwise, e.g. a gated IAF or a data-initialised
        MADE).
    """
    try:
        spec = FLOWS[name]
    except KeyError:
        raise ValueError(
            f"unknown flow {name!r}; registered flows: {', '.join(flow_names())}"
        ) from None
    if spec.data == "vector" and not isinstance(features, int):
        raise ValueError(
            f"flow {name!r} is for vectors: features must be an int, got {features!r}"
        )
    if spec.data == "image" and (isinstance(features, int) or len(features) != 3):
        raise ValueError(
            f"flow {name!r} is for images: features must be (C, H, W), got {features!r}"
        )
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    return spec.builder(features, num_layers, hidden, context_features, **options)
