"""Preprocessing and batching: binarisation, evaluation data, deterministic train batches.

The conventions are in :mod:`vaeflow.data.datasets`' docstring (binarised data in {0, 1},
8-bit data on the ``k/255`` grid, fixed-seed evaluation binarisation, batches a pure
function of ``(seed, step)``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator

import torch
from torch import Tensor

from .datasets import Binarization, DataSplits, Kind

__all__ = [
    "TrainBatches",
    "binarize",
    "eval_batches",
    "fixed_binarize",
    "fixed_seed_binarize",
    "prepare_eval",
    "test_subset",
    "to_memory_format",
    "to_unit_interval",
]

_KINDS = ("binary", "8bit")
_BINARIZATIONS = ("dynamic", "fixed_seed", "given")
# Fixed binarisations draw their noise on the CPU in chunks of this many examples: the same
# bits on every device (CUDA generators give other numbers than CPU ones) and bounded memory.
_FIXED_CHUNK = 8192


# ---------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------


def _check_uint8(x: Tensor, what: str) -> None:
    if not isinstance(x, Tensor) or x.dtype != torch.uint8:
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(
            f"{what} expects uint8 intensities 0..255, got {got}; pass the uint8 tensors of "
            "DataSplits (already-scaled floats would be scaled twice)"
        )


def _check_choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what}={value!r}; choose one of {list(allowed)}")


def _check_given_binary(x_uint8: Tensor, what: str) -> None:
    """``binarization="given"`` promises binary images (uint8 0/255); check it once."""
    if x_uint8.numel() and not ((x_uint8 == 0) | (x_uint8 == 255)).all():
        raise ValueError(
            f'{what}: binarization="given" needs images that are binary in their files '
            "(uint8 values 0 and 255, e.g. dataset binarized_mnist); these are grey — use "
            'binarization="dynamic" or "fixed_seed"'
        )


def _derive_seed(seed: int, stream: str, index: int = 0) -> int:
    """A 63-bit seed from (seed, stream, index), stable across Python versions and platforms.

    Python's ``hash`` is not guaranteed stable, and ``seed + index`` would make the streams
    of neighbouring seeds overlap (seed 0 epoch 1 == seed 1 epoch 0).
    """
    digest = hashlib.blake2b(f"{seed}:{stream}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def to_unit_interval(x_uint8: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """8-bit intensities -> floats on the ``k/255`` grid in [0, 1] (the likelihoods' convention).

    Args:
        x_uint8: uint8 tensor of any shape.
        dtype: float dtype of the result (default: torch's default dtype).

    Returns:
        ``x / 255``, same shape and device.
    """
    _check_uint8(x_uint8, "to_unit_interval")
    return x_uint8.to(dtype or torch.get_default_dtype()) / 255


def binarize(
    x_uint8: Tensor, generator: torch.Generator | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """Dynamic binarisation: one ``Bernoulli(x / 255)`` draw per pixel, on ``x``'s device.

    Pixels 0 always give 0 and pixels 255 always give 1, so already-binary data (values in
    {0, 255}, e.g. from :func:`fixed_seed_binarize` or ``binarized_mnist``) is returned
    unchanged.

    Args:
        x_uint8: uint8 intensities, any shape.
        generator: a ``torch.Generator`` on ``x``'s device (``None``: the global RNG).
        dtype: float dtype of the result (default: torch's default dtype).

    Returns:
        Floats in {0, 1}, same shape and device as ``x``.
    """
    _check_uint8(x_uint8, "binarize")
    if generator is not None and generator.device.type != x_uint8.device.type:
        raise ValueError(
            f"binarize: generator is on {generator.device}, data on {x_uint8.device}; create "
            "it with torch.Generator(device=x.device)"
        )
    u = torch.rand(x_uint8.shape, generator=generator, device=x_uint8.device)
    # u in [0, 1): u < k/255 has probability k/255, exactly 0 for k=0 and 1 for k=255.
    return (u < x_uint8.to(torch.float32) / 255).to(dtype or torch.get_default_dtype())


def fixed_binarize(x_uint8: Tensor, seed: int, stream: str = "eval") -> Tensor:
    """A fixed binarisation: the same bits for the same ``(seed, stream)`` on every device.

    The noise is drawn on the CPU (CUDA generators give other numbers) in fixed-size chunks,
    then the result moves back to ``x``'s device.

    Args:
        x_uint8: uint8 intensities ``(N, ...)``.
        seed: the data seed; use a constant across runs so all runs see the same bits.
        stream: separates independent draws of the same seed (``"eval"``, ``"train"``).

    Returns:
        uint8 ``(N, ...)`` with values in {0, 255}, on ``x``'s device (still uint8 so it
        passes through every uint8 path, where re-binarising it is the identity).
    """
    _check_uint8(x_uint8, "fixed_binarize")
    g = torch.Generator().manual_seed(_derive_seed(seed, stream))
    x_cpu = x_uint8.cpu()
    chunks = [binarize(c, g, dtype=torch.float32) for c in x_cpu.split(_FIXED_CHUNK)] or [
        x_cpu.to(torch.float32)
    ]
    return (torch.cat(chunks) * 255).to(torch.uint8).to(x_uint8.device)


def fixed_seed_binarize(splits: DataSplits, seed: int) -> DataSplits:
    """Fixed-seed binarisation: every split of grey data binarised once with a fixed seed.

    This is vaeflow's own draw, not the papers' "static MNIST" (Larochelle & Murray's files,
    the dataset ``binarized_mnist``): a different test set, whose mean NLL differs by about
    the gaps between the rows of those papers' tables.

    Train uses stream ``"train"``; validation and test use the ``"eval"`` stream of
    :func:`prepare_eval`, so the evaluation images are the same bits under fixed-seed and
    dynamic training. The result stays uint8 (values {0, 255}), so it feeds :class:`TrainBatches`
    and :func:`prepare_eval` unchanged.

    Args:
        splits: binary-kind splits (uint8 intensities).
        seed: the binarisation seed (keep it constant across runs).

    Returns:
        New :class:`DataSplits` with binarised splits and a note saying so.
    """
    if splits.kind != "binary":
        raise ValueError(
            f"fixed_seed_binarize: {splits.name!r} is {splits.kind!r} data; only binary-kind "
            "datasets (mnist, fashion_mnist) are binarised"
        )
    return dataclasses.replace(
        splits,
        train=fixed_binarize(splits.train, seed, "train"),
        val=fixed_binarize(splits.val, seed, "eval"),
        test=fixed_binarize(splits.test, seed, "eval"),
        notes=[
            *splits.notes,
            f"fixed-seed binarisation: every split binarised once (seed {seed}); not the "
            "standard static MNIST (dataset binarized_mnist)",
        ],
    )


def prepare_eval(
    x_uint8: Tensor,
    kind: Kind,
    binarization: Binarization = "dynamic",
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Preprocess a validation/test split once, deterministically.

    Grey binary-kind data gets the fixed-seed binarisation :func:`fixed_binarize` (stream
    ``"eval"``) under either training binarisation — a random re-binarisation at every
    evaluation makes numbers noisy and incomparable. Data binarised in its files
    (``binarization="given"``) is used as it is. 8-bit data becomes ``x / 255``.

    Args:
        x_uint8: ``(N, C, H, W)`` uint8.
        kind: ``"binary"`` or ``"8bit"``.
        binarization: the training binarisation (``"dynamic"``/``"fixed_seed"``: the same
            evaluation draw for both; ``"given"``: the images are binary already and are
            checked, not drawn).
        seed: the binarisation seed; keep it constant across runs.
        device: target device (default: ``x``'s).
        dtype: float dtype (default: torch's default dtype).

    Returns:
        ``(N, C, H, W)`` floats on ``device``: {0, 1} for binary, the ``k/255`` grid for 8-bit.
    """
    _check_uint8(x_uint8, "prepare_eval")
    _check_choice(kind, _KINDS, "kind")
    _check_choice(binarization, _BINARIZATIONS, "binarization")
    if kind == "binary" and binarization == "given":
        _check_given_binary(x_uint8, "prepare_eval")
        x = x_uint8
    else:
        x = fixed_binarize(x_uint8, seed, "eval") if kind == "binary" else x_uint8
    return to_unit_interval(x.to(device if device is not None else x.device), dtype)


def test_subset(n_total: int, n: int | None) -> tuple[Tensor | None, str]:
    """Which test examples a reduced evaluation scores, and a phrase that says so.

    Test files can be ordered (``binarized_mnist``'s is sorted by digit class), so "the
    first ``n``" is not a sample of the test set. A reduced evaluation scores a fixed random
    subset instead: the same ``n`` indices for every run, every seed and every device (a
    constant seed, drawn on the CPU), in increasing order.

    Args:
        n_total: examples in the test split.
        n: examples to score; ``None`` or ``>= n_total`` means all.

    Returns:
        ``(indices, description)``: ``indices`` is ``(n,)`` int64 on the CPU, or ``None``
        for the whole split; ``description`` is e.g. ``"all 10000"`` or ``"fixed random
        subset of 500 of 10000"``.
    """
    if n is None or n >= n_total:
        return None, f"all {n_total}"
    if n < 1:
        raise ValueError(f"n_test must be >= 1, got {n}")
    g = torch.Generator().manual_seed(_derive_seed(0, "test_subset"))
    indices = torch.randperm(n_total, generator=g)[:n].sort().values
    return indices, f"fixed random subset of {n} of {n_total}"


def eval_batches(x_processed: Tensor, batch_size: int) -> Iterator[Tensor]:
    """Consecutive batches of an already-preprocessed split, in order; the last may be short.

    Args:
        x_processed: ``(N, ...)``, e.g. from :func:`prepare_eval`.
        batch_size: examples per batch.

    Yields:
        Views ``(<= batch_size, ...)`` covering every example exactly once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    yield from x_processed.split(batch_size)


# ---------------------------------------------------------------------------------------
# Training batches
# ---------------------------------------------------------------------------------------


class TrainBatches:
    """Training batches as a pure function of ``(seed, step)``: resume is bit-exact.

    Epoch ``e`` visits the examples in the order ``randperm(N)`` drawn from a CPU generator
    seeded with a hash of ``(seed, e)`` (so the order is the same on every device); step
    ``s`` takes slice ``s mod steps_per_epoch`` of epoch ``s // steps_per_epoch``. Dynamic
    binarisation of step ``s`` uses a generator on the data's device seeded with a hash of
    ``(seed, s)``. Nothing else is random, so ``batch(s)`` of a fresh object equals
    ``batch(s)`` of the one that trained up to ``s``, and a checkpoint needs only the step,
    no data RNG state. (Dynamic binarisation bits are reproducible per device type: CPU and
    CUDA generators draw different numbers.)

    The uint8 data is moved to ``device`` once at construction; each batch is a gather and
    a vectorised preprocessing on the device, with no per-item Python.

    Args:
        x_uint8: training images ``(N, C, H, W)`` uint8.
        batch_size: examples per step.
        seed: the data seed (order and binarisation).
        kind: ``"binary"`` or ``"8bit"``.
        binarization: ``"dynamic"`` (fresh draw per step), ``"fixed_seed"`` (the data are
            binarised once at construction with :func:`fixed_binarize` stream ``"train"``,
            identical to :func:`fixed_seed_binarize`'s train split; already-binary data is
            kept) or ``"given"`` (the images are binary in their files and used as they
            are; checked once). Ignored for 8-bit data.
        device: where the data and batches live (default: ``x``'s device).
        drop_last: drop the last incomplete batch of each epoch (then every batch has
            ``batch_size`` examples); otherwise the last batch of an epoch is short.
        dtype: float dtype of the batches (default: torch's default dtype).
        shuffle: ``False`` visits the examples in their stored order every epoch (Burda
            et al.'s IWAE code iterates its training array so); dynamic binarisation stays
            a fresh draw per step.

    Attributes:
        steps_per_epoch: steps in one pass over the data.
        num_examples: ``N``.
    """

    def __init__(
        self,
        x_uint8: Tensor,
        batch_size: int,
        seed: int,
        kind: Kind,
        binarization: Binarization = "dynamic",
        device: torch.device | str | None = None,
        drop_last: bool = True,
        dtype: torch.dtype | None = None,
        shuffle: bool = True,
    ) -> None:
        _check_uint8(x_uint8, "TrainBatches")
        _check_choice(kind, _KINDS, "kind")
        _check_choice(binarization, _BINARIZATIONS, "binarization")
        n = x_uint8.shape[0]
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if drop_last and batch_size > n:
            raise ValueError(
                f"batch_size={batch_size} exceeds the {n} training examples with "
                "drop_last=True (no full batch); lower batch_size or pass drop_last=False"
            )
        if n == 0:
            raise ValueError("TrainBatches: the training split is empty")
        self.batch_size = batch_size
        self.seed = seed
        self.kind = kind
        self.binarization = binarization
        self.drop_last = drop_last
        self.shuffle = bool(shuffle)
        self.dtype = dtype or torch.get_default_dtype()
        self.num_examples = n
        self.steps_per_epoch = n // batch_size if drop_last else -(-n // batch_size)
        self.device = torch.device(device) if device is not None else x_uint8.device
        if kind == "binary" and binarization == "fixed_seed":
            x_uint8 = fixed_binarize(x_uint8, seed, "train")
        elif kind == "binary" and binarization == "given":
            _check_given_binary(x_uint8, "TrainBatches")
        self._x = x_uint8.to(self.device)
        self._dynamic = kind == "binary" and binarization == "dynamic"
        self._gen = torch.Generator(device=self.device) if self._dynamic else None
        self._perm_epoch = -1
        self._perm: Tensor | None = None

    def epoch_permutation(self, epoch: int) -> Tensor:
        """The visiting order of epoch ``epoch``: ``(N,)`` int64 on the CPU (the stored order
        without ``shuffle``)."""
        if not self.shuffle:
            return torch.arange(self.num_examples)
        g = torch.Generator().manual_seed(_derive_seed(self.seed, "perm", epoch))
        return torch.randperm(self.num_examples, generator=g)

    def indices(self, step: int) -> Tensor:
        """The example indices of step ``step``: ``(batch,)`` int64 on the data's device."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, i = divmod(step, self.steps_per_epoch)
        # Cache one epoch's permutation: consecutive steps reuse it, resume recomputes it.
        if epoch != self._perm_epoch:
            self._perm = self.epoch_permutation(epoch).to(self.device)
            self._perm_epoch = epoch
        return self._perm[i * self.batch_size : (i + 1) * self.batch_size]

    def batch(self, step: int) -> Tensor:
        """The preprocessed batch of step ``step``.

        Returns:
            ``(batch, C, H, W)`` floats on the device: {0, 1} for binary data, the ``k/255``
            grid for 8-bit data.
        """
        x = self._x.index_select(0, self.indices(step))
        if self._dynamic:
            self._gen.manual_seed(_derive_seed(self.seed, "binarize", step))
            return binarize(x, self._gen, self.dtype)
        return to_unit_interval(x, self.dtype)

    def __repr__(self) -> str:
        return (
            f"TrainBatches(N={self.num_examples}, batch_size={self.batch_size}, "
            f"steps_per_epoch={self.steps_per_epoch}, kind={self.kind!r}, "
            f"binarization={self.binarization!r}, device={self.device})"
        )


def to_memory_format(x: Tensor, channels_last: bool) -> Tensor:
    """Image batches ``(B, C, H, W)`` in NHWC layout when ``channels_last`` (else as given)."""
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x
