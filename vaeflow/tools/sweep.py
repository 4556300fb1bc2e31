"""Ablation sweeps: a grid (and seeds) over one base config, run locally or on a cluster.

A sweep file is TOML, read with :mod:`tomllib` (never ``eval``)::

    base = "experiments/quickstart/mnist_iaf_flowprior.toml"  # relative to this file
    name = "iaf_depth"          # runs go to <root>/<name>/<point name>/
    root = "runs"               # optional (default "runs"), relative to the working directory
    seeds = [0, 1]              # optional: each point once per seed (train.seed and
                                # data.batch_seed; the test data stay the same)
    set = ["train.steps=2000"]  # optional overrides shared by every point
    [grid]
    "model.posterior.flow" = ["iaf", "gated_iaf"]
    "model.posterior.num_layers" = [1, 2, 4]

Rows of a paper table are rarely a full product, so a sweep may also list **variants**:
each ``[[variant]]`` table is one named set of overrides, and the points are
variants x grid x seeds (no ``[[variant]]``: the grid alone)::

    [[variant]]
    name = "vae_k5"                     # optional; default "key=value,..." of its values
    "train.objective" = "elbo"
    "train.k" = 5

A sweep may **extend** another (``extends = "sweep.toml"``, relative to this file): it
inherits ``base``, ``root``, ``seeds``, the grid and the variants, appends its own ``set``
to the parent's, and may replace any of the others (grid keys one by one). A paper's
reduced-budget CPU sweep is its full sweep plus a few ``set`` overrides and a new name.

Grid values are TOML values; the string ``"none"`` (or ``"null"``) means ``None``, as in
``--set``. Every point's full :class:`~vaeflow.config.Config` is built before anything
runs (and each distinct model is built once on the CPU), so a typo in a grid key or value
fails the whole sweep up front, naming the key.

Points whose run directory holds ``summary.json`` (trained and evaluated) are skipped,
so an interrupted sweep is continued by running it again; a point with
``checkpoints/last.pt`` but no summary is continued with ``--resume``. Run directories
last as long as their machine, while a report's ``results.json`` is committed:
``--skip-reported RESULTS_JSON`` (:func:`reported_points`) also skips the points that
such a report holds evaluated (the same sweep folder and run name, trained with the same
settings), so a table grown over several machines is continued where it stands.

Running: :func:`run_sweep` starts each pending point as a subprocess
(``python -m vaeflow train ...``), at most ``jobs`` at a time, and writes
``<root>/<name>/sweep.json`` (statuses and return codes) and one log per point under
``<root>/<name>/logs/``. Every subprocess inherits the environment, so on a GPU machine
run one sweep process per GPU with ``CUDA_VISIBLE_DEVICES`` set (or ``jobs > 1`` only
when the points fit on one device together); placing jobs on GPUs is the user's (or the
scheduler's) job. For a cluster, :func:`commands` / :func:`write_commands` give one
shell-quoted ``vaeflow train`` command per pending point.

On a cluster (``--executor submitit-slurm``, :mod:`vaeflow.tools.submit`): each pending
point, or each stack, is one job of one Slurm job array submitted through submitit; the
job runs the same command (:func:`run_group`), logs to the same ``logs/``, and a job that
is preempted or reaches its time limit is requeued and continues the run from its
checkpoint. The jobs' resources come from the sweep's ``[cluster]`` table and
``--cluster KEY=VALUE`` (:mod:`vaeflow.tools.cluster`). By default the sweep waits and
writes ``sweep.json`` as the local path does (with each point's ``job_id``);
``--no-wait`` records the job ids (status ``submitted``) and returns, and running the
sweep again later waits for the jobs still queued or running instead of starting their
points twice. ``--executor submitit-local`` runs the same jobs as processes here.

Stacking (``--stack N``, :func:`stack_groups`): pending points whose configs differ only
in keys that change no shape (seeds, learning rate and schedule, KL warm-up, clipping,
...: :data:`vaeflow.run.stack.STACKABLE_KEYS`) are trained in groups of at most ``N`` as
one batched computation (``vaeflow train-stack SWEEP.toml POINT ...``, one subprocess
per group, log ``logs/stack__<first point>.log``); each point still gets its own
ordinary run directory, evaluated as ``vaeflow train`` evaluates it. Points that cannot
be stacked (:func:`vaeflow.run.stack.check_stackable`) or have no partner run alone, as
without ``--stack``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import re
import shlex
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import remove_stale_temps, write_text_atomic
from ..config import Config, ConfigError, load_config, read_toml, to_dict
from .cluster import EXECUTORS, cluster_config, executor_parameters

__all__ = [
    "Point",
    "Sweep",
    "load_sweep",
    "expand",
    "is_finished",
    "needs_resume",
    "commands",
    "write_commands",
    "write_sweep_hparams",
    "run_sweep",
    "run_group",
    "stack_groups",
    "train_points_stacked",
    "add_sweep_parser",
    "add_train_stack_parser",
]

_TOP_LEVEL_KEYS = {
    "base",
    "name",
    "root",
    "seeds",
    "set",
    "grid",
    "variant",
    "extends",
    "cluster",
}
_SAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
_MAX_NAME = 200  # well under the 255-byte file-name limit


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep file.

    Attributes:
        path: the sweep file.
        base: the base config (resolved relative to the sweep file).
        name: sweep name.
        root: runs root; the sweep lives in ``root / name``.
        seeds: ``train.seed`` values (``None``: keep the base config's seed).
        fixed: overrides applied to every point.
        grid: ``(dotted key, values)`` in file order.
        variants: ``(name, ((dotted key, value), ...))`` per ``[[variant]]``, in file order.
        cluster: the ``[cluster]`` table (checked; :mod:`vaeflow.tools.cluster`), the
            parent's keys replaced one by one by the file's own.
    """

    path: Path
    base: Path
    name: str
    root: Path
    seeds: tuple[int, ...] | None
    fixed: tuple[str, ...]
    grid: tuple[tuple[str, tuple[Any, ...]], ...]
    variants: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    cluster: dict[str, Any] = field(default_factory=dict)

    @property
    def directory(self) -> Path:
        """``root / name``: where the points, ``sweep.json`` and logs go."""
        return self.root / self.name


