"""Atomic file writes: readers see the old file or the new one, never half of one.

The one mechanism behind checkpoints, configs, metrics rewrites, images, packed data,
reports and sweep records. Standard library only, so the bottom-layer modules
(``checkpoint``, ``logger``) and the torch-free ones (``report``) can all use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "write_text_atomic", "write_json_atomic"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temp file beside ``path``; on success fsync it and rename it over ``path``.

    The temp file has a unique name (two writers never share one) and no suffix that a
    writer might interpret, so image/array writers should be told the format
    explicitly. On any exception, KeyboardInterrupt included, the temp file is removed
    and ``path`` is left untouched.

    Args:
        path: the final file; missing parent folders are created.
        mode: ``"w"`` (text, UTF-8) or ``"wb"`` (binary).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` atomically."""
    with atomic_write(path) as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Replace ``path`` with ``data`` as indented JSON atomically (``str`` for the rest)."""
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")
