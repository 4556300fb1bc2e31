"""What TensorBoard's dashboards will show first, computed by TensorBoard's own code.

Tests read a log directory back through TensorBoard's event multiplexer, its data
provider and the HParams plugin's backend (``backend_context.Context``), then apply the
two orderings the 2.21 frontend adds (read from its bundled ``index.js``):

* HParams table: the experiment's columns after the backend's sort, then a stable sort
  putting ``differs`` first (``_computeHParams``); the first five hyperparameters and
  the first five metrics are shown, the rest sit behind checkboxes.
* SCALARS and TIME SERIES: all tags in TensorBoard's natural order (``compareTagNames``,
  here approximated by a plain sort, which agrees for the lower-case tags vaeflow
  writes), grouped by the part before the first ``/`` in that order.
"""

from __future__ import annotations

from pathlib import Path

from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import backend_context

SHOWN = 5  # columns of each kind the HParams dashboard displays before any click


def _provider(logdir: Path) -> data_provider.MultiplexerDataProvider:
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    return data_provider.MultiplexerDataProvider(multiplexer, str(logdir))


def hparams_table(logdir: Path) -> tuple[list[str], list[str]]:
    """The HParams table's (hyperparameter columns, metric columns), in the order the
    dashboard lays them out, for ``tensorboard --logdir logdir``."""
    ctx = backend_context.Context(base_plugin.TBContext(data_provider=_provider(logdir)))
    request = context.RequestContext()
    experiment = ctx.experiment_from_metadata(
        request,
        "",
        include_metrics=True,
        hparams_run_to_tag_to_content=ctx.hparams_metadata(request, ""),
        data_provider_hparams=ctx.hparams_from_data_provider(request, "", limit=None),
    )
    infos = sorted(experiment.hparam_infos, key=lambda info: not info.differs)  # stable
    return [i.name for i in infos], [m.name.tag for m in experiment.metric_infos]


def experiment_runs(logdir: Path) -> list[str]:
    """The runs under ``logdir`` that carry an HParams experiment (TensorBoard uses the
    first it finds, in no defined order: there should be exactly one)."""
    ctx = backend_context.Context(base_plugin.TBContext(data_provider=_provider(logdir)))
    metadata = ctx.hparams_metadata(context.RequestContext(), "")
    return sorted(run for run, tags in metadata.items() if "_hparams_/experiment" in tags)


def tag_groups(logdir: Path) -> list[str]:
    """The SCALARS tab's tag groups, top to bottom."""
    provider = _provider(logdir)
    scalars = provider.list_scalars(
        context.RequestContext(), experiment_id="", plugin_name="scalars"
    )
    tags = sorted({tag for run in scalars.values() for tag in run})
    return list(dict.fromkeys(tag.split("/", 1)[0] for tag in tags))
