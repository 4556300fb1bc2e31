"""Invertible residual blocks: ``u = x + g(x)`` with ``Lip(g) < 1``.

A residual block is invertible whenever its residual branch ``g`` is a contraction
(Behrmann et al. 2019): the inverse is the unique fixed point of ``x = u - g(x)``, found
by Banach iteration, and ``log|det(I + J_g)|`` can be computed exactly for small ``D`` or
estimated without bias for large ``D`` with a Russian-roulette power series and a
Hutchinson trace (Chen et al. 2019).

Direction (docs/design.md §3.1): ``forward`` (data -> noise) is the explicit map
``u = x + g(x, context)``, one network pass; ``inverse`` is the fixed-point iteration.
So this family is cheap as a density (prior) and iterative as a sampler (posterior).

The contraction is enforced by spectral normalisation of every weight matrix that acts
on ``x``: ``W / max(1, sigma(W) / coeff)`` with ``sigma`` estimated by power iteration,
and activations that are 1-Lipschitz (LipSwish, ELU, tanh). The context enters through
an unconstrained linear map added to the first pre-activation: it shifts ``g`` but does
not change its Lipschitz constant in ``x``.

References:
    Behrmann et al. 2019, "Invertible Residual Networks", arXiv:1811.00995.
    Chen et al. 2019, "Residual Flows for Invertible Generative Modeling",
    arXiv:1906.02735 (LipSwish, unbiased Russian-roulette log-det, section 3 eq. 6-8).
    Miyato et al. 2018, "Spectral Normalization for GANs", arXiv:1802.05957.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Composite, ReversePermutation, Transform

__all__ = [
    "LipSwish",
    "SpectralNormLinear",
    "InvertibleResidual",
    "FixedPointWarning",
    "build_residual",
]


class FixedPointWarning(RuntimeWarning):
    """A fixed-point iteration (inverse or its adjoint) stopped before converging."""


def _default_tol(dtype: torch.dtype) -> float:
    # Double precision can resolve the fixed point to ~1e-15; single precision only to
    # ~1e-7 relative, so asking for more would never stop.
    return 1e-10 if dtype == torch.float64 else 1e-6


class LipSwish(nn.Module):
    """``x * sigmoid(beta x) / 1.1`` with learned ``beta > 0``: a smooth 1-Lipschitz activation.

    The derivative of ``x sigmoid(beta x)`` lies in about ``[-0.0998, 1.0998]`` for every
    ``beta`` (substitute ``t = beta x``), so dividing by 1.1 makes it 1-Lipschitz.

    References:
        Chen et al. 2019, arXiv:1906.02735, section 4 ("LipSwish").
    """

    def __init__(self) -> None:
        super().__init__()
        # softplus(log(e - 1)) = 1: start from the plain swish/SiLU shape.
        self.beta_raw = nn.Parameter(torch.tensor(math.log(math.e - 1.0)))

    def forward(self, x: Tensor) -> Tensor:
        beta = F.softplus(self.beta_raw)
        return x * torch.sigmoid(beta * x) / 1.1

    def derivative(self, x: Tensor) -> Tensor:
        """Elementwise ``d/dx``, same shape as ``x``."""
        beta = F.softplus(self.beta_raw)
        s = torch.sigmoid(beta * x)
        return (s + beta * x * s * (1 - s)) / 1.1


class _ELU(nn.Module):
    """ELU with ``alpha = 1``: derivative ``exp(min(x, 0))`` in ``(0, 1]``."""

    def forward(self, x: Tensor) -> Tensor:
        return F.elu(x)

    def derivative(self, x: Tensor) -> Tensor:
        return torch.exp(torch.clamp(x, max=0.0))


class _Tanh(nn.Module):
    """tanh: derivative ``1 - tanh^2`` in ``(0, 1]``."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x)

    def derivative(self, x: Tensor) -> Tensor:
        return 1 - torch.tanh(x) ** 2


