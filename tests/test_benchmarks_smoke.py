"""Smoke runs of the benchmark scripts: tiny sizes, one repeat, exit code and table shape.

The benchmarks themselves are never asserted on (numbers depend on the machine); these
tests only check that the scripts still run against the current library and print the
rows they promise. Each test is self-contained (its own subprocess and helpers).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_flows_benchmark(extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
        **(extra_env or {}),
    }
    cmd = [
        sys.executable,
        "benchmarks/flows.py",
        "--small",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--threads",
        "1",
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def _flows_table_rows(stdout: str) -> list[list[str]]:
    """Cells of the markdown table's body rows (header and separator dropped)."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("| ")]
    assert lines and lines[0].startswith("| case | library |"), stdout
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:]]


def _flows_cases() -> list[str]:
    """``CASES`` of benchmarks/flows.py, imported without leaving its ``sys.path`` edits."""
    name = "_vaeflow_benchmarks_flows"
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "flows.py")
    module = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
        return list(module.CASES)
    finally:
        sys.path[:] = saved
        sys.modules.pop(name, None)
        sys.modules.pop("_timing", None)


@pytest.mark.parametrize("disable", ["", "zuko,nflows"], ids=["installed-peers", "peers-disabled"])
def test_flows_benchmark_smoke(disable: str) -> None:
    """Exit 0; a timed vaeflow row for every case; a missing peer is named, not fatal.

    ``VAEFLOW_BENCH_DISABLE=zuko,nflows`` makes the script treat both peers as missing,
    so the "not installed" branch is exercised whether or not they are installed (CI
    installs ``.[dev]`` only, where the first run takes the same branch for real).
    """
    proc = _run_flows_benchmark({"VAEFLOW_BENCH_DISABLE": disable})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = _flows_table_rows(proc.stdout)
    vaeflow_rows = {r[0]: r for r in rows if r[1] == "vaeflow"}
    assert sorted(vaeflow_rows) == sorted(_flows_cases()), proc.stdout
    for case, row in vaeflow_rows.items():
        assert "failed" not in " ".join(row), (case, row)
        assert row[3].count("/") == 2, (case, row)  # train ms median / min / max
    for peer in ("zuko", "nflows"):
        missing = f"{peer} not installed: pip install -e '.[bench]'"
        peer_rows = [r for r in rows if r[1] == peer]
        if peer in disable.split(","):
            assert missing in proc.stdout and not peer_rows, proc.stdout
        else:
            # installed: one row per case; not installed: the message instead
            assert (missing in proc.stdout) != bool(peer_rows), proc.stdout
            if peer_rows:
                assert len(peer_rows) == len(vaeflow_rows), proc.stdout


def _run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, f"benchmarks/{script}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


