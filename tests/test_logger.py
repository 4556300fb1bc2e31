"""RunLogger: TensorBoard events and metrics.jsonl read back; ranks; PNGs; Progress."""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from vaeflow.run.logger import (
    Progress,
    RunLogger,
    flatten_config,
    has_hparams_experiment,
    log_test_scalars,
    read_metrics,
    write_hparams_experiment,
)

from .tensorboard_view import experiment_runs, hparams_table, tag_groups

SCALARS = {
    1: {"train/loss_nats": 98.25, "train/lr": 1e-3},
    2: {"train/loss_nats": 97.5, "train/lr": 1e-3, "val/elbo_nats": -101.0},
    3: {"train/loss_nats": float("nan"), "train/lr": 5e-4, "val/elbo_nats": float("-inf")},
}
CONFIG = {
    "model": {"posterior": {"flow": "iaf", "num_layers": 4, "options": {}}, "prior": None},
    "train": {"lr": 1e-3, "betas": [0.9, 0.999], "amp": False},
}


def _strict_json(line: str) -> dict:
    """Parse standard JSON only: NaN/Infinity literals (Python's extension) are errors."""

    def refuse(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(line, parse_constant=refuse)


def _log_everything(run_dir: pathlib.Path, rank: int = 0) -> RunLogger:
    with RunLogger(run_dir, rank=rank) as log:
        for step, metrics in SCALARS.items():
            log.log_scalars(metrics, step)
        log.log_images("samples/prior", torch.rand(5, 1, 6, 6), 3)
        log.log_images("val/reconstructions", torch.rand(4, 3, 6, 6), 3, nrow=4)
        log.log_histogram("val/kl_per_dim_nats", torch.randn(200), 3)
        log.log_hparams(flatten_config(CONFIG), ["val/elbo_nats", "test/nll_iw5000_nats"], step=3)
    return log


def test_tensorboard_events_read_back(tmp_path: pathlib.Path) -> None:
    _log_everything(tmp_path)
    acc = EventAccumulator(
        str(tmp_path),
        size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0},
    )
    acc.Reload()
    tags = acc.Tags()

    # The HParams columns name existing curves: no extra single-point hparam/* charts.
    expected_scalars = {"train/loss_nats", "train/lr", "val/elbo_nats"}
    assert set(tags["scalars"]) == expected_scalars
    for tag in ("train/loss_nats", "train/lr", "val/elbo_nats"):
        logged = [(s, m[tag]) for s, m in SCALARS.items() if tag in m]
        read = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in read] == [s for s, _ in logged]
        for (_, got), (_, want) in zip(read, logged, strict=True):
            # TensorBoard stores float32 and keeps non-finite values as they are.
            assert got == pytest.approx(want, rel=1e-6, nan_ok=True)
    assert math.isnan(acc.Scalars("train/loss_nats")[-1].value)
    assert acc.Scalars("val/elbo_nats")[-1].value == -math.inf

    assert set(tags["images"]) == {"samples/prior", "val/reconstructions"}
    grid = acc.Images("samples/prior")[0]
    # 5 images in ceil(sqrt(5)) = 3 columns, 2 rows, 6 px each with 2 px padding.
    assert (grid.step, grid.width, grid.height) == (3, 3 * 8 + 2, 2 * 8 + 2)
    assert tags["histograms"] == ["val/kl_per_dim_nats"]
    assert acc.Histograms("val/kl_per_dim_nats")[0].histogram_value.num == 200

    # The HParams entry lives in this run's own event file (not in a sub-run).
    # ... and the events sit in the run directory itself, so TensorBoard names the run
    # after it (no tb/ sub-folder, no sub-run).
    assert list(tmp_path.glob("events.out.tfevents.*"))
    assert not [p for p in tmp_path.rglob("events.out.tfevents.*") if p.parent != tmp_path]
    hparams_tags = acc.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in hparams_tags
    metadata = acc.SummaryMetadata("_hparams_/session_start_info")
    assert metadata.plugin_data.plugin_name == "hparams"
    start = plugin_data_pb2.HParamsPluginData.FromString(
        hparams_tags["_hparams_/session_start_info"]
    ).session_start_info
    assert start.hparams["model.posterior.flow"].string_value == "iaf"
    assert start.hparams["model.posterior.num_layers"].number_value == 4
    assert start.hparams["model.prior"].string_value == "none"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        hparams_tags["_hparams_/experiment"]
    ).experiment
    assert [m.name.tag for m in experiment.metric_infos] == [
        "val/elbo_nats",
        "test/nll_iw5000_nats",
    ]


