"""Atomic checkpoints that load with ``torch.load(weights_only=True)``, and RNG state.

A checkpoint is a plain ``dict`` of tensors, ``state_dict``\\ s, plain Python containers,
numbers and strings — by convention ``{"model", "optimizer", "step", "config", "rng"}``
with the config as a plain dict (never a pickled Namespace or dataclass) and the RNG
states from :func:`rng_state` as tensors. Two guarantees:

* **Safe to load.** :func:`load_checkpoint` always uses ``weights_only=True``, so a
  checkpoint cannot run code when it is read; :func:`save_checkpoint` checks *before*
  writing that everything inside is something that loader accepts, and names the key
  path of the first offending object, e.g. ``state['config']['x'] is a <class
  'pathlib.PosixPath'>``. A checkpoint that saves therefore always loads.
* **Atomic.** :func:`save_checkpoint` writes to a temporary file in the same directory,
  flushes and ``fsync``\\ s it, then ``os.replace``\\ s it over the target. A run killed
  mid-save leaves the previous checkpoint intact and no half-written ``last.pt``.

This module imports no other vaeflow module (docs/design.md §2).
"""

from __future__ import annotations

import os
import pickle
import random
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_write

__all__ = [
    "load_model_state",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "validate_state",
    "rng_state",
    "set_rng_state",
]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, unsafe to unpickle or lacks required keys.

    The message names the file and says what to do.
    """


# Exact types accepted by torch's weights_only unpickler (torch/_weights_only_unpickler.py)
# that a training state needs. Exact, not isinstance: numpy.float64 *is* a float subclass
# and enum.IntEnum an int subclass, but both pickle as their own class, which the
# weights_only loader refuses.
_LEAF_TYPES: tuple[type, ...] = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    torch.Tensor,
    torch.nn.Parameter,
    torch.dtype,
    torch.device,
    torch.Size,
)
_MAPPING_TYPES: tuple[type, ...] = (dict, OrderedDict)
_SEQUENCE_TYPES: tuple[type, ...] = (list, tuple)
# Keys of dicts: module state_dicts use str, optimizer state uses int parameter ids.
_KEY_TYPES: tuple[type, ...] = (type(None), bool, int, float, str)


def _hint(obj: Any) -> str:
    """A short fix suggestion for a common offending type."""
    if isinstance(obj, os.PathLike):
        return "convert it with str(path)"
    if isinstance(obj, np.ndarray):
        return "convert it with torch.from_numpy(array) (or .tolist())"
    if isinstance(obj, np.generic):
        return "convert it with .item() (or int()/float())"
    if isinstance(obj, torch.Tensor):
        return "store a plain tensor (e.g. tensor.detach().clone().as_subclass(torch.Tensor))"
    if isinstance(obj, torch.nn.Module | torch.optim.Optimizer):
        return "store its .state_dict() instead of the object"
    if hasattr(obj, "__dataclass_fields__"):
        return "convert the config with vaeflow.config.to_dict (or dataclasses.asdict)"
    if isinstance(obj, set | frozenset):
        return "convert it with sorted(...) or list(...)"
    return (
        "store only tensors, state_dicts, dict/list/tuple, numbers, strings and None "
        "(convert it to one of those)"
    )


def validate_state(state: Mapping[str, Any], name: str = "state") -> None:
    """Check that ``torch.load(weights_only=True)`` will be able to read ``state``.

    Walks every container; shared and self-referencing containers are visited once.

    Args:
        state: the checkpoint dict.
        name: how the root is called in error messages.

    Raises:
        TypeError: naming the key path of the first object (or dict key) that is not a
            tensor, a plain container, a number, a string, ``None``, a dtype or a device,
            e.g. ``state['config']['x'] is a <class 'pathlib.PosixPath'>``, with a fix.
    """
    if type(state) not in _MAPPING_TYPES:
        raise TypeError(
            f"a checkpoint state must be a dict, got a {type(state)}; "
            "pass e.g. {'model': model.state_dict(), 'step': step, ...}"
        )
    seen: set[int] = set()
    # Iterative depth-first walk: state_dicts of deep models would not hit the recursion
    # limit anyway, but a stack keeps the path bookkeeping in one place.
    stack: list[tuple[str, Any]] = [(name, state)]
    while stack:
        path, obj = stack.pop()
        kind = type(obj)
        if kind in _MAPPING_TYPES:
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            for key, value in obj.items():
                if type(key) not in _KEY_TYPES:
                    raise TypeError(
                        f"{path} has a key {key!r} that is a {type(key)}; checkpoint dict "
                        "keys must be str, int, float, bool or None (weights_only=True "
                        "loading refuses other types)"
                    )
                stack.append((f"{path}[{key!r}]", value))
        elif kind in _SEQUENCE_TYPES:
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            stack.extend((f"{path}[{i}]", value) for i, value in enumerate(obj))
        elif kind not in _LEAF_TYPES:
            raise TypeError(
                f"{path} is a {kind}, which torch.load(weights_only=True) cannot read back; "
                f"{_hint(obj)}"
            )


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX); a no-op where unsupported."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not support fsync on directories; the data is synced
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically, loadable with ``weights_only=True``.

    The bytes go to a temporary file ``.<name>.<random>.tmp`` next to ``path``, are
    flushed and fsync'ed, and the file is then renamed over ``path`` with ``os.replace``
    (atomic on POSIX and Windows within one file system). If anything fails — a full
    disk, a kill signal between the write and the rename, an unsaveable object — the old
    file at ``path`` is untouched and the temporary file is removed (a hard kill can leave
    a ``.*.tmp`` file behind, never a half-written ``path``; :func:`vaeflow.run.train.train`
    removes such leftovers when a run starts or resumes, with
    :func:`vaeflow.atomic.remove_stale_temps`). Missing parent directories are created.

    Args:
        path: target file, e.g. ``run_dir / "checkpoints" / "last.pt"``.
        state: a dict of tensors, ``state_dict``\\ s, dict/list/tuple, numbers, strings,
            ``None``, dtypes and devices; e.g. ``{"model": model.state_dict(),
            "optimizer": opt.state_dict(), "step": step, "config": to_dict(cfg),
            "rng": rng_state()}``.

    Raises:
        TypeError: ``state`` holds something ``weights_only`` loading would refuse; the
            message names its key path (nothing is written).
    """
    validate_state(state)
    path = Path(path)
    with atomic_write(path, "wb") as f:  # a KeyboardInterrupt mid-save leaves no temp file
        torch.save(state, f)
    _fsync_directory(path.parent)


