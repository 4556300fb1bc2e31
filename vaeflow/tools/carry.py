"""Carry unfinished runs from one machine to the next: a run directory <-> one checked file.

Run directories live under ``run.root``, outside the repository, and last as long as the
machine that trains them. A run longer than one working session on machines that are
replaced between sessions (the paper-budget runs of ``experiments/*/long.toml``) would
start over every time. :func:`pack_run` writes a stopped run's whole state — configs,
``metrics.jsonl``, TensorBoard events, ``checkpoints/last.pt`` and ``best.pt``, a partial
evaluation — into one gzipped tar with a manifest of SHA-256 sums; :func:`unpack_run` puts
it back under another machine's run root, after checking every byte, and the run then
resumes there exactly as it would have on the first machine (``vaeflow train --resume`` or
``vaeflow sweep``, which resumes unfinished points).

    vaeflow carry pack /work/runs/burda2016_iwae_long/vae_k1 -o results/in_flight
    vaeflow carry unpack results/in_flight --root /work/runs

Packs are named ``<sweep folder>/<run name>.run.tar.gz`` (the sweep folder is the run
directory's parent). Unpacking never leaves a half-written run directory (it extracts
beside the target and renames), and never replaces an existing one unless asked to
(``force``), since that one may hold newer steps than the pack.

Pack a run only while no process writes to it: a checkpoint being replaced mid-pack would
give a pack whose files disagree (the manifest cannot tell). Packing and unpacking hold the
run's files in memory (tens of MB for the MLP runs here). Checkpoints barely compress: a
pack is about the size of the run directory, so committing packs to a repository suits
small runs only (or Git LFS).

No torch (the standard library and the torch-free ``read_metrics``): packing and
unpacking do not load checkpoints; the run checks them itself when it resumes
(``weights_only=True``).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from ..atomic import atomic_write, is_atomic_temp
from ..run.logger import read_metrics

__all__ = ["MANIFEST", "PACK_SUFFIX", "add_carry_parser", "pack_run", "read_pack", "unpack_run"]

PACK_SUFFIX = ".run.tar.gz"
#: The first member of every pack: ``{"format", "sweep", "run", "step", "files": {relative
#: path: sha256}}``; the run's files follow under ``run/``.
MANIFEST = "vaeflow_carry.json"
_FILES = "run/"
_FORMAT = 1


def _plain_name(value: Any) -> bool:
    """One non-empty path component: no separator, not ``.`` or ``..``."""
    return (
        isinstance(value, str)
        and value not in ("", ".", "..")
        and "/" not in value
        and "\\" not in value
        and PurePosixPath(value).name == value
    )


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (POSIX; a no-op where a folder
    cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _last_step(run_dir: Path) -> int | None:
    """The last step logged in ``metrics.jsonl`` (what a reader compares two copies by)."""
    try:
        with warnings.catch_warnings():  # a line cut by a kill: skipped, as the run does
            warnings.simplefilter("ignore")
            rows = read_metrics(run_dir)
    except FileNotFoundError:
        return None
    steps = [row["step"] for row in rows if isinstance(row.get("step"), int)]
    return steps[-1] if steps else None


def pack_run(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Write ``run_dir``'s state to ``out_dir/<sweep folder>/<run>.run.tar.gz`` (atomically).

    Every regular file under the run directory goes in, except the temporary files of
    an interrupted atomic write. An existing pack of the same run is replaced.

    Returns:
        The pack's path.

    Raises:
        FileNotFoundError: ``run_dir`` is not a run directory (no ``config.json``).
    """
    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise FileNotFoundError(f"{run} is not a run directory (no config.json): nothing to pack")
    links = sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_symlink())
    if links:
        warnings.warn(f"{run}: symbolic links are not packed: {', '.join(links)}", stacklevel=2)
    files = sorted(
        p
        for p in run.rglob("*")
        if p.is_file()
        and not p.is_symlink()
        and not is_atomic_temp(p.name)
        and not p.name.endswith(PACK_SUFFIX)  # a pack written into the run itself
    )
    contents = {p.relative_to(run).as_posix(): p.read_bytes() for p in files}
    manifest = {
        "format": _FORMAT,
        "sweep": run.resolve().parent.name,
        "run": run.resolve().name,
        "step": _last_step(run),
        "files": {rel: hashlib.sha256(data).hexdigest() for rel, data in contents.items()},
    }
    if not _plain_name(manifest["sweep"]) or not _plain_name(manifest["run"]):
        raise ValueError(
            f"{run}: cannot name a pack after {manifest['sweep']!r}/{manifest['run']!r}"
        )
    target = Path(out_dir) / manifest["sweep"] / f"{manifest['run']}{PACK_SUFFIX}"
    target.parent.mkdir(parents=True, exist_ok=True)
    members = {
        MANIFEST: json.dumps(manifest, indent=1).encode(),
        **{_FILES + rel: data for rel, data in contents.items()},
    }
    # gzip with no time stamp or file name in its header: packing an unchanged run gives
    # the same bytes (the same blob, where packs are committed).
    with (
        atomic_write(target, "wb") as f,
        gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o600, 0
            tar.addfile(info, io.BytesIO(data))
    return target


def read_pack(pack: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest and the checked files of a pack.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a readable pack, a member outside the run (absolute, ``..``, a
            link), a file missing from the pack or not in its manifest, or a file whose
            SHA-256 differs from the manifest's — the file is named.
    """
    path = Path(pack)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such pack")
    files: dict[str, bytes] = {}
    manifest: dict[str, Any] | None = None
    try:
        with tarfile.open(path, mode="r:gz") as tar:
            for info in tar:
                name = PurePosixPath(info.name)
                if (
                    not info.isfile()
                    or name.is_absolute()
                    or ".." in name.parts
                    or not (info.name == MANIFEST or info.name.startswith(_FILES))
                ):
                    raise ValueError(f"{path}: member {info.name!r} is not a file inside the run")
                data = tar.extractfile(info).read()  # type: ignore[union-attr]
                if info.name == MANIFEST:
                    manifest = json.loads(data)
                else:
                    files[info.name.removeprefix(_FILES)] = data
    except (
        tarfile.TarError,
        EOFError,
        OSError,
        zlib.error,
        UnicodeDecodeError,
        json.JSONDecodeError,
    ) as e:
        raise ValueError(f"{path} is not a readable run pack ({e}); pack the run again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise ValueError(
            f"{path} has no {MANIFEST} of format {_FORMAT}: not a `vaeflow carry` pack"
        )
    if not _plain_name(manifest.get("sweep")) or not _plain_name(manifest.get("run")):
        raise ValueError(
            f"{path}: the manifest's sweep {manifest.get('sweep')!r} and run "
            f"{manifest.get('run')!r} must be plain folder names"
        )
    expected = manifest.get("files")
    if not isinstance(expected, dict):
        raise ValueError(
            f"{path}: its {MANIFEST} has no table of files: not a `vaeflow carry` pack"
        )
    for rel in sorted(set(expected) | set(files)):
        if rel not in files:
            raise ValueError(f"{path}: {rel} is in the manifest but not in the pack")
        if rel not in expected:
            raise ValueError(f"{path}: {rel} is in the pack but not in its manifest")
        if hashlib.sha256(files[rel]).hexdigest() != expected[rel]:
            raise ValueError(
                f"{path}: {rel} does not match its SHA-256 in the manifest (the pack is "
                "corrupt); nothing was extracted"
            )
    return manifest, files


def unpack_run(
    pack: str | os.PathLike[str], root: str | os.PathLike[str], force: bool = False
) -> Path:
    """Put a packed run back at ``root/<sweep folder>/<run>``.

    Every file is checked against the manifest before anything is written; the run is
    extracted beside its target and renamed into place, so an interrupted unpack leaves
    no half-written run directory.

    Args:
        pack: written by :func:`pack_run`.
        root: the run root of this machine (a sweep's ``root``).
        force: replace an existing run directory of the same sweep and run.

    Returns:
        The run directory.

    Raises:
        FileExistsError: the run directory exists and ``force`` is not set (both steps
            are named; nothing is changed).
        FileNotFoundError, ValueError: as for :func:`read_pack`.
    """
    manifest, files = read_pack(pack)
    target = Path(root) / manifest["sweep"] / manifest["run"]
    if target.exists() and not force:
        raise FileExistsError(
            f"{target} exists (last logged step {_last_step(target)}; the pack's is "
            f"{manifest['step']}): nothing unpacked; remove it, or unpack with --force to "
            "replace it"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    # Staged beside the target (same file system: the rename is atomic) under a hidden
    # name, which `vaeflow report` never takes for a run.
    staging = Path(
        tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".unpack", dir=target.parent)
    )
    old = target.with_name(f".{target.name}.replaced")
    moved_aside = False
    try:
        staging.chmod(0o755)
        for rel, data in files.items():
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            dest.chmod(0o600)
        for folder in {(staging / rel).parent for rel in files}:
            _fsync_dir(folder)
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            moved_aside = True
        staging.rename(target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if moved_aside and not target.exists():
            old.rename(target)  # put back the run that was there
        raise
    if moved_aside:
        shutil.rmtree(old)
    return target


def _packs(paths: Sequence[str]) -> list[Path]:
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        found += sorted(p.rglob(f"*{PACK_SUFFIX}")) if p.is_dir() else [p]
    if not found:
        raise FileNotFoundError(f"no *{PACK_SUFFIX} under {', '.join(paths)}")
    return found


def _carry_command(args: argparse.Namespace) -> int:
    try:
        if args.carry_command == "pack":
            idents = [(r.parent.name, r.name) for r in (Path(x).resolve() for x in args.runs)]
            twice = sorted({"/".join(i) for i in idents if idents.count(i) > 1})
            if twice:
                raise ValueError(f"two runs given would both be packed as {', '.join(twice)}")
            for run in args.runs:
                path = pack_run(run, args.out)
                print(f"packed   {run} -> {path} ({path.stat().st_size / 2**20:.1f} MiB)")
        else:
            for pack in _packs(args.packs):
                run = unpack_run(pack, args.root, force=args.force)
                print(f"unpacked {pack} -> {run}")
    except ValueError as e:
        raise SystemExit(f"vaeflow carry: error: {e}") from None
    return 0


def add_carry_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``carry pack RUN... -o DIR`` and ``carry unpack PACK|DIR... --root ROOT
    [--force]``."""
    p = subparsers.add_parser(
        "carry",
        help="pack a stopped run's state into one checked file, or unpack it on another machine",
        description="Carry unfinished runs between machines (vaeflow.tools.carry): pack a "
        "stopped run directory into <sweep>/<run>.run.tar.gz with SHA-256 sums; unpack "
        "checks every file, puts the run back under a run root, and the run resumes there.",
    )
    sub = p.add_subparsers(dest="carry_command", required=True)
    pk = sub.add_parser("pack", help="run directories -> packs")
    pk.add_argument("runs", nargs="+", help="stopped run directories")
    pk.add_argument("-o", "--out", required=True, help="folder of packs (<sweep>/<run>...)")
    up = sub.add_parser("unpack", help="packs -> run directories")
    up.add_argument("packs", nargs="+", help=f"*{PACK_SUFFIX} files, or folders of them")
    up.add_argument("--root", required=True, help="this machine's run root")
    up.add_argument(
        "--force", action="store_true", help="replace an existing run directory of the same run"
    )
    p.set_defaults(func=_carry_command)
    return p
