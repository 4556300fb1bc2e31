"""Data: datasets and their files (:mod:`.datasets`), preprocessing and batches
(:mod:`.batches`). The public names are re-exported here: ``from vaeflow.data import X``.

Imports only :mod:`vaeflow.atomic` (docs/design.md §2).
"""

from .batches import (
    TrainBatches,
    binarize,
    eval_batches,
    fixed_binarize,
    fixed_seed_binarize,
    prepare_eval,
    test_subset,
    to_memory_format,
    to_unit_interval,
)
from .datasets import (
    DATASETS,
    DatasetNotFoundError,
    DatasetSpec,
    DataSplits,
    load_splits,
    pack_cifar10,
    parse_amat,
    resolve_data_root,
)

__all__ = [
    "DATASETS",
    "DataSplits",
    "DatasetNotFoundError",
    "DatasetSpec",
    "TrainBatches",
    "binarize",
    "eval_batches",
    "fixed_binarize",
    "fixed_seed_binarize",
    "load_splits",
    "pack_cifar10",
    "parse_amat",
    "prepare_eval",
    "resolve_data_root",
    "test_subset",
    "to_memory_format",
    "to_unit_interval",
]
