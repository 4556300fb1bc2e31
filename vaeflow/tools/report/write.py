"""Reports on disk: ``results.md``, ``results.json`` and the figures from run directories
(:func:`write_report`), and the table and figures again from a ``results.json`` alone
(:func:`markdown_from_json`, :func:`render_figures_from_json`)."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...atomic import remove_stale_temps, write_text_atomic
from .collect import _read_json, collect, stored_where
from .figures import _parse_references, _save_figures, make_figures
from .group import group
from .keys import _fmt_value, value_matches
from .labels import load_labels
from .paired import add_paired_differences
from .scores import SCORES_FILE, load_kept_scores, write_kept_scores
from .tables import resolve_metrics, to_markdown


def _json_safe(obj: Any) -> Any:
    """Non-finite floats -> None so the file is standard JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


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
    keep_scores: bool | None = None,
    where: Mapping[str, str] | None = None,
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
            (:func:`add_paired_differences`). A stored row is paired when the report
            that stored it kept its per-image scores (``keep_scores``).
        keep_scores: write every evaluated run's per-image test scores to
            ``kept_scores.pt`` beside ``results.json`` (:mod:`.scores`; about 120 KB per
            run of 10,000 images), so that a later report of this one (``stored``) can
            pair its rows after their run directories are gone. ``None``: keep them
            when ``out_dir`` already has such a file or a stored report kept some, so
            that scores once kept are never dropped by a rewrite.

        where: ``{config key: value}``: report only the runs (and stored records) whose
            config holds all of them (:func:`select_records`); stated under the table.
            ``None``: the slice the ``stored`` reports were written with, if any
            (:func:`stored_where`), so a grown table stays the same slice; ``{}``: every
            run.

    Returns:
        ``{"markdown", "json", "learning_curves", "metric_vs_key", "heatmap", "scores"}``
        -> path, for the files written.
    """
    if not run_dirs and not stored:
        raise ValueError(
            "nothing to report: give run directories and/or stored results.json files"
        )
    # Read everything first: a stored results.json may be the one this report rewrites.
    label_map = _labels_arg(labels)
    refs = _parse_references(references)
    if where is None:  # a grown report keeps its slice; ``{}`` reports every run
        where = stored_where(stored)
    records = collect(run_dirs, stored, where=where)
    if where:
        where = _stated_where(records, where)
    kept = load_kept_scores(records)
    out = Path(out_dir)
    if keep_scores is None:
        keep_scores = (out / SCORES_FILE).is_file() or any(
            (Path(s).parent / SCORES_FILE).is_file() for s in stored
        )
    out.mkdir(parents=True, exist_ok=True)
    # Temps of an interrupted earlier report; only its own files (out may be shared).
    remove_stale_temps(out, final_names={"results.md", "results.json", SCORES_FILE})
    groups = group(records, by)
    if paired_against:
        stored_runs = {r["run_dir"] for r in records if r.get("stored_in")}
        add_paired_differences(groups, paired_against, stored_runs, known=kept)
    keys = list(groups[0]["by"]) if groups else (list(by) if by else [])
    not_evaluated = _not_evaluated(records)
    written: dict[str, Path] = {}
    columns = resolve_metrics(groups, metrics) if metrics is not None else None
    md = out / "results.md"
    markdown = to_markdown(
        groups, columns, not_evaluated=not_evaluated, labels=label_map, where=where
    )
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
        "where": dict(where) if where else None,
        "records": records,
        "groups": groups,
    }
    write_text_atomic(js, _results_json(payload))
    written["json"] = js
    figures = make_figures(
        records, groups, by, label_map, refs, log_x, metric=columns[0] if columns else None
    )
    written.update(_save_figures(figures, out))
    if keep_scores:
        written["scores"], left_out = write_kept_scores(out, records, kept)
        for why in left_out:
            warnings.warn(f"{written['scores']}: not kept: {why}", stacklevel=2)
    return written


def _stated_where(records: Sequence[dict[str, Any]], where: Mapping[str, str]) -> dict[str, str]:
    """``where`` as the selected runs' configs hold the values (``5e-4`` -> ``0.0005``,
    ``NONE`` -> ``None``), in text that selects them again when a later report grows
    from this one (:func:`stored_where`): a float by ``repr``, which round-trips (``:g``
    keeps 6 digits). Read from a run that still matches -- not one whose value the
    report rewrote (a no-flow run's flow length) -- or kept as given if none does."""
    stated = {}
    for key, given in where.items():
        held = [
            r["config"][key]
            for r in records
            if key in r["config"] and value_matches(r["config"][key], given)
        ]
        if not held:
            stated[key] = str(given)
        elif isinstance(held[0], float) and math.isfinite(held[0]):
            stated[key] = repr(held[0])
        else:
            stated[key] = _fmt_value(held[0])
    return stated


def markdown_from_json(results_json: str | os.PathLike[str]) -> str:
    """The ``results.md`` table that ``results_json`` (written by :func:`write_report`)
    gives with its stored labels: what a redraw writes, and what the committed table must
    be (so a table is never edited apart from its data)."""
    data = _read_json(Path(results_json))
    return _markdown_from_data(data, (data.get("figures") or {}).get("labels"))


def _not_evaluated(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The runs to list under the table as not evaluated, each saying whether its
    training ended (records from before the ``trained`` field were all trained)."""
    return [
        r["run_dir"] if r.get("trained", True) else f"{r['run_dir']} (training unfinished)"
        for r in records
        if r.get("status") != "evaluated"
    ]


def _markdown_from_data(data: dict[str, Any], labels: Any) -> str:
    not_evaluated = _not_evaluated(data["records"])
    for g in data["groups"]:
        for m in g["metrics"].values():
            if m.get("mean") is None:  # results.json writes a non-finite mean as null
                m["mean"] = math.nan
    return to_markdown(
        data["groups"],
        data.get("metrics"),
        not_evaluated=not_evaluated,
        labels=labels,
        where=data.get("where"),
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
