"""Normalizing flows, usable on their own or inside a VAE.

Direction convention: ``forward`` maps data -> noise and returns ``(u, log|det du/dx|)``;
``inverse`` maps noise -> data and returns ``(x, log|det dx/du|)``. See
:mod:`vaeflow.flows.base`.
"""

from .base import (
    Composite,
    FixedAffine,
    Inverse,
    LULinear,
    Permutation,
    RandomPermutation,
    ReversePermutation,
    ShapeError,
    Transform,
)
from .density import DiagonalNormal, FlowDensity, StandardNormal
from .registry import FLOWS, FlowSpec, build_flow, flow_names

__all__ = [
    "FLOWS",
    "FlowSpec",
    "build_flow",
    "flow_names",
    "Composite",
    "DiagonalNormal",
    "FixedAffine",
    "FlowDensity",
    "Inverse",
    "LULinear",
    "Permutation",
    "RandomPermutation",
    "ReversePermutation",
    "ShapeError",
    "StandardNormal",
    "Transform",
]
