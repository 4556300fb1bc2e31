"""The exponential moving average of a model's weights (Polyak averaging) that a run
validates, draws and checkpoints beside its live weights (``train.ema_decay``)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn


class EMA:
    """Exponential moving average of a model's floating-point state (Polyak averaging).

    After update ``n`` the average is ``ema = d_n * ema + (1 - d_n) * current`` with
    ``d_n = min(decay, (1 + n) / (10 + n))``: the warm-up keeps the average from being
    dominated by the random initial weights early in training (a plain 0.999 average
    still holds 74 % of the initialisation after 300 steps).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self._updates = 0
        # The count on the device once an update was masked by a device flag
        # (train.sync_free): the host cannot know it without a read.
        self._count: Tensor | None = None
        self.shadow = {
            k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()
        }

    @property
    def updates(self) -> int:
        """Updates averaged in so far (under ``train.sync_free`` a host read of the device
        count)."""
        return int(self._count.item()) if self._count is not None else self._updates

    @torch.no_grad()
    def update(self, model: nn.Module, skip: Tensor | None = None) -> None:
        """Average the model's current weights in; with ``skip`` (a 0-d bool tensor on the
        device, ``train.sync_free``) only where it is false, without reading it."""
        live = model.state_dict()
        keys = list(self.shadow)
        if skip is None and self._count is None:
            d = min(self.decay, (1 + self._updates) / (10 + self._updates))
            if keys:  # one foreach call instead of a lerp_ per tensor (same arithmetic)
                torch._foreach_lerp_(
                    [self.shadow[k] for k in keys], [live[k].detach() for k in keys], 1.0 - d
                )
            self._updates += 1
            return
        self.count_on(skip.device if skip is not None else self._count.device)
        self.update_masked([live[k].detach() for k in keys], skip)

    def count_on(self, device: torch.device) -> Tensor:
        """The update count as a float64 device tensor (created from the host count on
        first use; from then on the count lives there)."""
        if self._count is None:
            self._count = torch.tensor(float(self._updates), dtype=torch.float64, device=device)
        return self._count

    def live_tensors(self, model: nn.Module) -> list[Tensor]:
        """The model's tensors that are averaged, in the order of :meth:`update_masked`:
        the parameters and buffers themselves (``state_dict(keep_vars=True)``)."""
        live = model.state_dict(keep_vars=True)
        return [live[k] for k in self.shadow]

    @torch.no_grad()
    def update_masked(self, live: list[Tensor], skip: Tensor | None) -> None:
        """Average ``live`` (one tensor per shadow entry, in order) in unless the 0-d bool
        ``skip`` is set, without reading it; :meth:`count_on` must have been called. Only
        tensor operations, so the compiled training step (``train.compile_step``) traces
        it."""
        assert self._count is not None, "call count_on(device) first"
        applied = torch.ones_like(self._count, dtype=torch.bool) if skip is None else ~skip
        # The host path's weight computed in float64 (Python's floats), so that it rounds
        # to the same float32; weight 0 leaves the average as it was (live weights finite).
        n = self._count
        d = torch.clamp((1 + n) / (10 + n), max=self.decay)
        weight = torch.where(applied, 1.0 - d, torch.zeros_like(d))
        if live:
            shadow = list(self.shadow.values())
            by_dtype = {v.dtype: weight.to(v.dtype) for v in shadow}
            # A list of 0-d weights: a tensor passed as the one weight is converted to a
            # Python scalar, a host read.
            torch._foreach_lerp_(shadow, live, [by_dtype[v.dtype] for v in shadow])
        self._count += applied

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.shadow = {k: v.to(device) for k, v in state["shadow"].items()}
        self._updates = int(state["updates"])
        self._count = None

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """Temporarily load the averaged weights into ``model``."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.shadow}
        model.load_state_dict(self.shadow, strict=False)
        try:
            yield model
        finally:
            model.load_state_dict(backup, strict=False)
