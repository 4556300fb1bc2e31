"""Every experiment folder is runnable as committed: configs, sweeps and run scripts agree.

Each sweep file under ``experiments/`` is expanded with full validation (every point's
config is built and each distinct model constructed), so a renamed option, a flow that no
longer exists or a typo in a grid fails here rather than hours into a GPU job.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vaeflow.config import load_config, to_dict
from vaeflow.models.build import build_model
from vaeflow.tools import sweep as sw

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
PAPER_EXPERIMENTS = [
    "burda2016_iwae",
    "rezende2015_planar",
    "vandenberg2018_sylvester",
    "kingma2016_iaf",
    "flow_priors",
]


def _is_sweep(path: Path) -> bool:
    """Sweep files start from a base config or extend another sweep; configs do neither."""
    return bool(re.search(r"^(base|extends) = ", path.read_text(), flags=re.M))


SWEEPS = sorted(p for p in EXPERIMENTS.glob("*/*.toml") if _is_sweep(p))


@pytest.mark.parametrize("name", PAPER_EXPERIMENTS)
def test_experiment_folder_is_complete(name: str) -> None:
    folder = EXPERIMENTS / name
    assert (folder / "README.md").is_file()
    run = folder / "run.sh"
    assert run.is_file()
    # Every sweep the run script names exists, and each full sweep has a reduced one.
    named = re.findall(r"experiments/[\w./-]+\.toml", run.read_text())
    assert named, f"{run} names no sweep file"
    for rel in named:
        assert (REPO / rel).is_file(), f"{run} names missing {rel}"
    assert any("reduced" in rel for rel in named) and any("sweep" in rel for rel in named)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_every_experiment_sweep_expands_and_builds(path: Path) -> None:
    points = sw.expand(path)  # validates every point and builds each distinct model
    assert points
    names = {p.name for p in points}
    assert len(names) == len(points)


@pytest.mark.parametrize(
    "path",
    [p for p in EXPERIMENTS.glob("*/*.toml") if not _is_sweep(p) and "toy2d" not in str(p)],
    ids=lambda p: str(p.relative_to(EXPERIMENTS)),
)
def test_every_experiment_config_loads_and_builds(path: Path) -> None:
    """The base configs work on their own too (``vaeflow train CONFIG``), not only as
    the starting point of their sweeps."""
    from vaeflow.models.build import build_model

    cfg = load_config(path)
    assert cfg.train.steps >= 1
    build_model(cfg.model)


def test_reduced_sweeps_keep_the_rows_and_cut_the_budget() -> None:
    """A reduced sweep is a subset of its paper sweep's rows (same names, same base config)
    with fewer training steps at every point."""
    reduced_files = sorted(EXPERIMENTS.glob("*/reduced*.toml"))
    assert len(reduced_files) >= 6
    for reduced in reduced_files:
        full_name = reduced.read_text().split('extends = "', 1)[1].split('"', 1)[0]
        full = {p.name: p for p in sw.expand(reduced.parent / full_name, validate=False)}
        small = sw.expand(reduced, validate=False)
        assert {p.base for p in small} == {p.base for p in full.values()}
        for p in small:
            assert p.name in full, (reduced, p.name)
            big = full[p.name]
            small_steps = load_config(p.base, p.overrides).train.steps
            assert small_steps < load_config(big.base, big.overrides).train.steps, reduced


def test_burda_schedule_is_the_papers_3_to_the_i_epoch_stages() -> None:
    cfg = load_config(EXPERIMENTS / "burda2016_iwae" / "config.toml")
    per_epoch = (60000 - cfg.data.val_size) // cfg.data.batch_size
    epochs = [sum(3**j for j in range(i + 1)) for i in range(7)]  # 1, 4, 13, ..., 1093
    assert list(cfg.train.lr_milestones) == [e * per_epoch for e in epochs]
    assert cfg.train.steps == 3280 * per_epoch
    assert cfg.train.lr_decay**7 == pytest.approx(0.1)


@pytest.mark.parametrize("name", ["config", "two_layer"])
def test_burda_follows_the_authors_code(name: str) -> None:
    """yburda/iwae: 59,600 / 400 split; the code's Adam (beta1 0.99, eps 1e-4 and a second
    moment starting at 1, on the batch *sum*: 1e-4 / 20 and 1 / 20^2 on vaeflow's batch
    mean); its Glorot init and data-mean output bias; no clipping, no early stopping, the
    final model scored."""
    cfg = load_config(EXPERIMENTS / "burda2016_iwae" / f"{name}.toml")
    assert (cfg.data.dataset, cfg.data.binarization, cfg.data.val_size) == (
        "mnist",
        "dynamic",
        400,
    )
    b = cfg.data.batch_size
    assert cfg.data.shuffle is False  # the code's loop visits its array in stored order
    assert (cfg.train.optimizer, tuple(cfg.train.betas)) == ("adam_iwae", (0.99, 0.999))
    assert cfg.train.eps == pytest.approx(1e-4 / b)
    assert cfg.train.initial_second_moment == pytest.approx(1 / b**2)
    assert (cfg.model.init, cfg.model.output_bias_from_data) == ("iwae_code", True)
    assert cfg.train.clip_norm is None and cfg.train.early_stopping is None
    assert cfg.eval.checkpoint == "last"


def _static_mnist_schedule(experiment: str, early_stopping: int):
    """``experiment``'s config.toml, checked for what the Sylvester and VampPrior codes
    share: Larochelle's static MNIST as given, batch 100, KL warm-up over 100 epochs,
    validation every epoch, early stopping after ``early_stopping - 1`` epochs without
    improvement counted only after the warm-up, at most 2000 epochs."""
    cfg = load_config(EXPERIMENTS / experiment / "config.toml")
    t, d = cfg.train, cfg.data
    assert (d.dataset, d.binarization, d.batch_size) == ("binarized_mnist", "given", 100)
    per_epoch = 50000 // d.batch_size
    assert (t.kl_warmup_steps, t.val_every) == (100 * per_epoch, per_epoch)
    assert (t.early_stopping, t.early_stopping_delay) == (early_stopping, t.kl_warmup_steps)
    assert t.steps == 2000 * per_epoch
    return cfg


def test_sylvester_follows_the_authors_code() -> None:
    """riannevdberg/sylvester-flows (main_experiment.py): Larochelle's static MNIST as
    given, Adamax lr 5e-4 with eps 1e-7, batch 100, no clipping, KL warm-up over 100
    epochs, early stopping after more than 100 epochs without improvement counted only
    after the warm-up, at most 2000 epochs, k = 5000 at test time."""
    cfg = _static_mnist_schedule("vandenberg2018_sylvester", early_stopping=101)
    t = cfg.train
    assert (t.optimizer, t.lr, t.eps, t.clip_norm) == ("adamax", 5e-4, 1e-7, None)
    assert cfg.eval.k == 5000


def test_flow_priors_follow_the_vampprior_code() -> None:
    """jmtomczak/vae_vampprior: static MNIST as given, AdamNormGrad lr 5e-4, batch 100, no
    clipping, KL warm-up over 100 epochs, early stopping after more than 50 epochs
    without improvement counted from the end of the warm-up, at most 2000 epochs, the
    best-validation model tested with k = 5000; a sweep's seeds also vary the batch order."""
    cfg = _static_mnist_schedule("flow_priors", early_stopping=51)
    t = cfg.train
    assert (t.optimizer, t.lr, t.clip_norm, t.val_k) == ("adam_normgrad", 5e-4, None, 1)
    # "auto" is best.pt when there is a validation split (Larochelle's valid file here).
    assert (cfg.eval.k, cfg.eval.checkpoint, cfg.data.val_size != 0) == (5000, "auto", True)
    # the code's head, he_init and per-tensor AdamNormGrad in the paper config; the
    # committed reduced rows keep vaeflow's (stated in their sweeps, measured in
    # code_exact*.toml)
    code = ("log_var_hardtanh", "he_normal", True)
    assert (cfg.model.posterior.scale, cfg.model.init, t.normgrad_split) == code
    for name in ("sweep", "reduced", "seeds", "ablations"):
        for p in sw.expand(EXPERIMENTS / "flow_priors" / f"{name}.toml", validate=False):
            c = load_config(p.base, p.overrides)
            got = (c.model.posterior.scale, c.model.init, c.train.normgrad_split)
            assert got == (code if name == "sweep" else ("log_std", "torch", False)), p.name
    points = sw.expand(EXPERIMENTS / "flow_priors" / "seeds.toml", validate=False)
    seeds = set()
    for p in points:
        c = load_config(p.base, p.overrides)
        seeds.add((c.train.seed, c.data.batch_seed))
    assert seeds == {(1, 1), (2, 2)}
    # code_exact.toml: the seeds.toml N(0, I) row of seed 2 with the code's head, init and
    # per-tensor normalisation, and nothing else changed
    exact_points = sw.expand(EXPERIMENTS / "flow_priors" / "code_exact.toml")
    names = {"gauss+standard__seed=2", "gauss+vamp__seed=2"}
    assert {p.name for p in exact_points} == names
    for exact in exact_points:
        (plain,) = [p for p in points if p.name == exact.name]
        a, b = _as_dict(exact), _as_dict(plain)
        assert _changed(a, b) == _CODE_SETTINGS | {"run.root"}, exact.name
        assert a["model"]["posterior"]["scale"] == "log_var_hardtanh"
        assert (a["model"]["init"], a["train"]["normgrad_split"]) == ("he_normal", True)
    # code_exact_each.toml: that N(0, I) row with one of the three settings each
    (plain,) = [p for p in points if p.name == "gauss+standard__seed=2"]
    b = _as_dict(plain)
    each = {
        p.name: _changed(_as_dict(p), b) - {"run.root", "run.name"}
        for p in sw.expand(EXPERIMENTS / "flow_priors" / "code_exact_each.toml")
    }
    assert each == {
        "gauss+standard+head__seed=2": {"model.posterior.scale"},
        "gauss+standard+he_init__seed=2": {"model.init"},
        "gauss+standard+normgrad_split__seed=2": {"train.normgrad_split"},
    }


