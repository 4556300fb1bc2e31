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
their learning curves -- marked "(training unfinished)" for a run whose
training has not ended (no ``train_summary.json`` that reaches ``train.steps`` or
stopped early), whose curve stops short. Numbers measured under different
protocols (dataset, binarisation, importance samples ``k``, number of test examples)
are never averaged: :func:`group` raises ``ValueError`` naming the key instead.

Figures are for a reader who sees only ``results/``: one line per group of seeds (mean
and a min-max band), legends that name what varies in a reader's words
(``"posterior: IAF · prior: RealNVP"``, :class:`Labeller`, overridable per experiment
with a label map), the keys that do not vary once in the title, no two series styled
alike (:func:`series_styles`), legends outside the axes, axis labels with units and the
direction of better, and a paper's reported NLLs as dashed reference lines. The learning
curves are stored in ``results.json``, so :func:`render_figures_from_json` redraws the
figures without the run directories.

The package's modules, one job each; a module imports only those above it here:

- ``keys``: the config keys set apart (:data:`IMPLEMENTATION_KEYS`,
  :data:`EXCLUDED_KEYS`, :data:`PROTOCOL_KEYS`) and how a config value prints and sorts.
- ``collect``: run directories and stored ``results.json`` records -> records
  (:func:`collect`, :func:`load_stored_records`, :func:`gain_last_doubling`), and a
  slice of them by config values (:func:`select_records`).
- ``group``: records -> rows averaged over seeds, protocol checked (:func:`group`).
- ``labels``: a reader's names for keys and values (:class:`Labeller`,
  :class:`LabelPlan`, :data:`READER_NAMES`, :data:`READER_VALUES`, :func:`load_labels`).
- ``tables``: rows -> the markdown table (:func:`to_markdown`, :func:`metric_label`,
  :func:`resolve_metrics`).
- ``figures``: series styles and figures (:func:`series_styles`, :func:`make_figures`).
- ``paired``: paired per-image differences from a reference row
  (:func:`add_paired_differences`).
- ``scores``: per-image test scores kept beside a report, so that its stored rows pair
  without their run directories (:func:`load_kept_scores`, :func:`write_kept_scores`).
- ``write``: ``results.md``, ``results.json`` and figures on disk, and redrawn from
  ``results.json`` (:func:`write_report`, :func:`render_figures_from_json`,
  :func:`markdown_from_json`).
- ``cli``: ``vaeflow report`` (:func:`add_report_parser`).

Every name of ``__all__`` is importable from here.
"""

from __future__ import annotations

from .cli import add_report_parser
from .collect import (
    EXPECTED_FILES,
    collect,
    gain_last_doubling,
    load_stored_records,
    select_records,
)
from .figures import (
    REFERENCE_KINDS,
    ZOOM_FROM,
    heatmap_figure,
    learning_curves_figure,
    make_figures,
    metric_vs_key_figure,
    series_styles,
)
from .group import group
from .keys import EXCLUDED_KEYS, IMPLEMENTATION_KEYS, PROTOCOL_KEYS
from .labels import READER_NAMES, READER_VALUES, TITLE_KEYS, Labeller, LabelPlan, load_labels
from .paired import add_paired_differences
from .scores import SCORES_FILE, load_kept_scores, write_kept_scores
from .tables import metric_label, resolve_metrics, to_markdown
from .write import markdown_from_json, render_figures_from_json, write_report

__all__ = [
    "EXCLUDED_KEYS",
    "EXPECTED_FILES",
    "IMPLEMENTATION_KEYS",
    "PROTOCOL_KEYS",
    "READER_NAMES",
    "READER_VALUES",
    "REFERENCE_KINDS",
    "SCORES_FILE",
    "TITLE_KEYS",
    "ZOOM_FROM",
    "LabelPlan",
    "Labeller",
    "add_paired_differences",
    "add_report_parser",
    "collect",
    "gain_last_doubling",
    "group",
    "heatmap_figure",
    "learning_curves_figure",
    "load_kept_scores",
    "load_labels",
    "load_stored_records",
    "make_figures",
    "markdown_from_json",
    "metric_label",
    "metric_vs_key_figure",
    "render_figures_from_json",
    "resolve_metrics",
    "select_records",
    "series_styles",
    "to_markdown",
    "write_kept_scores",
    "write_report",
]
