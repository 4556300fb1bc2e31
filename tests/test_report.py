"""Report builder: fake run directories -> records, seed groups, markdown, files, CLI."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from vaeflow.tools.report import (
    add_report_parser,
    collect,
    group,
    heatmap_figure,
    learning_curves_figure,
    make_figures,
    metric_label,
    metric_vs_key_figure,
    render_figures_from_json,
    series_styles,
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
    trained: bool = True,
) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config))
    if trained:  # what vaeflow train writes when training ends
        (run / "train_summary.json").write_text(json.dumps({"status": "completed"}))
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


@contextlib.contextmanager
def _saved_figures() -> Iterator[list]:
    """Collect every matplotlib Figure that is saved inside the block (in save order)."""
    from matplotlib.figure import Figure

    captured: list = []
    original = Figure.savefig

    def spy(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        captured.append(self)
        return original(self, *args, **kwargs)

    Figure.savefig = spy
    try:
        yield captured
    finally:
        Figure.savefig = original


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
    # An explicit by that leaves out a key the runs differ in: refused, never averaged as
    # seeds (Rezende's --by flow length would otherwise pool variants of one length).
    with pytest.raises(ValueError, match=r"differ in \['model.posterior.flow'\] besides the seed"):
        group(collect([runs]), by=[])
    # a single run: std None
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
    assert "| posterior | dataset | binarization | seeds |" in md
    assert "| IAF | mnist | dynamic | 1 |" in md
    assert "| planar | binarized_mnist | given | 1 |" in md
    # One protocol: no protocol columns, no warning.
    plain = to_markdown(group(collect([tmp_path / "grey"])))
    assert "Rows differ" not in plain and "| dataset |" not in plain


def test_markdown_units_cells_notes_commits(runs: Path) -> None:
    md = to_markdown(group(collect([runs])))
    header = md.splitlines()[0]
    assert header.startswith("| posterior | seeds |")
    for label in ("test NLL (nats, k=5000)", "test ELBO (nats)", "test KL (nats)"):
        assert label in header
    assert "| IAF | 2 | 86.00 ± 1.41 (2) | -89.00 ± 1.41 (2) |" in md
    assert "planar" in md and "90.50 ± 0.71 (2)" in md
    assert NOTE in md and "`abc1234`" in md and "`def5678`" in md
    assert "k=5000" in md and "n_examples=10000" in md
    assert "test_examples" not in md  # not in these (older) summaries: left out, not None
    chosen = to_markdown(group(collect([runs])), metrics=["test/nll_iw5000_stderr_nats", "x/y"])
    assert "test NLL stderr (nats, k=5000)" in chosen and "| 0.10 ± 0.00 (2) | — |" in chosen


def test_markdown_columns_use_the_figures_names(runs: Path, tmp_path: Path) -> None:
    """The table heads and fills its grouping columns with the reader's names the
    figures use (a label map overrides them), and a footer line maps each name back to
    the config key it stands for."""
    md = to_markdown(group(collect([runs])))
    assert "Columns: posterior = `model.posterior.flow`." in md
    rows = [line.split(" | ")[0] for line in md.splitlines()[2:4]]
    assert rows == ["| IAF", "| planar"]
    # Flow steps mean nothing without a flow: "—", not the config's unused value.
    _write_run(runs, "diag_s1", _config("none", 1), 95.0)
    by = ["model.posterior.flow", "model.posterior.num_layers"]
    depth = to_markdown(group(collect([runs]), by=by))
    assert "| diagonal Gaussian | — | 1 |" in depth and "| planar | 4 | 2 |" in depth
    # ... and so do the posterior's options, key by key
    opts = tmp_path / "opts"
    for flow in ("none", "iaf"):
        cfg = _config(flow, 0)
        cfg["model"]["posterior"]["options"] = {"num_hidden": 2}
        _write_run(opts, flow, cfg, 90.0)
    by = ["model.posterior.flow", "model.posterior.options.num_hidden"]
    table = to_markdown(group(collect([opts]), by=by))
    assert "| diagonal Gaussian | — | 1 |" in table and "| IAF | 2 | 1 |" in table
    labels = {"model.posterior.flow": {"name": "q(z|x)", "values": {"iaf": "IAF, 4 steps"}}}
    named = to_markdown(group(collect([runs])), labels=labels)
    assert named.startswith("| q(z|x) | seeds |") and "| IAF, 4 steps | 2 |" in named
    assert "Columns: q(z|x) = `model.posterior.flow`." in named


def test_metric_labels() -> None:
    assert metric_label("test/nll_iw5000_nats") == "test NLL (nats, k=5000)"
    assert metric_label("test/bpd") == "test bpd"
    assert metric_label("test/elbo_bpd") == "test ELBO (bpd)"
    assert metric_label("val/elbo_nats") == "val ELBO (nats)"
    assert metric_label("test/active_units") == "test active units"
    assert metric_label("test/kl_layer2_nats") == "test KL z2 (nats)"
    assert metric_label("test/active_units_layer1") == "test active units z1"


def test_hierarchy_layers_get_columns_of_their_own(tmp_path: Path) -> None:
    """A hierarchy's per-layer KL and active units are default columns, after the totals,
    bottom layer first; one-layer runs have none."""
    run = _write_run(tmp_path, "two_layer", _config("none", 0), nll=90.0)
    summary = json.loads((run / "summary.json").read_text())
    summary.update(
        {
            "test/kl_layer1_nats": 18.0,
            "test/kl_layer2_nats": 4.0,
            "test/active_units_layer1": 95,
            "test/active_units_layer2": 5,
        }
    )
    (run / "summary.json").write_text(json.dumps(summary))
    header = to_markdown(group(collect([tmp_path]))).splitlines()[0]
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[-4:] == [
        "test KL z1 (nats)",
        "test KL z2 (nats)",
        "test active units z1",
        "test active units z2",
    ]
    assert cols.index("test active units") < cols.index("test KL z1 (nats)")


def test_write_report_files(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / ".results.md.ab12cd34.tmp").write_text("x")  # a killed report's write
    (out / ".notes.md.ab12cd34.tmp").write_text("x")  # not the report's: stays
    written = write_report([runs], out)
    assert set(written) == {"markdown", "json", "learning_curves"}  # flow is not numeric
    assert written["markdown"].read_text().startswith("| posterior |")
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
    with _saved_figures() as captured:
        write_report([root], tmp_path / "out2")
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


def test_a_run_still_training_is_marked_unfinished(runs: Path, tmp_path: Path) -> None:
    """A run without train_summary.json (still training, or killed) has a curve that
    stops short: its warning, its line under the table and its legend entry say so, also
    when the figures are redrawn from results.json; a trained run's do not."""
    _write_run(runs, "iaf_s3", _config("iaf", 3))  # trained, not evaluated
    _write_run(runs, "planar_s3", _config("planar", 3), trained=False)  # still training
    with pytest.warns(UserWarning) as caught:
        records = collect([runs])
    messages = [str(w.message) for w in caught]
    assert any("planar_s3: its training has not ended" in m for m in messages), messages
    assert not any("iaf_s3: its training has not ended" in m for m in messages), messages
    assert {r["name"]: r["trained"] for r in records if r["status"] != "evaluated"} == {
        "iaf_s3": True,
        "planar_s3": False,
    }
    with _saved_figures() as captured, pytest.warns(UserWarning):
        written = write_report([runs], tmp_path / "out")
    md = written["markdown"].read_text()
    assert "planar_s3 (training unfinished)" in md
    assert "iaf_s3 (training unfinished)" not in md and "iaf_s3" in md
    legend = [t.get_text() for t in captured[0].legends[0].get_texts()]
    unfinished = [t for t in legend if "training unfinished" in t]
    # the planar group (seeds 1-3, one of them unfinished) says so; the IAF group not
    assert len(unfinished) == 1 and "planar" in unfinished[0].lower(), legend
    assert any("iaf" in t.lower() for t in legend), legend
    from vaeflow.tools.report import markdown_from_json, render_figures_from_json

    assert markdown_from_json(written["json"]) == md
    with _saved_figures() as again:
        render_figures_from_json(written["json"], tmp_path / "redrawn")
    assert [t.get_text() for t in again[0].legends[0].get_texts()] == legend
    # a results.json from before the field: its runs were all trained
    data = json.loads(written["json"].read_text())
    for record in data["records"]:
        del record["trained"]
    old = tmp_path / "old" / "results.json"
    old.parent.mkdir()
    old.write_text(json.dumps(data))
    assert "unfinished" not in markdown_from_json(old)
    with _saved_figures() as redrawn:
        render_figures_from_json(old, tmp_path / "old")
    assert not any("unfinished" in t.get_text() for t in redrawn[0].legends[0].get_texts())