def test_flow_priors_reduced_code_is_reduced_on_the_codes_settings() -> None:
    """reduced_code.toml: reduced.toml's rows and budget with config.toml's (the code's)
    head, init and per-tensor AdamNormGrad, at seed 2; its N(0, I) and VampPrior points
    are code_exact.toml's, config for config, so a sweep skips the ones already run."""
    folder = EXPERIMENTS / "flow_priors"
    vaeflow_rows = {p.name.split("__")[0]: p for p in sw.expand(folder / "reduced.toml")}
    code_rows = sw.expand(folder / "reduced_code.toml")
    assert {p.name.split("__")[0] for p in code_rows} == set(vaeflow_rows)
    for p in code_rows:
        a = _as_dict(p)
        b = _as_dict(vaeflow_rows[p.name.split("__")[0]])
        seed = {"train.seed", "data.batch_seed"}
        assert _changed(a, b) == _CODE_SETTINGS | seed | {"run.root", "run.name"}, p.name
        assert (a["model"]["init"], a["train"]["seed"]) == ("he_normal", 2), p.name
    by_name = {p.name: p for p in code_rows}
    for exact in sw.expand(folder / "code_exact.toml"):
        mine = by_name[exact.name]
        assert mine.run_dir == exact.run_dir, exact.name
        assert _as_dict(exact) == _as_dict(mine), exact.name


