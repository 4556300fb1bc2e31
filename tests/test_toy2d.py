"""Toy 2-D data and the toy2d experiment script (a few-step smoke run)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.flows.harness import gaussian_grid_integral
from vaeflow.tools.toy2d import TOY_DATASETS, sample_toy, true_log_prob

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("toy2d_run", ROOT / "experiments/toy2d/run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", sorted(TOY_DATASETS))
def test_samplers_are_reproducible_and_seed_dependent(name):
    a, b, c = sample_toy(name, 500, 0), sample_toy(name, 500, 0), sample_toy(name, 500, 1)
    assert a.shape == (500, 2) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.abs().max() < 5


def test_true_densities_are_normalised_and_match_the_samplers(float64):
    total = gaussian_grid_integral(lambda x: true_log_prob("eight_gaussians", x), lim=5.0)
    assert abs(total - 1.0) < 1e-6
    x = sample_toy("checkerboard", 20000, 0, dtype=torch.float64)
    # Samples fill exactly the 8 squares of side 1.5 (area 18) where the density is 1/18.
    assert torch.allclose(true_log_prob("checkerboard", x), torch.tensor(-2.8903717578961645))
    cells = torch.unique(torch.floor(x / 1.5), dim=0)
    assert len(cells) == 8


def test_experiment_script_smoke(tmp_path):
    run = _load_script()
    results = run.main(
        [
            "--datasets",
            "eight_gaussians",
            "--only",
            "RealNVP",
            "NSF",
            "--steps",
            "3",
            "--out",
            str(tmp_path),
        ]
    )
    assert len(results) == 2
    data = json.loads((tmp_path / "results.json").read_text())
    assert {r["flow"] for r in data["results"]} == {"RealNVP", "NSF"}
    assert all(r["true_ll_nats"] is not None for r in data["results"])
    for f in ("results.md", "density.png", "samples.png"):
        assert (tmp_path / f).stat().st_size > 0


def test_experiment_config_rejects_unknown_keys(tmp_path):
    run = _load_script()
    cfg = (ROOT / "experiments/toy2d/config.toml").read_text().replace("lr =", "learning_rate =")
    bad = tmp_path / "bad.toml"
    bad.write_text(cfg)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['learning_rate'\]"):
        run.load_config(bad)
