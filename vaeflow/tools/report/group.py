"""Records -> rows: evaluated runs averaged over seeds, refusing to average runs that differ
in their evaluation protocol, free-bits rule or anything but the seed (:func:`group`)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from .keys import EXCLUDED_KEYS, IMPLEMENTATION_KEYS, PROTOCOL_KEYS, _fmt_value, _sort_key


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
        ValueError: a ``by`` key no run has; a protocol key (dataset, binarization, k,
            n_examples) that differs within a group — it is named; or two runs of a
            group with the same seed (one run reported twice, not two seeds).
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
        # ... and distinct seeds: the same seed twice is one run reported twice (stored
        # under one sweep folder and re-run under another, say), not two draws.
        seen: dict[tuple[Any, Any], str] = {}
        for m in members:
            seed = (m["seed"], m["config"].get("data.batch_seed"))
            if seed in seen:
                raise ValueError(
                    f"runs {seen[seed]} and {m['run_dir']} have the same settings {config} "
                    f"and the same seed (train.seed {seed[0]}, data.batch_seed {seed[1]}): "
                    "one run reported twice, or a repeat, not two seeds; report one of them"
                )
            seen[seed] = str(m["run_dir"])
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
