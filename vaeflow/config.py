"""Typed, frozen configuration: dataclasses with defaults, built from plain dicts.

Plain dicts (from TOML or JSON) become nested frozen dataclasses through
:func:`from_dict`, which rejects unknown keys and wrong types with a message naming the
key and what is allowed — never vdvae's silent ``None`` for a typo, never ``eval``.
:func:`to_dict` goes back to plain dicts for ``config.json`` and checkpoints.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = [
    "ConfigError",
    "NetConfig",
    "PosteriorConfig",
    "PriorConfig",
    "ModelConfig",
    "from_dict",
    "to_dict",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the key and the allowed values."""


@dataclass(frozen=True)
class NetConfig:
    """An encoder or decoder network: a name from ``vaeflow.nn.ENCODERS``/``DECODERS``
    and keyword options passed to its constructor."""

    name: str = "mlp"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PosteriorConfig:
    """q(z|x): a diagonal Gaussian, optionally followed by a flow from the registry.

    Attributes:
        flow: a name from ``vaeflow.flows.FLOWS`` with a sampling direction, or ``None``
            for the plain diagonal Gaussian.
        num_layers: flow layers.
        hidden: width of the flow's conditioner networks.
        context_features: width of the context vector the flow receives (a learned
            projection of the encoder features); 0 for an unconditional flow.
        options: family-specific flow options.
    """

    flow: str | None = None
    num_layers: int = 4
    hidden: int = 64
    context_features: int = 32
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PriorConfig:
    """p(z): ``standard_normal``, ``learned_gaussian``, ``mog``, ``vamp`` or ``flow``.

    Attributes:
        name: prior family (see ``vaeflow.priors.PRIORS``).
        flow: for ``name = "flow"``: a registry flow with a density direction.
        num_layers: flow layers.
        hidden: flow conditioner width.
        num_components: mixture components (``mog``) or pseudo-inputs (``vamp``).
        options: family-specific options (flow options for ``flow``).
    """

    name: str = "standard_normal"
    flow: str | None = None
    num_layers: int = 4
    hidden: int = 64
    num_components: int = 500
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelConfig:
    """Everything :func:`vaeflow.build.build_model` needs.

    Attributes:
        x_shape: shape of one example, e.g. ``[1, 28, 28]``.
        latent_dim: ``D``.
        encoder: encoder network.
        decoder: decoder network.
        likelihood: a name from ``vaeflow.likelihoods.LIKELIHOODS``.
        likelihood_options: options of the likelihood.
        posterior: q(z|x).
        prior: p(z).
    """

    x_shape: tuple[int, ...] = (1, 28, 28)
    latent_dim: int = 32
    encoder: NetConfig = field(default_factory=NetConfig)
    decoder: NetConfig = field(default_factory=NetConfig)
    likelihood: str = "bernoulli"
    likelihood_options: dict[str, Any] = field(default_factory=dict)
    posterior: PosteriorConfig = field(default_factory=PosteriorConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a plain dict, checking every key and type.

    Raises:
        ConfigError: naming the offending key (``model.prior.nme``), the allowed keys
            or the expected type.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        keys = ", ".join(f"{where}.{k}" if where else k for k in unknown)
        raise ConfigError(f"unknown config key(s) {keys}; allowed: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _convert(hints[name], value, key)
    return cls(**kwargs)


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} matches none of {_type_name(tp)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (elem, *_rest) = typing.get_args(tp)
        return tuple(_convert(elem, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if isinstance(value, bool) and tp is not bool:
            raise ConfigError(f"{key}: expected {tp.__name__}, got a boolean {value!r}")
        if not isinstance(value, tp):
            raise ConfigError(
                f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}"
            )
        return value
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def to_dict(obj: Any) -> Any:
    """Nested dataclasses -> plain dicts/lists (tuples become lists), JSON/TOML-safe."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
