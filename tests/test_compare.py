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


def _write(
    run: Path, log_px, elbo, indices=None, k=5000, dataset="binarized_mnist", data=None
) -> Path:
    """A run directory with per-image scores (and a config.json's ``data`` table, if given)."""
    run.mkdir(parents=True, exist_ok=True)
    if data is not None:
        (run / "config.json").write_text(json.dumps({"data": data}))
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
    other = _write(tmp_path / "c", [-1.0, -2.0], [-3.0, -3.0], indices=[7, 9])
    assert cli_main(["compare", str(ref), str(a), str(other)]) == 2
    assert "none in common" in capsys.readouterr().err


def test_runs_that_cannot_be_paired_are_refused(tmp_path: Path) -> None:
    a = _write(tmp_path / "a", [-1.0, -2.0], [-3.0, -3.0])
    cases = {
        "none in common": _write(tmp_path / "b", [-1.0, -2.0], [-3.0, -3.0], indices=[2, 5]),
        "k = 5000 / 100": _write(tmp_path / "c", [-1.0, -2.0], [-3.0, -3.0], k=100),
        "datasets": _write(tmp_path / "d", [-1.0, -2.0], [-3.0, -3.0], dataset="mnist"),
    }
    for match, other in cases.items():
        with pytest.raises(ComparisonError, match=match):
            paired_difference(a, other)
    with pytest.raises(FileNotFoundError, match="vaeflow eval"):
        paired_difference(a, tmp_path / "never_evaluated")


def test_a_grey_datasets_binarisation_draw_must_match(tmp_path: Path) -> None:
    """Dynamically binarised MNIST is scored on a fixed draw from data.seed: two runs with
    another data.seed scored other images under the same indices and are refused; files
    that are binary already (binarized_mnist) and 8-bit data have no draw to differ."""

    def run(name: str, dataset: str, seed: int, binarization: str = "dynamic") -> Path:
        data = {"dataset": dataset, "binarization": binarization, "seed": seed}
        return _write(tmp_path / name, [-1.0, -2.0], [-3.0, -3.0], dataset=dataset, data=data)

    with pytest.raises(ComparisonError, match="data.seed = 0 / mnist, .*data.seed = 1"):
        paired_difference(run("m0", "mnist", 0), run("m1", "mnist", 1))
    assert paired_difference(run("m0b", "mnist", 0, "fixed_seed"), run("m0", "mnist", 0))["n"] == 2
    given = [run(f"b{i}", "binarized_mnist", i, "given") for i in (0, 1)]
    assert paired_difference(*given)["n"] == 2
    assert paired_difference(run("c0", "cifar10", 0), run("c1", "cifar10", 1))["n"] == 2


def test_nested_subsets_and_other_orders_pair_over_the_common_images(tmp_path: Path) -> None:
    """A run scored on all images pairs with one scored on a subset over that subset, image
    by image whatever the order each stored them in; each run's own NLL stays its own."""
    full = _write(tmp_path / "full", [-10.0, -20.0, -30.0, -40.0], [-11.0, -21.0, -31.0, -41.0])
    # images 3 and 1 (in that order), each 1 nat better than the full run's, -ELBO 2 worse
    sub = _write(tmp_path / "sub", [-39.0, -19.0], [-43.0, -23.0], indices=[3, 1])
    d = paired_difference(sub, full)
    assert d["n"] == 2 and d["scored_a"] == [2] and d["scored_b"] == [4]
    assert d["nll_diff_nats"] == pytest.approx(-1.0) and d["nll_diff_stderr_nats"] == 0.0
    assert d["neg_elbo_diff_nats"] == pytest.approx(2.0)
    assert d["nll_b_nats"] == pytest.approx(30.0)  # images 1 and 3 of the full run
    assert d["nll_b_own_nats"] == pytest.approx(25.0) and d["nll_a_own_nats"] == pytest.approx(
        29.0
    )
    reverse = paired_difference(full, sub)
    assert reverse["nll_diff_nats"] == pytest.approx(1.0) and reverse["n"] == 2


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
    assert json.loads((twin / "summary.json").read_text())["test/n_examples"] == 20
    # the fixed random 20 are among the fixed random 30: paired over those 20
    assert cli_main(["compare", str(run), str(twin)]) == 0
    assert "A scored 30 test images, B 20: paired over the 20 both scored" in (
        capsys.readouterr().out
    )
