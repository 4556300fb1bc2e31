"""Device resolution and float32 precision, shared by training, evaluation and the CLI."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["resolve_device", "set_tf32", "strict_float32"]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {name!r} requested but no CUDA device is available; use 'auto'"
        )
    return torch.device(name)


def set_tf32(enabled: bool) -> None:
    """TF32 (inputs rounded to a 10-bit mantissa) for CUDA matmuls and cuDNN convolutions,
    or strict float32 for both. Process-wide flags. torch's own defaults differ between
    the two (matmuls strict, cuDNN convolutions TF32), so a run never inherits them:
    training sets ``train.tf32`` (default off) for its steps, validation and test-curve
    points; the test evaluation (``vaeflow eval``, :func:`strict_float32`) is always
    strict float32, so a reported bound is a float32 number (TF32's effect on the bounds
    is measured by ``benchmarks/gpu_check.py``, not assumed). No effect on a CPU."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


@contextmanager
def strict_float32() -> Iterator[None]:
    """Strict float32 matmuls and convolutions for the block (:func:`set_tf32`); the
    flags are put back as they were after it."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    set_tf32(False)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
