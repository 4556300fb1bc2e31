"""Run logging: TensorBoard events plus an append-only ``metrics.jsonl``, and a progress bar.

A run directory (docs/design.md) gets

* TensorBoard event files in the run directory itself (scalars, image grids, histograms
  and an HParams entry), so ``tensorboard --logdir runs/`` names each run after its
  directory (a ``tb/`` sub-folder would make every run ``<run>/tb``);
* ``metrics.jsonl`` — one JSON object per :meth:`RunLogger.log_scalars` call,
  ``{"step": 1200, "time": 1718000000.1, "train/loss_nats": 98.2, ...}``, from which
  ``results/`` tables are rebuilt by script (:func:`read_metrics`);
* ``samples/`` — every logged image grid also as a PNG.

Scalar names carry their split and unit (``train/loss_nats``, ``val/elbo_nats``,
``test/bpd``; docs/design.md §3.3). Only rank 0 of a distributed run writes; on other
ranks every method is a no-op, so the training loop need not branch.

This module imports no other vaeflow module (docs/design.md §2).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import torch
from torch import Tensor

from ..atomic import atomic_write, write_text_atomic

__all__ = [
    "RunLogger",
    "Progress",
    "flatten_config",
    "hparams_order",
    "log_test_scalars",
    "read_metrics",
    "write_hparams_experiment",
    "has_hparams_experiment",
    "METRICS_FILE",
    "HPARAMS_EXPERIMENT_SUFFIX",
]

METRICS_FILE = "metrics.jsonl"
# The event file that holds a sweep's HParams experiment (write_hparams_experiment) ends
# with this, so it can be found, replaced, and told apart from a run's own events.
HPARAMS_EXPERIMENT_SUFFIX = ".hparams_experiment"
_RESERVED = ("step", "time")
HParam = int | float | str | bool


def _as_float(tag: str, value: Any) -> float:
    """A metric value as a Python float (numbers and one-element tensors)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"metric {tag!r} is a tensor of shape {tuple(value.shape)}; log a scalar "
                "(e.g. .mean()) or use log_histogram for a distribution"
            )
        return float(value.detach().cpu().item())
    if isinstance(value, numbers.Real):  # int, float, bool, numpy scalars
        return float(value)
    raise TypeError(f"metric {tag!r} is a {type(value)}; pass a number or a 0-d tensor")


def _after_existing_event_files(run_dir: Path) -> None:
    """Wait (at most a second) until a new event file in ``run_dir`` sorts after the ones
    already there.

    TensorBoard reads a run's event files in name order, and honours a writer's
    ``purge_step`` only for the files before it. The names are
    ``events.out.tfevents.<whole seconds>.<host>.<pid>.<n>`` with ``n`` a per-process
    counter, so two files of one process in the same second sort by ``n`` as text:
    ``...123.10`` before ``...123.9``. A resumed run whose new file sorted first had its
    purged steps come back (caught by a test once ten writers had been opened). A
    strictly later second puts the new file last whatever its counter.
    """
    newest = -1
    for path in run_dir.glob("events.out.tfevents.*"):
        field = path.name.split(".")[3]
        if field.isdigit():
            newest = max(newest, int(field))
    while int(time.time()) <= newest:
        time.sleep(0.05)


