"""Datasets: data-root resolution, the dataset table, file readers, splits, packing.

The preprocessing and batching of :mod:`vaeflow.data.batches` are described below too,
since the two halves keep one set of conventions.

Datasets (:data:`DATASETS`), all returned as ``uint8`` tensors ``(N, C, H, W)``:

================ ======= ============ ====================================================
name             kind    x_shape      split (train / val / test), default ``val_size``
================ ======= ============ ====================================================
mnist            binary  (1, 28, 28)  first 50,000 / last 10,000 of the 60,000 training
                                      images / the 10,000 test images
fashion_mnist    binary  (1, 28, 28)  same 50k / 10k / 10k split as MNIST
binarized_mnist  binary  (1, 28, 28)  Larochelle & Murray's fixed binarisation (the
                                      "static MNIST" of the VampPrior, Sylvester, IAF,
                                      VLAE and planar-flow papers): the train / valid /
                                      test ``.amat`` files, 50k / 10k / 10k; the test
                                      file is **sorted by digit class**
cifar10          8bit    (3, 32, 32)  first 45,000 / last 5,000 of the 50,000 training
                                      images / the test file (10,000 images from
                                      torchvision; **only the first 1,000** in the
                                      packed offline copy, see ``DataSplits.notes``)
================ ======= ============ ====================================================

The 50k/10k/10k MNIST split is the classic one of the ``mnist.pkl.gz`` pickle (train = the
first 50,000 training images, validation = the last 10,000, in file order; Larochelle's
static files have the same sizes). ``val_size`` is configurable: the IWAE code holds out
the last 400 (``val_size=400``), and ``val_size=0`` trains on the whole training file with
an empty validation split (the IAF code trains on all 60,000).

Files (below the data root, see :func:`resolve_data_root`):

- Binarized MNIST: ``BinarizedMNIST/binarized_mnist_{train,valid,test}.amat`` (plain or
  ``.gz``), one image a line as 784 space-separated ``0``/``1``. The train and valid files
  are concatenated in that order, so the default ``val_size`` (10,000) is exactly the valid
  file and ``val_size=0`` trains on all 60,000 images. Download (where the internet is
  reachable) fetches the originals from Larochelle's page and checks their sha256.
- MNIST / Fashion-MNIST: torchvision's raw layout ``MNIST/raw/{train,t10k}-images-idx3-ubyte``
  and ``FashionMNIST/raw/...`` (a ``.gz`` next to a missing file is read too). The IDX files
  are parsed directly (no per-item Python, no PIL).
- CIFAR-10: the packed layout ``CIFAR10/cifar10_{train,test}.npz`` (``x`` uint8
  ``(N, 32, 32, 3)`` HWC, ``y`` uint8 ``(N,)``), else torchvision's ``cifar-10-batches-py``.
  :func:`pack_cifar10` converts the latter into the former (``vaeflow data pack``).

Missing files: if ``download=True`` the dataset's download is tried (torchvision's for
MNIST, Fashion-MNIST and CIFAR-10; Larochelle & Murray's published folder for Binarized
MNIST, each file checked against the original's sha256 before it is saved); when that fails
(no internet) or is disabled, :class:`DatasetNotFoundError` names the dataset, the searched root
and how it was resolved, the exact files expected and what to do.

Preprocessing keeps the conventions of :mod:`vaeflow.models.likelihoods`:

- binarised data (``kind="binary"``, Bernoulli likelihood): values in {0, 1}. Grey images
  are drawn as ``Bernoulli(x / 255)``: training uses *dynamic* binarisation (a fresh draw
  per batch, :func:`binarize`) or a *fixed-seed* binarisation (one draw with a fixed seed,
  :func:`fixed_seed_binarize` — **not** the papers' "static MNIST", which is the dataset
  ``binarized_mnist``). Validation and test of grey data always use a fixed-seed draw
  (:func:`prepare_eval`), the same one in both modes, so every evaluation of every run sees
  the same binary images (re-drawing the test set at every evaluation, as NVAE does, makes
  numbers noisy and incomparable). Data that is binary in its files (``binarized_mnist``)
  uses binarisation ``given``: the images are used as they are, in every split.
- 8-bit data (``kind="8bit"``, discretised-logistic likelihood): ``x / 255``, floats on the
  ``k/255`` grid (:func:`to_unit_interval`).

:class:`TrainBatches` returns the batch of step ``s`` as a pure function of ``(seed, s)``:
resuming at step ``s`` reproduces the uninterrupted run bit for bit without saving any data
RNG state.

References:
    Salakhutdinov & Murray 2008, "On the quantitative analysis of deep belief networks"
    (binarised MNIST, stochastic binarisation).
    Burda et al. 2016, "Importance Weighted Autoencoders", arXiv:1509.00519 (dynamic
    binarisation, 50k/10k/10k evaluation protocol).
    Krizhevsky 2009, "Learning Multiple Layers of Features from Tiny Images" (CIFAR-10).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..atomic import atomic_write, remove_stale_temps

__all__ = [
    "DATASETS",
    "DataSplits",
    "DatasetNotFoundError",
    "DatasetSpec",
    "load_splits",
    "pack_cifar10",
    "parse_amat",
    "resolve_data_root",
]

ENV_VAR = "VAEFLOW_DATA"
DEFAULT_ROOT = "data"

Kind = Literal["binary", "8bit"]
Binarization = Literal["dynamic", "fixed_seed", "given"]
Downloader = Callable[[str, Path], None]

_CIFAR_BATCHES = "cifar-10-batches-py"
_CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_FILES = ("test_batch",)
_CIFAR_FULL_TEST = 10000


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not under the data root (and could not be downloaded).

    The message names the dataset, the searched root and how it was resolved, the files
    expected and what to do.
    """


