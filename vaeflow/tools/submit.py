"""Sweep points as submitit jobs: ``vaeflow sweep SWEEP.toml --executor submitit-slurm``
(one Slurm job per point, or per ``--stack`` group, submitted as one job array), or
``--executor submitit-local`` (the same jobs as processes on this machine, all at once).

The scheduling, the job arrays, the signals and the requeueing are submitit's
(https://github.com/facebookincubator/submitit); this module only says what a job runs.
Its function, :class:`SweepJob`, calls what the local path calls
(:func:`vaeflow.tools.sweep.run_group`: a subprocess ``python -m vaeflow train ...`` or
``train-stack``, training then evaluating, log in ``<sweep>/logs/``), from the directory
the sweep was started in; submitit's own files (pickled job and result, ``sbatch``
script, the job's stdout/stderr) go to ``<sweep>/submitit/`` (``<job id>_0_log.out``,
``<job id>_0_log.err``, ...).

Preemption and time limits: Slurm signals the job (USR2, 90 s before its limit),
submitit calls :meth:`SweepJob.checkpoint` and requeues the job. Nothing of the run is
kept in the job: the run directory holds it (``checkpoints/last.pt``), and the requeued
job builds its command afresh, which then continues the run with ``--resume``. What is
lost is the training since the last checkpoint (``train.ckpt_every``).

:func:`reattach` finds the jobs of an earlier submission that are still queued or running
(the job ids in ``sweep.json``), so that running the sweep again waits for them instead
of starting their points a second time.

Imports submitit (and of vaeflow only :mod:`~vaeflow.tools.cluster` and the config
error); :mod:`vaeflow.tools.sweep` imports this module only for the submitit executors
(``pip install -e ".[cluster]"``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from submitit import AutoExecutor, Job, SlurmJob
from submitit.core.utils import UncompletedJobError
from submitit.helpers import Checkpointable, DelayedSubmission, as_completed

from ..config import ConfigError
from .cluster import EXECUTORS

__all__ = ["SweepJob", "make_executor", "submit_groups", "reattach", "wait_for"]


class SweepJob(Checkpointable):
    """One submitit job: ``run(*args, note=...)`` in ``cwd``, requeued on preemption.

    :mod:`vaeflow.tools.sweep` makes one per point or stack with
    ``run = sweep.run_group`` (train and evaluate as the local path does; returns
    ``{point name: result}``). It is pickled by submitit, so ``run`` must be a
    module-level function (pickled by reference).

    Args:
        run: the function the job calls.
        args: its positional arguments.
        names: the names of the points it trains (for the caller's records).
        cwd: the directory the sweep was started in; the points' paths (base config,
            run directory, data root) may be relative to it.
    """

    def __init__(
        self,
        run: Callable[..., dict[str, dict[str, Any]]],
        args: Sequence[Any],
        names: Sequence[str],
        cwd: str | Path,
    ) -> None:
        self.run = run
        self.args = tuple(args)
        self.names = list(names)
        self.cwd = Path(cwd)
        self.requeues = 0

    def __call__(self) -> dict[str, dict[str, Any]]:
        # Slurm starts a job in the submitting directory too, but a relative run
        # directory must not depend on that.
        os.chdir(self.cwd)
        note = None
        if self.requeues:
            note = (
                f"requeued by the scheduler ({self.requeues}x: preempted or at its time "
                "limit); the command is rebuilt, so a checkpointed run continues"
            )
        return self.run(*self.args, note=note)

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """Called by submitit in the job when Slurm signals a preemption or the time
        limit: requeue this same job. The run's state is its run directory, so only
        the attempt count changes (the next attempt then appends to the log)."""
        self.requeues += 1
        return super().checkpoint(*args, **kwargs)


def make_executor(
    executor: str, parameters: Mapping[str, Any], max_timeouts: int, folder: str | Path
) -> AutoExecutor:
    """submitit's ``AutoExecutor`` for ``submitit-slurm``/``submitit-local`` with the
    :func:`vaeflow.tools.cluster.executor_parameters`; its files go to ``folder``.

    ``AutoExecutor(cluster="slurm")`` needs Slurm's ``srun`` on the PATH (submitit's
    check); the error then says so.
    """
    kind = EXECUTORS[executor]
    assert kind is not None, executor
    try:
        ex = AutoExecutor(folder=folder, cluster=kind, **{f"{kind}_max_num_timeout": max_timeouts})
    except RuntimeError as e:  # submitit: 'Could not detect "srun", ...'
        raise ConfigError(
            f"--executor {executor}: submitit cannot submit from here ({e}); run the sweep "
            "on a machine of the cluster (a login node), or use --executor submitit-local "
            "or local"
        ) from None
    ex.update_parameters(**parameters)
    return ex


def submit_groups(ex: AutoExecutor, jobs: Sequence[SweepJob]) -> list[Job]:
    """Submit the jobs as one job array (``ex.batch()``); returns submitit's job
    handles in the same order."""
    if not jobs:
        return []  # an empty batch() only warns
    with ex.batch():
        handles = [ex.submit(job) for job in jobs]
    return handles


def reattach(records: Mapping[str, Mapping[str, Any]], folder: str | Path) -> dict[str, Job]:
    """The Slurm jobs of an earlier submission still queued or running, by point name.

    Args:
        records: point name -> its entry in the earlier ``sweep.json`` (``job_id``).
        folder: that submission's submitit folder (``<sweep>/submitit``).

    A job is done when its result file exists or Slurm (``sacct``) says it ended; a
    point whose job is done but whose run is not finished is submitted again.
    """
    jobs: dict[str, Job] = {}
    # All registered before the first state query: submitit's watcher then asks sacct
    # once for all of them, not once per job.
    for record in records.values():
        job_id = str(record["job_id"])
        if job_id not in jobs:
            jobs[job_id] = SlurmJob(folder=folder, job_id=job_id)
    active = {job_id for job_id, job in jobs.items() if not job.done()}
    return {
        name: jobs[str(r["job_id"])] for name, r in records.items() if str(r["job_id"]) in active
    }


def wait_for(
    jobs: Sequence[tuple[Job, Sequence[str]]], poll_s: float = 1.0
) -> Iterator[tuple[Job, dict[str, dict[str, Any]]]]:
    """Yield each job, with its points' results, as it ends (in the order they end).

    A job that raised or ended without a result (killed, out of memory, cancelled,
    timed out once too often) gives each of its points ``status = "failed"``,
    ``returncode = None`` and the end of submitit's error message in ``error``.
    """
    names = {id(job): list(n) for job, n in jobs}
    for job in as_completed([job for job, _ in jobs], poll_frequency=poll_s):
        try:
            results = job.result()
        except UncompletedJobError as e:
            tail = "\n".join(str(e).strip().splitlines()[-20:])
            results = {
                name: {
                    "status": "failed",
                    "returncode": None,
                    "error": tail,
                    "log": str(job.paths.stderr),
                }
                for name in names[id(job)]
            }
        yield job, results