class RunLogger:
    """TensorBoard + ``metrics.jsonl`` + PNG sample grids for one run directory.

    Usage::

        with RunLogger(run_dir) as log:
            log.log_scalars({"train/loss_nats": 98.2, "train/lr": 1e-3}, step)
            log.log_images("val/prior_samples", x_samples, step)
            log.log_hparams(flatten_config(config_dict), ["val/elbo_nats", "test/bpd"])

    Non-finite scalars: written as ``null`` in ``metrics.jsonl`` (JSON has no NaN; every
    line stays valid JSON, :func:`read_metrics` turns them back into ``nan``) and kept
    as-is in TensorBoard, where a NaN or inf loss is exactly what one wants to see.

    Resuming: ``metrics.jsonl`` is opened for appending, so a resumed run continues the
    same file. Pass ``purge_step`` (the checkpoint's step) so the records a killed run
    wrote after its last checkpoint are dropped from ``metrics.jsonl`` and hidden in
    TensorBoard (``SummaryWriter(purge_step=...)``) instead of appearing twice.

    Args:
        run_dir: the run directory (created if missing).
        enabled_tb: write TensorBoard events into ``run_dir``; ``False`` keeps only
            ``metrics.jsonl`` and the PNGs (and does not import TensorBoard).
        rank: the process rank in distributed training; only rank 0 writes anything.
        purge_step: when resuming from a checkpoint at this step, drop logged records
            with ``step >= purge_step``.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        enabled_tb: bool = True,
        rank: int = 0,
        purge_step: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.active = rank == 0
        self._closed = False
        self._writer = None
        self._metrics: TextIO | None = None
        if not self.active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.run_dir / METRICS_FILE
        if purge_step is not None and metrics_path.exists():
            self._purge_metrics(metrics_path, purge_step)
        self._metrics = open(metrics_path, "a+", encoding="utf-8")  # noqa: SIM115 - kept open
        # A run killed mid-line leaves a partial last line; end it so the next record
        # starts on its own line (read_metrics skips the partial one with a warning).
        if self._metrics.tell() > 0:
            self._metrics.seek(self._metrics.tell() - 1)
            last = self._metrics.read(1)
            self._metrics.seek(0, os.SEEK_END)
            if last != "\n":
                self._metrics.write("\n")
                self._metrics.flush()
        if enabled_tb:
            # Imported here so runs with enabled_tb=False work without tensorboard.
            from torch.utils.tensorboard import SummaryWriter

            _after_existing_event_files(self.run_dir)
            self._writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=purge_step)

    @staticmethod
    def _purge_metrics(path: Path, purge_step: int) -> None:
        """Rewrite ``metrics.jsonl`` without records at ``step >= purge_step`` (atomic)."""
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # the partial line of a killed run: it is being purged anyway
            if isinstance(record, dict) and record.get("step", -1) < purge_step:
                kept.append(line + "\n")
        write_text_atomic(path, "".join(kept))

    def _check_open(self) -> bool:
        """Whether to write: rank 0 and not closed (logging after close is a bug)."""
        if self._closed:
            raise RuntimeError(
                f"RunLogger for {self.run_dir} is closed; create a new RunLogger (with "
                "purge_step when resuming) to log more"
            )
        return self.active

    def log_scalars(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log scalars to TensorBoard and as one line of ``metrics.jsonl``.

        Args:
            metrics: ``{tag: value}`` with tags like ``train/loss_nats``; values are
                numbers or one-element tensors. Non-finite values become ``null`` in
                JSON and stay as they are in TensorBoard.
            step: the global training step (x axis).

        Raises:
            ValueError: a tag is ``"step"`` or ``"time"`` (reserved JSON keys), or a
                tensor value has more than one element.
            TypeError: a value is not a number.
        """
        if not self._check_open():
            return
        values: dict[str, float] = {}
        for tag, value in metrics.items():
            if tag in _RESERVED:
                raise ValueError(
                    f"metric name {tag!r} is reserved in metrics.jsonl; name it with its "
                    "split and unit, e.g. 'train/step_time_s'"
                )
            values[str(tag)] = _as_float(tag, value)
        record: dict[str, Any] = {"step": int(step), "time": time.time()}
        record.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
        assert self._metrics is not None
        # allow_nan=False guarantees standard JSON: a stray NaN would fail here, not in a
        # downstream parser.
        self._metrics.write(json.dumps(record, allow_nan=False) + "\n")
        self._metrics.flush()  # a killed run keeps every completed line
        if self._writer is not None:
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, int(step))

    def log_images(
        self, tag: str, images: Tensor, step: int, nrow: int | None = None
    ) -> Path | None:
        """Log a grid of images to TensorBoard and save it as a PNG.

        Args:
            tag: e.g. ``val/prior_samples_t1`` or ``val/reconstructions``.
            images: ``(N, C, H, W)`` with ``C`` in {1, 3}, values in [0, 1] (clamped, so
                slight overshoot of a decoder mean is harmless).
            step: the global step; part of the PNG name.
            nrow: images per grid row; default ``ceil(sqrt(N))`` (a square-ish grid).

        Returns:
            The PNG path ``run_dir/samples/{tag with '/' -> '_'}_{step:07d}.png`` (written
            atomically), or ``None`` on ranks other than 0.

        Raises:
            ValueError: ``images`` is not ``(N, C, H, W)`` with 1 or 3 channels.
        """
        if not self._check_open():
            return None
        if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
            raise ValueError(
                f"log_images({tag!r}) expects a non-empty (N, C, H, W) batch with C = 1 or 3, "
                f"got shape {tuple(images.shape)}; reshape flat images with "
                ".view(N, C, H, W)"
            )
        from torchvision.utils import make_grid

        n = images.shape[0]
        nrow = nrow if nrow is not None else math.ceil(math.sqrt(n))
        images = images.detach().float().cpu().clamp(0.0, 1.0)
        grid = make_grid(images, nrow=nrow, padding=2, pad_value=1.0)  # (3, H', W')
        if self._writer is not None:
            self._writer.add_image(tag, grid, int(step), dataformats="CHW")
        return self._save_png(tag, grid, int(step))

    def _save_png(self, tag: str, grid: Tensor, step: int) -> Path:
        """Write a ``(3, H, W)`` grid in [0, 1] to ``samples/`` atomically."""
        from PIL import Image

        samples = self.run_dir / "samples"
        samples.mkdir(exist_ok=True)
        path = samples / f"{tag.replace('/', '_').replace(os.sep, '_')}_{step:07d}.png"
        # Round to the nearest 8-bit level, as torchvision.utils.save_image does.
        pixels = grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)
        image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
        with atomic_write(path, "wb") as f:
            image.save(f, format="PNG")  # explicit: the temp name has no .png suffix
        return path

    def log_histogram(self, tag: str, values: Tensor, step: int) -> None:
        """Log the distribution of ``values`` (any shape) to TensorBoard.

        Non-finite entries are dropped (TensorBoard's binning cannot place them); if none
        is finite, nothing is logged and a ``UserWarning`` says so. Histograms are not
        written to ``metrics.jsonl``.

        Args:
            tag: e.g. ``val/kl_per_dim_nats``.
            values: any shape; flattened.
            step: the global step.
        """
        if not self._check_open() or self._writer is None:
            return
        flat = values.detach().float().cpu().flatten()
        finite = flat[torch.isfinite(flat)]
        if finite.numel() == 0:
            warnings.warn(
                f"histogram {tag!r} at step {step} has no finite values; nothing logged",
                UserWarning,
                stacklevel=2,
            )
            return
        self._writer.add_histogram(tag, finite, int(step))

    def log_hparams(
        self,
        hparams: Mapping[str, HParam],
        metrics: Mapping[str, float] | Sequence[str],
        step: int = 0,
        experiment: bool = True,
    ) -> None:
        """Record the run's hyperparameters and its metric columns for the HParams tab.

        Unlike ``SummaryWriter.add_hparams``, which writes into a new timestamped sub-run
        (so TensorBoard shows every run twice), this writes the HParams summaries into
        this run's own event file, so the HParams tab lists the run itself next to its
        curves. TensorBoard takes each metric column's value from this run's scalar of
        that tag (its last value), so the columns are best given as the tags of curves
        the run logs anyway (``["test/nll_iw5000_nats", "val/elbo_nats"]``): no extra
        single-point charts appear in the SCALARS tab, and a test metric written later
        by ``vaeflow eval`` (:func:`log_test_scalars`) fills its column then.

        Two parts: the *session* (this run's values: its row) and the *experiment* (the
        table's columns: which hyperparameters, which metrics in which order). TensorBoard
        reads one experiment for a whole log directory, the first it finds, so a run
        inside a sweep passes ``experiment=False`` and the sweep directory holds the one
        experiment of all its points (:func:`write_hparams_experiment`).

        Args:
            hparams: flat ``{name: int | float | str | bool}``, e.g. from
                :func:`flatten_config` (bools are recorded as 0/1 numbers).
            metrics: the metric tags in column order, or ``{tag: value}`` to log those
                values as scalars at ``step`` too (for metrics no curve carries).
            step: the step of the summaries (and of logged values).
            experiment: also write the experiment (columns) built from this run alone.

        Raises:
            TypeError: a hyperparameter is not an int, float, str or bool (name given).
        """
        if not self._check_open():
            return
        _check_hparams(hparams)
        tags = list(metrics)
        if self._writer is not None:
            from torch.utils.tensorboard.summary import hparams as hparams_summary

            _, start, end = hparams_summary(dict(hparams), dict.fromkeys(tags, 0.0))
            summaries = [start, end]
            if experiment:
                summaries.insert(0, _experiment_summary([hparams], tags))
            # The writer's own FileWriter (what add_scalar uses), not add_hparams' sub-run.
            file_writer = self._writer._get_file_writer()
            for summary in summaries:
                file_writer.add_summary(summary, int(step))
        if isinstance(metrics, Mapping):
            self.log_scalars(metrics, step)

    def flush(self) -> None:
        """Push buffered TensorBoard events and metrics lines to disk."""
        if self._closed or not self.active:
            return
        if self._metrics is not None:
            self._metrics.flush()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the files; further logging raises. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._writer.close()
        if self._metrics is not None:
            self._metrics.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def log_test_scalars(
    run_dir: str | os.PathLike[str], metrics: Mapping[str, float], step: int
) -> None:
    """Add scalars (``vaeflow eval``'s test metrics) to a finished run's TensorBoard events.

    A new event file beside the training's (TensorBoard merges a run's files): the HParams
    columns that name these tags fill in, and ``metrics.jsonl`` is left as training wrote
    it (the test numbers live in ``summary.json``). Non-finite values are kept as they are.
    """
    from torch.utils.tensorboard import SummaryWriter

    _after_existing_event_files(Path(run_dir))
    writer = SummaryWriter(log_dir=str(run_dir))
    try:
        for tag, value in metrics.items():
            writer.add_scalar(tag, _as_float(tag, value), int(step))
    finally:
        writer.close()