# ---------------------------------------------------------------------------------------
# Data root
# ---------------------------------------------------------------------------------------


def _resolve_root(data_root: str | os.PathLike | None) -> tuple[Path, str]:
    """The data root and a phrase saying where it came from (for error messages)."""
    if data_root is not None and str(data_root) != "":
        return Path(data_root).expanduser(), "from the data_root argument / --data-root"
    env = os.environ.get(ENV_VAR)
    # An empty variable counts as unset: `VAEFLOW_DATA= cmd` should not mean "cwd".
    if env:
        return Path(env).expanduser(), f"from ${ENV_VAR}={env!r}"
    return Path(DEFAULT_ROOT), (
        f"the default ./{DEFAULT_ROOT} (neither --data-root nor ${ENV_VAR} was set)"
    )


def resolve_data_root(data_root: str | os.PathLike | None = None) -> Path:
    """The folder that holds the datasets.

    Precedence (docs/design.md): the explicit argument (``--data-root``), else ``$VAEFLOW_DATA``
    (an empty value counts as unset), else ``./data`` relative to the working directory.
    ``~`` is expanded; the path is not required to exist.

    Args:
        data_root: an explicit root, or ``None``/``""`` to fall back.

    Returns:
        The root as a :class:`~pathlib.Path`.
    """
    return _resolve_root(data_root)[0]


# ---------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------


@dataclass
class DataSplits:
    """Train/validation/test images of one dataset, as ``uint8`` intensities.

    Attributes:
        train: ``(N_train, C, H, W)`` uint8.
        val: ``(N_val, C, H, W)`` uint8 (``N_val`` may be 0).
        test: ``(N_test, C, H, W)`` uint8.
        x_shape: ``(C, H, W)``.
        kind: ``"binary"`` (binarise; Bernoulli likelihood) or ``"8bit"`` (``x / 255``;
            discretised likelihood).
        name: dataset name, a key of :data:`DATASETS`.
        notes: caveats results must print (e.g. a partial test set, a fixed-seed binarisation).
    """

    train: Tensor
    val: Tensor
    test: Tensor
    x_shape: tuple[int, int, int]
    kind: Kind
    name: str
    notes: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        # The default dataclass repr would print tensor contents.
        sizes = ", ".join(f"{s}={tuple(getattr(self, s).shape)}" for s in ("train", "val", "test"))
        return f"DataSplits(name={self.name!r}, kind={self.kind!r}, {sizes}, notes={self.notes})"


