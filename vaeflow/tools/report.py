"""Run directories -> results tables (markdown + JSON) and figures.

    records = collect([Path("runs")])          # one record per run directory
    groups = group(records)                    # seeds averaged, protocol checked
    print(to_markdown(groups))
    write_report([Path("runs")], Path("results/mnist_flows"))

A run directory (written by :mod:`vaeflow.run.train` and :mod:`vaeflow.run.evaluate`) holds
``config.json``, ``environment.json``, ``metrics.jsonl`` and, once evaluated,
``summary.json``.

Runs without ``summary.json`` are **kept** with ``status = "not evaluated"`` (and a
``UserWarning`` naming them): they have no test metrics, so :func:`group` leaves them
out of every table, but :func:`write_report` lists them under the table and still draws
their learning curves. Numbers measured under different protocols (dataset,
binarisation, importance samples ``k``, number of test examples) are never averaged:
:func:`group` raises ``ValueError`` naming the key instead.

Figures are for a reader who sees only ``results/``: one line per group of seeds (mean
and a min-max band), legends that name what varies in a reader's words
(``"posterior: IAF · prior: RealNVP"``, :class:`Labeller`, overridable per experiment
with a label map), the keys that do not vary once in the title, no two series styled
alike (:func:`series_styles`), legends outside the axes, axis labels with units and the
direction of better, and a paper's reported NLLs as dashed reference lines. The learning
curves are stored in ``results.json``, so :func:`render_figures_from_json` redraws the
figures without the run directories.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
import statistics
import warnings
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..atomic import remove_stale_temps, write_text_atomic
from ..run.logger import flatten_config, read_metrics

__all__ = [
    "EXCLUDED_KEYS",
    "IMPLEMENTATION_KEYS",
    "PROTOCOL_KEYS",
    "READER_NAMES",
    "READER_VALUES",
    "TITLE_KEYS",
    "LabelPlan",
    "Labeller",
    "add_report_parser",
    "collect",
    "group",
    "heatmap_figure",
    "learning_curves_figure",
    "markdown_from_json",
    "load_labels",
    "make_figures",
    "metric_label",
    "metric_vs_key_figure",
    "render_figures_from_json",
    "resolve_metrics",
    "series_styles",
    "to_markdown",
    "write_report",
]

#: config keys that never define a group (seeds are averaged; names and paths are labels;
#: the evaluation's pass shape, layout and compilation change the speed, not the estimate)
IMPLEMENTATION_KEYS: tuple[str, ...] = (
    "train.compile",
    "train.compile_step",
    "train.channels_last",
    "train.sync_free",
    "train.log_every",
    "train.ckpt_every",
    "train.image_every",
    "train.test_every",
    "train.test_size",
    "train.test_k",
    "data.eval_batch_size",
)
"""Settings that change how a run computes or what it logs, not the numbers (the same
update to float rounding, tested): runs that differ only in them are seeds of one row,
and the table notes the difference."""
EXCLUDED_KEYS: tuple[str, ...] = (
    "train.seed",
    "data.batch_seed",
    *IMPLEMENTATION_KEYS,
    "run.name",
    "run.root",
    "data.root",
    "eval.batch_size",
    "eval.chunk",
    "eval.compile",
    "eval.channels_last",
)
#: evaluation protocol: must agree within a group (summary fields, see :func:`collect`)
PROTOCOL_KEYS: tuple[str, ...] = ("dataset", "binarization", "k", "n_examples", "test_examples")
#: summary entries that are protocol, not metrics
_PROTOCOL_METRICS = {"test/k": "k", "test/n_examples": "n_examples"}
#: default table columns, in order (regexes over metric names)
_DEFAULT_METRICS = (
    r"test/nll_iw\d+_nats",
    r"test/bpd",
    r"test/elbo_nats",
    r"test/kl_nats",
    r"test/recon_nats",
    r"test/active_units",
    # a hierarchy's layers, bottom first (absent for one-layer models)
    r"test/kl_layer\d+_nats",
    r"test/active_units_layer\d+",
)
_UNITS = {"nats": "nats", "bpd": "bpd", "bits": "bits", "s": "s", "seconds": "s"}
_NAMES = {"nll": "NLL", "elbo": "ELBO", "kl": "KL", "recon": "recon"}
EXPECTED_FILES = "config.json (and summary.json after `vaeflow eval`)"


# ----------------------------------------------------------------------------- collect


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _run_dirs(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Expand ``paths`` into run directories (a path without config.json: its children)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if (path / "config.json").is_file():
            candidates = [path]
        elif path.is_dir():
            # Hidden folders are not runs (e.g. the staging folder of an interrupted
            # `vaeflow carry unpack`).
            candidates = sorted(
                p
                for p in path.iterdir()
                if not p.name.startswith(".") and (p / "config.json").is_file()
            )
        else:
            candidates = []
        if not candidates:
            raise FileNotFoundError(
                f"{path} is neither a run directory nor a directory of run directories "
                f"(expected {EXPECTED_FILES} in it or in its subdirectories)"
            )
        for c in candidates:
            if all(c.resolve() != f.resolve() for f in found):
                found.append(c)
    return found


#: Keys whose behaviour before they existed is not their default: a run whose config.json
#: lacks them gets the value its vaeflow version acted on (see :func:`_behaviour_before`),
#: or "unknown" where that cannot be told from its config.
_NO_DEFAULT_BEFORE = {"train.free_bits_group_size"}

#: Factorised priors of the vaeflow versions before ``train.free_bits_group_size``.
_FACTORISED_PRIORS = ("standard_normal", "learned_gaussian")


def _behaviour_before(key: str, run_config: Mapping[str, Any]) -> Any:
    """What a run from before ``key`` existed did, from its flattened config.

    ``train.free_bits_group_size`` (added at commit ``3faea3d``): free bits then floored each
    dimension's KL (1) for a diagonal Gaussian posterior with a factorised prior, and the
    whole latent's (``model.latent_dim``, one group) for any flow posterior or other prior;
    without free bits the key does not matter (the default). Hierarchies came later, so a
    config naming upper layers or a top-down model is "unknown". (For about 40 minutes of
    the project's history, f9c661a..ebc5106, the one group's floor was ``free_bits``
    rather than ``free_bits * D``; no committed result was trained then, and the group size
    cannot say it.)
    """
    if run_config.get("train.free_bits", 0) == 0:
        return 1
    if run_config.get("model.upper_layers") or any(
        k.startswith("model.topdown") and v is not None for k, v in run_config.items()
    ):
        return "unknown"
    flow = run_config.get("model.posterior.flow")
    prior = run_config.get("model.prior.name", "standard_normal")
    if flow in (None, "", "none") and prior in _FACTORISED_PRIORS:
        return 1
    latent = run_config.get("model.latent_dim")
    return latent if isinstance(latent, int) else "unknown"


def _defaults_for(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The current default of every config key the run's (flattened) config lacks (for a
    key of :data:`_NO_DEFAULT_BEFORE`, what the run's version did instead)."""
    from ..config import Config, to_dict

    out = {}
    for key, value in flatten_config(to_dict(Config())).items():
        if key in run_config or any(k.startswith(key + ".") for k in run_config):
            continue  # present, or a table the run gave entries of
        out[key] = _behaviour_before(key, run_config) if key in _NO_DEFAULT_BEFORE else value
    return out


def _with_nested_defaults(value: Any, default: Mapping[str, Any]) -> Any:
    """``value`` (a table) with every key of ``default`` it lacks filled in, recursively,
    in ``default``'s key order (tables are compared as text, so the order must not depend
    on when a key was added); keys ``default`` lacks follow in their own order."""
    if not isinstance(value, Mapping):
        return value
    out: dict[str, Any] = {}
    for key, dv in default.items():
        v = value.get(key, dv)
        out[key] = _with_nested_defaults(v, dv) if isinstance(dv, Mapping) else v
    out.update({k: v for k, v in value.items() if k not in default})
    return out


def _list_tables_with_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """A run's nested ``config.json`` with the entries of list-of-table keys
    (``model.upper_layers``) completed by the keys vaeflow added after the run, as
    :func:`_defaults_for` does for flat keys: a layer written before
    ``posterior.scale`` existed is the same layer as one written after. (Lists are
    flattened to their text, so this must happen before :func:`flatten_config`.)"""
    from ..config import StochasticLayerConfig, to_dict

    model = raw.get("model")
    layers = model.get("upper_layers") if isinstance(model, Mapping) else None
    if not isinstance(layers, list):
        return raw
    default = to_dict(StochasticLayerConfig(latent_dim=1))
    filled = [_with_nested_defaults(x, default) for x in layers]
    return {**raw, "model": {**model, "upper_layers": filled}}


def _load_record(run_dir: Path) -> dict[str, Any]:
    # config.json holds every key that existed when the run started; a key added to
    # vaeflow later is missing there, and a run without it behaved as the key's default
    # (new options start switched off). Filling it in keeps a sweep whose points ran on
    # two versions from looking as if it varied every new key.
    config = flatten_config(_list_tables_with_defaults(_read_json(run_dir / "config.json")))
    config = {**_defaults_for(config), **config}
    env_path = run_dir / "environment.json"
    env = _read_json(env_path) if env_path.is_file() else {}
    summary_path = run_dir / "summary.json"
    summary: dict[str, Any] = _read_json(summary_path) if summary_path.is_file() else {}
    metrics = {
        key: float(value)
        for key, value in summary.items()
        if "/" in key and _is_number(value) and key not in _PROTOCOL_METRICS
    }
    protocol = {
        "dataset": summary.get("dataset", config.get("data.dataset")),
        "binarization": summary.get("binarization"),
        "test_examples": summary.get("test_examples"),
        **{name: summary.get(key) for key, name in _PROTOCOL_METRICS.items()},
    }
    try:
        rows = read_metrics(run_dir)
    except FileNotFoundError:
        rows = []
    # The validation ELBO; the training ELBO for a run without a validation split
    # (data.val_size = 0), recorded under its own name so the two are never mixed: its
    # mean over each logging interval where the run logged it (train/mean_elbo_nats, since
    # vaeflow accumulates it), else the logged steps' single minibatches.
    curve_tag, curve = "val/elbo_nats", _points(rows, "val/elbo_nats")
    extra = {}  # the single-minibatch curve too, for a figure with runs from before
    if not curve:
        curve_tag, curve = "train/elbo_nats", _points(rows, "train/elbo_nats")
        means = _points(rows, "train/mean_elbo_nats")
        # The means only where they cover the whole run (one resumed across the version
        # that added them has them from the resume on: its single minibatches, then).
        if means and [s for s, _ in means] == [s for s, _ in curve]:
            extra = {curve_tag: [v for _, v in curve]}
            curve_tag, curve = "train/mean_elbo_nats", means
    test_curve = _test_curve(rows)
    # Is the run still improving? Each curve's gain over the last doubling of steps.
    split = "val" if curve_tag == "val/elbo_nats" else "train"
    gains = {f"curve/{split}_elbo_gain_last_doubling_nats": gain_last_doubling(curve)}
    if test_curve:
        tag = next(t for t in test_curve if t != "step")
        points = list(zip(test_curve["step"], test_curve[tag], strict=True))
        gains["test_curve/iwae_gain_last_doubling_nats"] = gain_last_doubling(points)
    metrics.update({name: g for name, g in gains.items() if g is not None})
    notes: list[str] = []
    for note in [*summary.get("notes", []), *env.get("notes", [])]:
        if note not in notes:
            notes.append(str(note))
    return {
        "run_dir": str(run_dir),
        # Resolved: a run directory given as "." or "run" still has its own name and
        # its sweep folder's (how a stored record of the same run is recognised).
        "name": run_dir.resolve().name,
        "sweep": run_dir.resolve().parent.name,
        "status": "evaluated" if summary_path.is_file() else "not evaluated",
        "commit": env.get("commit") or "unknown",
        "seed": config.get("train.seed"),
        "checkpoint_step": summary.get("checkpoint_step"),
        "config": config,
        "protocol": protocol,
        "metrics": metrics,
        "notes": notes,
        "train_examples": (env.get("splits") or {}).get("train"),
        "learning_curve": {
            "step": [step for step, _ in curve],
            curve_tag: [value for _, value in curve],
            **extra,
        },
        **({"test_curve": test_curve} if test_curve else {}),
    }


