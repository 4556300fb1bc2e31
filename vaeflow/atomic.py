"""Atomic file writes: readers see the old file or the new one, never half of one.

The one mechanism behind checkpoints, configs, metrics rewrites, images, packed data,
reports and sweep records. Standard library only, so the bottom-layer modules
(``checkpoint``, ``logger``) and the torch-free ones (``report``) can all use it.

A process killed inside a write (SIGKILL, preemption, power loss) cannot remove its
temporary file, which for a checkpoint is as large as the checkpoint.
:func:`remove_stale_temps` finds and removes such leftovers; it is the only code that
knows what the temporary names look like (:func:`is_atomic_temp`), and it never removes
the temporary file of a write that is still running (see there).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import stat
import tempfile
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # Windows: no flock; see remove_stale_temps for what replaces it
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "atomic_write",
    "write_text_atomic",
    "write_json_atomic",
    "is_atomic_temp",
    "atomic_temp_files",
    "remove_stale_temps",
]

# The names atomic_write gives its temporary files: mkstemp(prefix=".<final name>.",
# suffix=".tmp") inserts 8 characters from tempfile's alphabet (a-z, 0-9, _). Anything
# else (".notes.tmp", "x.tmp", ".last.pt.tmp") is not ours and must never match.
_TEMP_NAME = re.compile(r"\.(?P<final>.+)\.[a-z0-9_]{8}\.tmp")

# About when this process started (the first import of this module). Only used where a
# writer's lock cannot be tested: temp files modified before it are taken as abandoned.
_STARTED = time.time()


def _lock(fd: int) -> int | None:
    """Hold an exclusive ``flock`` on the open file ``fd``; return the descriptor holding it.

    The lock lives on a duplicate descriptor, so closing the file object after the
    fsync keeps it until the rename is done. ``None`` where the platform or the file
    system has no ``flock`` (the write then goes ahead unlocked).
    """
    if fcntl is None:
        return None
    held = os.dup(fd)
    try:
        # Blocking: the only other holder can be remove_stale_temps, for microseconds.
        fcntl.flock(held, fcntl.LOCK_EX)
    except OSError:
        os.close(held)
        return None
    return held


def _same_file(name: str | Path, fd: int) -> bool:
    """Whether ``name`` still names the file open as ``fd``."""
    try:
        a, b = os.stat(name, follow_symlinks=False), os.fstat(fd)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _new_temp(path: Path) -> tuple[int, str, int | None]:
    """Create and lock the temp file for ``path``: ``(fd, name, lock descriptor)``."""
    while True:
        # mkstemp's names are the ones _TEMP_NAME matches: keep the two in step.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        held = _lock(fd)
        if held is None or _same_file(tmp, fd):
            return fd, tmp, held
        # A cleaner in another process took this file in the instant between its creation
        # and our lock, and removed it as abandoned: start again with a new name.
        os.close(held)
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temp file beside ``path``; on success fsync it and rename it over ``path``.

    The temp file is ``.<name>.<8 random characters>.tmp`` (two writers never share
    one) and has no suffix that a writer might interpret, so image/array writers should
    be told the format explicitly. On any exception, KeyboardInterrupt included, the temp
    file is removed and ``path`` is left untouched; a killed process leaves it behind for
    :func:`remove_stale_temps`. Until the rename, the temp file is ``flock``-ed, which is
    how :func:`remove_stale_temps` tells a running write from an abandoned one.

    Args:
        path: the final file; missing parent folders are created.
        mode: ``"w"`` (text, UTF-8) or ``"wb"`` (binary).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp, held = _new_temp(path)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        if held is not None:
            os.close(held)  # releases the lock, after the rename or the removal


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` atomically."""
    with atomic_write(path) as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Replace ``path`` with ``data`` as indented JSON atomically (``str`` for the rest)."""
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def is_atomic_temp(name: str, final_names: Collection[str] | None = None) -> bool:
    """Whether ``name`` is a temp-file name that :func:`atomic_write` creates.

    That is ``.<final name>.<8 of a-z 0-9 _>.tmp``; with ``final_names``, only the temp
    files of writes to those names.
    """
    m = _TEMP_NAME.fullmatch(name)
    return m is not None and (final_names is None or m["final"] in final_names)


def atomic_temp_files(
    directory: str | os.PathLike,
    recursive: bool = False,
    final_names: Collection[str] | None = None,
) -> list[Path]:
    """The regular files in ``directory`` named like :func:`atomic_write`'s temp files.

    Sorted; symbolic links are neither listed nor followed. Whether a writer is still
    using one is not checked here (that is :func:`remove_stale_temps`' job).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    walk = os.walk(directory) if recursive else itertools.islice(os.walk(directory), 1)
    found = []
    for folder, _, files in walk:
        for name in files:
            if not is_atomic_temp(name, final_names):
                continue
            p = Path(folder, name)
            with contextlib.suppress(OSError):  # gone meanwhile: renamed into place
                if stat.S_ISREG(p.lstat().st_mode):
                    found.append(p)
    return sorted(found)


def _remove_if_abandoned(path: Path) -> int | None:
    """Remove ``path`` if no running write holds it; return its size, or ``None`` if kept."""
    if fcntl is not None:
        try:
            # Read-write: NFS emulates flock with byte-range locks, which need it.
            fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
        except OSError:  # gone (renamed into place meanwhile) or not ours to read
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None  # a running write holds it
            except OSError:  # this file system has no flock: fall back on the age rule
                if os.fstat(fd).st_mtime >= _STARTED:
                    return None
            if not _same_file(path, fd):
                return None  # the write finished and renamed it while we waited
            size = os.fstat(fd).st_size
            os.unlink(path)  # still holding the lock: a writer cannot take the file now
            return size
        except OSError:
            return None
        finally:
            os.close(fd)
    try:
        st = path.lstat()
        if st.st_mtime >= _STARTED:
            return None
        path.unlink()  # on Windows this fails while a writer has the file open
        return st.st_size
    except OSError:
        return None


def _format_size(n: int) -> str:
    size, unit = float(n), "B"
    for larger in ("kB", "MB", "GB"):
        if size < 999.95:  # would not print as 1000.0
            break
        size, unit = size / 1000, larger
    return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"


def remove_stale_temps(
    directory: str | os.PathLike,
    recursive: bool = False,
    final_names: Collection[str] | None = None,
    announce: bool = True,
) -> list[Path]:
    """Remove the temp files that writes killed inside :func:`atomic_write` left behind.

    Only names :func:`is_atomic_temp` accepts are considered (with ``final_names``: only
    the temp files of those final names), never any other file. A temp file whose write
    is still running — another process writing into the same directory, e.g. ``vaeflow
    eval`` writing ``summary.json`` while a run resumes, or a training still saving a
    checkpoint while its run is evaluated — is kept: every write holds an exclusive
    ``flock`` on its temp file until the rename, the kernel drops it when the writer dies
    however it dies, and a file is removed only by a caller that gets that lock, so no
    timing assumption is involved. Where ``flock`` is unavailable (Windows, a network file
    system without locking), a file is taken as abandoned only if it was last modified
    before this process started, and Windows refuses to remove a file a writer has open.
    Locks that a file system keeps per host (NFS mounted ``nolock``) do not show a write
    running on another host; that is why callers clean only what their process owns (a
    run cleans its run directory when it starts, ``vaeflow eval`` only the top level).

    Args:
        directory: the folder to clean (nothing happens if it does not exist).
        recursive: also every folder below it (symbolic links are not followed).
        final_names: only temp files of writes to these file names.
        announce: print one line naming what was removed (nothing if nothing was).

    Returns:
        The removed paths.
    """
    directory = Path(directory)
    removed: list[tuple[Path, int]] = []
    for path in atomic_temp_files(directory, recursive, final_names):
        size = _remove_if_abandoned(path)
        if size is not None:
            removed.append((path, size))
    if announce and removed:
        files = ", ".join(
            f"{p.relative_to(directory).as_posix()} ({_format_size(s)})" for p, s in removed
        )
        n = len(removed)
        what = (
            "file left by an interrupted write" if n == 1 else "files left by interrupted writes"
        )
        print(f"removed {n} temporary {what} in {directory}: {files}", flush=True)
    return [p for p, _ in removed]