# Each activation knows its derivative, so the exact Jacobian of g is a product of
# matrices (no autograd passes needed).
_LIP_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "lipswish": LipSwish,
    "elu": _ELU,
    "tanh": _Tanh,
}


def _safe_normalize(vec: Tensor, fallback: Tensor) -> Tensor:
    """``vec / |vec|``, or ``fallback`` when ``vec`` is (numerically) zero.

    A zero-initialised weight maps every vector to 0; keeping the old unit vector lets
    the power iteration resume once the weight becomes non-zero.
    """
    norm = vec.norm()
    tiny = torch.finfo(vec.dtype).tiny ** 0.5
    return torch.where(norm > tiny, vec / norm.clamp_min(tiny), fallback)


class SpectralNormLinear(nn.Module):
    """Linear map ``(*, in) -> (*, out)`` whose weight has spectral norm at most ``coeff``.

    The effective weight is ``W / max(1, sigma / coeff)``, where ``sigma = u^T W v`` and
    ``u, v`` are power-iteration estimates of the top singular vectors, kept in buffers
    (``sn_u``, ``sn_v``) so they survive ``state_dict`` round trips. Gradients flow through
    ``sigma`` (with ``u, v`` held fixed), as in Miyato et al. 2018.

    When the buffers change:
        * at construction: iterated until converged;
        * :meth:`weight_normalized` with ``update=True`` (training-mode forward passes of
          :class:`InvertibleResidual`): ``n_power_iterations`` steps, written back;
        * never otherwise. With ``update=False, refine=True`` (eval mode, and every
          inverse) the iteration is continued to convergence on local copies, so the
          bound holds even for weights edited or loaded after the last update, and the
          result is a deterministic function of the parameters and buffers.

    Args:
        in_features: input width.
        out_features: output width.
        coeff: bound on the spectral norm, ``0 < coeff``.
        n_power_iterations: power-iteration steps per training-mode update.
        zero_init: zero-initialise weight and bias (identity-at-init residual branch).

    References:
        Miyato et al. 2018, arXiv:1802.05957; Behrmann et al. 2019, arXiv:1811.00995,
        section 3 (normalising by ``coeff`` rather than 1).
    """

    #: cap on the iterations used to converge the estimate (construction and eval).
    max_converge_iterations = 500

    def __init__(
        self,
        in_features: int,
        out_features: int,
        coeff: float = 0.97,
        n_power_iterations: int = 5,
        zero_init: bool = False,
    ) -> None:
        super().__init__()
        if coeff <= 0:
            raise ValueError(f"coeff must be > 0, got {coeff}")
        self.in_features = in_features
        self.out_features = out_features
        self.coeff = float(coeff)
        self.n_power_iterations = int(n_power_iterations)
        ref = nn.Linear(in_features, out_features)  # PyTorch's default initialisation
        self.weight = nn.Parameter(ref.weight.detach().clone())
        self.bias = nn.Parameter(ref.bias.detach().clone())
        if zero_init:
            nn.init.zeros_(self.weight)
            nn.init.zeros_(self.bias)
        dtype = self.weight.dtype
        self.register_buffer("sn_u", F.normalize(torch.randn(out_features, dtype=dtype), dim=0))
        self.register_buffer("sn_v", F.normalize(torch.randn(in_features, dtype=dtype), dim=0))
        with torch.no_grad():
            u, v = self._power_iteration(self.sn_u, self.sn_v, self.max_converge_iterations, True)
            self.sn_u.copy_(u)
            self.sn_v.copy_(v)

    @torch.no_grad()
    def _power_iteration(
        self, u: Tensor, v: Tensor, iterations: int, until_converged: bool
    ) -> tuple[Tensor, Tensor]:
        w = self.weight.detach()
        tol = 1e-12 if w.dtype == torch.float64 else 1e-6
        for _ in range(iterations):
            v_new = _safe_normalize(w.T @ u, v)
            u_new = _safe_normalize(w @ v_new, u)
            if until_converged:
                # One host sync per step: only used where convergence matters more than
                # speed (construction and eval), never in the training hot loop.
                change = max((u_new - u).abs().max().item(), (v_new - v).abs().max().item())
                u, v = u_new, v_new
                if change <= tol:
                    break
            else:
                u, v = u_new, v_new
        return u, v

    def weight_normalized(self, update: bool = False, refine: bool = True) -> Tensor:
        """The effective weight ``(out, in)``, spectral norm at most ``coeff``.

        Args:
            update: run ``n_power_iterations`` steps and store them in the buffers.
            refine: (with ``update=False``) converge the estimate on local copies.
        """
        if update:
            u, v = self._power_iteration(self.sn_u, self.sn_v, self.n_power_iterations, False)
            with torch.no_grad():
                self.sn_u.copy_(u)
                self.sn_v.copy_(v)
            u, v = self.sn_u, self.sn_v
        elif refine:
            u, v = self._power_iteration(self.sn_u, self.sn_v, self.max_converge_iterations, True)
        else:
            u, v = self.sn_u, self.sn_v
        sigma = torch.dot(u, self.weight @ v)
        return self.weight / torch.clamp(sigma / self.coeff, min=1.0)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_normalized(update=False), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, coeff={self.coeff}"