def _points(rows: Sequence[Mapping[str, Any]], tag: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every finite ``tag`` in a run's metrics rows."""
    return [
        (row["step"], row[tag])
        for row in rows
        if _is_number(row.get(tag)) and math.isfinite(row[tag])
    ]


def gain_last_doubling(points: Sequence[tuple[int, float]], window: float = 0.1) -> float | None:
    """How much a learning curve of a bound (higher is better) still rose over the last
    doubling of training: its level at the end minus its level at half the last step.
    On a log-step axis the last doubling is the last equal-width stretch, so a curve that
    has flattened out gives about 0 and one still climbing a positive number of nats.

    A level is the mean of the logged points in a window of ``window`` times its end
    step -- ``[(1 - window) T, T]`` and ``[(1 - window) T / 2, T / 2]``, equal widths on a
    log axis -- so that a noisy curve (a training bound logged from single minibatches)
    is read by its average, not by one batch; a window without points takes the curve
    linearly interpolated at its middle. ``None`` without a point at or before ``T / 2``.

    Args:
        points: ``(step, value)`` pairs; a step logged twice (a resumed run) keeps the
            last value.
        window: the windows' width as a fraction of their end step.
    """
    by_step = dict(points)
    steps = sorted(by_step)
    last = steps[-1] if steps else 0
    if len(steps) < 2 or steps[0] > last / 2:
        return None

    def at(step: float) -> float:  # linear interpolation (step within the curve's range)
        j = next(i for i, s in enumerate(steps) if s >= step)
        if steps[j] == step or j == 0:
            return by_step[steps[j]]
        s0, s1 = steps[j - 1], steps[j]
        w = (step - s0) / (s1 - s0)
        return (1 - w) * by_step[s0] + w * by_step[s1]

    def level(end: float) -> float:
        start = (1 - window) * end
        inside = [by_step[s] for s in steps if start <= s <= end]
        return sum(inside) / len(inside) if inside else at((start + end) / 2)

    return level(last) - level(last / 2)


def _test_curve(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    """The test-set IWAE-k learning curve of ``train.test_every`` (``test_curve/iwae_k<K>
    _nats``) as ``{"step": [...], tag: [...]}``, or ``{}`` when the run logged none; of a
    run resumed with another ``train.test_k``, the k with the most points."""
    tags: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for tag, value in row.items():
            if tag.startswith("test_curve/iwae_k") and _is_number(value) and math.isfinite(value):
                tags.setdefault(tag, []).append((row["step"], value))
    if not tags:
        return {}
    tag = max(tags, key=lambda t: len(tags[t]))
    return {"step": [s for s, _ in tags[tag]], tag: [v for _, v in tags[tag]]}


#: What a stored record (an earlier report's ``results.json``) must hold to be reported again.
_STORED_RECORD_KEYS = (
    "run_dir", "name", "status", "seed", "commit", "config", "protocol", "metrics", "notes",
)  # fmt: skip


def _run_identity(record: Mapping[str, Any]) -> tuple[str, str]:
    """A run's sweep folder and name: how a fresh run directory is matched with a
    stored record of the same run written on another machine (absolute paths differ
    between machines; the sweep folder and run name do not). Records from before the
    ``sweep`` field take it from their (absolute) ``run_dir``."""
    sweep = record.get("sweep") or Path(record["run_dir"]).parent.name
    return str(sweep), str(record["name"])


def load_stored_records(results_json: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The evaluated run records of an earlier report, to report them again without
    their run directories (which live outside the repository and do not outlive the
    machine that trained them).

    Each record is returned as :func:`collect` would have read it then, with the config
    keys vaeflow added since filled in with their defaults (as for an old run directory)
    and ``"stored_in"`` naming the file. Records stored as not evaluated are dropped with
    a ``UserWarning``: they only held a learning curve so far, and finishing them needs
    the run directory itself.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a report's results.json (no ``records`` list, or a
            record without the keys a report needs) — the file and the key are named.
    """
    path = Path(results_json)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such results.json (an earlier `vaeflow report`'s)")
    try:
        data = _read_json(path)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} is not valid JSON ({e}); expected a report's results.json"
        ) from None
    records = data.get("records") if isinstance(data, Mapping) else None
    if not isinstance(records, list):
        raise ValueError(
            f"{path} has no 'records' list: not a results.json written by `vaeflow report`"
        )
    out = []
    for i, raw in enumerate(records):
        missing = [k for k in _STORED_RECORD_KEYS if not isinstance(raw, Mapping) or k not in raw]
        if missing:
            raise ValueError(
                f"{path}: record {i} lacks {missing}; was it written by `vaeflow report`?"
            )
        bad = [
            k
            for k in ("config", "protocol", "metrics")
            if not isinstance(raw[k], Mapping)
            or (k == "metrics" and not all(v is None or _is_number(v) for v in raw[k].values()))
        ]
        if bad or not isinstance(raw["notes"], list):
            raise ValueError(
                f"{path}: record {i} ({raw['run_dir']}) has malformed {bad or ['notes']} "
                "(config, protocol: tables; metrics: numbers or null; notes: a list)"
            )
        if raw["status"] != "evaluated":
            warnings.warn(
                f"{path}: stored record {raw['run_dir']} is not evaluated; left out (only its "
                "run directory can be finished and reported)",
                stacklevel=2,
            )
            continue
        record = dict(raw)
        config = dict(raw["config"])
        record["config"] = {**_defaults_for(config), **config}
        # results.json writes a non-finite metric as null.
        record["metrics"] = {
            k: (math.nan if v is None else float(v)) for k, v in raw["metrics"].items()
        }
        record["stored_in"] = str(path)
        out.append(record)
    return out


def collect(
    run_dirs: Sequence[str | os.PathLike[str]],
    stored: Sequence[str | os.PathLike[str]] = (),
) -> list[dict[str, Any]]:
    """Read run directories into one flat record each.

    Args:
        run_dirs: run directories, or directories whose children are run directories
            (one level of recursion when a path has no ``config.json`` itself).

    Returns:
        Records ``{"run_dir", "name", "sweep" (the run directory's parent folder),
        "status", "commit", "seed", "checkpoint_step",
        "config": {dotted.key: value}, "protocol": {dataset, binarization, k,
        n_examples}, "metrics": {"test/...": float}, "notes": [...], "train_examples":
        int | None (environment.json's training-split size), "learning_curve": {"step":
        [...], "val/elbo_nats": [...]} (finite validation ELBOs from metrics.jsonl, or
        ``"train/elbo_nats"`` for a run without a validation split)}``, and for a run
        trained with ``train.test_every`` ``"test_curve": {"step": [...],
        "test_curve/iwae_k<K>_nats": [...]}``. A
        run without
        ``summary.json`` has ``status == "not evaluated"`` and empty metrics, and a
        ``UserWarning`` names it.

        stored: earlier reports' ``results.json`` files whose evaluated records are
            reported again (:func:`load_stored_records`). An *evaluated* run directory
            given in ``run_dirs`` supersedes a stored record of the same run (same sweep
            folder and run name), with a ``UserWarning``; a run directory of that run not
            evaluated yet is left out instead and the stored record kept (warned too).
            The same run stored in two different files is an error.

    Raises:
        FileNotFoundError: a path holds no run directory, or a stored file is missing.
        ValueError: a stored file is not a report's results.json, or two stored files
            hold the same run.
    """
    records = []
    for run_dir in _run_dirs(run_dirs) if run_dirs else []:
        record = _load_record(run_dir)
        if record["status"] != "evaluated":
            warnings.warn(
                f"{run_dir} has no summary.json (run `vaeflow eval {run_dir}`): listed as "
                "'not evaluated' and left out of the tables",
                stacklevel=2,
            )
        records.append(record)
    fresh = {_run_identity(r): r for r in records}
    seen: dict[tuple[str, str], str] = {}
    for source in stored:
        for record in load_stored_records(source):
            ident = _run_identity(record)
            if seen.setdefault(ident, str(source)) != str(source):
                raise ValueError(
                    f"run {'/'.join(ident)} is stored in both {seen[ident]} and {source}; "
                    "give only one of those files"
                )
            newer = fresh.get(ident)
            if newer is not None and newer["status"] == "evaluated":
                warnings.warn(
                    f"run {'/'.join(ident)}: the run directory given supersedes the record "
                    f"stored in {source}",
                    stacklevel=2,
                )
                continue
            if newer is not None and newer in records:
                records.remove(newer)
                warnings.warn(
                    f"run {'/'.join(ident)}: the run directory given ({newer['run_dir']}) is "
                    f"not evaluated yet; the evaluated record stored in {source} is reported "
                    "instead",
                    stacklevel=2,
                )
            records.append(record)
    _align_unused_flow_steps(records)
    return records


def _align_unused_flow_steps(records: list[dict[str, Any]]) -> None:
    """Give the runs whose posterior has no flow a ``model.posterior.num_layers`` that
    says so, in place: the key is a leftover default there (4, or 1 where a sweep set
    it) that the model never reads. When the flow runs all have one length, the no-flow
    runs take it too (the key does not vary, and the title states it "for flow
    posteriors"); when the flow runs vary it, the no-flow runs get 0, where a
    flow-length axis starts, instead of a made-up length beside the real ones."""
    key, flow = "model.posterior.num_layers", "model.posterior.flow"
    no_flow = [
        r for r in records if r["config"].get(flow) in (None, "none") and key in r["config"]
    ]
    skip = {id(r) for r in no_flow}
    lengths = {r["config"][key] for r in records if id(r) not in skip and key in r["config"]}
    value = next(iter(lengths)) if len(lengths) == 1 else 0
    for r in no_flow:
        r["config"][key] = value


# ----------------------------------------------------------------------------- group


def _varying_keys(records: Sequence[Mapping[str, Any]]) -> list[str]:
    keys = sorted({k for r in records for k in r["config"]} - set(EXCLUDED_KEYS))
    return [k for k in keys if len({repr(r["config"].get(k)) for r in records}) > 1]


def _free_bits_rule(config: Mapping[str, Any]) -> tuple[str, str]:
    """``(free_bits, group size)`` of a run as text; the size only matters with free bits,
    and a group of the whole latent is one rule whatever the latent's size."""
    fb = config.get("train.free_bits", 0)
    size = config.get("train.free_bits_group_size") if fb else None
    upper = config.get("model.upper_layers") or []
    latent = config.get("model.latent_dim")
    if isinstance(latent, int) and isinstance(upper, list):
        latent += sum(u.get("latent_dim", 0) for u in upper if isinstance(u, Mapping))
    if size is not None and size == latent:
        return _fmt_value(fb), "the whole latent"
    return _fmt_value(fb), _fmt_value(size)


def _check_one_free_bits_rule(records: Sequence[Mapping[str, Any]], by: Sequence[str]) -> None:
    """Refuse a table whose rows trained on different free-bits rules unless ``--by`` names
    the keys that differ: otherwise a change of objective (Kingma et al.'s per-dimension
    floors against one floor for the whole latent, say) would pass for the effect of the
    row's setting (issue: "a mixed table cannot be built")."""
    rules = {_free_bits_rule(r["config"]) for r in records}
    if len(rules) < 2:
        return
    sizes = {size for _, size in rules if size != _fmt_value(None)}  # among runs with free bits
    differing = [
        key
        for key, values in (
            ("train.free_bits", {fb for fb, _ in rules}),
            ("train.free_bits_group_size", sizes),
        )
        if len(values) > 1 and key not in by
    ]
    if differing:
        runs = "; ".join(
            f"{r['name']}: free_bits={a}, group size={b}"
            for r in records
            for a, b in [_free_bits_rule(r["config"])]
        )
        raise ValueError(
            f"the runs trained on different free-bits rules ({runs}): their rows would mix "
            "a change of objective with the setting a row stands for. Report them apart, or "
            f"name {differing} in --by to tabulate the rule as a setting of its own (a run "
            "from before train.free_bits_group_size existed shows the rule its version used)"
        )


def _sort_key(value: Any) -> tuple[int, float, str]:
    return (0, float(value), "") if _is_number(value) else (1, 0.0, str(value))


def group(
    records: Sequence[Mapping[str, Any]], by: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Average evaluated runs over seeds.

    Args:
        records: from :func:`collect`; runs that are not evaluated are ignored.
        by: config keys defining a group. Default: every config key that varies across
            the evaluated runs except :data:`EXCLUDED_KEYS` (so runs differing only in
            ``train.seed`` fall together).

    Returns:
        One dict per group, sorted by its key values: ``{"config": {key: value},
        "by": [...], "runs": [run_dir, ...], "seeds": [...], "n_seeds": int,
        "protocol": {...}, "metrics": {name: {"mean", "std", "n"}}, "notes": [...],
        "commits": [...]}``. ``std`` is the sample standard deviation (n-1), ``None``
        for one value; non-finite values are left out of mean/std (``n`` counts the
        finite ones; a metric with none has mean ``nan``).

    Raises:
        ValueError: a ``by`` key no run has, or a protocol key (dataset, binarization,
            k, n_examples) that differs within a group — it is named.
    """
    evaluated = [r for r in records if r["status"] == "evaluated"]
    if by is None:
        keys = _varying_keys(evaluated)
    else:
        keys = list(by)
        unknown = [k for k in keys if not any(k in r["config"] for r in evaluated)]
        if unknown:
            raise ValueError(f"--by key(s) {unknown} are in no evaluated run's config")
    _check_one_free_bits_rule(evaluated, keys)
    buckets: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
    for r in evaluated:
        buckets.setdefault(tuple(repr(r["config"].get(k)) for k in keys), []).append(r)
    implementation = [
        f"{k} differs between runs ({', '.join(sorted(values))}): implementation only, "
        "the same maths to float rounding, so not a column"
        for k in IMPLEMENTATION_KEYS
        if k not in keys and len(values := {_fmt_value(r["config"].get(k)) for r in evaluated}) > 1
    ]
    groups = []
    for members in buckets.values():
        config = {k: members[0]["config"].get(k) for k in keys}
        # A group's runs are seeds of one setting: runs that differ in anything else
        # (keys a --by left out) must not be averaged as if they were.
        other = [k for k in _varying_keys(members) if k not in keys]
        if other:
            names = ", ".join(m["name"] for m in members)
            raise ValueError(
                f"runs {names} fall in one group {config} but differ in {other} besides the "
                "seed: add those keys to --by, or report the runs apart"
            )
        protocol: dict[str, Any] = {}
        for pk in PROTOCOL_KEYS:
            values = {repr(m["protocol"].get(pk)) for m in members}
            if len(values) > 1:
                runs = ", ".join(f"{m['name']}={m['protocol'].get(pk)!r}" for m in members)
                raise ValueError(
                    f"protocol key {pk!r} differs within group {config}: {runs}; "
                    "re-evaluate the runs alike or group them apart (--by)"
                )
            protocol[pk] = members[0]["protocol"].get(pk)
        names = sorted({n for m in members for n in m["metrics"]})
        metrics = {}
        for name in names:
            vals = [m["metrics"][name] for m in members if name in m["metrics"]]
            finite = [v for v in vals if math.isfinite(v)]
            metrics[name] = {
                "mean": statistics.fmean(finite) if finite else math.nan,
                "std": statistics.stdev(finite) if len(finite) > 1 else None,
                "n": len(finite),
            }
        notes: list[str] = []
        for m in members:
            notes.extend(n for n in m["notes"] if n not in notes)
        notes += implementation
        groups.append(
            {
                "config": config,
                "by": keys,
                "runs": [m["run_dir"] for m in members],
                "seeds": [m["seed"] for m in members],
                "n_seeds": len(members),
                "protocol": protocol,
                "metrics": metrics,
                "notes": notes,
                "commits": sorted({m["commit"] for m in members}),
            }
        )
    groups.sort(key=lambda g: [_sort_key(g["config"][k]) for k in keys])
    return groups


# ----------------------------------------------------------------------------- markdown


def metric_label(name: str) -> str:
    """Column header with units: ``test/nll_iw5000_nats`` -> ``test NLL (nats, k=5000)``."""
    split, _, rest = name.partition("/")
    if not rest:
        split, rest = "", split
    gain = re.fullmatch(r"(\w+?)_gain_last_doubling_nats", rest)
    if gain:  # gain_last_doubling's columns: how much a curve still rose at the end
        what = {
            "iwae": "test bound",
            "val_elbo": "validation ELBO",
            "train_elbo": "training ELBO",
        }.get(gain.group(1), gain.group(1).replace("_", " "))
        return f"{what} gain over the last doubling of steps (nats)"
    if rest == "bpd":
        return f"{split} bpd".strip()
    if rest == "active_units":
        return f"{split} active units".strip()
    layer = re.fullmatch(r"(kl|active_units)_layer(\d+)(?:_(\w+))?", rest)
    if layer:
        what = "KL" if layer.group(1) == "kl" else "active units"
        unit = f" ({_UNITS.get(layer.group(3), layer.group(3))})" if layer.group(3) else ""
        return f"{split} {what} z{layer.group(2)}{unit}".strip()
    m = re.fullmatch(r"nll_iw(\d+)(_stderr)?_(\w+)", rest)
    if m:
        stderr = " stderr" if m.group(2) else ""
        return f"{split} NLL{stderr} ({_UNITS.get(m.group(3), m.group(3))}, k={m.group(1)})"
    stem, _, unit = rest.rpartition("_")
    if stem and unit in _UNITS:
        words = [_NAMES.get(w, w) for w in stem.split("_")]
        return f"{split} {' '.join(words)} ({_UNITS[unit]})".strip()
    return f"{split} {rest.replace('_', ' ')}".strip()


def _default_metrics(groups: Sequence[Mapping[str, Any]]) -> list[str]:
    return resolve_metrics(groups, _DEFAULT_METRICS, strict=False)


def resolve_metrics(
    groups: Sequence[Mapping[str, Any]], patterns: Sequence[str], strict: bool = True
) -> list[str]:
    """Metric names present in ``groups`` matching ``patterns`` (regexes, full match), in
    the order of the patterns (e.g. ``["test/elbo_nats", r"test/nll_iw\\d+_nats"]``).

    Raises:
        ValueError: with ``strict``, a pattern that matches no metric of any group (the
            message lists the metrics present), so a typo does not drop a column silently.
    """
    present = sorted({n for g in groups for n in g["metrics"]})
    chosen: list[str] = []
    for pattern in patterns:
        hits = [n for n in present if re.fullmatch(pattern, n)]
        if strict and groups and not hits:
            raise ValueError(
                f"metric pattern {pattern!r} matches none of the metrics present: "
                + ", ".join(present)
            )
        chosen.extend(n for n in hits if n not in chosen)
    return chosen


def _cell(stats: Mapping[str, Any] | None, name: str) -> str:
    if stats is None or stats["n"] == 0:
        return "—"
    digits = 3 if name.endswith("bpd") else 2
    mean, std, n = stats["mean"], stats["std"], stats["n"]
    if std is None:
        return f"{mean:.{digits}f} ({n})"
    return f"{mean:.{digits}f} ± {std:.{digits}f} ({n})"


def _fmt_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _table_value(labeller: Labeller, key: str, config: Mapping[str, Any]) -> str:
    """A grouping cell: the reader's name of the value, or "—" for a setting that means
    nothing in this row (:func:`_applies`: flow steps of a row without a posterior flow,
    when the flow is one of the table's columns)."""
    return labeller.value(key, config[key]) if _applies(key, config) else "—"


def _paired_cells(paired: Mapping[str, Any] | None) -> list[str]:
    """The two paired-difference cells of a row (:func:`add_paired_differences`)."""
    if (
        not paired
        or "error" in paired
        or paired.get("nll_diff_nats") is None
        and not paired.get("reference")
    ):
        return ["—", "—"]
    if paired.get("reference"):
        return ["reference", "reference"]

    from ..run.compare import format_gap

    return [
        format_gap(paired["nll_diff_nats"], paired["nll_diff_stderr_nats"]),
        format_gap(paired["neg_elbo_diff_nats"], paired["neg_elbo_diff_stderr_nats"]),
    ]


def to_markdown(
    groups: Sequence[Mapping[str, Any]],
    metrics: Sequence[str] | None = None,
    not_evaluated: Sequence[str] = (),
    labels: Mapping[str, Any] | Labeller | None = None,
) -> str:
    """Render groups as a markdown table with a footer of protocol, notes and commits.

    Args:
        groups: from :func:`group`.
        metrics: metric names for the columns; default: NLL, bpd, ELBO, KL, recon,
            active units, those present.
        not_evaluated: run directories to list under the table as not evaluated.
        labels: a label map or :class:`Labeller` (default: :data:`READER_NAMES` and
            :data:`READER_VALUES`), the same names as the figures'.

    Returns:
        Markdown: the grouping config keys as the first columns, headed and filled with a
        reader's names (``posterior``, ``diagonal Gaussian``; the footer's "Columns" line
        maps each name back to its config key), then one ``mean ± std (n)`` cell per
        metric (``mean (1)`` for a single seed, ``—`` when missing), then a footer.
    """
    labeller = labels if isinstance(labels, Labeller) else Labeller(labels)
    keys = list(groups[0]["by"]) if groups else []
    names = list(metrics) if metrics is not None else _default_metrics(groups)
    # Rows measured on different data or with different estimators must not sit side by
    # side unnoticed: then every row states its protocol in columns of its own.
    mixed = [pk for pk in PROTOCOL_KEYS if len({repr(g["protocol"].get(pk)) for g in groups}) > 1]
    headers = [labeller.name(k) for k in keys] or ["runs"]
    headers += mixed + ["seeds"] + [metric_label(n) for n in names]
    paired = [g.get("paired") for g in groups if g.get("paired")]
    if paired:
        headers += ["NLL − reference, paired (nats)", "−ELBO − reference, paired (nats)"]
    lines = []
    if mixed:
        lines += [
            f"**Rows differ in their evaluation protocol ({', '.join(mixed)}): compare only "
            "rows whose protocol columns agree.**",
            "",
        ]
    lines += [
        "| " + " | ".join(headers) + " |",
        "|"
        + "|".join(
            ["---"] * ((len(keys) or 1) + len(mixed))
            + ["---:"] * (1 + len(names) + 2 * bool(paired))
        )
        + "|",
    ]
    for g in groups:
        first = [_table_value(labeller, k, g["config"]) for k in keys] or ["all"]
        protocol = [_fmt_value(g["protocol"].get(pk)) for pk in mixed]
        cells = [_cell(g["metrics"].get(n), n) for n in names]
        if paired:
            cells += _paired_cells(g.get("paired"))
        lines.append("| " + " | ".join([*first, *protocol, str(g["n_seeds"]), *cells]) + " |")
    if not groups:
        lines.append("| " + " | ".join(["(no evaluated runs)"] + [""] * (len(headers) - 1)) + " |")
    if keys:
        # The reader's names are for reading; the keys are what a config sets.
        columns = ", ".join(f"{labeller.name(k)} = `{k}`" for k in keys)
        lines += ["", f"Columns: {columns}."]
    if any(m.endswith("_gain_last_doubling_nats") for m in names):
        lines += [
            "",
            "Gain over the last doubling of steps: the curve's mean over the last tenth of "
            "its steps minus its mean over the tenth before half of them (equal widths on a "
            "log-step axis; a window without points: the curve interpolated at its middle; "
            "non-finite points left out, so a run that ended in NaN is read at its last "
            "finite point); near 0: the curve has flattened out; positive: still improving "
            "when training stopped. A training-bound curve is of single minibatches: read "
            "it with its noise.",
        ]
    cells = "Cells: mean ± std over seeds (n); std uses n-1."
    if any(g["n_seeds"] > 1 for g in groups):
        # What the spread covers matters only where there is one.
        cells += (
            " A seed sets train.seed and, in vaeflow sweeps, data.batch_seed: initial "
            "weights, posterior noise, batch order and dynamic binarisation draws vary; "
            "validation and test data do not."
        )
    lines += ["", cells]
    if paired:
        done = [p for p in paired if "n" in p]
        counts = sorted({p["n"] for p in done})
        n = f" over the {counts[0]} test images every run scored" if len(counts) == 1 else ""
        # (Records of reports before these counts were kept have none.)
        scored = [
            (p["n"], c) for p in done for c in (*p.get("scored_a", ()), *p.get("scored_b", ()))
        ]
        if any(c != n_pair for n_pair, c in scored):
            n += " (the NLL and ELBO columns are over each run's own test images)"
        if len(counts) > 1:  # nested subsets: each row pairs over the images it shares
            n = (
                " over the test images each row and the reference both scored "
                f"({counts[0]} to {counts[-1]}; each row's count in results.json, "
                '"paired": "n")'
            )
        lines += [
            "",
            f"Paired columns: each row's per-image NLL and -ELBO (mean over its seeds) minus "
            f"the reference row's ({paired[0]['against']}){n}, ± the standard error of the "
            "per-image differences: test-set sampling only, not seed-to-seed variation "
            "(negative: better than the reference).",
        ]
        if any(g["n_seeds"] > 1 for g in groups if g.get("paired")):
            lines.append(
                "Rows with several seeds: the paired ± leaves out the seeds' own spread "
                "(the metric cells' std); it says how well the test images determine the "
                "gap between these trained models, not between the methods."
            )
        reasons = list(dict.fromkeys(p["error"] for p in paired if "error" in p))
        lines += [f"- not paired: {why}" for why in reasons]
    protocols = []
    for g in groups:
        # A key a summary does not have (older ones, or binarization on 8-bit data) is left
        # out rather than printed as None.
        p = ", ".join(
            f"{k}={g['protocol'][k]}" for k in PROTOCOL_KEYS if g["protocol"].get(k) is not None
        )
        if p not in protocols:
            protocols.append(p)
    if protocols:
        lines += ["", "Protocol:"] + [f"- {p}" for p in protocols]
    notes: list[str] = []
    for g in groups:
        notes.extend(n for n in g["notes"] if n not in notes)
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    commits = sorted({c for g in groups for c in g["commits"]})
    if commits:
        lines += ["", "Commits: " + ", ".join(f"`{c}`" for c in commits)]
    if not_evaluated:
        lines += ["", "Not evaluated (no summary.json):"] + [f"- {r}" for r in not_evaluated]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- files


def _json_safe(obj: Any) -> Any:
    """Non-finite floats -> None so the file is standard JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- labels

#: A reader's name for common config keys: what every figure's legend, axes and title
#: call them (``model.posterior.flow`` and ``model.prior.flow`` must not both read
#: "flow"). Other keys read as the key without its first section
#: (``model.posterior.options.num_hidden`` -> ``posterior.options.num_hidden``).
READER_NAMES: dict[str, str] = {
    "data.dataset": "data",
    "data.binarization": "binarisation",
    "data.batch_size": "batch size",
    "model.latent_dim": "latent dim",
    "model.likelihood": "likelihood",
    "model.encoder.name": "encoder",
    "model.decoder.name": "decoder",
    "model.posterior.flow": "posterior",
    "model.posterior.num_layers": "flow steps",
    "model.posterior.hidden": "flow width",
    "model.prior.name": "prior",
    "model.prior.flow": "prior flow",
    "model.prior.num_layers": "prior flow steps",
    "model.prior.num_components": "prior components",
    "train.objective": "objective",
    "train.k": "k",
    "train.lr": "learning rate",
    "train.optimizer": "optimiser",
    "train.steps": "training steps",
    "train.kl_warmup_steps": "KL warm-up steps",
    "train.free_bits": "free bits",
}
_FLOW_VALUES = {
    "iaf": "IAF",
    "gated_iaf": "gated IAF",
    "conv_iaf": "conv IAF",
    "maf": "MAF",
    "realnvp": "RealNVP",
    "realnvp_image": "RealNVP (image)",
    "nice": "NICE",
    "glow": "Glow",
    "ffjord": "FFJORD",
    "nsf_coupling": "NSF coupling",
    "nsf_autoregressive": "NSF autoregressive",
    "sylvester_householder": "Sylvester (Householder)",
    "sylvester_orthogonal": "Sylvester (orthogonal)",
    "sylvester_triangular": "Sylvester (triangular)",
}
#: A reader's name for common values, per key (the rest print as they are); legends and
#: heat maps list the values in this order (baselines first), the rest after them.
READER_VALUES: dict[str, dict[str, str]] = {
    "model.posterior.flow": {"none": "diagonal Gaussian", **_FLOW_VALUES},
    "model.prior.flow": dict(_FLOW_VALUES),
    "model.prior.name": {
        "standard_normal": "N(0, I)",
        "learned_gaussian": "learned Gaussian",
        "mog": "MoG",
        "vamp": "VampPrior",
    },
    "data.dataset": {
        "mnist": "MNIST",
        "fashion_mnist": "Fashion-MNIST",
        "binarized_mnist": "static MNIST",
        "cifar10": "CIFAR-10",
    },
    "train.objective": {"elbo": "ELBO", "iwae": "IWAE"},
}
#: Keys stated once in a figure's title when they are the same in every run (with the
#: keys of a user's label map); the full config is in results.json.
TITLE_KEYS: tuple[str, ...] = (
    "data.dataset",
    "model.latent_dim",
    "model.posterior.flow",
    "model.posterior.num_layers",
    "model.prior.name",
    "model.prior.flow",
    "train.objective",
    "train.k",
)
_SEP = " · "


def _fallback_name(key: str) -> str:
    """The key without its first section (``model.prior.flow`` -> ``prior.flow``)."""
    return key.split(".", 1)[1] if "." in key else key


def load_labels(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a label map from a TOML (``.toml``) or JSON file.

    The map takes config keys to a reader's name, or to ``{"name": ..., "values":
    {value: name}}``::

        "model.posterior.flow" = "posterior"
        ["model.prior.name"]
        name = "prior"
        values = { vamp = "VampPrior (500 pseudo-inputs)" }
    """
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".toml":
        import tomllib

        return tomllib.loads(text)
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{p}: a label map is a JSON object (config key -> name)")
    return data


class Labeller:
    """A reader's names for config keys and values: :data:`READER_NAMES` and
    :data:`READER_VALUES`, overridden by a per-experiment label map (see
    :func:`load_labels`)."""

    def __init__(self, labels: Mapping[str, Any] | None = None) -> None:
        self.names = dict(READER_NAMES)
        self.values = {k: dict(v) for k, v in READER_VALUES.items()}
        self.user_keys = list(labels or {})
        for key, spec in (labels or {}).items():
            if isinstance(spec, str):
                self.names[key] = spec
            elif isinstance(spec, Mapping) and set(spec) <= {"name", "values"}:
                if "name" in spec:
                    self.names[key] = str(spec["name"])
                for value, name in dict(spec.get("values", {})).items():
                    self.values.setdefault(key, {})[str(value)] = str(name)
            else:
                raise ValueError(
                    f"label map entry {key!r}: give a name or {{name = ..., values = "
                    f"{{value = name}}}}, got {spec!r}"
                )

    def name(self, key: str) -> str:
        """A reader's name of ``key``."""
        return self.names.get(key) or _fallback_name(key)

    def value(self, key: str, value: Any) -> str:
        """A reader's name of ``value`` under ``key``."""
        text = _fmt_value(value)
        return self.values.get(key, {}).get(text, text)

    def plan(self, configs: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> LabelPlan:
        """The legend entries for series that differ in ``keys`` (see :class:`LabelPlan`)."""
        return LabelPlan(self, configs, keys)

    def title(self, configs: Sequence[Mapping[str, Any]], varying: Sequence[str]) -> str:
        """``"data: static MNIST · latent dim: 40 · prior: VampPrior"``: the title keys
        (:data:`TITLE_KEYS` and the label map's) that are the same in every config and
        not in ``varying``; values reading "none" are left out."""
        parts = []
        for key in dict.fromkeys([*TITLE_KEYS, *self.user_keys]):
            if key in varying or not configs or any(key not in c for c in configs):
                continue
            if key == "model.posterior.num_layers" and not any(_applies(key, c) for c in configs):
                continue  # no posterior flow: its number of steps says nothing
            if key in _NOT_TOPDOWN and key not in self.user_keys and all(map(_topdown, configs)):
                continue  # a top-down model has neither: per-group latents and priors
            if len({repr(c[key]) for c in configs}) == 1:
                text = self.value(key, configs[0][key])
                if key == "model.latent_dim" and key not in self.user_keys:
                    uppers = {_upper_latent_dims(c) for c in configs}
                    if len(uppers) == 1 and (dims := uppers.pop()):
                        # a hierarchy: z1 is model.latent_dim, the upper layers add theirs
                        zs = " + ".join(f"z{i + 1}" for i in range(len(dims) + 1))
                        sizes = " + ".join(str(d) for d in (configs[0][key], *dims))
                        parts.append(f"latent dims ({zs}): {sizes}")
                        continue
                if text != "none":
                    name = self.name(key)
                    if key == "model.posterior.num_layers" and not all(
                        _applies(key, c) for c in configs
                    ):
                        name += " (flow posteriors)"  # some rows have none: not theirs
                    parts.append(f"{name}: {text}")
        return _SEP.join(parts)


#: keys that mean something only under another key's value: key -> (that key, the values
#: under which it does not apply)
_NOT_APPLICABLE: dict[str, tuple[str, tuple[Any, ...]]] = {
    "model.posterior.num_layers": ("model.posterior.flow", ("none", None)),
    "model.posterior.hidden": ("model.posterior.flow", ("none", None)),
    "model.posterior.options": ("model.posterior.flow", ("none", None)),
}


#: model keys a top-down model (``model.topdown``) does not use (the config refuses
#: setting them): its latents and priors are per group, inside its blocks
_NOT_TOPDOWN = ("model.latent_dim", "model.prior.name", "model.prior.flow")


def _topdown(config: Mapping[str, Any]) -> bool:
    """Whether a (flattened) run config is a top-down model's."""
    # a record keeps a missing table as the text "none"
    flat = config.get("model.topdown")
    return any(k.startswith("model.topdown.") for k in config) or flat not in (None, "none", "")


def _upper_latent_dims(config: Mapping[str, Any]) -> tuple[int, ...]:
    """The latent sizes of a bottom-up hierarchy's upper layers (``model.upper_layers``,
    flattened to its text in a record), ``()`` for a one-layer model or an unreadable
    value."""
    raw = config.get("model.upper_layers")
    try:
        layers = ast.literal_eval(raw) if isinstance(raw, str) else raw
        return tuple(int(layer["latent_dim"]) for layer in layers or ())
    except (ValueError, SyntaxError, TypeError, KeyError):
        return ()


def _applies(key: str, config: Mapping[str, Any]) -> bool:
    """Whether ``key`` means anything for ``config`` (see :data:`_NOT_APPLICABLE`; a
    flattened option such as ``model.posterior.options.num_hidden`` falls under its
    parent's rule). Only a config that sets the deciding key can say no: a table row
    holds just its grouping keys."""
    rule = next(
        (r for k, r in _NOT_APPLICABLE.items() if key == k or key.startswith(k + ".")), None
    )
    return rule is None or rule[0] not in config or config[rule[0]] not in rule[1]


class LabelPlan:
    """Legend entries for a set of series that differ in ``keys``.

    Each entry is one thing a reader tells the series apart by, with a unique name: a
    config key, or the prior's ``name`` and ``flow`` merged into one "prior" entry (the
    flow's name when the prior is a flow) when that loses nothing for these configs.
    ``label(config)`` joins them: ``"posterior: IAF · prior: RealNVP"``, leaving out
    entries a config does not set (a key it lacks, or empty options ``{}``) as long as
    the labels stay distinct.
    """

    def __init__(
        self, labeller: Labeller, configs: Sequence[Mapping[str, Any]], keys: Sequence[str]
    ) -> None:
        self.labeller = labeller
        self.configs = list(configs)
        self._compact: bool | None = None
        self.entries: list[tuple[str, tuple[str, ...]]] = []
        keys = list(keys)
        merged = "model.prior.name" in keys and "model.prior.flow" in keys
        if merged:
            seen: dict[str, str] = {}
            for c in configs:
                raw = repr((c.get("model.prior.name"), c.get("model.prior.flow")))
                if seen.setdefault(self._prior(c), raw) != raw:
                    merged = False  # two priors would read the same: keep both keys
                    break
        for key in keys:
            if merged and key == "model.prior.flow":
                continue
            if merged and key == "model.prior.name":
                self.entries.append((labeller.name(key), ("model.prior.name", "model.prior.flow")))
            else:
                self.entries.append((labeller.name(key), (key,)))
        # No two entries may share a name: fall back to the longer forms of the key.
        for rename in (_fallback_name, lambda k: k):
            names = [n for n, _ in self.entries]
            self.entries = [
                (rename(ks[0]) if names.count(n) > 1 else n, ks) for n, ks in self.entries
            ]

    def _prior(self, config: Mapping[str, Any]) -> str:
        name = config.get("model.prior.name")
        if name == "flow":
            return self.labeller.value("model.prior.flow", config.get("model.prior.flow"))
        return self.labeller.value("model.prior.name", name)

    @property
    def names(self) -> list[str]:
        """The entries' names, in order."""
        return [n for n, _ in self.entries]

    def values(self, config: Mapping[str, Any]) -> tuple[str, ...]:
        """Each entry's reader value for ``config``."""
        out = []
        for _, keys in self.entries:
            if len(keys) == 2:
                out.append(self._prior(config))
            elif _applies(keys[0], config):
                out.append(self.labeller.value(keys[0], config.get(keys[0])))
            else:  # a leftover default (the flow steps of a posterior without a flow)
                out.append("—")
        return tuple(out)

    def sort_key(self, config: Mapping[str, Any], only: int | None = None) -> list[tuple]:
        """Order of series: by entry, values in :data:`READER_VALUES` order, then numbers
        by size and other strings alphabetically (``only``: that entry alone)."""
        out: list[tuple] = []
        for i, (_, keys) in enumerate(self.entries):
            if only is not None and i != only:
                continue
            for key in keys:
                value = config.get(key)
                order = list(self.labeller.values.get(key, {}))
                text = _fmt_value(value)
                kind, number, string = _sort_key(value)
                rank = order.index(text) if text in order else len(order)
                out.append((rank, kind, number, string.casefold()))
        return out

    def is_set(self, config: Mapping[str, Any], index: int) -> bool:
        """Whether ``config`` sets entry ``index``: has the key, not as ``{}``, and the
        key applies to it (a posterior without a flow has no flow steps: its
        ``num_layers`` is a leftover default that a legend must not print)."""
        return all(
            config.get(k) not in (None, "{}") and _applies(k, config)
            for k in self.entries[index][1]
        )

    def label(self, config: Mapping[str, Any], skip: Sequence[int] = ()) -> str:
        """``"posterior: IAF · prior: RealNVP"`` (entries at the ``skip`` indices left out)."""
        if self._compact is None:
            compact = [self._join(c, (), True) for c in self.configs]
            self._compact = all(compact) and len(set(compact)) == len(compact)
        return self._join(config, skip, self._compact) or self._join(config, skip, False)

    def _join(self, config: Mapping[str, Any], skip: Sequence[int], compact: bool) -> str:
        return _SEP.join(
            f"{name}: {value}"
            for i, (name, value) in enumerate(zip(self.names, self.values(config), strict=True))
            if i not in skip and (not compact or self.is_set(config, i))
        )


# ----------------------------------------------------------------------------- styles

#: matplotlib's qualitative tab10 palette
_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
_DASHES = ("-", "--", ":", "-.")
_MARKERS = ("", "o", "s", "^", "D", "v")
#: reference lines: black, dash patterns no series uses
_REF_DASHES = ((0, (6, 2)), (0, (1, 1.5)), (0, (8, 2, 1, 2)), (0, (3, 3)))


def series_styles(values: Sequence[tuple[str, ...]]) -> list[dict[str, Any]]:
    """One matplotlib style (``color``, ``linestyle``, ``marker``) per series, no two alike.

    ``values`` are the series' legend values (:meth:`LabelPlan.values`). The colour
    follows one entry (the one with the most values, at most 10: e.g. the prior) and the
    line style (then the marker) the combination of the others (e.g. the posterior), so
    a reader sees the structure; when that does not fit (more than 10 values in every
    entry, or more than 24 combinations of the others) series cycle through 10 colours,
    then 4 line styles, then markers.
    """
    n = len(values)
    width = len(values[0]) if values else 0
    distinct = [list(dict.fromkeys(v[i] for v in values)) for i in range(width)]
    fits = [i for i in range(width) if len(distinct[i]) <= len(_COLOURS)]
    if n and len(set(values)) == n and fits:
        c = max(fits, key=lambda i: len(distinct[i]))  # the first on ties
        rest = list(dict.fromkeys(v[:c] + v[c + 1 :] for v in values))
        if len(rest) <= len(_DASHES) * len(_MARKERS):
            out = []
            for v in values:
                r = rest.index(v[:c] + v[c + 1 :])
                out.append(
                    {
                        "color": _COLOURS[distinct[c].index(v[c])],
                        "linestyle": _DASHES[r % len(_DASHES)],
                        "marker": _MARKERS[r // len(_DASHES)],
                    }
                )
            return out
    nc, nd = len(_COLOURS), len(_DASHES)
    return [
        {
            "color": _COLOURS[i % nc],
            "linestyle": _DASHES[(i // nc) % nd],
            "marker": _MARKERS[(i // (nc * nd)) % len(_MARKERS)],
        }
        for i in range(n)
    ]


# ----------------------------------------------------------------------------- figures


def _new_figure(width: float = 6.4, height: float = 4.2) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # Agg, without touching pyplot's global backend
    return fig


def _legend(fig: Any, handles: Sequence[Any], labels: Sequence[str], title: str) -> None:
    """The legend outside the axes, to the right of them."""
    if handles:
        fig.legend(
            handles,
            labels,
            loc="outside right upper",
            fontsize="small",
            title=title or None,
            title_fontsize="small",
            alignment="left",
            frameon=False,
        )


def _legend_width(labels: Sequence[str]) -> float:
    """Inches the legend needs beside the axes (about 0.065 in per character)."""
    return 0.8 + 0.065 * max((len(s) for s in labels), default=0)


def _title(ax: Any, text: str, width: float) -> None:
    """``text`` above the axes (not the figure: the legend beside them has the corner),
    wrapped to the axes' width of ``width`` inches."""
    import textwrap

    if text:
        ax.set_title(textwrap.fill(text, max(30, int(width * 13))), fontsize="medium")


def _metric_axis_label(metric: str) -> str:
    """:func:`metric_label` with the direction: ``test NLL (nats, k=5000); lower is better``."""
    label = metric_label(metric)
    rest = metric.partition("/")[2] or metric
    if rest.startswith("nll") or rest.endswith("bpd"):
        return f"{label}; lower is better"
    if rest.startswith("elbo") or rest.startswith("iwae"):
        return f"{label}; higher is better"
    return label


#: What a paper's reference number is: ``"nll"``, its estimate of -log p(x); ``"bound"``,
#: its -ELBO (an upper bound on -log p(x), as Rezende & Mohamed's and the Sylvester
#: paper's tables report). Both are drawn at minus the value on ELBO axes; only NLLs on
#: NLL axes, where a bound would be set beside a quantity it is not.
REFERENCE_KINDS = {"nll": "NLL", "bound": "-ELBO"}


def _parse_references(references: Any) -> list[tuple[str, float, str]]:
    """``{name: nll}``, or ``[(name, value)]`` / ``[(name, value, kind)]`` (kind: a key of
    :data:`REFERENCE_KINDS`, default ``"nll"``) -> ``[(name, value, kind)]``."""
    if not references:
        return []
    items = references.items() if isinstance(references, Mapping) else references
    out = []
    for item in items:
        name, value, *rest = item
        kind = str(rest[0]) if rest else "nll"
        if len(rest) > 1 or kind not in REFERENCE_KINDS:
            raise ValueError(
                f"reference {name!r}: expected (name, value) or (name, value, kind) with kind "
                f"one of {sorted(REFERENCE_KINDS)}, got {list(item)!r}"
            )
        v = float(value)
        if not math.isfinite(v) or v < 0:
            what = "negative log-likelihood" if kind == "nll" else "negative ELBO"
            raise ValueError(
                f"reference {name!r}: give the paper's {what} in nats, a positive number "
                f"(got {value!r}; for log p(x) = -85.57 give 85.57)"
            )
        out.append((str(name), v, kind))
    return out


def _references_on_axis(
    references: Sequence[tuple[str, float, str]], sign: float
) -> list[tuple[str, float, str]]:
    """The references an axis can show: every kind on an ELBO axis (``sign < 0``), NLLs
    only on an NLL axis (``sign > 0``), none on other axes (``sign == 0``)."""
    if sign < 0:
        return list(references)
    return [r for r in references if r[2] == "nll"] if sign > 0 else []


def _reference_label(name: str, value: float, kind: str, sign: float) -> str:
    """``"NAME: NLL 85.57 nats, drawn at -85.57"`` (the place said on ELBO axes)."""
    where = f", drawn at {-value:g}" if sign < 0 else ""
    return f"{name}: {REFERENCE_KINDS[kind]} {value:g} nats{where}"


def _draw_references(ax: Any, references: Sequence[tuple[str, float, str]], sign: float) -> list:
    """Horizontal reference lines at ``sign * value``; returns (handle, label) pairs."""
    out = []
    for i, (name, value, kind) in enumerate(references):
        line = ax.axhline(
            sign * value, color="black", linestyle=_REF_DASHES[i % len(_REF_DASHES)], linewidth=1.2
        )
        out.append((line, _reference_label(name, value, kind, sign)))
    return out


def _curve_tag(records: Sequence[Mapping[str, Any]], which: str = "validation") -> str:
    """The curve the figure shows: the validation ELBO when any run has one, else the
    training ELBO (runs without a validation split); ``which="test"``: the test-set
    IWAE-k curve (``train.test_every``; every run's with the same k, else ValueError)."""
    if which == "test":
        tags = sorted({t for r in records for t in r.get("test_curve") or {} if t != "step"})
        if len(tags) > 1:
            raise ValueError(
                f"the runs' test curves use different bounds ({', '.join(tags)}): one figure "
                "would mix them; report runs trained with the same train.test_k together"
            )
        return tags[0] if tags else "test_curve/iwae_nats"
    has = lambda tag: any((r.get("learning_curve") or {}).get(tag) for r in records)  # noqa: E731
    if has("val/elbo_nats") or not (has("train/elbo_nats") or has("train/mean_elbo_nats")):
        return "val/elbo_nats"
    # The interval means when every run with a curve logged them, else (runs from before
    # vaeflow accumulated them) every run's single minibatches, drawn as a moving mean.
    curves = [r.get("learning_curve") or {} for r in records]
    every = all(c.get("train/mean_elbo_nats") for c in curves if c.get("step"))
    return "train/mean_elbo_nats" if every else "train/elbo_nats"


def _curve_buckets(
    records: Sequence[Mapping[str, Any]], keys: Sequence[str], tag: str = "val/elbo_nats"
) -> list[list[Mapping[str, Any]]]:
    """Records with a ``tag`` learning curve, in groups that differ only outside ``keys``."""
    buckets: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
    for r in records:
        if _curve(r, tag)[1]:
            buckets.setdefault(tuple(repr(r["config"].get(k)) for k in keys), []).append(r)
    return sorted(
        buckets.values(), key=lambda ms: [_sort_key(ms[0]["config"].get(k)) for k in keys]
    )


def _steps_per_epoch(record: Mapping[str, Any]) -> float | None:
    batch, n = record["config"].get("data.batch_size"), record.get("train_examples")
    if _is_number(batch) and _is_number(n) and batch > 0 and n >= batch:
        return n // batch  # training drops the last partial batch of an epoch
    return None


def learning_curves_figure(
    records: Sequence[Mapping[str, Any]],
    keys: Sequence[str],
    labels: Mapping[str, Any] | Labeller | None = None,
    references: Any = None,
    log_x: bool = False,
    which: str = "validation",
) -> Any:
    """Validation ELBO during training, one line per group of seeds (``which="test"``:
    the test-set IWAE-k bound that ``train.test_every`` logs).

    Runs that differ only outside ``keys`` (in the seed) form a group: a line at the mean
    over the group's seeds on the steps they all logged, a band from their minimum to
    maximum, and after the shortest seed stopped each seed's own curve, thin. One legend
    entry per group, named by :class:`LabelPlan`, styled by :func:`series_styles`, outside
    the axes; the keys that are the same in every run go into the title. The x axis is
    in epochs when every run knows its batch size and training-set size, else in steps.
    ``references`` (a paper's NLL or -ELBO in nats, :func:`_parse_references`) are drawn
    at minus the value, where the ELBO, a lower bound on log p(x), would have to be below
    them.

    Returns:
        The matplotlib ``Figure``, or ``None`` when no run logged ``val/elbo_nats``.
    """
    labeller = labels if isinstance(labels, Labeller) else Labeller(labels)
    tag = _curve_tag(records, which)
    buckets = _curve_buckets(records, keys, tag)
    if not buckets:
        return None
    refs = _parse_references(references)
    plan = labeller.plan([ms[0]["config"] for ms in buckets], keys)
    buckets.sort(key=lambda ms: plan.sort_key(ms[0]["config"]))
    series = [plan.values(ms[0]["config"]) for ms in buckets]
    styles = series_styles(series)
    epochs = all(_steps_per_epoch(r) for ms in buckets for r in ms)
    seeds = {len(ms) for ms in buckets}
    names = [plan.label(ms[0]["config"]) or "all runs" for ms in buckets]
    if len(seeds) > 1:
        names = [
            f"{n} ({len(ms)} seed{'s' if len(ms) != 1 else ''})"
            for n, ms in zip(names, buckets, strict=True)
        ]
    legend_labels = names + [_reference_label(*r, sign=-1.0) for r in refs]
    fig = _new_figure(5.2 + _legend_width(legend_labels), 4.4)
    ax = fig.add_subplot()
    handles = []
    windows: set[int] = set()
    for members, style in zip(buckets, styles, strict=True):
        per_epoch = _steps_per_epoch(members[0]) if epochs else None
        scale = 1.0 / per_epoch if per_epoch else 1.0
        raw = [_curve(m, tag) for m in members]
        if tag == "train/elbo_nats":  # single minibatches: drawn as a moving mean
            windows.update(_smoothing_window(len(steps)) for steps, _ in raw)
            raw = [(steps, _moving_mean(v, _smoothing_window(len(steps)))) for steps, v in raw]
        curves = [dict(zip(*c, strict=True)) for c in raw]
        common = sorted(set.intersection(*(set(c) for c in curves)))
        marker = style["marker"] or ("o" if len(common) <= 1 else "")
        if common:
            xs = [s * scale for s in common]
            values = [[c[s] for c in curves] for s in common]
            (line,) = ax.plot(
                xs,
                [statistics.fmean(v) for v in values],
                color=style["color"],
                linestyle=style["linestyle"],
                marker=marker,
                markersize=4,
                linewidth=1.6,
            )
            if len(curves) > 1:
                lo, hi = [min(v) for v in values], [max(v) for v in values]
                ax.fill_between(xs, lo, hi, color=style["color"], alpha=0.15, linewidth=0)
        for i, c in enumerate(curves):  # after the shortest seed (or all, if none shared)
            tail = sorted(s for s in c if not common or s >= common[-1])
            if len(tail) > (1 if common else 0):
                (thin,) = ax.plot(
                    [s * scale for s in tail],
                    [c[s] for s in tail],
                    color=style["color"],
                    linestyle=style["linestyle"],
                    marker=style["marker"],
                    linewidth=0.8 if common else 1.6,
                    alpha=0.6 if common else 1.0,
                )
                if not common and i == 0:
                    line = thin
        handles.append(line)
    # Zoom before the reference lines exist (axhline's data are axes fractions), with
    # their values kept in the range.
    zoomed = not log_x and _zoom_to_late_training(ax, [-r[1] for r in refs])
    ref_handles = _draw_references(ax, refs, sign=-1.0)
    handles += [h for h, _ in ref_handles]
    if log_x:
        _log_x(ax)
    ax.set_xlabel("epoch (steps × batch size / training examples)" if epochs else "training step")
    if tag.startswith("test_curve/"):
        k = tag.removeprefix("test_curve/iwae_k").removesuffix("_nats")
        sizes = {r["config"].get("train.test_size") for ms in buckets for r in ms}
        sizes = {None if n in (None, "none") else n for n in sizes}  # none: flattened None
        images = "all" if sizes == {None} else " / ".join(sorted(str(n) for n in sizes))
        name = "ELBO" if k == "1" else f"IWAE bound, k = {k}"  # IWAE with k = 1 is the ELBO
        bound = f"test-set {name}, {images} test images (nats)"
    else:
        split = "validation" if tag.startswith("val/") else "training (no validation split)"
        bound = f"{split} ELBO (nats)"
        if tag == "train/mean_elbo_nats":
            bound = f"{split} ELBO (nats),\nmean over each logging interval"
        if windows - {1}:
            w = "/".join(str(n) for n in sorted(windows))
            bound = f"{split} ELBO (nats),\nmoving mean of {w} logged minibatches"
    ax.set_ylabel(f"{bound}\nlower bound on log p(x): higher is better")
    ax.grid(alpha=0.3)
    n = seeds.pop() if len(seeds) == 1 else None
    if n == 1:
        note = "one seed per line"
    else:
        count = f"{n} seeds" if n else "seeds"
        note = f"line: mean over {count}\nband: min to max over seeds"
    if zoomed:
        note += f"\ny axis: from {ZOOM_FROM:.0%} of training on"
    _legend(fig, handles, legend_labels, note)
    _title(ax, labeller.title([r["config"] for r in records], keys), 5.2)
    return fig


#: Linear-x learning curves show the y range of the curves from this fraction of the
#: x axis on: the first epochs' bound is hundreds of nats below the rest and would squash
#: the differences between rows into a few pixels.
ZOOM_FROM = 0.1


def _zoom_to_late_training(ax: Any, extra: Sequence[float] = ()) -> bool:
    """Set the y limits to the plotted lines' values at ``x >= ZOOM_FROM * max x`` (and
    ``extra`` values, e.g. reference lines) plus a margin. Returns whether it did (not
    when nothing was plotted before that point, or nothing there lies below the rest)."""
    points = [(x, y) for line in ax.get_lines() for x, y in zip(*line.get_data(), strict=True)]
    xs = [float(x) for x, _ in points if math.isfinite(float(x))]
    if not xs:
        return False
    start = ZOOM_FROM * max(xs)
    late = [float(y) for x, y in points if float(x) >= start and math.isfinite(float(y))]
    early = [float(y) for x, y in points if float(x) < start and math.isfinite(float(y))]
    if not late or not early:
        return False
    lo, hi = min([*late, *extra]), max([*late, *extra])
    if min(early) >= lo:  # nothing below the late range: no zoom needed
        return False
    pad = 0.08 * (hi - lo) if hi > lo else 1.0
    ax.set_ylim(lo - pad, hi + pad)
    return True


def _log_x(ax: Any) -> None:
    """Log-scale x with plain tick labels (1, 2, 5, 10, ...), not 2 x 10^-1."""
    from matplotlib.ticker import FuncFormatter

    def minor(v: float, _: Any) -> str:
        lead = round(v / 10 ** math.floor(math.log10(v))) if v > 0 else 0
        return f"{v:g}" if lead in (2, 5) else ""

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(minor))


def _smoothing_window(points: int) -> int:
    """The moving-mean width of a training curve of ``points`` logged minibatches: a
    25th of them (one point each below 50), so its shape survives and a single batch's
    noise does not dominate."""
    return max(1, points // 25)


def _moving_mean(values: Sequence[float], width: int) -> list[float]:
    """Each value replaced by the mean of the ``width`` values ending at it (fewer at the
    start): a trailing mean, so no point shows a later minibatch."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def _curve(record: Mapping[str, Any], tag: str) -> tuple[list[float], list[float]]:
    curve = record.get("test_curve" if tag.startswith("test_curve/") else "learning_curve") or {}
    return list(curve.get("step", [])), list(curve.get(tag, []))


def metric_vs_key_figure(
    groups: Sequence[Mapping[str, Any]],
    key: str,
    metric: str,
    others: Sequence[str] = (),
    labels: Mapping[str, Any] | Labeller | None = None,
    references: Any = None,
    title: str = "",
) -> Any:
    """``metric`` (mean ± std over seeds) vs the numeric ``key``, one line per combination
    of the ``others`` keys, labelled and styled as in :func:`learning_curves_figure`;
    ``references`` (a paper's NLL or -ELBO in nats) drawn at minus the value on an ELBO
    axis, NLLs at the value on an NLL axis (a -ELBO is not drawn there), none on other
    axes. Log x when the values span a factor of 20. A group for which ``key`` means
    nothing (the flow steps of a posterior without a flow, :func:`_applies`) is a
    horizontal line across the axis, not a point at its leftover default."""
    labeller = labels if isinstance(labels, Labeller) else Labeller(labels)
    present = [g for g in groups if metric in g["metrics"]]
    plan = labeller.plan([g["config"] for g in present], others)
    present.sort(key=lambda g: plan.sort_key(g["config"]))
    lines: dict[tuple[str, ...], list[tuple[float, float, float]]] = {}
    configs: dict[tuple[str, ...], Mapping[str, Any]] = {}
    flat: list[tuple[tuple[str, ...], float]] = []  # (series, mean): key not applicable
    for g in present:
        m = g["metrics"][metric]
        mean = math.nan if m["mean"] is None else m["mean"]
        values = plan.values(g["config"])
        configs.setdefault(values, g["config"])
        if not _applies(key, g["config"]):
            flat.append((values, mean))
            continue
        lines.setdefault(values, []).append((g["config"][key], mean, m["std"] or 0.0))
    styles = series_styles([*lines, *(v for v, _ in flat)])
    names = [plan.label(configs[v]) for v in lines]
    names += [f"{plan.label(configs[v]) or 'all runs'} (no {labeller.name(key)})" for v, _ in flat]
    rest = metric.partition("/")[2] or metric
    sign = 1.0 if rest.startswith("nll") else -1.0 if rest.startswith("elbo") else 0.0
    refs = _references_on_axis(_parse_references(references), sign)
    ref_labels = [_reference_label(*r, sign=sign) for r in refs]
    fig = _new_figure(5.2 + (_legend_width(names + ref_labels) if any(names) else 0), 4.2)
    ax = fig.add_subplot()
    handles, xs_all = [], []
    for pts, style in zip(lines.values(), styles[: len(lines)], strict=True):
        xs, ys, errs = zip(*sorted(pts), strict=True)
        xs_all += xs
        container = ax.errorbar(
            xs,
            ys,
            yerr=errs,
            color=style["color"],
            linestyle=style["linestyle"],
            marker=style["marker"] or "o",
            capsize=3,
        )
        handles.append(container.lines[0])
    for (_, mean), style in zip(flat, styles[len(lines) :], strict=True):
        handles.append(ax.axhline(mean, color=style["color"], linestyle=style["linestyle"]))
    ref_handles = _draw_references(ax, refs, sign=sign) if refs else []
    if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 20:
        ax.set_xscale("log")
    if xs_all:
        ticks = sorted(set(xs_all))
        ax.set_xticks(ticks, [_fmt_value(t) for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel(labeller.name(key))
    ax.set_ylabel(_metric_axis_label(metric))
    ax.grid(alpha=0.3)
    legend = [(h, n) for h, n in zip(handles, names, strict=True) if n] + ref_handles
    single = all(g.get("n_seeds", 1) == 1 for g in present)
    stat = "one seed per point (no error bars)" if single else "mean ± std over seeds"
    note = stat if any(names) else ""
    _legend(fig, [h for h, _ in legend], [n for _, n in legend], note)
    if not any(names):
        title = _SEP.join(filter(None, [title, stat]))
    _title(ax, title, 5.2)
    return fig


def heatmap_figure(
    groups: Sequence[Mapping[str, Any]],
    keys: Sequence[str],
    metric: str,
    labels: Mapping[str, Any] | Labeller | None = None,
    title: str = "",
) -> Any:
    """A table-shaped figure of ``metric`` (the mean over seeds): columns = the legend
    entry with the fewest values (the last on ties, e.g. the posterior; among entries
    every group sets), rows = the other entries' combinations (e.g. the prior), names
    from :class:`LabelPlan`; cells annotated with the mean, missing combinations blank.

    Returns:
        The ``Figure``, or ``None`` when the groups are no grid (fewer than half the
        cells filled: e.g. flow variants each with options of its own, a list the
        results table shows better).
    """
    import numpy as np

    labeller = labels if isinstance(labels, Labeller) else Labeller(labels)
    plan = labeller.plan([g["config"] for g in groups], keys)
    groups = sorted(groups, key=lambda g: plan.sort_key(g["config"]))
    values_of = [plan.values(g["config"]) for g in groups]
    distinct = [list(dict.fromkeys(v[i] for v in values_of)) for i in range(len(plan.names))]
    always = [i for i in range(len(distinct)) if all(plan.is_set(g["config"], i) for g in groups)]
    col = min(reversed(always or range(len(distinct))), key=lambda i: len(distinct[i]))
    by_col = sorted(groups, key=lambda g: plan.sort_key(g["config"], only=col))
    cols = list(dict.fromkeys(plan.values(g["config"])[col] for g in by_col))
    # One entry for the rows: its values as tick labels and its name on the axis.
    short = len(plan.names) == 2

    def row_label(g: Mapping[str, Any]) -> str:
        if short:
            return plan.values(g["config"])[1 - col]
        return plan.label(g["config"], skip=[col])

    rows = list(dict.fromkeys(row_label(g) for g in groups))
    if len(groups) < 0.5 * len(rows) * len(cols):
        return None
    values = np.full((len(rows), len(cols)), np.nan)
    cells = {
        (rows.index(row_label(g)), cols.index(v[col]))
        for g, v in zip(groups, values_of, strict=True)
    }
    if len(cells) < len(groups):
        return None  # two groups would share a cell
    for g, v in zip(groups, values_of, strict=True):
        mean = (g["metrics"].get(metric) or {}).get("mean")
        if mean is not None:
            values[rows.index(row_label(g)), cols.index(v[col])] = mean
    row_chars = max((len(r) for r in rows), default=0)
    width = 1.5 * len(cols)
    fig = _new_figure(2.6 + 0.065 * row_chars + width, 1.6 + 0.45 * len(rows))
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="viridis_r", aspect="auto")
    fig.colorbar(image, ax=ax, label=_metric_axis_label(metric))
    ax.set_xticks(range(len(cols)), cols)
    ax.set_xlabel(plan.names[col])
    ax.set_yticks(range(len(rows)), rows)
    if short:
        ax.set_ylabel(plan.names[1 - col])
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            r, g, b, _ = image.cmap(image.norm(v))
            ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color=ink, fontsize="small")
    single = all(g.get("n_seeds", 1) == 1 for g in groups)
    note = "cells: one seed each" if single else "cells: mean over seeds"
    _title(ax, _SEP.join(filter(None, [title, note])), width + 1.5)
    return fig


def _nll_metric(groups: Sequence[Mapping[str, Any]]) -> str | None:
    for pattern in (r"test/nll_iw\d+_nats", r"test/elbo_nats"):
        for g in groups:
            hits = sorted(n for n in g["metrics"] if re.fullmatch(pattern, n))
            if hits:
                return hits[0]
    return None


def make_figures(
    records: Sequence[Mapping[str, Any]],
    groups: Sequence[Mapping[str, Any]],
    by: Sequence[str] | None = None,
    labels: Mapping[str, Any] | None = None,
    references: Any = None,
    log_x: bool = False,
    metric: str | None = None,
) -> dict[str, tuple[str, Any]]:
    """The report's figures, not yet saved.

    Args:
        records: from :func:`collect` (or results.json), with their learning curves.
        groups: from :func:`group`.
        by: the grouping keys (default: the groups' own, and for the learning curves,
            which include runs that are not evaluated, every key that varies across the
            runs except :data:`EXCLUDED_KEYS`).
        labels: a label map (see :func:`load_labels`).
        references: ``{name: a paper's NLL in nats}`` or ``[(name, nll), ...]``.
        log_x: log-scale the learning curves' x axis.
        metric: the metric of the metric-vs-key and heat-map figures (default: the test
            NLL, or the ELBO when no NLL was computed).

    Returns:
        ``{"learning_curves": (file name, Figure), "test_curves": ..., "metric_vs_key":
        ..., "heatmap": ...}`` for the figures that apply: learning curves when some run
        logged ``val/elbo_nats``; test curves (``test_curves.png``) when some run logged
        the test bound (``train.test_every``); metric vs key when a grouping key is
        numeric (test NLL, or the ELBO when no NLL was computed); a heat map when two or
        more keys define the groups and they form a grid (see :func:`heatmap_figure`).
    """
    labeller = Labeller(labels)
    keys = list(groups[0]["by"]) if groups else list(by or [])
    curve_keys = list(by) if by is not None else _varying_keys(records)
    title = labeller.title([r["config"] for r in records], keys)
    figures: dict[str, tuple[str, Any]] = {}
    fig = learning_curves_figure(records, curve_keys, labeller, references, log_x)
    if fig is None:
        warnings.warn(
            "no run logged val/elbo_nats (or results.json holds no learning curves): "
            "learning_curves.png not written",
            stacklevel=3,
        )
    else:
        figures["learning_curves"] = ("learning_curves.png", fig)
    if any(r.get("test_curve") for r in records):
        fig = learning_curves_figure(records, curve_keys, labeller, references, log_x, "test")
        figures["test_curves"] = ("test_curves.png", fig)
    metric = metric or _nll_metric(groups)
    numeric = [k for k in keys if all(_is_number(g["config"][k]) for g in groups)]
    if metric is not None and numeric:
        key = numeric[0]
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", key)
        others = [k for k in keys if k != key]
        fig = metric_vs_key_figure(groups, key, metric, others, labeller, references, title)
        figures["metric_vs_key"] = (f"metric_vs_{safe}.png", fig)
    if metric is not None and len(keys) >= 2:
        fig = heatmap_figure(groups, keys, metric, labeller, title)
        if fig is not None:
            figures["heatmap"] = ("heatmap.png", fig)
    return figures


def _save_figures(figures: Mapping[str, tuple[str, Any]], out: Path) -> dict[str, Path]:
    written = {}
    for name, (filename, fig) in figures.items():
        path = out / filename
        fig.savefig(path, dpi=120, bbox_inches="tight")
        written[name] = path
    return written


# ----------------------------------------------------------------------------- results.json


def _results_json(payload: Mapping[str, Any]) -> str:
    """Indented JSON, with each learning curve's lists on one line (not one per number)."""
    compact: dict[str, str] = {}

    def swap(obj: Any) -> Any:
        if isinstance(obj, Mapping):
            return {
                k: (_placeholder(compact, v) if k in _CURVES else swap(v)) for k, v in obj.items()
            }
        if isinstance(obj, list):
            return [swap(v) for v in obj]
        return obj

    text = json.dumps(swap(_json_safe(payload)), indent=2, default=str)
    for token, value in compact.items():
        text = text.replace(f'"{token}"', value)
    return text + "\n"


_CURVES = ("learning_curve", "test_curve")


def _placeholder(compact: dict[str, str], curve: Any) -> str:
    token = f"@@learning_curve_{len(compact)}@@"
    compact[token] = json.dumps(curve, separators=(", ", ": "))
    return token


def _labels_arg(labels: Mapping[str, Any] | str | os.PathLike[str] | None) -> dict[str, Any]:
    if labels is None:
        return {}
    if isinstance(labels, Mapping):
        return dict(labels)
    return load_labels(labels)


def write_report(
    run_dirs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    by: Sequence[str] | None = None,
    labels: Mapping[str, Any] | str | os.PathLike[str] | None = None,
    references: Mapping[str, float] | Sequence[tuple[str, float]] | None = None,
    log_x: bool = False,
    metrics: Sequence[str] | None = None,
    stored: Sequence[str | os.PathLike[str]] = (),
    paired_against: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """Collect, group and write ``results.md``, ``results.json`` and figures.

    ``metrics``: the table's columns as regexes over metric names (full match, see
    :func:`resolve_metrics`), in order; the first one is also the figures' metric (e.g.
    ``test/elbo_nats`` first for a paper whose table reports bounds). Default: NLL, bpd,
    ELBO, KL, recon, active units, and the figures show the test NLL.

    Figures (see :func:`make_figures`): ``learning_curves.png`` (``val/elbo_nats``, one
    line per group of seeds with a min-max band); ``test_curves.png`` the same for the
    test-set IWAE-k bound of runs trained with ``train.test_every``; when a grouping key
    is numeric (e.g. flow depth), ``metric_vs_<key>.png`` (test NLL — or the ELBO when no
    NLL was computed — vs that key, std error bars, one line per combination of the other
    keys); and when
    two or more keys define the groups, ``heatmap.png`` (the same metric as a grid, e.g.
    prior x posterior). Legends name what varies in a reader's words (:class:`Labeller`);
    what does not vary is in the title.

    ``results.json`` holds each run's learning curve and the figure options, so
    :func:`render_figures_from_json` can redraw the figures without the run directories.

    Args:
        run_dirs, stored, by: as for :func:`collect` and :func:`group` (``stored``: earlier
            reports' results.json files whose evaluated runs are reported again; the
            file being rewritten may be one of them: it is read before anything is
            written).
        labels: a label map, or a TOML/JSON file of one (:func:`load_labels`).
        references: a paper's reported numbers, ``{name: NLL in nats (positive)}`` or
            ``[(name, value, kind)]`` with kind ``"nll"`` or ``"bound"`` (a reported
            -ELBO), drawn as dashed reference lines.
        log_x: log-scale the learning curves' x axis.
        paired_against: ``{config key: value as the runs' configs hold it}`` selecting one row,
            the reference: every other row gets its NLL and -ELBO difference from it,
            paired image by image over the test images all runs scored
            (:func:`add_paired_differences`).

    Returns:
        ``{"markdown", "json", "learning_curves", "metric_vs_key", "heatmap"}`` -> path,
        for the files written.
    """
    if not run_dirs and not stored:
        raise ValueError(
            "nothing to report: give run directories and/or stored results.json files"
        )
    # Read everything first: a stored results.json may be the one this report rewrites.
    label_map = _labels_arg(labels)
    refs = _parse_references(references)
    records = collect(run_dirs, stored)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Temps of an interrupted earlier report; only its own files (out may be shared).
    remove_stale_temps(out, final_names={"results.md", "results.json"})
    groups = group(records, by)
    if paired_against:
        stored_runs = {r["run_dir"] for r in records if r.get("stored_in")}
        add_paired_differences(groups, paired_against, stored_runs)
    keys = list(groups[0]["by"]) if groups else (list(by) if by else [])
    not_evaluated = [r["run_dir"] for r in records if r["status"] != "evaluated"]
    written: dict[str, Path] = {}
    columns = resolve_metrics(groups, metrics) if metrics is not None else None
    md = out / "results.md"
    markdown = to_markdown(groups, columns, not_evaluated=not_evaluated, labels=label_map)
    write_text_atomic(md, markdown)
    written["markdown"] = md
    js = out / "results.json"
    payload = {
        "by": keys,
        "figures": {
            "by": list(by) if by is not None else None,
            "labels": label_map,
            "references": [list(r) for r in refs],
            "log_x": log_x,
            "metric": columns[0] if columns else None,
        },
        "metrics": columns,
        "records": records,
        "groups": groups,
    }
    write_text_atomic(js, _results_json(payload))
    written["json"] = js
    figures = make_figures(
        records, groups, by, label_map, refs, log_x, metric=columns[0] if columns else None
    )
    written.update(_save_figures(figures, out))
    return written


def add_paired_differences(
    groups: list[dict[str, Any]],
    reference: Mapping[str, str],
    stored_runs: Collection[str] = (),
) -> None:
    """Give every group a ``"paired"`` entry: its NLL and -ELBO minus the reference row's,
    image by image (:func:`vaeflow.run.compare.paired_group_difference`: per-image means
    over each row's seeds, the standard error of the per-image differences).

    Rows are far better compared this way than by their own standard errors: they share
    the test images, whose difficulty cancels. The reference group gets
    ``{"reference": True}``; a group that cannot be paired gets ``{"error": why}`` and the
    table shows "—" with the reason below it: a run reported from a stored results.json
    (``stored_runs``: whatever sits at its old path now need not be what was reported),
    no per-image scores, other images or k, per-image scores whose mean is not the row's
    NLL (re-evaluated since), or non-finite scores.

    Raises:
        ValueError: fewer than two rows; a key of ``reference`` that the rows do not
            differ by; ``reference`` (config key -> value as the runs' configs hold it,
            compared as text, case-blind) selects no row or more than one.
    """
    from ..run.compare import ComparisonError, paired_group_difference

    def matches(g: Mapping[str, Any]) -> bool:
        # Case-blind, so that a flow given as "none" finds a config's None too.
        return all(
            k in g["config"] and _fmt_value(g["config"][k]).lower() == str(v).lower()
            for k, v in reference.items()
        )

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
    chosen = [g for g in groups if matches(g)]
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
                d = paired_group_difference(g["runs"], ref["runs"])
            except (FileNotFoundError, ComparisonError) as e:
                problem = str(e).split(";")[0]
        if problem is None:
            problem = _paired_mismatch(d, g, ref)
        g["paired"] = {"against": label, **({"error": f"{row}: {problem}"} if problem else d)}


def _unpairable(g: Mapping[str, Any], stored_runs: Collection[str]) -> str | None:
    stored = [r for r in g["runs"] if r in stored_runs]
    if stored:
        return (
            f"reported from a stored results.json ({stored[0]}): its per-image scores are "
            "not read; give its run directory to pair it"
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
        reported = [
            m["mean"]
            for name, m in group_["metrics"].items()
            if re.fullmatch(r"test/nll_iw\d+_nats", name)
        ]
        if reported and abs(reported[0] - mean) > 1e-6 * max(1.0, abs(mean)):
            return (
                f"its per-image scores average {mean:.4f} nats, not the reported NLL "
                f"{reported[0]:.4f} (evaluated again since?)"
            )
    return None


def markdown_from_json(results_json: str | os.PathLike[str]) -> str:
    """The ``results.md`` table that ``results_json`` (written by :func:`write_report`)
    gives with its stored labels: what a redraw writes, and what the committed table must
    be (so a table is never edited apart from its data)."""
    data = _read_json(Path(results_json))
    return _markdown_from_data(data, (data.get("figures") or {}).get("labels"))


def _markdown_from_data(data: dict[str, Any], labels: Any) -> str:
    not_evaluated = [r["run_dir"] for r in data["records"] if r.get("status") != "evaluated"]
    for g in data["groups"]:
        for m in g["metrics"].values():
            if m.get("mean") is None:  # results.json writes a non-finite mean as null
                m["mean"] = math.nan
    return to_markdown(
        data["groups"], data.get("metrics"), not_evaluated=not_evaluated, labels=labels
    )


def render_figures_from_json(
    results_json: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    labels: Mapping[str, Any] | str | os.PathLike[str] | None = None,
    references: Mapping[str, float] | Sequence[tuple[str, float]] | None = None,
    log_x: bool | None = None,
) -> dict[str, Path]:
    """Redraw a report's figures and its table from its ``results.json``, without the
    run directories.

    Args:
        results_json: written by :func:`write_report`.
        out_dir: where the figures and ``results.md`` go (default: beside
            ``results_json``).
        labels, references, log_x: override the ones stored in the file.

    Returns:
        ``{"markdown", "learning_curves", "metric_vs_key", "heatmap"}`` -> path, for the
        files written. A results.json from before the learning curves were stored gives
        no learning curves (with a ``UserWarning``).
    """
    src = Path(results_json)
    data = _read_json(src)
    stored = data.get("figures") or {}
    label_map = _labels_arg(labels) if labels is not None else stored.get("labels")
    markdown = _markdown_from_data(data, label_map)
    out = Path(out_dir) if out_dir is not None else src.parent
    out.mkdir(parents=True, exist_ok=True)
    figures = make_figures(
        data["records"],
        data["groups"],
        stored.get("by"),
        label_map,
        references if references is not None else stored.get("references"),
        bool(stored.get("log_x")) if log_x is None else log_x,
        metric=stored.get("metric"),
    )
    write_text_atomic(out / "results.md", markdown)
    return {"markdown": out / "results.md", **_save_figures(figures, out)}


# ----------------------------------------------------------------------------- CLI


def _reference(text: str, kind: str = "nll") -> tuple[str, float, str]:
    """``"VampPrior (paper): 85.57"`` -> ``("VampPrior (paper)", 85.57, "nll")``."""
    name, sep, value = text.rpartition(":")
    what = REFERENCE_KINDS[kind]
    try:
        if not sep or not name.strip():
            raise ValueError
        (ref,) = _parse_references([(name.strip(), float(value), kind)])
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected 'NAME: {what}' with the {what} in nats, positive "
            f"(e.g. 'VampPrior (paper): 85.57'){': ' + str(e) if str(e) else ''}"
        ) from None
    return ref


def _bound_reference(text: str) -> tuple[str, float, str]:
    """``"planar K = 80 (paper): 85.1"`` -> ``("planar K = 80 (paper)", 85.1, "bound")``."""
    return _reference(text, "bound")


def _references_from_args(args: argparse.Namespace) -> list[tuple[str, float, str]] | None:
    refs = [*(args.reference or ()), *(args.bound_reference or ())]
    return refs or None


def _report_command(args: argparse.Namespace) -> int:
    if not args.runs and not args.from_report:
        raise SystemExit(
            "vaeflow report: error: give run directories, --from-report FILE, or both"
        )
    if (
        not args.from_report
        and len(args.runs) == 1
        and Path(args.runs[0]).is_file()
        and args.runs[0].endswith(".json")
    ):
        written = render_figures_from_json(
            args.runs[0],
            args.out,
            labels=args.labels,
            references=_references_from_args(args),
            log_x=args.log_x or None,
        )
    else:
        try:
            written = _write_report_from_args(args)
        except ValueError as e:  # a protocol mixture, a stored file that is no report, ...
            raise SystemExit(f"vaeflow report: error: {e}") from None
    for name, path in written.items():
        print(f"{name:16s} {path}")
    return 0


def _write_report_from_args(args: argparse.Namespace) -> dict[str, Path]:
    """:func:`write_report` with the parsed ``vaeflow report`` arguments."""
    return write_report(
        args.runs,
        args.out,
        by=args.by,
        labels=args.labels,
        references=_references_from_args(args),
        log_x=args.log_x,
        metrics=args.metrics,
        stored=args.from_report or (),
        paired_against=_key_values(args.paired_against) if args.paired_against else None,
    )


def _key_values(items: Sequence[str]) -> dict[str, str]:
    """``["key=value", ...]`` -> ``{key: value}``; a malformed item is an error."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--paired-against takes KEY=VALUE items, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``report RUNS... -o OUT [--by KEY ...] [--labels FILE] [--reference 'NAME:
    NLL' ...] [--log-x]`` to an argparse subparsers object."""
    p = subparsers.add_parser(
        "report",
        help="results tables (markdown + JSON) and figures from run directories",
        description="Average evaluated runs over seeds and write results.md, "
        "results.json, learning_curves.png (and test_curves.png, metric_vs_<key>.png, "
        "heatmap.png). "
        "Given one results.json instead of run directories, redraw its figures and table. "
        "With --from-report, an earlier report's evaluated runs are reported again beside "
        "the run directories given (which supersede stored records of the same run).",
    )
    p.add_argument(
        "runs",
        nargs="*",
        help="run directories, or directories of them; or one results.json to redraw",
    )
    p.add_argument(
        "--from-report",
        action="append",
        metavar="RESULTS_JSON",
        help="an earlier report's results.json: its evaluated runs are reported again, "
        "without their run directories (repeatable; a run directory given supersedes a "
        "stored record of the same sweep folder and run name)",
    )
    p.add_argument("-o", "--out", required=True, help="output directory")
    p.add_argument(
        "--by",
        nargs="+",
        action="extend",
        metavar="KEY",
        help="config keys to group by (default: every varying key except the seed)",
    )
    p.add_argument(
        "--metrics",
        nargs="+",
        action="extend",
        metavar="PATTERN",
        help="table columns, as metric names or regexes (full match), in order; the first "
        "is also the figures' metric (default: test NLL, bpd, ELBO, KL, recon, active units)",
    )
    p.add_argument(
        "--labels",
        metavar="FILE",
        help="TOML or JSON label map: config key -> reader's name, or -> {name = ..., "
        "values = {value = name}} (default: vaeflow.tools.report.READER_NAMES)",
    )
    p.add_argument(
        "--reference",
        action="append",
        type=_reference,
        metavar="'NAME: NLL'",
        help="a paper's reported NLL in nats (positive), drawn as a dashed line (at minus "
        "it on the ELBO axes); repeat for several",
    )
    p.add_argument(
        "--bound-reference",
        action="append",
        type=_bound_reference,
        metavar="'NAME: -ELBO'",
        help="a paper's reported negative ELBO in nats (positive; tables that report bounds "
        "on -log p(x)), drawn at minus it on the ELBO axes and not on NLL axes; repeat "
        "for several",
    )
    p.add_argument("--log-x", action="store_true", help="log-scale the learning curves' x axis")
    p.add_argument(
        "--paired-against",
        nargs="+",
        metavar="KEY=VALUE",
        help="the reference row, by config keys and values as the runs' configs hold them "
        "(e.g. model.posterior.flow=none): two columns give every other "
        "row's NLL and -ELBO minus the reference's, paired image by image over the test "
        "images all runs scored (needs the run directories' test_scores.pt)",
    )
    p.set_defaults(func=_report_command)
    return p