def hparams_order(flat: Mapping[str, HParam], first: Sequence[str] = ()) -> dict[str, HParam]:
    """The hyperparameters in a reader's order: ``first`` (e.g. the keys a sweep varies),
    then the model, objective and evaluation keys, then data and run bookkeeping.

    This is the order of the HParams summaries. TensorBoard's table (2.21) does not keep
    it: its backend sorts the columns by (varies across the runs first, then name), which
    is why a sweep marks the keys it varies (:func:`write_hparams_experiment`)."""
    rank = {"model": 1, "train": 2, "eval": 3, "data": 4, "run": 5}
    keys = sorted(flat, key=lambda k: (k not in first, rank.get(k.split(".")[0], 6)))
    return {k: flat[k] for k in keys}


def _check_hparams(hparams: Mapping[str, Any]) -> None:
    """Only the value types the HParams summary can hold (name the offending key)."""
    for name, value in hparams.items():
        if type(value) not in (int, float, str, bool):
            raise TypeError(
                f"hyperparameter {name!r} is a {type(value)}; pass only int, float, str "
                "or bool values (vaeflow.run.logger.flatten_config converts a nested config)"
            )


def _experiment_summary(runs: Sequence[Mapping[str, HParam]], metrics: Sequence[str]) -> Any:
    """The HParams ``Experiment`` summary (the table's columns) for these runs' values.

    What TensorBoard 2.21 does with it (``plugins/hparams/backend_context.py`` and the
    HParams dashboard's ``_computeHParams``): it takes the first experiment it finds in
    the log directory as the whole table's columns; it sorts the hyperparameter columns
    by ``differs`` (True first), then by name, and shows the first five (the rest behind
    checkboxes); it keeps the metric columns in the order given here and shows the first
    five. So ``differs`` is set on the keys whose value is not the same in every run,
    and ``metrics`` should start with the column a reader compares first.
    """
    from google.protobuf import struct_pb2
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams.api_pb2 import (
        DataType,
        Experiment,
        HParamInfo,
        MetricInfo,
        MetricName,
    )
    from tensorboard.plugins.hparams.metadata import (
        EXPERIMENT_TAG,
        PLUGIN_DATA_VERSION,
        PLUGIN_NAME,
    )
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    for hparams in runs:
        _check_hparams(hparams)
    infos = []
    for name in dict.fromkeys(k for hparams in runs for k in hparams):  # first-seen order
        values = [hparams[name] for hparams in runs if name in hparams]
        # A key some runs lack differs too: the table shows it empty for those.
        differs = len(set(values)) > 1 or len(values) < len(runs)
        if any(isinstance(v, str) for v in values):
            domain = struct_pb2.ListValue()
            for v in dict.fromkeys(str(v) for v in values):
                domain.values.add().string_value = v
            infos.append(
                HParamInfo(
                    name=name,
                    type=DataType.Value("DATA_TYPE_STRING"),
                    domain_discrete=domain,
                    differs=differs,
                )
            )
        else:  # torch's session summary records bools as numbers too
            infos.append(
                HParamInfo(name=name, type=DataType.Value("DATA_TYPE_FLOAT64"), differs=differs)
            )
    experiment = Experiment(
        hparam_infos=infos,
        metric_infos=[MetricInfo(name=MetricName(tag=tag)) for tag in metrics],
    )
    content = HParamsPluginData(experiment=experiment, version=PLUGIN_DATA_VERSION)
    metadata = SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(
            plugin_name=PLUGIN_NAME, content=content.SerializeToString()
        )
    )
    return Summary(value=[Summary.Value(tag=EXPERIMENT_TAG, metadata=metadata)])