@pytest.mark.parametrize(
    ("summary", "trained"),
    [
        (None, False),  # still training, killed or diverged
        ({"status": "completed", "step": 1000}, True),
        ({"status": "early stopping at step 600", "step": 600}, True),
        ({"status": "completed", "step": 1000, "_steps": 2000}, False),  # resumed, longer
        ({"status": "stopped after step 400 (stop_after_step)", "step": 400}, False),
        ("{not json", False),  # a summary cut off mid-write
    ],
)
def test_when_a_run_counts_as_trained(
    tmp_path: Path, summary: dict[str, Any] | str | None, trained: bool
) -> None:
    """Training ended: train_summary.json says it stopped early or reached train.steps
    (config.json holds the budget of the latest resume)."""
    config = _config("iaf", 0)
    config["train"]["steps"] = 1000
    if isinstance(summary, dict) and "_steps" in summary:
        config["train"]["steps"] = summary.pop("_steps")
    run = _write_run(tmp_path, "iaf_s0", config, trained=False)
    if summary is not None:
        text = summary if isinstance(summary, str) else json.dumps(summary)
        (run / "train_summary.json").write_text(text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (record,) = collect([run])
    assert record["trained"] is trained


def test_a_run_evaluated_before_its_training_ended_is_noted(tmp_path: Path) -> None:
    """Its numbers are a mid-training checkpoint's: the warning and the table say so."""
    _write_run(tmp_path, "iaf_s0", _config("iaf", 0), 85.0)
    _write_run(tmp_path, "iaf_s1", _config("iaf", 1), 86.0, trained=False)
    with pytest.warns(UserWarning, match="iaf_s1 was evaluated but its training has not ended"):
        written = write_report([tmp_path], tmp_path / "out")
    md = written["markdown"].read_text()
    assert "iaf_s1: evaluated before its training ended" in md
    assert "iaf_s0: evaluated before" not in md


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
    with _saved_figures() as captured:
        written = write_report(
            [root], tmp_path / "out", metrics=["test/elbo_nats", r"test/nll_iw\d+_nats"]
        )
    header = written["markdown"].read_text().splitlines()[0]
    assert header.index("test ELBO (nats)") < header.index("test NLL (nats, k=5000)")
    assert "KL" not in header
    assert json.loads(written["json"].read_text())["metrics"] == [
        "test/elbo_nats",
        "test/nll_iw5000_nats",
    ]
    curve = next(
        f
        for f in captured
        if "ELBO" in f.axes[0].get_ylabel() and "test" in f.axes[0].get_ylabel()
    ).axes[0]
    assert curve.get_ylabel().startswith("test ELBO (nats)")
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
    with _saved_figures() as captured:
        written = write_report([run], tmp_path / "out")
    assert "learning_curves" in written
    assert captured[0].axes[0].get_ylabel().startswith("training (no validation split) ELBO")


# ----------------------------------------------------------------------------- figures

#: (prior name, prior flow) of a flow-priors grid: two keys end in ".flow"
PRIORS = [
    ("standard_normal", None),
    ("learned_gaussian", None),
    ("vamp", None),
    ("flow", "realnvp"),
    ("flow", "maf"),
    ("flow", "nsf_coupling"),
]
REFERENCE = ("VampPrior (paper)", 85.57)


def _flow_grid(
    root: Path, priors: list[tuple[str, str | None]], latents: tuple[int, ...] = (40,)
) -> int:
    """Posterior flow x prior (x latent dim) x 2 seeds; returns the number of groups."""
    groups = 0
    for latent in latents:
        for p_name, p_flow in priors:
            for post in ("none", "iaf"):
                level = -90.0 - 2.0 * groups
                for seed in (0, 1):
                    cfg = _config(post, seed, latent)
                    cfg["model"]["prior"] = {"name": p_name, "flow": p_flow, "num_layers": 4}
                    cfg["data"]["batch_size"] = 100
                    curve = (level - 30.0 + seed, level - 10.0 + seed, level + seed)
                    name = f"{p_name}_{p_flow}_{post}_{latent}_s{seed}"
                    _write_run(root, name, cfg, -level + 2.0, level + seed, curve=curve)
                groups += 1
    return groups


def _legend(fig: Any) -> tuple[list[str], list[Any]]:
    (legend,) = fig.legends
    return [t.get_text() for t in legend.get_texts()], list(legend.legend_handles)


def _check_readable(fig: Any, n_series: int, constants: tuple[str, ...]) -> list[str]:
    """The checks every report figure with a legend must pass; returns the labels."""
    labels, handles = _legend(fig)
    assert len(labels) == len(set(labels)), labels  # legend entries unique
    series = [label for label in labels if "(paper)" not in label]
    assert len(series) == n_series, labels
    for label in series:
        names = [part.split(": ")[0] for part in label.split(" · ")]
        assert len(names) == len(set(names)), label  # no key named twice ("flow", "flow")
        assert "flow" not in names and "name" not in names, label  # no bare last component
        assert "seed" not in label, label
        for constant in constants:  # constant keys are in the title, not the labels
            assert constant.split(": ")[0] not in names, label
    title = fig.axes[0].get_title().replace("\n", " ")
    for constant in constants:
        assert constant in title, title
    # get_linestyle() says "--" for every custom dash pattern: compare the patterns too
    styles = [
        (h.get_color(), h.get_linestyle(), h.get_marker(), str(h._unscaled_dash_pattern))
        for h in handles
    ]
    assert len(styles) == len(set(styles)), styles  # no two entries look alike
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend_box = fig.legends[0].get_window_extent(renderer)
    for ax in fig.axes:  # the legend covers no axes (data area, nor colour bar)
        assert not legend_box.overlaps(ax.get_window_extent(renderer))
    return labels


def test_learning_curves_one_readable_line_per_group(tmp_path: Path) -> None:
    """12 groups x 2 seeds, keys model.posterior.flow, model.prior.flow and model.prior.name:
    one mean line and one min-max band per group, reader's labels, distinct styles, the
    legend outside, constants in the title, the paper's NLL drawn at minus it."""
    n = _flow_grid(tmp_path, PRIORS)
    assert n == 12
    records = collect([tmp_path])
    figures = make_figures(records, group(records), references=[REFERENCE])
    fig = figures["learning_curves"][1]
    labels = _check_readable(fig, 12, ("data: MNIST", "latent dim: 40"))
    assert "posterior: IAF · prior: RealNVP" in labels
    assert "posterior: diagonal Gaussian · prior: VampPrior" in labels
    assert "VampPrior (paper): NLL 85.57 nats, drawn at -85.57" in labels
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("epoch") is False  # no training-set size recorded
    assert "higher is better" in ax.get_ylabel() and "nats" in ax.get_ylabel()
    lines = ax.get_lines()
    assert len(lines) == 12 + 1  # one line per group (not per seed) + the reference
    assert len(ax.collections) == 12  # one band per group
    reference = [line for line in lines if list(line.get_ydata()) == [-85.57, -85.57]]
    assert len(reference) == 1 and reference[0].get_color() == "black"
    # The mean over the two seeds (curves level-30+seed etc.): first group at level -90.
    first = lines[0]
    assert list(first.get_xdata()) == [100, 200, 300]
    assert list(first.get_ydata()) == pytest.approx([-119.5, -99.5, -89.5])


def test_learning_curves_mean_on_shared_steps_then_each_seed(tmp_path: Path) -> None:
    """A seed that stopped early: the mean covers the steps both logged, the longer seed
    goes on as a thin line of its own, with no legend entry; epochs when the run knows
    its training-set size."""
    for seed, curve in [(1, (-120.0, -100.0, -95.0)), (2, (-110.0, -98.0))]:
        cfg = _config("iaf", seed)
        cfg["data"]["batch_size"] = 100
        run = _write_run(tmp_path, f"s{seed}", cfg, 85.0, curve=curve)
        env = json.loads((run / "environment.json").read_text())
        env["splits"] = {"train": 1000, "val": 100, "test": 100}
        (run / "environment.json").write_text(json.dumps(env))
    records = collect([tmp_path])
    assert learning_curves_figure(records, [], log_x=True).axes[0].get_xscale() == "log"
    fig = learning_curves_figure(records, [])
    ax = fig.axes[0]
    mean, tail = ax.get_lines()
    assert list(mean.get_ydata()) == [-115.0, -99.0]
    assert list(mean.get_xdata()) == [10.0, 20.0]  # step 100 x batch 100 / 1000 examples
    assert list(tail.get_ydata()) == [-100.0, -95.0] and tail.get_linewidth() < 1.0
    assert ax.get_xlabel().startswith("epoch")
    labels, _ = _legend(fig)
    assert labels == ["all runs"]


def test_learning_curves_zoom_past_the_first_epochs(tmp_path: Path) -> None:
    """The first validations sit hundreds of nats below the rest: the linear-x figure's y
    axis covers the curves from ZOOM_FROM of training on (and the reference line), says
    so in the legend note; the log-x figure shows everything."""
    curve = (-320.0, -150.0, -110.0, -100.0, -96.0, -94.0, -93.0, -92.5, -92.2, -92.0, -91.9)
    _write_run(tmp_path, "r", _config("iaf", 0), 85.0, curve=curve)
    records = collect([tmp_path])
    fig = learning_curves_figure(records, [], references={"paper": 85.57})
    lo, hi = fig.axes[0].get_ylim()
    assert -160 < lo < -150 and -85.57 < hi < -80, (lo, hi)  # -150 is at 10 % of x
    notes = [t.get_text() for t in fig.legends[0].texts] + [fig.legends[0].get_title().get_text()]
    assert any("from 10% of training on" in t for t in notes), notes
    lo, _ = learning_curves_figure(records, [], log_x=True).axes[0].get_ylim()
    assert lo < -320


def test_metric_vs_key_and_heatmap_readable(tmp_path: Path) -> None:
    """A numeric key (latent dim) on top of the flow grid: the NLL-vs-key figure and the
    heat map use the same labels and styles; units and direction on the axes."""
    n = _flow_grid(tmp_path, PRIORS[2:5], latents=(16, 32))
    assert n == 12
    records = collect([tmp_path])
    figures = make_figures(records, group(records), references=[REFERENCE])
    assert set(figures) == {"learning_curves", "metric_vs_key", "heatmap"}
    _check_readable(figures["learning_curves"][1], 12, ("data: MNIST",))
    name, fig = figures["metric_vs_key"]
    assert name == "metric_vs_model.latent_dim.png"
    labels = _check_readable(fig, 6, ("data: MNIST",))
    assert "posterior: IAF · prior: MAF" in labels
    assert "VampPrior (paper): NLL 85.57 nats" in labels  # an NLL axis: drawn at +85.57
    ax = fig.axes[0]
    assert ax.get_xlabel() == "latent dim"
    assert ax.get_ylabel() == "test NLL (nats, k=5000); lower is better"
    heat = figures["heatmap"][1]
    hax = heat.axes[0]
    assert [t.get_text() for t in hax.get_xticklabels()] == ["diagonal Gaussian", "IAF"]
    assert hax.get_xlabel() == "posterior"
    rows = [t.get_text() for t in hax.get_yticklabels()]
    assert rows[0] == "latent dim: 16 · prior: VampPrior" and len(rows) == 6
    assert "data: MNIST" in hax.get_title()
    assert heat.axes[1].get_ylabel() == "test NLL (nats, k=5000); lower is better"


def test_label_map_and_ambiguous_names(tmp_path: Path) -> None:
    """A label map renames keys and values; two keys given one name fall back to their
    longer names; a prior that would read like another is not merged."""
    _flow_grid(tmp_path, [("flow", "maf"), ("vamp", None), ("vamp", "maf")])
    records = collect([tmp_path])
    labels_file = tmp_path / "labels.toml"
    labels_file.write_text(
        '"model.posterior.flow" = "flow"\n'
        '"model.prior.flow" = "flow"\n'
        '["model.prior.name"]\nvalues = { vamp = "VampPrior (500)" }\n'
    )
    out = tmp_path / "out"
    written = write_report([tmp_path], out, labels=labels_file)
    data = json.loads(written["json"].read_text())
    assert data["figures"]["labels"]["model.posterior.flow"] == "flow"
    fig = make_figures(records, group(records), labels=data["figures"]["labels"])[
        "learning_curves"
    ][1]
    labels = _check_readable(fig, 6, ())
    assert "posterior.flow: IAF · prior.flow: MAF · prior: VampPrior (500)" in labels
    assert "posterior.flow: IAF · prior.flow: MAF · prior: flow" in labels


def test_variants_with_options_of_their_own(tmp_path: Path) -> None:
    """Flows each with options of their own (sylvester-style): a label leaves out the
    keys its run does not set, and no mostly-empty heat map is drawn."""
    variants = {
        "none": {},
        "iaf": {"num_hidden": 1},
        "sylvester_householder": {"num_householder": 8},
        "sylvester_orthogonal": {"num_ortho_vectors": 8},
    }
    for i, (flow, options) in enumerate(variants.items()):
        cfg = _config(flow, 1)
        cfg["model"]["posterior"]["options"] = options
        _write_run(tmp_path, flow, cfg, 90.0 + i)
    records = collect([tmp_path])
    figures = make_figures(records, group(records))
    assert set(figures) == {"learning_curves"}
    labels = _check_readable(figures["learning_curves"][1], 4, ())
    assert labels == [
        "posterior: diagonal Gaussian",
        "posterior: IAF · posterior.options.num_hidden: 1",
        "posterior: Sylvester (Householder) · posterior.options.num_householder: 8",
        "posterior: Sylvester (orthogonal) · posterior.options.num_ortho_vectors: 8",
    ]


def test_no_flow_steps_for_a_posterior_without_flow(tmp_path: Path) -> None:
    """Rezende-style rows (a diagonal Gaussian whose num_layers is a leftover 1, planar
    flows of 10 and 20 steps): the diagonal row's label has no 'flow steps'."""
    for i, (flow, steps) in enumerate([("none", 1), ("planar", 10), ("planar", 20)]):
        cfg = _config(flow, 0)
        cfg["model"]["posterior"]["num_layers"] = steps
        _write_run(tmp_path, f"{flow}{steps}", cfg, 90.0 - i)
    records = collect([tmp_path])
    fig = make_figures(records, group(records))["learning_curves"][1]
    labels = _check_readable(fig, 3, ())
    assert labels == [
        "posterior: diagonal Gaussian",
        "posterior: planar · flow steps: 10",
        "posterior: planar · flow steps: 20",
    ]
    # ... and on a flow-length axis it sits at 0 steps, not at its leftover 1
    assert [r["config"]["model.posterior.num_layers"] for r in records] == [0, 10, 20]


def test_series_styles_never_repeat() -> None:
    for n in (1, 9, 11, 12, 41, 100):
        styles = series_styles([(str(i),) for i in range(n)])
        assert len({tuple(s.values()) for s in styles}) == n
    # two entries: colour by the one with more values, dashes by the other
    grid = [(a, b) for a in "abcdef" for b in "xy"]
    styles = series_styles(grid)
    assert len({s["color"] for s in styles}) == 6 and len({s["linestyle"] for s in styles}) == 2
    # three: colour by the prior (3), line style by latent x posterior (4)
    grid3 = [(a, b, c) for a in "12" for b in "gi" for c in "vmr"]
    styles = series_styles(grid3)
    assert len({tuple(s.values()) for s in styles}) == 12
    assert len({s["color"] for s in styles}) == 3 and len({s["linestyle"] for s in styles}) == 4


def _add_test_curve(run: Path, points: dict[int, float], k: int = 100) -> None:
    """Append ``train.test_every``'s records (steps apart from the validation ones)."""
    rows = [{"step": s, "time": 2.0, f"test_curve/iwae_k{k}_nats": v} for s, v in points.items()]
    with (run / "metrics.jsonl").open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


def test_test_curves_figure_from_runs_and_from_results_json(tmp_path: Path) -> None:
    """Runs trained with ``train.test_every``: ``test_curves.png`` draws the test-set
    IWAE-k bound (its own steps, seeds averaged, the paper's NLL as a line), labelled as
    the test bound; results.json keeps the curve, so it is redrawn without the runs; runs
    whose curves use different k are refused, not mixed."""
    root = tmp_path / "runs"
    for seed, shift in ((0, 0.0), (1, 2.0)):
        run = _write_run(root, f"s{seed}", _config("iaf", seed), 85.0)
        _add_test_curve(run, {50: -130.0 + shift, 150: -95.0 + shift, 250: -90.0 + shift})
    written = write_report([root], tmp_path / "out", references={"paper": 85.57})
    assert written["test_curves"].read_bytes()[:4] == b"\x89PNG"
    data = json.loads(written["json"].read_text(), parse_constant=_refuse)
    s0 = next(r for r in data["records"] if r["name"] == "s0")
    assert s0["test_curve"] == {
        "step": [50, 150, 250],
        "test_curve/iwae_k100_nats": [-130, -95, -90],
    }
    assert s0["learning_curve"]["step"] == [100, 200]  # the validation curve, unchanged
    records = collect([root])
    fig = learning_curves_figure(records, [], references={"paper": 85.57}, which="test")
    ax = fig.axes[0]
    assert ax.get_ylabel().startswith("test-set IWAE bound, k = 100, all test images")
    mean = ax.get_lines()[0]
    assert list(mean.get_xdata()) == [50, 150, 250]
    assert list(mean.get_ydata()) == pytest.approx([-129.0, -94.0, -89.0])
    import shutil

    shutil.rmtree(root)
    again = render_figures_from_json(written["json"], tmp_path / "again")
    assert "test_curves" in again and "learning_curves" in again
    # Another k in one report: refused.
    for seed, k in ((0, 100), (1, 10)):
        run = _write_run(tmp_path / "mixed", f"s{seed}", _config("iaf", seed), 85.0)
        _add_test_curve(run, {50: -100.0}, k=k)
    with pytest.raises(ValueError, match="different bounds.*test_curve/iwae_k10_nats"):
        make_figures(collect([tmp_path / "mixed"]), [])


def test_gain_over_the_last_doubling_says_whether_a_curve_still_rises(tmp_path: Path) -> None:
    """Each run's curves get a column-ready number: the curve's mean over the last tenth
    of its steps minus over the tenth before half of them (interpolated at a window's
    middle when it holds no point), for the test curve and the validation curve; none
    where no point lies at or before half the last step; a resumed run's repeated step keeps
    its last value; a noisy curve is read by its window means, not by single points."""
    from vaeflow.tools.report import gain_last_doubling

    assert gain_last_doubling([(100, -120.0), (200, -100.0)]) == pytest.approx(20.0)
    # the earlier window [112.5, 125] holds no point: the curve at 118.75, between
    # (50, -130) and (150, -95), is -130 + 0.6875 * 35
    expected = -90.0 - (-130.0 + 0.6875 * 35.0)
    assert gain_last_doubling([(50, -130.0), (150, -95.0), (250, -90.0)]) == pytest.approx(
        expected
    )
    assert gain_last_doubling([(300, -1.0), (400, -0.5)]) is None
    assert gain_last_doubling([(100, -2.0), (200, -1.0), (200, -1.5)]) == pytest.approx(0.5)
    # A flat curve with alternating noise: its window means, not its last point.
    noisy = [(s, -80.0 + (1.0 if (s // 10) % 2 else -1.0)) for s in range(10, 1010, 10)]
    assert gain_last_doubling(noisy) == pytest.approx(0.0, abs=0.2)
    root = tmp_path / "runs"
    for seed, shift in ((0, 0.0), (1, 2.0)):
        run = _write_run(root, f"s{seed}", _config("iaf", seed), 85.0)
        _add_test_curve(run, {50: -130.0 + shift, 150: -95.0 + shift, 250: -90.0 + shift})
    names = ["test_curve/iwae_gain_last_doubling_nats", "curve/val_elbo_gain_last_doubling_nats"]
    written = write_report([root], tmp_path / "out", metrics=names)
    table = written["markdown"].read_text()
    header = "| test bound gain over the last doubling of steps (nats) | validation ELBO gain"
    assert header in table
    gain = f"{expected:.2f} ± 0.00 (2)"
    assert f"| {gain} | 20.00 ± 0.00 (2) |" in table, table
    assert "near 0: the curve has flattened out" in table.replace("\n", " ")


def test_a_posterior_without_a_flow_has_no_flow_steps_in_the_figures(tmp_path: Path) -> None:
    """The diagonal row's config holds the flow settings' leftover defaults: the metric vs
    flow-steps figure draws it as a horizontal line ("no flow steps"), not a point at
    them, and the heat map puts it in a row of its own ("—"), as the table does."""
    root = tmp_path / "runs"
    for flow, layers, nll in (("none", 4, 87.0), ("iaf", 2, 86.0), ("iaf", 4, 85.0)):
        cfg = _config(flow, 0)
        cfg["model"]["posterior"]["num_layers"] = layers
        cfg["run"]["name"] = f"{flow}_{layers}"
        _write_run(root, f"{flow}_{layers}", cfg, nll)
    groups = group(collect([root]), by=["model.posterior.flow", "model.posterior.num_layers"])
    fig = metric_vs_key_figure(
        groups, "model.posterior.num_layers", "test/nll_iw5000_nats", ["model.posterior.flow"]
    )
    ax = fig.axes[0]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "posterior: diagonal Gaussian (no flow steps)" in legend, legend
    flat = [ln for ln in ax.get_lines() if list(ln.get_ydata()) == [87.0, 87.0]]
    assert len(flat) == 1 and list(flat[0].get_xdata()) == [0, 1]  # axes fractions
    assert all(87.0 not in list(ln.get_ydata()) for ln in ax.get_lines() if ln is not flat[0])
    heat = heatmap_figure(
        groups, ["model.posterior.flow", "model.posterior.num_layers"], "test/nll_iw5000_nats"
    )
    rows = [t.get_text() for t in heat.axes[0].get_yticklabels()]
    assert "—" in rows and "2" in rows and "4" in rows, rows


def test_a_training_curve_is_drawn_as_a_moving_mean(tmp_path: Path) -> None:
    """A run without a validation split has only its training bound, one minibatch per
    logged step: drawn as a trailing moving mean over a 25th of its points, and the axis
    says so; the stored curve keeps the raw values."""
    from vaeflow.tools.report.figures import _moving_mean

    assert _moving_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    run = _write_run(tmp_path / "runs", "s0", _config("iaf", 0), 85.0, curve=())
    raw = [-100.0 + (5.0 if i % 2 else -5.0) for i in range(100)]
    rows = [{"step": 10 * (i + 1), "train/elbo_nats": v} for i, v in enumerate(raw)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records = collect([tmp_path / "runs"])
    assert records[0]["learning_curve"]["train/elbo_nats"] == raw
    fig = learning_curves_figure(records, [])
    ax = fig.axes[0]
    assert "moving mean of 4 logged minibatches" in ax.get_ylabel()
    drawn = list(ax.get_lines()[0].get_ydata())
    assert drawn == pytest.approx(_moving_mean(raw, 4))
    assert all(v == pytest.approx(-100.0) for v in drawn[3:])  # the +-5 noise averaged out


def test_figures_redrawn_from_results_json(tmp_path: Path) -> None:
    """results.json keeps each run's learning curve (one line per list) and the figure
    options, so the figures come back without the run directories."""
    root = tmp_path / "runs"
    _flow_grid(root, PRIORS[:2])
    written = write_report([root], tmp_path / "out", references={"paper": 85.57})
    text = written["json"].read_text()
    assert '"step": [100, 200, 300]' in text  # compact: not one line per number
    data = json.loads(text, parse_constant=_refuse)
    first = next(r for r in data["records"] if r["name"] == "standard_normal_None_none_40_s1")
    assert first["learning_curve"] == {"step": [100, 200, 300], "val/elbo_nats": [-119, -99, -89]}
    assert data["figures"]["references"] == [["paper", 85.57, "nll"]]
    import shutil

    shutil.rmtree(root)
    again = render_figures_from_json(written["json"], tmp_path / "again")
    assert set(again) == {"markdown", "learning_curves", "heatmap"}
    assert all(again[f].read_bytes()[:4] == b"\x89PNG" for f in ("learning_curves", "heatmap"))
    # The table comes back too, as the report wrote it.
    assert again["markdown"].read_text() == written["markdown"].read_text()
    # A results.json from before the curves were stored: no learning curves, a warning.
    for r in data["records"]:
        del r["learning_curve"]
    old = tmp_path / "old" / "results.json"
    old.parent.mkdir()
    old.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="val/elbo_nats"):
        assert set(render_figures_from_json(old)) == {"markdown", "heatmap"}


def test_cli_labels_references_and_redraw(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command"))
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"model.posterior.flow": {"name": "q(z|x)"}}))
    out = tmp_path / "cli"
    argv = ["report", str(runs), "-o", str(out), "--labels", str(labels), "--log-x"]
    argv += ["--reference", "VampPrior (paper): 85.57", "--reference", "IWAE: 84.78"]
    args = parser.parse_args(argv)
    assert args.reference == [("VampPrior (paper)", 85.57, "nll"), ("IWAE", 84.78, "nll")]
    assert args.func(args) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["figures"]["log_x"] is True
    assert data["figures"]["labels"] == {"model.posterior.flow": {"name": "q(z|x)"}}
    redraw = parser.parse_args(["report", str(out / "results.json"), "-o", str(tmp_path / "r")])
    assert redraw.func(redraw) == 0
    assert (tmp_path / "r" / "learning_curves.png").is_file()
    # The table is redrawn too, with the stored label map.
    assert (tmp_path / "r" / "results.md").read_text().startswith("| q(z|x) |")
    for bad in ("85.57", "paper: -85.57", "paper: lots"):
        with pytest.raises(SystemExit):
            parser.parse_args(["report", str(runs), "-o", str(out), "--reference", bad])
    assert "NAME: NLL" in capsys.readouterr().err


def test_bound_references_are_labelled_as_bounds_and_kept_off_nll_axes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A paper that reports -ELBO (Rezende & Mohamed, the Sylvester paper): the line is
    drawn at minus it on the ELBO axes and labelled -ELBO, never "NLL"; an NLL axis
    shows the NLL references only; the kind survives results.json and a redraw; an old
    results.json with (name, value) pairs still reads as NLLs."""
    _flow_grid(tmp_path, PRIORS[2:5], latents=(16, 32))
    records = collect([tmp_path])
    refs = [REFERENCE, ("planar K = 80 (paper)", 85.1, "bound")]
    figures = make_figures(records, group(records), references=refs)
    curves = _check_readable(figures["learning_curves"][1], 12, ("data: MNIST",))
    assert "planar K = 80 (paper): -ELBO 85.1 nats, drawn at -85.1" in curves
    assert "VampPrior (paper): NLL 85.57 nats, drawn at -85.57" in curves
    ys = sorted(ln.get_ydata()[0] for ln in figures["learning_curves"][1].axes[0].get_lines()[-2:])
    assert ys == [-85.57, -85.1]
    nll_axis = _check_readable(figures["metric_vs_key"][1], 6, ("data: MNIST",))
    assert "VampPrior (paper): NLL 85.57 nats" in nll_axis
    assert not any("85.1" in label for label in nll_axis)  # a bound is not an NLL
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    argv = ["report", str(tmp_path), "-o", str(out), "--reference", "VampPrior (paper): 85.57"]
    args = parser.parse_args([*argv, "--bound-reference", "planar K = 80 (paper): 85.1"])
    assert args.bound_reference == [("planar K = 80 (paper)", 85.1, "bound")]
    assert args.func(args) == 0
    stored = json.loads((out / "results.json").read_text())["figures"]["references"]
    assert stored == [
        ["VampPrior (paper)", 85.57, "nll"],
        ["planar K = 80 (paper)", 85.1, "bound"],
    ]
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--bound-reference", "paper: -85.1"])
    assert "NAME: -ELBO" in capsys.readouterr().err
    with pytest.raises(ValueError, match="kind"):
        make_figures(records, group(records), references=[("x", 85.0, "elbo")])
    legacy = make_figures(records, group(records), references=[["old (paper)", 85.0]])
    assert "old (paper): NLL 85 nats, drawn at -85" in _check_readable(
        legacy["learning_curves"][1], 12, ("data: MNIST",)
    )


def test_keys_added_after_a_run_started_count_as_their_default(tmp_path: Path) -> None:
    """A sweep whose points ran on two vaeflow versions: the older config.json lacks a
    key added since (here train.prior_lr_scale), which must not make it a varying key."""
    old = _config("iaf", 1)
    old["train"]["free_bits"] = 0.25
    new = _config("iaf", 2)
    new["train"]["free_bits"] = 0.25
    new["train"]["prior_lr_scale"] = 1.0  # the default, written by the newer version
    _write_run(tmp_path, "old", old, 85.0)
    _write_run(tmp_path, "new", new, 86.0)
    records = collect([tmp_path])
    assert records[0]["config"]["train.prior_lr_scale"] == 1.0
    # ... except a key whose absence meant something else: free-bits groups of a run from
    # before the key existed are what its version did (an IAF posterior: one group, the
    # whole latent), not the default; and a table the run filled in
    # (model.posterior.options.*) gets no empty-table default beside its entries.
    assert records[0]["config"]["train.free_bits_group_size"] == 32
    assert records[1]["config"]["train.free_bits_group_size"] == 32  # both lack it
    (only,) = group(records)  # one group: the two runs differ only in their seed
    assert only["n_seeds"] == 2
    assert "model.posterior.options" not in records[0]["config"] or not any(
        k.startswith("model.posterior.options.") for k in records[0]["config"]
    )


def test_seeds_differing_in_implementation_settings_are_one_row(tmp_path: Path) -> None:
    """A row's seed 0 trained eager and seeds 1-2 with the compiled step (and each with its
    own data.batch_seed): one group of three seeds, not three rows, and the table says
    which implementation setting differed; a real difference (lr) still splits."""
    for seed in range(3):
        cfg = _config("iaf", seed)
        cfg["train"]["compile_step"] = seed > 0
        cfg["data"]["batch_seed"] = seed
        _write_run(tmp_path / "runs", f"s{seed}", cfg, 85.0 + seed)
    other = _config("iaf", 0)
    other["train"]["lr"] = 3e-4
    _write_run(tmp_path / "runs", "lr", other, 90.0)
    groups = group(collect([tmp_path / "runs"]))
    assert [g["n_seeds"] for g in groups] == [1, 3] and groups[0]["by"] == ["train.lr"]
    text = to_markdown(groups)
    assert "train.compile_step differs between runs (False, True): implementation only" in text
    assert "data.batch_seed" in text  # the seeds note says what a seed varies


def test_title_qualifies_flow_steps_when_some_rows_have_no_flow() -> None:
    """The posterior's flow steps are a constant of the IAF rows only when other rows
    have no posterior flow: the title says so instead of giving them to every row."""
    from vaeflow.tools.report import Labeller

    base = {"model.posterior.num_layers": 2, "data.dataset": "binarized_mnist"}
    mixed = [{**base, "model.posterior.flow": f} for f in ("none", "iaf")]
    title = Labeller().title(mixed, ["model.posterior.flow"])
    assert "flow steps (flow posteriors): 2" in title, title
    only_flows = [{**base, "model.posterior.flow": f} for f in ("iaf", "maf")]
    assert "flow steps: 2" in Labeller().title(only_flows, ["model.posterior.flow"])


def test_title_gives_every_layer_of_a_hierarchy() -> None:
    """A bottom-up hierarchy's title reads "latent dims (z1 + z2): 100 + 50", not z1's
    size alone; a one-layer model keeps "latent dim: 40"."""
    from vaeflow.tools.report import Labeller

    upper = str([{"latent_dim": 50, "hidden": [100, 100]}])
    two = [{"model.latent_dim": 100, "model.upper_layers": upper, "train.k": k} for k in (1, 5)]
    title = Labeller().title(two, ["train.k"])
    assert "latent dims (z1 + z2): 100 + 50" in title and "latent dim:" not in title, title
    one = [{"model.latent_dim": 40, "model.upper_layers": "[]"}]
    assert Labeller().title(one, []) == "latent dim: 40"


def test_title_leaves_out_what_a_topdown_model_does_not_use() -> None:
    """A top-down model's latents and priors are per group: the defaults of
    ``model.latent_dim`` and ``model.prior.name`` it carries are not its own."""
    from vaeflow.tools.report import Labeller

    common = {"model.latent_dim": 32, "model.prior.name": "standard_normal", "train.k": 1}
    topdown = [
        {**common, "model.topdown.channels": 32, "model.posterior.flow": f}
        for f in ("none", "conv_iaf")
    ]
    title = Labeller().title(topdown, ["model.posterior.flow"])
    assert "latent dim" not in title and "prior" not in title and "training k: 1" in title, title
    one_layer = [{**common, "model.topdown": None}, {**common, "model.topdown": "none"}]
    assert "latent dim: 32" in Labeller().title(one_layer, [])


def test_layers_written_before_a_new_key_are_the_same_layers(tmp_path: Path) -> None:
    """A hierarchy run whose config.json predates a nested key (model.upper_layers[i]
    .posterior.scale) groups with a run written after it, as flat new keys do."""
    layer_new = {
        "latent_dim": 50,
        "hidden": [100, 100],
        "activation": "tanh",
        "posterior": {"flow": None, "options": {}, "scale": "log_std"},
    }
    layer_old = {**layer_new, "posterior": {"flow": None, "options": {}}}
    for seed, layer in ((0, layer_old), (1, layer_new)):
        config = _config("none", seed)
        config["model"]["upper_layers"] = [layer]
        _write_run(tmp_path, f"s{seed}", config, nll=90.0 + seed)
    groups = group(collect([tmp_path]))
    assert len(groups) == 1 and groups[0]["seeds"] == [0, 1]
    # a layer that really differs still splits the rows
    config = _config("none", 2)
    config["model"]["upper_layers"] = [{**layer_new, "latent_dim": 20}]
    _write_run(tmp_path, "s2", config, nll=95.0)
    assert len(group(collect([tmp_path]))) == 2


# ----------------------------------------------------------------------------- stored records


def test_stored_records_report_again_without_their_run_directories(
    runs: Path, tmp_path: Path
) -> None:
    first = write_report([runs], tmp_path / "first")
    again = write_report([], tmp_path / "again", stored=[first["json"]])
    assert again["markdown"].read_text() == first["markdown"].read_text()
    before = json.loads(first["json"].read_text())
    after = json.loads(again["json"].read_text())
    assert after["groups"] == before["groups"]
    assert [r["learning_curve"] for r in after["records"]] == [
        r["learning_curve"] for r in before["records"]
    ]
    assert {r["stored_in"] for r in after["records"]} == {str(first["json"])}
    # the file being rewritten may be the one read
    write_report([], tmp_path / "first", stored=[first["json"]])
    assert json.loads(first["json"].read_text())["groups"] == before["groups"]


def test_a_run_directory_supersedes_its_stored_record(runs: Path, tmp_path: Path) -> None:
    stored = write_report([runs], tmp_path / "old")["json"]
    # the same sweep folder and run, finished again elsewhere with another number; and a
    # new seed beside the stored ones
    elsewhere = tmp_path / "machine2" / runs.name
    _write_run(elsewhere, "iaf_s1", _config("iaf", 1), nll=89.0)
    _write_run(elsewhere, "iaf_s3", _config("iaf", 3), nll=84.0)
    with pytest.warns(UserWarning, match="iaf_s1: the run directory given supersedes"):
        records = collect([elsewhere], stored=[stored])
    assert sorted(r["name"] for r in records) == [
        "iaf_s1", "iaf_s2", "iaf_s3", "planar_s1", "planar_s2",
    ]  # fmt: skip
    iaf = group(records)[0]
    assert sorted(iaf["seeds"]) == [1, 2, 3]
    assert iaf["metrics"]["test/nll_iw5000_nats"]["mean"] == pytest.approx((89 + 87 + 84) / 3)
    # a run of the same name in another sweep folder is another run
    other = tmp_path / "other_sweep"
    _write_run(other, "iaf_s1", _config("iaf", 1), nll=70.0)
    names = [r["run_dir"] for r in collect([other], stored=[stored])]
    assert str(other / "iaf_s1") in names and str(runs / "iaf_s1") in names


def test_stored_records_refused_or_dropped(runs: Path, tmp_path: Path) -> None:
    _write_run(runs, "iaf_s3", _config("iaf", 3))  # trained, never evaluated
    with pytest.warns(UserWarning):
        stored = write_report([runs], tmp_path / "old")["json"]
    with pytest.warns(UserWarning, match="iaf_s3 is not evaluated; left out"):
        records = collect([], stored=[stored])
    assert "iaf_s3" not in [r["name"] for r in records] and len(records) == 4
    copy = tmp_path / "copy.json"
    copy.write_text(stored.read_text())
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="iaf_s1 is stored in both"):
        collect([], stored=[stored, copy])
    not_a_report = tmp_path / "summary.json"
    not_a_report.write_text(json.dumps({"test/nll": 1.0}))
    with pytest.raises(ValueError, match="no 'records' list"):
        collect([], stored=[not_a_report])
    broken = json.loads(stored.read_text())
    del broken["records"][0]["protocol"]
    copy.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"record 0 lacks \['protocol'\]"):
        collect([], stored=[copy])
    with pytest.raises(FileNotFoundError, match="no such results.json"):
        collect([], stored=[tmp_path / "missing.json"])
    with pytest.raises(ValueError, match="nothing to report"):
        write_report([], tmp_path / "empty")


def test_stored_records_get_the_defaults_of_keys_added_since(runs: Path, tmp_path: Path) -> None:
    stored = write_report([runs], tmp_path / "old")["json"]
    data = json.loads(stored.read_text())
    for r in data["records"]:
        del r["config"]["train.prior_lr_scale"]  # as if written before the key existed
        r["metrics"]["test/ess_mean"] = None  # a non-finite metric, as results.json writes it
    stored.write_text(json.dumps(data))
    records = collect([], stored=[stored])
    assert all(r["config"]["train.prior_lr_scale"] == 1.0 for r in records)
    assert all(math.isnan(r["metrics"]["test/ess_mean"]) for r in records)
    assert [g["config"] for g in group(records)] == [
        {"model.posterior.flow": "iaf"},
        {"model.posterior.flow": "planar"},
    ]


def test_cli_from_report(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command"))
    stored = write_report([runs / "iaf_s1", runs / "iaf_s2"], tmp_path / "old")["json"]
    out = tmp_path / "cli"
    args = parser.parse_args(
        ["report", str(runs / "planar_s1"), "--from-report", str(stored), "-o", str(out)]
    )
    assert args.func(args) == 0
    rows = json.loads((out / "results.json").read_text())["groups"]
    assert [g["n_seeds"] for g in rows] == [2, 1]
    # a stored file alone (no run directories) is a report, not a redraw
    args = parser.parse_args(["report", "--from-report", str(stored), "-o", str(out)])
    assert args.func(args) == 0 and "markdown" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    args = parser.parse_args(["report", "--from-report", str(bad), "-o", str(out)])
    with pytest.raises(SystemExit, match="vaeflow report: error: .*no 'records' list"):
        args.func(args)
    with pytest.raises(SystemExit, match="give run directories"):
        args = parser.parse_args(["report", "-o", str(out)])
        args.func(args)


def test_a_run_directory_given_relatively_is_still_recognised(
    runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stored = write_report([runs], tmp_path / "old")["json"]
    monkeypatch.chdir(runs / "iaf_s1")
    (record,) = collect(["."])
    assert (record["sweep"], record["name"]) == (runs.name, "iaf_s1")
    monkeypatch.chdir(runs)
    for given in (".", "iaf_s1", "./iaf_s1"):
        with pytest.warns(UserWarning, match="supersedes"):
            records = collect([given], stored=[stored])
        iaf = group(records)[0]
        assert sorted(iaf["seeds"]) == [1, 2], given  # not [1, 1, 2]


def test_an_unevaluated_run_directory_keeps_its_stored_record(runs: Path, tmp_path: Path) -> None:
    stored = write_report([runs], tmp_path / "old")["json"]
    again = tmp_path / "machine2" / runs.name
    _write_run(again, "iaf_s1", _config("iaf", 1))  # restarted elsewhere, not evaluated yet
    (again / ".iaf_s2.k3j4.unpack").mkdir()  # an interrupted unpack's staging: not a run
    (again / ".iaf_s2.k3j4.unpack" / "config.json").write_text("{}")
    with pytest.warns(UserWarning) as caught:
        records = collect([again], stored=[stored])
    assert any("not evaluated yet; the evaluated record stored" in str(w.message) for w in caught)
    names = sorted((r["name"], r["status"]) for r in records)
    assert names == [(n, "evaluated") for n in ("iaf_s1", "iaf_s2", "planar_s1", "planar_s2")]
    assert group(records)[0]["metrics"]["test/nll_iw5000_nats"]["mean"] == 86.0


def test_malformed_stored_records_are_named(runs: Path, tmp_path: Path) -> None:
    stored = write_report([runs], tmp_path / "old")["json"]
    good = json.loads(stored.read_text())
    for change, message in (
        (lambda r: r["metrics"].update({"test/nll_iw5000_nats": [1.0]}), "malformed.*metrics"),
        (lambda r: r.update(config="x"), "malformed.*config"),
        (lambda r: r.pop("seed"), r"lacks \['seed'\]"),
    ):
        data = json.loads(json.dumps(good))
        change(data["records"][1])
        stored.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=f"record 1 .*{message}|record 1 {message}"):
            collect([], stored=[stored])
    # one file may hold the same run twice (a report over two machines' copies)
    data = json.loads(json.dumps(good))
    data["records"].append(data["records"][0])
    stored.write_text(json.dumps(data))
    assert len(collect([], stored=[stored])) == 5


def test_old_runs_free_bits_rule_is_the_one_their_version_used(tmp_path: Path) -> None:
    """Before train.free_bits_group_size (commit 3faea3d) free bits floored each dimension
    for a diagonal Gaussian posterior with a factorised prior, and the whole latent for
    any flow posterior or other prior; a hierarchy's rule cannot be told."""
    cases = {
        "diag": ({"flow": "none"}, "standard_normal", 1),
        "iaf": ({"flow": "iaf"}, "standard_normal", 16),
        "vamp": ({"flow": "none"}, "vamp", 16),
        "no_fb": ({"flow": "iaf"}, "standard_normal", 1),  # no free bits: the default
    }
    for name, (posterior, prior, _) in cases.items():
        cfg = _config(posterior["flow"], 0, latent=16)
        cfg["model"]["prior"] = {"name": prior}
        cfg["train"]["free_bits"] = 0.0 if name == "no_fb" else 0.25
        _write_run(tmp_path, name, cfg, 85.0)
    hier = _config("none", 0, latent=16)
    hier["model"]["upper_layers"] = [{"latent_dim": 8}]
    hier["train"]["free_bits"] = 0.25
    _write_run(tmp_path, "hier", hier, 85.0)
    found = {r["name"]: r["config"]["train.free_bits_group_size"] for r in collect([tmp_path])}
    assert found == {**{n: c[2] for n, c in cases.items()}, "hier": "unknown"}


def test_a_table_mixing_free_bits_rules_is_refused(tmp_path: Path) -> None:
    """Rows on different free-bits rules (per dimension vs one group, or with vs without
    free bits) are refused unless --by names the rule's keys; one rule is fine."""
    diag = _config("none", 0)
    iaf = _config("iaf", 0)
    for cfg in (diag, iaf):
        cfg["train"]["free_bits"] = 0.25
    diag["train"]["free_bits_group_size"] = 1
    iaf["train"]["free_bits_group_size"] = 32
    _write_run(tmp_path / "a", "diag", diag, 85.0)
    _write_run(tmp_path / "a", "iaf", iaf, 84.0)
    records = collect([tmp_path / "a"])
    with pytest.raises(ValueError, match=r"different free-bits rules.*free_bits_group_size"):
        group(records, by=["model.posterior.flow"])
    shown = group(records, by=["model.posterior.flow", "train.free_bits_group_size"])
    assert len(shown) == 2
    # The default --by makes every varying key a column, the rule's included.
    assert "train.free_bits_group_size" in group(records)[0]["by"]
    # The same rule for both: a table.
    iaf["train"]["free_bits_group_size"] = 1
    _write_run(tmp_path / "b", "diag", diag, 85.0)
    _write_run(tmp_path / "b", "iaf", iaf, 84.0)
    assert len(group(collect([tmp_path / "b"]), by=["model.posterior.flow"])) == 2
    # With free bits against without: train.free_bits must be a column.
    iaf["train"]["free_bits"] = 0.0
    _write_run(tmp_path / "c", "diag", diag, 85.0)
    _write_run(tmp_path / "c", "iaf", iaf, 84.0)
    with pytest.raises(ValueError, match=r"\['train.free_bits'\]"):
        group(collect([tmp_path / "c"]), by=["model.posterior.flow"])


def test_one_group_of_the_whole_latent_is_one_rule_across_latent_sizes(tmp_path: Path) -> None:
    """A latent-size sweep with one free-bits group per run (the whole latent) trains every
    row on the same rule: not refused."""
    for latent in (16, 32):
        cfg = _config("iaf", 0, latent=latent)
        cfg["train"]["free_bits"] = 0.25
        cfg["train"]["free_bits_group_size"] = latent
        _write_run(tmp_path, f"z{latent}", cfg, 85.0)
    assert len(group(collect([tmp_path]), by=["model.latent_dim"])) == 2


COMMITTED_REPORTS = sorted(
    p
    for p in (Path(__file__).resolve().parents[1] / "results").rglob("results.json")
    if "groups" in json.loads(p.read_text())
)


@pytest.mark.parametrize("path", COMMITTED_REPORTS, ids=lambda p: p.parent.name)
def test_committed_tables_are_their_data(path: Path) -> None:
    """Every committed results.md is exactly the table its results.json gives: no table
    in results/ is edited apart from the numbers it reports."""
    from vaeflow.tools.report import markdown_from_json

    assert (path.parent / "results.md").read_text() == markdown_from_json(path), (
        f"{path.parent}/results.md differs from its results.json: redraw it with "
        f"`vaeflow report {path} -o {path.parent}`"
    )


def test_the_seed_note_only_where_a_row_has_seeds(tmp_path: Path) -> None:
    """What a seed varies is said under a table with a spread over seeds, not under one
    seed per row."""
    for seed in (0, 1):
        _write_run(tmp_path / "two", f"iaf_s{seed}", _config("iaf", seed), 85.0 + seed)
    _write_run(tmp_path / "one", "iaf_s0", _config("iaf", 0), 85.0)
    note = "A seed sets train.seed"
    assert note in to_markdown(group(collect([tmp_path / "two"]))).replace("\n", " ")
    assert note not in to_markdown(group(collect([tmp_path / "one"]))).replace("\n", " ")


def _scores(
    run: Path, log_px: list[float], elbo: list[float], indices: list[int] | None = None
) -> None:
    """The per-image scores `vaeflow eval` keeps (test_scores.pt) for a fake run."""
    from vaeflow.run.checkpoint import save_checkpoint
    from vaeflow.run.evaluate import TEST_SCORES

    save_checkpoint(
        run / TEST_SCORES,
        {
            "evaluation": {"k": 5000, "test_examples": f"{len(log_px)} images"},
            "dataset": "mnist",
            "indices": torch.arange(4) if indices is None else torch.tensor(indices),
            "log_px": torch.tensor(log_px, dtype=torch.float64),
            "elbo": torch.tensor(elbo, dtype=torch.float64),
        },
    )


def test_paired_columns_against_a_reference_row(tmp_path: Path) -> None:
    """--paired-against: each row's per-image NLL / -ELBO (mean over its seeds) minus the
    reference row's, ± the standard error of the per-image differences; the reference row
    says so; a row without per-image scores gets '—' and the reason; the table is
    reproduced from results.json; a selector that picks no row is refused."""
    from vaeflow.tools.report import markdown_from_json

    ref = _write_run(tmp_path, "none_s0", _config("none", 0), 80.0)
    _scores(ref, [-80.0] * 4, [-91.0, -92.0, -93.0, -94.0])
    iaf = _write_run(tmp_path, "iaf_s0", _config("iaf", 0), 83.0)
    _scores(iaf, [-81.0, -82.0, -83.0, -86.0], [-90.0] * 4)
    for seed, shift in ((0, 0.0), (1, 2.0)):  # two seeds: per image their mean, -79 - 1
        maf = _write_run(tmp_path, f"maf_s{seed}", _config("maf", seed), 79.0)
        _scores(maf, [-78.0 - shift] * 4, [-91.0, -92.0, -93.0, -94.0])
    _write_run(tmp_path, "planar_s0", _config("planar", 0), 82.0)  # never scored per image
    out = tmp_path / "report"
    write_report(
        [tmp_path],
        out,
        by=["model.posterior.flow"],
        paired_against={"model.posterior.flow": "none"},
    )
    table = (out / "results.md").read_text()
    se = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64).std().item() / 2
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    se_elbo = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).std().item() / 2
    assert rows["IAF"].endswith(f"| +3.00 ± {se:.2f} | -2.50 ± {se_elbo:.2f} |")
    assert rows["MAF"].endswith("| -1.00 ± 0.00 | +0.00 ± 0.00 |")
    assert rows["diagonal Gaussian"].endswith("| reference | reference |")
    assert rows["planar"].endswith("| — | — |")
    assert "- not paired: " in table and "test_scores.pt does not exist" in table
    assert "over the 4 test images every run scored" in table
    assert markdown_from_json(out / "results.json") == table
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command"))
    cli = ["report", str(tmp_path), "-o", str(tmp_path / "cli"), "--by", "model.posterior.flow"]
    args = parser.parse_args([*cli, "--paired-against", "model.posterior.flow=none"])
    assert args.func(args) == 0
    assert (tmp_path / "cli" / "results.md").read_text() == table
    bad = parser.parse_args([*cli, "--paired-against", "model.posterior.flow"])
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        bad.func(bad)
    with pytest.raises(ValueError, match="selects 0 rows"):
        write_report(
            [tmp_path],
            tmp_path / "r2",
            by=["model.posterior.flow"],
            paired_against={"model.posterior.flow": "nsf"},
        )
    # a key the rows do not differ by, and a single row: each refused with why
    with pytest.raises(ValueError, match=r"train\.lr is not among the config keys the rows"):
        write_report([tmp_path], tmp_path / "r3", paired_against={"train.lr": "0.001"})
    _write_run(tmp_path / "one", "none_s0", _config("none", 0), 80.0)
    with pytest.raises(ValueError, match=r"form 1 row\(s\).*without --paired-against"):
        write_report(
            [tmp_path / "one"], tmp_path / "r4", paired_against={"model.posterior.flow": "none"}
        )