def test_metrics_jsonl_is_valid_json_with_the_same_scalars(tmp_path: pathlib.Path) -> None:
    _log_everything(tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [_strict_json(line) for line in lines]  # NaN/inf must be null, not NaN
    assert [r["step"] for r in records] == [1, 2, 3]
    for record, (step, metrics) in zip(records, SCALARS.items(), strict=False):
        assert record["step"] == step
        assert isinstance(record["time"], float)
        for tag, value in metrics.items():
            assert record[tag] == (value if math.isfinite(value) else None), tag
    assert not any(k.startswith("hparam/") for r in records for k in r)

    read = read_metrics(tmp_path)
    assert read[0]["train/loss_nats"] == 98.25
    assert math.isnan(read[2]["train/loss_nats"])  # null comes back as nan
    assert math.isnan(read[2]["val/elbo_nats"])


def test_png_grids_are_written(tmp_path: pathlib.Path) -> None:
    _log_everything(tmp_path)
    names = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert names == ["samples_prior_0000003.png", "val_reconstructions_0000003.png"]
    with Image.open(tmp_path / "samples" / "val_reconstructions_0000003.png") as image:
        assert image.format == "PNG" and image.size == (4 * 8 + 2, 8 + 2)

    with RunLogger(tmp_path / "known", enabled_tb=False) as log:
        # A black and a white image (out-of-range values clamped) in white padding.
        images = torch.stack([torch.full((1, 4, 4), -0.5), torch.full((1, 4, 4), 1.5)])
        path = log.log_images("x", images, 7)
    assert path == tmp_path / "known" / "samples" / "x_0000007.png"
    with Image.open(path) as image:
        assert image.size == (2 * 6 + 2, 6 + 2)
        assert image.getpixel((0, 0)) == (255, 255, 255)  # padding
        assert image.getpixel((3, 3)) == (0, 0, 0)  # first image
        assert image.getpixel((9, 3)) == (255, 255, 255)  # second image
    assert not (tmp_path / "known" / "tb").exists()


def test_rank_other_than_zero_writes_nothing(tmp_path: pathlib.Path) -> None:
    _log_everything(tmp_path / "run", rank=1)
    with RunLogger(tmp_path / "run", rank=3) as log:
        assert log.log_images("x", torch.rand(1, 1, 2, 2), 0) is None
        log.flush()
    assert not (tmp_path / "run").exists()


def test_read_metrics_skips_a_truncated_last_line_and_resume_continues(
    tmp_path: pathlib.Path,
) -> None:
    with RunLogger(tmp_path, enabled_tb=False) as log:
        log.log_scalars({"train/loss_nats": 1.0}, 1)
        log.log_scalars({"train/loss_nats": 2.0}, 2)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "time": 17000, "train/lo')  # killed mid-write
    with pytest.warns(UserWarning, match="skipping the last line"):
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]

    # A resumed logger ends the partial line, so its own records stay parseable.
    with RunLogger(tmp_path, enabled_tb=False) as log:
        log.log_scalars({"train/loss_nats": 3.0}, 3)
    with pytest.warns(UserWarning, match="skipping line 3"):
        records = read_metrics(tmp_path)
    assert [(r["step"], r["train/loss_nats"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0)]

    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        read_metrics(tmp_path / "elsewhere")


@pytest.mark.parametrize("writers_before", [0, 9], ids=["first writers", "9th and 10th"])
def test_purge_step_drops_records_logged_after_the_checkpoint(
    tmp_path: pathlib.Path, monkeypatch, writers_before: int
) -> None:
    """Also when the process's writer counter goes from 9 to 10 within one second: the
    event files' names then sort the resumed file first unless it is a second later."""
    import tensorboard.summary.writer.event_file_writer as efw

    monkeypatch.setattr(efw, "_global_uid", efw.AtomicCounter(writers_before))
    with RunLogger(tmp_path) as log:
        for step in range(1, 6):
            log.log_scalars({"train/loss_nats": float(step)}, step)
    # Resumed from a checkpoint at step 3: steps 3..5 are redone.
    with RunLogger(tmp_path, purge_step=3) as log:
        log.log_scalars({"train/loss_nats": 30.0}, 3)
    assert [(r["step"], r["train/loss_nats"]) for r in read_metrics(tmp_path)] == [
        (1, 1.0),
        (2, 2.0),
        (3, 30.0),
    ]
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    read = [(e.step, e.value) for e in acc.Scalars("train/loss_nats")]
    assert read == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_bad_inputs_raise_clear_errors(tmp_path: pathlib.Path) -> None:
    log = RunLogger(tmp_path, enabled_tb=False)
    with pytest.raises(ValueError, match="'step' is reserved"):
        log.log_scalars({"step": 1.0}, 1)
    with pytest.raises(ValueError, match=r"shape \(3,\).*\.mean\(\)"):
        log.log_scalars({"train/loss_nats": torch.ones(3)}, 1)
    with pytest.raises(TypeError, match="'train/x' is a <class 'str'>"):
        log.log_scalars({"train/x": "1"}, 1)
    with pytest.raises(ValueError, match=r"got shape \(2, 36\)"):
        log.log_images("x", torch.rand(2, 36), 1)
    with pytest.raises(TypeError, match="'model.opt' is a <class 'NoneType'>.*flatten_config"):
        log.log_hparams({"model.opt": None}, {})  # type: ignore[dict-item]
    log.close()
    log.close()  # idempotent
    with pytest.raises(RuntimeError, match="is closed"):
        log.log_scalars({"train/loss_nats": 1.0}, 2)


def test_flatten_config() -> None:
    flat = flatten_config(CONFIG)
    assert flat == {
        "model.posterior.flow": "iaf",
        "model.posterior.num_layers": 4,
        "model.posterior.options": "{}",
        "model.prior": "none",
        "train.lr": 1e-3,
        "train.betas": "[0.9, 0.999]",
        "train.amp": False,
    }
    assert flatten_config({"a": (1, 2)}, prefix="cfg") == {"cfg.a": "[1, 2]"}
    with pytest.raises(TypeError, match="'data.root' is a <class 'pathlib"):
        flatten_config({"data": {"root": pathlib.Path("x")}})


def test_progress_prints_nothing_when_not_a_tty(capsys: pytest.CaptureFixture[str]) -> None:
    with Progress(10) as progress:  # pytest's captured stderr is not a terminal
        for step in range(1, 11):
            progress.update(step, 98.21)
    assert capsys.readouterr() == ("", "")


def test_progress_line_when_enabled(capsys: pytest.CaptureFixture[str]) -> None:
    progress = Progress(10, enabled=True, min_interval=0.0)
    progress.update(1, 98.214)
    progress.update(10, 97.0, bpd=3.25)
    progress.close()
    err = capsys.readouterr().err
    assert err.startswith("\r step 1/10 | loss 98.21 nats")
    assert "\r step 10/10 | loss 97.00 nats | bpd 3.25 | " in err
    assert err.rstrip("\n").endswith("it/s") and err.endswith("\n")


def test_test_scalars_fill_the_hparams_columns_later(tmp_path: pathlib.Path) -> None:
    """vaeflow eval adds its test metrics to a finished run's events (a second event file
    of the same run), and the log_hparams order puts the varied keys first."""
    from vaeflow.run.logger import hparams_order, log_test_scalars

    with RunLogger(tmp_path) as log:
        log.log_scalars({"val/elbo_nats": -90.0}, 10)
        log.log_hparams({"data.seed": 0, "model.latent_dim": 4}, ["test/nll_iw5000_nats"])
    log_test_scalars(tmp_path, {"test/nll_iw5000_nats": 88.5}, 10)
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("test/nll_iw5000_nats")] == [(10, 88.5)]
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    flat = {"data.seed": 0, "run.name": "x", "train.lr": 1e-3, "model.prior.name": "vamp"}
    assert list(hparams_order(flat)) == ["model.prior.name", "train.lr", "data.seed", "run.name"]
    assert list(hparams_order(flat, first=["train.lr"]))[0] == "train.lr"