def write_hparams_experiment(
    directory: str | os.PathLike[str],
    runs: Sequence[Mapping[str, HParam]],
    metrics: Sequence[str],
) -> Path:
    """Write the HParams experiment (the table's columns) of a sweep into its directory.

    TensorBoard uses one experiment per log directory and, when several runs carry one,
    the first it happens to find; so the sweep directory holds the only one, built from
    every point's hyperparameters (the keys the sweep varies are marked as differing,
    which puts them first in the table), and the points write just their own rows
    (``RunLogger.log_hparams(..., experiment=False)``, chosen by :func:`train` when
    :func:`has_hparams_experiment` finds this file in the run's parent directory).
    A previous sweep experiment in ``directory`` is replaced.

    Args:
        directory: the sweep directory (created if missing).
        runs: each point's flat hyperparameters (e.g. :func:`flatten_config`).
        metrics: the metric column tags in order (test NLL first).

    Returns:
        The event file written (its name ends with :data:`HPARAMS_EXPERIMENT_SUFFIX`).
    """
    from torch.utils.tensorboard.writer import FileWriter

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    summary = _experiment_summary(runs, metrics)  # checks the values before deleting
    for old in directory.glob(f"events.out.tfevents.*{HPARAMS_EXPERIMENT_SUFFIX}"):
        old.unlink()
    writer = FileWriter(str(directory), filename_suffix=HPARAMS_EXPERIMENT_SUFFIX)
    try:
        writer.add_summary(summary, 0)
    finally:
        writer.close()
    (path,) = directory.glob(f"events.out.tfevents.*{HPARAMS_EXPERIMENT_SUFFIX}")
    return path


