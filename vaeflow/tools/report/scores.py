"""Per-image test scores kept beside a report (``test_scores.pt``), so that its rows can be
paired image by image (``--paired-against``) after their run directories are gone.

Run directories live outside the repository and rarely outlive the machine that trained
them, while a report's ``results.json`` is committed and reported again with
``--from-report``. Without the runs' per-image scores such stored rows can only be
compared by their own standard errors, which are 5-10x wider than a paired difference on
the same test images. A report written with ``keep_scores`` stores every evaluated run's
``log p(x)`` and ELBO per test image next to its ``results.json``; a later report that
reads that ``results.json`` finds them there and pairs the stored rows as if their run
directories were given.

File layout (written with :func:`vaeflow.run.checkpoint.save_checkpoint`, read with
``weights_only=True``)::

    {"format": 1,
     "runs": {"<sweep folder>/<run name>": {
         "evaluation": {...},           # test_scores.pt's: k, test images, checkpoint, ...
         "dataset": str, "test_data": str,
         "indices": int32 (n,),         # test-set index of each scored image
         "log_px": float32 (n,), "elbo": float32 (n,)}}}

Scores are stored in float32 (about 120 KB per run of 10,000 images): the rounding is at
most 1e-5 nats per image for NLLs below 128 nats, far below the tables' precision and the
per-image differences' standard errors.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ...run.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .collect import _run_identity

#: The file a report keeps its runs' per-image scores in, beside ``results.json``.
SCORES_FILE = "test_scores.pt"
_FORMAT = 1


def _reported_nll(record: Mapping[str, Any]) -> float | None:
    """The record's test NLL (``test/nll_iw<k>_nats``), or None."""
    for name, value in record["metrics"].items():
        if re.fullmatch(r"test/nll_iw\d+_nats", name):
            return float(value)
    return None


def _consistent(record: Mapping[str, Any], scores: Mapping[str, Any]) -> bool:
    """The scores average to the NLL the record reports (so they are that evaluation's)."""
    nll = _reported_nll(record)
    if nll is None or not math.isfinite(nll) or scores["log_px"].numel() == 0:
        return False
    mean = -scores["log_px"].double().mean().item()
    # float32 storage: the mean moves by far less than this.
    return abs(mean - nll) <= 1e-5 * max(1.0, abs(nll))


def _key(record: Mapping[str, Any]) -> str:
    return "/".join(_run_identity(record))


def load_kept_scores(
    stored: Sequence[str | Path], records: Sequence[Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """The per-image scores kept beside the stored ``results.json`` files, for the
    stored records among ``records`` (those with ``"stored_in"``), keyed by the record's
    ``run_dir`` (how :func:`vaeflow.run.compare.paired_group_difference` asks for them).

    A record whose kept scores do not average to its reported NLL is left without (with a
    ``UserWarning``): they would not be the evaluation the table reports.

    Raises:
        ValueError: a ``test_scores.pt`` beside a stored file that cannot be read or is
            not a report's (the path and what to do are named).
    """
    out: dict[str, dict[str, Any]] = {}
    for source in stored:
        path = Path(source).parent / SCORES_FILE
        if not path.is_file():
            continue
        runs = _read(path)
        for record in records:
            if record.get("stored_in") != str(source):
                continue
            scores = runs.get(_key(record))
            if scores is None:
                continue
            if not _consistent(record, scores):
                warnings.warn(
                    f"{path}: the per-image scores kept for {_key(record)} do not average "
                    "to the NLL its stored record reports; that row is not paired",
                    stacklevel=2,
                )
                continue
            # int64 indices, as a run directory's: pairing sorts and searches them together
            out[str(record["run_dir"])] = {**scores, "indices": scores["indices"].long()}
    return out


def _read(path: Path) -> dict[str, dict[str, Any]]:
    try:
        state = load_checkpoint(path)
    except (CheckpointError, OSError, RuntimeError) as e:
        raise ValueError(
            f"{path}: cannot read the report's kept per-image scores ({e}); restore it from "
            "version control, or move it away to report without pairing its stored rows"
        ) from None
    runs = state.get("runs")
    if state.get("format") != _FORMAT or not isinstance(runs, dict):
        raise ValueError(
            f"{path}: not a report's kept per-image scores (format {state.get('format')!r}, "
            f"expected {_FORMAT}); move it away or rewrite it with `vaeflow report "
            "--keep-scores`"
        )
    return runs


def write_kept_scores(
    out_dir: Path,
    records: Sequence[Mapping[str, Any]],
    kept: Mapping[str, Mapping[str, Any]],
) -> tuple[Path, list[str]]:
    """Write ``out_dir/test_scores.pt`` with every evaluated record's per-image scores:
    a run directory's own ``test_scores.pt``, or a stored record's kept scores (``kept``,
    from :func:`load_kept_scores`).

    Returns:
        The path written, and the runs left out with why (no per-image scores, or scores
        that do not average to the reported NLL: evaluated again since).
    """
    from ...run.compare import read_scores

    runs: dict[str, dict[str, Any]] = {}
    left_out = []
    for record in records:
        if record["status"] != "evaluated":
            continue
        key, run_dir = _key(record), str(record["run_dir"])
        if record.get("stored_in"):
            scores = kept.get(run_dir)
            if scores is None:
                left_out.append(f"{key}: stored without usable per-image scores")
                continue
        else:
            try:
                scores = read_scores(run_dir)
            except FileNotFoundError:
                left_out.append(f"{key}: its run directory has no per-image scores")
                continue
            if not _consistent(record, scores):
                left_out.append(
                    f"{key}: its per-image scores do not average to its reported NLL "
                    "(evaluated again since?)"
                )
                continue
        indices = scores["indices"]
        small = indices.numel() == 0 or int(indices.max()) < 2**31
        runs[key] = {
            "evaluation": dict(scores["evaluation"]),
            "dataset": str(scores["dataset"]),
            "test_data": str(scores["test_data"]),
            "indices": indices.to(torch.int32 if small else torch.int64).contiguous(),
            "log_px": scores["log_px"].to(torch.float32).contiguous(),
            "elbo": scores["elbo"].to(torch.float32).contiguous(),
        }
    path = out_dir / SCORES_FILE
    save_checkpoint(path, {"format": _FORMAT, "runs": runs})
    return path, left_out
