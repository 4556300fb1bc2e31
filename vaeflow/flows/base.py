"""The transform contract every flow layer keeps, its wrappers, and permutations.

Direction convention (docs/design.md §3.1): ``forward`` runs data -> noise, the
normalising direction of RealNVP, Glow and MAF::

    u, logabsdet = t.forward(x, context)   # logabsdet = log|det du/dx|
    x, logabsdet = t.inverse(u, context)   # logabsdet = log|det dx/du|

Shapes (convention 2): ``x`` is ``(*, *event_shape)`` with any number of leading
(sample/batch) dimensions; ``logabsdet`` always has exactly the leading shape ``(*)``.
A context vector ``(*, C)`` is broadcast against the leading dimensions of ``x``, so a
posterior may pass ``h`` of shape ``(B, C)`` with latents of shape ``(K, B, D)``.

References:
    Dinh et al. 2017, "Density estimation using Real NVP", arXiv:1605.08803.
    Kingma & Dhariwal 2018, "Glow", arXiv:1807.03039 (LU-decomposed linear maps).
    Papamakarios et al. 2021, "Normalizing Flows for Probabilistic Modeling and
    Inference", arXiv:1912.02762 (the forward/inverse vocabulary used here).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "Transform",
    "Composite",
    "Inverse",
    "FixedAffine",
    "Permutation",
    "ReversePermutation",
    "RandomPermutation",
    "LULinear",
    "ShapeError",
    "sum_except_leading",
    "parity_of",
    "split_by_parity",
    "merge_by_parity",
]


class ShapeError(ValueError):
    """Raised when an input or a context does not have the shape a transform expects."""


def sum_except_leading(x: Tensor, event_ndim: int) -> Tensor:
    """Sum over the trailing ``event_ndim`` dimensions: ``(*, *event) -> (*)``."""
    if event_ndim == 0:
        return x
    return x.sum(dim=tuple(range(-event_ndim, 0)))


def parity_of(mask: Tensor) -> int | None:
    """``q`` if the bool mask ``(D,)`` selects exactly the positions of parity ``q`` (even ``D``).

    Coupling layers with such a mask (the usual alternating one) split and merge the
    features with :func:`split_by_parity` / :func:`merge_by_parity`: a view and one
    ``stack``, instead of index gathers whose backward is a scatter each.
    """
    d = mask.numel()
    if mask.dim() != 1 or d % 2:
        return None
    for q in (0, 1):
        if torch.equal(mask.cpu(), torch.arange(d) % 2 == q):
            return q
    return None


def split_by_parity(x: Tensor, q: int) -> tuple[Tensor, Tensor]:
    """``x (*, D)`` -> features at positions of parity ``q`` and the others, each ``(*, D/2)``."""
    pairs = x.unflatten(-1, (x.shape[-1] // 2, 2)).unbind(-1)
    return pairs[q], pairs[1 - q]


def merge_by_parity(x_q: Tensor, x_other: Tensor, q: int) -> Tensor:
    """Inverse of :func:`split_by_parity`: interleave back into ``(*, D)``."""
    pair = (x_q, x_other) if q == 0 else (x_other, x_q)
    return torch.stack(pair, dim=-1).flatten(-2)


class Transform(nn.Module):
    """A bijection with a tractable log-determinant, optionally conditioned on a context.

    Subclasses implement :meth:`forward` (data -> noise) and :meth:`inverse`
    (noise -> data), both returning ``(output, logabsdet)``. A layer that has no
    analytic inverse in one direction raises :class:`NotImplementedError` there and
    says which direction it does have.

    Args:
        event_shape: trailing shape of the inputs of :meth:`forward`, e.g. ``(D,)`` for
            vectors or ``(C, H, W)`` for images.
        context_features: width ``C`` of the context vector (0: unconditional).
        out_event_shape: trailing shape of the outputs of :meth:`forward` when it differs
            from ``event_shape`` (squeeze, multi-scale flattening).
    """

    def __init__(
        self,
        event_shape: Sequence[int] | int,
        context_features: int = 0,
        out_event_shape: Sequence[int] | int | None = None,
    ) -> None:
        super().__init__()
        self.event_shape: tuple[int, ...] = _as_event_shape(event_shape)
        self.out_event_shape: tuple[int, ...] = (
            self.event_shape if out_event_shape is None else _as_event_shape(out_event_shape)
        )
        if context_features < 0:
            raise ValueError(f"context_features must be >= 0, got {context_features}")
        self.context_features = int(context_features)

    # -- the contract ---------------------------------------------------------------
    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data -> noise. Returns ``u (*, *out_event_shape)`` and ``log|det du/dx| (*)``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement forward")

    def inverse(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Noise -> data. Returns ``x (*, *event_shape)`` and ``log|det dx/du| (*)``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement inverse")

    #: True when the layer consumes a context of a broadcastable leading shape itself
    #: (a MADE adds its context projection with broadcasting): ``expand_context`` then
    #: validates but does not expand, so a posterior's ``(B, C)`` context with ``(K, B, D)``
    #: latents is projected once per example, not once per sample.
    broadcasts_context: bool = False

    #: True when an image layer also takes a context *feature map* ``(*, C, H, W)`` (with
    #: its input's ``H, W``) besides a context vector broadcast over the positions: the
    #: convolutional IAF, whose context in a ResNet VAE differs from position to position.
    takes_context_map: bool = False

    #: True when the layer calls ``torch.autograd.grad`` inside its own passes (FFJORD's
    #: trace estimator, residual flows' log-det series and inverse): evaluation must then
    #: run under ``no_grad``, not ``inference_mode``, where autograd cannot be re-enabled.
    needs_autograd: bool = False

    #: True when the log-determinant is identically zero whatever the input (permutations):
    #: :class:`Composite` then calls :meth:`apply_map` and skips the zero log-det.
    zero_logdet: bool = False

    def apply_map(self, x: Tensor, inverse: bool = False) -> Tensor:
        """The output alone (no log-det, no context); only for ``zero_logdet`` layers."""
        return (self.inverse(x) if inverse else self(x))[0]

    #: True when the log-det of a vector flow is a sum of per-position terms, one per
    #: output feature, that :meth:`forward_dims` / :meth:`inverse_dims` return unsummed
    #: (elementwise-scaling layers: the affine and gated autoregressive layers, and stacks
    #: of them with permutations; on images, the convolutional IAF, per element of the
    #: feature map). Free bits per latent dimension (Kingma et al. 2016)
    #: need it for flow posteriors; a layer without it keeps the default False.
    splits_logdet: bool = False

    def forward_dims(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """:meth:`forward` with the log-det per output position ``(*, *event_shape)``
        (``(*, D)`` for vectors; sum = log-det).

        Only for ``splits_logdet`` layers.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not split its log-det over dimensions"
        )

    def inverse_dims(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """:meth:`inverse` with the log-det per output position ``(*, *event_shape)``
        (``(*, D)`` for vectors; sum = log-det).

        Only for ``splits_logdet`` layers.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not split its log-det over dimensions"
        )

    # -- validation shared by every layer -----------------------------------------------
    def check_input(
        self, x: Tensor, context: Tensor | None, inverse: bool = False
    ) -> tuple[torch.Size, Tensor | None]:
        """Validate ``x`` and ``context``; return the leading shape and the expanded context.

        Raises :class:`ShapeError` naming what was expected, instead of letting a wrong
        shape broadcast silently into a wrong answer.
        """
        shape = self.out_event_shape if inverse else self.event_shape
        n = len(shape)
        name = "inverse" if inverse else "forward"
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__}.{name}: expected a Tensor, got {type(x)}")
        if x.dim() < n or tuple(x.shape[x.dim() - n :]) != shape:
            raise ShapeError(
                f"{type(self).__name__}.{name}: expected input of shape (*, "
                f"{', '.join(map(str, shape))}), got {tuple(x.shape)}"
            )
        lead = x.shape[: x.dim() - n]
        return lead, self.expand_context(context, lead)

    def expand_context(self, context: Tensor | None, lead: torch.Size) -> Tensor | None:
        """Broadcast a context ``(*c, C)`` to ``(*lead, C)``, or fail with a clear message."""
        name = type(self).__name__
        if self.context_features == 0:
            if context is not None:
                raise ShapeError(
                    f"{name} was built without context (context_features=0) but a context "
                    f"of shape {tuple(context.shape)} was given"
                )
            return None
        if context is None:
            raise ShapeError(
                f"{name} needs a context of shape (*, {self.context_features}); none given"
            )
        if context.dim() < 1 or context.shape[-1] != self.context_features:
            raise ShapeError(
                f"{name}: expected context of shape (*, {self.context_features}), "
                f"got {tuple(context.shape)}"
            )
        c_lead = context.shape[:-1]
        if c_lead == lead:
            return context  # the common case (hot path)
        # Broadcastable to lead (never growing lead): right-aligned, each dim 1 or equal.
        # Checked by hand: torch.broadcast_shapes is a slow Python reference function.
        offset = len(lead) - len(c_lead)
        if offset < 0 or any(c not in (1, lead[offset + i]) for i, c in enumerate(c_lead)):
            raise ShapeError(
                f"{name}: context leading shape {tuple(context.shape[:-1])} does not "
                f"broadcast to the input's leading shape {tuple(lead)}"
            )
        if self.broadcasts_context:
            return context
        return context.expand(*lead, self.context_features)

    @property
    def event_ndim(self) -> int:
        return len(self.event_shape)


def _as_event_shape(shape: Sequence[int] | int) -> tuple[int, ...]:
    """An event shape as a tuple of ints: ``D`` -> ``(D,)``, a sequence as given."""
    if isinstance(shape, int):
        return (shape,)
    return tuple(int(s) for s in shape)


def _maps_compose_to_identity(transforms: Sequence[Transform]) -> bool:
    """Whether the zero-log-det layers (permutations) of a vector flow leave every feature
    where it started."""
    shape = transforms[0].event_shape
    if len(shape) != 1:
        return False
    x = torch.arange(shape[0], dtype=torch.float64).unsqueeze(0)
    y = x
    for t in transforms:
        if t.zero_logdet:
            y = t.apply_map(y)
    return torch.equal(x, y)


class Composite(Transform):
    """Apply transforms in sequence; forward runs them in order, inverse in reverse.

    The context is handed only to the layers that take one (``context_features > 0``),
    so conditional and unconditional layers can be mixed freely.
    """

    def __init__(self, transforms: Iterable[Transform]) -> None:
        transforms = list(transforms)
        if not transforms:
            raise ValueError("Composite needs at least one transform")
        ctx = {t.context_features for t in transforms if t.context_features > 0}
        if len(ctx) > 1:
            raise ValueError(f"Composite: layers disagree on context_features: {sorted(ctx)}")
        for a, b in zip(transforms, transforms[1:], strict=False):
            if a.out_event_shape != b.event_shape:
                raise ShapeError(
                    f"Composite: {type(a).__name__} outputs {a.out_event_shape} but "
                    f"{type(b).__name__} expects {b.event_shape}"
                )
        super().__init__(
            transforms[0].event_shape,
            ctx.pop() if ctx else 0,
            out_event_shape=transforms[-1].out_event_shape,
        )
        self.transforms = nn.ModuleList(transforms)
        # Zero-log-det layers are index maps of the last dimension (permutations): the
        # per-position log-dets accumulated so far move with the features they belong to.
        # The split is only offered when those maps compose to the identity, so that output
        # position j is the feature that entered at position j: a posterior adds
        # log q0(eps_j) to position j's log-dets, which is right only then (stacks built by
        # the registry append the undoing permutation).
        self.splits_logdet = all(
            t.splits_logdet or t.zero_logdet for t in transforms
        ) and _maps_compose_to_identity(transforms)

    # Each layer validates (and, if it needs to, expands) the context itself.
    broadcasts_context = True

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        lead, context = self.check_input(x, context)
        return self._run(x, lead, context, self.transforms, inverse=False)

    def inverse(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        lead, context = self.check_input(u, context, inverse=True)
        return self._run(u, lead, context, reversed(self.transforms), inverse=True)

    def forward_dims(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        lead, context = self.check_input(x, context)
        return self._run_dims(x, context, self.transforms, inverse=False)

    def inverse_dims(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        lead, context = self.check_input(u, context, inverse=True)
        return self._run_dims(u, context, reversed(self.transforms), inverse=True)

    def _run_dims(
        self,
        x: Tensor,
        context: Tensor | None,
        transforms: Iterable[Transform],
        inverse: bool,
    ) -> tuple[Tensor, Tensor]:
        if not self.splits_logdet:
            return super().inverse_dims(x) if inverse else super().forward_dims(x)
        total = torch.zeros_like(x)
        for t in transforms:
            if t.zero_logdet:
                x, total = t.apply_map(x, inverse), t.apply_map(total, inverse)
                continue
            ctx = context if t.context_features else None
            x, ld = t.inverse_dims(x, ctx) if inverse else t.forward_dims(x, ctx)
            total = total + ld
        return x, total

    @staticmethod
    def _run(
        x: Tensor,
        lead: torch.Size,
        context: Tensor | None,
        transforms: Iterable[Transform],
        inverse: bool,
    ) -> tuple[Tensor, Tensor]:
        # Layers whose log-det is identically zero (permutations) are applied without
        # producing one, and the sum starts from the first real log-det: small flows on a
        # GPU are launch-bound, and each skipped zeros + add is two kernels (four with
        # their backward).
        total: Tensor | None = None
        for t in transforms:
            if t.zero_logdet:
                x = t.apply_map(x, inverse)
                continue
            ctx = context if t.context_features else None
            x, ld = t.inverse(x, ctx) if inverse else t(x, ctx)
            total = ld if total is None else total + ld
        return x, x.new_zeros(lead) if total is None else total


class Inverse(Transform):
    """Swap the two directions of a transform: ``Inverse(t).forward == t.inverse``.

    ``Inverse(AffineAutoregressive(...))`` is the IAF: its sampling direction
    (``inverse``) is the autoregressive layer's one-pass ``forward``.
    """

    def __init__(self, transform: Transform) -> None:
        super().__init__(
            transform.out_event_shape,
            transform.context_features,
            out_event_shape=transform.event_shape,
        )
        self.transform = transform
        self.zero_logdet = transform.zero_logdet
        self.splits_logdet = transform.splits_logdet
        self.takes_context_map = transform.takes_context_map

    def apply_map(self, x: Tensor, inverse: bool = False) -> Tensor:
        return self.transform.apply_map(x, not inverse)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.transform.inverse(x, context)

    def inverse(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.transform(u, context)

    def forward_dims(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.transform.inverse_dims(x, context)

    def inverse_dims(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.transform.forward_dims(u, context)


class FixedAffine(Transform):
    """Fixed elementwise affine map ``u = scale * x + shift`` (no parameters).

    Mostly a known-answer reference: a scaling by 2 in ``D`` dimensions has forward
    log-determinant ``D * log 2``, which pins the sign convention in the tests.
    """

    def __init__(self, event_shape: Sequence[int] | int, scale: float, shift: float = 0.0):
        super().__init__(event_shape)
        if scale == 0:
            raise ValueError("FixedAffine: scale must be non-zero")
        self.scale = float(scale)
        self.shift = float(shift)

    def _ld(self, x: Tensor, lead: torch.Size, sign: float) -> Tensor:
        n = math.prod(self.event_shape)
        return x.new_full(lead, sign * n * math.log(abs(self.scale)))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        lead, _ = self.check_input(x, context)
        return x * self.scale + self.shift, self._ld(x, lead, 1.0)

    def inverse(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        lead, _ = self.check_input(u, context, inverse=True)
        return (u - self.shift) / self.scale, self._ld(u, lead, -1.0)


class Permutation(Transform):
    """Permute one dimension of the event (features of a vector, channels of an image).

    Args:
        permutation: a permutation of ``range(n)``.
        event_shape: the event shape; defaults to ``(n,)``.
        dim: which event dimension to permute, counted from the end (``-1`` for vector
            features, ``-3`` for the channels of ``(C, H, W)`` images).
    """

    def __init__(
        self,
        permutation: Tensor,
        event_shape: Sequence[int] | int | None = None,
        dim: int = -1,
    ) -> None:
        permutation = torch.as_tensor(permutation, dtype=torch.long)
        n = permutation.numel()
        if not torch.equal(permutation.sort().values, torch.arange(n)):
            raise ValueError(f"not a permutation of range({n}): {permutation.tolist()}")
        super().__init__((n,) if event_shape is None else event_shape)
        if dim >= 0 or -dim > self.event_ndim or self.event_shape[dim] != n:
            raise ValueError(
                f"Permutation of length {n} does not fit dim {dim} of event {self.event_shape}"
            )
        self.dim = dim
        self.register_buffer("perm", permutation)
        self.register_buffer("inv_perm", torch.argsort(permutation))

    zero_logdet = True

    def apply_map(self, x: Tensor, inverse: bool = False) -> Tensor:
        return x.index_select(self.dim, self.inv_perm if inverse else self.perm)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        lead, _ = self.check_input(x, context)
        return self.apply_map(x), x.new_zeros(lead)

    def inverse(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        lead, _ = self.check_input(u, context, inverse=True)
        return self.apply_map(u, inverse=True), u.new_zeros(lead)


class ReversePermutation(Permutation):
    """Reverse the order of the features (or channels with ``dim=-3``)."""

    def __init__(
        self, features: int, event_shape: Sequence[int] | int | None = None, dim: int = -1
    ) -> None:
        super().__init__(torch.arange(features - 1, -1, -1), event_shape, dim)

    def apply_map(self, x: Tensor, inverse: bool = False) -> Tensor:
        # A reversal is its own inverse; flip's backward is one flip, while index_select's
        # is zeros + index_add.
        return x.flip(self.dim)


class RandomPermutation(Permutation):
    """A fixed random permutation, drawn once from ``seed`` and stored as a buffer."""

    def __init__(
        self,
        features: int,
        seed: int = 0,
        event_shape: Sequence[int] | int | None = None,
        dim: int = -1,
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        super().__init__(torch.randperm(features, generator=g), event_shape, dim)


class LULinear(Transform):
    """Learned invertible linear map ``u = W x + b`` along one event dimension, W = P L U.

    ``P`` is a fixed permutation, ``L`` unit lower-triangular, ``U`` upper-triangular
    with diagonal ``sign * exp(log_s)``; the log-determinant is ``sum(log_s)`` times the
    number of positions the map is applied at (``H * W`` for a 1x1 convolution). Starts
    as the identity (Glow starts from a random rotation; docs/design.md §3.5 asks
    every layer to start as the identity instead).

    Args:
        features: size ``n`` of the mixed dimension.
        event_shape: the event shape; defaults to ``(n,)``. For images ``(C, H, W)``
            with ``dim=-3`` this is Glow's invertible 1x1 convolution.
        dim: which event dimension is mixed, counted from the end.
        bias: learn a shift ``b`` as well.

    References:
        Kingma & Dhariwal 2018, "Glow", arXiv:1807.03039, section 3.2.
    """

    def __init__(
        self,
        features: int,
        event_shape: Sequence[int] | int | None = None,
        dim: int = -1,
        bias: bool = True,
    ) -> None:
        super().__init__((features,) if event_shape is None else event_shape)
        if dim >= 0 or -dim > self.event_ndim or self.event_shape[dim] != features:
            raise ValueError(f"LULinear({features}) does not fit dim {dim} of {self.event_shape}")
        self.features = features
        self.dim = dim
        self.positions = math.prod(self.event_shape) // features
        self.lower = nn.Parameter(torch.zeros(features, features))
        self.upper = nn.Parameter(torch.zeros(features, features))
        self.log_s = nn.Parameter(torch.zeros(features))
        self.register_buffer("sign_s", torch.ones(features))
        self.register_buffer("perm", torch.arange(features))
        self.bias = nn.Parameter(torch.zeros(features)) if bias else None

    def _lu(self) -> tuple[Tensor, Tensor]:
        n = self.features
        eye = torch.eye(n, dtype=self.lower.dtype, device=self.lower.device)
        lower = torch.tril(self.lower, -1) + eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign_s * torch.exp(self.log_s))
        return lower, upper

    def weight(self) -> Tensor:
        """The ``(n, n)`` matrix ``W = P L U`` (rows of ``L U`` taken in order ``perm``)."""
        lower, upper = self._lu()
        return (lower @ upper)[self.perm]

    def _bias_shape(self) -> tuple[int, ...]:
        shape = [1] * self.event_ndim
        shape[self.dim] = self.features
        return tuple(shape)

    def _logdet(self, x: Tensor, lead: torch.Size, sign: float) -> Tensor:
        return (sign * self.positions * self.log_s.sum()).to(x.dtype).expand(lead)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        lead, _ = self.check_input(x, context)
        u = (x.movedim(self.dim, -1) @ self.weight().T).movedim(-1, self.dim)
        if self.bias is not None:
            u = u + self.bias.view(self._bias_shape())
        return u, self._logdet(x, lead, 1.0)

    def inverse(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        lead, _ = self.check_input(u, context, inverse=True)
        if self.bias is not None:
            u = u - self.bias.view(self._bias_shape())
        lower, upper = self._lu()
        # W x = v  <=>  L U x = v[argsort(perm)]: two triangular solves, never an inverse.
        v = u.movedim(self.dim, -1)
        rhs = v.reshape(-1, self.features)[:, self.perm.argsort()].T
        y = torch.linalg.solve_triangular(lower, rhs, upper=False, unitriangular=True)
        x = torch.linalg.solve_triangular(upper, y, upper=True)
        x = x.T.reshape(v.shape).movedim(-1, self.dim)
        return x, self._logdet(u, lead, -1.0)