def has_hparams_experiment(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds a sweep's experiment (:func:`write_hparams_experiment`)."""
    return any(Path(directory).glob(f"events.out.tfevents.*{HPARAMS_EXPERIMENT_SUFFIX}"))


def flatten_config(d: Mapping[str, Any], prefix: str = "") -> dict[str, HParam]:
    """Flatten a nested config dict into dotted keys with TensorBoard-friendly values.

    ``{"model": {"posterior": {"flow": "iaf"}}}`` becomes ``{"model.posterior.flow":
    "iaf"}``. ``None`` becomes ``"none"``, lists and tuples their ``str()``, an empty
    dict ``"{}"`` (so the key still appears); ints, floats, strings and bools are kept.

    Args:
        d: a plain nested dict (e.g. ``vaeflow.config.to_dict(cfg)``).
        prefix: prepended to every key (with a dot).

    Returns:
        A flat ``{dotted.key: int | float | str | bool}``.

    Raises:
        TypeError: a value of another type (its dotted key is named); convert it first.
    """
    flat: dict[str, HParam] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            if value:
                flat.update(flatten_config(value, name))
            else:
                flat[name] = "{}"
        elif value is None:
            flat[name] = "none"
        elif isinstance(value, list | tuple):
            flat[name] = str(list(value))
        elif type(value) in (int, float, str, bool):
            flat[name] = value
        else:
            raise TypeError(
                f"config value {name!r} is a {type(value)}; flatten_config takes plain "
                "dicts of int, float, str, bool, None and lists (use vaeflow.config.to_dict)"
            )
    return flat


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read ``run_dir/metrics.jsonl`` back, one dict per logged line.

    ``null`` values (non-finite when logged) come back as ``nan`` so metric columns stay
    numeric. A line that is not valid JSON — the partial last line of a killed run, which
    a resumed :class:`RunLogger` leaves in place and ends with a newline — is skipped with
    a ``UserWarning`` naming the line.

    Args:
        run_dir: the run directory.

    Returns:
        The records in file order, each ``{"step": int, "time": float, tag: float, ...}``.

    Raises:
        FileNotFoundError: there is no ``metrics.jsonl`` in ``run_dir``.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no {METRICS_FILE} in {run_dir}; pass a run directory written by "
            "vaeflow.run.logger.RunLogger (e.g. runs/<name>)"
        )
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            where = "the last line" if number == len(lines) else f"line {number}"
            warnings.warn(
                f"skipping {where} of {path}: not valid JSON (a partial line, e.g. "
                f"from a run killed while logging): {line[:80]!r}",
                stacklevel=2,
            )
            continue
        if not isinstance(record, dict):
            warnings.warn(f"skipping line {number} of {path}: not a JSON object", stacklevel=2)
            continue
        records.append({k: (math.nan if v is None else v) for k, v in record.items()})
    return records


