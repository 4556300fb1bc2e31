"""`vaeflow compare`: paired differences of two runs on the same test images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from vaeflow.cli import main as cli_main
from vaeflow.run.checkpoint import load_checkpoint, save_checkpoint
from vaeflow.run.compare import ComparisonError, paired_difference
from vaeflow.run.evaluate import TEST_SCORES


def _write(run: Path, log_px, elbo, indices=None, k=5000, dataset="binarized_mnist") -> Path:
    run.mkdir(parents=True, exist_ok=True)
    log_px = torch.tensor(log_px, dtype=torch.float64)
    n = log_px.numel()
    idx = torch.arange(n) if indices is None else torch.tensor(indices)
    save_checkpoint(
        run / TEST_SCORES,
        {
            "evaluation": {"k": k, "test_examples": f"{n} images"},
            "dataset": dataset,
            "indices": idx,
            "log_px": log_px,
            "elbo": torch.tensor(elbo, dtype=torch.float64),
        },
    )
    return run


def test_paired_difference_known_answer(tmp_path: Path) -> None:
    """Per-image NLL differences (a - b) of 1, 2, 3, 6: mean 3, SE = std / 2."""
    a = _write(tmp_path / "a", [-81.0, -82.0, -83.0, -86.0], [-90.0, -90.0, -90.0, -90.0])
    b = _write(tmp_path / "b", [-80.0, -80.0, -80.0, -80.0], [-91.0, -92.0, -93.0, -94.0])
    d = paired_difference(a, b)
    diffs = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    assert d["n"] == 4 and d["nll_diff_nats"] == pytest.approx(3.0)
    assert d["nll_diff_stderr_nats"] == pytest.approx(diffs.std().item() / 2)
    assert d["nll_a_nats"] == pytest.approx(83.0) and d["nll_b_nats"] == pytest.approx(80.0)
    assert d["neg_elbo_diff_nats"] == pytest.approx(-2.5)  # a's -ELBO 90 vs b's 92.5


def test_a_table_of_runs_against_a_reference(tmp_path: Path, capsys) -> None:
    """`vaeflow compare REF A B`: one row per run, each paired with the reference."""
    ref = _write(tmp_path / "ref", [-80.0, -80.0, -80.0, -80.0], [-91.0, -92.0, -93.0, -94.0])
    a = _write(tmp_path / "a", [-81.0, -82.0, -83.0, -86.0], [-90.0, -90.0, -90.0, -90.0])
    b = _write(tmp_path / "b", [-79.0, -79.0, -79.0, -79.0], [-91.0, -92.0, -93.0, -94.0])
    assert cli_main(["compare", str(ref), str(a), str(b)]) == 0
    out = capsys.readouterr().out
    se = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64).std().item() / 2
    assert f"| {a} | 83.00 | +3.00 ± {se:.2f} | -2.50 ± " in out
    assert f"| {b} | 79.00 | -1.00 ± 0.00 | +0.00 ± 0.00 |" in out
    assert "reference: " + str(ref) + " (NLL 80.00 nats, k = 5000, 4 test images)" in out
    other = _write(tmp_path / "c", [-1.0, -2.0], [-3.0, -3.0], indices=[0, 5])
    assert cli_main(["compare", str(ref), str(a), str(other)]) == 2
    assert "different test images" in capsys.readouterr().err


def test_runs_that_cannot_be_paired_are_refused(tmp_path: Path) -> None:
    a = _write(tmp_path / "a", [-1.0, -2.0], [-3.0, -3.0])
    cases = {
        "images": _write(tmp_path / "b", [-1.0, -2.0], [-3.0, -3.0], indices=[0, 5]),
        "k = 5000 / 100": _write(tmp_path / "c", [-1.0, -2.0], [-3.0, -3.0], k=100),
        "datasets": _write(tmp_path / "d", [-1.0, -2.0], [-3.0, -3.0], dataset="mnist"),
    }
    for match, other in cases.items():
        with pytest.raises(ComparisonError, match=match):
            paired_difference(a, other)
    with pytest.raises(FileNotFoundError, match="vaeflow eval"):
        paired_difference(a, tmp_path / "never_evaluated")


def test_eval_writes_the_scores_and_compare_reads_them(tmp_path: Path, capsys) -> None:
    """A real evaluation: test_scores.pt holds the scored images' log p(x) and ELBO, whose
    means are summary.json's; a run against itself differs by exactly 0; the CLI prints
    the difference and refuses a pair on other images with exit status 2."""
    from tests.test_train import DATA, _cfg
    from vaeflow.run.evaluate import evaluate_run
    from vaeflow.run.train import train

    run = tmp_path / "run"
    train(_cfg("train.steps=10", "train.val_every=10", "eval.n_test=30"), run)
    summary = evaluate_run(run, data_root=DATA, k=10, chunk=5)
    scores = load_checkpoint(run / TEST_SCORES)
    assert scores["indices"].shape == (30,) and scores["log_px"].dtype == torch.float64
    assert -scores["log_px"].mean().item() == pytest.approx(summary["test/nll_iw10_nats"])
    assert scores["elbo"].mean().item() == pytest.approx(summary["test/elbo_nats"])
    twin = tmp_path / "twin"
    shutil.copytree(run, twin)
    d = paired_difference(run, twin)
    assert d["nll_diff_nats"] == 0.0 and d["nll_diff_stderr_nats"] == 0.0
    assert cli_main(["compare", str(run), str(twin)]) == 0
    assert "NLL(A) - NLL(B) = +0.000 ± 0.000 nats" in capsys.readouterr().out
    evaluate_run(twin, data_root=DATA, k=10, chunk=5, n_test=20)
    assert cli_main(["compare", str(run), str(twin)]) == 2
    assert "different test images" in capsys.readouterr().err
    assert json.loads((twin / "summary.json").read_text())["test/n_examples"] == 20
