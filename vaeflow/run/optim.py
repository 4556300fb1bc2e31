"""Optimisers that papers used and torch does not ship.

:class:`AdamNormGrad` is the optimiser of Tomczak & Welling's VampPrior code (their
``utils/optimizer.py``): Adam applied to gradients that are first rescaled to unit L2 norm,
one parameter tensor at a time. It makes every tensor's step size independent of its
gradient's scale (the 500 x 784 pseudo-input matrix of a VampPrior moves like any other
tensor), which is a different dynamic from plain Adam at the same learning rate — so a
reproduction of that paper uses it.

:class:`IWAEAdam` is the Adam of Burda et al.'s IWAE code (their ``optimizers.py``), which
differs from torch's in three ways that change training, not just rounding: the second
moment starts at a configurable value instead of 0 (the code: 1), epsilon is added to
``sqrt(v)`` without a bias correction, and each update uses the moments *before* the
current gradient (Theano evaluates all updates of a step from the old values, so the
current gradient enters the moments only and moves the weights one step later).

:class:`IAFAdamax` is the AdaMax of Kingma et al.'s IAF code: torch's Adamax without the
bias correction of the first moment, which makes its first ~20 updates a warm-up.

:func:`update_unless` is Adam's (either Adam's) or Adamax's update written in plain
tensor operations, applied unless a device flag says skip: the optimiser step of the
compiled training step (``train.compile_step``), where torch's fused kernel cannot go;
:func:`init_state` creates their state before the first step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

#: a hyperparameter: a number, a 0-d tensor, or one value per stacked run (``(N, 1, ..., 1)``)
Scalar = float | Tensor

#: ``(parts, dim)``: a parameter that holds ``parts`` tensors of the reference code side by
#: side, as equal slices along ``dim`` (a gated layer's value and gate, a Gaussian head's
#: mean and scale; :func:`vaeflow.layers.fused_parameters`)
Split = tuple[int, int]

__all__ = [
    "AdamNormGrad",
    "IAFAdamax",
    "IWAEAdam",
    "NORMGRAD_EPS",
    "Split",
    "init_state",
    "masked_update",
    "split_normalised",
    "split_of",
    "update_unless",
]

#: added to each gradient's norm before dividing (the VampPrior code's constant)
NORMGRAD_EPS = 1e-7


def _closure_loss(closure: Callable[[], float] | None) -> float | None:
    """``optimizer.step(closure)``'s contract: re-evaluate the loss with gradients on."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class AdamNormGrad(torch.optim.Adam):
    """Adam on per-tensor normalised gradients: ``g <- g / (||g||_2 + 1e-7)``, then Adam.

    The gradients are rescaled in place before the update (after any clipping, which
    then has no effect on the direction and none on the size), so a caller that reads
    ``p.grad`` after :meth:`step` sees the normalised gradient. Everything else — state,
    ``state_dict``, fused/foreach kernels, weight decay (applied by Adam after the
    rescaling, as in the reference code) — is :class:`torch.optim.Adam`'s.

    The reference code normalises each of *its* tensors; where vaeflow fuses several of
    them into one parameter (a gated layer's value and gate, a Gaussian head's mean and
    scale: one matmul instead of two), ``splits`` maps such a parameter to ``(parts,
    dim)``, and each of its ``parts`` slices along ``dim`` is normalised by its own norm,
    exactly as the separate tensors would be (``train.normgrad_split``). The splits are
    not part of ``state_dict``: they follow from the model and the config.

    Args:
        params: as :class:`torch.optim.Adam`.
        splits: parameter -> :data:`Split`, for parameters of ``params``; ``dim`` must
            divide into ``parts`` equal slices.
        **kwargs: :class:`torch.optim.Adam`'s.

    References:
        Tomczak & Welling 2018, "VAE with a VampPrior", AISTATS, arXiv:1705.07120 (code:
        jmtomczak/vae_vampprior, ``AdamNormGrad``).
    """

    def __init__(
        self,
        params: Iterable,
        *args: object,
        splits: Mapping[Tensor, Split] | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(params, *args, **kwargs)
        own = {p for group in self.param_groups for p in group["params"]}
        self._splits: dict[Tensor, Split] = {}
        for p, (parts, dim) in (splits or {}).items():
            if p not in own:
                raise ValueError("AdamNormGrad splits: a parameter that is not optimised here")
            if parts < 1 or not 0 <= dim < p.dim() or p.shape[dim] % parts:
                raise ValueError(
                    f"AdamNormGrad splits: a parameter of shape {tuple(p.shape)} does not "
                    f"split into {parts} equal parts along dim {dim}"
                )
            if parts > 1:
                self._splits[p] = (int(parts), int(dim))

    def split_of(self, p: Tensor) -> Split | None:
        """``p``'s :data:`Split`, or ``None``: normalised as one tensor."""
        return self._splits.get(p)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # noqa: D102
        loss = _closure_loss(closure)
        params = [p for group in self.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None and p not in self._splits]
        if grads:
            norms = torch._foreach_norm(grads)
            torch._foreach_add_(norms, NORMGRAD_EPS)
            torch._foreach_div_(grads, norms)
        for p in params:
            if p.grad is not None and p in self._splits:
                p.grad.copy_(split_normalised(p.grad, *self._splits[p]))
        super().step()
        return loss


def split_of(opt: torch.optim.Optimizer, p: Tensor) -> Split | None:
    """How ``opt`` cuts ``p`` for its update: :meth:`AdamNormGrad.split_of` for
    AdamNormGrad, ``None`` (one tensor) for every other optimiser."""
    return opt.split_of(p) if isinstance(opt, AdamNormGrad) else None


def split_normalised(grad: Tensor, parts: int, dim: int, lead: int = 0) -> Tensor:
    """``grad`` with each of its ``parts`` equal slices along ``dim`` divided by its own
    L2 norm (+ :data:`NORMGRAD_EPS`), as :class:`AdamNormGrad` treats separate tensors.

    ``lead``: leading dimensions kept apart, each index its own tensor (1 for the stacked
    runs' ``(N, *shape)``, where ``dim`` counts within ``shape``).
    """
    d = dim + lead
    shape = grad.shape
    g = grad.reshape(*shape[:d], parts, shape[d] // parts, *shape[d + 1 :])
    kept = {*range(lead), d}
    dims = tuple(i for i in range(g.dim()) if i not in kept)
    norm = torch.linalg.vector_norm(g, dim=dims, keepdim=True)
    return (g / (norm + NORMGRAD_EPS)).reshape(shape)


class IWAEAdam(torch.optim.Optimizer):
    """Adam as Burda et al.'s IWAE code implements it (``optimizers.py``), for minimisation.

    With ``t`` the number of updates so far plus one (the code's ``timestep``, which
    starts at 1), gradient ``g``, and moments ``m`` (starting at 0) and ``v`` (starting
    at ``initial_second_moment``)::

        p <- p - lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps)
        m <- beta1 m + (1 - beta1) g
        v <- beta2 v + (1 - beta2) g^2

    all from the values before the step: the weights move with the moments of the
    gradients up to the previous step (so the first update is zero), and ``eps`` is not
    bias-corrected. The code's defaults are ``betas = (0.99, 0.999)``, ``eps = 1e-4`` and
    ``v`` starting at 1, on the gradient of the *sum* of the bound over a batch; for a
    loss that is the batch *mean* (vaeflow's), the same dynamics need ``eps / B`` and an
    initial second moment ``1 / B^2`` (every quantity in the update scales with the
    gradient, so the trajectories are identical). Starting ``v`` at ``1 / B^2`` rather
    than 0 makes the early steps small until the gradients' own second moment takes
    over (time constant ``1 / (1 - beta2)`` = 1000 steps): without it, beta1 = 0.99
    with a zero-started ``v`` drove the IWAE architecture into a collapsed posterior
    within the first few thousand steps in vaeflow's runs (experiments/burda2016_iwae).

    State per parameter: ``step`` (0-d float32, updates so far), ``exp_avg`` (``m``),
    ``exp_avg_sq`` (``v``), as torch's Adam names them.

    References:
        Burda, Grosse & Salakhutdinov 2016, "Importance Weighted Autoencoders",
        arXiv:1509.00519 (code: github.com/yburda/iwae, ``optimizers.py``).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.99, 0.999),
        eps: float = 1e-4,
        initial_second_moment: float = 1.0,
    ) -> None:
        if lr < 0 or eps < 0 or initial_second_moment < 0:
            raise ValueError(
                f"IWAEAdam: lr, eps and initial_second_moment must be >= 0, got {lr}, {eps} "
                f"and {initial_second_moment}"
            )
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"IWAEAdam: betas must be in [0, 1), got {betas}")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "initial_second_moment": initial_second_moment,
            "weight_decay": 0.0,
            "maximize": False,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # noqa: D102
        loss = _closure_loss(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    _init_iwae_state(state, p, group["initial_second_moment"])
                _iwae_update(p, p.grad, state, group["lr"], beta1, beta2, group["eps"])
        return loss


def _init_iwae_state(state: dict, p: Tensor, v0: float) -> None:
    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.full_like(p, v0, memory_format=torch.preserve_format)


def _iwae_new_values(
    p: Tensor, grad: Tensor, state: dict, lr, beta1: Scalar, beta2: Scalar, eps: Scalar
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:class:`IWAEAdam`'s new ``(p, m, v, step)`` from the old ones (nothing written)."""
    step, m_old, v_old = state["step"], state["exp_avg"], state["exp_avg_sq"]
    t = step.double() + 1  # the code's timestep before its increment
    alpha = _like(lr * (1 - beta2**t).sqrt() / (1 - beta1**t), p)
    new_p = p - (alpha * m_old / (v_old.sqrt() + _like(eps, p))).to(p.dtype)
    m = m_old.lerp(grad, _like(1 - beta1, p))
    v = _second_moment(v_old, grad, beta2)
    return new_p, m, v, step + 1


def _iwae_update(
    p: Tensor, grad: Tensor, state: dict, lr, beta1: float, beta2: float, eps: float
) -> None:
    new_p, m, v, new_step = _iwae_new_values(p, grad, state, lr, beta1, beta2, eps)
    p.copy_(new_p)
    state["exp_avg"].copy_(m)
    state["exp_avg_sq"].copy_(v)
    state["step"].copy_(new_step)


#: Per-parameter state tensors shaped like the parameter, by optimiser (torch's names).
class IAFAdamax(torch.optim.Adamax):
    """AdaMax as Kingma et al.'s IAF code writes it: torch's Adamax rule
    (``exp_inf = max(beta2 exp_inf, |g| + eps)``, ``exp_avg`` the first moment) without the
    bias correction of the first moment, so the step is ``lr * exp_avg / exp_inf``.

    This changes training, not rounding: torch's first update moves every parameter by
    ``lr * sign(g)``, the code's by a tenth of that (``exp_avg = (1 - beta1) g``), growing
    to the full rate over the first ~20 updates -- a built-in warm-up. In vaeflow's MNIST
    runs the depth 8, width 1920 IAF posterior (Kingma et al. 2016, Table 1) blew up
    within its first 10 bias-corrected updates (KL 27 -> 110 nats, gradient norm 2e4)
    and never recovered; depth 2 and width 320 did not (experiments/kingma2016_iaf).
    The code's initial ``exp_inf`` of 1e-8 instead of 0 makes no difference (``|g| + eps``
    enters the first maximum).

    References:
        Kingma et al. 2016, arXiv:1606.04934; their Theano code's ``AdaMaxAvg``
        (``alpha = 0.002``, ``beta1 = 0.1``, ``beta2 = 0.001`` in its notation: the
        complements of torch's betas), whose parameter average is vaeflow's EMA.
    """

    def __init__(
        self,
        params,
        lr: float = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter that has a gradient (:func:`masked_update`,
        rule ``"adamax_iaf"``); state as torch's Adamax keeps it."""
        loss = _closure_loss(closure)
        for group in self.param_groups:
            _check_group(group)
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    _fresh_state(state, p, ("exp_avg", "exp_inf"), fused=False)
                masked_update(
                    "adamax_iaf", p, p.grad, state["step"], state["exp_avg"],
                    state["exp_inf"], group["lr"], beta1, beta2, group["eps"],
                    group["weight_decay"], None,
                )  # fmt: skip
        return loss


_MOMENTS = {
    IWAEAdam: ("exp_avg", "exp_avg_sq"),
    IAFAdamax: ("exp_avg", "exp_inf"),
    torch.optim.Adam: ("exp_avg", "exp_avg_sq"),
    torch.optim.Adamax: ("exp_avg", "exp_inf"),
}


def _moments(opt: torch.optim.Optimizer) -> tuple[str, str]:
    for cls, names in _MOMENTS.items():
        if isinstance(opt, cls):
            return names
    raise ValueError(
        f"update_unless implements Adam, AdamNormGrad, IWAEAdam, Adamax and IAFAdamax, got "
        f"{type(opt).__name__}"
    )


def init_state(opt: torch.optim.Optimizer) -> None:
    """Give every parameter of ``opt`` (Adam, AdamNormGrad, IWAEAdam or Adamax) without
    state the state its first update creates -- zero moments (IWAEAdam: its initial second
    moment) and a 0-d step count (float32; float64 where torch's step makes it so) --
    with the step count on the parameter's device
    (as torch keeps it for fused and capturable optimisers; existing CPU step counts are
    moved there too), so that :func:`update_unless` can run as one device graph from the
    first step on. A
    checkpoint of such state resumes under ``opt.step()`` as well (``load_state_dict``
    puts each step count where that optimiser wants it)."""
    names = _moments(opt)
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            if not state and isinstance(opt, IWAEAdam):
                _init_iwae_state(state, p, group["initial_second_moment"])
            elif not state:
                _fresh_state(state, p, names, fused=bool(group.get("fused")))
            elif state["step"].device != p.device:
                state["step"] = state["step"].to(p.device)


def _fresh_state(state: dict, p: Tensor, names: Sequence[str], fused: bool) -> None:
    """Zero moments ``names`` and a 0-d step count on ``p``'s device: float32, or float64
    under a float64 default dtype unless fused (torch's own choice,
    ``optimizer._get_scalar_dtype``), so the state equals what ``opt.step()`` makes."""
    wide = torch.get_default_dtype() == torch.float64 and not fused
    dtype = torch.float64 if wide else torch.float32
    state["step"] = torch.zeros((), dtype=dtype, device=p.device)
    for name in names:
        state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)


@torch.no_grad()
def update_unless(
    opt: torch.optim.Optimizer,
    params: Sequence[Sequence[Tensor]],
    grads: Sequence[Sequence[Tensor]],
    skip: Tensor,
) -> None:
    """The update of ``opt`` (Adam, :class:`AdamNormGrad`, :class:`IWAEAdam` or Adamax) to
    ``params`` with
    ``grads`` (one list of each per param group), in plain tensor operations, applied only
    where the 0-d bool ``skip`` is false.

    The same rules as ``opt.step()``: :class:`torch.optim.Adam` with L2 weight decay
    (added to the gradient), no ``amsgrad``, ``maximize`` or decoupled decay;
    :class:`IWAEAdam`'s lagged update (its own rule, no weight decay);
    :class:`AdamNormGrad` divides each gradient by its norm (+ :data:`NORMGRAD_EPS`)
    first; :class:`torch.optim.Adamax` (``exp_inf = max(beta2 exp_inf, |g| + eps)``, step
    ``lr / (1 - beta1^t) * exp_avg / exp_inf``). Bias corrections are computed in float64
    from the step count (as torch's fused Adam kernel does), so results differ from
    ``opt.step()`` by float rounding only. It reads and writes ``opt``'s own state, which
    must exist for every parameter (:func:`init_state`); checkpoints interchange with
    ``opt.step()``. The learning rate may be a 0-d tensor (a schedule then changes it
    without recompiling). A skipped update leaves parameters, moments and step counts as
    they were, as the fused kernel does under ``found_inf``; no value is read on the
    host; the gradients are not modified.

    Why not ``opt.step()``: under ``torch.compile`` dynamo does not trace into the fused
    Adam kernel (torch 2.14 marks it ``torch.compiler.disable``, and called directly its
    tensor-lr variant has no meta kernel), and only the fused kernel takes a skip flag.
    Written per tensor, the update compiles into a few fused loops (the optimiser step of
    ``train.compile_step``).

    Args:
        opt: the optimiser whose hyperparameters (``lr``, ``betas``, ``eps``,
            ``weight_decay``, per param group) and state are used.
        params: per param group, the parameters to update.
        grads: per param group, their gradients (clipped), same order.
        skip: 0-d bool tensor on the parameters' device: true leaves everything as it was.
    """
    first, second = _moments(opt)
    kind = _kind(opt)
    for group, group_params, group_grads in zip(opt.param_groups, params, grads, strict=True):
        _check_group(group)
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        for p, grad in zip(group_params, group_grads, strict=True):
            state = opt.state[p]
            split = split_of(opt, p)
            masked_update(
                kind, p, grad, state["step"], state[first], state[second],
                lr, beta1, beta2, eps, weight_decay, skip, norm_split=split,
            )  # fmt: skip


def _kind(opt: torch.optim.Optimizer) -> str:
    """Which update rule of :func:`masked_update` ``opt`` follows."""
    _moments(opt)  # raises for an optimiser this module does not implement
    if isinstance(opt, IWAEAdam):
        return "iwae"
    if isinstance(opt, AdamNormGrad):
        return "normgrad"
    if isinstance(opt, IAFAdamax):
        return "adamax_iaf"
    return "adamax" if isinstance(opt, torch.optim.Adamax) else "adam"


def _check_group(group: dict) -> None:
    if group.get("amsgrad") or group["maximize"] or group.get("decoupled_weight_decay"):
        raise ValueError(
            "update_unless implements these optimisers without amsgrad, maximize or "
            "decoupled weight decay"
        )


@torch.no_grad()
def masked_update(
    kind: str,
    p: Tensor,
    grad: Tensor,
    step: Tensor,
    m_old: Tensor,
    v_old: Tensor,
    lr: Scalar,
    beta1: Scalar,
    beta2: Scalar,
    eps: Scalar,
    weight_decay: Scalar,
    skip: Tensor | None,
    norm_dims: tuple[int, ...] | None = None,
    norm_split: Split | None = None,
) -> None:
    """One tensor's update by rule ``kind`` (``"adam"``, ``"normgrad"``, ``"iwae"``,
    ``"adamax"``, ``"adamax_iaf"``: see :func:`update_unless` and :class:`IAFAdamax`),
    written in place into ``p``, the moments ``m_old`` / ``v_old`` and the step count
    ``step`` except where ``skip`` is true
    (``None``: nowhere, known on the host; saves the masking passes).

    Every hyperparameter and ``step`` may be a float / 0-d tensor (one run) or a tensor
    that broadcasts against ``p`` with ``skip`` alike: the stacked runs of
    :mod:`vaeflow.run.stack_optim` update parameters ``(N, *shape)`` with per-run
    hyperparameters, step counts and skip flags of shape ``(N, 1, ..., 1)``.
    ``norm_dims``: the dimensions of one run's tensor (``"normgrad"`` divides each run's
    gradient by its own norm; ``None``: all; ``()``: each element is a run's tensor).
    ``norm_split``: ``"normgrad"`` of a fused parameter (:class:`AdamNormGrad`'s
    ``splits``): each slice normalised by its own norm (``dim`` within one run's tensor).
    Per-run tensors may be float64 (bias corrections are computed in float64); the
    elementwise arithmetic is in ``p``'s dtype, as alone.
    """
    if kind == "normgrad" and norm_split is not None:
        lead = 0 if norm_dims is None else p.dim() - len(norm_dims)  # the run dimension
        grad = split_normalised(grad, *norm_split, lead=lead)
    elif kind == "normgrad":
        if norm_dims == ():  # one number per run: its norm is its size
            norm = grad.abs()
        else:
            norm = torch.linalg.vector_norm(grad, dim=norm_dims, keepdim=norm_dims is not None)
        grad = grad / (norm + NORMGRAD_EPS)
    if kind != "iwae" and not (isinstance(weight_decay, float | int) and weight_decay == 0):
        grad = grad + _like(weight_decay, p) * p  # IWAEAdam has none (its step ignores it)
    if kind == "iwae":
        state = {"step": step, "exp_avg": m_old, "exp_avg_sq": v_old}
        new_p, m, v, new_step = _iwae_new_values(p, grad, state, lr, beta1, beta2, eps)
    else:
        new_step = step + 1
        n = new_step.double()
        m = m_old.lerp(grad, _like(1 - beta1, p))
        if kind == "adamax_iaf":  # the IAF code's AdaMax: no bias correction
            step_size = _like(lr, p)
        else:
            step_size = _like(lr / (1 - beta1**n), p)  # bias corrections in float64
        if kind in ("adamax", "adamax_iaf"):
            v = torch.maximum(v_old * _like(beta2, p), grad.abs() + _like(eps, p))
            new_p = p - step_size * m / v
        else:
            v = _second_moment(v_old, grad, beta2)
            denom = v.sqrt() / _like((1 - beta2**n).sqrt(), p) + _like(eps, p)
            new_p = p - step_size * m / denom
    for old, new in ((p, new_p), (m_old, m), (v_old, v), (step, new_step)):
        old.copy_(new if skip is None else torch.where(skip, old, new))


def _like(x: Scalar, p: Tensor) -> Scalar:
    """A per-run factor ``x`` (float64 bias corrections) in ``p``'s dtype, so that a float32
    stack computes in float32 as each run alone does; numbers and 0-d tensors unchanged
    (they do not promote ``p``)."""
    return x.to(p.dtype) if isinstance(x, Tensor) and x.dim() > 0 else x


def _second_moment(v_old: Tensor, grad: Tensor, beta2: Scalar) -> Tensor:
    """``beta2 v + (1 - beta2) g^2`` (one fused op where ``beta2`` is a number). A per-run
    ``beta2`` tensor (float64) gives ``1 - beta2`` in float64 before the cast to ``v``'s
    dtype, as a number does (in float32, 1 - 0.999 computed after the cast is off by
    1e-5 relative)."""
    if isinstance(beta2, Tensor) and beta2.dim() > 0:
        return torch.addcmul(v_old * _like(beta2, v_old), grad, grad * _like(1 - beta2, v_old))
    return v_old.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
