"""The config keys the report sets apart (implementation details, labels, the evaluation
protocol) and how a config value prints and sorts: shared by the report's other modules."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _sort_key(value: Any) -> tuple[int, float, str]:
    return (0, float(value), "") if _is_number(value) else (1, 0.0, str(value))


def _fmt_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _as_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def value_matches(value: Any, wanted: str) -> bool:
    """Whether a run's (flattened) config value is ``wanted``, as a user types it on the
    command line: numbers compared as numbers (``5e-4`` finds ``0.0005``), anything else
    as text, case-blind (``none`` finds ``None``, ``true`` finds ``True``)."""
    text = _fmt_value(value)
    if _is_number(value):
        number = _as_number(wanted)
        return number is not None and float(value) == number
    return text.lower() == str(wanted).strip().lower()


def config_matches(config: Mapping[str, Any], wanted: Mapping[str, str]) -> bool:
    """Whether ``config`` (flattened) holds every ``key: value`` of ``wanted``
    (:func:`value_matches`); a key it lacks does not match."""
    return all(k in config and value_matches(config[k], v) for k, v in wanted.items())
