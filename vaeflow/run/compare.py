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
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_checkpoint
from .evaluate import TEST_SCORES

__all__ = ["ComparisonError", "paired_difference", "paired_table"]


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
    a, b = _scores(Path(run_a)), _scores(Path(run_b))
    if a["dataset"] != b["dataset"]:
        raise ComparisonError(
            f"the runs scored different datasets: {a['dataset']} / {b['dataset']}"
        )
    if not torch.equal(a["indices"], b["indices"]):
        raise ComparisonError(
            f"the runs scored different test images ({a['evaluation']['test_examples']} / "
            f"{b['evaluation']['test_examples']}); evaluate both with the same --n-test"
        )
    k_a, k_b = a["evaluation"]["k"], b["evaluation"]["k"]
    if k_a != k_b:
        raise ComparisonError(
            f"the runs' NLLs use k = {k_a} / {k_b} importance samples: the estimates' own "
            "bias differs; evaluate both with the same --k"
        )
    n = a["indices"].numel()

    def diff(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float | None]:
        d = (x - y).double()
        se = (d.std() / math.sqrt(n)).item() if n > 1 else None
        return d.mean().item(), se

    nll, nll_se = diff(-a["log_px"], -b["log_px"])
    elbo, elbo_se = diff(-a["elbo"], -b["elbo"])
    return {
        "n": n,
        "k_a": k_a,
        "k_b": k_b,
        "nll_a_nats": -a["log_px"].mean().item(),
        "nll_b_nats": -b["log_px"].mean().item(),
        "nll_diff_nats": nll,
        "nll_diff_stderr_nats": nll_se,
        "neg_elbo_diff_nats": elbo,
        "neg_elbo_diff_stderr_nats": elbo_se,
    }


def paired_table(reference: str | Path, others: list[str | Path]) -> str:
    """A markdown table of every run in ``others`` against ``reference``, paired image by
    image (:func:`paired_difference`): the run's NLL and -ELBO and their differences from
    the reference's, each ± the standard error of the per-image differences.

    Raises what :func:`paired_difference` raises for the first run that cannot be paired.
    """
    rows = [paired_difference(run, reference) for run in others]
    first = rows[0]

    def pm(value: float, se: float | None) -> str:
        return f"{value:+.2f}" + (f" ± {se:.2f}" if se is not None else "")

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
            f"{pm(d['nll_diff_nats'], d['nll_diff_stderr_nats'])} | "
            f"{pm(d['neg_elbo_diff_nats'], d['neg_elbo_diff_stderr_nats'])} |"
        )
    lines += [
        "",
        "Differences are paired over the test images both runs scored (negative: better than "
        "the reference); ± is the standard error of the per-image differences, test-set "
        "sampling only, not seed-to-seed variation.",
    ]
    return "\n".join(lines)
