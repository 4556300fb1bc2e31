"""Sweep runner: expansion, up-front validation, shell-safe commands, resumable runs."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
from pathlib import Path

import pytest

from vaeflow.cli import build_parser
from vaeflow.config import ConfigError, load_config
from vaeflow.tools import sweep as sw

from .tensorboard_view import experiment_runs, hparams_table

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "experiments" / "quickstart" / "mnist_iaf_flowprior.toml"
DATA_ROOT = os.environ.get("VAEFLOW_DATA") or str(REPO.parent / "shared" / "datasets")

TINY = [
    f"data.root={json.dumps(DATA_ROOT)}",
    "model.latent_dim=4",
    "model.encoder.options={hidden=[16]}",
    "model.decoder.options={hidden=[16]}",
    'model.prior.name="standard_normal"',
    "model.prior.flow=none",
    "train.steps=5",
    "train.val_every=5",
    "train.val_size=50",
    "train.val_k=2",
    'train.device="cpu"',
    "eval.k=4",
    "eval.chunk=4",
    "eval.n_test=20",
    "eval.batch_size=10",
]


def _write_sweep(tmp_path: Path, body: str, name: str = "sweep.toml") -> Path:
    """A base config (quickstart copy) and a sweep file next to it; returns the sweep."""
    shutil.copy(QUICKSTART, tmp_path / "base.toml")
    path = tmp_path / name
    path.write_text(body)
    return path


def _grid_sweep(tmp_path: Path, extra: str = "") -> Path:
    root = json.dumps(str(tmp_path / "runs"))
    return _write_sweep(
        tmp_path,
        f"""base = "base.toml"
