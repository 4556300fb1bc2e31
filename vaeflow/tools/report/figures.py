"""Records and rows -> matplotlib figures: series styles (:func:`series_styles`), learning
curves, metric vs key, heat map, and the report's set of them (:func:`make_figures`)."""

from __future__ import annotations

import math
import re
import statistics
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .group import _varying_keys
from .keys import _fmt_value, _is_number, _sort_key
from .labels import _SEP, Labeller, _applies
from .tables import metric_label

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
    the axes; the keys that are the same in every run go into the title; a group with a
    run whose training has not ended (``trained`` false) says "(training unfinished)".
    The x axis is in epochs when every run knows its batch size and training-set size,
    else in steps.
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
    # A run still training (or killed) stops short: said in its legend entry, so its
    # curve is not read as a finished run's (records from before the field were trained).
    names = [
        f"{n} (training unfinished)" if any(m.get("trained") is False for m in ms) else n
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
