"""Paired comparison of two evaluated runs on the same test images.

Two rows of a table are scored on the same test set, so the difference of their mean NLLs
is far better determined than two independent standard errors suggest: image difficulty
is shared and cancels. ``paired_difference(run_a, run_b)`` reads the per-image scores that
``vaeflow eval`` writes (``test_scores.pt``), checks that both runs scored the same test
data (dataset, and for a grey dataset the evaluation binarisation draw, ``data.seed``) with
the same k, lines the images up by test-set index, and returns the mean difference over
the images both scored with the standard error of the per-image differences. Runs scored
on nested subsets pair over the smaller one: a run grown to all 10,000 test images pairs
with one scored on the fixed random 1,000 (``eval.n_test``) over those 1,000. It covers
test-set sampling only: seed-to-seed variation of the training is a separate (usually
larger) source, measured by training more seeds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import DataConfig, to_dict
from ..data.datasets import DATASETS
from .checkpoint import load_checkpoint
from .evaluate import TEST_SCORES

__all__ = [
    "ComparisonError",
    "format_gap",
    "paired_difference",
    "paired_group_difference",
    "paired_table",
    "read_scores",
]


class ComparisonError(ValueError):
    """Two runs whose scores cannot be paired (other images, dataset or k)."""


def read_scores(run_dir: str | Path) -> dict[str, Any]:
    """A run's per-image test scores as pairing needs them: ``test_scores.pt``'s
    ``{"evaluation", "dataset", "indices": (n,), "log_px": (n,), "elbo": (n,)}`` plus
    ``"test_data"`` (what the scored images are, :func:`_test_data`).

    Raises:
        FileNotFoundError: the run has no ``test_scores.pt`` (the message says how to
            write it).
    """
    run_dir = Path(run_dir)
    path = run_dir / TEST_SCORES
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: the run was evaluated before vaeflow kept per-image "
            f"scores, or not at all; run `vaeflow eval {run_dir}` to write it"
        )
    scores = load_checkpoint(path)
    scores["test_data"] = _test_data(run_dir, scores["dataset"])
    return scores


def _test_data(run_dir: Path, dataset: str) -> str:
    """What the scored images are beyond the dataset's name: a grey dataset's test images
    are binarised by a fixed draw from ``data.seed`` (:func:`vaeflow.data.prepare_eval`),
    so two runs with another ``data.seed`` scored other images under the same indices.
    Read from the run's ``config.json``; the dataset alone where there is none."""
    spec = DATASETS.get(dataset)
    config = run_dir / "config.json"
    if spec is None or spec.kind != "binary" or not config.is_file():
        return dataset
    data = {**to_dict(DataConfig()), **json.loads(config.read_text()).get("data", {})}
    if data["binarization"] == "given":  # binary in its files (binarized_mnist)
        return dataset
    return f"{dataset}, evaluation binarisation of data.seed = {data['seed']}"


