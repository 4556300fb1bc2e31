"""``train.compile_step``: the whole update of :mod:`vaeflow.run.step` -- forward, loss,
backward, clipping, skip decision, optimiser, EMA -- as one ``torch.compile``d graph (a
CUDA graph on CUDA), and the host-side learning rates its checkpoints are written with."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..config import ConfigError, TrainConfig
from ..models.bounds import Terms
from ..models.vae import VAE, _data_validation_off
from .distributed import _Dist
from .ema import EMA
from .optim import IWAEAdam, init_state, update_unless
from .step import StepResult, _skip_code, _step_schedule, training_loss


class _CompiledStep:
    """``train.compile_step``: one update -- forward, loss, backward, gradient norm and
    clipping, skip decision, Adam, EMA -- as one ``torch.compile``d function, then the
    schedule step. Called as ``step(x, beta, frozen)`` in place of :func:`_update_step`
    (the same arguments' meaning; the same :class:`StepResult` as under ``sync_free``).

    What lets it compile once and then only replay:

    - the learning rates are float64 0-d tensors in the param groups, on the device (the
      schedule fills them in place: ``LRScheduler`` does so for tensor learning rates),
      and the KL weight is a 0-d tensor filled before each call: values the graph reads,
      not constants it would be specialised on (and recompiled for at every step);
    - batches have one shape (``TrainBatches`` drops each epoch's ragged last batch; the
      function is compiled with ``dynamic=False``, so another shape would recompile);
    - nothing is read on the host: the skip decision is :func:`_skip_code`'s device
      tensor, applied by masking (:func:`~vaeflow.run.optim.update_unless`,
      :meth:`EMA.update_masked`); the gradients are clipped functionally;
    - the optimiser's state exists before the first call
      (:func:`~vaeflow.run.optim.init_state`: zero moments, step counts on the device),
      so the first step is like any other and a skipped first step needs no host read.
      A parameter not updated yet (the first steps, a delayed prior) holds zero state
      instead of none: the same updates, a slightly different checkpoint.

    One graph: the gradients come from ``torch.autograd.grad``, which dynamo traces
    under its ``trace_autograd_ops`` setting (set for these calls only), so the backward
    is in the same graph as the forward and the update (``loss.backward()`` would be a
    graph break, and ``.grad`` is not used: ``zero_grad`` is not needed either). On CUDA
    the graph is captured as a CUDA graph (inductor's ``triton.cudagraphs``, what
    ``mode="reduce-overhead"`` sets): a step is one graph replay plus the eager KL-weight
    fill and schedule step. The tensors the update writes (optimiser state, EMA average and
    count) and the rates it reads are marked static, so that the CUDA graph reads and
    writes them in place. The CUDA path has not been run on a GPU yet
    (``benchmarks/gpu_check.py`` compares it with the eager step). A torch without
    ``trace_autograd_ops`` breaks the graph at the gradient (two graphs; same results).

    Randomness: inductor's ``fallback_random`` draws the posterior noise from torch's
    generator as eager code does, so a compiled run takes the same steps as an eager run
    of the same seed, to float rounding, and resumes from the checkpoint's RNG state.

    Keep the object for the run: it holds the optimiser's and the EMA's tensors as they
    are when it is built (after any resume).
    """

    def __init__(
        self,
        model: VAE,
        opt: torch.optim.Optimizer,
        sched: torch.optim.lr_scheduler.LRScheduler,
        ema: EMA | None,
        t: TrainConfig,
        device: torch.device,
        frozen: Sequence[Tensor] = (),
    ) -> None:
        if not isinstance(opt, torch.optim.Adam | torch.optim.Adamax | IWAEAdam):
            raise ConfigError(
                "train.compile_step needs train.optimizer = 'adam', 'adam_normgrad', "
                "'adam_iwae', 'adamax' or "
                f"'adamax_iaf', got {type(opt).__name__}"
            )
        self.model, self.opt, self.sched, self.ema, self.t = model, opt, sched, ema, t
        init_state(opt)
        for group in opt.param_groups:  # filled in place by the schedule from now on
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float64, device=device)
        dtype = next(model.parameters()).dtype
        self._beta = torch.zeros((), dtype=dtype, device=device)
        frozen_ids = {id(p) for p in frozen}
        self._groups = [[p for p in g["params"] if p.requires_grad] for g in opt.param_groups]
        self._unfrozen = [[p for p in ps if id(p) not in frozen_ids] for ps in self._groups]
        self._ema_live: list[Tensor] = []
        static = [v for state in opt.state.values() for v in state.values() if torch.is_tensor(v)]
        static += [g["lr"] for g in opt.param_groups] + [self._beta]
        if ema is not None:
            static += [*ema.shadow.values(), ema.count_on(device)]
            self._ema_live = ema.live_tensors(model)
        for v in static:  # a guard on each address: a replaced tensor recompiles
            torch._dynamo.mark_static_address(v, guard=True)
        self._cuda_graphs = device.type == "cuda"
        options = {"fallback_random": True}
        if self._cuda_graphs:
            options["triton.cudagraphs"] = True  # mode="reduce-overhead" (not both allowed)
        self._compiled = torch.compile(self._step, dynamic=False, options=options)
        config = torch._dynamo.config
        self._tracing = (
            config.patch(trace_autograd_ops=True)
            if hasattr(config, "trace_autograd_ops")
            else contextlib.nullcontext()
        )

    def __call__(self, x: Tensor, beta: float, frozen: bool = False) -> StepResult:
        """One update on the full batch ``x`` with KL weight ``beta``; ``frozen``: leave
        the delayed prior out (``step < train.prior_freeze_steps``)."""
        self._beta.fill_(beta)
        if self._cuda_graphs:  # the previous step's outputs are no longer needed
            torch.compiler.cudagraph_mark_step_begin()
        with self._tracing:
            loss, terms, norm, code = self._compiled(x, frozen)
        _step_schedule(self.sched)
        return StepResult(loss, terms, norm, beta, None, code)

    def _step(self, x: Tensor, frozen: bool) -> tuple[Tensor, Terms, Tensor, Tensor]:
        # Training batches are valid by construction (as under sync_free): no data check.
        with _data_validation_off(self.model.likelihood):
            terms = self.model(x, k=self.t.k)
        loss = training_loss(terms, self.t, self._beta, self.model.latent_dim)
        groups = self._unfrozen if frozen else self._groups
        flat = torch.autograd.grad(loss, sum(groups, []), allow_unused=True)
        params, grads, i = [], [], 0
        for ps in groups:  # per param group; a parameter the loss does not use: no update
            pairs = [
                (p, g) for p, g in zip(ps, flat[i : i + len(ps)], strict=True) if g is not None
            ]
            params.append([p for p, _ in pairs])
            grads.append([g for _, g in pairs])
            i += len(ps)
        norm, code = self._update(loss.detach(), params, grads)
        # Detached: tensors still holding the consumed autograd graph would end the graph.
        return loss.detach(), _detached(terms), norm, code

    @torch.no_grad()
    def _update(
        self, loss: Tensor, params: list[list[Tensor]], grads: list[list[Tensor]]
    ) -> tuple[Tensor, Tensor]:
        # Under no_grad: with torch 2.14 a prototype that wrote the parameters through
        # .detach() aliases with grad mode on was miscompiled silently (a parameter
        # overwritten by a step count).
        # As clip_grad_norm_: the norm of the per-tensor norms, one clipping coefficient.
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(sum(grads, []))))
        if self.t.clip_norm is not None:
            coef = torch.clamp(self.t.clip_norm / (norm + 1e-6), max=1.0)
            grads = [[g * coef for g in gs] for gs in grads]
        code = _skip_code(loss, norm, self.t.skip_grad_norm, _Dist())
        skip = code != 0
        update_unless(self.opt, params, grads, skip)
        if self.ema is not None:
            self.ema.update_masked(self._ema_live, skip)
        return norm, code


def _detached(terms: Terms) -> Terms:
    """``terms`` without their autograd history (for logging)."""

    def detach(v: Any) -> Any:
        if isinstance(v, tuple):
            return tuple(t.detach() for t in v)
        return None if v is None else v.detach()

    return Terms(**{f.name: detach(getattr(terms, f.name)) for f in dataclasses.fields(terms)})


def _host_lrs(state: dict[str, Any]) -> dict[str, Any]:
    """An optimiser's or schedule's ``state_dict`` with its learning rates as Python floats
    (``train.compile_step`` holds them as device tensors): checkpoints look the same
    whichever step wrote them, and resume under either (one host read per rate, at
    checkpoints only)."""

    def plain(v: Any) -> Any:
        return float(v) if torch.is_tensor(v) else v

    state = dict(state)
    if "param_groups" in state:
        state["param_groups"] = [
            {k: plain(v) if k in ("lr", "initial_lr") else v for k, v in group.items()}
            for group in state["param_groups"]
        ]
    for key in ("base_lrs", "_last_lr"):
        if key in state:
            state[key] = [plain(v) for v in state[key]]
    return state
