"""Report builder: fake run directories -> records, seed groups, markdown, files, CLI."""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest

from vaeflow.report import (
    add_report_parser,
    collect,
    group,
    metric_label,
    to_markdown,
    write_report,
)

NOTE = "CIFAR-10 test split: only the first 1000 examples were evaluated"
# (flow, seed) -> (nll, elbo); hand-picked so mean/std are easy to check
NUMBERS = {
    ("iaf", 1): (85.0, -88.0),
    ("iaf", 2): (87.0, -90.0),
    ("planar", 1): (90.0, -93.0),
    ("planar", 2): (91.0, -93.5),
}


def _config(flow: str, seed: int, latent: int = 32) -> dict[str, Any]:
    return {
        "data": {"dataset": "mnist", "root": f"/data/{seed}", "binarization": "dynamic"},
        "model": {"latent_dim": latent, "posterior": {"flow": flow, "num_layers": 4}},
        "train": {"seed": seed, "lr": 1e-3, "betas": [0.9, 0.999]},
        "eval": {"k": 5000},
        "run": {"name": f"{flow}_s{seed}", "root": "runs"},
    }


def _write_run(
    root: Path,
    name: str,
    config: dict[str, Any],
    nll: float | None = None,
    elbo: float = -90.0,
    k: int = 5000,
    commit: str = "abc1234",
    curve: tuple[float, ...] = (-120.0, -100.0),
) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config))
    (run / "environment.json").write_text(
        json.dumps({"commit": commit, "versions": {"torch": "2.x"}, "notes": [NOTE]})
    )
    lines = [json.dumps({"step": 1, "time": 0.1, "train/loss_nats": 150.0})]
    for i, v in enumerate(curve):
        lines.append(json.dumps({"step": 100 * (i + 1), "time": 1.0 + i, "val/elbo_nats": v}))
    lines.append(json.dumps({"step": 999, "time": 9.0, "val/elbo_nats": None}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if nll is not None:
        summary = {
            f"test/nll_iw{k}_nats": nll,
            f"test/nll_iw{k}_stderr_nats": 0.1,
            "test/elbo_nats": elbo,
            "test/kl_nats": 20.0,
            "test/active_units": 16,
            "test/kl_per_dim_nats": [0.5] * 4,
            "test/n_examples": 10000,
            "test/k": k,
            "dataset": "mnist",
            "binarization": "dynamic",
            "notes": [NOTE],
            "checkpoint_step": 1000,
        }
        (run / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for (flow, seed), (nll, elbo) in NUMBERS.items():
        commit = "abc1234" if flow == "iaf" else "def5678"
        _write_run(root, f"{flow}_s{seed}", _config(flow, seed), nll, elbo, commit=commit)
    return root


def test_collect_flattens_and_recurses(runs: Path) -> None:
    records = collect([runs])
    assert [r["name"] for r in records] == ["iaf_s1", "iaf_s2", "planar_s1", "planar_s2"]
    r = records[0]
    assert r["status"] == "evaluated"
    assert r["config"]["model.posterior.flow"] == "iaf"
    assert r["config"]["train.betas"] == "[0.9, 0.999]"
    assert r["seed"] == 1 and r["commit"] == "abc1234" and r["checkpoint_step"] == 1000
    assert r["metrics"]["test/nll_iw5000_nats"] == 85.0
    assert "test/k" not in r["metrics"] and "test/kl_per_dim_nats" not in r["metrics"]
    assert r["protocol"] == {
        "dataset": "mnist",
        "binarization": "dynamic",
        "k": 5000,
        "n_examples": 10000,
        "test_examples": None,  # summaries before the field existed
    }
    assert r["notes"] == [NOTE]
    # a run directory given directly, twice, and its parent: no duplicates
    assert len(collect([runs / "iaf_s1", runs / "iaf_s1", runs])) == 4
    with pytest.raises(FileNotFoundError, match="config.json"):
        collect([runs / "missing"])


def test_group_mean_std_n(runs: Path) -> None:
    groups = group(collect([runs]))
    assert [g["config"] for g in groups] == [
        {"model.posterior.flow": "iaf"},
        {"model.posterior.flow": "planar"},
    ]
    iaf, planar = groups
    assert iaf["n_seeds"] == 2 and sorted(iaf["seeds"]) == [1, 2]
    nll = iaf["metrics"]["test/nll_iw5000_nats"]
    assert nll["mean"] == pytest.approx(86.0)
    assert nll["std"] == pytest.approx(math.sqrt(2.0))  # (1 + 1) / (2 - 1)
    assert nll["n"] == 2
    elbo = planar["metrics"]["test/elbo_nats"]
    assert elbo["mean"] == pytest.approx(-93.25)
    assert elbo["std"] == pytest.approx(statistics.stdev([-93.0, -93.5]))
    assert planar["protocol"]["k"] == 5000 and planar["commits"] == ["def5678"]
    # explicit by: one group of all four runs; a single run: std None
    (everything,) = group(collect([runs]), by=[])
    assert everything["n_seeds"] == 4
    single = group(collect([runs / "iaf_s1", runs / "planar_s1"]))
    assert all(g["metrics"]["test/nll_iw5000_nats"]["std"] is None for g in single)
    with pytest.raises(ValueError, match="no.such"):
        group(collect([runs]), by=["no.such"])


def test_protocol_mismatch_raises(tmp_path: Path) -> None:
    _write_run(tmp_path, "a", _config("iaf", 1), 85.0, k=5000)
    _write_run(tmp_path, "b", _config("iaf", 2), 86.0, k=1000)
    records = collect([tmp_path])
    with pytest.raises(ValueError, match="'k'"):
        group(records)
    # grouped apart on purpose, the different k are two columns, never averaged
    groups = group(records, by=["train.seed"])
    assert [list(g["metrics"]) for g in groups][0] != [list(g["metrics"]) for g in groups][1]


def test_rows_on_different_data_state_their_protocol(tmp_path: Path) -> None:
    """Two datasets in one table: each row says which, under a warning line."""
    _write_run(tmp_path, "grey", _config("iaf", 1), 85.0)
    static = _write_run(tmp_path, "static", _config("planar", 1), 84.0)
    summary = json.loads((static / "summary.json").read_text())
    summary.update(dataset="binarized_mnist", binarization="given")
    (static / "summary.json").write_text(json.dumps(summary))
    md = to_markdown(group(collect([tmp_path])))
    assert md.startswith("**Rows differ in their evaluation protocol (dataset, binarization)")
    assert "| model.posterior.flow | dataset | binarization | seeds |" in md
    assert (
        "| iaf | mnist | dynamic | 1 |" in md and "| planar | binarized_mnist | given | 1 |" in md
    )
    # One protocol: no protocol columns, no warning.
    plain = to_markdown(group(collect([tmp_path / "grey"])))
    assert "Rows differ" not in plain and "| dataset |" not in plain


def test_markdown_units_cells_notes_commits(runs: Path) -> None:
    md = to_markdown(group(collect([runs])))
    header = md.splitlines()[0]
    assert header.startswith("| model.posterior.flow | seeds |")
    for label in ("test NLL (nats, k=5000)", "test ELBO (nats)", "test KL (nats)"):
        assert label in header
    assert "| iaf | 2 | 86.00 ± 1.41 (2) | -89.00 ± 1.41 (2) |" in md
    assert "planar" in md and "90.50 ± 0.71 (2)" in md
    assert NOTE in md and "`abc1234`" in md and "`def5678`" in md
    assert "k=5000" in md and "n_examples=10000" in md
    chosen = to_markdown(group(collect([runs])), metrics=["test/nll_iw5000_stderr_nats", "x/y"])
    assert "test NLL stderr (nats, k=5000)" in chosen and "| 0.10 ± 0.00 (2) | — |" in chosen


def test_metric_labels() -> None:
    assert metric_label("test/nll_iw5000_nats") == "test NLL (nats, k=5000)"
    assert metric_label("test/bpd") == "test bpd"
    assert metric_label("test/elbo_bpd") == "test ELBO (bpd)"
    assert metric_label("val/elbo_nats") == "val ELBO (nats)"
    assert metric_label("test/active_units") == "test active units"


def test_write_report_files(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / ".results.md.ab12cd34.tmp").write_text("x")  # a killed report's write
    (out / ".notes.md.ab12cd34.tmp").write_text("x")  # not the report's: stays
    written = write_report([runs], out)
    assert set(written) == {"markdown", "json", "learning_curves"}  # flow is not numeric
    assert written["markdown"].read_text().startswith("| model.posterior.flow")
    data = json.loads(written["json"].read_text(), parse_constant=_refuse)
    assert len(data["records"]) == 4 and len(data["groups"]) == 2
    assert data["by"] == ["model.posterior.flow"]
    assert written["learning_curves"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.glob(".*.tmp")] == [".notes.md.ab12cd34.tmp"]


def _refuse(constant: str) -> None:
    raise ValueError(f"non-standard JSON constant {constant}")


def test_metric_vs_numeric_key(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    for latent, seed, nll in [(8, 1, 95.0), (8, 2, 96.0), (32, 1, 88.0), (32, 2, 90.0)]:
        _write_run(root, f"d{latent}_s{seed}", _config("iaf", seed, latent), nll)
    written = write_report([root], tmp_path / "out")
    png = written["metric_vs_key"]
    assert png.name == "metric_vs_model.latent_dim.png"
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_depth_curve_and_heatmap_for_a_two_key_grid(tmp_path: Path) -> None:
    """Flow x depth (rezende-style) gives NLL vs depth, one line per flow, and a heat map
    whose cells are the group means (a missing combination stays empty)."""
    root = tmp_path / "runs"
    grid = {("planar", 4): 95.0, ("planar", 8): 93.0, ("iaf", 4): 90.0, ("iaf", 8): 88.0}
    grid[("none", 1)] = 97.0
    for (flow, depth), nll in grid.items():
        cfg = _config(flow, 1)
        cfg["model"]["posterior"]["num_layers"] = depth
        _write_run(root, f"{flow}_{depth}", cfg, nll)
    written = write_report([root], tmp_path / "out")
    assert written["metric_vs_key"].name == "metric_vs_model.posterior.num_layers.png"
    assert written["heatmap"].read_bytes()[:4] == b"\x89PNG"
    from matplotlib.figure import Figure

    captured: list = []
    original = Figure.savefig

    def spy(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        captured.append(self)
        return original(self, *args, **kwargs)

    Figure.savefig = spy
    try:
        write_report([root], tmp_path / "out2")
    finally:
        Figure.savefig = original
    heat = captured[-1].axes[0]
    cells = {t.get_text() for t in heat.texts}
    assert cells == {f"{v:.2f}" for v in grid.values()}
    curve = captured[-2].axes[0]
    assert len(curve.get_lines()) >= 3  # one errorbar line per flow (none, planar, iaf)


def test_not_evaluated_run_listed_not_averaged(runs: Path, tmp_path: Path) -> None:
    _write_run(runs, "iaf_s3", _config("iaf", 3))  # trained, never evaluated
    with pytest.warns(UserWarning, match="iaf_s3.*summary.json"):
        records = collect([runs])
    assert [r["status"] for r in records if r["name"] == "iaf_s3"] == ["not evaluated"]
    iaf = group(records)[0]
    assert iaf["n_seeds"] == 2 and iaf["metrics"]["test/nll_iw5000_nats"]["mean"] == 86.0
    with pytest.warns(UserWarning):
        written = write_report([runs], tmp_path / "out")
    md = written["markdown"].read_text()
    assert "Not evaluated" in md and "iaf_s3" in md
    data = json.loads(written["json"].read_text())
    assert any(r["status"] == "not evaluated" for r in data["records"])


def test_cli_parser(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli"
    args = parser.parse_args(["report", str(runs), "-o", str(out), "--by", "model.posterior.flow"])
    assert args.by == ["model.posterior.flow"]
    assert args.func(args) == 0
    assert (out / "results.md").is_file() and "results.md" in capsys.readouterr().out


def test_metrics_choose_the_columns_and_the_figures_metric(tmp_path: Path) -> None:
    """A paper whose table reports bounds (Rezende & Mohamed 2015) is compared on the test
    ELBO: ``metrics`` puts it first in the table and in the metric-vs-depth figure; a
    pattern that matches nothing is an error naming what exists."""
    root = tmp_path / "runs"
    for depth, (nll, elbo) in {4: (95.0, -99.0), 8: (93.0, -96.5)}.items():
        cfg = _config("planar", 1)
        cfg["model"]["posterior"]["num_layers"] = depth
        _write_run(root, f"planar_{depth}", cfg, nll, elbo)
    from matplotlib.figure import Figure

    captured: list = []
    original = Figure.savefig

    def spy(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        captured.append(self)
        return original(self, *args, **kwargs)

    Figure.savefig = spy
    try:
        written = write_report(
            [root], tmp_path / "out", metrics=["test/elbo_nats", r"test/nll_iw\d+_nats"]
        )
    finally:
        Figure.savefig = original
    header = written["markdown"].read_text().splitlines()[0]
    assert header.index("test ELBO (nats)") < header.index("test NLL (nats, k=5000)")
    assert "KL" not in header
    assert json.loads(written["json"].read_text())["metrics"] == [
        "test/elbo_nats",
        "test/nll_iw5000_nats",
    ]
    curve = captured[-1].axes[0]
    assert curve.get_ylabel() == "test ELBO (nats)"
    assert sorted(curve.get_lines()[0].get_ydata()) == [-99.0, -96.5]
    with pytest.raises(ValueError, match="test/elbo_bpd.*matches none"):
        write_report([root], tmp_path / "bad", metrics=["test/elbo_bpd"])
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["report", str(root), "-o", str(tmp_path / "cli"), "--metrics", "test/elbo_nats"]
    )
    assert args.func(args) == 0
    assert "test NLL" not in (tmp_path / "cli" / "results.md").read_text().splitlines()[0]


def test_learning_curves_use_the_training_elbo_without_a_validation_split(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "runs", "noval", _config("iaf", 1), 90.0, curve=())
    lines = [{"step": s, "time": 0.1, "train/elbo_nats": -150.0 + s / 10} for s in (10, 20)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    from matplotlib.figure import Figure

    captured: list = []
    original = Figure.savefig

    def spy(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        captured.append(self)
        return original(self, *args, **kwargs)

    Figure.savefig = spy
    try:
        written = write_report([run], tmp_path / "out")
    finally:
        Figure.savefig = original
    assert "learning_curves" in written
    assert captured[0].axes[0].get_ylabel() == "training ELBO (nats)"
