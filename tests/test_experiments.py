"""Every experiment folder is runnable as committed: configs, sweeps and run scripts agree.

Each sweep file under ``experiments/`` is expanded with full validation (every point's
config is built and each distinct model constructed), so a renamed option, a flow that no
longer exists or a typo in a grid fails here rather than hours into a GPU job.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from vaeflow import sweep as sw
from vaeflow.config import load_config

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
def test_every_experiment_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.train.steps >= 1


def test_reduced_sweeps_only_shrink_the_budget() -> None:
    """A reduced sweep keeps its paper sweep's rows: same point names, same base."""
    for reduced in EXPERIMENTS.glob("*/reduced*.toml"):
        full_name = reduced.read_text().split('extends = "', 1)[1].split('"', 1)[0]
        full = sw.expand(reduced.parent / full_name, validate=False)
        small = sw.expand(reduced, validate=False)
        assert {p.base for p in small} == {p.base for p in full}
        assert {p.name for p in small} <= {p.name for p in full}, reduced


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("name", PAPER_EXPERIMENTS)
def test_run_scripts_parse(name: str) -> None:
    subprocess.run(["bash", "-n", str(EXPERIMENTS / name / "run.sh")], check=True)
    subprocess.run(["bash", "-n", str(EXPERIMENTS / "_run_sweep.sh")], check=True)