@dataclass(frozen=True)
class DatasetSpec:
    """How to find, read and download one dataset (an entry of :data:`DATASETS`).

    Attributes:
        kind: ``"binary"`` or ``"8bit"``.
        x_shape: ``(C, H, W)``.
        default_val_size: validation examples taken from the end of the training file.
        read: ``root -> (train_full, test, notes)`` uint8 ``(N, C, H, W)`` tensors, or
            ``None`` when the files are not there.
        expected: ``root -> [(description, [paths])]``, the file sets :attr:`read` accepts.
        download: ``root -> None``, the dataset's download into ``root`` (torchvision's,
            or the published ``.amat`` files for ``binarized_mnist``).
        hint: dataset-specific advice for the not-found message.
        binarizations: the ``data.binarization`` values that fit the data: a grey
            dataset can be binarised ``dynamic`` or ``fixed_seed``; a dataset whose files
            are binary already (``binarized_mnist``) only takes ``given``; 8-bit data
            ignores the setting.
    """

    kind: Kind
    x_shape: tuple[int, int, int]
    default_val_size: int
    read: Callable[[Path], tuple[Tensor, Tensor, list[str]] | None]
    expected: Callable[[Path], list[tuple[str, list[Path]]]]
    download: Callable[[Path], None]
    hint: str
    binarizations: tuple[str, ...] = ("dynamic", "fixed_seed")


# ----- MNIST-like IDX files ------------------------------------------------------------

_IDX_IMAGES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}


def _idx_paths(root: Path, folder: str) -> dict[str, Path]:
    return {split: root / folder / "raw" / fname for split, fname in _IDX_IMAGES.items()}


def _read_plain_or_gz(path: Path) -> bytes:
    """The bytes of ``path``, or of ``path`` + ``.gz`` decompressed when only that exists."""
    if path.exists():
        return path.read_bytes()
    with gzip.open(path.with_name(path.name + ".gz"), "rb") as f:
        return f.read()


def _read_idx_images(path: Path) -> Tensor:
    """Parse an IDX image file (magic 2051, big-endian dims, uint8 payload) -> (N, 1, H, W)."""
    data = _read_plain_or_gz(path)
    if len(data) < 16:
        raise ValueError(f"{path}: {len(data)} bytes is too short for an IDX image file")
    magic, n, h, w = (int.from_bytes(data[i : i + 4], "big") for i in range(0, 16, 4))
    if magic != 2051:
        raise ValueError(
            f"{path}: IDX magic number {magic}, expected 2051 (uint8 images, 3 dims); "
            "the file is not an uncompressed MNIST image file — re-download or re-extract it"
        )
    if len(data) != 16 + n * h * w:
        raise ValueError(
            f"{path}: {len(data)} bytes, expected {16 + n * h * w} for {n}x{h}x{w} images; "
            "the file is truncated or corrupt — re-download it"
        )
    # bytearray: torch.frombuffer needs a writable buffer to avoid a warning.
    x = torch.frombuffer(bytearray(data[16:]), dtype=torch.uint8)
    return x.reshape(n, 1, h, w)


def _idx_exists(path: Path) -> bool:
    return path.exists() or path.with_name(path.name + ".gz").exists()


def _mnist_like(folder: str, torchvision_class: str) -> tuple[Callable, Callable, Callable]:
    def read(root: Path) -> tuple[Tensor, Tensor, list[str]] | None:
        paths = _idx_paths(root, folder)
        if not all(_idx_exists(p) for p in paths.values()):
            return None
        return _read_idx_images(paths["train"]), _read_idx_images(paths["test"]), []

    def expected(root: Path) -> list[tuple[str, list[Path]]]:
        layout = f"torchvision's {torchvision_class} raw layout (or the same names + .gz)"
        return [(layout, list(_idx_paths(root, folder).values()))]

    def download(root: Path) -> None:
        import torchvision

        # download() fetches all four files (images and labels) into <root>/<folder>/raw/.
        getattr(torchvision.datasets, torchvision_class)(str(root), train=True, download=True)

    return read, expected, download


# ----- CIFAR-10 -------------------------------------------------------------------------


def _cifar_npz_paths(root: Path) -> dict[str, Path]:
    return {s: root / "CIFAR10" / f"cifar10_{s}.npz" for s in ("train", "test")}


