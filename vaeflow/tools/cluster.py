"""The ``[cluster]`` table of a sweep file: the resources each job asks of Slurm when
``vaeflow sweep SWEEP.toml --executor submitit-slurm`` submits the points.

One set of keys, in two places: the sweep file's ``[cluster]`` table (inherited through
``extends``, key by key) and ``vaeflow sweep --cluster KEY=VALUE`` (repeatable, TOML
values as ``--set``; wins over the file). Site-specific keys such as ``partition`` or
``sbatch.account`` belong on the command line, so that the experiments' sweep files stay
usable on every cluster::

    [cluster]
    timeout_min = 240        # per job (Slurm --time); a point that runs longer is
                             # requeued and continues from its checkpoint
    gpus = 1                 # per job: 0 or 1 (one point trains in one process)
    cpus_per_task = 4
    mem_gb = 16
    array_parallelism = 8    # at most this many jobs of the sweep's array run at once
    setup = ["module load cuda"]   # shell lines run before the job (sbatch script)
    sbatch = { account = "proj", qos = "normal" }  # any other #SBATCH option
    max_timeouts = 3         # requeues after hitting the time limit (preemptions: always)

Checked like the rest of the configuration (:func:`vaeflow.config.from_dict`): an
unknown key or a wrong type is a :class:`~vaeflow.config.ConfigError` naming it.
:func:`executor_parameters` turns the table into the parameters of submitit's
``AutoExecutor`` (its generic names, and ``slurm_*`` for Slurm's own); it imports no
submitit, so a sweep file is checked, and the mapping tested, without it or a cluster.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError, apply_overrides, from_dict

__all__ = [
    "EXECUTORS",
    "LOCAL_TIMEOUT_MIN",
    "ClusterConfig",
    "cluster_config",
    "executor_parameters",
]

# vaeflow sweep --executor NAME -> submitit's cluster name (None: vaeflow's own local
# subprocesses, tools/sweep.run_sweep).
EXECUTORS: dict[str, str | None] = {
    "local": None,
    "submitit-local": "local",
    "submitit-slurm": "slurm",
}

# submitit's LocalExecutor stops (and requeues) a job after timeout_min, 2 minutes unless
# told otherwise; a point on this machine gets 30 days unless [cluster] sets a limit.
LOCAL_TIMEOUT_MIN = 30 * 24 * 60

# #SBATCH options that [cluster] keys set (use those), or that submitit sets itself:
# the array and its logs under the sweep directory, and the signal that triggers the
# checkpoint-and-requeue. Compared with '-' and '_' taken as the same.
_SBATCH_OWNED = {
    "partition": "cluster.partition",
    "time": "cluster.timeout_min",
    "gpus_per_node": "cluster.gpus",
    "gres": "cluster.gpus",
    "cpus_per_task": "cluster.cpus_per_task",
    "mem": "cluster.mem_gb",
    "job_name": "the sweep's name (the job name is vaeflow-<sweep name>)",
    "array": "submitit (one job array per submission; cluster.array_parallelism)",
    "output": "submitit (logs under <sweep>/submitit/)",
    "error": "submitit (logs under <sweep>/submitit/)",
    "signal": "submitit (the preemption/time-limit signal behind the requeue)",
    "nodes": "nothing: a point is one process on one node (see the README on torchrun)",
    "ntasks_per_node": "nothing: a point is one process (see the README on torchrun)",
}


@dataclass(frozen=True)
class ClusterConfig:
    """Per-job Slurm resources of a sweep (``[cluster]``; module docstring).

    Attributes:
        partition: Slurm partition (``--partition``); ``None``: the cluster's default.
        timeout_min: time limit per job in minutes (``--time``); required on Slurm
            (submitit would otherwise ask for 5 minutes). A job that reaches it is
            requeued, and its point continues from ``checkpoints/last.pt``.
        gpus: GPUs per job, 0 or 1: a point (or a stack) trains in one process on one
            device. Several GPUs for one run means data parallelism: ``torchrun``.
        cpus_per_task: CPU cores per job (``--cpus-per-task``).
        mem_gb: memory per job in GB (``--mem``).
        array_parallelism: how many jobs of the sweep's array may run at once
            (``--array=0-N%P``); ``None``: submitit's default (256).
        setup: shell lines run in the batch script before the job (``module load``,
            ``source venv/bin/activate``).
        sbatch: any other ``#SBATCH`` option (``{account = "proj", qos = "high"}``;
            ``true`` for a bare flag); not those the keys above or submitit set.
        max_timeouts: how many times a job that hit its time limit is requeued
            (preempted jobs are requeued without limit).
    """

    partition: str | None = None
    timeout_min: int | None = None
    gpus: int = 0
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    array_parallelism: int | None = None
    setup: tuple[str, ...] = ()
    sbatch: dict[str, Any] = field(default_factory=dict)
    max_timeouts: int = 3


def cluster_config(
    table: Mapping[str, Any] | None = None, overrides: Sequence[str] = (), where: str = ""
) -> ClusterConfig:
    """Build and check a :class:`ClusterConfig` from a ``[cluster]`` table and
    ``KEY=VALUE`` overrides (``vaeflow sweep --cluster``, applied last).

    Args:
        table: the sweep file's ``[cluster]`` table (``None``: empty).
        overrides: ``key=value`` items; values are TOML (``none`` unsets a key), a
            dotted key reaches into ``sbatch`` (``sbatch.account=proj``).
        where: prefix of error messages (the sweep file).

    Raises:
        ConfigError: an unknown key, a wrong type or an out-of-range value, naming it.

    >>> cluster_config({"timeout_min": 60}, ["partition=gpu", "gpus=1"]).partition
    'gpu'
    """
    prefix = f"{where}: " if where else ""
    if table is not None and not isinstance(table, Mapping):
        raise ConfigError(f"{prefix}[cluster] must be a table of key = value")
    for item in overrides:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"--cluster expects KEY=VALUE (e.g. partition=gpu), got {item!r}")
    data = apply_overrides({"cluster": dict(table or {})}, [f"cluster.{o}" for o in overrides])
    # A key set to none (in --cluster) means "unset": the default applies.
    values = {k: v for k, v in data["cluster"].items() if v is not None}
    if isinstance(values.get("sbatch"), dict):
        values["sbatch"] = {k: v for k, v in values["sbatch"].items() if v is not None}
    try:
        cfg = from_dict(ClusterConfig, values, "cluster")
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}") from None
    for key in ("timeout_min", "cpus_per_task", "mem_gb", "array_parallelism"):
        value = getattr(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{prefix}cluster.{key} must be > 0, got {value}")
    if cfg.max_timeouts < 0:
        raise ConfigError(f"{prefix}cluster.max_timeouts must be >= 0, got {cfg.max_timeouts}")
    if cfg.gpus not in (0, 1):
        raise ConfigError(
            f"{prefix}cluster.gpus = {cfg.gpus}: a sweep point (or a stack) trains in one "
            "process on one device, so a job uses 0 or 1 GPU. To train one run on several "
            "GPUs, launch it with torchrun (README: 'Multi-GPU and multi-node training')"
        )
    for key, value in cfg.sbatch.items():
        owner = _SBATCH_OWNED.get(str(key).replace("-", "_"))
        if owner is not None:
            raise ConfigError(
                f"{prefix}cluster.sbatch.{key}: this #SBATCH option is set by {owner}; "
                "remove it from cluster.sbatch"
            )
        if not isinstance(value, (str, int, float, bool)):
            raise ConfigError(
                f"{prefix}cluster.sbatch.{key} must be a string, number or true (a bare "
                f"flag), got {type(value).__name__} {value!r}"
            )
    return cfg


def executor_parameters(cfg: ClusterConfig, executor: str, job_name: str) -> dict[str, Any]:
    """The keyword arguments of submitit's ``AutoExecutor.update_parameters`` for
    ``--executor`` ``submitit-slurm`` or ``submitit-local``.

    Generic names (``timeout_min``, ``gpus_per_node``, ...) apply to both; the
    ``slurm_*`` ones only to Slurm. The local executor gets the time limit (default
    :data:`LOCAL_TIMEOUT_MIN`) and the GPUs (it sets ``CUDA_VISIBLE_DEVICES`` to that
    many, none for 0); partition, memory and the rest mean nothing there.

    Raises:
        ConfigError: an unknown executor, or Slurm without ``timeout_min``.

    >>> p = executor_parameters(ClusterConfig(timeout_min=90, partition="gpu", gpus=1),
    ...                         "submitit-slurm", "vaeflow-x")
    >>> p["timeout_min"], p["gpus_per_node"], p["slurm_partition"]
    (90, 1, 'gpu')
    """
    kind = EXECUTORS.get(executor)
    if kind is None:
        submitit_names = [k for k, v in EXECUTORS.items() if v is not None]
        raise ConfigError(f"executor {executor!r} is not one of {submitit_names}")
    params: dict[str, Any] = {"name": job_name, "gpus_per_node": cfg.gpus}
    if kind == "local":
        params["timeout_min"] = cfg.timeout_min or LOCAL_TIMEOUT_MIN
        return params
    if cfg.timeout_min is None:
        raise ConfigError(
            "--executor submitit-slurm needs a time limit per job: set timeout_min (minutes) "
            "in the sweep's [cluster] table or pass --cluster timeout_min=MINUTES (a point "
            "that runs longer is requeued and continues from its checkpoint)"
        )
    params.update(timeout_min=cfg.timeout_min, nodes=1, tasks_per_node=1)
    if cfg.cpus_per_task is not None:
        params["cpus_per_task"] = cfg.cpus_per_task
    if cfg.mem_gb is not None:
        params["mem_gb"] = cfg.mem_gb
    if cfg.partition is not None:
        params["slurm_partition"] = cfg.partition
    if cfg.array_parallelism is not None:
        params["slurm_array_parallelism"] = cfg.array_parallelism
    if cfg.setup:
        params["slurm_setup"] = list(cfg.setup)
    if cfg.sbatch:
        params["slurm_additional_parameters"] = dict(cfg.sbatch)
    return params
