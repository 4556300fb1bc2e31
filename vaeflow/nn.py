"""Small network building blocks shared by flows and (later) encoders/decoders.

Every conditioner network of a flow ends in a zero-initialised layer so that the flow
starts as the identity (DESIGN.md, convention 5; normflows ``init_zeros``, vdvae
``zero_last``). No BatchNorm anywhere: it would make per-example densities depend on the
rest of the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["MLP", "MaskedLinear", "ResidualConvNet", "zero_init", "ACTIVATIONS", "make_activation"]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
}


def make_activation(name: str) -> nn.Module:
    """Return a fresh activation module by name (one of :data:`ACTIVATIONS`)."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}"
        ) from None


def zero_init(layer: nn.Module) -> nn.Module:
    """Set a layer's weight and bias to zero in place and return it."""
    for name in ("weight", "bias"):
        p = getattr(layer, name, None)
        if isinstance(p, nn.Parameter):
            nn.init.zeros_(p)
    return layer


class MLP(nn.Module):
    """Fully connected network ``(*, in) -> (*, out)``.

    Args:
        in_features: input width.
        out_features: output width.
        hidden: width of each hidden layer.
        num_hidden: number of hidden layers (0 gives a single linear map).
        activation: name from :data:`ACTIVATIONS`.
        zero_last: zero-initialise the output layer (identity-at-init for conditioners).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: int = 64,
        num_hidden: int = 2,
        activation: str = "relu",
        zero_last: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(num_hidden):
            layers += [nn.Linear(width, hidden), make_activation(activation)]
            width = hidden
        last = nn.Linear(width, out_features)
        if zero_last:
            zero_init(last)
        layers.append(last)
        self.net = nn.Sequential(*layers)
        self.in_features = in_features
        self.out_features = out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MaskedLinear(nn.Linear):
    """Linear layer whose weight is multiplied by a fixed 0/1 mask ``(out, in)``.

    The building block of MADE (Germain et al. 2015, arXiv:1502.03509). The mask is a
    buffer, so it moves with the module and is saved in its state_dict.
    """

    def __init__(self, in_features: int, out_features: int, mask: Tensor, bias: bool = True):
        super().__init__(in_features, out_features, bias)
        if tuple(mask.shape) != (out_features, in_features):
            raise ValueError(
                f"mask shape {tuple(mask.shape)} != (out, in) = ({out_features}, {in_features})"
            )
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight * self.mask, self.bias)


class _ResBlock(nn.Module):
    def __init__(self, channels: int, activation: str) -> None:
        super().__init__()
        self.net = nn.Sequential(
            make_activation(activation),
            nn.Conv2d(channels, channels, 3, padding=1),
            make_activation(activation),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class ResidualConvNet(nn.Module):
    """Shape-preserving conv net ``(N, C_in, H, W) -> (N, C_out, H, W)``.

    A 3x3 input conv, ``num_blocks`` residual blocks, and a zero-initialisable 3x3
    output conv: the conditioner of image coupling layers (Dinh et al. 2017 use a
    ResNet here; no normalisation layers, see the module docstring).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden: int = 64,
        num_blocks: int = 2,
        activation: str = "relu",
        zero_last: bool = True,
    ) -> None:
        super().__init__()
        self.inp = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.blocks = nn.Sequential(*[_ResBlock(hidden, activation) for _ in range(num_blocks)])
        self.act = make_activation(activation)
        self.out = nn.Conv2d(hidden, out_channels, 3, padding=1)
        if zero_last:
            zero_init(self.out)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.act(self.blocks(self.inp(x))))


def flatten_leading(x: Tensor, event_ndim: int) -> tuple[Tensor, torch.Size]:
    """Merge all leading dims into one: ``(*lead, *event) -> (N, *event)``; also return lead.

    Conv nets need exactly one batch dimension; flows accept any number.
    """
    lead = x.shape[: x.dim() - event_ndim]
    return x.reshape(-1, *x.shape[x.dim() - event_ndim :]), lead