def _cifar_batches_dir(root: Path) -> Path:
    return root / _CIFAR_BATCHES


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10 batch files, allowing only numpy array reconstruction.

    The batch files are pickles; refusing every other global keeps a tampered file from
    running code (the same spirit as ``torch.load(weights_only=True)``).
    """

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"CIFAR-10 batch file refers to {module}.{name}; only numpy arrays are allowed "
                "— the file is not an original cifar-10-batches-py file"
            )
        # Pickles from numpy 1.x name numpy.core, which numpy 2 only keeps as a shim.
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module.split(".", 2)[2]
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One ``cifar-10-batches-py`` file -> images ``(N, 3, 32, 32)`` uint8, labels ``(N,)``."""
    with open(path, "rb") as f:
        # latin1: the files are Python 2 pickles (as torchvision reads them).
        entry = _CifarUnpickler(f, encoding="latin1").load()
    entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
    if "data" not in entry or "labels" not in entry:
        raise ValueError(
            f"{path}: keys {sorted(entry)}; a CIFAR-10 batch needs 'data' and 'labels'"
        )
    x = np.asarray(entry["data"])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: data is {x.dtype} {x.shape}, expected uint8 (N, 3072)")
    y = np.asarray(entry["labels"], dtype=np.uint8)
    if y.shape != (x.shape[0],):
        raise ValueError(f"{path}: {y.shape[0]} labels for {x.shape[0]} images")
    # Rows are the 1024 red, then green, then blue values of a 32x32 image in row-major order.
    return x.reshape(-1, 3, 32, 32), y


def _read_cifar_batches(directory: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for split, files in (("train", _CIFAR_TRAIN_FILES), ("test", _CIFAR_TEST_FILES)):
        parts = [_read_cifar_batch(directory / f) for f in files]
        out[split] = (
            np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts]),
        )
    return out


