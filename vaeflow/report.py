"""Run directories -> results tables (markdown + JSON) and figures.

    records = collect([Path("runs")])          # one record per run directory
    groups = group(records)                    # seeds averaged, protocol checked
    print(to_markdown(groups))
    write_report([Path("runs")], Path("results/mnist_flows"))

A run directory (written by :mod:`vaeflow.train` and :mod:`vaeflow.evaluate`) holds
``config.json``, ``environment.json``, ``metrics.jsonl`` and, once evaluated,
``summary.json``.

Runs without ``summary.json`` are **kept** with ``status = "not evaluated"`` (and a
``UserWarning`` naming them): they have no test metrics, so :func:`group` leaves them
out of every table, but :func:`write_report` lists them under the table and still draws
their learning curves. Numbers measured under different protocols (dataset,
binarisation, importance samples ``k``, number of test examples) are never averaged:
:func:`group` raises ``ValueError`` naming the key instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .atomic import remove_stale_temps, write_text_atomic
from .logger import flatten_config, read_metrics

__all__ = [
    "EXCLUDED_KEYS",
    "PROTOCOL_KEYS",
    "add_report_parser",
    "collect",
    "group",
    "metric_label",
    "resolve_metrics",
    "to_markdown",
    "write_report",
]

#: config keys that never define a group (seeds are averaged; names and paths are labels)
EXCLUDED_KEYS: tuple[str, ...] = ("train.seed", "run.name", "run.root", "data.root")
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
            candidates = sorted(p for p in path.iterdir() if (p / "config.json").is_file())
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


def _load_record(run_dir: Path) -> dict[str, Any]:
    config = flatten_config(_read_json(run_dir / "config.json"))
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
    notes: list[str] = []
    for note in [*summary.get("notes", []), *env.get("notes", [])]:
        if note not in notes:
            notes.append(str(note))
    return {
        "run_dir": str(run_dir),
        "name": run_dir.name,
        "status": "evaluated" if summary_path.is_file() else "not evaluated",
        "commit": env.get("commit") or "unknown",
        "seed": config.get("train.seed"),
        "checkpoint_step": summary.get("checkpoint_step"),
        "config": config,
        "protocol": protocol,
        "metrics": metrics,
        "notes": notes,
    }


def collect(run_dirs: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """Read run directories into one flat record each.

    Args:
        run_dirs: run directories, or directories whose children are run directories
            (one level of recursion when a path has no ``config.json`` itself).

    Returns:
        Records ``{"run_dir", "name", "status", "commit", "seed", "checkpoint_step",
        "config": {dotted.key: value}, "protocol": {dataset, binarization, k,
        n_examples}, "metrics": {"test/...": float}, "notes": [...]}``. A run without
        ``summary.json`` has ``status == "not evaluated"`` and empty metrics, and a
        ``UserWarning`` names it.

    Raises:
        FileNotFoundError: a path holds no run directory.
    """
    records = []
    for run_dir in _run_dirs(run_dirs):
        record = _load_record(run_dir)
        if record["status"] != "evaluated":
            warnings.warn(
                f"{run_dir} has no summary.json (run `vaeflow eval {run_dir}`): listed as "
                "'not evaluated' and left out of the tables",
                stacklevel=2,
            )
        records.append(record)
    return records


# ----------------------------------------------------------------------------- group


def _varying_keys(records: Sequence[Mapping[str, Any]]) -> list[str]:
    keys = sorted({k for r in records for k in r["config"]} - set(EXCLUDED_KEYS))
    return [k for k in keys if len({repr(r["config"].get(k)) for r in records}) > 1]


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
    buckets: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
    for r in evaluated:
        buckets.setdefault(tuple(repr(r["config"].get(k)) for k in keys), []).append(r)
    groups = []
    for members in buckets.values():
        config = {k: members[0]["config"].get(k) for k in keys}
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
    if rest == "bpd":
        return f"{split} bpd".strip()
    if rest == "active_units":
        return f"{split} active units".strip()
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


def to_markdown(
    groups: Sequence[Mapping[str, Any]],
    metrics: Sequence[str] | None = None,
    not_evaluated: Sequence[str] = (),
) -> str:
    """Render groups as a markdown table with a footer of protocol, notes and commits.

    Args:
        groups: from :func:`group`.
        metrics: metric names for the columns; default: NLL, bpd, ELBO, KL, recon,
            active units, those present.
        not_evaluated: run directories to list under the table as not evaluated.

    Returns:
        Markdown: the grouping config keys as the first columns, then one
        ``mean ± std (n)`` cell per metric (``mean (1)`` for a single seed, ``—`` when
        missing), then a footer.
    """
    keys = list(groups[0]["by"]) if groups else []
    names = list(metrics) if metrics is not None else _default_metrics(groups)
    # Rows measured on different data or with different estimators must not sit side by
    # side unnoticed: then every row states its protocol in columns of its own.
    mixed = [pk for pk in PROTOCOL_KEYS if len({repr(g["protocol"].get(pk)) for g in groups}) > 1]
    headers = (keys or ["runs"]) + mixed + ["seeds"] + [metric_label(n) for n in names]
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
        + "|".join(["---"] * ((len(keys) or 1) + len(mixed)) + ["---:"] * (1 + len(names)))
        + "|",
    ]
    for g in groups:
        first = [_fmt_value(g["config"][k]) for k in keys] or ["all"]
        protocol = [_fmt_value(g["protocol"].get(pk)) for pk in mixed]
        cells = [_cell(g["metrics"].get(n), n) for n in names]
        lines.append("| " + " | ".join([*first, *protocol, str(g["n_seeds"]), *cells]) + " |")
    if not groups:
        lines.append("| " + " | ".join(["(no evaluated runs)"] + [""] * (len(headers) - 1)) + " |")
    lines += ["", "Cells: mean ± std over seeds (n); std uses n-1."]
    protocols = []
    for g in groups:
        p = ", ".join(f"{k}={g['protocol'].get(k)}" for k in PROTOCOL_KEYS)
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


def _new_figure() -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), layout="tight")
    FigureCanvasAgg(fig)  # Agg, without touching pyplot's global backend
    return fig


def _label(record: Mapping[str, Any], keys: Sequence[str]) -> str:
    parts = [f"{k.rsplit('.', 1)[-1]}={_fmt_value(record['config'].get(k))}" for k in keys]
    parts.append(f"seed={record['seed']}")
    return ", ".join(parts)


def _learning_curves(
    records: Sequence[Mapping[str, Any]], keys: Sequence[str], path: Path
) -> bool:
    """Validation ELBO vs step, one line per run; the training ELBO when no run has a
    validation split (``data.val_size = 0``). False (and a warning) when neither exists."""
    curves: dict[str, list[tuple[Mapping[str, Any], list[tuple[float, float]]]]] = {}
    for r in records:
        try:
            rows = read_metrics(r["run_dir"])
        except FileNotFoundError:
            continue
        for tag in ("val/elbo_nats", "train/elbo_nats"):
            pts = [
                (row["step"], row[tag])
                for row in rows
                if _is_number(row.get(tag)) and math.isfinite(row[tag])
            ]
            if pts:
                curves.setdefault(tag, []).append((r, pts))
    tag = next((t for t in ("val/elbo_nats", "train/elbo_nats") if curves.get(t)), None)
    if tag is None:
        warnings.warn(
            "no run logged val/elbo_nats or train/elbo_nats: learning_curves.png not written",
            stacklevel=3,
        )
        return False
    fig = _new_figure()
    ax = fig.add_subplot()
    for r, pts in curves[tag]:
        ax.plot(*zip(*pts, strict=True), marker=".", label=_label(r, keys))
    ax.set_xlabel("step")
    ax.set_ylabel(("validation" if tag.startswith("val/") else "training") + " ELBO (nats)")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    return True


def _nll_metric(groups: Sequence[Mapping[str, Any]]) -> str | None:
    for pattern in (r"test/nll_iw\d+_nats", r"test/elbo_nats"):
        for g in groups:
            hits = sorted(n for n in g["metrics"] if re.fullmatch(pattern, n))
            if hits:
                return hits[0]
    return None


def _short(key: str) -> str:
    """``model.prior.flow`` -> ``prior.flow``: unambiguous where the last part is not."""
    return key.split(".", 1)[1] if key.count(".") >= 2 else key.rsplit(".", 1)[-1]


def _metric_vs_key(
    groups: Sequence[Mapping[str, Any]],
    key: str,
    metric: str,
    path: Path,
    others: Sequence[str] = (),
) -> None:
    """``metric`` vs the numeric ``key``, one line per combination of the ``others`` keys."""
    lines: dict[str, list[tuple[float, float, float]]] = {}
    for g in groups:
        if metric not in g["metrics"]:
            continue
        label = ", ".join(f"{_short(k)}={_fmt_value(g['config'][k])}" for k in others)
        m = g["metrics"][metric]
        lines.setdefault(label, []).append((g["config"][key], m["mean"], m["std"] or 0.0))
    fig = _new_figure()
    ax = fig.add_subplot()
    for label, pts in lines.items():
        xs, ys, errs = zip(*sorted(pts), strict=True)
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=label or None)
    ax.set_xlabel(key)
    ax.set_ylabel(metric_label(metric))
    if any(lines):
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)


def _heatmap(
    groups: Sequence[Mapping[str, Any]], keys: Sequence[str], metric: str, path: Path
) -> None:
    """A table-shaped figure of ``metric``: columns = the key with the fewest values (the
    last such key on ties, e.g. the posterior), rows = the other keys' combinations (e.g.
    the prior); cells annotated with the mean, missing combinations left blank."""
    import numpy as np

    distinct = {k: sorted({_fmt_value(g["config"][k]) for g in groups}) for k in keys}
    col_key = min(reversed(keys), key=lambda k: len(distinct[k]))
    row_keys = [k for k in keys if k != col_key]

    def row_label(g: Mapping[str, Any]) -> str:
        return ", ".join(f"{_short(k)}={_fmt_value(g['config'][k])}" for k in row_keys)

    rows = list(dict.fromkeys(row_label(g) for g in groups))
    cols = distinct[col_key]
    values = np.full((len(rows), len(cols)), np.nan)
    for g in groups:
        if metric in g["metrics"]:
            i, j = rows.index(row_label(g)), cols.index(_fmt_value(g["config"][col_key]))
            values[i, j] = g["metrics"][metric]["mean"]
    fig = _new_figure()
    fig.set_size_inches(2.2 + 1.6 * len(cols), 1.2 + 0.45 * len(rows))
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="viridis_r", aspect="auto")
    fig.colorbar(image, ax=ax, label=metric_label(metric))
    ax.set_xticks(range(len(cols)), [f"{_short(col_key)}={c}" for c in cols])
    ax.set_yticks(range(len(rows)), rows)
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w", fontsize="small")
    fig.savefig(path, dpi=120)


def write_report(
    run_dirs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    by: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Collect, group and write ``results.md``, ``results.json`` and figures.

    ``metrics``: the table's columns as regexes over metric names (full match, see
    :func:`resolve_metrics`), in order; the first one is also the figures' metric (e.g.
    ``test/elbo_nats`` first for a paper whose table reports bounds). Default: NLL, bpd,
    ELBO, KL, recon, active units, and the figures show the test NLL.

    Figures: ``learning_curves.png`` (``val/elbo_nats`` vs step, one line per run,
    labelled by the grouping keys and seed; ``train/elbo_nats`` when no run has a
    validation split); when a grouping key is numeric (e.g. flow depth),
    ``metric_vs_<key>.png`` (the figures' metric — by default the test NLL, or the ELBO
    when no NLL was computed — vs that key, std error bars, one line per combination of
    the other keys); and when two or more keys define the groups, ``heatmap.png`` (the
    same metric as a grid, e.g. prior x posterior).

    Returns:
        ``{"markdown", "json", "learning_curves", "metric_vs_key", "heatmap"}`` -> path,
        for the files written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Temps of an interrupted earlier report; only its own files (out may be shared).
    remove_stale_temps(out, final_names={"results.md", "results.json"})
    records = collect(run_dirs)
    groups = group(records, by)
    keys = list(groups[0]["by"]) if groups else (list(by) if by else [])
    not_evaluated = [r["run_dir"] for r in records if r["status"] != "evaluated"]
    written: dict[str, Path] = {}
    columns = resolve_metrics(groups, metrics) if metrics is not None else None
    md = out / "results.md"
    write_text_atomic(md, to_markdown(groups, columns, not_evaluated=not_evaluated))
    written["markdown"] = md
    js = out / "results.json"
    payload = {"by": keys, "metrics": columns, "records": records, "groups": groups}
    write_text_atomic(js, json.dumps(_json_safe(payload), indent=2, default=str) + "\n")
    written["json"] = js
    curves = out / "learning_curves.png"
    if _learning_curves(records, keys, curves):
        written["learning_curves"] = curves
    metric = columns[0] if columns else _nll_metric(groups)
    numeric = [k for k in keys if all(_is_number(g["config"][k]) for g in groups)]
    if metric is not None and numeric:
        key = numeric[0]
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", key)
        path = out / f"metric_vs_{safe}.png"
        _metric_vs_key(groups, key, metric, path, [k for k in keys if k != key])
        written["metric_vs_key"] = path
    if metric is not None and len(keys) >= 2:
        path = out / "heatmap.png"
        _heatmap(groups, keys, metric, path)
        written["heatmap"] = path
    return written


# ----------------------------------------------------------------------------- CLI


def _report_command(args: argparse.Namespace) -> int:
    written = write_report(args.runs, args.out, by=args.by, metrics=args.metrics)
    for name, path in written.items():
        print(f"{name:16s} {path}")
    return 0


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``report RUNS... -o OUT [--by KEY ...] [--metrics PATTERN ...]`` to an argparse
    subparsers object."""
    p = subparsers.add_parser(
        "report",
        help="results tables (markdown + JSON) and figures from run directories",
        description="Average evaluated runs over seeds and write results.md, "
        "results.json, learning_curves.png (and metric_vs_<key>.png).",
    )
    p.add_argument("runs", nargs="+", help="run directories, or directories of them")
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
    p.set_defaults(func=_report_command)
    return p