@dataclass(frozen=True)
class Point:
    """One run of a sweep.

    Attributes:
        name: deterministic, filesystem-safe name (``posterior.flow=iaf__seed=0``).
        overrides: ``--set`` items: fixed ones, grid values, ``train.seed``,
            ``run.root`` and ``run.name``.
        run_dir: the run directory, ``root / sweep name / name``.
        base: the base config file.
    """

    name: str
    overrides: list[str]
    run_dir: Path
    base: Path


def _format_value(value: Any, top: bool = True) -> str:
    """A grid value as ``--set`` text (TOML syntax), so it parses back to ``value``.

    A whole value ``"none"`` becomes ``--set``'s ``none`` (``None``); inside a list or a
    table it stays the string (TOML has no null there: a flow option such as
    ``scale_bound = "none"`` reads it itself)."""
    if isinstance(value, str):
        if top and value.strip().lower() in ("none", "null"):
            return "none"
        return json.dumps(value)  # a TOML basic string
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_format_value(v, top=False) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(
            f"{json.dumps(str(k))} = {_format_value(v, top=False)}" for k, v in value.items()
        )
        return "{ " + items + " }"
    raise ConfigError(f"sweep grid value {value!r} has an unsupported type {type(value).__name__}")


def _name_value(value: Any) -> str:
    """A grid value as a short readable piece of a point name."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "-".join(_name_value(v) for v in value)
    if isinstance(value, dict):
        return "-".join(f"{k}{_name_value(v)}" for k, v in value.items())
    return str(value)


def _safe(text: str) -> str:
    out = _SAFE.sub("_", text)
    if len(out) > _MAX_NAME:
        digest = hashlib.sha1(out.encode()).hexdigest()[:10]
        out = f"{out[: _MAX_NAME - 12]}__{digest}"
    return out


def load_sweep(sweep_path: str | Path, _seen: tuple[Path, ...] = ()) -> Sweep:
    """Parse and check a sweep file's structure (not yet the configs of its points).

    Raises:
        ConfigError: unknown top-level keys, missing ``base``/``name``, wrong types, an
            ``extends`` chain that loops or names a missing file.
    """
    path = Path(sweep_path)
    if path.resolve() in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path.resolve()))
        raise ConfigError(f"sweep 'extends' chain loops: {chain}")
    data = read_toml(path, "sweep file")
    unknown = sorted(set(data) - _TOP_LEVEL_KEYS)
    if unknown:
        raise ConfigError(
            f"{path}: unknown sweep key(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(_TOP_LEVEL_KEYS))}"
        )
    parent: Sweep | None = None
    if "extends" in data:
        if not isinstance(data["extends"], str) or not data["extends"]:
            raise ConfigError(f"{path}: 'extends' must be a sweep file path (a string)")
        parent = load_sweep(path.parent / data["extends"], (*_seen, path.resolve()))
    required = ("name",) if parent is not None else ("base", "name")
    for key in ("base", "name"):
        if (key in required or key in data) and (
            not isinstance(data.get(key), str) or not data[key]
        ):
            raise ConfigError(f"{path}: '{key}' must be a non-empty string")
    name = data["name"]
    if _safe(name) != name or name in (".", ".."):
        raise ConfigError(f"{path}: name = {name!r} must be a plain file name ([A-Za-z0-9._=,+-])")
    root = data.get("root", "runs" if parent is None else str(parent.root))
    if not isinstance(root, str) or not root:
        raise ConfigError(f"{path}: 'root' must be a non-empty string")
    seeds = data.get("seeds")
    if seeds is not None and (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise ConfigError(f"{path}: 'seeds' must be a non-empty list of distinct integers")
    fixed = data.get("set", [])
    if not isinstance(fixed, list) or not all(isinstance(s, str) for s in fixed):
        raise ConfigError(f"{path}: 'set' must be a list of 'section.key=value' strings")
    grid = data.get("grid", {})
    if not isinstance(grid, dict):
        raise ConfigError(f"{path}: [grid] must be a table of 'section.key' = [values]")
    for key, values in grid.items():
        if isinstance(values, dict):
            raise ConfigError(
                f"{path}: grid key {key!r} is a table: quote dotted keys "
                f'("{key}.x" = [...]), or TOML reads {key}.x as a nested table'
            )
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid key {key!r} needs a non-empty list of values")
    grid_items = {k: tuple(v) for k, v in grid.items()}
    if parent is not None:
        grid_items = {**dict(parent.grid), **grid_items}
    if "variant" in data or parent is None:
        variants = _load_variants(path, data.get("variant", []), set(grid_items))
    else:
        variants = parent.variants
        clash = sorted(set(grid_items).intersection(k for _, vs in variants for k, _ in vs))
        if clash:
            raise ConfigError(
                f"{path}: the grid varies {', '.join(clash)}, which the inherited "
                "[[variant]] tables also set; set each key in one place"
            )
    fixed_all = (parent.fixed if parent is not None else ()) + tuple(fixed)
    varied = set(grid_items) | {k for _, items in variants for k, _ in items}
    clash = sorted({item.split("=", 1)[0].strip() for item in fixed_all} & varied)
    if clash:
        # Variants and the grid are applied after `set`, so a `set` of the same key would
        # be silently overridden; refuse it instead.
        raise ConfigError(
            f"{path}: 'set' fixes {', '.join(clash)}, which the grid or a [[variant]] also "
            "sets (and would override); change it there instead"
        )
    if "base" in data:
        base = path.parent / data["base"]
    else:
        assert parent is not None
        base = parent.base
    cluster = data.get("cluster", {})
    if not isinstance(cluster, dict):
        raise ConfigError(f"{path}: [cluster] must be a table of key = value (Slurm resources)")
    cluster = {**(parent.cluster if parent is not None else {}), **cluster}
    cluster_config(cluster, where=str(path))  # a bad key fails now, as any other would
    return Sweep(
        path=path,
        base=base,
        name=name,
        root=Path(root),
        seeds=(
            tuple(seeds) if seeds is not None else (parent.seeds if parent is not None else None)
        ),
        fixed=fixed_all,
        grid=tuple(grid_items.items()),
        variants=variants,
        cluster=cluster,
    )


def _load_variants(
    path: Path, raw: Any, grid_keys: set[str]
) -> tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]:
    """Check the ``[[variant]]`` tables: named, non-empty, distinct, disjoint from the grid."""
    if not isinstance(raw, list) or not all(isinstance(v, dict) for v in raw):
        raise ConfigError(f"{path}: 'variant' must be [[variant]] tables of 'section.key' = value")
    out: list[tuple[str, tuple[tuple[str, Any], ...]]] = []
    for i, table in enumerate(raw):
        nested = sorted(k for k, v in table.items() if isinstance(v, dict) and "." not in k)
        if nested:
            raise ConfigError(
                f'{path}: [[variant]] number {i + 1}: quote dotted keys ("{nested[0]}.key" = '
                f"...); unquoted, TOML reads them as a nested table {nested[0]!r}"
            )
        items = tuple((k, v) for k, v in table.items() if k != "name")
        if not items:
            raise ConfigError(f"{path}: [[variant]] number {i + 1} sets no 'section.key' values")
        clash = sorted(grid_keys.intersection(k for k, _ in items))
        if clash:
            raise ConfigError(
                f"{path}: [[variant]] number {i + 1} sets {', '.join(clash)}, which the grid "
                "also varies; set each key in one place"
            )
        name = table.get("name")
        if name is None:
            labels = _short_keys([k for k, _ in items])
            name = ",".join(
                f"{lab}={_name_value(v)}" for lab, (_, v) in zip(labels, items, strict=True)
            )
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{path}: [[variant]] number {i + 1}: name must be a string")
        out.append((_safe(name), items))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"{path}: [[variant]] names must be distinct; repeated: {dup}")
    return tuple(out)


def _short_keys(keys: Sequence[str]) -> list[str]:
    """Drop the leading section (``model.``) when the shortened keys stay distinct."""
    short = [k.split(".", 1)[1] if "." in k else k for k in keys]
    return short if len(set(short)) == len(short) else list(keys)


def expand(sweep_path: str | Path, validate: bool = True) -> list[Point]:
    """All points of a sweep: variants x the grid's cartesian product x seeds.

    Order is stable: variants in file order (slowest), grid keys in file order (the first
    varies slowest), then seeds.
    With ``validate`` every point's full config is built first (``load_config``) and each
    distinct model once, so a bad key, value or component raises :class:`ConfigError`
    naming it before anything runs.
    """
    sweep = load_sweep(sweep_path)
    keys = [k for k, _ in sweep.grid]
    labels = _short_keys(keys)
    seeds: list[int | None] = list(sweep.seeds) if sweep.seeds is not None else [None]
    variants: list[tuple[str | None, tuple[tuple[str, Any], ...]]] = list(sweep.variants) or [
        (None, ())
    ]
    points: list[Point] = []
    for (variant, settings), combo, seed in itertools.product(
        variants, itertools.product(*(values for _, values in sweep.grid)), seeds
    ):
        parts = [variant] if variant is not None else []
        parts += [f"{lab}={_name_value(v)}" for lab, v in zip(labels, combo, strict=True)]
        overrides = list(sweep.fixed)
        overrides += [f"{k}={_format_value(v)}" for k, v in settings]
        overrides += [f"{k}={_format_value(v)}" for k, v in zip(keys, combo, strict=True)]
        if seed is not None:
            parts.append(f"seed={seed}")
            overrides.append(f"train.seed={seed}")
            # A seed varies the batches too (order, dynamic binarisation draws), unless
            # the sweep fixes them; validation/test data stay the same (data.seed).
            if not _sets(sweep, settings, keys, "data.batch_seed"):
                overrides.append(f"data.batch_seed={seed}")
        name = _safe("__".join(parts) or "base")
        overrides.append(f"run.root={json.dumps(str(sweep.directory))}")
        overrides.append(f"run.name={json.dumps(name)}")
        points.append(Point(name, overrides, sweep.directory / name, sweep.base))
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"{sweep.path}: grid values give duplicate point names {dup}")
    if validate:
        built: dict[str, None] = {}  # model configs already built (points differ by seed)
        for p in points:
            try:
                cfg = load_config(p.base, p.overrides)
            except ConfigError as e:
                raise ConfigError(f"{sweep.path}: point {p.name}: {e}") from None
            key = json.dumps(to_dict(cfg.model), sort_keys=True, default=str)
            if key not in built:
                _check_model(cfg, f"{sweep.path}: point {p.name}")
                built[key] = None
    return points


def _sets(
    sweep: Sweep, settings: Sequence[tuple[str, Any]], grid: Sequence[str], key: str
) -> bool:
    """Whether the sweep itself gives ``key`` a value (``set``, the variant or the grid)."""
    fixed = {o.split("=", 1)[0].strip() for o in sweep.fixed}
    return key in fixed or key in grid or any(k == key for k, _ in settings)


def _check_model(cfg: Config, where: str) -> None:
    """Build the point's model once (on CPU) so component errors also fail up front."""
    from ..models.build import build_model  # torch is imported only when a sweep is validated

    try:
        build_model(cfg.model)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: cannot build the model from [model]: {e}") from None