def _read_cifar_npz(path: Path) -> Tensor:
    with np.load(path, allow_pickle=False) as z:
        if "x" not in z.files:
            raise ValueError(f"{path}: arrays {z.files}, expected 'x' (and 'y')")
        x = z["x"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
        raise ValueError(
            f"{path}: x is {x.dtype} {x.shape}, expected uint8 (N, 32, 32, 3) HWC; "
            "rebuild it with `vaeflow data pack`"
        )
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def _cifar_test_notes(n_test: int) -> list[str]:
    if n_test == _CIFAR_FULL_TEST:
        return []
    return [
        f"CIFAR-10 test split: only the first {n_test} of {_CIFAR_FULL_TEST} images "
        "(packed npz); test numbers are on this subset"
    ]


def _cifar_read(root: Path) -> tuple[Tensor, Tensor, list[str]] | None:
    npz = _cifar_npz_paths(root)
    if all(p.exists() for p in npz.values()):
        train, test = _read_cifar_npz(npz["train"]), _read_cifar_npz(npz["test"])
        return train, test, _cifar_test_notes(test.shape[0])
    batches = _cifar_batches_dir(root)
    if all((batches / f).exists() for f in _CIFAR_TRAIN_FILES + _CIFAR_TEST_FILES):
        arrays = _read_cifar_batches(batches)
        train, test = (torch.from_numpy(arrays[s][0]) for s in ("train", "test"))
        return train, test, _cifar_test_notes(test.shape[0])
    return None


def _cifar_expected(root: Path) -> list[tuple[str, list[Path]]]:
    batches = _cifar_batches_dir(root)
    return [
        ("packed npz layout", list(_cifar_npz_paths(root).values())),
        (
            "or torchvision's cifar-10-batches-py layout",
            [batches / f for f in _CIFAR_TRAIN_FILES + _CIFAR_TEST_FILES],
        ),
    ]


def _cifar_download(root: Path) -> None:
    import torchvision

    torchvision.datasets.CIFAR10(str(root), train=True, download=True)


# ----- Binarized MNIST (Larochelle & Murray's fixed files) -------------------------------

_AMAT_SPLITS = ("train", "valid", "test")
_AMAT_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
# sha256 of the plain-text originals (the same values TensorFlow Datasets records for the
# download from the URL above; shared/datasets/PROVENANCE.md). A download that does not
# match is rejected, so a changed mirror cannot silently change the test set.
_AMAT_SHA256 = {
    "train": "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d",
    "valid": "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2",
    "test": "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c",
}
_AMAT_SIZES = {"train": 50000, "valid": 10000, "test": 10000}
_AMAT_PIXELS = 28 * 28
_AMAT_TEST_NOTE = (
    "binarized_mnist test file is sorted by digit class: its first N images are not a "
    "random subset (vaeflow evaluates a fixed random subset when n_test < 10000)"
)


def _amat_paths(root: Path) -> dict[str, Path]:
    """``<root>/BinarizedMNIST/binarized_mnist_<split>.amat`` (a ``.gz`` beside counts too)."""
    folder = root / "BinarizedMNIST"
    return {s: folder / f"binarized_mnist_{s}.amat" for s in _AMAT_SPLITS}


def parse_amat(data: bytes, where: str = "<bytes>") -> Tensor:
    """Parse Larochelle & Murray's ``.amat`` text: one image a line, 784 ``0``/``1`` digits.

    Args:
        data: the file's bytes (decompressed).
        where: the file name, for error messages.

    Returns:
        ``(N, 1, 28, 28)`` uint8 with values in ``{0, 255}`` (the intensity convention of
        every binary dataset here, so the already-binary images pass through the uint8
        paths unchanged).

    Raises:
        ValueError: a value other than 0/1, or a line without 784 values.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    line = 2 * _AMAT_PIXELS  # 784 digits, 783 spaces and a newline: the original layout
    if buf.size % line == 0 and buf.size:
        digits, seps = buf[0::2], buf[1::2].reshape(-1, _AMAT_PIXELS)
        fast = (seps[:, :-1] == ord(" ")).all() and (seps[:, -1] == ord("\n")).all()
    else:
        fast = False
    if fast:
        values = digits.astype(np.int16) - ord("0")
    else:  # another whitespace layout (CRLF, tabs, a missing final newline): split it
        rows = [r.split() for r in data.decode("ascii", errors="replace").splitlines()]
        rows = [r for r in rows if r]
        bad = [i for i, r in enumerate(rows) if len(r) != _AMAT_PIXELS]
        if bad:
            raise ValueError(
                f"{where}: line {bad[0] + 1} has {len(rows[bad[0]])} values, expected "
                f"{_AMAT_PIXELS} (one 28x28 binary image a line); the file is truncated "
                "or not a binarized_mnist .amat file"
            )
        try:
            values = np.array(rows, dtype=np.int16)
        except ValueError as e:
            raise ValueError(f"{where}: non-numeric value ({e})") from None
    if values.size == 0 or not np.isin(values, (0, 1)).all():
        raise ValueError(
            f"{where}: values other than 0 and 1 (or no images); a binarized_mnist .amat "
            "file holds one binary image a line — re-download it"
        )
    x = torch.from_numpy((values * 255).astype(np.uint8))
    return x.reshape(-1, 1, 28, 28)


def _read_amat(path: Path) -> Tensor:
    return parse_amat(_read_plain_or_gz(path), str(path))


def _binarized_mnist_read(root: Path) -> tuple[Tensor, Tensor, list[str]] | None:
    paths = _amat_paths(root)
    if not all(_idx_exists(p) for p in paths.values()):
        return None
    x = {s: _read_amat(p) for s, p in paths.items()}
    notes = [_AMAT_TEST_NOTE]
    sizes = {s: int(v.shape[0]) for s, v in x.items()}
    if sizes != _AMAT_SIZES:
        # Not an error (a subset for a quick test is legitimate), but never unnoticed.
        notes.append(
            "binarized_mnist files hold {train} / {valid} / {test} images, not the standard "
            "50000 / 10000 / 10000: not the standard static MNIST".format(**sizes)
        )
    # train file then valid file: the default val_size (10,000) takes exactly the valid
    # file as the validation split, and val_size = 0 trains on all 60,000.
    return torch.cat([x["train"], x["valid"]]), x["test"], notes


def _binarized_mnist_expected(root: Path) -> list[tuple[str, list[Path]]]:
    return [
        (
            "Larochelle & Murray's .amat files (or the same names + .gz)",
            list(_amat_paths(root).values()),
        )
    ]


def _binarized_mnist_download(root: Path) -> None:
    import urllib.request

    for split, path in _amat_paths(root).items():
        with urllib.request.urlopen(_AMAT_URL + path.name, timeout=60) as response:
            data = response.read()
        digest = hashlib.sha256(data).hexdigest()
        if digest != _AMAT_SHA256[split]:
            raise ValueError(
                f"downloaded {path.name} has sha256 {digest}, expected "
                f"{_AMAT_SHA256[split]} (the original file); not saved"
            )
        with atomic_write(path, "wb") as f:
            f.write(data)


_mnist = _mnist_like("MNIST", "MNIST")
_fashion = _mnist_like("FashionMNIST", "FashionMNIST")
_OFFLINE_COPY = (
    "The offline copy (shared/datasets, see its PROVENANCE.md) has this layout; point "
    f"${ENV_VAR} or --data-root at that folder."
)

DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec("binary", (1, 28, 28), 10000, *_mnist, hint=_OFFLINE_COPY),
    "fashion_mnist": DatasetSpec("binary", (1, 28, 28), 10000, *_fashion, hint=_OFFLINE_COPY),
    "binarized_mnist": DatasetSpec(
        "binary",
        (1, 28, 28),
        10000,
        _binarized_mnist_read,
        _binarized_mnist_expected,
        _binarized_mnist_download,
        hint=_OFFLINE_COPY,
        binarizations=("given",),
    ),
    "cifar10": DatasetSpec(
        "8bit",
        (3, 32, 32),
        5000,
        _cifar_read,
        _cifar_expected,
        _cifar_download,
        hint=(
            "If you have torchvision's cifar-10-batches-py elsewhere, run `vaeflow data pack` "
            "to write the npz layout into the root. The offline copy (shared/datasets) holds "
            "the npz layout with only the first 1000 of the 10000 test images."
        ),
    ),
}
"""Every dataset :func:`load_splits` knows, by name."""


def _not_found(
    name: str, spec: DatasetSpec, root: Path, how: str, download_outcome: str
) -> DatasetNotFoundError:
    lines = [
        f"dataset {name!r} not found under {root} (absolute: {root.absolute()}), the data root "
        f"resolved {how}.",
        "Expected files:",
    ]
    for description, paths in spec.expected(root):
        lines.append(f"  {description}:")
        lines.extend(f"    {p}" for p in paths)
    lines.append(f"Download: {download_outcome}")
    lines.append(
        f"To fix: set ${ENV_VAR} (or pass --data-root) to the folder that holds these files, "
        "or enable download where the internet is reachable. " + spec.hint
    )
    return DatasetNotFoundError("\n".join(lines))


def load_splits(
    name: str,
    data_root: str | os.PathLike | None = None,
    val_size: int | None = None,
    download: bool = False,
    *,
    downloader: Downloader | None = None,
) -> DataSplits:
    """Load a dataset as train/validation/test ``uint8`` tensors ``(N, C, H, W)``.

    Validation is the *last* ``val_size`` images of the training file, train the rest, in
    file order (MNIST default: the classic 50k/10k/10k split; CIFAR-10: 45k/5k/test;
    Binarized MNIST: its train file then its valid file, so the default is the files' own
    50k/10k split).

    Args:
        name: a key of :data:`DATASETS` (``mnist``, ``fashion_mnist``,
            ``binarized_mnist``, ``cifar10``).
        data_root: the data root; ``None`` resolves ``$VAEFLOW_DATA`` then ``./data``
            (:func:`resolve_data_root`).
        val_size: validation examples (``None``: the dataset default, 10000 for MNIST-like
            data, 5000 for CIFAR-10); 0 gives an empty validation split.
        download: if the files are missing, try the dataset's download into the root.
        downloader: replaces the dataset's download, called as ``downloader(name, root)``
            (tests inject a failing or file-writing one so no network is touched).

    Returns:
        :class:`DataSplits`. For CIFAR-10 from the packed offline copy the test split has
        only the first 1000 of the 10000 test images, and ``notes`` says so.

    Raises:
        DatasetNotFoundError: the files are missing and download is disabled or failed.
        ValueError: unknown ``name`` or a ``val_size`` outside ``[0, N_train_file)``.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    spec = DATASETS[name]
    root, how = _resolve_root(data_root)

    loaded = spec.read(root)
    if loaded is None:
        if not download:
            outcome = "not attempted (download=False)."
        else:
            try:
                if downloader is not None:
                    downloader(name, root)
                else:
                    spec.download(root)
            except Exception as e:
                # Any failure (DNS, HTTP, checksum, permissions) ends in the same clear error.
                first = str(e).strip().splitlines()
                outcome = f"tried and failed ({type(e).__name__}: {first[0] if first else ''})."
            else:
                outcome = "tried; it finished but the files are still missing."
            loaded = spec.read(root)
        if loaded is None:
            raise _not_found(name, spec, root, how, outcome)
    train_full, test, notes = loaded

    n_full = train_full.shape[0]
    val_size = spec.default_val_size if val_size is None else val_size
    if isinstance(val_size, bool) or not isinstance(val_size, int):
        raise ValueError(f"val_size must be an int, got {type(val_size).__name__}")
    if not 0 <= val_size < n_full:
        raise ValueError(
            f"val_size={val_size} for {name!r}: must be in [0, {n_full}) "
            f"(the training file has {n_full} images)"
        )
    for split, x in (("train", train_full), ("test", test)):
        if tuple(x.shape[1:]) != spec.x_shape or x.dtype != torch.uint8:
            raise ValueError(
                f"{name} {split}: loaded {x.dtype} {tuple(x.shape)}, expected uint8 "
                f"(N, {', '.join(map(str, spec.x_shape))}); the files under {root} are not "
                f"{name} — check the data root"
            )
    n_train = n_full - val_size
    return DataSplits(
        train=train_full[:n_train],
        val=train_full[n_train:],
        test=test,
        x_shape=spec.x_shape,
        kind=spec.kind,
        name=name,
        notes=list(notes),
    )


# ---------------------------------------------------------------------------------------
# Packing CIFAR-10
# ---------------------------------------------------------------------------------------


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    """Write an npz atomically: a temp file in the same folder, then os.replace."""
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)  # a file object, not a name: np.savez would append ".npz"