def _paired_scores(
    runs: Sequence[str | Path], known: Mapping[str, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    return [dict(known[str(r)]) if str(r) in known else read_scores(r) for r in runs]


def _check_pairable(scores: Sequence[dict[str, Any]]) -> None:
    """Every run scored the same test data with the same k (the images are lined up by
    :func:`_aligned`)."""
    first = scores[0]
    for other in scores[1:]:
        if other["dataset"] != first["dataset"]:
            raise ComparisonError(
                f"the runs scored different datasets: {first['dataset']} / {other['dataset']}"
            )
        if other["test_data"] != first["test_data"]:
            raise ComparisonError(
                f"the runs scored differently binarised test images ({first['test_data']} / "
                f"{other['test_data']}): the same indices are other images; compare runs "
                "trained with the same data.seed"
            )
        k_a, k_b = first["evaluation"]["k"], other["evaluation"]["k"]
        if k_a != k_b:
            raise ComparisonError(
                f"the runs' NLLs use k = {k_a} / {k_b} importance samples: the estimates' "
                "own bias differs; evaluate both with the same --k"
            )


def _aligned(scores: Sequence[dict[str, Any]]) -> tuple[int, list[dict[str, torch.Tensor]]]:
    """Every run's per-image ``log_px`` and ``elbo`` over the test images all of them
    scored, in one order (the first run's), whatever order or subset each scored.

    Returns:
        ``(n, [{"log_px": (n,), "elbo": (n,)}, ...])``, one dict per run.

    Raises:
        ComparisonError: no test image was scored by every run.
    """
    for s in scores:  # an evaluation scores each test image once
        if len(torch.unique(s["indices"])) != len(s["indices"]):
            raise ComparisonError(
                f"per-image scores ({s['evaluation']['test_examples']}) list a test image "
                "twice; evaluate the run again"
            )
    common = scores[0]["indices"]
    for other in scores[1:]:
        common = common[torch.isin(common, other["indices"])]
    if common.numel() == 0:
        described = " / ".join(s["evaluation"]["test_examples"] for s in scores)
        raise ComparisonError(
            f"the runs scored different test images, none in common ({described}); "
            "evaluate them on the same images (the same --n-test, or all)"
        )
    out = []
    for s in scores:
        order = torch.argsort(s["indices"])
        take = order[torch.searchsorted(s["indices"][order], common)]
        out.append({f: s[f][take] for f in ("log_px", "elbo")})
    return common.numel(), out


def paired_group_difference(
    runs: Sequence[str | Path],
    reference: Sequence[str | Path],
    known: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The paired difference of two rows of a table, each a group of seeds: per test
    image, the mean over ``runs`` of the NLL (and -ELBO) minus the mean over
    ``reference``; then the mean over images and the standard error of the per-image
    differences (test-set sampling only: the seeds' spread is not in it).

    ``known``: per-image scores already read, by run (as :func:`read_scores` returns
    them; e.g. kept by a report whose run directories are gone), used instead of the
    run's ``test_scores.pt``.

    Returns:
        ``{"n", "k", "scored_a", "scored_b", "nll_a_nats", "nll_b_nats", "nll_a_own_nats",
        "nll_b_own_nats", "nll_diff_nats", "nll_diff_stderr_nats", "neg_elbo_diff_nats",
        "neg_elbo_diff_stderr_nats"}``: ``n`` images every run scored (the pairs; each
        run's count in ``scored_a`` / ``scored_b``), ``nll_*_nats`` the rows' mean NLLs
        over those, ``nll_*_own_nats`` over each run's own images (what its summary
        reports, averaged over the row's seeds); a negative difference: ``runs`` better.

    Raises:
        FileNotFoundError: a run has no ``test_scores.pt``.
        ComparisonError: the runs scored different test data, no image in common, or
            used another k.
    """
    a, b = _paired_scores(runs, known or {}), _paired_scores(reference, known or {})
    _check_pairable([*a, *b])
    n, aligned = _aligned([*a, *b])
    a_al, b_al = aligned[: len(a)], aligned[len(a) :]

    def mean_over(scores: Sequence[dict[str, Any]], field: str) -> torch.Tensor:
        return -torch.stack([s[field].double() for s in scores]).mean(0)

    def own(scores: Sequence[dict[str, Any]]) -> float:
        return sum(-s["log_px"].double().mean().item() for s in scores) / len(scores)

    def diff(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float | None]:
        d = x - y
        se = (d.std() / math.sqrt(n)).item() if n > 1 else None
        return d.mean().item(), se

    nll_a, nll_b = mean_over(a_al, "log_px"), mean_over(b_al, "log_px")
    nll, nll_se = diff(nll_a, nll_b)
    elbo, elbo_se = diff(mean_over(a_al, "elbo"), mean_over(b_al, "elbo"))
    return {
        "n": n,
        "k": a[0]["evaluation"]["k"],
        "scored_a": [s["indices"].numel() for s in a],
        "scored_b": [s["indices"].numel() for s in b],
        "nll_a_nats": nll_a.mean().item(),
        "nll_b_nats": nll_b.mean().item(),
        "nll_a_own_nats": own(a),
        "nll_b_own_nats": own(b),
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
        ComparisonError: the runs scored different test data or no test image in common,
            or used different numbers of importance samples for the NLL.
    """
    d = paired_group_difference([run_a], [run_b])
    return {**d, "k_a": d["k"], "k_b": d["k"]}


def format_gap(value: float, se: float | None) -> str:
    """A paired difference as a table cell: ``+0.70 ± 0.08`` (no ± without a standard error)."""
    return f"{value:+.2f}" + (f" ± {se:.2f}" if se is not None else "")


def paired_table(reference: str | Path, others: list[str | Path]) -> str:
    """A markdown table of every run in ``others`` against ``reference``, paired image by
    image (:func:`paired_difference`): the run's NLL and -ELBO and their differences from
    the reference's, each ± the standard error of the per-image differences. A column
    says over how many images each row is paired when that is not every image each of
    the two runs scored (runs scored on nested subsets pair over the smaller).

    Raises what :func:`paired_difference` raises for the first run that cannot be paired.
    """
    rows = [paired_difference(run, reference) for run in others]
    first = rows[0]
    partial = any(d["n"] != d["scored_a"][0] or d["n"] != d["scored_b"][0] for d in rows)
    lines = [
        f"reference: {reference} (NLL {first['nll_b_own_nats']:.2f} nats, k = {first['k_b']}, "
        f"{first['scored_b'][0]} test images)",
        "",
        "| run | NLL (nats) | NLL - reference | -ELBO - reference |"
        + (" images paired |" if partial else ""),
        "|---|---:|---:|---:|" + ("---:|" if partial else ""),
    ]
    for run, d in zip(others, rows, strict=True):
        lines.append(
            f"| {run} | {d['nll_a_own_nats']:.2f} | "
            f"{format_gap(d['nll_diff_nats'], d['nll_diff_stderr_nats'])} | "
            f"{format_gap(d['neg_elbo_diff_nats'], d['neg_elbo_diff_stderr_nats'])} |"
            + (f" {d['n']} |" if partial else "")
        )
    lines += [
        "",
        "NLL: each run's own mean over the test images it scored. Differences are paired "
        "over the test images both runs scored (negative: better than the reference); ± is "
        "the standard error of the per-image differences, test-set sampling only, not "
        "seed-to-seed variation.",
    ]
    return "\n".join(lines)