def is_finished(point: Point) -> bool:
    """True when the point was trained and evaluated (its ``summary.json`` exists)."""
    return (point.run_dir / "summary.json").is_file()


def needs_resume(point: Point) -> bool:
    """True when an unfinished point has a checkpoint to continue (``--resume``)."""
    return not is_finished(point) and (point.run_dir / "checkpoints" / "last.pt").is_file()


def _ignored_when_matching_reports() -> set[str]:
    """Config keys that may differ between a point and its reported run: paths and
    names, and settings that change how a run computes or logs, not its numbers (the
    report's :data:`vaeflow.tools.report.EXCLUDED_KEYS` without the seeds, which must
    agree)."""
    from .report.keys import EXCLUDED_KEYS

    return set(EXCLUDED_KEYS) - {"train.seed", "data.batch_seed"}


def reported_points(
    points: Sequence[Point], results_jsons: Sequence[str | Path]
) -> dict[str, str]:
    """The points that earlier reports already hold, evaluated: point name -> the
    ``results.json`` (written by ``vaeflow report``) with its record.

    A record is a point's when it names the same run (sweep folder and run name, as
    ``vaeflow report --from-report`` matches a stored record with a run directory) and
    was trained with the same settings: every config key agrees, the seeds included,
    except paths, names and settings that change only speed or logging
    (:data:`vaeflow.tools.report.EXCLUDED_KEYS`), and the flow length of a posterior
    without a flow (which the model never reads, and reports rewrite); keys vaeflow
    added after the record was written count as their defaults, as in the report.

    Raises:
        ConfigError: a results.json that is missing or not a report's; a run stored in
            two of them; a record that names one of the points but was trained with other
            settings (the keys are named) or evaluated otherwise (another k or number of
            test images): the point would otherwise be trained a second time under the
            same name, or silently taken for that other run.
    """
    from ..run.logger import flatten_config
    from .report.collect import _list_tables_with_defaults, _run_identity, load_stored_records

    ignored = _ignored_when_matching_reports()
    records: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
    for source in results_jsons:
        try:
            stored = load_stored_records(source)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"--skip-reported: {e}") from None
        for record in stored:
            ident = _run_identity(record)
            if ident in records and records[ident][0] != str(source):
                raise ConfigError(
                    f"--skip-reported: run {'/'.join(ident)} is stored in both "
                    f"{records[ident][0]} and {source}; give only one of those files"
                )
            records[ident] = (str(source), record)
    out: dict[str, str] = {}
    for p in points:
        hit = records.get((p.run_dir.parent.name, p.run_dir.name))
        if hit is None:
            continue
        source, record = hit
        mine = flatten_config(
            _list_tables_with_defaults(to_dict(load_config(p.base, p.overrides)))
        )
        theirs = record["config"]
        skip = set(ignored)
        flow = "model.posterior.flow"
        if mine.get(flow) in (None, "none") and theirs.get(flow) in (None, "none"):
            # unused without a flow, and rewritten by reports (a flow-length axis's 0)
            skip.add("model.posterior.num_layers")
        differ = sorted(
            k
            for k in mine.keys() | theirs.keys()
            if k not in skip and mine.get(k) != theirs.get(k)
        )
        if differ:
            shown = ", ".join(
                f"{k} ({theirs.get(k)!r} there, {mine.get(k)!r} here)" for k in differ[:4]
            )
            more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
            raise ConfigError(
                f"--skip-reported {source}: its record of {p.name} was trained with other "
                f"settings: {shown}{more}. It is not this point's run: give the report of "
                "this sweep's runs, or leave --skip-reported out to train the point anew"
            )
        evaluated = _evaluated_otherwise(record["protocol"], mine)
        if evaluated:
            raise ConfigError(
                f"--skip-reported {source}: its record of {p.name} was evaluated "
                f"otherwise ({evaluated}): its number is not this point's. Evaluate that "
                "run as the point says, or leave --skip-reported out to train it anew"
            )
        out[p.name] = source
    return out


