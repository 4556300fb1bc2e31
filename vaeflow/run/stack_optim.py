"""One optimiser update for all runs of a stack (:mod:`vaeflow.run.stack`).

Each run of a stack keeps its own solo optimiser (its ``state_dict`` is what its
checkpoint holds, its ``LambdaLR`` sets its learning rate), but calling ``N`` optimisers
one after another costs ``N`` times their per-tensor work: at batch 20 the Burda-size
model's update was 55 % of a 16-run stacked step with Burda's ``adam_iwae`` (a Python
loop over tensors; ``benchmarks/stack.py``). :class:`StackedOptimizer` makes the update
one batched computation, in the stack's own style:

* **The state is stacked, and each run's state is views of it.** Moment ``key`` of
  parameter ``name`` of all runs is one tensor ``(N, *shape)`` laid out like the stacked
  parameter, its step counts one ``(N,)`` tensor (as ``init_state`` makes them); run
  ``r``'s optimiser state holds row ``r`` of each. The batched update writes the rows
  in place, so each run's optimiser always holds its own state as alone, and its
  checkpoint saves it (:meth:`StackedOptimizer.alone` gives it copies for the save).
* **Per-run hyperparameters** (learning rate from the run's schedule, betas, eps, weight
  decay: :data:`~vaeflow.run.stack.STACKABLE_KEYS` lets them differ) are read from each
  run's param group every step and broadcast as ``(N, 1, ..., 1)`` tensors; each run's
  skip decision masks its rows (a skipped run's parameters, moments and step count stay
  as they were, as alone, where its optimiser does not step).
* **The same rule as alone**: :func:`vaeflow.run.optim.masked_update`, the update of
  ``update_unless`` (the compiled step's), for torch's Adam, :class:`AdamNormGrad`
  (each run's gradient tensor, or each slice of one split under ``train.normgrad_split``,
  divided by its own norm), :class:`IWAEAdam` and Adamax:
  equal to each run's ``opt.step()`` to float rounding (bias corrections in float64, as
  torch's fused kernel; ``tests/test_stack.py`` compares stacked and solo training in
  float64). Any other optimiser (RMSprop) steps run by run, as before
  (:func:`supported`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .optim import Split, _check_group, _kind, _moments, init_state, masked_update, split_of

__all__ = ["StackedOptimizer", "supported"]


def supported(opts: Sequence[torch.optim.Optimizer]) -> bool:
    """Whether :class:`StackedOptimizer` implements these runs' optimisers: all of one
    class that :func:`~vaeflow.run.optim.masked_update` implements, one param group each,
    no amsgrad, maximize or decoupled weight decay, the same AdamNormGrad splits."""
    if len({type(o) for o in opts}) != 1:
        return False
    try:
        _kind(opts[0])
        for o in opts:
            if len(o.param_groups) != 1:
                return False
            _check_group(o.param_groups[0])
    except ValueError:
        return False
    # one batched rule: every run cuts its parameters into the same tensors
    return len({tuple(_splits(o)) for o in opts}) == 1


def _splits(opt: torch.optim.Optimizer) -> list[Split | None]:
    """AdamNormGrad's split of each parameter, in order (others: none)."""
    params = [p for group in opt.param_groups for p in group["params"]]
    return [split_of(opt, p) for p in params]