def test_train_step_benchmark_smoke() -> None:
    """Every benchmarked model runs a real training step (tiny widths) and gets a row."""
    proc = _run_script(
        "train_step.py", "--small", "--repeats", "1", "--warmup", "1", "--channels-last"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ") and "eager" in ln]
    assert len(rows) == 16, proc.stdout  # 8 models x (eager, eager + channels_last)
    assert not any("failed" in r for r in rows), proc.stdout


def test_train_step_benchmark_compile_step_smoke() -> None:
    """The compiled-step rows (train.compile_step), timed interleaved with eager."""
    proc = _run_script(
        "train_step.py",
        "--small",
        "--models",
        "quickstart",
        "--compile-step",
        "--channels-last",
        "--interleave",
        "--repeats",
        "1",
        "--warmup",
        "0",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| quickstart |")]
    labels = [r.split(" | ")[1] for r in rows]
    assert labels == [
        "eager",
        "eager + channels_last",
        "compiled step",
        "compiled step + channels_last",
    ], proc.stdout
    assert not any("failed" in r for r in rows), proc.stdout


def test_train_loop_benchmark_smoke() -> None:
    """The real loop (train()) eager and with the compiled step: one row each, a rate."""
    proc = _run_script(
        "train_loop.py",
        "--small",
        "--model",
        "quickstart",
        "--steps",
        "6",
        "--log-every",
        "2",
        "--settle",
        "2",
        "--repeats",
        "1",
        "--threads",
        "1",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith(("| eager |", "| compiled"))]
    assert len(rows) == 2, proc.stdout
    for row in rows:
        assert float(row.split(" | ")[2].split()[0]) > 0, row  # steps/s


def test_epoch_benchmark_times_the_compiled_update() -> None:
    """--compile-step (issue 14's GPU target: a Burda epoch in <= 1 s with graphs) times
    the loop's compiled update of the experiment's own row, and says so."""
    row = "burda2016_iwae/vae_k1"
    args = ("--small", "--repeats", "1", "--warmup", "1", "--compile-step", "--rows", row)
    proc = _run_script("epoch.py", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "compiled update (train.compile_step)" in proc.stdout
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith(f"| {row} |")]
    assert "failed" not in line and float(line.split(" | ")[4]) > 0, line  # ms/step


def test_epoch_benchmark_smoke() -> None:
    """The cost table measures the experiments' own rows (expanded from their sweeps) and
    projects each config's budget; a chosen subset runs on tiny widths."""
    rows = ["burda2016_iwae/iwae_k5", "vandenberg2018_sylvester/o_snf", "flow_priors/gauss+vamp"]
    proc = _run_script("epoch.py", "--small", "--repeats", "1", "--warmup", "1", "--rows", *rows)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    table = [
        ln for ln in lines if ln.startswith("| ") and "/" in ln and "experiment/row" not in ln
    ]
    assert [ln.split(" | ")[0][2:] for ln in table] == rows, proc.stdout
    assert not any("failed" in r for r in table), proc.stdout
    # The projection's epoch count, on the real config: Burda's 9,774,400 steps of batch
    # 20 on 59,600 images are the paper's 3280 epochs.
    full = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.path[:0] = ['benchmarks', '.']; "
            "from epoch import train_examples; from vaeflow.config import load_config; "
            "c = load_config('experiments/burda2016_iwae/config.toml'); "
            "print(train_examples(c), c.train.steps * c.data.batch_size / train_examples(c))",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert full.stdout.split() == ["59600", "3280.0"], full.stdout + full.stderr


def test_nll_eval_benchmark_smoke() -> None:
    """The speed table (with FLOP counts and the matmul replay) and the memory table."""
    proc = _run_script("nll_eval.py", "--small", "--threads", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "### Speed" in proc.stdout and "### Memory vs k" in proc.stdout, proc.stdout
    speed = proc.stdout.split("### Speed", 1)[1].split("###", 1)[0]
    body = [ln for ln in speed.splitlines() if ln.startswith("| eager |")]
    assert len(body) == 4, proc.stdout  # 2 batch sizes x 2 chunk sizes in --small
    for line in body:
        achieved = float(line.split("|")[6])  # | mode | batch | chunk | s | min/max | GFLOP/s
        assert achieved > 0, line  # the FLOP counter saw the model's matmuls


def test_train_conv_bound_smoke() -> None:
    """The conv-bound table: a step, its convolutions replayed (with their share), a
    matmul, and the ceiling line."""
    proc = _run_script("train_conv_bound.py", "--small", "--repeats", "1", "--warmup", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "of the step |" in proc.stdout and "Ceiling for any speed-up" in proc.stdout


@pytest.mark.parametrize(
    ("model", "variants"),
    [
        ("burda", []),  # every variant, the compiled ones included
        ("sylvester", ["--variants", "sequential", "stacked_before", "stacked"]),
    ],
)
def test_stack_benchmark_smoke(model: str, variants: list[str]) -> None:
    """N stacked runs vs N sequential runs, the MLP and the gated-conv model (whose
    orthogonal Sylvester flows run under vmap): one table row per N."""
    proc = _run_script(
        "stack.py", "--small", "--model", model, "--sizes", "1", "2", "--steps", "2",
        "--repeats", "1", *variants,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 2, proc.stdout


def test_matmul_trace_counts_exact_flops() -> None:
    """nll_eval's FLOP counter: 2*m*k*n per matmul, for 3-D linears (addmm), bmm, baddbmm."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from nll_eval import MatmulTrace
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    import torch

    lin = torch.nn.Linear(200, 784)
    a, b, c = torch.randn(5, 7, 3), torch.randn(5, 3, 4), torch.randn(5, 7, 4)
    with torch.no_grad(), MatmulTrace() as trace:
        lin(torch.randn(3, 7, 200))  # one addmm of (21, 200) x (200, 784)
        torch.bmm(a, b)
        torch.baddbmm(c, a, b)
        torch.randn(6, 8) @ torch.randn(8, 9)  # mm
    assert trace.flops == 2 * 21 * 200 * 784 + 2 * (2 * 5 * 7 * 3 * 4) + 2 * 6 * 8 * 9
    # Under inference_mode (the evaluator's) linear arrives undecomposed; same count.
    with torch.inference_mode(), MatmulTrace() as trace:
        lin(torch.randn(3, 7, 200))
    assert trace.flops == 2 * 21 * 200 * 784


def test_op_trace_counts_convolution_flops() -> None:
    """nll_eval's FLOP counter for convolutions: 2 x output elements x (in channels per
    group) x kernel area; transposed: 2 x input elements x (out channels per group) x
    kernel area -- with autograd on (aten.convolution) and under inference_mode (conv2d /
    conv_transpose2d arrive undecomposed, with defaults left out)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from nll_eval import MatmulTrace
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    import torch

    conv = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    deconv = torch.nn.ConvTranspose2d(6, 8, 5, stride=2, padding=2, output_padding=1)
    x = torch.randn(3, 4, 9, 9)
    expected = 2 * (3 * 6 * 5 * 5) * (4 // 2) * 9 + 2 * (3 * 6 * 5 * 5) * 8 * 25
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx(), MatmulTrace() as trace:
            y = deconv(conv(x))
        assert tuple(y.shape) == (3, 8, 10, 10)
        assert trace.conv_flops == expected, ctx
        assert trace.flops == expected and trace.matmul_flops == 0


def test_nll_eval_benchmark_conv_model_smoke() -> None:
    """A convolutional experiment model in the speed table: the counter sees its
    convolutions (conv share near 100 %) and the replay runs them."""
    proc = _run_script("nll_eval.py", "--small", "--threads", "1", "--model", "sylvester")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    body = [ln for ln in proc.stdout.splitlines() if ln.startswith("| eager |")]
    assert len(body) == 4, proc.stdout
    for line in body:
        cells = [c.strip() for c in line.split("|")]  # cells[6]: GFLOP/s, [9]: conv share
        assert float(cells[6]) > 0 and float(cells[9].rstrip(" %")) >= 90, line


def test_nll_eval_benchmark_experiment_model_with_overrides() -> None:
    """A model given as a config plus --set overrides (Rezende's NICE K = 80 row) is built
    with the overrides applied, and the header says which ones."""
    proc = _run_script("nll_eval.py", "--small", "--threads", "1", "--model", "rezende_nice_k80")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    header = next(ln for ln in proc.stdout.splitlines() if ln.startswith("model:"))
    assert 'model.posterior.flow="nice"' in header and "num_layers=80" in header, header
    assert "14.95M parameters" in header, header  # 80 couplings with 400-unit conditioners


def test_nll_eval_benchmark_on_a_trained_run(tmp_path: Path) -> None:
    """--run scores a trained run's model on its own test images, and the bf16 row
    reports its difference from float32 (the tolerance is measured on trained models)."""
    from vaeflow.cli import main as cli_main

    run = tmp_path / "run"
    tiny = [
        "model.latent_dim=4",
        "model.encoder.options={hidden=[16]}",
        "model.decoder.options={hidden=[16]}",
        "train.steps=3",
        "train.val_size=50",
        "train.device=cpu",
        "eval.k=4",
        "eval.n_test=5",
    ]
    config = tmp_path / "tiny.toml"
    config.write_text("")  # the defaults, shrunk by the overrides
    args = ["train", str(config), "--run-dir", str(run)]
    for item in tiny:
        args += ["--set", item]
    assert cli_main(args) == 0
    proc = _run_script(
        "nll_eval.py",
        "--run",
        str(run),
        "--images",
        "3",
        "--k",
        "10",
        "--batch",
        "1",
        "--chunk",
        "10",
        "--modes",
        "eager",
        "bf16",
        "--repeats",
        "1",
        "--memory-ks",
        "10",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"trained run {run}" in proc.stdout
    (bf16,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("| bf16 |")]
    (eager,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("| eager |")]
    # bf16 rounding moves every image's estimate (same noise, seed 1): a difference of
    # exactly 0 would mean the row never ran in bf16; the float32 row is the reference.
    assert 0 < float(bf16.split("|")[-2]) < 50, bf16
    assert eager.split("|")[-2].strip() == "-", eager


def test_gpu_check_precision_section_runs(tmp_path: Path) -> None:
    """gpu_check.py's section 6 (TF32 / bf16 against float32 on a trained model's bounds,
    with the stated tolerance) runs as written; on a CPU TF32 changes nothing, so its row
    differs by exactly 0 and is within tolerance, and bf16 autocast moves the bound."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import TOLERANCE_NATS, check_precision

    lines: list[str] = []
    check_precision(lines, steps=2, device="cpu", images=20)
    text = "\n".join(lines)
    assert f"tolerance mean |diff| <= {TOLERANCE_NATS['mean_abs']}" in text
    (tf32,) = [ln for ln in lines if ln.startswith("| TF32 |")]
    assert tf32 == "| TF32 | +0.0000 | 0.0000 | +0.0000 | 0.0000 | yes |", tf32
    (bf16,) = [ln for ln in lines if ln.startswith("| bf16 autocast |")]
    assert float(bf16.split(" | ")[2]) > 0, bf16


def test_gpu_check_stack_section_runs() -> None:
    """gpu_check.py's section 7 (stacked vs solo runs) runs as written; on the CPU, eager,
    the stacked runs end where the solo runs do, to float32 rounding."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import check_stack

    lines: list[str] = []
    check_stack(lines, steps=3, device="cpu", variants=("eager",), small=True)
    (row,) = [ln for ln in lines if ln.startswith("| eager |")]
    assert float(row.split(" | ")[1]) < 1e-4, row