def _check_map_location(map_location: Any) -> None:
    """Reject a CUDA ``map_location`` on a machine without CUDA before reading the file,
    so that error is not mistaken for a corrupt checkpoint."""
    if isinstance(map_location, str | torch.device):
        device = torch.device(map_location)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CheckpointError(
                f"map_location={map_location!r} asks for CUDA but torch.cuda.is_available() "
                "is False; load with map_location='cpu' and move the model afterwards"
            )


def load_checkpoint(
    path: str | os.PathLike[str],
    map_location: str | torch.device | Any = "cpu",
    required: Sequence[str] = (),
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, with ``weights_only=True``.

    Args:
        path: the checkpoint file.
        map_location: where tensors go (``torch.load``'s argument); ``"cpu"`` by default
            so a GPU checkpoint loads anywhere.
        required: top-level keys that must be present, e.g. ``("model", "step")``.

    Returns:
        The state dict as saved.

    Raises:
        CheckpointError: the file does not exist; it is corrupt or truncated (e.g. a run
            killed during a non-atomic copy); it holds pickled Python objects that
            ``weights_only`` refuses to execute; it is not a dict; or it lacks keys in
            ``required``. Each message names the file and says what to do.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise CheckpointError(
            f"checkpoint {path} {what}. Check RUN_DIR (the run directory should contain "
            f"checkpoints/last.pt or checkpoints/best.pt), or start the run without "
            "--resume to train from scratch"
        )
    _check_map_location(map_location)
    # Read one byte first: an OSError here is a permission or disk problem, while torch's
    # zip reader also raises OSError (EINVAL) for a truncated file, which is corruption.
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {e}. Check the file's permissions and the disk"
        ) from e
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - every parse failure is reported, none executed
        if isinstance(e, pickle.UnpicklingError) and _names_unsafe_global(str(e)):
            # The file parses but holds pickled classes or functions (torch.save(model), a
            # pickled Namespace, ...); unpickling those could run code, so it is refused.
            raise CheckpointError(
                f"refusing to load checkpoint {path}: it holds pickled Python objects other "
                "than tensors and plain containers, and loading those could execute "
                "arbitrary code (torch.load with weights_only=True refuses them). Re-save it "
                "with vaeflow.run.checkpoint.save_checkpoint (state_dicts and a plain config "
                "dict); only if you trust the file, convert it once with "
                f"torch's loader with weights_only=False. Loader message: {_unpickler_reason(e)}"
            ) from e
        others = {"last.pt": "best.pt", "best.pt": "last.pt"}
        other = others.get(path.name)
        alternative = (
            f"the other checkpoint ({path.with_name(other)})"
            if other
            else "another checkpoint of the run (checkpoints/last.pt or checkpoints/best.pt)"
        )
        reason = "the file is empty" if path.stat().st_size == 0 else _unpickler_reason(e)
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated (e.g. a run killed during a "
            f"non-atomic copy, or a full disk). Resume from {alternative}, or delete this "
            f"file and start without --resume. Loader message: {type(e).__name__}: {reason}"
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(state)}, not a dict; it was not written by "
            "vaeflow.run.checkpoint.save_checkpoint. Point --resume at a vaeflow checkpoint"
        )
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks required keys {missing} (it has {sorted(map(str, state))}); "
            "it may come from an older vaeflow version or another program. Resume from a "
            "checkpoint written by this version, or start without --resume"
        )
    return state


