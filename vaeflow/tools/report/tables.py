"""Rows -> the markdown results table with its footer (:func:`to_markdown`); metric names
-> column headers (:func:`metric_label`) and table columns (:func:`resolve_metrics`)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from .keys import PROTOCOL_KEYS, _fmt_value
from .labels import Labeller, _applies

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

    from ...run.compare import format_gap

    return [
        format_gap(paired["nll_diff_nats"], paired["nll_diff_stderr_nats"]),
        format_gap(paired["neg_elbo_diff_nats"], paired["neg_elbo_diff_stderr_nats"]),
    ]


def to_markdown(
    groups: Sequence[Mapping[str, Any]],
    metrics: Sequence[str] | None = None,
    not_evaluated: Sequence[str] = (),
    labels: Mapping[str, Any] | Labeller | None = None,
    where: Mapping[str, str] | None = None,
) -> str:
    """Render groups as a markdown table with a footer of protocol, notes and commits.

    Args:
        groups: from :func:`group`.
        metrics: metric names for the columns; default: NLL, bpd, ELBO, KL, recon,
            active units, those present.
        not_evaluated: run directories to list under the table as not evaluated (with
            "(training unfinished)" after those whose training has not ended).
        labels: a label map or :class:`Labeller` (default: :data:`READER_NAMES` and
            :data:`READER_VALUES`), the same names as the figures'.
        where: the selection the runs were reported under (``--where``), stated under
            the table: the rows are a slice of what their folders hold.

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
    if where:
        chosen = ", ".join(f"`{k}` = {v}" for k, v in where.items())
        lines += ["", f"Runs: only those with {chosen} (`vaeflow report --where`)."]
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
