"""``vaeflow report``: its argument parser (:func:`add_report_parser`) and command."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .figures import REFERENCE_KINDS, _parse_references
from .write import render_figures_from_json, write_report


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
        if args.where or args.no_where:
            raise SystemExit(
                "vaeflow report: error: --where/--no-where choose runs, and a redraw of one "
                "results.json has no runs to choose: it keeps the slice it was written "
                "with; to report another slice, give --from-report "
                f"{args.runs[0]} --where ..."
            )
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
        paired_against=(
            _key_values(args.paired_against, "--paired-against") if args.paired_against else None
        ),
        keep_scores=args.keep_scores,
        where=_where_from_args(args),
    )


def _where_from_args(args: argparse.Namespace) -> dict[str, str] | None:
    """``--where`` as a mapping; ``{}`` for ``--no-where`` (every run, not the slice of a
    --from-report report); ``None`` when neither is given (that slice, if any)."""
    if args.where and args.no_where:
        raise ValueError("--where and --no-where contradict each other; give one")
    if args.no_where:
        return {}
    return _key_values(args.where, "--where") if args.where else None


def _key_values(items: Sequence[str], option: str) -> dict[str, str]:
    """``["key=value", ...]`` -> ``{key: value}``; a malformed item is an error."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{option} takes KEY=VALUE items, got {item!r}")
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
        "images all runs scored (needs the run directories' test_scores.pt, or the "
        "scores a --from-report report kept: --keep-scores)",
    )
    p.add_argument(
        "--where",
        nargs="+",
        metavar="KEY=VALUE",
        help="report only the runs whose config holds every KEY=VALUE (values as the "
        "configs hold them, case-blind): a slice of a sweep's folder, e.g. the runs on "
        "one setting; stated under the table. A report grown from --from-report "
        "reports keeps the slice they were written with (given here, --where replaces "
        "it); reports of different slices need --where or --no-where",
    )
    p.add_argument(
        "--no-where",
        action="store_true",
        help="report every run, not the --where slice a --from-report report was written with",
    )
    p.add_argument(
        "--keep-scores",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also write every run's per-image test scores (kept_scores.pt, about 120 KB "
        "per 10,000 images) beside results.json, so that a later --from-report of this "
        "report can still pair its rows (--paired-against) without their run directories; "
        "on by itself where OUT or a --from-report report already keeps them "
        "(--no-keep-scores: never)",
    )
    p.set_defaults(func=_report_command)
    return p