def test_paired_columns_over_nested_test_subsets(tmp_path: Path) -> None:
    """A row scored on a subset of the reference's images (a 1,000-image row beside one
    grown to all 10,000, say) is paired over the images both scored, not refused, and its
    own NLL is still checked against its summary; the note says the counts differ."""
    ref = _write_run(tmp_path, "none_s0", _config("none", 0), 25.0)
    _scores(ref, [-10.0, -20.0, -30.0, -40.0], [-11.0, -21.0, -31.0, -41.0])
    sub = _write_run(tmp_path, "iaf_s0", _config("iaf", 0), 29.0)
    _scores(sub, [-39.0, -19.0], [-43.0, -23.0], indices=[3, 1])
    full = _write_run(tmp_path, "maf_s0", _config("maf", 0), 24.0)
    _scores(full, [-9.0, -19.0, -29.0, -39.0], [-11.0, -21.0, -31.0, -41.0])
    out = tmp_path / "report"
    write_report([tmp_path], out, paired_against={"model.posterior.flow": "none"})
    table = (out / "results.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    assert rows["IAF"].endswith("| -1.00 ± 0.00 | +2.00 ± 0.00 |"), table
    assert rows["MAF"].endswith("| -1.00 ± 0.00 | +0.00 ± 0.00 |"), table
    assert "each row and the reference both scored (2 to 4;" in table.replace("\n", " ")
    paired = {
        g["config"]["model.posterior.flow"]: g["paired"]
        for g in json.loads((out / "results.json").read_text())["groups"]
    }
    assert paired["iaf"]["n"] == 2 and paired["maf"]["n"] == 4


def test_paired_columns_refuse_what_they_cannot_vouch_for(tmp_path: Path) -> None:
    """A row is not paired ('—', the reason named with the row) when it comes from a
    stored results.json, when its per-image scores do not average to its reported NLL
    (evaluated again since), or when a score is not finite; such a table still redraws
    from its results.json. The reference is matched case-blind."""
    from vaeflow.tools.report import markdown_from_json

    ref = _write_run(tmp_path / "runs", "none_s0", _config("none", 0), 80.0)
    _scores(ref, [-80.0] * 4, [-91.0] * 4)
    stale = _write_run(tmp_path / "runs", "iaf_s0", _config("iaf", 0), 83.0)
    _scores(stale, [-70.0] * 4, [-90.0] * 4)  # averages 70, not the summary's 83
    bad = _write_run(tmp_path / "runs", "maf_s0", _config("maf", 0), 79.0)
    _scores(bad, [-78.0, -78.0, -78.0, -math.inf], [-91.0] * 4)
    out = tmp_path / "one"
    write_report([tmp_path / "runs"], out, paired_against={"model.posterior.flow": "NONE"})
    table = (out / "results.md").read_text()
    assert "model.posterior.flow=iaf: its per-image scores average 70.0000 nats" in table
    assert "model.posterior.flow=maf: non-finite per-image scores" in table
    assert table.count("| — | — |") == 2 and "| reference | reference |" in table
    assert markdown_from_json(out / "results.json") == table
    # Reported again from the stored file only: its rows are not re-read from disk.
    planar = _write_run(tmp_path / "new", "planar_s0", _config("planar", 0), 82.0)
    _scores(planar, [-82.0] * 4, [-90.0] * 4)
    again = tmp_path / "two"
    with pytest.warns(UserWarning, match="supersedes the record stored"):
        write_report(
            [tmp_path / "new", tmp_path / "runs" / "none_s0"],
            again,
            stored=[out / "results.json"],
            paired_against={"model.posterior.flow": "none"},
        )
    table = (again / "results.md").read_text()
    assert "reported from a stored results.json" in table
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    assert rows["planar"].endswith("| +2.00 ± 0.00 | -1.00 ± 0.00 |")


def _paired_cells(table: str) -> dict[str, str]:
    """Row name -> its two paired cells, from a results.md table."""
    return {
        line.split(" | ")[0].strip("| "): " | ".join(line.rstrip(" |").split(" | ")[-2:])
        for line in table.splitlines()
        if line.startswith("| ") and " | " in line
    }


def test_kept_scores_pair_stored_rows_without_their_run_directories(tmp_path: Path) -> None:
    """--keep-scores writes every run's per-image scores beside results.json (float32,
    readable with weights_only); a later report of that results.json (however its path
    is spelled) pairs its rows as the run directories did, after they are gone, also
    against a run directory given beside them, and keeps the scores again by itself.
    Kept scores that are not the reported evaluation are not used; without the file the
    stored rows are not paired; an unreadable file is an error naming it."""
    import shutil

    from vaeflow.run.checkpoint import load_checkpoint
    from vaeflow.tools.report import SCORES_FILE

    def run(name: str, flow: str, seed: int, log_px: list[float], **kw: Any) -> Path:
        nll = -sum(log_px) / len(log_px)  # what the run's summary reports
        path = _write_run(tmp_path / "sweep", name, _config(flow, seed), nll)
        _scores(path, log_px, [v - 11.3 for v in log_px], **kw)
        return path

    ref = run("none_s0", "none", 0, [-80.123457, -80.7, -79.91, -80.05])
    run("iaf_s0", "iaf", 0, [-81.3, -82.25, -83.123, -86.0])
    run("maf_s0", "maf", 0, [-78.4, -78.1, -78.3, -77.9], indices=[3, 2, 1, 0])
    run("maf_s1", "maf", 1, [-80.4, -79.7, -80.3, -80.1])
    against = {"model.posterior.flow": "none"}
    first = tmp_path / "first"
    written = write_report([tmp_path / "sweep"], first, paired_against=against, keep_scores=True)
    assert written["scores"] == first / SCORES_FILE and SCORES_FILE != "test_scores.pt"
    kept = load_checkpoint(first / SCORES_FILE)["runs"]
    assert sorted(kept) == ["sweep/iaf_s0", "sweep/maf_s0", "sweep/maf_s1", "sweep/none_s0"]
    assert kept["sweep/iaf_s0"]["log_px"].dtype == torch.float32
    assert kept["sweep/maf_s0"]["indices"].tolist() == [3, 2, 1, 0]
    cells = _paired_cells((first / "results.md").read_text())
    assert cells["diagonal Gaussian"] == "reference | reference"
    assert all("±" in cells[row] for row in ("IAF", "MAF"))
    for gone in ("iaf_s0", "maf_s0", "maf_s1"):
        shutil.rmtree(tmp_path / "sweep" / gone)

    # The path spelled otherwise; the reference from its run directory, which supersedes
    # its stored record; the other rows from their kept scores.
    second = tmp_path / "second"
    with pytest.warns(UserWarning, match="supersedes the record stored"):
        write_report([ref], second, stored=[f"{first}//results.json"], paired_against=against)
    assert _paired_cells((second / "results.md").read_text()) == cells
    assert (second / SCORES_FILE).is_file()  # kept again without asking
    assert len(load_checkpoint(second / SCORES_FILE)["runs"]) == 4

    # Kept scores that are not the reported evaluation: that row is not paired.
    state = load_checkpoint(first / SCORES_FILE)
    state["runs"]["sweep/iaf_s0"]["log_px"] += 0.01
    torch.save(state, first / SCORES_FILE)
    stored = [first / "results.json"]
    with pytest.warns(UserWarning, match="not the evaluation its stored record reports"):
        write_report([], tmp_path / "third", stored=stored, paired_against=against)
    third = _paired_cells((tmp_path / "third" / "results.md").read_text())
    assert third["IAF"] == "— | —" and third["MAF"] == cells["MAF"]

    (first / SCORES_FILE).unlink()
    write_report([], tmp_path / "fourth", stored=stored, paired_against=against)
    fourth = (tmp_path / "fourth" / "results.md").read_text()
    assert "kept no per-image scores" in fourth and _paired_cells(fourth)["MAF"] == "— | —"
    assert not (tmp_path / "fourth" / SCORES_FILE).exists()

    (first / SCORES_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"{SCORES_FILE}: cannot read the report's kept"):
        write_report([], tmp_path / "fifth", stored=stored)
    # The command line: --keep-scores writes the file, --no-keep-scores does not.
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command"))
    for flag, kept_file in (("--keep-scores", True), ("--no-keep-scores", False)):
        out = tmp_path / flag
        args = parser.parse_args(["report", str(ref), "-o", str(out), flag])
        assert args.func(args) == 0
        assert (out / SCORES_FILE).is_file() == kept_file, flag


def test_the_same_seed_twice_is_not_two_seeds(tmp_path: Path) -> None:
    """Two runs of one setting with the same seed (one run stored under one sweep folder
    and re-run under another, say) are refused, not averaged as two seeds; another
    data.batch_seed makes them two draws."""
    for folder in ("old", "new"):
        _write_run(tmp_path / folder, "iaf_s0", _config("iaf", 0), 85.0)
    with pytest.raises(ValueError, match=r"same seed \(train\.seed 0.*one run reported twice"):
        group(collect([tmp_path / "old", tmp_path / "new"]))
    cfg = _config("iaf", 0)
    cfg["data"]["batch_seed"] = 5
    _write_run(tmp_path / "other", "iaf_s0", cfg, 86.0)
    (row,) = group(collect([tmp_path / "old", tmp_path / "other"]))
    assert row["n_seeds"] == 2


def test_where_reports_a_slice_of_the_runs_and_says_so(tmp_path: Path) -> None:
    """--where KEY=VALUE: only the runs (and stored records) whose config holds every
    value -- numbers as numbers, other values as text, case-blind; the table says which
    slice it is (in the configs' spelling) and redraws so from results.json; what the
    report derives from the runs (a no-flow run's flow length) follows the slice alone;
    an unknown key or an empty slice is refused with what there is."""
    from vaeflow.tools.report import markdown_from_json

    for flow, lr, steps in (
        ("none", 1e-3, 4),
        ("iaf", 1e-3, 2),
        ("iaf", 5e-4, 4),
        ("maf", 5e-4, 4),
    ):
        cfg = _config(flow, 0)
        cfg["train"]["lr"] = lr
        cfg["model"]["posterior"]["num_layers"] = steps
        _write_run(tmp_path / "runs", f"{flow}_{lr:g}", cfg, 80.0 + lr * 1000)
    out = tmp_path / "slice"
    write_report([tmp_path / "runs"], out, where={"train.lr": "5e-4"})
    table = (out / "results.md").read_text()
    rows = {line.split(" | ")[0].strip("| ") for line in table.splitlines()[2:]}
    assert {"IAF", "MAF"} <= rows and "diagonal Gaussian" not in rows, table
    assert "Runs: only those with `train.lr` = 0.0005 (`vaeflow report --where`)." in table
    assert markdown_from_json(out / "results.json") == table
    # the flow-length column comes from the slice: none where it does not vary
    both = tmp_path / "both"
    write_report([tmp_path / "runs"], both, where={"model.posterior.num_layers": "4"})
    header = (both / "results.md").read_text().splitlines()[0]
    assert "flow steps" not in header and "learning rate" in header, header
    # a stored record is sliced too; None matches "NONE"
    again = tmp_path / "again"
    write_report([tmp_path / "runs"], tmp_path / "full")
    stored = [tmp_path / "full" / "results.json"]
    write_report([], again, stored=stored, where={"model.posterior.flow": "NONE"})
    (record,) = json.loads((again / "results.json").read_text())["records"]
    assert record["name"] == "none_0.001"
    with pytest.raises(ValueError, match=r"no run's config has train\.lrr"):
        write_report([tmp_path / "runs"], tmp_path / "x", where={"train.lrr": "1"})
    with pytest.raises(ValueError, match=r"selects no run \(the runs have: .*0\.0005"):
        write_report([tmp_path / "runs"], tmp_path / "x", where={"train.lr": "0.1"})
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command"))
    cli = ["report", str(tmp_path / "runs"), "-o", str(tmp_path / "cli")]
    args = parser.parse_args([*cli, "--where", "train.lr=0.0005"])
    assert args.func(args) == 0
    assert (tmp_path / "cli" / "results.md").read_text() == table
    bad = parser.parse_args([*cli, "--where", "train.lr"])
    with pytest.raises(SystemExit, match="--where takes KEY=VALUE"):
        bad.func(bad)


def test_a_grown_report_keeps_the_slice_it_was_written_with(tmp_path: Path) -> None:
    """A report grown from a sliced one (--from-report, no --where) takes the same slice
    of the sweep folder: a run of another setting that has since landed there does not
    join the table; --no-where reports every run; two stored reports of different slices
    (every run being one) need an explicit --where; an explicit --where wins; the stored
    slice selects the same runs again (floats exactly, a rewritten key by its runs'
    values); a redraw refuses --where/--no-where rather than ignoring them."""
    runs = tmp_path / "runs"
    for name, lr in (("a", 1e-3), ("b", 5e-4)):
        cfg = _config("iaf" if name == "a" else "maf", 0)
        cfg["train"]["lr"] = lr
        _write_run(runs, name, cfg, 85.0)
    sliced = tmp_path / "sliced"
    write_report([runs], sliced, where={"train.lr": "0.001"})
    stored = [sliced / "results.json"]
    # another run lands in the folder, on the other setting, and one on the slice's
    cfg = _config("nsf", 0)
    cfg["train"]["lr"] = 5e-4
    _write_run(runs, "c", cfg, 84.0)
    cfg = _config("realnvp", 0)
    cfg["train"]["lr"] = 1e-3
    _write_run(runs, "d", cfg, 84.5)
    write_report([runs], sliced, stored=stored)
    data = json.loads((sliced / "results.json").read_text())
    assert sorted(r["name"] for r in data["records"]) == ["a", "d"]
    assert data["where"] == {"train.lr": "0.001"}
    assert "only those with `train.lr` = 0.001" in (sliced / "results.md").read_text()
    write_report([runs], tmp_path / "every", stored=stored, where={})
    data = json.loads((tmp_path / "every" / "results.json").read_text())
    assert sorted(r["name"] for r in data["records"]) == ["a", "b", "c", "d"]
    assert data["where"] is None
    write_report([runs], tmp_path / "other", stored=stored, where={"train.lr": "5e-4"})
    data = json.loads((tmp_path / "other" / "results.json").read_text())
    assert sorted(r["name"] for r in data["records"]) == ["b", "c"]
    # two stored reports of different slices
    other_runs = tmp_path / "other_runs"
    cfg = _config("maf", 1)
    cfg["train"]["lr"] = 5e-4
    _write_run(other_runs, "e", cfg, 85.5)
    second = tmp_path / "second"
    write_report([other_runs], second, where={"train.lr": "5e-4"})
    both = [*stored, second / "results.json"]
    with pytest.raises(ValueError, match="different --where slices.*--no-where"):
        write_report([], tmp_path / "x", stored=both)
    # every run is a slice of its own: a sliced report's slice must not thin out an
    # unsliced one's records unnoticed
    whole = tmp_path / "whole"
    write_report([other_runs], whole)
    with pytest.raises(ValueError, match="different --where slices.*every run"):
        write_report([], tmp_path / "x", stored=[*stored, whole / "results.json"])
    # a float that :g would cut to 6 digits, and a key the report rewrites for no-flow
    # runs (their flow length), still select the same runs when the report grows
    odd = tmp_path / "odd_runs"
    for name, flow, steps in (("f", "none", 1), ("g", "iaf", 2), ("h", "iaf", 4)):
        cfg = _config(flow, 0)
        cfg["train"]["lr"] = 1 / 3 * 1e-3
        cfg["model"]["posterior"]["num_layers"] = steps
        _write_run(odd, name, cfg, 85.0)
    for key, given, picked in (
        ("train.lr", repr(1 / 3 * 1e-3), ["f", "g", "h"]),
        ("model.posterior.num_layers", "1", ["f"]),
    ):
        first = tmp_path / f"odd_{key}"
        write_report([odd], first, where={key: given})
        grown = tmp_path / f"grown_{key}"
        write_report([odd], grown, stored=[first / "results.json"])
        for out in (first, grown):
            data = json.loads((out / "results.json").read_text())
            assert sorted(r["name"] for r in data["records"]) == picked, (key, out)
            assert data["where"] == {key: given}
    # the command line: --no-where, and both flags at once refused
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command"))
    cli = ["report", "--from-report", str(stored[0]), "-o", str(tmp_path / "cli")]
    args = parser.parse_args([*cli, str(runs), "--no-where"])
    assert args.func(args) == 0
    data = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert len(data["records"]) == 4
    args = parser.parse_args([*cli, "--no-where", "--where", "train.lr=1"])
    with pytest.raises(SystemExit, match="--where and --no-where contradict"):
        args.func(args)
    redraw = ["report", str(stored[0]), "-o", str(tmp_path / "redraw")]
    for flag in (["--no-where"], ["--where", "train.lr=1"]):
        args = parser.parse_args([*redraw, *flag])
        with pytest.raises(SystemExit, match="a redraw of one results.json has no runs"):
            args.func(args)


def test_a_training_curve_of_interval_means_is_drawn_as_logged(tmp_path: Path) -> None:
    """Runs that logged ``train/mean_elbo_nats`` (the mean over each logging interval)
    are drawn by it, unsmoothed; beside a run from before those means existed, every run
    falls back to its single minibatches (one kind of curve per figure)."""
    root = tmp_path / "runs"
    new = _write_run(root, "new", _config("iaf", 0), 85.0, curve=())
    rows = [
        {
            "step": 10 * (i + 1),
            "train/elbo_nats": -100.0 + i % 2,
            "train/mean_elbo_nats": -90.0 + i,
        }
        for i in range(60)
    ]
    (new / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records = collect([root])
    assert records[0]["learning_curve"]["train/mean_elbo_nats"][:2] == [-90.0, -89.0]
    fig = learning_curves_figure(records, [])
    assert "mean over each logging interval" in fig.axes[0].get_ylabel()
    assert list(fig.axes[0].get_lines()[0].get_ydata())[:3] == [-90.0, -89.0, -88.0]
    old = _write_run(root, "old", _config("iaf", 1), 85.0, curve=())
    old_rows = [{"step": 10 * (i + 1), "train/elbo_nats": -100.0} for i in range(60)]
    (old / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in old_rows) + "\n")
    fig = learning_curves_figure(collect([root]), ["train.seed"])
    assert "moving mean of 2 logged minibatches" in fig.axes[0].get_ylabel()
    # A run resumed across the version that added the means has them only from the
    # resume on: its whole curve is its single minibatches.
    resumed = _write_run(tmp_path / "resumed", "r", _config("iaf", 2), 85.0, curve=())
    rows = [{"step": 10 * (i + 1), "train/elbo_nats": -100.0 + i} for i in range(60)]
    for r in rows[30:]:
        r["train/mean_elbo_nats"] = -50.0
    (resumed / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (record,) = collect([tmp_path / "resumed"])
    assert list(record["learning_curve"]) == ["step", "train/elbo_nats"]
    assert len(record["learning_curve"]["step"]) == 60