def _evaluated_otherwise(protocol: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """How a reported run's evaluation (its record's ``protocol``) differs from what the
    point's flattened ``config`` asks for -- another k, or another number of test images
    -- or ``""``. Fields an older record lacks are not compared."""
    out = []
    k, n_test = protocol.get("k"), config.get("eval.n_test")
    if k is not None and k != config.get("eval.k"):
        out.append(f"k = {k}, the point's eval.k = {config.get('eval.k')}")
    examples = protocol.get("test_examples")
    if isinstance(examples, str):
        everything, n = examples.startswith("all"), protocol.get("n_examples")
        if n_test in (None, "none"):
            wrong = not everything
        elif everything:  # an n_test of at least the split's size scores all of it
            wrong = isinstance(n, int) and n_test < n
        else:
            wrong = n != n_test
        if wrong:
            out.append(f"test images: {examples}, the point's eval.n_test = {n_test}")
    return "; ".join(out)


def _train_args(point: Point, extra_args: Sequence[str] = ()) -> list[str]:
    args = ["train", str(point.base)]
    for item in point.overrides:
        args += ["--set", item]
    args += ["--run-dir", str(point.run_dir)]
    if needs_resume(point):
        args.append("--resume")
    return args + list(extra_args)


def commands(
    points: Sequence[Point], python: str = "vaeflow", extra_args: Sequence[str] = ()
) -> list[str]:
    """One shell command per point (``vaeflow train BASE --set k=v ... --run-dir DIR``).

    Args:
        points: the points (typically the unfinished ones).
        python: the program prefix, inserted verbatim (e.g. ``"python -m vaeflow"``).
        extra_args: appended to every command (e.g. ``["--threads", "1"]``).

    Every argument is quoted with :func:`shlex.quote`; ``--resume`` is added where a
    checkpoint exists at the time of the call.
    """
    return [
        " ".join([python, *(shlex.quote(a) for a in _train_args(p, extra_args))]) for p in points
    ]


def write_commands(
    points: Sequence[Point],
    path: str | Path,
    python: str = "vaeflow",
    extra_args: Sequence[str] = (),
    stack: int | None = None,
    sweep_path: str | Path | None = None,
) -> Path:
    """Write :func:`commands` one per line (atomically); returns the path.

    ``stack`` (with ``sweep_path``): group the points as ``vaeflow sweep --stack`` does
    (:func:`stack_groups`) and write one ``vaeflow train-stack SWEEP POINT...`` line per
    group of two or more, a plain ``vaeflow train`` line for a point alone.
    """
    path = Path(path)
    if stack and sweep_path is None:
        raise ValueError("write_commands: stack needs the sweep_path of the points")
    groups = stack_groups(points, stack) if stack else [[p] for p in points]
    lines = [
        commands(g, python, extra_args)[0]
        if len(g) == 1
        else " ".join(
            [python, *map(shlex.quote, _stack_args(sweep_path, g, extra_args))]  # type: ignore[arg-type]
        )
        for g in groups
    ]
    # Only this file's temps: its folder may be anyone's (the working directory, say).
    remove_stale_temps(path.parent, final_names={path.name})
    write_text_atomic(path, "".join(line + "\n" for line in lines))
    return path


def write_sweep_hparams(points: Sequence[Point], directory: str | Path) -> Path:
    """Write the sweep's TensorBoard HParams experiment (the table's columns) into its
    directory, so ``tensorboard --logdir <sweep directory>`` shows one table whose first
    columns are the keys the sweep varies and whose metrics start with the test NLL.

    The columns come from every point's full config (its flattened keys; a key is marked
    as varying when its value is not the same in all points) and the union of the
    points' metric tags in order (``vaeflow.run.evaluate.hparams_metric_tags``). The
    points' runs see this file in their parent directory and write only their own rows
    (TensorBoard reads a single experiment per log directory). Written before any point
    runs, so the table fills in as points finish; rewritten on every call.
    """
    # The run layer (and torch, tensorboard) only when a sweep is written for real.
    from ..run.evaluate import hparams_metric_tags
    from ..run.logger import flatten_config, hparams_order, write_hparams_experiment

    configs = [load_config(p.base, p.overrides) for p in points]
    # Not run.name and run.root: the table's first column (the trial) is the run already,
    # and a run name that differs in every point would take a leading column.
    flats = [
        {k: v for k, v in flatten_config(to_dict(cfg)).items() if not k.startswith("run.")}
        for cfg in configs
    ]
    if all(f.get("data.batch_seed") == f.get("train.seed") for f in flats):
        # The seed's second key (the sweep sets it with train.seed): a column of its own
        # would only repeat train.seed, and TensorBoard would sort it first (by name).
        flats = [{k: v for k, v in f.items() if k != "data.batch_seed"} for f in flats]
    varied = [k for k in flats[0] if len({json.dumps(f.get(k)) for f in flats}) > 1]
    metrics = list(dict.fromkeys(tag for cfg in configs for tag in hparams_metric_tags(cfg)))
    return write_hparams_experiment(
        directory, [hparams_order(f, first=varied) for f in flats], metrics
    )


def stack_groups(points: Sequence[Point], size: int) -> list[list[Point]]:
    """Split ``points`` into stacks of at most ``size``: points with equal
    :func:`vaeflow.run.stack.stack_key` in sweep order; a point that cannot be stacked
    (or a stack of one) is a group of one, trained alone. A stack's model is tried first
    (:func:`vaeflow.run.stack.check_model_stackable`: one vmapped step on two dummy
    images); a model the stack would get wrong trains alone, point by point."""
    from ..run.stack import check_model_stackable, check_stackable, stack_key

    if size < 1:
        raise ConfigError(f"--stack must be >= 1, got {size}")
    by_key: dict[str, list[list[Point]]] = {}
    groups: list[list[Point]] = []
    for p in points:
        cfg = load_config(p.base, p.overrides)
        try:
            check_stackable(cfg)
        except ConfigError:
            groups.append([p])
            continue
        chunks = by_key.setdefault(stack_key(cfg), [])
        if not chunks or len(chunks[-1]) == size:
            chunks.append([])
            groups.append(chunks[-1])
        chunks[-1].append(p)
    out: list[list[Point]] = []
    for g in groups:
        if len(g) > 1:
            try:
                check_model_stackable([load_config(p.base, p.overrides) for p in g])
            except ConfigError as e:
                names = ", ".join(p.name for p in g)
                warnings.warn(f"--stack: {names} train alone: {e}", stacklevel=2)
                out.extend([p] for p in g)
                continue
        out.append(g)
    return out


def _stack_args(sweep_path: str | Path, group: Sequence[Point], extra: Sequence[str]) -> list[str]:
    return ["train-stack", str(sweep_path), *(p.name for p in group), *extra]


def train_points_stacked(
    sweep_path: str | Path, names: Sequence[str], evaluate: bool = True
) -> dict[str, str]:
    """Train the named points of a sweep as one stack (``vaeflow train-stack``), each
    continued from its checkpoint when it has one; then evaluate each finished run as
    ``vaeflow train`` does. Returns ``{name: status}`` (``diverged`` runs are not
    evaluated).

    Raises:
        ConfigError: an unknown point name, or points that cannot share a stack.
    """
    from ..run.evaluate import evaluate_run
    from ..run.stack import train_stack

    points = {p.name: p for p in expand(sweep_path, validate=False)}
    unknown = [n for n in names if n not in points]
    if unknown:
        raise ConfigError(f"{sweep_path}: no point(s) named {', '.join(unknown)}")
    chosen = [points[n] for n in names]
    cfgs = [load_config(p.base, p.overrides) for p in chosen]
    resume = [needs_resume(p) for p in chosen]
    summaries = train_stack(cfgs, [p.run_dir for p in chosen], resume=resume)
    statuses = {}
    for p, summary in zip(chosen, summaries, strict=True):
        print(f"{p.name}: {summary['status']}", flush=True)
        if summary["status"] == "diverged":
            print(f"  {summary['error']}", flush=True)
        elif evaluate and not summary["status"].startswith("stopped"):
            evaluate_run(p.run_dir)
        statuses[p.name] = summary["status"]
    return statuses


def _point_result(point: Point, first: dict[str, Any]) -> dict[str, Any]:
    """The status of a point trained in the same stack (the same process) as ``first``'s."""
    finished = first["returncode"] == 0 and is_finished(point)
    return {**first, "status": "finished" if finished else "failed"}


def _run_point(
    point: Point, args: list[str], log_path: Path, note: str | None = None
) -> dict[str, Any]:
    start = time.time()
    # A requeued job's next attempt appends: the log keeps what the earlier ones printed.
    with open(log_path, "a" if note else "w") as log:
        if note:
            log.write(f"\n# {note}\n")
        log.write("$ " + " ".join(shlex.quote(a) for a in args) + "\n")
        log.flush()
        code = subprocess.call(args, stdout=log, stderr=subprocess.STDOUT)
    finished = code == 0 and is_finished(point)
    return {
        "status": "finished" if finished else "failed",
        "returncode": code,
        "seconds": round(time.time() - start, 3),
        "log": str(log_path),
    }


def _group_command(
    sweep_path: str | Path,
    group: Sequence[Point],
    extra: Sequence[str],
    stack_extra: Sequence[str],
    log_dir: str | Path,
) -> tuple[list[str], Path]:
    """The command that trains and evaluates ``group`` (``vaeflow train`` for a point
    alone, ``vaeflow train-stack`` for a stack) and its log file.

    Built when the group starts, not when the sweep does: a point interrupted in between
    (a requeued cluster job) then gets ``--resume``.
    """
    if len(group) == 1:
        p = group[0]
        args = [sys.executable, "-m", "vaeflow", *_train_args(p, extra)]
        return args, Path(log_dir) / f"{p.name}.log"
    args = [sys.executable, "-m", "vaeflow", *_stack_args(sweep_path, group, stack_extra)]
    return args, Path(log_dir) / f"stack__{group[0].name}.log"


def run_group(
    sweep_path: str | Path,
    group: Sequence[Point],
    extra: Sequence[str],
    stack_extra: Sequence[str],
    log_dir: str | Path,
    note: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Train and evaluate one point, or one stack, as a subprocess: what every executor
    runs (a thread of :func:`run_sweep`, or a submitit job,
    :class:`vaeflow.tools.submit.SweepJob`).

    Args:
        sweep_path: the sweep file (``train-stack`` reads its points from it).
        group: one point, or the points of one stack (:func:`stack_groups`).
        extra: more ``vaeflow train`` arguments (``--threads N``).
        stack_extra: more ``vaeflow train-stack`` arguments.
        log_dir: where the log goes (``<point>.log``, ``stack__<first point>.log``).
        note: a line for the log, which is then appended to (a requeued job's next
            attempt); ``None``: a fresh log.

    Returns:
        ``{point name: result}`` in the group's order: ``status`` (``finished`` when the
        process exited with 0 and the point's run directory holds ``summary.json``,
        else ``failed``), ``returncode``, ``seconds`` and ``log`` (a stack's points
        share the process, its exit code and log).
    """
    args, log = _group_command(sweep_path, group, extra, stack_extra, log_dir)
    first = _run_point(group[0], args, log, note)
    return {p.name: first if p is group[0] else _point_result(p, first) for p in group}


def _read_record(directory: Path) -> dict[str, Any]:
    """The sweep's ``sweep.json`` from an earlier run; ``{}`` if none (or unreadable)."""
    try:
        record = json.loads((directory / "sweep.json").read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _in_flight(record: dict[str, Any], points: Sequence[Point]) -> dict[str, dict[str, Any]]:
    """The unfinished points an earlier ``--executor submitit-slurm`` run left submitted
    (status ``submitted`` in its ``sweep.json``): their jobs may still be queued or
    running. By name, each its record entry (``job_id``)."""
    if record.get("executor") != "submitit-slurm":
        return {}
    unfinished = {p.name for p in points if not is_finished(p)}
    return {
        r["name"]: r
        for r in record.get("points", [])
        if isinstance(r, dict)
        and r.get("status") == "submitted"
        and r.get("job_id")
        and r.get("name") in unfinished
    }


def _write_record(
    sweep: Sweep, statuses: list[dict[str, Any]], executor: str, **extra: Any
) -> None:
    record = {
        "sweep": str(sweep.path),
        "base": str(sweep.base),
        "executor": executor,
        **extra,
        "points": statuses,
    }
    write_text_atomic(sweep.directory / "sweep.json", json.dumps(record, indent=2) + "\n")


def _submit_module() -> Any:
    """:mod:`vaeflow.tools.submit`, or a ConfigError saying how to install submitit."""
    try:
        from . import submit
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "submitit":
            raise
        raise ConfigError(
            "--executor submitit-slurm / submitit-local need the submitit package, which "
            'is not installed here: pip install -e ".[cluster]" (or pip install submitit)'
        ) from None
    return submit


def _check_executor_options(executor: str, jobs: int, cluster: Sequence[str], wait: bool) -> None:
    """Refuse options that do not go with the executor (rather than ignore them)."""
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if jobs < 1:
        raise ConfigError(f"jobs must be >= 1, got {jobs}")
    on_cluster = EXECUTORS[executor] is not None
    if on_cluster and jobs > 1:
        raise ConfigError(
            f"--jobs runs that many local subprocesses at a time; with --executor {executor} "
            "every pending point is a job of one array: limit how many run at once with "
            "--cluster array_parallelism=N (Slurm)"
        )
    if cluster and not on_cluster:
        raise ConfigError(
            "--cluster sets the jobs' resources for --executor submitit-slurm (or "
            "submitit-local); the local executor takes --jobs and --threads"
        )
    if not wait and executor != "submitit-slurm":
        raise ConfigError(
            f"--no-wait is for --executor submitit-slurm; the {executor} executor's runs "
            "are processes of this machine that end with this command"
        )


def run_sweep(
    sweep_path: str | Path,
    jobs: int = 1,
    dry_run: bool = False,
    threads: int | None = None,
    extra_args: Sequence[str] = (),
    stack: int | None = None,
    executor: str = "local",
    cluster: Sequence[str] = (),
    wait: bool = True,
    skip_reported: Sequence[str | Path] = (),
) -> list[dict[str, Any]]:
    """Run the sweep's pending points: as subprocesses here, at most ``jobs`` at a time,
    or as submitit jobs.

    Args:
        sweep_path: the sweep TOML.
        jobs: concurrent subprocesses (one per GPU is the user's job: set
            ``CUDA_VISIBLE_DEVICES`` per sweep process); the local executor only.
        dry_run: print and return the points and commands; run and create nothing.
        threads: ``--threads`` for every subprocess (torch CPU threads).
        extra_args: more ``vaeflow train`` arguments for every point.
        stack: train pending points in stacks of at most this many
            (:func:`stack_groups`); ``None``: every point alone.
        executor: ``"local"`` (subprocesses of this process), ``"submitit-slurm"`` (one
            Slurm job per point or stack, all in one job array;
            :mod:`vaeflow.tools.submit`) or ``"submitit-local"`` (those jobs as
            processes of this machine, all at once: for tests and small machines).
        cluster: ``KEY=VALUE`` overrides of the sweep's ``[cluster]`` table (submitit
            executors; :mod:`vaeflow.tools.cluster`).
        wait: wait for the jobs. ``False`` (``submitit-slurm`` only): submit, record
            the job ids in ``sweep.json`` (status ``submitted``) and return.
        skip_reported: earlier reports' ``results.json`` files: the points they hold
            evaluated are not run (status ``reported``; :func:`reported_points`).

    Returns:
        One dict per point, in sweep order: ``name``, ``run_dir``, ``overrides``,
        ``command``, ``status`` (``skipped`` = already finished, ``reported`` = in a
        report of ``skip_reported``, ``finished``,
        ``failed``, ``submitted`` (in a Slurm job not waited for), or
        ``pending``/``resume`` in a dry run) and ``returncode``; the submitit executors
        add ``job_id``. Also written to ``<root>/<name>/sweep.json`` (not in a dry run),
        with the executor. A failing point does not stop the others.

    Raises:
        ConfigError: a bad sweep, point or ``[cluster]`` key, before anything runs;
            options that do not go with the executor; unfinished points that an
            earlier ``--no-wait`` submission left in Slurm jobs, when the executor is
            not ``submitit-slurm`` (which waits for those jobs instead of starting the
            points twice).
    """
    _check_executor_options(executor, jobs, cluster, wait)
    on_cluster = EXECUTORS[executor] is not None
    points = expand(sweep_path)
    sweep = load_sweep(sweep_path)
    cluster_cfg = cluster_config(sweep.cluster, cluster, where=str(sweep.path))
    parameters = (
        executor_parameters(cluster_cfg, executor, f"vaeflow-{sweep.name}") if on_cluster else {}
    )
    extra = list(extra_args) + (["--threads", str(threads)] if threads else [])
    stack_extra = ["--threads", str(threads)] if threads else []
    earlier = _read_record(sweep.directory)
    in_flight = _in_flight(earlier, points)
    if in_flight and executor != "submitit-slurm" and not dry_run:
        ids = sorted({str(r["job_id"]) for r in in_flight.values()})
        raise ConfigError(
            f"{sweep.directory / 'sweep.json'}: {len(in_flight)} unfinished point(s) were "
            f"submitted to Slurm (job {', '.join(ids[:4])}{', ...' if len(ids) > 4 else ''}) "
            f"and may still be queued or running; --executor {executor} would train them "
            f"a second time. Wait for them with `vaeflow sweep {sweep_path} --executor "
            "submitit-slurm` (it resubmits only points whose job has ended), cancel them "
            "(scancel), or delete sweep.json if those jobs are gone"
        )
    attached: dict[str, Any] = {}  # point name -> its earlier Slurm job, still queued/running
    if in_flight and not dry_run:
        folder = earlier.get("submitit_folder") or sweep.directory / "submitit"
        attached = _submit_module().reattach(in_flight, folder)
    busy = set(in_flight) if dry_run else set(attached)
    reported = reported_points(points, skip_reported) if skip_reported else {}
    pending = [
        p for p in points if not is_finished(p) and p.name not in busy and p.name not in reported
    ]
    groups = stack_groups(pending, stack) if stack else [[p] for p in pending]
    group_of = {p.name: g for g in groups for p in g}
    statuses: list[dict[str, Any]] = []
    for p in points:
        done = is_finished(p)
        status = {
            "name": p.name,
            "run_dir": str(p.run_dir),
            "overrides": list(p.overrides),
            "command": (
                commands([p], extra_args=extra)[0]
                if len(group_of.get(p.name, [p])) == 1
                else " ".join(
                    [
                        "vaeflow",
                        *map(shlex.quote, _stack_args(sweep_path, group_of[p.name], stack_extra)),
                    ]
                )
            ),
            "status": "skipped"
            if done
            else "reported"
            if p.name in reported
            else ("resume" if needs_resume(p) else "pending"),
            "returncode": None,
        }
        if on_cluster:
            status["job_id"] = None
        if p.name in busy:  # an earlier submission's job: its command, its id
            status.update(
                command=in_flight[p.name].get("command", status["command"]),
                status="submitted",
                job_id=str(in_flight[p.name]["job_id"]),
            )
        statuses.append(status)
    if dry_run:
        if on_cluster:
            print(f"{executor} parameters: {json.dumps(parameters)}", flush=True)
        for s in statuses:
            job = f" (job {s['job_id']})" if s.get("job_id") else ""
            print(f"[{s['status']}]{job} {s['command']}", flush=True)
        return statuses

    folder = (sweep.directory / "submitit").resolve()  # submitit's files
    ex = None
    if on_cluster and groups:  # before anything is written: where submitit cannot submit
        ex = _submit_module().make_executor(executor, parameters, cluster_cfg.max_timeouts, folder)
    log_dir = sweep.directory / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    # An interrupted write of sweep.json; each point's run cleans its own run directory.
    remove_stale_temps(sweep.directory)
    write_sweep_hparams(points, sweep.directory)
    index = {p.name: i for i, p in enumerate(points)}

    if on_cluster:
        _run_on_cluster(
            sweep,
            executor,
            ex,
            {"submitit_folder": str(folder), "cluster": to_dict(cluster_cfg)},
            [(str(sweep_path), g, extra, stack_extra, log_dir) for g in groups],
            attached,
            statuses,
            {p.name: p for p in points},
            wait,
        )
    else:

        def work(group: list[Point]) -> None:
            names = ", ".join(p.name for p in group)
            print(f"start {names}" + (" (stacked)" if len(group) > 1 else ""), flush=True)
            results = run_group(sweep_path, group, extra, stack_extra, log_dir)
            for name, result in results.items():  # each point's own run directory decides
                statuses[index[name]].update(result)
                print(f"{result['status']} {name} (exit {result['returncode']})", flush=True)

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(work, groups))
        _write_record(sweep, statuses, executor)
    failed = [s["name"] for s in statuses if s["status"] == "failed"]
    if failed:
        print(f"{len(failed)} point(s) failed: {', '.join(failed)}", file=sys.stderr)
    return statuses


def _run_on_cluster(
    sweep: Sweep,
    executor: str,
    ex: Any,
    record_extra: dict[str, Any],
    group_args: list[tuple[str, list[Point], list[str], list[str], Path]],
    attached: dict[str, Any],
    statuses: list[dict[str, Any]],
    points: dict[str, Point],
    wait: bool,
) -> None:
    """Submit one job per group (``group_args``: :func:`run_group`'s arguments) with
    submitit's executor ``ex`` as one job array, record the job ids in ``sweep.json``
    (with ``record_extra``), and, with ``wait``, collect each job's results as it ends
    (``attached``: an earlier submission's jobs still queued or running, by point name,
    waited for as the new ones). ``statuses`` is updated."""
    if not group_args and not attached:  # every point finished: nothing to submit
        _write_record(sweep, statuses, executor)
        return
    submit = _submit_module()
    index = {s["name"]: i for i, s in enumerate(statuses)}
    cwd = Path.cwd()
    fns = [submit.SweepJob(run_group, args, [p.name for p in args[1]], cwd) for args in group_args]
    handles = submit.submit_groups(ex, fns) if fns else []
    jobs = [(h, fn.names) for h, fn in zip(handles, fns, strict=True)]
    earlier: dict[str, tuple[Any, list[str]]] = {}
    for name, job in attached.items():
        earlier.setdefault(str(job.job_id), (job, []))[1].append(name)
    for job, names in jobs:
        print(f"submitted {', '.join(names)}: job {job.job_id}", flush=True)
    for job_id, (_, names) in earlier.items():
        print(f"still queued or running: {', '.join(names)}: job {job_id}", flush=True)
    jobs += list(earlier.values())
    for job, names in jobs:
        for name in names:
            statuses[index[name]].update(status="submitted", job_id=str(job.job_id))
    _write_record(sweep, statuses, executor, **record_extra)
    if not wait:
        print(
            f"{len(jobs)} job(s) queued on Slurm; they run without this command "
            f"(submitit's files: {record_extra['submitit_folder']}).\n"
            "  watch:   squeue --me\n"
            f"  collect: vaeflow sweep {sweep.path} --executor submitit-slurm\n"
            "           (waits for the jobs still queued or running, submits again the "
            "points whose job ended unfinished, writes sweep.json)\n"
            f"  report:  vaeflow report {sweep.directory}   (the finished runs, at any time)",
            flush=True,
        )
        return
    try:
        for job, results in submit.wait_for(
            jobs, poll_s=1.0 if executor == "submitit-local" else 15.0
        ):
            for name, result in results.items():
                if result["returncode"] is None and is_finished(points[name]):
                    result = {**result, "status": "finished"}  # ended after its evaluation
                statuses[index[name]].update(result)
                print(
                    f"{result['status']} {name} (job {job.job_id}, exit {result['returncode']})",
                    flush=True,
                )
    except KeyboardInterrupt:
        _write_record(sweep, statuses, executor, **record_extra)
        if executor == "submitit-local":
            for job, _ in jobs:  # local jobs are this machine's processes: stop them too
                job.cancel(check=False)
        else:
            print(
                "stopped waiting; the Slurm jobs keep running. Run `vaeflow sweep "
                f"{sweep.path} --executor submitit-slurm` again to wait for them and "
                "collect the results",
                file=sys.stderr,
            )
        raise
    _write_record(sweep, statuses, executor, **record_extra)


def _sweep_command(args: argparse.Namespace) -> int:
    """``vaeflow sweep``: 0 when every point is finished (or, with ``--no-wait``,
    submitted), 1 when any failed."""
    if args.commands_file:
        if args.executor != "local" or args.cluster or args.no_wait:
            raise ConfigError(
                "--commands-file writes the commands and runs nothing; it takes no "
                "--executor, --cluster or --no-wait"
            )
        points = expand(args.sweep)
        reported = reported_points(points, args.skip_reported) if args.skip_reported else {}
        pending = [p for p in points if not is_finished(p) and p.name not in reported]
        extra = ["--threads", str(args.threads)] if args.threads else []
        path = write_commands(
            pending, args.commands_file, extra_args=extra, stack=args.stack, sweep_path=args.sweep
        )
        # Before the scheduler starts the points: each then writes only its own row.
        write_sweep_hparams(points, load_sweep(args.sweep).directory)
        lines = len(path.read_text().splitlines())
        print(f"wrote {lines} command(s) for {len(pending)} point(s) to {path}")
        return 0  # handed to a scheduler: nothing runs here
    statuses = run_sweep(
        args.sweep,
        jobs=args.jobs or 1,
        dry_run=args.dry_run,
        threads=args.threads,
        stack=args.stack,
        executor=args.executor,
        cluster=args.cluster or (),
        wait=not args.no_wait,
        skip_reported=args.skip_reported or (),
    )
    if args.dry_run:
        return 0
    ok = ("finished", "skipped", "reported")
    ok += ("submitted",) if args.no_wait else ()
    return 0 if all(s["status"] in ok for s in statuses) else 1


def add_sweep_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``sweep SWEEP.toml [--jobs N] [--dry-run] [--threads N] [--stack N]
    [--commands-file PATH] [--executor E] [--cluster KEY=VALUE ...] [--no-wait]
    [--skip-reported RESULTS_JSON ...]``."""
    s = subparsers.add_parser("sweep", help="run a grid/seed sweep over a base config")
    s.add_argument("sweep", help="sweep TOML (base, name, [grid], seeds, set, [cluster])")
    s.add_argument("--jobs", type=int, help="concurrent runs with the local executor (default 1)")
    s.add_argument("--dry-run", action="store_true", help="list points and commands only")
    s.add_argument("--threads", type=int, help="torch CPU threads per run")
    s.add_argument(
        "--stack",
        type=int,
        metavar="N",
        help="train up to N points that differ only in seeds and other shape-free "
        "settings as one batched computation (ordinary run directories; "
        "vaeflow.run.stack)",
    )
    s.add_argument(
        "--commands-file",
        metavar="PATH",
        help="write one shell command per unfinished point (with --stack: per stack) "
        "for a cluster scheduler, and run nothing",
    )
    s.add_argument(
        "--executor",
        choices=list(EXECUTORS),
        default="local",
        help="local: subprocesses here (default); submitit-slurm: one Slurm job per "
        "point (or stack) in one job array, requeued and resumed when preempted or out "
        "of time (needs submitit: pip install -e '.[cluster]'); submitit-local: those "
        "jobs as processes here, all at once",
    )
    s.add_argument(
        "--cluster",
        action="append",
        metavar="KEY=VALUE",
        help="a job resource, over the sweep's [cluster] table (repeatable): "
        "timeout_min=240, partition=gpu, gpus=1, cpus_per_task=4, mem_gb=16, "
        "array_parallelism=8, sbatch.account=proj, ... (vaeflow.tools.cluster)",
    )
    s.add_argument(
        "--no-wait",
        action="store_true",
        help="submitit-slurm: submit, print the job ids and return; the same command "
        "without --no-wait later waits for them and writes sweep.json",
    )
    s.add_argument(
        "--skip-reported",
        action="append",
        metavar="RESULTS_JSON",
        help="an earlier `vaeflow report`'s results.json (repeatable): points it holds "
        "evaluated -- the same sweep folder and run name, trained with the same settings "
        "-- are not run, so a table grown on machines that do not keep each other's run "
        "directories continues where it stands (report it with --from-report)",
    )
    s.set_defaults(func=_sweep_command)
    return s


def _train_stack_command(args: argparse.Namespace) -> int:
    """``vaeflow train-stack``: 0 when every point trained (and was evaluated)."""
    statuses = train_points_stacked(args.sweep, args.points, evaluate=not args.no_eval)
    return 0 if all(s != "diverged" for s in statuses.values()) else 1


def add_train_stack_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``train-stack SWEEP.toml POINT [POINT ...] [--no-eval] [--threads N]``."""
    s = subparsers.add_parser(
        "train-stack",
        help="train named points of a sweep as one stack (what `sweep --stack` runs)",
    )
    s.add_argument("sweep", help="sweep TOML")
    s.add_argument("points", nargs="+", metavar="POINT", help="point names (sweep --dry-run)")
    s.add_argument("--no-eval", action="store_true", help="skip the test evaluations")
    s.add_argument("--threads", type=int, help="torch CPU threads")
    s.set_defaults(func=_train_stack_command)
    return s