def test_sweep_hparams_table_leads_with_the_varied_keys_then_the_test_nll(
    tmp_path: pathlib.Path,
) -> None:
    """What `tensorboard --logdir <sweep>` shows, computed by TensorBoard's own HParams
    backend: one experiment (the sweep's), the key the sweep varies first (not the
    alphabetically first data.* keys), the test NLL as the first metric."""
    sweep = tmp_path / "sweep"
    points = {
        f"layers={n}": {"data.batch_size": 100, "data.seed": 0, "model.flow": "iaf",
                        "model.posterior.num_layers": n}
        for n in (1, 2)
    }  # fmt: skip
    metrics = ["test/nll_iw5000_nats", "test/elbo_nats", "val/elbo_nats"]
    write_hparams_experiment(sweep, list(points.values()), metrics)
    for name, flat in points.items():
        with RunLogger(sweep / name) as log:
            log.log_scalars({"train/loss_nats": 90.0, "val/elbo_nats": -90.0}, 10)
            log.log_hparams(flat, metrics, experiment=not has_hparams_experiment(sweep))
        log_test_scalars(sweep / name, {"test/nll_iw5000_nats": 88.5, "test/elbo_nats": -91}, 10)

    assert experiment_runs(sweep) == ["."]  # the points' runs carry none
    hparams, columns = hparams_table(sweep)
    assert hparams == ["model.posterior.num_layers", "data.batch_size", "data.seed", "model.flow"]
    assert columns == metrics
    # Rewriting the sweep's experiment (a sweep run again) replaces it.
    write_hparams_experiment(sweep, list(points.values()), metrics[:1])
    assert len(list(sweep.glob("events.out.tfevents.*"))) == 1
    assert hparams_table(sweep)[1] == metrics[:1]
    # A run on its own keeps its own experiment (nothing varies; metrics in order).
    with RunLogger(tmp_path / "alone") as log:
        log.log_hparams(points["layers=1"], metrics)
    assert experiment_runs(tmp_path / "alone") == ["."]
    assert hparams_table(tmp_path / "alone")[1] == metrics
    # TensorBoard orders tag groups by name: the eval's test group sorts above the curves,
    # which is why eval writes only the HParams-column metrics to it (docs/design.md §6).
    assert tag_groups(sweep) == ["test", "train", "val"]
