"""vaeflow: variational autoencoders with normalizing flows, exact and tested.

The package is layered (docs/design.md §2), and its folders say so:

- :mod:`vaeflow.layers`, :mod:`vaeflow.config`, :mod:`vaeflow.atomic`: bottom modules;
- :mod:`vaeflow.flows`: the flow library, usable on its own (imports only layers);
- :mod:`vaeflow.models`: networks, posteriors, priors, likelihoods, the VAE, bounds, build;
- :mod:`vaeflow.data`: datasets, preprocessing and batches;
- :mod:`vaeflow.run`: training loop, evaluation, checkpoints, logs;
- :mod:`vaeflow.tools`: sweeps, reports, toy densities; :mod:`vaeflow.cli` on top.

The public API is re-exported here (``from vaeflow import train, build_model, VAE``), so
user code does not depend on file names. The re-exports are lazy: ``import vaeflow``
imports no torch until one of them is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS: dict[str, str] = {
    # config
    "Config": "vaeflow.config",
    "ConfigError": "vaeflow.config",
    "load_config": "vaeflow.config",
    # flows
    "Transform": "vaeflow.flows",
    "FlowDensity": "vaeflow.flows",
    "FLOWS": "vaeflow.flows",
    "build_flow": "vaeflow.flows",
    # models
    "VAE": "vaeflow.models.vae",
    "BottomUpVAE": "vaeflow.models.hierarchy",
    "TopDownVAE": "vaeflow.models.topdown",
    "Terms": "vaeflow.models.bounds",
    "elbo": "vaeflow.models.bounds",
    "iwae": "vaeflow.models.bounds",
    "nats_to_bits_per_dim": "vaeflow.models.bounds",
    "build_model": "vaeflow.models.build",
    "build_encoder": "vaeflow.models.networks",
    "build_decoder": "vaeflow.models.networks",
    "PRIORS": "vaeflow.models.priors",
    "build_prior": "vaeflow.models.priors",
    "LIKELIHOODS": "vaeflow.models.likelihoods",
    "build_likelihood": "vaeflow.models.likelihoods",
    # data
    "DATASETS": "vaeflow.data",
    "DataSplits": "vaeflow.data",
    "load_splits": "vaeflow.data",
    # run
    "train": "vaeflow.run.train",
    "TrainingDiverged": "vaeflow.run.train",
    "evaluate_run": "vaeflow.run.evaluate",
    "load_run": "vaeflow.run.evaluate",
    "sample_run": "vaeflow.run.evaluate",
    "read_metrics": "vaeflow.run.logger",
    # tools
    "run_sweep": "vaeflow.tools.sweep",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vaeflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
