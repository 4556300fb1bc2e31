"""Each row's NLL and -ELBO minus a reference row's, paired image by image
(:func:`add_paired_differences`)."""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from typing import Any

from .keys import _fmt_value, config_matches


def add_paired_differences(
    groups: list[dict[str, Any]],
    reference: Mapping[str, str],
    stored_runs: Collection[str] = (),
    known: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Give every group a ``"paired"`` entry: its NLL and -ELBO minus the reference row's,
    image by image (:func:`vaeflow.run.compare.paired_group_difference`: per-image means
    over each row's seeds, the standard error of the per-image differences).

    Rows are far better compared this way than by their own standard errors: they share
    the test images, whose difficulty cancels. The reference group gets
    ``{"reference": True}``; a group that cannot be paired gets ``{"error": why}`` and the
    table shows "—" with the reason below it: a run reported from a stored results.json
    (``stored_runs``: whatever sits at its old path now need not be what was reported)
    whose report kept no per-image scores for it (``known``: the kept scores by run,
    :func:`vaeflow.tools.report.scores.load_kept_scores`), no per-image scores, other
    images or k, per-image scores whose mean is not the row's NLL (re-evaluated since),
    or non-finite scores.

    Raises:
        ValueError: fewer than two rows; a key of ``reference`` that the rows do not
            differ by; ``reference`` (config key -> value as the runs' configs hold it,
            compared as text, case-blind) selects no row or more than one.
    """
    from ...run.compare import ComparisonError, paired_group_difference

    if len(groups) < 2:
        raise ValueError(
            f"--paired-against {dict(reference)}: the runs form {len(groups)} row(s), and "
            "a paired difference needs a reference row and another; report them without "
            "--paired-against, or add the runs to compare against"
        )
    keys = {k for g in groups for k in g["config"]}
    unknown = [k for k in reference if k not in keys]
    if unknown:
        raise ValueError(
            f"--paired-against {dict(reference)}: {', '.join(unknown)} is not among the "
            f"config keys the rows differ by ({', '.join(sorted(keys)) or 'none'}); name "
            "one of those (or group the rows by it with --by)"
        )
    chosen = [g for g in groups if config_matches(g["config"], reference)]
    if len(chosen) != 1:
        rows = "; ".join(
            ", ".join(f"{k}={_fmt_value(v)}" for k, v in g["config"].items()) for g in groups
        )
        raise ValueError(
            f"--paired-against {dict(reference)} selects {len(chosen)} rows, not one "
            f"(the rows: {rows})"
        )
    (ref,) = chosen
    label = ", ".join(f"{k}={v}" for k, v in reference.items())
    ref["paired"] = {"reference": True, "against": label}
    known = known or {}
    stored_runs = {r for r in stored_runs if r not in known}
    ref_problem = _unpairable(ref, stored_runs)
    for g in groups:
        if g is ref:
            continue
        row = ", ".join(f"{k}={_fmt_value(v)}" for k, v in g["config"].items())
        problem = ref_problem and f"the reference row: {ref_problem}"
        problem = problem or _unpairable(g, stored_runs)
        d: dict[str, Any] = {}
        if problem is None:
            try:
                d = paired_group_difference(g["runs"], ref["runs"], known)
            except (FileNotFoundError, ComparisonError) as e:
                problem = str(e).split(";")[0]
        if problem is None:
            problem = _paired_mismatch(d, g, ref)
        g["paired"] = {"against": label, **({"error": f"{row}: {problem}"} if problem else d)}


def _unpairable(g: Mapping[str, Any], stored_runs: Collection[str]) -> str | None:
    stored = [r for r in g["runs"] if r in stored_runs]
    if stored:
        return (
            f"reported from a stored results.json ({stored[0]}) that kept no per-image "
            "scores for it; give its run directory to pair it (and `vaeflow report "
            "--keep-scores` keeps them for the next report)"
        )
    return None


def _paired_mismatch(
    d: Mapping[str, Any], g: Mapping[str, Any], ref: Mapping[str, Any]
) -> str | None:
    """Why a computed paired difference must not be shown, or None: non-finite values, or
    per-image scores whose mean is not the NLL the row reports (the run was evaluated
    again since its summary, say)."""
    values = [d["nll_diff_nats"], d["neg_elbo_diff_nats"]]
    values += [
        v for v in (d["nll_diff_stderr_nats"], d["neg_elbo_diff_stderr_nats"]) if v is not None
    ]
    if not all(math.isfinite(v) for v in values):
        return "non-finite per-image scores (an image with log p(x) = -inf or NaN)"
    for group_, mean in ((g, d["nll_a_own_nats"]), (ref, d["nll_b_own_nats"])):
        metrics = {name: m["mean"] for name, m in group_["metrics"].items()}
        reported = reported_nll(metrics, d["k"])
        if reported is not None and not scores_match(mean, reported):
            return (
                f"its per-image scores average {mean:.4f} nats, not the reported NLL "
                f"{reported:.4f} (evaluated again since?)"
            )
    return None


#: How closely per-image scores must average to the NLL a row reports to be taken for
#: that evaluation's (relative): float64 sums in another order differ by ~1e-12, scores
#: kept in float32 (:mod:`.scores`) by at most ~6e-8; another evaluation by far more.
SCORES_RELATIVE_TOLERANCE = 1e-6


def reported_nll(metrics: Mapping[str, float], k: int | None = None) -> float | None:
    """The test NLL among ``metrics`` (``test/nll_iw<k>_nats``: that k's, or with ``k``
    None the first such metric), or None."""
    if k is not None:
        return metrics.get(f"test/nll_iw{k}_nats")
    for name, value in metrics.items():
        if re.fullmatch(r"test/nll_iw\d+_nats", name):
            return value
    return None


def scores_match(mean_nll: float, reported: float) -> bool:
    """Whether per-image scores averaging ``mean_nll`` are the evaluation that reported
    ``reported`` (:data:`SCORES_RELATIVE_TOLERANCE`); never for a non-finite value."""
    if not (math.isfinite(mean_nll) and math.isfinite(reported)):
        return False
    return abs(reported - mean_nll) <= SCORES_RELATIVE_TOLERANCE * max(1.0, abs(reported))
