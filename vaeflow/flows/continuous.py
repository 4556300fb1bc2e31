"""Continuous-time flows (FFJORD): a neural ODE with the log-det as an integrated trace.

A :class:`ContinuousFlow` moves a point along ``dz/dt = f(z, t, context)``. Data -> noise
(``forward``) integrates from ``t = 0`` to ``t = T``; by the instantaneous change of
variables (Chen et al. 2018, theorem 1), ``d/dt log|det dz(t)/dz(0)| = tr(df/dz)``, so
the forward log-det is ``int_0^T tr(df/dz) dt``, integrated alongside ``z`` as one
augmented ODE. Integrating the same system from ``T`` back to ``0`` gives the inverse
and, automatically, the negated log-det.

The trace is either exact (``D`` vector-Jacobian products per evaluation, for small
``D``) or Hutchinson's unbiased estimate ``v^T (df/dz) v`` with one probe ``v`` fixed for
a whole solve (Grathwohl et al. 2019, section 3).

The ODE solver below is a small, deterministic one written for this module: classic
fixed-step RK4 and adaptive Dormand-Prince 5(4). Gradients are obtained by
backpropagating through the solver's arithmetic (discretise-then-optimise); there is no
adjoint method, so memory grows with the number of steps. Step sizes are chosen from
detached error estimates and are not differentiated.

References:
    Chen et al. 2018, "Neural Ordinary Differential Equations", arXiv:1806.07366.
    Grathwohl et al. 2019, "FFJORD: Free-form Continuous Dynamics for Scalable
    Reversible Generative Models", arXiv:1810.01367.
    Dormand & Prince 1980, "A family of embedded Runge-Kutta formulae", J. Comput. Appl.
    Math. 6(1); Hairer, Norsett & Wanner 1993, "Solving ODEs I", section II.4 (step-size
    control and the starting step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..layers import MLP
from .base import Composite, Transform

__all__ = [
    "odeint",
    "ODEStepLimitError",
    "trace_exact",
    "trace_hutchinson",
    "ContinuousFlow",
    "build_ffjord",
]

State = tuple[Tensor, ...]
ODEFunc = Callable[[float, State], State]


class ODEStepLimitError(RuntimeError):
    """The adaptive solver needed more than ``max_steps`` steps."""


# Dormand-Prince 5(4) tableau: nodes c, stage matrix a, 5th-order weights b5 (which are
# also the last stage row: "first same as last") and embedded 4th-order weights b4.
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_DP_E = tuple(b5 - b4 for b5, b4 in zip(_DP_B5, _DP_B4, strict=True))


def _combine(y: State, h: float, coeffs: Sequence[float], ks: Sequence[State]) -> State:
    """``y + h * sum_j coeffs[j] * ks[j]`` for every tensor of the state."""
    out = []
    for i, yi in enumerate(y):
        acc = yi
        for c, k in zip(coeffs, ks, strict=False):
            if c != 0.0:
                acc = acc + (h * c) * k[i]
        out.append(acc)
    return tuple(out)


def _scaled_max(vals: State, y0: State, y1: State, rtol: float, atol: float) -> float:
    """``max |val| / (atol + rtol * max(|y0|, |y1|))`` over every element of every tensor.

    The max norm (rather than an RMS over the batch) makes every sample meet the
    tolerance, not just the batch on average.
    """
    worst = 0.0
    for v, a, b in zip(vals, y0, y1, strict=True):
        if v.numel() == 0:
            continue
        sc = atol + rtol * torch.maximum(a.detach().abs(), b.detach().abs())
        worst = max(worst, (v.detach().abs() / sc).max().item())
    return worst


def _rk4(func: ODEFunc, y: State, t0: float, t1: float, num_steps: int) -> State:
    h = (t1 - t0) / num_steps
    for i in range(num_steps):
        t = t0 + i * h
        k1 = func(t, y)
        k2 = func(t + h / 2, _combine(y, h, (0.5,), (k1,)))
        k3 = func(t + h / 2, _combine(y, h, (0.5,), (k2,)))
        k4 = func(t + h, _combine(y, h, (1.0,), (k3,)))
        y = _combine(y, h, (1 / 6, 1 / 3, 1 / 3, 1 / 6), (k1, k2, k3, k4))
    return y


def _initial_step(
    func: ODEFunc, y0: State, f0: State, t0: float, direction: float, rtol: float, atol: float
) -> float:
    """Starting step size, after Hairer, Norsett & Wanner (1993), section II.4."""
    zero = tuple(torch.zeros_like(v) for v in y0)
    d0 = _scaled_max(y0, y0, zero, rtol, atol)
    d1 = _scaled_max(f0, y0, zero, rtol, atol)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    y1 = _combine(y0, direction * h0, (1.0,), (f0,))
    f1 = func(t0 + direction * h0, y1)
    diff = tuple(a - b for a, b in zip(f1, f0, strict=True))
    d2 = _scaled_max(diff, y0, zero, rtol, atol) / h0
    big = max(d1, d2)
    h1 = max(1e-6, h0 * 1e-3) if big <= 1e-15 else (0.01 / big) ** (1 / 5)
    return min(100 * h0, h1)


def _dopri5(
    func: ODEFunc, y: State, t0: float, t1: float, rtol: float, atol: float, max_steps: int
) -> State:
    direction = 1.0 if t1 > t0 else -1.0
    span = abs(t1 - t0)
    k1 = func(t0, y)
    h = min(_initial_step(func, y, k1, t0, direction, rtol, atol), span)
    t, done, steps = t0, False, 0
    while not done:
        if steps >= max_steps:
            raise ODEStepLimitError(
                f"dopri5: max_steps={max_steps} exceeded at t={t:.6g} (integrating "
                f"{t0:g} -> {t1:g}, last step size {h:.3g}); the dynamics are stiff or "
                "the tolerances too tight: raise max_steps, loosen rtol/atol or use 'rk4'"
            )
        steps += 1
        # Clip the last step so that the integration ends exactly at t1.
        last = h >= abs(t1 - t) * (1 - 1e-12)
        if last:
            h = abs(t1 - t)
        hs = direction * h
        ks = [k1]
        for i in range(1, 7):
            ks.append(func(t + _DP_C[i] * hs, _combine(y, hs, _DP_A[i], ks)))
        y_new = _combine(y, hs, _DP_B5[:6], ks[:6])  # equals the stage-7 input (FSAL)
        err = _combine(tuple(torch.zeros_like(v) for v in y), hs, _DP_E, ks)
        ratio = _scaled_max(err, y, y_new, rtol, atol)
        if ratio <= 1.0:
            t = t1 if last else t + hs
            y, k1, done = y_new, ks[6], last
        # Standard controller: the error scales like h^5 for the 4th-order estimate.
        factor = 10.0 if ratio == 0.0 else min(10.0, max(0.2, 0.9 * ratio ** (-1 / 5)))
        if ratio > 1.0:
            factor = min(factor, 1.0)
        h = h * factor
        if not done and not h > 1e-14 * max(span, 1.0):
            raise ODEStepLimitError(f"dopri5: step size underflow ({h:.3g}) at t={t:.6g}")
    return y


def odeint(
    func: ODEFunc,
    y0: Sequence[Tensor],
    t0: float,
    t1: float,
    method: str = "dopri5",
    rtol: float = 1e-6,
    atol: float = 1e-6,
    num_steps: int = 20,
    max_steps: int = 10_000,
) -> State:
    """Integrate ``dy/dt = func(t, y)`` for a tuple of tensors from ``t0`` to ``t1``.

    Deterministic; differentiable by ordinary backpropagation through the steps.

    Args:
        func: ``func(t, y) -> dy/dt`` with ``t`` a Python float and ``y`` a tuple of
            tensors; returns a tuple of the same shapes.
        y0: initial state, a sequence of tensors (any shapes).
        t0: start time.
        t1: end time (may be smaller than ``t0``: integrates backwards).
        method: ``"dopri5"`` (adaptive Dormand-Prince 5(4)) or ``"rk4"`` (fixed step).
        rtol: relative tolerance (dopri5).
        atol: absolute tolerance (dopri5).
        num_steps: number of equal steps (rk4).
        max_steps: attempted-step limit (dopri5); exceeding it raises
            :class:`ODEStepLimitError`.

    Returns:
        The state at ``t1``, a tuple shaped like ``y0``.
    """
    y = tuple(y0)
    if t0 == t1:
        return y
    if method == "rk4":
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        return _rk4(func, y, float(t0), float(t1), int(num_steps))
    if method == "dopri5":
        if rtol <= 0 or atol <= 0:
            raise ValueError(f"rtol and atol must be > 0, got {rtol}, {atol}")
        return _dopri5(func, y, float(t0), float(t1), rtol, atol, int(max_steps))
    raise ValueError(f"unknown ODE method {method!r}; choose 'dopri5' or 'rk4'")


def trace_exact(f: Tensor, z: Tensor, create_graph: bool = False) -> Tensor:
    """``tr(df/dz)`` per sample from ``D`` vector-Jacobian products.

    Args:
        f: ``(N, D)`` outputs computed from ``z`` (row ``n`` depends on row ``n`` only).
        z: ``(N, D)`` inputs with ``requires_grad``.
        create_graph: keep the graph (to differentiate the trace itself).

    Returns:
        ``(N,)``.
    """
    total = f.new_zeros(f.shape[0])
    for i in range(f.shape[-1]):
        # Row i of the per-sample Jacobians; its i-th entry is the diagonal element.
        (row,) = torch.autograd.grad(
            f[:, i].sum(), z, create_graph=create_graph, retain_graph=True
        )
        total = total + row[:, i]
    return total


def trace_hutchinson(f: Tensor, z: Tensor, v: Tensor, create_graph: bool = False) -> Tensor:
    """Hutchinson's estimate ``v^T (df/dz) v`` per sample; unbiased when ``E[v v^T] = I``.

    Args:
        f: ``(N, D)`` outputs computed from ``z``.
        z: ``(N, D)`` inputs with ``requires_grad``.
        v: ``(N, D)`` probe vectors (Gaussian or Rademacher).
        create_graph: keep the graph.

    Returns:
        ``(N,)``.

    References:
        Hutchinson 1989; Grathwohl et al. 2019, arXiv:1810.01367, eq. 7.
    """
    (vjp,) = torch.autograd.grad(f, z, v, create_graph=create_graph, retain_graph=True)
    return (vjp * v).sum(-1)


_SMOOTH = ("tanh", "softplus", "silu", "gelu")
_TRACES = ("auto", "exact", "hutchinson")
_NOISES = ("rademacher", "gaussian")


class ContinuousFlow(Transform):
    """FFJORD block: ``u = z(T)`` with ``z(0) = x`` and ``dz/dt = f(z, t, context)``.

    ``f`` is an MLP on ``[z, t, context]`` with a smooth activation and a zero-initialised
    output layer, so the block starts as the exact identity (``f = 0``). With
    ``num_hidden=0`` it is the linear field ``f = A z + a t + b``.

    Args:
        features: ``D``.
        hidden: width of the hidden layers of ``f``.
        context_features: context width (0: unconditional).
        num_hidden: hidden layers of ``f`` (0: linear dynamics).
        activation: ``"tanh"`` (default), ``"softplus"``, ``"silu"`` or ``"gelu"``.
        T: integration time (> 0).
        solver: ``"dopri5"`` (default) or ``"rk4"``.
        rtol: dopri5 relative tolerance; ``None``: 1e-9 in float64, 1e-5 otherwise.
        atol: dopri5 absolute tolerance; ``None``: as ``rtol``.
        num_steps: rk4 steps.
        max_steps: dopri5 step limit (:class:`ODEStepLimitError` beyond it).
        trace: ``"exact"``, ``"hutchinson"`` or ``"auto"`` (exact when
            ``D <= exact_max_dim``).
        exact_max_dim: threshold for ``"auto"``.
        noise: Hutchinson probe, ``"rademacher"`` or ``"gaussian"``.
        eval_seed: in eval mode the Hutchinson probe is drawn from a generator seeded
            with this on each call (deterministic evaluation); training uses the global RNG.

    References:
        Chen et al. 2018, arXiv:1806.07366; Grathwohl et al. 2019, arXiv:1810.01367.
    """

    needs_autograd = True  # autograd.grad inside its passes (see Transform)

    def __init__(
        self,
        features: int,
        hidden: int = 64,
        context_features: int = 0,
        num_hidden: int = 2,
        activation: str = "tanh",
        T: float = 1.0,
        solver: str = "dopri5",
        rtol: float | None = None,
        atol: float | None = None,
        num_steps: int = 20,
        max_steps: int = 10_000,
        trace: str = "auto",
        exact_max_dim: int = 16,
        noise: str = "rademacher",
        eval_seed: int = 0,
    ) -> None:
        super().__init__(features, context_features)
        if activation not in _SMOOTH:
            raise ValueError(f"activation must be smooth, one of {_SMOOTH}; got {activation!r}")
        if not T > 0:
            raise ValueError(f"T must be > 0, got {T}")
        if solver not in ("dopri5", "rk4"):
            raise ValueError(f"solver must be 'dopri5' or 'rk4', got {solver!r}")
        if trace not in _TRACES:
            raise ValueError(f"trace must be one of {_TRACES}, got {trace!r}")
        if noise not in _NOISES:
            raise ValueError(f"noise must be one of {_NOISES}, got {noise!r}")
        if num_hidden < 0 or num_steps < 1 or max_steps < 1:
            raise ValueError("num_hidden must be >= 0 and num_steps, max_steps >= 1")
        for name, tol in (("rtol", rtol), ("atol", atol)):
            if tol is not None and not tol > 0:
                raise ValueError(f"{name} must be > 0, got {tol}")
        self.features = features
        self.net = MLP(
            features + 1 + context_features,
            features,
            hidden,
            num_hidden,
            activation,
            zero_last=True,
        )
        self.T = float(T)
        self.solver = solver
        self.rtol = rtol
        self.atol = atol
        self.num_steps = int(num_steps)
        self.max_steps = int(max_steps)
        self.trace = (
            trace if trace != "auto" else ("exact" if features <= exact_max_dim else "hutchinson")
        )
        self.noise = noise
        self.eval_seed = int(eval_seed)

    def dynamics(self, t: float, z: Tensor, context: Tensor | None = None) -> Tensor:
        """The vector field ``f(z, t, context)``: ``(N, D) -> (N, D)``."""
        parts = [z, z.new_full((*z.shape[:-1], 1), t)]
        if context is not None:
            parts.append(context)
        return self.net(torch.cat(parts, dim=-1))

    def _tolerances(self, dtype: torch.dtype) -> tuple[float, float]:
        # float64 tests need ~1e-7 accuracy; in float32 rounding would defeat anything
        # much below 1e-6, and FFJORD trains with 1e-5.
        default = 1e-9 if dtype == torch.float64 else 1e-5
        rtol = default if self.rtol is None else self.rtol
        atol = rtol if self.atol is None else self.atol
        return rtol, atol

    def _probe(self, like: Tensor) -> Tensor:
        gen = None
        if not self.training:
            gen = torch.Generator(device=like.device).manual_seed(self.eval_seed)
        if self.noise == "gaussian":
            return torch.randn(like.shape, generator=gen, device=like.device, dtype=like.dtype)
        bits = torch.randint(0, 2, like.shape, generator=gen, device=like.device)
        return bits.to(like.dtype) * 2 - 1

    def _integrate(
        self, z0: Tensor, context: Tensor | None, t0: float, t1: float
    ) -> tuple[Tensor, Tensor]:
        d = self.features
        flat = z0.reshape(-1, d)
        ctx = None if context is None else context.reshape(-1, context.shape[-1])
        create_graph = torch.is_grad_enabled() and (
            flat.requires_grad
            or (ctx is not None and ctx.requires_grad)
            or any(p.requires_grad for p in self.parameters())
        )
        probe = self._probe(flat) if self.trace == "hutchinson" else None

        def augmented(t: float, state: State) -> State:
            z = state[0]
            with torch.enable_grad():
                # The trace needs df/dz even under no_grad (evaluation): differentiate
                # with respect to a detached copy unless z is itself part of the graph.
                zin = z if (create_graph and z.requires_grad) else z.detach().requires_grad_(True)
                f = self.dynamics(t, zin, ctx)
                if probe is None:
                    tr = trace_exact(f, zin, create_graph)
                else:
                    tr = trace_hutchinson(f, zin, probe, create_graph)
            if not create_graph:
                f, tr = f.detach(), tr.detach()
            return f, tr

        rtol, atol = self._tolerances(z0.dtype)
        z1, ld = odeint(
            augmented,
            (flat, flat.new_zeros(flat.shape[0])),
            t0,
            t1,
            method=self.solver,
            rtol=rtol,
            atol=atol,
            num_steps=self.num_steps,
            max_steps=self.max_steps,
        )
        return z1.reshape(z0.shape), ld.reshape(z0.shape[:-1])

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data -> noise: integrate ``0 -> T``. Returns ``u (*, D)`` and ``int tr (*)``."""
        lead, context = self.check_input(x, context)
        return self._integrate(x, context, 0.0, self.T)

    def inverse(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Noise -> data: integrate ``T -> 0``; the accumulated trace is ``-int_0^T tr``."""
        lead, context = self.check_input(u, context, inverse=True)
        return self._integrate(u, context, self.T, 0.0)


_FFJORD_OPTIONS = {
    "num_hidden": 2,
    "activation": "tanh",
    "T": 1.0,
    "solver": "dopri5",
    "rtol": None,
    "atol": None,
    "num_steps": 20,
    "max_steps": 10_000,
    "trace": "auto",
    "exact_max_dim": 16,
    "noise": "rademacher",
    "eval_seed": 0,
}


def build_ffjord(
    features: int,
    num_layers: int,
    hidden: int,
    context_features: int = 0,
    **options: object,
) -> Transform:
    """A :class:`~vaeflow.flows.base.Composite` of ``num_layers`` :class:`ContinuousFlow` blocks.

    Args:
        features: ``D`` (vectors only).
        num_layers: number of ODE blocks.
        hidden: hidden width of each block's dynamics network.
        context_features: context width (0: unconditional).
        **options:
            num_hidden (int, 2): hidden layers of ``f``.
            activation (str, "tanh"): "tanh" | "softplus" | "silu" | "gelu".
            T (float, 1.0): integration time of each block.
            solver (str, "dopri5"): "dopri5" | "rk4".
            rtol, atol (float | None, None): dopri5 tolerances (None: 1e-9 in float64,
                1e-5 otherwise).
            num_steps (int, 20): rk4 steps.
            max_steps (int, 10000): dopri5 step limit.
            trace (str, "auto"): "auto" | "exact" | "hutchinson".
            exact_max_dim (int, 16): "auto" uses the exact trace up to this ``D``.
            noise (str, "rademacher"): Hutchinson probe, "rademacher" | "gaussian".
            eval_seed (int, 0): Hutchinson seed in eval mode.

    Returns:
        The flow, identity at initialisation.

    Raises:
        TypeError: for an unknown option (named in the message).
    """
    unknown = sorted(set(options) - set(_FFJORD_OPTIONS))
    if unknown:
        raise TypeError(
            f"build_ffjord: unknown option(s) {unknown}; valid: {sorted(_FFJORD_OPTIONS)}"
        )
    if not isinstance(features, int):
        raise ValueError(f"build_ffjord: features must be an int D, got {features!r}")
    if num_layers < 1:
        raise ValueError(f"build_ffjord: num_layers must be >= 1, got {num_layers}")
    opts = {**_FFJORD_OPTIONS, **options}
    return Composite(
        ContinuousFlow(features, hidden, context_features, **opts) for _ in range(num_layers)
    )
