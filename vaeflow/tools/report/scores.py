"""Per-image test scores kept beside a report (``kept_scores.pt``), so that its rows can be
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
most 6e-8 of each value (5e-6 nats per image for NLLs below 128 nats), far below the
tables' precision and the per-image differences' standard errors. The file is
``kept_scores.pt``, not ``test_scores.pt`` (one run's own file in its run directory).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ...run.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .collect import _run_identity
from .paired import reported_nll, scores_match

#: The file a report keeps its runs' per-image scores in, beside ``results.json`` (not
#: ``test_scores.pt``: that is one run's own, in its run directory).
SCORES_FILE = "kept_scores.pt"
_FORMAT = 1


def _why_not_this_evaluation(record: Mapping[str, Any], scores: Mapping[str, Any]) -> str | None:
    """Why ``scores`` are not the evaluation ``record`` reports, or None when they are:
    they average to its NLL for their k (:func:`vaeflow.tools.report.paired.scores_match`)."""
    k = scores["evaluation"].get("k")
    reported = reported_nll(record["metrics"], k)
    if reported is None or not math.isfinite(reported):
        return f"it reports no finite NLL for the scores' k = {k} ({reported})"
    if scores["log_px"].numel() == 0:
        return "no image was scored"
    mean = -scores["log_px"].double().mean().item()
    if not scores_match(mean, reported):
        return (
            f"its per-image scores average {mean:.4f} nats, not the reported NLL "
            f"{reported:.4f} (evaluated again since?)"
        )
    return None


def _key(record: Mapping[str, Any]) -> str:
    return "/".join(_run_identity(record))


def load_kept_scores(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The per-image scores kept for the stored records among ``records`` (those with
    ``"stored_in"``): read from the ``kept_scores.pt`` beside each record's
    ``results.json``, keyed by the record's ``run_dir`` (how
    :func:`vaeflow.run.compare.paired_group_difference` asks for them).

    A record whose kept scores are not its reported evaluation is left without (with a
    ``UserWarning`` saying why): pairing it would compare another evaluation.

    Raises:
        ValueError: a ``kept_scores.pt`` that cannot be read or is not a report's (the
            path and what to do are named).
    """
    files: dict[Path, dict[str, dict[str, Any]]] = {}
    out: dict[str, dict[str, Any]] = {}
    for record in records:
        if not record.get("stored_in"):
            continue
        path = Path(record["stored_in"]).parent / SCORES_FILE
        if path not in files:
            files[path] = _read(path) if path.is_file() else {}
        scores = files[path].get(_key(record))
        if scores is None:
            continue
        why = _why_not_this_evaluation(record, scores)
        if why is not None:
            warnings.warn(
                f"{path}: the per-image scores kept for {_key(record)} are not the "
                f"evaluation its stored record reports ({why}); that row is not paired",
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
    """Write ``out_dir/kept_scores.pt`` with every evaluated record's per-image scores:
    a run directory's own ``test_scores.pt``, or a stored record's kept scores (``kept``,
    from :func:`load_kept_scores`).

    Returns:
        The path written, and the runs left out with why (no per-image scores, unreadable
        ones, or scores that are not the reported evaluation).
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
            except (CheckpointError, OSError, KeyError) as e:
                left_out.append(f"{key}: its per-image scores cannot be read ({e})")
                continue
            why = _why_not_this_evaluation(record, scores)
            if why is not None:
                left_out.append(f"{key}: {why}")
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