#: The settings where vaeflow's defaults differ from the VampPrior code's: the posterior's
#: head, the initialisation and AdamNormGrad's tensors (experiments/flow_priors/README.md).
_CODE_SETTINGS = {"model.posterior.scale", "model.init", "train.normgrad_split"}


def _as_dict(point: sw.Point) -> dict:
    """A sweep point's whole config as a nested dict."""
    return to_dict(load_config(point.base, point.overrides))


def _changed(a: dict, b: dict, prefix: str = "") -> set[str]:
    """The dotted keys whose values differ between two config dicts (nested tables
    compared key by key)."""
    out = set()
    for key in a.keys() | b.keys():
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out |= _changed(x, y, f"{prefix}{key}.")
        elif x != y:
            out.add(f"{prefix}{key}")
    return out


def test_kingma_follows_the_paper_and_the_authors_code() -> None:
    """IAF (arXiv:1606.04934 and openai/iaf): Table 1 is dynamically binarised MNIST with
    k = 128; the code trains on every training image with its AdaMax (no bias correction)
    at 2e-3, a constant rate, no clipping, EMA 0.999 (MNIST batch 16, CIFAR-10 256), and
    its IAF update reads 0.1 x the autoregressive outputs; CIFAR-10's likelihood is the
    discretised logistic with a learned log-scale per channel (appendix C.5)."""
    for name, batch in (("mnist", 16), ("cifar10", 256)):
        cfg = load_config(EXPERIMENTS / "kingma2016_iaf" / f"{name}.toml")
        t = cfg.train
        assert cfg.data.val_size == 0 and cfg.data.batch_size == batch, name
        assert (t.optimizer, t.lr, t.lr_schedule, t.lr_warmup_steps) == (
            "adamax_iaf",
            2e-3,
            "constant",
            0,
        )
        assert t.clip_norm is None and t.early_stopping is None and t.ema_decay == 0.999
        assert cfg.model.posterior.options["output_scale"] == 0.1, name
    mnist = load_config(EXPERIMENTS / "kingma2016_iaf" / "mnist.toml")
    assert (mnist.data.dataset, mnist.data.binarization, mnist.eval.k) == ("mnist", "dynamic", 128)
    # appendix B: strided ResNet blocks of [16, 32, 32] maps, a stride-1 block between,
    # a 450-unit dense layer, ELU, weight norm with data init; the decoder its mirror
    for net, width in ((mnist.model.encoder, "out_features"), (mnist.model.decoder, "hidden")):
        assert net.name == "strided_resnet"
        o = net.options
        assert (o["channels"], o["unstrided"], o[width], o["activation"]) == (
            [16, 32, 32],
            1,
            450,
            "elu",
        )
        assert o["weight_norm"] == "iaf_code"
        # the Theano code's blocks add 0.1 x their branch
        assert o["residual_scale"] == 0.1
    assert mnist.model.decoder.options["output_scale"] == 0.1  # ".1 * x_dec(...)"
    assert mnist.model.latent_dim == 32
    # "The whole network is parametrized according to Weight Normalization ... and
    # data-dependent initialization is used": no plain conv or dense layer anywhere, for
    # the IAF rows and the diagonal one
    from torch import nn

    from vaeflow.layers import IAFCodeConv2d, IAFCodeConvTranspose2d, IAFCodeLinear
    from vaeflow.models.build import build_model

    code = (IAFCodeLinear, IAFCodeConv2d, IAFCodeConvTranspose2d)
    for sets in ([], ["model.posterior.flow=none"]):
        model = build_model(load_config(EXPERIMENTS / "kingma2016_iaf" / "mnist.toml", sets).model)
        layers = [
            m for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
        ]
        assert layers and all(isinstance(m, code) for m in layers), sets
    cifar = load_config(EXPERIMENTS / "kingma2016_iaf" / "cifar10.toml")
    assert cifar.model.likelihood == "discretized_logistic"
    assert cifar.model.likelihood_options == {"scale": "per_channel"}
    # The one-layer CIFAR-10 model too (appendix C.6), full and reduced, IAF and diagonal
    # rows; its IAF is C.9's "2 hidden layers and 1 step"
    assert cifar.model.posterior.num_layers == 1
    assert cifar.model.posterior.options["num_hidden"] == 2
    for sweep in ("sweep_cifar10", "reduced_cifar10"):
        for p in sw.expand(EXPERIMENTS / "kingma2016_iaf" / f"{sweep}.toml"):
            model = build_model(load_config(p.base, p.overrides).model)
            layers = [
                m for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
            ]
            assert layers and all(isinstance(m, code) for m in layers), (sweep, p.name)
    # The top-down model: the code's weight norm and data init, in the blocks and the IAF
    td = load_config(EXPERIMENTS / "kingma2016_iaf" / "topdown_cifar10.toml").model
    assert td.topdown.weight_norm == "iaf_code"
    assert td.posterior.options["weight_norm"] == "iaf_code"
    assert td.posterior.context_features == td.posterior.hidden == td.topdown.channels
    # free bits floored per GPU's 32 images, as the code's 8 GPUs do
    tdc = load_config(EXPERIMENTS / "kingma2016_iaf" / "topdown_cifar10.toml")
    assert tdc.data.batch_size // tdc.train.free_bits_batch_splits == 32
    # ... and the reduced rows shrink the sizes only: every row with the code's weight norm
    # in the blocks and the IAF, the unbounded IAF scale, and the code's AdaMax
    for p in sw.expand(EXPERIMENTS / "kingma2016_iaf" / "reduced_topdown_cifar10.toml"):
        rc = load_config(p.base, p.overrides)
        assert rc.model.topdown.weight_norm == "iaf_code", p.name
        assert rc.model.posterior.options["weight_norm"] == "iaf_code", p.name
        assert rc.model.posterior.options["scale_bound"] == "none", p.name
        assert rc.train.optimizer == tdc.train.optimizer == "adamax_iaf", p.name


