"""Evaluate a finished run: test NLL (importance-sampled), ELBO, bits/dim, active units.

``evaluate_run(run_dir)`` rebuilds the model from ``config.json``, loads a checkpoint
(the run's ``eval.checkpoint``: by default ``best.pt``, or ``last.pt`` for a run without a
validation split; EMA weights when present), and scores the test split with the
standard protocol of Burda et al. 2016 / van den Berg et al. 2018: ``log p(x)``
estimated with ``k = 5000`` importance samples (chunked, memory flat in ``k``), the ELBO
from the same samples, bits/dim for 8-bit data, the number of active latent units
(``Cov_x E_q[z_d] > 0.01``, Burda et al. 2016, section 5.2) and, when posterior and prior
factorise, the KL per latent dimension. Results go to ``summary.json`` (atomically), the
per-image log p(x) and ELBO to ``test_scores.pt`` (for :mod:`vaeflow.run.compare`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..atomic import atomic_write, remove_stale_temps, write_json_atomic
from ..config import Config, from_dict
from ..data import eval_batches, load_splits, prepare_eval, test_subset, to_memory_format
from ..models.bounds import nats_to_bits_per_dim
from ..models.build import build_model
from ..models.vae import VAE
from .checkpoint import CheckpointError, load_checkpoint, load_model_state, save_checkpoint
from .logger import log_test_scalars
from .utils import resolve_device, strict_float32

__all__ = [
    "hparams_metric_tags",
    "eval_pass_shape",
    "eval_channels_last",
    "load_run",
    "resolve_checkpoint",
    "evaluate_model",
    "evaluate_run",
    "growth_path",
    "metrics_from_scores",
    "score_examples",
    "active_units",
    "sample_run",
]

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2016


def resolve_checkpoint(cfg: Config, checkpoint: str | None = None) -> str:
    """The checkpoint name to score: ``checkpoint`` if given, else ``cfg.eval.checkpoint``,
    with ``auto`` meaning ``best`` for a run with a validation split and ``last`` for one
    without (``data.val_size = 0`` keeps no ``best.pt``)."""
    name = checkpoint if checkpoint is not None else cfg.eval.checkpoint
    if name == "auto":
        return "last" if cfg.data.val_size == 0 else "best"
    if name not in ("best", "last"):
        raise ValueError(f"checkpoint must be 'best', 'last' or 'auto', got {name!r}")
    return name


def load_run(
    run_dir: str | Path,
    checkpoint: str | None = None,
    use_ema: bool = True,
    device: str = "auto",
) -> tuple[Config, VAE, dict[str, Any]]:
    """Rebuild a run's model from ``config.json`` and load ``checkpoints/<checkpoint>.pt``.

    ``checkpoint``: ``best``, ``last`` or ``auto``; ``None`` takes the run's
    ``eval.checkpoint`` (see :func:`resolve_checkpoint`). The name loaded is
    ``ckpt["checkpoint_name"]`` of the returned checkpoint dict.

    Raises:
        FileNotFoundError: no ``config.json``, or ``best.pt`` asked of a run without a
            validation split (the message says to use ``last``).
    """
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{cfg_path} not found: {run_dir} is not a vaeflow run directory "
            "(expected config.json and checkpoints/ written by `vaeflow train`)"
        )
    cfg = from_dict(Config, json.loads(cfg_path.read_text()))
    name = resolve_checkpoint(cfg, checkpoint)
    path = run_dir / "checkpoints" / f"{name}.pt"
    if name == "best" and cfg.data.val_size == 0 and not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: the run has no validation split (data.val_size = 0), "
            "so training keeps no best checkpoint; evaluate the final model with "
            "--checkpoint last (the default for such a run)"
        )
    dev = resolve_device(device)
    ckpt = load_checkpoint(path, map_location=dev, required=("model",))
    ckpt["checkpoint_name"] = name
    model = build_model(cfg.model).to(dev)
    load_model_state(model, ckpt["model"], "checkpoint")
    if use_ema and ckpt.get("ema") is not None:
        model.load_state_dict(ckpt["ema"]["shadow"], strict=False)
    model.eval()
    return cfg, model, ckpt


@torch.no_grad()
def active_units(model: VAE, x: Tensor, batch_size: int = 500, samples: int = 32) -> Tensor:
    """Per-dimension variance over ``x`` of the posterior mean ``E_q[z_d | x]``: ``(D,)``.

    Exact means for a Gaussian posterior; for flow posteriors a ``samples``-draw Monte
    Carlo mean whose own sampling variance is subtracted (otherwise a collapsed unit
    with ``Var_q = 1`` would look active: 1/32 > 0.01). A unit is active when its value
    exceeds :data:`ACTIVE_UNIT_THRESHOLD` (Burda et al. 2016).
    """
    return activity(model, x, batch_size, samples)


def activity(model: VAE, x: Tensor, batch_size: int = 500, samples: int = 32) -> Tensor:
    """``Var_x(E_q[z | x])`` per dimension ``(D,)``, noise-corrected (see active_units)."""
    means, noise = [], []
    for xb in eval_batches(x, batch_size):
        m, v = model.posterior_mean(xb, samples)
        means.append(m)
        noise.append(v)
    return torch.cat(means).double().var(0) - torch.cat(noise).double().mean(0)


#: Per-test-image scores of the last evaluation (``evaluate_run``), in the run directory.
TEST_SCORES = "test_scores.pt"

#: A long evaluation saves what it has scored at most this often (seconds), so that an
#: interrupted one continues where it stopped (:func:`evaluate_model`'s ``partial``).
PARTIAL_EVERY_S = 300.0

_PER_EXAMPLE = ("log_px", "elbo", "kl", "log_px_z", "ess")


@torch.no_grad()
def evaluate_model(
    model: VAE,
    x: Tensor,
    k: int = 5000,
    chunk: int = 500,
    batch_size: int = 20,
    bpd: bool = False,
    compile: bool = False,
    partial: Path | None = None,
    partial_key: Mapping[str, Any] | None = None,
    scores: dict[str, Tensor] | None = None,
) -> dict[str, Any]:
    """Score preprocessed test data ``x (N, *x_shape)``; metric names carry their units.

    ``compile``: see :meth:`vaeflow.models.vae.VAE.stats_sampler`.

    ``partial``: a file where the scores so far, the random state and the time spent are
    saved (atomically, every :data:`PARTIAL_EVERY_S` seconds, at batch boundaries). When
    it exists and was written for the same ``partial_key`` (checkpoint, k, pass shape,
    examples...), scoring continues after its last batch from its random state, so an
    interrupted evaluation resumed gives what an uninterrupted one gives (bit for bit on
    the CPU). The caller removes it once the results are safe.

    ``scores``: a dict to receive the per-example scores (float64, CPU, in ``x``'s
    order): ``log_px``, ``elbo``, ``kl``, ``log_px_z``, ``ess`` ``(N,)``, and when the
    model has them ``kl_dims (N, D)`` and ``layer_kl (N, L)`` -- for paired comparisons of
    runs on the same test images, and for growing an evaluation to more images.
    """
    per_example, seconds = score_examples(
        model, x, k, chunk, batch_size, compile, partial, partial_key
    )
    if scores is not None:
        scores.update(per_example)
    return metrics_from_scores(model, x, per_example, seconds, k, bpd)


@torch.no_grad()
def score_examples(
    model: VAE,
    x: Tensor,
    k: int = 5000,
    chunk: int = 500,
    batch_size: int = 20,
    compile: bool = False,
    partial: Path | None = None,
    partial_key: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Tensor], float]:
    """The k-sample estimator's per-example scores of ``x (N, *x_shape)`` (see
    :func:`evaluate_model` for ``partial`` and the fields) and the seconds spent."""
    model.eval()
    key = dict(partial_key or {})
    done = _load_partial(partial, key) if partial is not None else None
    parts: dict[str, list[Tensor]] = {name: [] for name in (*_PER_EXAMPLE, "kl_dims", "layer_kl")}
    start, seconds_before = 0, 0.0
    if done is not None:
        for name, value in done["scores"].items():
            parts[name].append(value.to(x.device))
        start, seconds_before = done["n_done"], done["seconds"]
        _set_rng_state(done["rng"], x.device)
        print(
            f"continuing the evaluation saved in {partial.name}: {start} of {len(x)} test "
            f"examples scored ({seconds_before / 60:.1f} min)",
            flush=True,
        )
    t0 = last_save = time.perf_counter()
    n_done = start
    with _factorised_prior_terms(model):
        for xb in eval_batches(x[start:], batch_size):
            ll = model.log_likelihood(xb, k=k, chunk=chunk, compile=compile)
            for name in _PER_EXAMPLE:
                parts[name].append(getattr(ll, name))
            terms = model(xb, k=8)
            if terms.kl_dims is not None:
                parts["kl_dims"].append(terms.kl_dims.double().mean(0))
            if terms.layer_kl is not None:  # a hierarchy: (L, B) per-layer KL
                parts["layer_kl"].append(torch.stack([t.double().mean(0) for t in terms.layer_kl]))
            n_done += xb.shape[0]
            if partial is not None and time.perf_counter() - last_save >= PARTIAL_EVERY_S:
                seconds = seconds_before + time.perf_counter() - t0
                _save_partial(partial, key, parts, n_done, seconds, x.device)
                last_save = time.perf_counter()
                print(_progress(n_done, len(x), start, time.perf_counter() - t0), flush=True)
    seconds = seconds_before + time.perf_counter() - t0
    per_example = {
        name: torch.cat(values, 1 if name == "layer_kl" else 0).double().cpu()
        for name, values in parts.items()
        if values
    }
    if "layer_kl" in per_example:  # (L, N) -> (N, L): every field is per example on dim 0
        per_example["layer_kl"] = per_example["layer_kl"].T.contiguous()
    return per_example, seconds


def _progress(n_done: int, total: int, start: int, seconds: float) -> str:
    """A progress line for long evaluations (hours on a CPU): how far, the rate of this
    process, and the time left at that rate."""
    rate = seconds / max(1, n_done - start)
    left = (total - n_done) * rate
    return (
        f"evaluation: {n_done} of {total} test examples scored ({rate:.2f} s each here; "
        f"about {left / 60:.0f} min left); saved, resumable"
    )


@contextmanager
def _factorised_prior_terms(model: VAE) -> Iterator[None]:
    """Score with the prior's factorised per-dimension terms only: a model that training
    set to the chain rule (``kl_chain_rule``, free bits with a mixture prior) scores the
    same fields as the model rebuilt from its checkpoint (and skips the chain's cost)."""
    before = getattr(model, "kl_chain_rule", False)
    if before:
        model.kl_chain_rule = False
    try:
        yield
    finally:
        if before:
            model.kl_chain_rule = before


def metrics_from_scores(
    model: VAE,
    x: Tensor,
    per_example: Mapping[str, Tensor],
    seconds: float,
    k: int,
    bpd: bool = False,
) -> dict[str, Any]:
    """The test metrics of per-example scores (:func:`score_examples`) of ``x``; active
    units are measured on ``x`` itself. ``seconds``: the scoring time of all of them."""
    lp = per_example["log_px"]
    n = lp.numel()
    nll = -lp.mean().item()
    out: dict[str, Any] = {
        f"test/nll_iw{k}_nats": nll,
        f"test/nll_iw{k}_stderr_nats": (lp.std() / math.sqrt(n)).item() if n > 1 else None,
        "test/elbo_nats": per_example["elbo"].mean().item(),
        "test/kl_nats": per_example["kl"].mean().item(),
        "test/recon_nats": per_example["log_px_z"].mean().item(),
        "test/ess_mean": per_example["ess"].mean().item(),
        "test/n_examples": n,
        "test/k": k,
        "test/seconds_per_example": seconds / n,
    }
    au = active_units(model, x)
    out["test/active_units"] = int((au > ACTIVE_UNIT_THRESHOLD).sum().item())
    out["test/latent_dim"] = int(au.numel())
    if "kl_dims" in per_example:
        out["test/kl_per_dim_nats"] = per_example["kl_dims"].mean(0).tolist()
    # A hierarchical model (vaeflow.models.hierarchy): active units and KL per stochastic
    # layer, bottom first (Burda et al. 2016 count active units per layer).
    sizes = getattr(model, "latent_dims", None)
    if sizes is not None and len(sizes) > 1:
        for i, part in enumerate(au.split(list(sizes)), start=1):
            out[f"test/active_units_layer{i}"] = int((part > ACTIVE_UNIT_THRESHOLD).sum().item())
    if "layer_kl" in per_example:
        for i, value in enumerate(per_example["layer_kl"].mean(0).tolist(), start=1):
            out[f"test/kl_layer{i}_nats"] = value
    if bpd:
        d = math.prod(model.x_shape)
        out["test/bpd"] = nats_to_bits_per_dim(nll, d)
        out["test/elbo_bpd"] = nats_to_bits_per_dim(-out["test/elbo_nats"], d)
    return out


def partial_path(run_dir: Path, key: Mapping[str, Any]) -> Path:
    """Where :func:`evaluate_run` keeps an evaluation's partial scores: one file per
    evaluation setting (a ``--k 100`` check does not overwrite a k = 5000 evaluation's)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return run_dir / f"eval_partial.{digest[:12]}.pt"


def _save_partial(
    path: Path,
    key: Mapping[str, Any],
    parts: Mapping[str, list[Tensor]],
    n_done: int,
    seconds: float,
    device: torch.device,
) -> None:
    scores = {}
    for name, values in parts.items():
        if values:
            dim = 1 if name == "layer_kl" else 0  # (L, B) per batch
            scores[name] = torch.cat(values, dim).cpu()
    state = {
        "key": dict(key),
        "n_done": n_done,
        "seconds": seconds,
        "scores": scores,
        "rng": _rng_state(device),
    }
    save_checkpoint(path, state)


def _load_partial(path: Path, key: Mapping[str, Any]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        state = load_checkpoint(path)
    except CheckpointError as err:
        warnings.warn(f"{path} is unreadable ({err}); evaluating from the start", stacklevel=3)
        return None
    if state.get("key") != dict(key):
        warnings.warn(
            f"{path} was written for another evaluation ({state.get('key')}); evaluating "
            "from the start",
            stacklevel=3,
        )
        return None
    return state


def _rng_state(device: torch.device) -> dict[str, Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


#: Importance samples scored per pass when eval.batch_size / eval.chunk are left to the
#: device: the settings nearest the machine's matmul rate in benchmarks/nll_eval.py (about
#: 1,000 on the 2-core CPU; >= 100,000 on an H200, where smaller passes are host-bound).
SAMPLES_PER_PASS = {"cpu": 1_000, "cuda": 100_000}
#: The same for convolutional decoders, whose activations per sample are far larger: a
#: 100,000-sample pass of a conv decoder does not fit a GPU. CPU: 1,000 (the Sylvester
#: gated-conv VAE in NHWC: 4.8 s per image at 1,000 samples per pass against 5.4 s at 500,
#: 480 MiB; benchmarks/README.md); CUDA: a safe starting point, not measured.
SAMPLES_PER_PASS_CONV = {"cpu": 1_000, "cuda": 5_000}


def eval_pass_shape(
    k: int,
    device: torch.device,
    chunk: int | None = None,
    batch_size: int | None = None,
    conv: bool = False,
) -> tuple[int, int]:
    """``(batch_size, chunk)`` of the k-sample estimator on ``device``.

    Given values are kept; a missing one is chosen so that ``batch_size x chunk`` is near
    :data:`SAMPLES_PER_PASS` (``conv``: :data:`SAMPLES_PER_PASS_CONV`) for the device type
    (device types other than CUDA get the CPU's): the chunk covers as many of an example's
    ``k`` samples as fit, and the batch takes the rest.
    """
    table = SAMPLES_PER_PASS_CONV if conv else SAMPLES_PER_PASS
    target = table["cuda" if device.type == "cuda" else "cpu"]
    if chunk is None:
        chunk = max(1, min(k, target // (batch_size or 1)))
    if batch_size is None:
        batch_size = max(1, target // chunk)
    return batch_size, chunk


def eval_channels_last(
    setting: bool | None, train_setting: bool, conv: bool, device: torch.device
) -> bool:
    """Whether the evaluation scores in NHWC: ``eval.channels_last`` when set; else NHWC
    for a convolutional model on the CPU (where oneDNN's NCHW transposed convolutions are
    the bottleneck of the k-sample estimator), else the training layout."""
    if setting is not None:
        return setting
    return train_setting or (conv and device.type == "cpu")


@strict_float32()  # a reported bound is a float32 number, whatever training used
def evaluate_run(
    run_dir: str | Path,
    k: int | None = None,
    chunk: int | None = None,
    n_test: int | None = None,
    checkpoint: str | None = None,
    use_ema: bool | None = None,
    device: str = "auto",
    data_root: str | None = None,
    compile: bool | None = None,
    reuse: bool = True,
) -> dict[str, Any]:
    """Evaluate a run directory on its test split and write ``summary.json``.

    Arguments left ``None`` come from the run's ``[eval]`` config; ``checkpoint`` (``best``,
    ``last`` or ``auto``) from ``eval.checkpoint`` (see :func:`resolve_checkpoint`), and
    ``summary.json`` records the one scored (``"checkpoint": "last"``, say).

    Growing an evaluation (``reuse``): when ``test_scores.pt`` holds the scores of a
    *smaller* set of this run's test images under the same estimator (checkpoint and its
    step, EMA, k, dtype; the pass shape, device and compilation may differ), only the
    other images are scored and the two are merged. Fixed random subsets are nested (the
    1,000 images of ``--n-test 1000`` are among any larger subset's), so a k = 5000
    evaluation of 1,000 images can grow to all 10,000 later, or on another machine. Every
    image's estimate is independent and unbiased either way; the merged numbers are not
    bit-identical to a one-pass evaluation's (other noise draws), and ``summary.json``
    says what was extended (``extended_from``). ``reuse=False`` scores every image again.
    """
    run_dir = Path(run_dir)
    cfg, model, ckpt = load_run(run_dir, checkpoint, use_ema is not False, device)
    # Leftovers of an interrupted write (of summary.json, say). Only the top level: the
    # run's training, which may still be running, cleans checkpoints/ and samples/.
    remove_stale_temps(run_dir)
    e = cfg.eval
    k = k or e.k
    n_test = n_test if n_test is not None else e.n_test
    if use_ema is None and not e.use_ema and ckpt.get("ema") is not None:
        model.load_state_dict(ckpt["model"])  # the run's config asks for the raw weights
    use_ema = e.use_ema if use_ema is None else use_ema
    compile = e.compile if compile is None else compile
    dev = next(model.parameters()).device
    conv = cfg.model.decoder.name != "mlp" or cfg.model.topdown is not None
    batch_size, chunk = eval_pass_shape(k, dev, chunk or e.chunk, e.batch_size, conv=conv)
    splits = load_splits(
        cfg.data.dataset, data_root or cfg.data.root, val_size=cfg.data.val_size, download=True
    )
    x = prepare_eval(splits.test, splits.kind, cfg.data.binarization, cfg.data.seed, dev)
    indices, subset = test_subset(len(x), n_test)
    if indices is not None:
        x = x[indices.to(dev)]
    nhwc = eval_channels_last(e.channels_last, cfg.train.channels_last, conv, dev)
    if nhwc:
        model = model.to(memory_format=torch.channels_last)
        x = to_memory_format(x, channels_last=True)
    torch.manual_seed(cfg.train.seed)
    key = {
        "checkpoint": ckpt["checkpoint_name"],
        "checkpoint_step": ckpt.get("step"),
        "ema": bool(use_ema and ckpt.get("ema") is not None),
        "k": k,
        "chunk": chunk,
        "batch_size": batch_size,
        "test_examples": subset,
        "compiled": compile,
        "channels_last": nhwc,
        "device": dev.type,
        "dtype": str(x.dtype),
        # The weights themselves, not only their name and step: a run retrained to the
        # same step after a fix must not have its old scores merged into new ones.
        "checkpoint_sha256": _file_sha256(ckpt_path(run_dir, ckpt["checkpoint_name"])),
    }
    order = torch.arange(len(x)) if indices is None else indices
    base = growth_path(run_dir, key, cfg.data.dataset)
    earlier = None
    # An interrupted evaluation of exactly these images (a --fresh one, say) is resumed
    # rather than set aside for a growth that would score its images again.
    if reuse and base.is_file() and not partial_path(run_dir, key).is_file():
        fields = _score_fields(model, x)
        earlier = _earlier_scores(base, key, cfg.data.dataset, order, fields)
    todo = torch.ones(len(order), dtype=torch.bool)
    if earlier is not None:
        todo = ~torch.isin(order, earlier["indices"])
        key["extends"] = earlier["evaluation"]["test_examples"]
        # Fresh noise for the new images, not the stream the earlier ones were scored with.
        torch.manual_seed(_extension_seed(cfg.train.seed, len(earlier["indices"])))
        print(
            f"{base.name} holds this evaluation's scores of {len(earlier['indices'])} of the "
            f"{len(order)} test examples ({earlier['evaluation']['test_examples']}): scoring "
            f"the other {int(todo.sum())}",
            flush=True,
        )
    partial = partial_path(run_dir, key)
    x_todo = x
    if earlier is not None:
        x_todo = to_memory_format(x[todo.nonzero().squeeze(1).to(dev)], channels_last=nhwc)
    new, seconds = score_examples(
        model,
        x_todo,
        k=k,
        chunk=chunk,
        batch_size=batch_size,
        compile=compile,
        partial=partial,
        partial_key=key,
    )
    scores = _merge_scores(order, todo, new, earlier)
    this_pass = {
        "examples": int(todo.sum()),
        "seconds": seconds,
        "device": dev.type,
        "batch_size": batch_size,
        "chunk": chunk,
        "compiled": compile,
        "channels_last": nhwc,
    }
    passes = [*(earlier["passes"] if earlier is not None else []), this_pass]
    seconds = sum(p["seconds"] for p in passes)
    metrics = metrics_from_scores(model, x, scores, seconds, k, bpd=splits.kind == "8bit")
    summary = {
        "run_dir": str(run_dir),
        "checkpoint": ckpt["checkpoint_name"],
        "checkpoint_step": ckpt.get("step"),
        "ema": bool(use_ema and ckpt.get("ema") is not None),
        "compiled": compile,
        "channels_last": nhwc,
        "batch_size": batch_size,
        "chunk": chunk,
        "dataset": cfg.data.dataset,
        "binarization": cfg.data.binarization if splits.kind == "binary" else None,
        "test_examples": subset,
        "notes": list(splits.notes),
        **metrics,
    }
    if earlier is not None:
        summary["extended_from"] = earlier["evaluation"]["test_examples"]
        summary["passes"] = passes  # where and how each part of the images was scored
    # Per-image scores beside the summary: `vaeflow compare` pairs two runs' images (the
    # last evaluation), and a later evaluation of more images with the same estimator
    # scores only the ones not in its growth file (kept per estimator, so a quick check at
    # another k in between does not lose hours of k = 5000 scores).
    key.pop("extends", None)
    record = {
        "evaluation": key,
        "dataset": cfg.data.dataset,
        "indices": order,
        "log_px": scores["log_px"],
        "elbo": scores["elbo"],
        "per_example": scores,
        "seconds": seconds,
        "passes": passes,
    }
    last = {f: record[f] for f in ("evaluation", "dataset", "indices", "log_px", "elbo")}
    save_checkpoint(run_dir / TEST_SCORES, last)  # what compare reads; the rest is in base
    if earlier is not None or _stored_examples(base) < len(order):
        save_checkpoint(base, record)  # never replaced by fewer images
    write_json_atomic(run_dir / "summary.json", summary)
    partial.unlink(missing_ok=True)  # the scores are safe in summary.json now
    # The run's HParams row names the tags of a full evaluation at the config's k: only
    # such an evaluation fills them (a reduced one would share a tag and a step with it).
    # Only those columns go to TensorBoard: each is a one-point chart in the SCALARS tab
    # (above the curves, as TensorBoard sorts groups by name), and summary.json has all.
    if indices is None and k == e.k:
        columns = set(hparams_metric_tags(cfg))
        log_test_scalars(
            run_dir,
            {n: v for n, v in metrics.items() if n in columns and isinstance(v, float)},
            int(ckpt.get("step") or 0),
        )
    return summary


#: The evaluation-key fields that define the estimator: scores agree on them or are not
#: merged. The pass shape, device, compilation and memory layout only change how the same
#: estimator is computed.
_ESTIMATOR_FIELDS = ("checkpoint", "checkpoint_step", "checkpoint_sha256", "ema", "k", "dtype")


def ckpt_path(run_dir: Path, name: str) -> Path:
    """``run_dir/checkpoints/<name>.pt``."""
    return run_dir / "checkpoints" / f"{name}.pt"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def growth_path(run_dir: Path, key: Mapping[str, Any], dataset: str) -> Path:
    """The file that keeps the most test images scored with one estimator
    (:data:`_ESTIMATOR_FIELDS` and the dataset) -- what a larger evaluation grows from."""
    estimator = {f: key[f] for f in _ESTIMATOR_FIELDS} | {"dataset": dataset}
    digest = hashlib.sha256(json.dumps(estimator, sort_keys=True, default=str).encode())
    return run_dir / f"test_scores.{digest.hexdigest()[:12]}.pt"


def _stored_examples(path: Path) -> int:
    """How many images a growth file holds (0 when missing or unreadable)."""
    try:
        return len(load_checkpoint(path)["indices"]) if path.is_file() else 0
    except (CheckpointError, KeyError, TypeError):
        return 0


@torch.no_grad()
def _score_fields(model: VAE, x: Tensor) -> set[str]:
    """The per-example fields :func:`score_examples` gives for ``model`` (a one-sample
    pass of one image, the random state put back as it was)."""
    state = _rng_state(x.device)
    try:
        with _factorised_prior_terms(model):
            terms = model(x[:1], k=1)
    finally:
        _set_rng_state(state, x.device)
    fields = set(_PER_EXAMPLE)
    if terms.kl_dims is not None:
        fields.add("kl_dims")
    if terms.layer_kl is not None:
        fields.add("layer_kl")
    return fields


def _earlier_scores(
    path: Path, key: Mapping[str, Any], dataset: str, order: Tensor, fields: set[str]
) -> dict[str, Any] | None:
    """A growth file's record when this evaluation can grow from it: the same dataset and
    estimator, every per-example field of this model for every stored image, and images
    that are a proper subset of ``order``; else ``None`` (every image is scored). A file
    that cannot be used is reported, never half-used."""
    try:
        stored = load_checkpoint(path)
        evaluation = stored["evaluation"]
        done, per_example = stored["indices"], stored["per_example"]
        valid = (
            isinstance(done, Tensor)
            and done.dim() == 1
            and len(torch.unique(done)) == len(done)
            and set(per_example) == fields
            and all(v.shape[0] == len(done) for v in per_example.values())
            and all(f in p for p in stored["passes"] for f in ("examples", "seconds"))
            and "test_examples" in evaluation
        )
    except (CheckpointError, KeyError, TypeError, AttributeError) as err:
        warnings.warn(f"{path} is unusable ({err!r}); scoring every image", stacklevel=3)
        return None
    if not valid:
        warnings.warn(
            f"{path} does not hold this model's per-image scores ({sorted(fields)}) for "
            "each of its images; scoring every image",
            stacklevel=3,
        )
        return None
    if stored.get("dataset") != dataset or any(
        evaluation.get(f) != key[f] for f in _ESTIMATOR_FIELDS
    ):
        return None
    if len(done) >= len(order) or not bool(torch.isin(done, order).all()):
        return None  # the same images (score them again) or not a subset
    return stored


def _extension_seed(seed: int, n_done: int) -> int:
    """The random seed of a grown evaluation's new images (not the first pass's stream)."""
    digest = hashlib.sha256(f"{seed}/extend/{n_done}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _merge_scores(
    order: Tensor,
    todo: Tensor,
    new: Mapping[str, Tensor],
    earlier: Mapping[str, Any] | None,
) -> dict[str, Tensor]:
    """Per-example scores of every image of ``order`` (test-set indices ``(N,)``):
    ``new`` for the ``todo`` ones, in ``order``'s order; the earlier evaluation's (its
    ``indices`` and ``per_example``) for the rest."""
    if earlier is None:
        return dict(new)
    old = earlier["per_example"]
    position = {int(i): p for p, i in enumerate(earlier["indices"].tolist())}
    rows = torch.tensor([position[int(i)] for i in order[~todo].tolist()], dtype=torch.long)
    merged = {}
    for name, values in new.items():
        out = values.new_empty((len(order), *values.shape[1:]))
        out[todo] = values
        out[~todo] = old[name][rows].to(values)
        merged[name] = out
    return merged


def hparams_metric_tags(cfg: Config) -> list[str]:
    """The HParams table's metric columns in reading order: the test metrics `vaeflow
    eval` adds (logger.log_test_scalars; the test NLL first), then tags of curves the run
    logs (validation, or training without a validation split)."""
    k = cfg.eval.k
    tags = [f"test/nll_iw{k}_nats", "test/elbo_nats"]
    if cfg.data.dataset == "cifar10":
        tags.append("test/bpd")
    if cfg.data.val_size == 0:  # no validation curves: the training ones, interval means
        return [*tags, "train/mean_elbo_nats", "train/mean_kl_nats"]
    return [*tags, "val/elbo_nats", f"val/iwae_k{cfg.train.val_k}_nats", "val/kl_nats"]


@torch.no_grad()
def sample_run(
    run_dir: str | Path,
    n: int = 64,
    checkpoint: str | None = None,
    device: str = "auto",
    seed: int = 0,
    temperature: float = 1.0,
) -> Path:
    """Write a grid of ``n`` prior samples (likelihood means) to ``samples/``; return its path.

    ``temperature`` scales the prior's noise (see :meth:`vaeflow.models.vae.VAE.sample`);
    ``checkpoint`` as in :func:`load_run`.
    """
    from torchvision.utils import save_image

    _, model, ckpt = load_run(run_dir, checkpoint, True, device)
    torch.manual_seed(seed)
    images = model.sample(n, temperature=temperature).clamp(0, 1).cpu()
    name = f"prior_{ckpt['checkpoint_name']}_step{ckpt.get('step', 0):07d}_t{temperature:g}.png"
    out = Path(run_dir) / "samples" / name
    with atomic_write(out, "wb") as f:  # the temp name has no .png suffix: say the format
        save_image(images, f, format="png", nrow=int(math.sqrt(n)) or 1)
    return out
