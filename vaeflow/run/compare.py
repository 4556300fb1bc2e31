"""Paired comparison of two evaluated runs on the same test images.

Two rows of a table are scored on the same test set, so the difference of their mean NLLs
is far better determined than two independent standard errors suggest: image difficulty
is shared and cancels. ``paired_difference(run_a, run_b)`` reads the per-image scores that
``vaeflow eval`` writes (``test_scores.pt``), checks that both runs scored the same images
of the same dataset, and returns the mean difference with the standard error of the
per-image differences. It covers test-set sampling only: seed-to-seed variation of the
training is a separate (usually larger) source, measured by training more seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_checkpoint
from .evaluate import TEST_SCORES

__all__ = [
    "ComparisonError",
    "format_gap",
    "paired_difference",
    "paired_group_difference",
    "paired_table",
]


class ComparisonError(ValueError):
    """Two runs whose scores cannot be paired (other images, dataset or k)."""


def _scores(run_dir: Path) -> dict[str, Any]:
    path = run_dir / TEST_SCORES
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: the run was evaluated before vaeflow kept per-image "
            f"scores, or not at all; run `vaeflow eval {run_dir}` to write it"
        )
    return load_checkpoint(path)


def _paired_scores(runs: Sequence[str | Path]) -> list[dict[str, Any]]:
    return [_scores(Path(r)) for r in runs]


def _check_pairable(scores: Sequence[dict[str, Any]]) -> None:
    """Every run scored the same dataset, the same test images, with the same k."""
    first = scores[0]
    for other in scores[1:]:
        if other["dataset"] != first["dataset"]:
            raise ComparisonError(
                f"the runs scored different datasets: {first['dataset']} / {other['dataset']}"
            )
        if not torch.equal(other["indices"], first["indices"]):
            raise ComparisonError(
                f"the runs scored different test images "
                f"({first['evaluation']['test_examples']} / "
                f"{other['evaluation']['test_examples']}); evaluate both with the same "
                "--n-test"
            )
        k_a, k_b = first["evaluation"]["k"], other["evaluation"]["k"]
        if k_a != k_b:
            raise ComparisonError(
                f"the runs' NLLs use k = {k_a} / {k_b} importance samples: the estimates' "
                "own bias differs; evaluate both with the same --k"
            )


def paired_group_difference(
    runs: Sequence[str | Path], reference: Sequence[str | Path]
) -> dict[str, Any]:
    """The paired difference of two rows of a table, each a group of seeds: per test
    image, the mean over ``runs`` of the NLL (and -ELBO) minus the mean over
    ``reference``; then the mean over images and the standard error of the per-image
    differences (test-set sampling only: the seeds' spread is not in it).

    Returns:
        ``{"n", "k", "nll_a_nats", "nll_b_nats", "nll_diff_nats", "nll_diff_stderr_nats",
        "neg_elbo_diff_nats", "neg_elbo_diff_stderr_nats"}``; negative: ``runs`` better.

    Raises:
        FileNotFoundError: a run has no ``test_scores.pt``.
        ComparisonError: the runs scored different datasets, images or k.
    """
    a, b = _paired_scores(runs), _paired_scores(reference)
    _check_pairable([*a, *b])
    n = a[0]["indices"].numel()

    def mean_over(scores: Sequence[dict[str, Any]], field: str) -> torch.Tensor:
        return -torch.stack([s[field].double() for s in scores]).mean(0)

    def diff(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float | None]:
        d = x - y
        se = (d.std() / math.sqrt(n)).item() if n > 1 else None
        return d.mean().item(), se

    nll_a, nll_b = mean_over(a, "log_px"), mean_over(b, "log_px")
    nll, nll_se = diff(nll_a, nll_b)
    elbo, elbo_se = diff(mean_over(a, "elbo"), mean_over(b, "elbo"))
    return {
        "n": n,
        "k": a[0]["evaluation"]["k"],
        "nll_a_nats": nll_a.mean().item(),
        "nll_b_nats": nll_b.mean().item(),
        "nll_diff_nats": nll,
        "nll_diff_stderr_nats": nll_se,
        "neg_elbo_diff_nats": elbo,
        "neg_elbo_diff_stderr_nats": elbo_se,
    }


def paired_difference(run_a: str | Path, run_b: str | Path) -> dict[str, Any]:
    """``NLL(a) - NLL(b)`` and ``-ELBO(a) - (-ELBO(b))`` over the test images both scored.

    Returns:
        ``{"n": images, "k_a", "k_b", "nll_diff_nats", "nll_diff_stderr_nats",
        "neg_elbo_diff_nats", "neg_elbo_diff_stderr_nats", "nll_a_nats", "nll_b_nats"}``;
        a negative difference means ``a`` is better (a lower NLL).

    Raises:
        FileNotFoundError: a run has no ``test_scores.pt``.
        ComparisonError: the runs scored different datasets or different test images (say,
            another ``--n-test``), or different numbers of importance samples for the NLL.
    """
    d = paired_group_difference([run_a], [run_b])
    return {**d, "k_a": d["k"], "k_b": d["k"]}


def format_gap(value: float, se: float | None) -> str:
    """A paired difference as a table cell: ``+0.70 ± 0.08`` (no ± without a standard error)."""
    return f"{value:+.2f}" + (f" ± {se:.2f}" if se is not None else "")


def paired_table(reference: str | Path, others: list[str | Path]) -> str:
    """A markdown table of every run in ``others`` against ``reference``, paired image by
    image (:func:`paired_difference`): the run's NLL and -ELBO and their differences from
    the reference's, each ± the standard error of the per-image differences.

    Raises what :func:`paired_difference` raises for the first run that cannot be paired.
    """
    rows = [paired_difference(run, reference) for run in others]
    first = rows[0]

    lines = [
        f"reference: {reference} (NLL {first['nll_b_nats']:.2f} nats, k = {first['k_b']}, "
        f"{first['n']} test images)",
        "",
        "| run | NLL (nats) | NLL - reference | -ELBO - reference |",
        "|---|---:|---:|---:|",
    ]
    for run, d in zip(others, rows, strict=True):
        lines.append(
            f"| {run} | {d['nll_a_nats']:.2f} | "
            f"{format_gap(d['nll_diff_nats'], d['nll_diff_stderr_nats'])} | "
            f"{format_gap(d['neg_elbo_diff_nats'], d['neg_elbo_diff_stderr_nats'])} |"
        )
    lines += [
        "",
        "Differences are paired over the test images both runs scored (negative: better than "
        "the reference); ± is the standard error of the per-image differences, test-set "
        "sampling only, not seed-to-seed variation.",
    ]
    return "\n".join(lines)