class StackedOptimizer:
    """The runs' optimisers as one batched update of the stacked parameters.

    Args:
        opts: each run's optimiser (:func:`supported`), in stack order.
        models: each run's parameters by name (its module's ``named_parameters``), the
            tensors its optimiser holds.
        params: the stacked parameters, ``params[name]`` of shape ``(N, *shape)``.
        compiled: run the update as one ``torch.compile`` graph (the stack's
            ``train.compile_step``); when runs leave, the stack resets the compiler and
            it compiles afresh (never piling up recompilations to dynamo's limit).

    Creates each run's missing state as its first ``opt.step()`` would
    (:func:`~vaeflow.run.optim.init_state`), then stacks it.
    """

    def __init__(
        self,
        opts: Sequence[torch.optim.Optimizer],
        models: Sequence[Mapping[str, nn.Parameter]],
        params: Mapping[str, Tensor],
        compiled: bool = False,
    ) -> None:
        self.compiled = compiled
        self.opts = list(opts)
        self.models = list(models)
        self.kind = _kind(self.opts[0])
        self.keys = _moments(self.opts[0])
        # AdamNormGrad's fused parameters (train.normgrad_split): the same in every run
        # (supported() checks), so the first run's hold for all.
        first = self.opts[0]
        self.splits: dict[str, Split | None] = {
            name: split_of(first, p) for name, p in self.models[0].items()
        }
        for opt in self.opts:
            init_state(opt)
        self.state: dict[str, dict[str, Tensor]] = {}
        with torch.no_grad():
            for name, stacked in params.items():
                if not stacked.requires_grad:
                    continue
                rows = [opt.state[m[name]] for opt, m in zip(self.opts, self.models, strict=True)]
                entry = {}
                for key in self.keys:
                    entry[key] = torch.empty_like(stacked)  # the parameter's layout
                    entry[key].copy_(torch.stack([r[key] for r in rows]))
                entry["step"] = torch.stack([r["step"].to(stacked.device) for r in rows])
                self.state[name] = entry
        self._bind_views()

    def _bind_views(self) -> None:
        """Make each run's optimiser state rows of the stacked state."""
        for i, (opt, m) in enumerate(zip(self.opts, self.models, strict=True)):
            for name, entry in self.state.items():
                state = opt.state[m[name]]
                for key, stacked in entry.items():
                    state[key] = stacked[i]

    @torch.no_grad()
    def step(
        self,
        params: Mapping[str, Tensor],
        grads: Mapping[str, Tensor | None],
        skip: Tensor | None,
    ) -> None:
        """Update every run's rows of ``params`` with its rows of ``grads`` (clipped), by
        its own hyperparameters, except the runs where ``skip`` (``(N,)`` bool; ``None``:
        no run skips) is true."""
        groups = [opt.param_groups[0] for opt in self.opts]
        device = next(iter(params.values())).device

        def per_run(values: list[float]) -> Tensor:
            # float64, as the solo update's Python floats (masked_update casts the
            # elementwise uses to the parameters' dtype)
            return torch.tensor(values, dtype=torch.float64, device=device)

        lr = per_run([float(g["lr"]) for g in groups])
        beta1 = per_run([g["betas"][0] for g in groups])
        beta2 = per_run([g["betas"][1] for g in groups])
        eps = per_run([g["eps"] for g in groups])
        decay = [g["weight_decay"] for g in groups]
        weight_decay = per_run(decay) if any(decay) else 0.0
        names = [name for name in self.state if grads.get(name) is not None]
        # (a parameter the loss does not reach has no gradient: no run's optimiser steps it)
        first, second = self.keys
        update = _update_compiled if self.compiled else _update
        update(
            self.kind,
            [params[name].detach() for name in names],
            [grads[name] for name in names],
            [self.state[name]["step"] for name in names],
            [self.state[name][first] for name in names],
            [self.state[name][second] for name in names],
            (lr, beta1, beta2, eps, weight_decay),
            skip,
            [self.splits.get(name) for name in names],
        )

    @contextlib.contextmanager
    def alone(self, i: int) -> Iterator[None]:
        """Run ``i``'s optimiser with state of its own for the block, as alone (a
        checkpoint of a view would save the whole stacked tensor); its rows get back what
        the block left."""
        self.release(i)
        try:
            yield
        finally:
            with torch.no_grad():
                opt, m = self.opts[i], self.models[i]
                for name, entry in self.state.items():
                    state = opt.state[m[name]]  # created empty if release dropped it
                    for key, stacked in entry.items():
                        if key in state:
                            stacked[i].copy_(state[key])
                        state[key] = stacked[i]

    def release(self, i: int) -> None:
        """Give run ``i``'s optimiser copies of its rows, as its solo optimiser would hold
        them: a parameter it never updated has no state (the stack creates every state
        up front; a solo optimiser on its first update), so that its checkpoint is the
        solo run's. Reads the step counts (bookkeeping time, not every step)."""
        opt, m = self.opts[i], self.models[i]
        for name, entry in self.state.items():
            p = m[name]
            if entry["step"][i].item() == 0:
                opt.state.pop(p, None)
                continue
            opt.state[p] = {key: opt.state[p][key].clone() for key in opt.state[p]}


def _update(
    kind: str,
    params: list[Tensor],
    grads: list[Tensor],
    steps: list[Tensor],
    firsts: list[Tensor],
    seconds: list[Tensor],
    hyper: tuple[Tensor | float, ...],
    skip: Tensor | None,
    splits: list[Split | None],
) -> None:
    """:func:`~vaeflow.run.optim.masked_update` of each stacked tensor, the per-run
    hyperparameters ``(lr, beta1, beta2, eps, weight_decay)`` (``(N,)`` tensors; the
    weight decay may be the number 0) and skip flags broadcast over each run's rows;
    ``splits``: each tensor's :data:`~vaeflow.run.optim.Split` (AdamNormGrad) or ``None``."""
    tensors = zip(params, grads, steps, firsts, seconds, splits, strict=True)
    for p, grad, step, m, v, split in tensors:
        view = (-1, *[1] * (p.dim() - 1))
        lr, beta1, beta2, eps, decay = (h.view(view) if torch.is_tensor(h) else h for h in hyper)
        masked_update(
            kind, p, grad, step.view(view), m, v, lr, beta1, beta2, eps, decay,
            None if skip is None else skip.view(view), norm_dims=tuple(range(1, p.dim())),
            norm_split=split,
        )  # fmt: skip


#: :func:`_update` as one compiled graph (``train.compile_step`` in a stack): the
#: elementwise passes of all tensors fused into a few loops, which read each parameter,
#: gradient and moment once -- on the CPU the update is memory-bound once N runs' tensors
#: outgrow the cache, and the eager update makes ~10 passes over each.
_update_compiled = torch.compile(_update, dynamic=False)
