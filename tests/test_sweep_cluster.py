"""Sweeps through submitit (``vaeflow sweep --executor submitit-slurm|submitit-local``):
the ``[cluster]`` table, the Slurm parameters and job array it gives (built by submitit's
own Slurm code against stand-in ``sbatch``/``sacct`` commands, so no cluster is needed),
jobs still queued from an earlier ``--no-wait`` submission, and real tiny sweeps on
submitit's local executor: the same results as the local processes, resumed points,
skipped finished points, and a preempted job requeued that continues its run."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import submitit
from submitit.core.utils import DelayedSubmission, UncompletedJobError

from vaeflow.cli import main as cli_main
from vaeflow.config import ConfigError, load_config
from vaeflow.tools import cluster as cl
from vaeflow.tools import submit as sb
from vaeflow.tools import sweep as sw

from .test_sweep import DATA_ROOT, TINY, _write_sweep

_JOB_IDS = itertools.count(7000, 100)  # fresh Slurm job ids per test (submitit caches states)


def _sweep(
    tmp_path: Path,
    body: str = "",
    root: str = "runs",
    name: str = "sweep.toml",
    extra_set: tuple[str, ...] = (),
) -> Path:
    """A 2-point sweep of tiny MNIST runs (the local-process tests' configs)."""
    return _write_sweep(
        tmp_path,
        f"""base = "base.toml"
name = "tiny"
root = {json.dumps(str(tmp_path / root))}
set = {json.dumps([*TINY, *extra_set])}
{body}
[grid]
"model.posterior.flow" = ["none", "iaf"]
""",
        name=name,
    )


# --- the [cluster] table ---------------------------------------------------------------


def test_cluster_table_extends_and_cli_overrides(tmp_path: Path) -> None:
    path = _sweep(
        tmp_path,
        '[cluster]\ntimeout_min = 240\npartition = "cpu"\nsetup = ["module load cuda"]\n'
        'sbatch = { account = "proj" }\n',
    )
    (tmp_path / "gpu.toml").write_text(
        'extends = "sweep.toml"\nname = "tiny_gpu"\n[cluster]\npartition = "gpu"\ngpus = 1\n'
    )
    child = sw.load_sweep(tmp_path / "gpu.toml")
    # Inherited key by key; the child's own keys replace the parent's.
    assert child.cluster == {
        "timeout_min": 240,
        "partition": "gpu",
        "setup": ["module load cuda"],
        "sbatch": {"account": "proj"},
        "gpus": 1,
    }
    cfg = cl.cluster_config(
        child.cluster, ["mem_gb=16", "sbatch.qos=high", "partition=none", "timeout_min=30"]
    )
    assert cfg.partition is None  # `none` unsets a key
    assert cfg.timeout_min == 30 and cfg.gpus == 1 and cfg.mem_gb == 16.0
    assert cfg.setup == ("module load cuda",)
    assert cfg.sbatch == {"account": "proj", "qos": "high"}
    assert sw.load_sweep(path).cluster["partition"] == "cpu"


@pytest.mark.parametrize(
    "table, overrides, match",
    [
        ('partitoin = "gpu"', [], r"unknown config key\(s\) cluster\.partitoin; allowed: "),
        ('timeout_min = "4h"', [], r"cluster\.timeout_min: .*'4h'"),
        ("gpus = 2", [], r"cluster\.gpus = 2: .*torchrun"),
        ("timeout_min = 0", [], r"cluster\.timeout_min must be > 0"),
        (
            'sbatch = { partition = "gpu" }',
            [],
            r"cluster\.sbatch\.partition: .*cluster\.partition",
        ),
        ('sbatch = { "cpus-per-task" = 4 }', [], r"cluster\.sbatch\.cpus-per-task"),
        ("sbatch = { array = 3 }", [], r"cluster\.sbatch\.array: .*submitit"),
        ("sbatch = { x = [1] }", [], r"cluster\.sbatch\.x must be a string"),
        ("", ["gpu=1"], r"unknown config key\(s\) cluster\.gpu"),
        ("", ["partition"], r"--cluster expects KEY=VALUE"),
    ],
)
def test_bad_cluster_keys_fail_naming_the_key(
    tmp_path: Path, table: str, overrides: list[str], match: str
) -> None:
    path = _sweep(tmp_path, f"[cluster]\n{table}\n")
    with pytest.raises(ConfigError, match=match):
        sw.run_sweep(path, executor="submitit-local", cluster=overrides)
    assert not (tmp_path / "runs").exists()  # nothing created or submitted
    if not overrides:  # a bad key in the file fails every use of it, as a grid typo does
        with pytest.raises(ConfigError, match=match):
            sw.expand(path)


def test_cluster_that_is_not_a_table_fails(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[cluster\] must be a table"):
        sw.expand(_sweep(tmp_path, 'cluster = "slurm"\n'))


def test_slurm_parameters_from_the_config() -> None:
    cfg = cl.cluster_config(
        {
            "timeout_min": 240,
            "partition": "gpu",
            "gpus": 1,
            "cpus_per_task": 4,
            "mem_gb": 16,
            "array_parallelism": 8,
            "setup": ["module load cuda"],
            "sbatch": {"account": "proj", "exclusive": True},
        }
    )
    assert cl.executor_parameters(cfg, "submitit-slurm", "vaeflow-x") == {
        "name": "vaeflow-x",
        "timeout_min": 240,
        "gpus_per_node": 1,
        "nodes": 1,
        "tasks_per_node": 1,
        "cpus_per_task": 4,
        "mem_gb": 16.0,
        "slurm_partition": "gpu",
        "slurm_array_parallelism": 8,
        "slurm_setup": ["module load cuda"],
        "slurm_additional_parameters": {"account": "proj", "exclusive": True},
    }
    # The local executor takes only what means something on this machine; its own
    # default limit (2 minutes) would cut every run short.
    assert cl.executor_parameters(cfg, "submitit-local", "n") == {
        "name": "n",
        "timeout_min": 240,
        "gpus_per_node": 1,
    }
    local = cl.executor_parameters(cl.ClusterConfig(), "submitit-local", "n")
    assert local["timeout_min"] == cl.LOCAL_TIMEOUT_MIN and local["gpus_per_node"] == 0
    with pytest.raises(ConfigError, match=r"needs a time limit per job: set timeout_min"):
        cl.executor_parameters(cl.ClusterConfig(partition="gpu"), "submitit-slurm", "n")


# --- Slurm without a cluster: submitit's Slurm code against stand-in commands --------


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``srun`` (submitit's "is this Slurm" check), ``sbatch`` (keeps each script, prints a
    new job id) and ``sacct`` (prints ``sacct.txt``) on the PATH."""
    bin_dir = tmp_path / "fake_slurm"
    bin_dir.mkdir()
    (bin_dir / "next_id").write_text(str(next(_JOB_IDS)))
    (bin_dir / "sacct.txt").write_text("JobID|State|NodeList\n")
    scripts = {
        "srun": "exit 0\n",
        "sbatch": (
            f'd="{bin_dir}"; n=$(cat "$d/next_id"); echo $((n + 1)) > "$d/next_id"\n'
            'cp "$1" "$d/sbatch_$n.sh"; echo "Submitted batch job $n"\n'
        ),
        "sacct": f'cat "{bin_dir}/sacct.txt"\n',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def _scripts(bin_dir: Path) -> list[str]:
    return [p.read_text() for p in sorted(bin_dir.glob("sbatch_*.sh"))]


def test_slurm_executor_writes_the_sbatch_options(fake_slurm: Path, tmp_path: Path) -> None:
    """The parameters go through submitit's real SlurmExecutor (its own checks) into
    the #SBATCH lines of the script it would submit."""
    cfg = cl.cluster_config(
        {"timeout_min": 240, "partition": "gpu", "gpus": 1, "cpus_per_task": 4, "mem_gb": 16},
        ["setup=['module load cuda']", "sbatch.account=proj", "max_timeouts=5"],
    )
    params = cl.executor_parameters(cfg, "submitit-slurm", "vaeflow-x")
    ex = sb.make_executor("submitit-slurm", params, cfg.max_timeouts, tmp_path / "submitit")
    slurm = ex._executor  # submitit's SlurmExecutor behind the AutoExecutor
    assert isinstance(slurm, submitit.SlurmExecutor) and slurm.max_num_timeout == 5
    text = slurm._make_submission_file_text("python -m job", "uid")
    for line in [
        "#SBATCH --partition=gpu",
        "#SBATCH --time=240",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --mem=16GB",
        "#SBATCH --account=proj",
        "#SBATCH --job-name=vaeflow-x",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --signal=USR2@90",  # the signal behind checkpoint-and-requeue
        "module load cuda",
    ]:
        assert line in text.splitlines(), (line, text)


def test_no_srun_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun, no sbatch
    path = _sweep(tmp_path, "[cluster]\ntimeout_min = 10\n")
    with pytest.raises(ConfigError, match=r"submitit-slurm: submitit cannot submit from here"):
        sw.run_sweep(path, executor="submitit-slurm")
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_slurm_job_array_no_wait_and_a_later_run(
    fake_slurm: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--no-wait: one job array, job ids in sweep.json; a local run then refuses to
    train those points twice; a later Slurm run leaves the still-running job alone,
    skips the point finished since, and submits again the one whose job ended."""
    path = _write_sweep(
        tmp_path,
        f"""base = "base.toml"
name = "arr"
root = {json.dumps(str(tmp_path / "runs"))}
set = {json.dumps(TINY)}
[cluster]
timeout_min = 30
[grid]
"model.posterior.flow" = ["none", "iaf", "planar"]
""",
    )
    first_id = int((fake_slurm / "next_id").read_text())
    statuses = sw.run_sweep(
        path, executor="submitit-slurm", wait=False, threads=1, cluster=["array_parallelism=2"]
    )
    ids = [f"{first_id}_{i}" for i in range(3)]
    assert [s["status"] for s in statuses] == ["submitted"] * 3
    assert [s["job_id"] for s in statuses] == ids
    (script,) = _scripts(fake_slurm)  # one sbatch call: a job array of three
    assert "#SBATCH --array=0-2%2" in script.splitlines()
    assert "#SBATCH --time=30" in script.splitlines()
    out = capsys.readouterr().out
    assert all(i in out for i in ids) and "--executor submitit-slurm" in out
    directory = tmp_path / "runs" / "arr"
    record = json.loads((directory / "sweep.json").read_text())
    assert record["executor"] == "submitit-slurm"
    assert [p["job_id"] for p in record["points"]] == ids
    # What each job will run: a SweepJob calling run_group on its point, with --threads.
    points = sw.expand(path)
    job = DelayedSubmission.load(Path(record["submitit_folder"]) / f"{ids[1]}_submitted.pkl")
    fn = job.function
    assert isinstance(fn, sb.SweepJob) and fn.run is sw.run_group
    assert fn.names == [points[1].name] and fn.args[1] == [points[1]]
    assert fn.args[2] == ["--threads", "1"] and fn.cwd == Path.cwd()

    with pytest.raises(ConfigError, match=rf"submitted to Slurm \(job {ids[0]}.*scancel"):
        sw.run_sweep(path, jobs=2)  # the local executor cannot see Slurm's jobs
    with pytest.raises(ConfigError, match=r"submitted to Slurm"):
        sw.run_sweep(path, executor="submitit-local")

    (fake_slurm / "sacct.txt").write_text(
        f"JobID|State|NodeList\n{ids[0]}|RUNNING|n1\n{ids[1]}|FAILED|n2\n{ids[2]}|COMPLETED|n3\n"
    )
    points[2].run_dir.mkdir(parents=True)
    (points[2].run_dir / "summary.json").write_text("{}")  # finished since
    again = sw.run_sweep(path, executor="submitit-slurm", wait=False)
    assert [(s["status"], s["job_id"]) for s in again] == [
        ("submitted", ids[0]),  # still running: waited for, not submitted twice
        ("submitted", str(first_id + 1)),  # its job failed: a new job (alone, no array)
        ("skipped", None),
    ]
    assert len(_scripts(fake_slurm)) == 2
    # The CLI's exit status: 0 when every point is finished or submitted.
    parser = argparse.ArgumentParser()
    sw.add_sweep_parser(parser.add_subparsers())
    args = parser.parse_args(["sweep", str(path), "--executor", "submitit-slurm", "--no-wait"])
    assert args.func(args) == 0


def test_stacks_are_one_job_each(fake_slurm: Path, tmp_path: Path) -> None:
    """--stack N: a stack of points is one job (vaeflow train-stack), a point left
    alone is a job of its own; all in one array."""
    path = _write_sweep(
        tmp_path,
        f"""base = "base.toml"
name = "seeds"
root = {json.dumps(str(tmp_path / "runs"))}
set = {json.dumps(TINY)}
seeds = [0, 1, 2]
[cluster]
timeout_min = 30
""",
    )
    statuses = sw.run_sweep(path, executor="submitit-slurm", wait=False, stack=2)
    first = int((fake_slurm / "next_id").read_text()) - 1
    assert [s["job_id"] for s in statuses] == [f"{first}_0", f"{first}_0", f"{first}_1"]
    assert "#SBATCH --array=0-1%2" in _scripts(fake_slurm)[0].splitlines()
    assert statuses[0]["command"].startswith(f"vaeflow train-stack {path} seed=0 seed=1")
    folder = Path(json.loads((tmp_path / "runs/seeds/sweep.json").read_text())["submitit_folder"])
    stacked = DelayedSubmission.load(folder / f"{first}_0_submitted.pkl").function
    assert stacked.names == ["seed=0", "seed=1"] and stacked.run is sw.run_group


def _where(*args: object, note: str | None = None) -> dict[str, dict[str, object]]:
    return {"p": {"cwd": os.getcwd(), "args": args, "note": note}}


def test_sweep_job_runs_in_the_sweep_directory_and_requeues_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job runs from the directory the sweep was started in (the points' relative
    paths), whatever directory the scheduler starts it in; checkpoint() resubmits the
    same job, whose next attempt says it was requeued (and appends to the log)."""
    job = sb.SweepJob(_where, ("a", 1), ["p"], tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    first = job()["p"]
    assert first == {"cwd": str(tmp_path), "args": ("a", 1), "note": None}
    resubmitted = job.checkpoint()
    assert isinstance(resubmitted, DelayedSubmission) and resubmitted.function is job
    monkeypatch.chdir(elsewhere)
    note = resubmitted.result()["p"]["note"]
    assert note is not None and note.startswith("requeued by the scheduler (1x")


def test_a_job_that_ends_without_a_result_fails_its_points() -> None:
    """Killed, out of memory, timed out once too often: submitit has no result."""

    class Ended:
        job_id = "9_0"

        class paths:  # noqa: N801 - submitit's attribute
            stderr = Path("x/9_0_0_log.err")

        def done(self) -> bool:
            return True

        def result(self) -> None:
            raise UncompletedJobError("Job 9_0 has not produced any output\nstate: OUT_OF_MEMORY")

    ((job, results),) = list(sb.wait_for([(Ended(), ["a", "b"])], poll_s=0))
    assert job.job_id == "9_0"
    assert {r["status"] for r in results.values()} == {"failed"} and list(results) == ["a", "b"]
    assert results["a"]["returncode"] is None and "OUT_OF_MEMORY" in results["a"]["error"]


# --- options and installation -----------------------------------------------------------


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--executor", "submitit-local", "--jobs", "2"], r"array_parallelism"),
        (["--cluster", "partition=gpu"], r"--cluster sets the jobs' resources"),
        (["--no-wait"], r"--no-wait is for --executor submitit-slurm"),
        (["--executor", "submitit-local", "--no-wait"], r"--no-wait is for"),
        (["--executor", "submitit-slurm", "--commands-file", "c.txt"], r"--commands-file"),
    ],
)
def test_options_that_do_not_go_together_are_refused(
    tmp_path: Path, argv: list[str], match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _sweep(tmp_path)
    assert cli_main(["sweep", str(path), *argv]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


def test_missing_submitit_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import vaeflow.tools

    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` now fails
    monkeypatch.delitem(sys.modules, "vaeflow.tools.submit")
    monkeypatch.delattr(vaeflow.tools, "submit")
    path = _sweep(tmp_path)
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[cluster\]"'):
        sw.run_sweep(path, executor="submitit-local")
    assert cli_main(["sweep", str(path), "--executor", "submitit-local"]) == 2
    assert 'pip install -e ".[cluster]"' in capsys.readouterr().err
    # The local executor needs no submitit.
    assert sw.run_sweep(path, dry_run=True)[0]["status"] == "pending"


# --- real tiny sweeps on submitit's local executor ---------------------------------------


def _compare(local: dict, cluster: dict, local_root: Path, cluster_root: Path) -> None:
    """Two sweep.json records of the same sweep under two roots: same points, outcome and
    commands (but for the root), and the same test metrics in every run's summary."""
    assert [p["name"] for p in local["points"]] == [p["name"] for p in cluster["points"]]
    for a, b in zip(local["points"], cluster["points"], strict=True):
        assert (a["status"], a["returncode"]) == (b["status"], b["returncode"]) == ("finished", 0)
        assert [o.replace(str(local_root), "") for o in a["overrides"]] == [
            o.replace(str(cluster_root), "") for o in b["overrides"]
        ]
        sa = json.loads((Path(a["run_dir"]) / "summary.json").read_text())
        sb_ = json.loads((Path(b["run_dir"]) / "summary.json").read_text())
        metrics = [k for k in sa if k.startswith("test/") and "seconds" not in k]
        assert metrics and {k: sa[k] for k in metrics} == {k: sb_[k] for k in metrics}


def test_submitit_local_sweep_matches_local_processes_resumes_and_skips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same tiny sweep as local processes and as submitit jobs: the same points,
    finished, with the same test metrics. One point of the submitit sweep was
    interrupted before (a checkpoint, no summary): its job continues it with --resume,
    to the same result. Submitting again starts no job."""
    assert (Path(DATA_ROOT) / "MNIST").exists(), f"MNIST not found under {DATA_ROOT}"
    # A checkpoint every step, so that a run stopped after step 2 can be continued
    # (it changes what is saved, not what is computed).
    every = ("train.ckpt_every=1",)
    local_path = _sweep(tmp_path, root="local", name="local.toml", extra_set=every)
    cluster_path = _sweep(tmp_path, root="cluster", name="cluster.toml", extra_set=every)
    reference = sw.run_sweep(local_path, jobs=2, threads=1)
    assert [s["status"] for s in reference] == ["finished", "finished"]

    # Interrupt one point of the submitit sweep after 2 of its 5 steps.
    from vaeflow.run.train import train

    iaf = sw.expand(cluster_path)[1]
    summary = train(load_config(iaf.base, iaf.overrides), iaf.run_dir, stop_after_step=2)
    assert summary["step"] == 2 and sw.needs_resume(iaf)

    statuses = sw.run_sweep(cluster_path, executor="submitit-local", threads=1)
    logs = [Path(s["log"]).read_text()[-2000:] for s in statuses]
    assert [s["status"] for s in statuses] == ["finished", "finished"], logs
    assert all(s["job_id"] for s in statuses)
    log_lines = Path(statuses[1]["log"]).read_text().splitlines()
    commands = [line for line in log_lines if line.startswith("$ ")]
    assert len(commands) == 1 and " --resume" in commands[0]
    local = json.loads((tmp_path / "local" / "tiny" / "sweep.json").read_text())
    record = json.loads((tmp_path / "cluster" / "tiny" / "sweep.json").read_text())
    assert record["executor"] == "submitit-local" and local["executor"] == "local"
    _compare(local, record, tmp_path / "local", tmp_path / "cluster")
    folder = Path(record["submitit_folder"])
    assert folder == (tmp_path / "cluster" / "tiny" / "submitit").resolve()
    assert {p.name for p in folder.glob("*_log.out")} == {
        f"{s['job_id']}_0_log.out" for s in statuses
    }

    def no_submit(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished point was submitted again")

    monkeypatch.setattr(submitit.AutoExecutor, "submit", no_submit)
    again = sw.run_sweep(cluster_path, executor="submitit-local")
    assert [s["status"] for s in again] == ["skipped", "skipped"]
    assert cli_main(["sweep", str(cluster_path), "--executor", "submitit-local"]) == 0


def test_preempted_job_is_requeued_and_continues_its_run(tmp_path: Path) -> None:
    """Slurm's preemption signal (USR2) to a running job: submitit calls
    SweepJob.checkpoint and requeues it (the local executor restarts it), and the new
    attempt continues the run from its checkpoint with --resume."""
    steps = ["train.steps=2000", "train.ckpt_every=100", "train.val_every=2000"]
    overrides = [t for t in TINY if not t.startswith(("train.steps", "train.val_every"))] + steps
    path = _write_sweep(
        tmp_path,
        f"""base = "base.toml"
name = "long"
root = {json.dumps(str(tmp_path / "runs"))}
set = {json.dumps(overrides)}
[grid]
"model.posterior.flow" = ["none"]
""",
    )
    (point,) = sw.expand(path)
    folder = str((tmp_path / "runs" / "long" / "submitit").resolve())
    signalled: list[int] = []

    def preempt() -> None:
        """Once the run has a checkpoint, signal the job's process (found by its folder)."""
        deadline = time.time() + 300
        while not (point.run_dir / "checkpoints" / "last.pt").exists():
            if time.time() > deadline:
                return
            time.sleep(0.02)
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            except OSError:
                continue
            if "submitit.core._submit" in argv and folder in argv:
                os.kill(int(pid), signal.SIGUSR2)
                signalled.append(int(pid))

    thread = threading.Thread(target=preempt, daemon=True)
    thread.start()
    (status,) = sw.run_sweep(path, executor="submitit-local", threads=1)
    thread.join(timeout=5)
    log = Path(status["log"]).read_text()
    assert len(signalled) == 1, log[-2000:]
    assert status["status"] == "finished", log[-2000:]
    commands = [line for line in log.splitlines() if line.startswith("$ ")]
    assert len(commands) == 2  # the first attempt's log is kept
    assert " --resume" not in commands[0] and commands[1].endswith("--resume --threads 1")
    assert "# requeued by the scheduler (1x" in log
    job_log = (Path(folder) / f"{status['job_id']}_0_log.out").read_text()
    assert "Calling checkpoint method" in job_log and "Requeued job" in job_log
    summary = json.loads((point.run_dir / "train_summary.json").read_text())
    assert summary["step"] == 2000 and summary["status"] == "completed"