_LOGDET_METHODS = ("auto", "exact", "estimate")


class InvertibleResidual(Transform):
    """One invertible residual block ``u = x + g(x, context)`` on vectors ``(*, D)``.

    ``g`` is an MLP ``D -> hidden -> ... -> D`` of :class:`SpectralNormLinear` layers
    and 1-Lipschitz activations, so ``Lip(g) <= coeff ** (num_hidden + 1) < 1``. Its last
    layer is zero-initialised: the block starts as the exact identity.

    Log-determinant of the forward map, ``log det(I + J_g(x))`` (always positive
    determinant since ``Lip(g) < 1``):

    * ``"exact"``: the full ``D x D`` Jacobian per sample, as the product of the weight
      matrices and the activations' derivatives, then ``slogdet``; for small ``D``.
    * ``"estimate"``: the unbiased Russian-roulette estimator of Chen et al. 2019
      (eq. 6-8), ``sum_{k=1}^{N} (-1)^(k+1)/k * v^T J^k v / P(N >= k)`` with a Rademacher
      ``v`` and ``N = n_exact_terms + Geometric(geom_p)`` drawn per sample. It is
      differentiated by backpropagating through the vector-Jacobian products
      (``create_graph``) whenever gradients are being recorded.
    * ``"auto"`` (default): ``"exact"`` when ``D <= exact_max_dim``, else ``"estimate"``.

    The same method is used in training and eval mode. In eval mode the estimator draws
    its noise from a generator seeded with ``eval_seed`` on every call, so evaluation is
    deterministic (each call is still one unbiased draw); in training mode it uses the
    global RNG.

    Inverse: ``x <- u - g(x)`` from ``x = u`` until every element moves by at most
    ``tol * (1 + |u|)`` or ``max_iter`` steps (then a :class:`FixedPointWarning`). Its
    gradient is implicit: a last step ``x = u - g(x*)`` is recorded and its incoming
    gradient ``a`` is replaced by ``b = (I + J_g)^{-T} a``, solved by the same kind of
    iteration, so ``dx/du = (I + J_g)^{-1}`` and ``dx/dtheta`` are exact up to ``tol``
    (first-order gradients only). The inverse log-det is ``-forward_logdet(x)``.

    Spectral-norm power iterations are updated only by training-mode ``forward`` calls
    (``n_power_iterations`` steps each); ``inverse`` and eval-mode calls never change
    the buffers but converge the estimate on local copies, so the contraction (hence
    the inverse) holds even right after weights were edited or loaded. Consequently a
    training-mode ``forward`` right after such an edit uses a slightly different weight
    than ``inverse``; once the buffers track the weights (a few training steps) the two
    agree to ~1e-12 in float64.

    Args:
        features: ``D``.
        hidden: width of the hidden layers of ``g``.
        context_features: width of the context vector (0: unconditional).
        num_hidden: number of hidden layers of ``g`` (at least 1).
        activation: ``"lipswish"`` (default), ``"elu"`` or ``"tanh"``.
        coeff: spectral-norm bound per layer, ``0 < coeff < 1``.
        n_power_iterations: power-iteration steps per training forward pass.
        logdet: ``"auto"``, ``"exact"`` or ``"estimate"``.
        exact_max_dim: largest ``D`` for which ``"auto"`` picks the exact log-det.
        n_exact_terms: series terms always included by the estimator.
        geom_p: success probability of the geometric number of extra terms (the
            variance is finite when ``Lip(g)^2 < 1 - geom_p``).
        tol: fixed-point tolerance; ``None`` picks 1e-10 for float64, 1e-6 otherwise.
        max_iter: fixed-point iteration cap.
        eval_seed: seed of the estimator's noise in eval mode.

    References:
        Behrmann et al. 2019, arXiv:1811.00995; Chen et al. 2019, arXiv:1906.02735.
    """

    needs_autograd = True  # autograd.grad inside its passes (see Transform)

    def __init__(
        self,
        features: int,
        hidden: int = 64,
        context_features: int = 0,
        num_hidden: int = 2,
        activation: str = "lipswish",
        coeff: float = 0.97,
        n_power_iterations: int = 5,
        logdet: str = "auto",
        exact_max_dim: int = 16,
        n_exact_terms: int = 2,
        geom_p: float = 0.5,
        tol: float | None = None,
        max_iter: int = 1000,
        eval_seed: int = 0,
    ) -> None:
        super().__init__(features, context_features)
        if not 0 < coeff < 1:
            raise ValueError(f"coeff must be in (0, 1) for an invertible block, got {coeff}")
        if num_hidden < 1:
            raise ValueError(f"num_hidden must be >= 1, got {num_hidden}")
        if activation not in _LIP_ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; "
                f"1-Lipschitz choices: {sorted(_LIP_ACTIVATIONS)}"
            )
        if logdet not in _LOGDET_METHODS:
            raise ValueError(f"logdet must be one of {_LOGDET_METHODS}, got {logdet!r}")
        if not 0 < geom_p < 1:
            raise ValueError(f"geom_p must be in (0, 1), got {geom_p}")
        if n_exact_terms < 1 or max_iter < 1 or n_power_iterations < 1:
            raise ValueError("n_exact_terms, max_iter and n_power_iterations must be >= 1")
        if tol is not None and tol <= 0:
            raise ValueError(f"tol must be > 0, got {tol}")
        self.features = features
        widths = [features] + [hidden] * num_hidden + [features]
        n_lin = len(widths) - 1
        self.linears = nn.ModuleList(
            SpectralNormLinear(a, b, coeff, n_power_iterations, zero_init=(i == n_lin - 1))
            for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True))
        )
        self.activations = nn.ModuleList(_LIP_ACTIVATIONS[activation]() for _ in range(num_hidden))
        # Unconstrained: it only shifts the first pre-activation, Lip in x is unchanged.
        self.context_linear = (
            nn.Linear(context_features, hidden, bias=False) if context_features else None
        )
        self.coeff = float(coeff)
        self.logdet_method = (
            logdet if logdet != "auto" else ("exact" if features <= exact_max_dim else "estimate")
        )
        self.n_exact_terms = int(n_exact_terms)
        self.geom_p = float(geom_p)
        self.tol = tol
        self.max_iter = int(max_iter)
        self.eval_seed = int(eval_seed)

    # -- the residual branch ------------------------------------------------------------
    def _weights(self, update: bool) -> list[Tensor]:
        # Computed once per public call, so a fixed-point solve sees one fixed g.
        # Calls that may not update the buffers (eval, inverse) still converge the estimate
        # on local copies: the contraction, hence the inverse, must hold even right after
        # weights were edited or loaded.
        return [lin.weight_normalized(update=update, refine=True) for lin in self.linears]

    def _g(self, x: Tensor, context: Tensor | None, weights: list[Tensor]) -> Tensor:
        h = x
        for i, (lin, w) in enumerate(zip(self.linears, weights, strict=True)):
            h = F.linear(h, w, lin.bias)
            if i == 0 and self.context_linear is not None:
                h = h + self.context_linear(context)
            if i < len(self.activations):
                h = self.activations[i](h)
        return h

    def residual(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``g(x, context)`` with the current effective weights: ``(*, D) -> (*, D)``.

        Never updates the power-iteration buffers (for inspection and tests).
        """
        lead, context = self.check_input(x, context)
        return self._g(x, context, self._weights(update=False))

    # -- log-determinants -----------------------------------------------------------------
    def _g_and_jacobian(
        self, x: Tensor, context: Tensor | None, weights: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """``g(x)`` ``(*, D)`` and its Jacobian ``(*, D, D)`` in one pass.

        ``J_g = W_L diag(a'(h_{L-1})) W_{L-1} ... diag(a'(h_1)) W_1``, with ``h_i`` the
        pre-activations: exact, and cheap for small ``D``.
        """
        h = x
        jac = None
        for i, (lin, w) in enumerate(zip(self.linears, weights, strict=True)):
            h = F.linear(h, w, lin.bias)
            # (*, out, in) @ ... : the chain rule through the linear map.
            jac = w.expand(*h.shape[:-1], *w.shape) if jac is None else w @ jac
            if i == 0 and self.context_linear is not None:
                h = h + self.context_linear(context)
            if i < len(self.activations):
                act = self.activations[i]
                jac = act.derivative(h).unsqueeze(-1) * jac
                h = act(h)
        return h, jac

    def _logdet_exact(self, x: Tensor, context: Tensor | None, weights: list[Tensor]) -> Tensor:
        _, jac = self._g_and_jacobian(x, context, weights)
        eye = torch.eye(self.features, dtype=x.dtype, device=x.device)
        # det(I + J) > 0 because every eigenvalue of J has modulus < 1.
        return torch.linalg.slogdet(eye + jac)[1]

    def _logdet_estimate(
        self,
        x: Tensor,
        context: Tensor | None,
        weights: list[Tensor],
        generator: torch.Generator | None,
    ) -> Tensor:
        need_graph = torch.is_grad_enabled() and (
            x.requires_grad
            or (context is not None and context.requires_grad)
            or any(p.requires_grad for p in self.parameters())
        )
        d = self.features
        flat = x.reshape(-1, d)
        ctx = None if context is None else context.reshape(-1, context.shape[-1])
        n = flat.shape[0]
        if n == 0:
            return x.new_zeros(x.shape[:-1])
        # Rademacher probe vectors: E[v v^T] = I (Hutchinson 1989).
        v = torch.randint(0, 2, (n, d), generator=generator, device=x.device).to(x.dtype) * 2 - 1
        # N = n_exact + G, G ~ Geometric(p) on {0, 1, ...}: P(G >= m) = (1 - p)^m, sampled
        # by inversion from U in (0, 1].
        uniform = 1.0 - torch.rand(n, generator=generator, device=x.device, dtype=x.dtype)
        extra = torch.floor(torch.log(uniform) / math.log1p(-self.geom_p))
        n_terms = self.n_exact_terms + extra
        k_max = int(n_terms.max().item())
        log_q = math.log1p(-self.geom_p)
        with torch.enable_grad():
            xin = (
                flat if (need_graph and flat.requires_grad) else flat.detach().requires_grad_(True)
            )
            gx = self._g(xin, ctx, weights)
            w = v
            total = x.new_zeros(n)
            for k in range(1, k_max + 1):
                # w <- w^T J: after k steps, w = v^T J^k (vector-Jacobian products).
                (w,) = torch.autograd.grad(gx, xin, w, create_graph=need_graph, retain_graph=True)
                # 1 / P(N >= k): 1 for the always-included terms.
                inv_prob = math.exp(-max(k - self.n_exact_terms, 0) * log_q)
                weight = (-1) ** (k + 1) / k * inv_prob
                total = total + weight * (w * v).sum(-1) * (k <= n_terms).to(x.dtype)
        if not need_graph:
            total = total.detach()
        return total.reshape(x.shape[:-1])

    def logabsdet(
        self,
        x: Tensor,
        context: Tensor | None = None,
        method: str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``log det(I + J_g(x))`` per sample, ``(*, D) -> (*)``, without updating buffers.

        Args:
            x: points ``(*, D)``.
            context: ``(*, C)`` or ``None``.
            method: ``"exact"`` or ``"estimate"``; default the block's own method.
            generator: RNG for the estimator (default: the global one).
        """
        lead, context = self.check_input(x, context)
        method = self.logdet_method if method is None else method
        weights = self._weights(update=False)
        if method == "exact":
            return self._logdet_exact(x, context, weights)
        if method == "estimate":
            return self._logdet_estimate(x, context, weights, generator)
        raise ValueError(f"method must be 'exact' or 'estimate', got {method!r}")

    def _logdet(self, x: Tensor, context: Tensor | None, weights: list[Tensor]) -> Tensor:
        if self.logdet_method == "exact":
            return self._logdet_exact(x, context, weights)
        generator = None
        if not self.training:
            generator = torch.Generator(device=x.device).manual_seed(self.eval_seed)
        return self._logdet_estimate(x, context, weights, generator)

    # -- the contract ---------------------------------------------------------------------
    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data -> noise: ``u = x + g(x)`` ``(*, D)`` and ``log det(I + J_g)`` ``(*)``."""
        lead, context = self.check_input(x, context)
        weights = self._weights(update=self.training)
        if self.logdet_method == "exact":
            gx, jac = self._g_and_jacobian(x, context, weights)
            eye = torch.eye(self.features, dtype=x.dtype, device=x.device)
            return x + gx, torch.linalg.slogdet(eye + jac)[1]
        return x + self._g(x, context, weights), self._logdet(x, context, weights)

    def _tol(self, dtype: torch.dtype) -> float:
        return _default_tol(dtype) if self.tol is None else self.tol

    def inverse(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Noise -> data by fixed-point iteration; returns ``x (*, D)`` and ``-logdet (*)``."""
        lead, context = self.check_input(u, context, inverse=True)
        weights = self._weights(update=False)
        tol = self._tol(u.dtype)
        with torch.no_grad():
            scale = tol * (1.0 + u.abs())
            x = u.detach().clone()
            converged = False
            for _ in range(self.max_iter):
                x_new = u - self._g(x, context, weights)
                # Stop on the change: with Lip(g) = L the error is <= change * L / (1 - L).
                done = bool(((x_new - x).abs() <= scale).all())
                x = x_new
                if done or not x.isfinite().all():
                    converged = done
                    break
        if not converged:
            warnings.warn(
                f"InvertibleResidual.inverse: fixed point not reached to tol={tol:g} in "
                f"max_iter={self.max_iter} steps (is Lip(g) close to 1? try a smaller "
                "coeff or a larger max_iter)",
                FixedPointWarning,
                stacklevel=2,
            )
        needs_grad = torch.is_grad_enabled() and (
            u.requires_grad
            or (context is not None and context.requires_grad)
            or any(p.requires_grad for p in self.parameters())
        )
        if needs_grad:
            x = self._implicit_step(u, context, weights, x, tol)
        return x, -self._logdet(x, context, weights)

    def _implicit_step(
        self, u: Tensor, context: Tensor | None, weights: list[Tensor], x_star: Tensor, tol: float
    ) -> Tensor:
        """Record ``x = u - g(x*)`` and give it the implicit-function gradient.

        From ``x = u - g(x, theta)``: ``(I + J_g) dx = du - dg/dtheta dtheta``. So an
        incoming gradient ``a`` on ``x`` must become ``b = (I + J_g)^{-T} a`` before it
        flows into ``u`` and ``theta`` through this one recorded step. ``b = a - J_g^T b``
        is a contraction too, solved by iteration (the deep-equilibrium trick).
        """
        leaf = x_star.detach().requires_grad_(True)
        gx = self._g(leaf, context, weights)
        x = u - gx
        max_iter = self.max_iter

        def hook(a: Tensor) -> Tensor:
            scale = tol * (1.0 + a.abs())
            b = a
            for _ in range(max_iter):
                (jtb,) = torch.autograd.grad(gx, leaf, b, retain_graph=True)
                b_new = a - jtb
                done = bool(((b_new - b).abs() <= scale).all())
                b = b_new
                if done:
                    return b
            warnings.warn(
                "InvertibleResidual.inverse: implicit gradient solve did not converge",
                FixedPointWarning,
                stacklevel=2,
            )
            return b

        x.register_hook(hook)
        return x


_RESIDUAL_OPTIONS = {
    "coeff": 0.97,
    "logdet": "auto",
    "num_hidden": 2,
    "activation": "lipswish",
    "n_power_iterations": 5,
    "tol": None,
    "max_iter": 1000,
    "exact_max_dim": 16,
    "n_exact_terms": 2,
    "geom_p": 0.5,
    "eval_seed": 0,
    "permute": "none",
}


def build_residual(
    features: int,
    num_layers: int,
    hidden: int,
    context_features: int = 0,
    **options: object,
) -> Transform:
    """A stack of ``num_layers`` :class:`InvertibleResidual` blocks (a residual flow).

    No ActNorm between blocks (Chen et al. interleave it; here every layer must start as
    the identity and carry no data-dependent state).

    Args:
        features: ``D`` (vectors only).
        num_layers: number of residual blocks.
        hidden: hidden width of each block's ``g``.
        context_features: context width (0: unconditional).
        **options:
            coeff (float, 0.97): spectral-norm bound per linear layer.
            logdet (str, "auto"): "auto" | "exact" | "estimate" (see InvertibleResidual).
            num_hidden (int, 2): hidden layers per ``g``.
            activation (str, "lipswish"): "lipswish" | "elu" | "tanh".
            n_power_iterations (int, 5): power-iteration steps per training forward.
            tol (float | None, None): fixed-point tolerance (None: by dtype).
            max_iter (int, 1000): fixed-point iteration cap.
            exact_max_dim (int, 16): "auto" uses the exact log-det up to this ``D``.
            n_exact_terms (int, 2), geom_p (float, 0.5): Russian-roulette settings.
            eval_seed (int, 0): estimator seed in eval mode.
            permute (str, "none"): "none" or "reverse" (a feature reversal between blocks).

    Returns:
        A :class:`~vaeflow.flows.base.Composite`, identity at initialisation.

    Raises:
        TypeError: for an unknown option (named in the message).
    """
    unknown = sorted(set(options) - set(_RESIDUAL_OPTIONS))
    if unknown:
        raise TypeError(
            f"build_residual: unknown option(s) {unknown}; valid: {sorted(_RESIDUAL_OPTIONS)}"
        )
    if not isinstance(features, int):
        raise ValueError(f"build_residual: features must be an int D, got {features!r}")
    if num_layers < 1:
        raise ValueError(f"build_residual: num_layers must be >= 1, got {num_layers}")
    opts = {**_RESIDUAL_OPTIONS, **options}
    permute = opts.pop("permute")
    if permute not in ("none", "reverse"):
        raise ValueError(f"build_residual: permute must be 'none' or 'reverse', got {permute!r}")
    layers: list[Transform] = []
    for i in range(num_layers):
        layers.append(InvertibleResidual(features, hidden, context_features, **opts))
        if permute == "reverse" and i < num_layers - 1:
            layers.append(ReversePermutation(features))
    return Composite(layers)