def pack_cifar10(src_root: str | os.PathLike, dst_root: str | os.PathLike) -> list[Path]:
    """Convert torchvision's ``cifar-10-batches-py`` into the packed npz layout.

    Reads ``data_batch_1..5`` and ``test_batch`` (pickled dicts with ``data`` uint8
    ``(N, 3072)`` CHW-flattened and ``labels``) and writes
    ``<dst_root>/CIFAR10/cifar10_{train,test}.npz`` with ``x`` uint8 ``(N, 32, 32, 3)`` HWC
    and ``y`` uint8 ``(N,)``, each file atomically. The pickles are read with an unpickler
    that allows only numpy arrays.

    Args:
        src_root: the folder that contains ``cifar-10-batches-py``, or that folder itself.
        dst_root: the data root to write into.

    Returns:
        The written paths ``[train_npz, test_npz]``.

    Raises:
        DatasetNotFoundError: a batch file is missing.
    """
    src = Path(src_root).expanduser()
    batches = src if (src / _CIFAR_TRAIN_FILES[0]).exists() else _cifar_batches_dir(src)
    missing = [
        batches / f for f in _CIFAR_TRAIN_FILES + _CIFAR_TEST_FILES if not (batches / f).exists()
    ]
    if missing:
        raise DatasetNotFoundError(
            f"cannot pack CIFAR-10: missing {', '.join(str(p) for p in missing)}. Pass the "
            f"folder that contains {_CIFAR_BATCHES}/ (torchvision's CIFAR-10 download, the "
            "extracted cifar-10-python.tar.gz) as the source."
        )
    arrays = _read_cifar_batches(batches)
    out = []
    npz = _cifar_npz_paths(Path(dst_root).expanduser())
    # An interrupted earlier pack leaves a temp file as large as the npz (150 MB).
    remove_stale_temps(npz["train"].parent, final_names={p.name for p in npz.values()})
    for split, path in npz.items():
        x, y = arrays[split]
        _atomic_savez(path, x=np.ascontiguousarray(x.transpose(0, 2, 3, 1)), y=y)
        out.append(path)
    return out