def _names_unsafe_global(message: str) -> bool:
    """Whether a weights_only failure is a refused class/function (not a parse error)."""
    return (
        "Unsupported global" in message
        or "allowlisted" in message
        or ("GLOBAL" in message and "blocked" in message)
    )


def _unpickler_reason(error: BaseException) -> str:
    """The informative line of a torch.load error (its message is many lines long)."""
    message = str(error)
    marker = "WeightsUnpickler error:"
    if marker in message:
        # torch wraps the reason in paragraphs of advice; keep just the reason.
        message = message.split(marker, 1)[1]
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[0][:300] if lines else repr(error)


def rng_state() -> dict[str, Any]:
    """Capture every global random number generator a training run draws from.

    Returns:
        ``{"python": {...}, "numpy": {...}, "torch": ByteTensor, "cuda": [ByteTensor, ...]}``
        — Python's ``random``, NumPy's legacy global ``np.random`` (MT19937), torch's CPU
        generator and, when CUDA is available, every CUDA device's generator (an empty
        list otherwise). Everything is a tensor, int, float, str or ``None``, so the dict
        goes through :func:`save_checkpoint` and ``weights_only`` loading. Other
        accelerators (MPS, XPU) are not captured.
    """
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "python": {
            "version": int(version),
            # 625 ints < 2**32: int64 holds them exactly.
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "bit_generator": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the generators captured by :func:`rng_state`.

    CUDA states are restored device by device. If the checkpoint has CUDA states but this
    machine has none (or fewer devices), the rest is restored and a ``UserWarning`` says
    which CUDA generators were not.

    Args:
        state: the dict returned by :func:`rng_state` (possibly after a save/load round
            trip, with tensors on any device).

    Raises:
        ValueError: a part is missing or malformed; the message names it.
    """
    missing = [key for key in ("python", "numpy", "torch") if key not in state]
    if missing:
        raise ValueError(
            f"RNG state lacks {missing} (it has {sorted(map(str, state))}); pass the dict "
            "returned by vaeflow.run.checkpoint.rng_state()"
        )
    try:
        py = state["python"]
        random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss_next"]))
        npy = state["numpy"]
        np.random.set_state(
            (
                npy["bit_generator"],
                npy["keys"].cpu().numpy().astype(np.uint32),
                npy["pos"],
                npy["has_gauss"],
                npy["cached_gaussian"],
            )
        )
        # The generators want CPU ByteTensors even for CUDA; map_location may have moved them.
        torch.set_rng_state(state["torch"].cpu())
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise ValueError(
            f"malformed RNG state ({type(e).__name__}: {e}); pass the dict returned by "
            "vaeflow.run.checkpoint.rng_state()"
        ) from e
    cuda_states = list(state.get("cuda", []))
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for device, cuda_state in enumerate(cuda_states[:available]):
        torch.cuda.set_rng_state(cuda_state.cpu(), device)
    if len(cuda_states) > available:
        warnings.warn(
            f"the RNG state has {len(cuda_states)} CUDA generator(s) but this machine has "
            f"{available} CUDA device(s); the others were not restored, so random draws on "
            "the GPU will differ from the original run",
            stacklevel=2,
        )


def load_model_state(model: Any, state: Mapping[str, Any], where: str = "checkpoint") -> None:
    """``model.load_state_dict(state)`` (strict), with a hint for known format changes.

    A checkpoint written before encoders recorded their input centring (the
    ``center_inputs`` buffer) is refused with what to do, rather than loaded into a model
    whose encoder now sees differently scaled inputs.

    Raises:
        CheckpointError: the state does not fit the model.
    """
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        message = str(e)
        if "center_inputs" in message and "Missing key" in message:
            raise CheckpointError(
                f"{where} predates the encoder's recorded input centring (center_inputs): "
                "vaeflow before commit 7340d0a centred MLP and gated-conv encoder inputs "
                "(2x - 1) by default and now feeds raw x. Evaluate it with the version that "
                "wrote it, or add `center = true` to [model.encoder] options in the run's "
                "config.json and load the state with strict=False."
            ) from None
        raise CheckpointError(
            f"{where} does not fit the model built from its config: {e}"
        ) from None