name = "iaf_depth"
root = {root}
seeds = [0, 1]
set = ["train.steps=7"]
{extra}
[grid]
"model.posterior.flow" = ["iaf", "gated_iaf"]
"model.posterior.num_layers" = [1, 2, 4]
""",
    )


def test_expand_order_count_names_overrides(tmp_path: Path) -> None:
    points = sw.expand(_grid_sweep(tmp_path))
    assert len(points) == 2 * 3 * 2
    assert [p.name for p in points[:4]] == [
        "posterior.flow=iaf__posterior.num_layers=1__seed=0",
        "posterior.flow=iaf__posterior.num_layers=1__seed=1",
        "posterior.flow=iaf__posterior.num_layers=2__seed=0",
        "posterior.flow=iaf__posterior.num_layers=2__seed=1",
    ]
    assert points[-1].name == "posterior.flow=gated_iaf__posterior.num_layers=4__seed=1"
    assert len({p.name for p in points}) == len(points)
    p = points[3]
    assert p.overrides[0] == "train.steps=7"
    assert 'model.posterior.flow="iaf"' in p.overrides
    assert "model.posterior.num_layers=2" in p.overrides
    assert "train.seed=1" in p.overrides
    assert p.overrides[-1] == f'run.name="{p.name}"'
    assert p.run_dir == tmp_path / "runs" / "iaf_depth" / p.name
    cfg = load_config(p.base, p.overrides)
    assert cfg.model.posterior.flow == "iaf"
    assert cfg.model.posterior.num_layers == 2
    assert cfg.train.seed == 1 and cfg.train.steps == 7
    assert cfg.data.seed == 0  # data seed stays as in the base config: the same test bits
    assert cfg.data.batch_seed == 1  # ... while the seed varies the training batches
    assert Path(cfg.run.root) / cfg.run.name == p.run_dir
    assert not (tmp_path / "runs").exists()  # expanding creates nothing


@pytest.mark.parametrize("where", ["set", "grid"])
def test_a_sweep_that_sets_the_batch_seed_keeps_it(tmp_path: Path, where: str) -> None:
    """data.batch_seed follows each point's seed unless the sweep gives it itself (then
    the seeds vary the weights and noise only, over one batch order)."""
    path = _grid_sweep(tmp_path)
    text = path.read_text()
    if where == "set":
        text = text.replace('["train.steps=7"]', '["train.steps=7", "data.batch_seed=9"]')
    else:
        text = text.replace("[grid]\n", '[grid]\n"data.batch_seed" = [9]\n')
    path.write_text(text)
    for p in sw.expand(path):
        assert load_config(p.base, p.overrides).data.batch_seed == 9, p.name


def test_none_value_and_no_seeds(tmp_path: Path) -> None:
    path = _write_sweep(
        tmp_path,
        'base = "base.toml"\nname = "s"\n[grid]\n"model.posterior.flow" = ["none", "iaf"]\n',
    )
    points = sw.expand(path)
    assert [p.name for p in points] == ["posterior.flow=none", "posterior.flow=iaf"]
    assert load_config(points[0].base, points[0].overrides).model.posterior.flow is None
    assert points[0].run_dir == Path("runs") / "s" / "posterior.flow=none"
    assert not any(o.startswith("train.seed") for o in points[0].overrides)


def test_none_inside_a_table_stays_a_string(tmp_path: Path) -> None:
    """A whole value "none" is None; inside an options table it is the string (a flow
    option such as gated_iaf's scale_bound = "none" reads it), and it must parse back."""
    path = _write_sweep(
        tmp_path,
        'base = "base.toml"\nname = "s"\n[[variant]]\nname = "g"\n'
        '"model.posterior.flow" = "gated_iaf"\n'
        '"model.posterior.options" = { scale_bound = "none", permutation = "reverse" }\n',
    )
    (point,) = sw.expand(path)
    options = load_config(point.base, point.overrides).model.posterior.options
    assert options == {"scale_bound": "none", "permutation": "reverse"}


_VARIANTS = """base = "base.toml"
name = "rows"
seeds = [3]
[grid]
"model.posterior.num_layers" = [1, 2]
[[variant]]
name = "gaussian"
"model.posterior.flow" = "none"
[[variant]]
"model.posterior.flow" = "iaf"
"model.posterior.hidden" = 64
"""


def test_variants_times_grid_times_seeds(tmp_path: Path) -> None:
    points = sw.expand(_write_sweep(tmp_path, _VARIANTS))
    assert [p.name for p in points] == [
        "gaussian__posterior.num_layers=1__seed=3",
        "gaussian__posterior.num_layers=2__seed=3",
        "posterior.flow=iaf,posterior.hidden=64__posterior.num_layers=1__seed=3",
        "posterior.flow=iaf,posterior.hidden=64__posterior.num_layers=2__seed=3",
    ]
    first = load_config(points[0].base, points[0].overrides)
    last = load_config(points[-1].base, points[-1].overrides)
    assert first.model.posterior.flow is None and first.model.posterior.num_layers == 1
    assert last.model.posterior.flow == "iaf" and last.model.posterior.hidden == 64
    assert last.model.posterior.num_layers == 2 and last.train.seed == 3


@pytest.mark.parametrize(
    "extra, match",
    [
        ('[[variant]]\n"model.posterior.num_layers" = 3\n', r"grid also varies"),
        ('[[variant]]\nname = "x"\n', r"sets no 'section\.key' values"),
        ('[[variant]]\nname = "gaussian"\n"train.k" = 2\n', r"distinct; repeated"),
        ('[[variant]]\n"model.posterior.flw" = "iaf"\n', r"model\.posterior\.flw"),
    ],
)
def test_bad_variants_fail_up_front(tmp_path: Path, extra: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        sw.expand(_write_sweep(tmp_path, _VARIANTS + extra))


def test_extends_inherits_and_overrides(tmp_path: Path) -> None:
    _write_sweep(tmp_path, _VARIANTS)
    (tmp_path / "reduced.toml").write_text(
        'extends = "sweep.toml"\nname = "rows_cpu"\nset = ["train.steps=3"]\n'
        '[grid]\n"model.posterior.num_layers" = [4]\n'
    )
    points = sw.expand(tmp_path / "reduced.toml")
    assert [p.name for p in points] == [
        "gaussian__posterior.num_layers=4__seed=3",
        "posterior.flow=iaf,posterior.hidden=64__posterior.num_layers=4__seed=3",
    ]
    assert points[0].run_dir == Path("runs") / "rows_cpu" / points[0].name
    assert points[0].base == tmp_path / "base.toml"
    cfg = load_config(points[1].base, points[1].overrides)
    assert cfg.train.steps == 3 and cfg.model.posterior.num_layers == 4
    assert cfg.model.posterior.flow == "iaf" and cfg.train.seed == 3


def test_extends_errors(tmp_path: Path) -> None:
    _write_sweep(tmp_path, 'extends = "b.toml"\nname = "a"\n', name="a.toml")
    (tmp_path / "b.toml").write_text('extends = "a.toml"\nname = "b"\n')
    with pytest.raises(ConfigError, match="chain loops"):
        sw.expand(tmp_path / "a.toml")
    (tmp_path / "c.toml").write_text('extends = "missing.toml"\nname = "c"\n')
    with pytest.raises(ConfigError, match="missing.toml"):
        sw.expand(tmp_path / "c.toml")
    _write_sweep(tmp_path, _VARIANTS)
    (tmp_path / "d.toml").write_text(
        'extends = "sweep.toml"\nname = "d"\n[grid]\n"model.posterior.flow" = ["iaf"]\n'
    )
    with pytest.raises(ConfigError, match="inherited"):
        sw.expand(tmp_path / "d.toml")


def test_set_may_not_fix_what_the_grid_or_a_variant_varies(tmp_path: Path) -> None:
    """Variants and the grid are applied after `set`: a clash would silently lose `set`."""
    _write_sweep(tmp_path, _VARIANTS)
    for i, item in enumerate(["train.k=7", "model.posterior.num_layers=3"]):
        (tmp_path / f"c{i}.toml").write_text(
            f'extends = "sweep.toml"\nname = "c{i}"\nset = ["{item}"]\n'
        )
    with pytest.raises(ConfigError, match=r"'set' fixes model\.posterior\.num_layers"):
        sw.expand(tmp_path / "c1.toml")
    (tmp_path / "c2.toml").write_text(
        'extends = "sweep.toml"\nname = "c2"\nset = ["model.posterior.flow=\\"iaf\\""]\n'
    )
    with pytest.raises(ConfigError, match=r"'set' fixes model\.posterior\.flow"):
        sw.expand(tmp_path / "c2.toml")
    assert all(
        load_config(p.base, p.overrides).train.k == 7 for p in sw.expand(tmp_path / "c0.toml")
    )


@pytest.mark.parametrize(
    "body, match",
    [
        ("[[variant]]\ntrain.k = 3\n", r"quote dotted keys"),
        ("[grid]\ntrain.k = [1, 2]\n", r"quote dotted keys"),
    ],
)
def test_unquoted_dotted_keys_are_refused(tmp_path: Path, body: str, match: str) -> None:
    path = _write_sweep(tmp_path, 'base = "base.toml"\nname = "s"\n' + body)
    with pytest.raises(ConfigError, match=match):
        sw.expand(path)


def test_extends_across_folders_resolves_each_base_where_declared(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _write_sweep(tmp_path / "a", _VARIANTS)
    (tmp_path / "b" / "cpu.toml").write_text(
        'extends = "../a/sweep.toml"\nname = "cpu"\nset = ["train.steps=2"]\n'
    )
    points = sw.expand(tmp_path / "b" / "cpu.toml")
    assert points and all(p.base.resolve() == (tmp_path / "a" / "base.toml") for p in points)


def test_bad_grid_key_fails_up_front_naming_it(tmp_path: Path) -> None:
    path = _grid_sweep(tmp_path, extra="")
    path.write_text(path.read_text() + '"model.posterior.flw" = [1]\n')
    with pytest.raises(ConfigError, match=r"model\.posterior\.flw"):
        sw.run_sweep(path, jobs=1)
    assert not (tmp_path / "runs").exists()


def test_bad_grid_value_fails_naming_key(tmp_path: Path) -> None:
    path = _grid_sweep(tmp_path)
    path.write_text(path.read_text() + '"train.steps" = [10, "many"]\n')
    with pytest.raises(ConfigError, match=r"train\.steps"):
        sw.expand(path)


def test_unbuildable_model_fails_up_front(tmp_path: Path) -> None:
    """Valid config keys, but a prior flow without a flow prior: caught by the build."""
    path = _grid_sweep(tmp_path)
    path.write_text(path.read_text() + '"model.prior.name" = ["standard_normal"]\n')
    with pytest.raises(ConfigError, match=r"model\.prior\.flow"):
        sw.run_sweep(path)
    assert not (tmp_path / "runs").exists()


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = _grid_sweep(tmp_path, extra="sedes = [1]\n")
    with pytest.raises(ConfigError, match="sedes"):
        sw.expand(path)


def test_dry_run_lists_commands_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    statuses = sw.run_sweep(_grid_sweep(tmp_path), dry_run=True, threads=1)
    assert len(statuses) == 12
    assert all(s["status"] == "pending" and s["returncode"] is None for s in statuses)
    out = capsys.readouterr().out
    for s in statuses:
        assert s["command"] in out
        assert "--threads 1" in s["command"]
    assert not (tmp_path / "runs").exists()


def test_commands_are_shell_safe_and_parse_back(tmp_path: Path) -> None:
    root = tmp_path / "my runs"
    path = _write_sweep(
        tmp_path,
        f"""base = "base.toml"
name = "quote_test"
root = {json.dumps(str(root))}
set = ["data.root=\\"/data with space/it's\\""]
[grid]
"model.encoder.options" = [{{ hidden = [16, 8], activation = "tanh" }}]
"train.lr" = [0.001]
""",
    )
    points = sw.expand(path)
    (cmd,) = sw.commands(points)
    argv = shlex.split(cmd)
    assert argv[:3] == ["vaeflow", "train", str(points[0].base)]
    assert argv[argv.index("--run-dir") + 1] == str(points[0].run_dir)
    assert "--resume" not in argv
    args = build_parser().parse_args(argv[1:])
    assert args.set == points[0].overrides
    cfg = load_config(args.config, args.set)
    assert cfg.data.root == "/data with space/it's"
    assert cfg.model.encoder.options == {"hidden": [16, 8], "activation": "tanh"}
    assert "/" not in points[0].name and " " not in points[0].name
    out = sw.write_commands(points, tmp_path / "cmds" / "all.sh", python="python -m vaeflow")
    assert out.read_text() == sw.commands(points, python="python -m vaeflow")[0] + "\n"


def test_resume_and_skip_detection(tmp_path: Path) -> None:
    path = _grid_sweep(tmp_path)
    points = sw.expand(path)
    (points[0].run_dir / "checkpoints").mkdir(parents=True)
    (points[0].run_dir / "checkpoints" / "last.pt").write_bytes(b"")
    points[1].run_dir.mkdir(parents=True)
    (points[1].run_dir / "summary.json").write_text("{}")
    assert sw.needs_resume(points[0]) and not sw.is_finished(points[0])
    assert sw.is_finished(points[1]) and not sw.needs_resume(points[1])
    assert shlex.split(sw.commands(points[:1])[0])[-1] == "--resume"
    statuses = sw.run_sweep(path, dry_run=True)
    assert [s["status"] for s in statuses[:3]] == ["resume", "skipped", "pending"]


def _reported(
    tmp_path: Path, points: list, overrides: dict[int, list[str]], k: int | None = None
) -> Path:
    """A report (results.json) of some of ``points``, evaluated on another machine: run
    directories of the same sweep folder and names elsewhere, each trained with the
    point's settings plus ``overrides[i]``, evaluated with the config's k (or ``k``)."""
    from vaeflow.config import to_dict
    from vaeflow.tools.report import write_report

    elsewhere = tmp_path / "other_machine" / points[0].run_dir.parent.name
    for i, extra in overrides.items():
        p = points[i]
        run = elsewhere / p.run_dir.name
        run.mkdir(parents=True)
        cfg = load_config(p.base, [*p.overrides, *extra])
        (run / "config.json").write_text(json.dumps(to_dict(cfg)))
        k = k or cfg.eval.k
        summary = {f"test/nll_iw{k}_nats": 90.0 + i, "test/k": k, "dataset": "mnist"}
        n = cfg.eval.n_test
        scored = f"fixed random subset of {n} of 10000" if n else "all 10000"
        summary |= {"test/n_examples": n or 10000, "test_examples": scored}
        (run / "summary.json").write_text(json.dumps(summary))
    write_report([elsewhere], tmp_path / "report")
    return tmp_path / "report" / "results.json"


def test_skip_reported_continues_a_table_from_its_report(tmp_path: Path) -> None:
    """--skip-reported: the points an earlier report holds evaluated (same sweep folder,
    run name and settings, whatever the paths and speed settings) are not run, nor
    written to a commands file; a record of a point's name trained with other settings
    is an error naming the key, not a silent skip or a second run."""
    path = _grid_sweep(tmp_path)
    points = sw.expand(path)
    speed_only = ['data.root="/elsewhere"', "train.compile_step=true", "train.log_every=7"]
    results = _reported(tmp_path, points, {0: speed_only, 3: []})
    statuses = sw.run_sweep(path, dry_run=True, skip_reported=[results])
    assert [s["status"] for s in statuses[:4]] == ["reported", "pending", "pending", "reported"]
    assert sw.reported_points(points, [results]) == {
        points[0].name: str(results),
        points[3].name: str(results),
    }
    parser = argparse.ArgumentParser()
    sw.add_sweep_parser(parser.add_subparsers())
    out = tmp_path / "cmds.txt"
    cli = ["sweep", str(path), "--commands-file", str(out), "--skip-reported", str(results)]
    args = parser.parse_args(cli)
    assert args.func(args) == 0
    written = [shlex.split(line)[-1] for line in out.read_text().splitlines()]
    assert len(written) == len(points) - 2
    assert not {str(points[0].run_dir), str(points[3].run_dir)} & set(written)
    # Another seed or learning rate under the point's name: refused, naming the key.
    shutil.rmtree(tmp_path / "other_machine")
    wrong = _reported(tmp_path, points, {1: ["train.lr=0.5"]})
    with pytest.raises(ConfigError, match=r"record of .* other settings: train\.lr \(0\.5 there"):
        sw.run_sweep(path, dry_run=True, skip_reported=[wrong])
    # Evaluated with another k or on fewer test images: not the point's number.
    shutil.rmtree(tmp_path / "other_machine")
    other_k = _reported(tmp_path, points, {2: []}, k=7)
    with pytest.raises(ConfigError, match=r"evaluated otherwise \(k = 7, the point's eval\.k"):
        sw.run_sweep(path, dry_run=True, skip_reported=[other_k])
    with pytest.raises(ConfigError, match="--skip-reported: .*no such results.json"):
        sw.run_sweep(path, dry_run=True, skip_reported=[tmp_path / "missing.json"])


def test_failing_point_does_not_stop_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Subprocesses faked: odd points fail, the rest write summary.json."""
    path = _grid_sweep(tmp_path)
    calls: list[list[str]] = []

    def fake_call(args: list[str], **kwargs: object) -> int:
        calls.append(args)
        run_dir = Path(args[args.index("--run-dir") + 1])
        if "train.seed=1" in args:
            return 3
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "summary.json").write_text("{}")
        return 0

    monkeypatch.setattr(sw.subprocess, "call", fake_call)
    statuses = sw.run_sweep(path, jobs=3, threads=2)
    assert len(calls) == 12
    assert all(c[1:4] == ["-m", "vaeflow", "train"] and "--threads" in c for c in calls)
    assert [s["status"] for s in statuses] == ["finished", "failed"] * 6
    assert [s["returncode"] for s in statuses] == [0, 3] * 6
    record = json.loads((tmp_path / "runs" / "iaf_depth" / "sweep.json").read_text())
    assert [p["status"] for p in record["points"]] == ["finished", "failed"] * 6
    assert (tmp_path / "runs" / "iaf_depth" / "logs" / f"{statuses[1]['name']}.log").exists()
    # The CLI handler reports failure with exit code 1 and reruns only the failed points.
    parser = argparse.ArgumentParser()
    sw.add_sweep_parser(parser.add_subparsers())
    args = parser.parse_args(["sweep", str(path), "--jobs", "2"])
    calls.clear()
    assert args.func(args) == 1
    assert len(calls) == 6


def test_sweep_removes_temp_files_of_its_own_interrupted_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A sweep killed while writing sweep.json (or a commands file) leaves a temp file;
    the next start removes it. Points' run directories are left to their runs."""
    path = _grid_sweep(tmp_path)
    directory = tmp_path / "runs" / "iaf_depth"
    directory.mkdir(parents=True)
    stale = directory / ".sweep.json.ab12cd34.tmp"
    notes = directory / ".notes.tmp"
    point_temp = directory / sw.expand(path)[0].name / ".summary.json.ab12cd34.tmp"
    for p in (stale, notes, point_temp):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    monkeypatch.setattr(sw.subprocess, "call", lambda args, **kwargs: 0)
    sw.run_sweep(path, jobs=1)
    assert not stale.exists() and notes.exists() and point_temp.exists()
    assert ".sweep.json.ab12cd34.tmp (1 B)" in capsys.readouterr().out

    out = tmp_path / "cmds.txt"
    stale_cmds, other = tmp_path / ".cmds.txt.ab12cd34.tmp", tmp_path / ".x.txt.ab12cd34.tmp"
    for p in (stale_cmds, other):
        p.write_text("x")
    sw.write_commands(sw.expand(path), out)
    assert not stale_cmds.exists() and other.exists()


def test_cli_commands_file(tmp_path: Path) -> None:
    path = _grid_sweep(tmp_path)
    parser = argparse.ArgumentParser()
    sw.add_sweep_parser(parser.add_subparsers())
    out = tmp_path / "cmds.txt"
    args = parser.parse_args(["sweep", str(path), "--commands-file", str(out), "--threads", "1"])
    assert args.func(args) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 12 and all(shlex.split(line)[-2:] == ["--threads", "1"] for line in lines)
    # Nothing runs, but the sweep directory gets its HParams experiment before the
    # scheduler starts the points: the keys the sweep varies lead the table.
    sweep_dir = tmp_path / "runs" / "iaf_depth"
    assert [p.name.endswith(".hparams_experiment") for p in sweep_dir.iterdir()] == [True]
    hparams, metrics = hparams_table(sweep_dir)
    assert hparams[:3] == ["model.posterior.flow", "model.posterior.num_layers", "train.seed"]
    assert not [h for h in hparams if h.startswith("run.")]  # the trial column names the run
    assert metrics[:2] == ["test/nll_iw1000_nats", "test/elbo_nats"]


def test_tiny_real_sweep_runs_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two real 5-step MNIST runs in parallel; a second call starts no subprocess."""
    # The datasets are always beside the checkout here and in CI: a missing copy must fail.
    assert (Path(DATA_ROOT) / "MNIST").exists(), f"MNIST not found under {DATA_ROOT}"
    root = json.dumps(str(tmp_path / "runs"))
    path = _write_sweep(
        tmp_path,
        f"""base = "base.toml"
name = "tiny"
root = {root}
set = {json.dumps(TINY)}
[grid]
"model.posterior.flow" = ["none", "iaf"]
""",
    )
    statuses = sw.run_sweep(path, jobs=2, threads=1)
    logs = [Path(s["log"]).read_text()[-2000:] for s in statuses]
    assert [s["status"] for s in statuses] == ["finished", "finished"], logs
    assert [s["returncode"] for s in statuses] == [0, 0]
    for p in sw.expand(path):
        assert (p.run_dir / "summary.json").is_file()
        assert (p.run_dir / "train_summary.json").is_file()
    # One HParams experiment, the sweep's: the points wrote only their rows (TensorBoard
    # would take any one of several experiments), and the varied key leads the table.
    sweep_dir = tmp_path / "runs" / "tiny"
    assert experiment_runs(sweep_dir) == ["."]
    assert hparams_table(sweep_dir)[0][0] == "model.posterior.flow"

    def no_call(*args: object, **kwargs: object) -> int:
        raise AssertionError("a finished point was started again")

    monkeypatch.setattr(sw.subprocess, "call", no_call)
    again = sw.run_sweep(path, jobs=2)
    assert [s["status"] for s in again] == ["skipped", "skipped"]