def _stub(tmp_path: Path, sweep_rc: int = 0) -> tuple[Path, Path]:
    """A fake ``vaeflow`` that logs its arguments (and fails ``sweep`` if asked)."""
    log = tmp_path / "calls.log"
    stub = tmp_path / "vaeflow"
    stub.write_text(
        f'#!/usr/bin/env bash\necho "$*" >> {log}\nif [ "$1" = sweep ]; then exit {sweep_rc}; fi\n'
    )
    stub.chmod(0o755)
    return stub, log


@pytest.mark.parametrize("name", PAPER_EXPERIMENTS)
def test_run_scripts_call_sweep_and_report(tmp_path: Path, name: str) -> None:
    """Each run.sh, in both modes, runs the right sweep and reports its run directory."""
    for mode, jobs in (("reduced", "--jobs 2 --threads 1"), ("full", "--jobs 1")):
        stub, log = _stub(tmp_path)
        log.unlink(missing_ok=True)
        env = {**os.environ, "VAEFLOW": str(stub), "PYTHON": sys.executable}
        env.pop("THREADS", None)
        env.pop("JOBS", None)
        run = subprocess.run(
            ["bash", str(EXPERIMENTS / name / "run.sh"), mode],
            env=env,
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        calls = log.read_text().splitlines()
        sweeps = [c for c in calls if c.startswith("sweep ")]
        reports = [c for c in calls if c.startswith("report ")]
        assert sweeps and len(sweeps) == len(reports), calls
        for sweep_call, report_call in zip(sweeps, reports, strict=True):
            sweep_file = sweep_call.split()[1]
            assert ("reduced" in sweep_file) == (mode == "reduced"), sweep_call
            assert sweep_call.endswith(jobs), sweep_call
            directory = sw.load_sweep(REPO / sweep_file).directory
            assert report_call.startswith(f"report {directory} -o results/"), report_call


@pytest.mark.parametrize(
    ("name", "references"),
    [
        ("flow_priors", {("VAE + VampPrior, K = 500 (paper, secondary source)", "nll"): 85.57}),
        (
            "rezende2015_planar",
            {
                ("DLGM, diagonal (paper, secondary source)", "bound"): 89.9,
                ("DLGM + NF, K = 80 (paper, secondary source)", "bound"): 85.1,
            },
        ),
        (
            "vandenberg2018_sylvester",
            {
                ("no flow (paper, via FFJORD Table 3)", "bound"): 86.55,
                ("best Sylvester flow (paper, via FFJORD Table 3)", "bound"): 83.32,
            },
        ),
    ],
)
def test_run_scripts_draw_the_papers_numbers(
    tmp_path: Path, name: str, references: dict[tuple[str, str], float]
) -> None:
    """The experiments whose README quotes a paper's number pass it to the report as a
    reference line, as what it is -- an NLL (--reference) or a bound, the -ELBO
    (--bound-reference) -- and the report's parser accepts what they pass."""
    import argparse

    from vaeflow.tools.report import add_report_parser

    args_file = tmp_path / "report_args"
    stub = tmp_path / "vaeflow"
    stub.write_text(
        f'#!/usr/bin/env bash\nif [ "$1" = report ]; then printf "%s\\n" "$@" > {args_file}; fi\n'
    )
    stub.chmod(0o755)
    env = {**os.environ, "VAEFLOW": str(stub), "PYTHON": sys.executable}
    run = subprocess.run(
        ["bash", str(EXPERIMENTS / name / "run.sh"), "reduced"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command"))
    parsed = parser.parse_args(args_file.read_text().splitlines())
    given = [*(parsed.reference or ()), *(parsed.bound_reference or ())]
    assert {(n, kind): v for n, v, kind in given} == references
    # One row per flow (and length): the flows' own options are not columns.
    by = {
        "flow_priors": None,
        "rezende2015_planar": ["model.posterior.flow", "model.posterior.num_layers"],
        "vandenberg2018_sylvester": ["model.posterior.flow"],
    }
    assert parsed.by == by[name]


@pytest.mark.parametrize("name", PAPER_EXPERIMENTS)
def test_reduced_reports_go_where_the_committed_results_are(tmp_path: Path, name: str) -> None:
    """`run.sh reduced` rewrites the committed reduced results, not a superseded folder:
    every report it writes goes to a results folder that holds a report (results.json)."""
    targets = []
    for extra in ([], ["two_layer"]) if name == "burda2016_iwae" else ([],):
        stub, log = _stub(tmp_path)
        log.unlink(missing_ok=True)
        env = {**os.environ, "VAEFLOW": str(stub), "PYTHON": sys.executable}
        run = subprocess.run(
            ["bash", str(EXPERIMENTS / name / "run.sh"), "reduced", *extra],
            env=env,
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        for call in log.read_text().splitlines():
            if call.startswith("report "):
                targets.append(call.split(" -o ")[1].split()[0])
    assert targets
    for out in targets:
        assert (REPO / out / "results.json").is_file(), out
        readme = REPO / out / "README.md"
        head = readme.read_text().lower().splitlines()[:5] if readme.is_file() else []
        assert not any("superseded" in line for line in head), f"{out} is labelled superseded"


def test_flow_priors_code_mode_grows_its_table(tmp_path: Path) -> None:
    """`run.sh code` runs reduced_code.toml and writes its table from the runs on the
    code's three settings only, with their per-image scores kept and every row paired
    with the VampPrior. Where the table exists it skips the points the table holds and
    reports its stored rows again; where not (a fresh checkout of the experiment), it
    trains and reports everything. The report's parser takes what it passes."""
    import argparse
    import shutil

    from vaeflow.tools.report import add_report_parser

    table = "results/flow_priors/vampprior_protocol/code_settings"
    fresh = tmp_path / "fresh"  # the experiment without its results
    shutil.copytree(EXPERIMENTS / "flow_priors", fresh / "experiments" / "flow_priors")
    shutil.copy(EXPERIMENTS / "_run_sweep.sh", fresh / "experiments")
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command"))
    for root, grows in ((REPO, True), (fresh, False)):
        assert (root / table / "results.json").is_file() == grows
        stub, log = _stub(tmp_path)
        log.unlink(missing_ok=True)
        env = {**os.environ, "VAEFLOW": str(stub), "PYTHON": sys.executable}
        env.pop("SWEEP_ARGS", None)
        run = subprocess.run(
            ["bash", str(root / "experiments" / "flow_priors" / "run.sh"), "code"],
            env=env,
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        sweep_call, report_call = log.read_text().splitlines()
        assert sweep_call.startswith("sweep experiments/flow_priors/reduced_code.toml --jobs 2")
        skip = f"--skip-reported {table}/results.json"
        assert sweep_call.endswith(skip) == grows, sweep_call
        directory = sw.load_sweep(EXPERIMENTS / "flow_priors" / "reduced_code.toml").directory
        assert report_call.startswith(f"report {directory} -o {table} "), report_call
        args = parser.parse_args(["report", *_unsplit_references(report_call.split()[1:])])
        assert args.from_report == ([f"{table}/results.json"] if grows else None)
        assert args.keep_scores
        assert args.where == [
            "model.init=he_normal",
            "model.posterior.scale=log_var_hardtanh",
            "train.normgrad_split=true",
        ]
        assert args.paired_against == ["model.prior.name=vamp"]


def test_run_script_reports_even_when_a_point_failed(tmp_path: Path) -> None:
    stub, log = _stub(tmp_path, sweep_rc=1)
    env = {**os.environ, "VAEFLOW": str(stub), "PYTHON": sys.executable}
    run = subprocess.run(
        ["bash", str(EXPERIMENTS / "kingma2016_iaf" / "run.sh"), "reduced"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1
    calls = log.read_text().splitlines()
    # MNIST, CIFAR-10 and the top-down CIFAR-10 sweep all ran
    assert sum(c.startswith("report ") for c in calls) == 3


def test_rezende_compares_bounds_on_static_mnist(tmp_path: Path) -> None:
    """Rezende & Mohamed 2015: the table's rows are bounds, so run.sh reports the test ELBO
    first; Larochelle's static MNIST, RMSprop with momentum, beta_t = min(1, 0.01 +
    t/10000), no clipping; rows diag + planar and NICE at K = 10, 20, 40, 80."""
    cfg = load_config(EXPERIMENTS / "rezende2015_planar" / "config.toml")
    assert (cfg.data.dataset, cfg.data.binarization) == ("binarized_mnist", "given")
    t = cfg.train
    assert (t.optimizer, t.momentum, t.kl_warmup_start, t.kl_warmup_steps) == (
        "rmsprop",
        0.9,
        0.01,
        10000,
    )
    assert t.clip_norm is None
    # eq. 20's inverse temperature weighs ln p(x, z_K); Appendix A.1's m(a) = -1 + softplus(a)
    assert t.kl_warmup_target == "joint"
    points = sw.expand(EXPERIMENTS / "rezende2015_planar" / "sweep.toml")
    for p in points:
        post = load_config(p.base, p.overrides).model.posterior
        if post.flow == "planar":
            assert post.options == {"constraint": "softplus"}, p.name
    rows = {p.name for p in points}
    ks = (10, 20, 40, 80)
    assert rows == {"diag"} | {f"{f}_k{k}" for f in ("planar", "nice") for k in ks}
    stub, log = _stub(tmp_path)
    env = {**os.environ, "VAEFLOW": str(stub), "PYTHON": sys.executable}
    script = EXPERIMENTS / "rezende2015_planar" / "run.sh"
    run = subprocess.run(["bash", str(script), "reduced"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    (report,) = [c for c in log.read_text().splitlines() if c.startswith("report ")]
    assert report.split("--metrics ")[1].split()[:2] == ["test/elbo_nats", r"test/nll_iw\d+_nats"]
    # one row per flow and length, whatever else the NICE rows set
    assert report.split("--by ")[1].split()[:2] == [
        "model.posterior.flow",
        "model.posterior.num_layers",
    ]


@pytest.mark.parametrize("sweep", ["sweep", "reduced", "long"])
def test_sylvester_posterior_follows_the_authors_code(sweep: str) -> None:
    """riannevdberg/sylvester-flows (models/VAE.py): q's variance is softplus(Linear(h));
    every planar/Sylvester parameter is one nn.Linear of the encoder output h itself (no
    projection of h, torch's init, a bias); the IAF row (models/flows.py) has one
    Linear(256, 320) context shared by its steps, the code's MADE, every-other reversal
    and an unbounded gate: in every row of every sweep."""
    from vaeflow.flows.autoregressive import GatedAutoregressive

    points = sw.expand(EXPERIMENTS / "vandenberg2018_sylvester" / f"{sweep}.toml", validate=False)
    assert points
    for p in points:
        cfg = load_config(p.base, p.overrides)
        post = cfg.model.posterior
        model = build_model(cfg.model)  # the options are the flow's own (a TypeError if not)
        if post.flow == "gated_iaf":
            assert (post.scale, post.context_projection) == ("softplus_var", True), p.name
            ctx = model.posterior.context
            assert (ctx.in_features, ctx.out_features) == (256, 320), p.name
            flow = model.posterior.flow
            steps = [t for t in flow.modules() if isinstance(t, GatedAutoregressive)]
            assert len(steps) == post.num_layers, p.name
            for step in steps:
                made = step.made
                assert made.style == "sylvester_code" and made.context is None, p.name
                assert step.scale_bound is None and step.forget_bias == 1.0, p.name
                assert len(made.hidden_layers) == 2 and made.hidden_layers[0].out_features == 320
            continue
        assert (post.scale, post.context_projection) == ("softplus_var", False), p.name
        assert getattr(model.posterior, "context", None) is None, p.name
        if post.flow in (
            "planar",
            "sylvester_orthogonal",
            "sylvester_householder",
            "sylvester_triangular",
        ):
            assert post.options.get("amortization") == "linear", p.name
        assert cfg.model.decoder.options.get("init") == "torch_0_3", p.name  # PyTorch 0.3's
        if post.flow == "planar":  # the code's (and the paper's) -1 + softplus
            assert post.options.get("constraint") == "softplus", p.name
        if post.flow == "sylvester_orthogonal":  # the code's iterative orthogonalisation
            assert post.options.get("orthogonalization") == "polar", p.name


def test_burda_long_mode_reports_curves_against_the_papers_numbers(tmp_path: Path) -> None:
    """`run.sh long` (issue 14's 500-epoch rows): long.toml's sweep, two single-threaded
    processes, and a report on a log-epoch axis with the paper's VAE k = 1 and IWAE k = 5
    NLLs as lines and each curve's last-doubling gain, in arguments the report accepts."""
    import argparse

    from vaeflow.tools.report import add_report_parser

    stub, log = _stub(tmp_path)
    env = {**os.environ, "VAEFLOW": str(stub), "PYTHON": sys.executable}
    env.pop("THREADS", None)
    env.pop("JOBS", None)
    script = EXPERIMENTS / "burda2016_iwae" / "run.sh"
    run = subprocess.run(
        ["bash", str(script), "long"], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert run.returncode == 0, run.stdout + run.stderr
    sweep, report = log.read_text().splitlines()
    assert sweep.startswith("sweep experiments/burda2016_iwae/long.toml --jobs 2 --threads 1")
    directory = sw.load_sweep(EXPERIMENTS / "burda2016_iwae" / "long.toml").directory
    assert report.startswith(f"report {directory} -o results/burda2016_iwae/long ")
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command"))
    args = report.split()[1:]
    args[args.index("--metrics") + 1] = r"test/nll_iw\d+_nats"  # the log lost the quotes
    parsed = parser.parse_args(["report", *_unsplit_references(args)])
    assert parsed.log_x and "test_curve/iwae_gain_last_doubling_nats" in parsed.metrics
    assert {n: v for n, v, _ in parsed.reference} == {
        "VAE k = 1 (paper Table 1)": 86.76,
        "IWAE k = 5 (paper Table 1)": 85.54,
    }


def _unsplit_references(args: list[str]) -> list[str]:
    """Re-join the words of each ``--reference 'NAME: NLL'`` that the stub's log split."""
    out: list[str] = []
    i = 0
    while i < len(args):
        if args[i] in ("--reference", "--bound-reference"):
            j = i + 1
            while not args[j].endswith(")") and ":" not in args[j]:
                j += 1
            j += 1  # the number after "...):"
            out += [args[i], " ".join(args[i + 1 : j + 1])]
            i = j + 1
        else:
            out.append(args[i])
            i += 1
    return out


@pytest.mark.slow
def test_sylvester_long_mode_trains_evaluates_in_steps_and_reports(tmp_path: Path) -> None:
    """`run.sh long` end to end on a tiny sweep (LONG_SWEEP): both rows trained without
    evaluation, scored on the fixed random 1,000 test images, then grown to all 10,000,
    and reported with their curves' gains and the paired column; a second call (a
    resumed session) redoes nothing and gives the same table."""
    data = os.environ.get("VAEFLOW_DATA") or str(REPO.parent / "shared" / "datasets")
    sweep = tmp_path / "long.toml"
    (tmp_path / "base.toml").write_text("")
    sweep.write_text(
        f"""base = "base.toml"
name = "tiny_long"
root = "{tmp_path / "runs"}"
set = [
  'data.root="{data}"', "data.val_size=500",
  "data.batch_size=20", "model.latent_dim=4", "model.encoder.options={{hidden=[16]}}",
  "model.decoder.options={{hidden=[16]}}", "train.steps=6", "train.val_every=2",
  "train.test_every=2", "train.test_k=1", "train.test_size=100", "train.ckpt_every=2",
  "train.log_every=2", "train.image_every=0", "eval.k=2", "eval.chunk=2",
]

[[variant]]
name = "no_flow"
"model.posterior.flow" = "none"

[[variant]]
name = "planar"
"model.posterior.flow" = "planar"
"""
    )
    out = tmp_path / "report"
    env = {**os.environ, "LONG_SWEEP": str(sweep), "LONG_OUT": str(out)}
    env["VAEFLOW"] = str(Path(sys.executable).parent / "vaeflow")
    env["PYTHON"] = sys.executable
    script = EXPERIMENTS / "vandenberg2018_sylvester" / "run.sh"
    import json

    def call() -> str:
        run = subprocess.run(
            ["bash", str(script), "long"], env=env, capture_output=True, text=True, cwd=tmp_path
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        return run.stdout

    call()
    for row in ("no_flow", "planar"):
        summary = json.loads((tmp_path / "runs" / "tiny_long" / row / "summary.json").read_text())
        assert summary["test/n_examples"] == 10000
        assert summary["extended_from"] == "fixed random subset of 1000 of 10000"
    table = (out / "results.md").read_text()
    assert "test bound gain over the last doubling of steps (nats)" in table
    # A second session (vaeflow stubbed: what it would be asked to do) trains and
    # evaluates nothing more: only the sweep's command list and the report.
    stub, log = _stub(tmp_path)
    env["VAEFLOW"] = str(stub)
    call()
    assert [c.split()[0] for c in log.read_text().splitlines()] == ["sweep", "report"]
    assert "| reference | reference |" in table and (out / "test_curves.png").is_file()
