"""Run directories and stored records (an earlier report's ``results.json``) -> one flat
record per run, with its learning curves (:func:`collect`)."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...run.logger import flatten_config, read_metrics
from .keys import _is_number

#: summary entries that are protocol, not metrics
_PROTOCOL_METRICS = {"test/k": "k", "test/n_examples": "n_examples"}


EXPECTED_FILES = "config.json (and summary.json after `vaeflow eval`)"


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _training_ended(run_dir: Path, config: Mapping[str, Any]) -> bool:
    """Whether the run's training ended: ``train_summary.json`` (written when a training
    session ends) says it stopped early, or reached ``train.steps``. Without one the run
    is still training, was killed or diverged; one that stops short of ``train.steps``
    is left from before a resume that raised the budget, or from a run stopped on
    purpose (``stop_after_step``). Either way its curve stops short, and a figure must
    not pass it off as a finished run's."""
    path = run_dir / "train_summary.json"
    try:
        summary = _read_json(path)
    except (OSError, ValueError):
        return False
    status = str(summary.get("status", ""))
    if status.startswith("early stopping"):
        return True
    step, steps = summary.get("step"), config.get("train.steps")
    if _is_number(step) and _is_number(steps):
        return step >= steps
    return status == "completed"


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
    from ...config import Config, to_dict

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
    from ...config import StochasticLayerConfig, to_dict

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
        "trained": _training_ended(run_dir, config),
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
    where: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Read run directories into one flat record each.

    Args:
        run_dirs: run directories, or directories whose children are run directories
            (one level of recursion when a path has no ``config.json`` itself).

    Returns:
        Records ``{"run_dir", "name", "sweep" (the run directory's parent folder),
        "status", "trained" (training ended: :func:`_training_ended`), "commit",
        "seed", "checkpoint_step", "config": {dotted.key: value}, "protocol": {dataset,
        binarization, k, n_examples}, "metrics": {"test/...": float}, "notes": [...],
        "train_examples": int | None (environment.json's training-split size),
        "learning_curve": {"step": [...], "val/elbo_nats": [...]} (finite validation
        ELBOs from metrics.jsonl, or ``"train/elbo_nats"`` for a run without a validation
        split)}``, and for a run
        trained with ``train.test_every`` ``"test_curve": {"step": [...],
        "test_curve/iwae_k<K>_nats": [...]}``. A run without ``summary.json`` has
        ``status == "not evaluated"`` and empty metrics, and a ``UserWarning`` names it
        (saying when its training has not ended either).

        stored: earlier reports' ``results.json`` files whose evaluated records are
            reported again (:func:`load_stored_records`). An *evaluated* run directory
            given in ``run_dirs`` supersedes a stored record of the same run (same sweep
            folder and run name), with a ``UserWarning``; a run directory of that run not
            evaluated yet is left out instead and the stored record kept (warned too).
            The same run stored in two different files is an error.
        where: keep only the records whose config holds these values
            (:func:`select_records`), chosen before anything is derived from the whole
            set (a no-flow run's flow length follows the flow runs kept).

    Raises:
        FileNotFoundError: a path holds no run directory, or a stored file is missing.
        ValueError: a stored file is not a report's results.json, or two stored files
            hold the same run.
    """
    records = []
    for run_dir in _run_dirs(run_dirs) if run_dirs else []:
        record = _load_record(run_dir)
        unended = (
            "its training has not ended (no train_summary.json, or one short of "
            "train.steps: still running, killed, diverged, or stopped on purpose; its "
            "log says which)"
        )
        if record["status"] == "evaluated" and not record["trained"]:
            # under the table, beside the numbers it qualifies
            record["notes"].append(
                f"{record['name']}: evaluated before its training ended (no "
                "train_summary.json, or one short of train.steps): a mid-training checkpoint"
            )
            warnings.warn(f"{run_dir} was evaluated but {unended}", stacklevel=2)
        elif record["status"] != "evaluated" and not record["trained"]:
            warnings.warn(
                f"{run_dir}: {unended}: listed as 'not evaluated', left out of the tables, "
                "its curve marked unfinished",
                stacklevel=2,
            )
        elif record["status"] != "evaluated":
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
    if where:
        records = select_records(records, where)
    _align_unused_flow_steps(records)
    return records


def stored_where(stored: Sequence[str | os.PathLike[str]]) -> dict[str, str] | None:
    """The slice (``--where``) that the stored reports were written with, so that a
    report grown from them (``--from-report``) takes the same slice of a sweep folder
    without it being given again: the folder may hold runs of other settings (e.g.
    ``code_exact*.toml``'s beside ``reduced_code.toml``'s), and a row silently joined by
    them would be a different table.

    Returns:
        The stored reports' common ``{key: value}``, or ``None`` when none has a slice.

    Raises:
        ValueError: the stored reports were written with different slices -- every run
            being a slice of its own: one report's slice applied to another's records
            would drop rows unnoticed (give ``--where``, or ``--no-where`` for every run).
    """
    found: dict[str, dict[str, str]] = {}
    for source in stored:
        try:
            data = _read_json(Path(source))
        except (OSError, json.JSONDecodeError):
            continue  # :func:`load_stored_records` says what is wrong with the file
        where = data.get("where") if isinstance(data, Mapping) else None
        found[str(source)] = (
            {str(k): str(v) for k, v in where.items()} if isinstance(where, Mapping) else {}
        )
    slices = {tuple(sorted(w.items())) for w in found.values()}
    if len(slices) > 1:
        raise ValueError(
            "the --from-report reports were written with different --where slices ("
            + "; ".join(f"{src}: {w or 'every run'}" for src, w in found.items())
            + "); give --where for this report, or --no-where to report every run"
        )
    common = dict(slices.pop()) if slices else {}
    return common or None


def select_records(
    records: Sequence[dict[str, Any]], where: Mapping[str, str]
) -> list[dict[str, Any]]:
    """The records whose config holds every ``key: value`` of ``where`` (a slice of a
    sweep's runs, e.g. those on one setting of three keys); values compared as text,
    as ``--paired-against`` matches a row (:func:`vaeflow.tools.report.keys.value_matches`:
    numbers as numbers, other values as text, case-blind).

    Raises:
        ValueError: a key that no record's config has, or no record matching (the values
            the runs have for those keys are listed).
    """
    from .keys import _fmt_value, config_matches

    unknown = [k for k in where if not any(k in r["config"] for r in records)]
    if unknown:
        raise ValueError(
            f"--where {dict(where)}: no run's config has {', '.join(unknown)}; name config "
            "keys as dotted paths (e.g. model.prior.name)"
        )

    chosen = [r for r in records if config_matches(r["config"], where)]
    if not chosen:
        found = {
            k: sorted({_fmt_value(r["config"].get(k)) for r in records if k in r["config"]})
            for k in where
        }
        raise ValueError(f"--where {dict(where)} selects no run (the runs have: {found})")
    return chosen


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