class Progress:
    """A dependency-free progress line for interactive terminals.

    On a terminal it redraws ``\\r step 1234/5000 | loss 98.21 nats | 12.3 it/s`` on
    standard error at most every ``min_interval`` seconds (and always at the last step).
    When standard error is not a terminal (a batch job, a log file, pytest) it prints
    nothing: ``metrics.jsonl`` is the record, and ``\\r`` redraws would only litter a log.

    Args:
        total: the final step.
        enabled: force on or off; ``None`` means "on iff ``sys.stderr.isatty()``".
        min_interval: seconds between redraws.
    """

    def __init__(self, total: int, enabled: bool | None = None, min_interval: float = 0.1):
        self.total = int(total)
        self.enabled = sys.stderr.isatty() if enabled is None else bool(enabled)
        self.min_interval = min_interval
        self._first: tuple[int, float] | None = None
        self._last_draw = -math.inf
        self._width = 0

    def update(self, step: int, loss: float | None = None, **metrics: float) -> None:
        """Report progress at ``step``.

        Args:
            step: the current step (after the update), ``0 <= step <= total``.
            loss: the training loss in nats, shown as ``loss 98.21 nats``.
            **metrics: more values to show as ``name value`` (e.g. ``bpd=3.2``).
        """
        if not self.enabled:
            return
        now = time.perf_counter()
        if self._first is None:
            # Rate counts from the first update, so a resumed run does not count the
            # steps done before it started.
            self._first = (step, now)
        if now - self._last_draw < self.min_interval and step < self.total:
            return
        self._last_draw = now
        parts = [f" step {step}/{self.total}"]
        if loss is not None:
            parts.append(f"loss {loss:.2f} nats")
        parts.extend(f"{name} {value:.4g}" for name, value in metrics.items())
        first_step, first_time = self._first
        elapsed = now - first_time
        if step > first_step and elapsed > 0:
            parts.append(f"{(step - first_step) / elapsed:.1f} it/s")
        line = " | ".join(parts)
        # Pad with spaces so a shorter line fully overwrites the previous one.
        sys.stderr.write("\r" + line.ljust(self._width))
        sys.stderr.flush()
        self._width = len(line)

    def close(self) -> None:
        """End the line so later output starts on a fresh one."""
        if self.enabled and self._width:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._width = 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
