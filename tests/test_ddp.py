"""Data-parallel training with torch.distributed: 2 CPU processes on the gloo backend."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vaeflow.config import ModelConfig, from_dict
from vaeflow.models.bounds import elbo
from vaeflow.models.build import build_model
from vaeflow.run.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DATA = os.environ.get("VAEFLOW_DATA") or str(ROOT.parent / "shared" / "datasets")

MODEL = {
    "x_shape": [1, 28, 28],
    "latent_dim": 6,
    "encoder": {"name": "mlp", "options": {"hidden": [32]}},
    "decoder": {"name": "mlp", "options": {"hidden": [32]}},
    "posterior": {"flow": "iaf", "num_layers": 1, "hidden": 16, "context_features": 4},
    "prior": {"name": "flow", "flow": "realnvp", "num_layers": 2, "hidden": 8},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )


def _data() -> torch.Tensor:
    return torch.bernoulli(
        torch.full((8, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(1)
    )


def _grad_worker(rank: int, world: int, port: int, out: str) -> None:
    _env(rank, world, port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = build_model(from_dict(ModelConfig, MODEL))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    x = _data()
    torch.manual_seed(100 + rank)
    (-elbo(ddp(x[rank::world], k=2)).mean()).backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters()}, out)
    # Both ranks leave together: tearing down gloo while the peer is still connected can
    # abort the peer ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_gradients_match_single_process(tmp_path):
    """DDP's averaged gradient over two shards == the single-process gradient of the mean
    of the two shard losses (with the same per-shard posterior noise)."""
    out = str(tmp_path / "grads.pt")
    mp.spawn(_grad_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    ddp_grads = torch.load(out, weights_only=True)
    torch.manual_seed(0)
    model = build_model(from_dict(ModelConfig, MODEL))
    x = _data()
    for r in range(2):
        torch.manual_seed(100 + r)
        (-elbo(model(x[r::2], k=2)).mean() / 2).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(ddp_grads[name], p.grad, rtol=1e-5, atol=1e-6), name


def _train_worker(rank: int, world: int, port: int, run_dir: str) -> None:
    _env(rank, world, port)
    torch.set_num_threads(1)
    from vaeflow.config import load_config
    from vaeflow.run.train import train

    cfg = load_config(
        None,
        [
            f'data.root="{DATA}"',
            "data.batch_size=20",
            "data.eval_batch_size=100",
            "model.latent_dim=6",
            "model.encoder.options={hidden=[32]}",
            "model.decoder.options={hidden=[32]}",
            'model.posterior.flow="iaf"',
            "model.posterior.num_layers=1",
            "model.posterior.hidden=16",
            "train.steps=6",
            "train.val_every=6",
            "train.val_size=100",
            "train.val_k=2",
            "train.device=cpu",
            "train.log_every=3",
        ],
    )
    train(cfg, run_dir)
    dist.destroy_process_group()


def test_ddp_training_run_two_gloo_processes(tmp_path):
    run_dir = tmp_path / "ddp"
    mp.spawn(_train_worker, args=(2, _free_port(), str(run_dir)), nprocs=2, join=True)
    ckpt = load_checkpoint(run_dir / "checkpoints/last.pt")
    assert ckpt["step"] == 6
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    # Only rank 0 writes: one metrics file, one TensorBoard event file.
    assert len(list(run_dir.glob("events.*"))) == 1
    assert (run_dir / "train_summary.json").exists()


def _deterministic_posterior_noise() -> None:
    """Posterior noise as a fixed function of each example's own encoding, so a sharded
    run and a full-batch run draw the same noise for the same example (per-rank RNG
    streams otherwise make the two runs differ by their sampling noise)."""
    from vaeflow.models import posteriors

    def sample(self, h, k=1):  # noqa: ANN001, ANN202
        mu, log_std = self.params(h)
        offsets = torch.arange(k, dtype=mu.dtype).view(k, 1, 1)
        noise = torch.sin(50 * mu.detach() + offsets)
        z = mu + torch.exp(log_std) * noise
        dims = self._log_normal_dims(noise, log_std)
        return posteriors.PosteriorSample(
            z, dims.sum(-1), dims, z.new_zeros(z.shape[:-1]), mu, log_std
        )

    posteriors.GaussianPosterior.sample = sample


def _record_training_batches(store: list) -> None:
    from vaeflow.models import vae

    forward = vae.VAE.forward

    def recording(self, x, k=1):  # noqa: ANN001, ANN202
        if self.training:
            store.append(x.detach().clone())
        return forward(self, x, k)

    vae.VAE.forward = recording


SHARD_RUN = [
    f'data.root="{DATA}"',
    "data.batch_size=20",
    "data.eval_batch_size=100",
    "model.latent_dim=6",
    "model.encoder.options={hidden=[32]}",
    "model.decoder.options={hidden=[32]}",
    "train.steps=5",
    "train.val_every=5",
    "train.val_size=100",
    "train.val_k=2",
    "train.device=cpu",
    "train.log_every=5",
]


def _shard_worker(
    rank: int, world: int, port: int, run_dir: str, out: str, extra: tuple[str, ...] = ()
) -> None:
    _env(rank, world, port)
    torch.set_num_threads(1)
    from vaeflow.config import load_config
    from vaeflow.run.train import train

    _deterministic_posterior_noise()
    seen: list = []
    _record_training_batches(seen)
    model_seen = {}
    from vaeflow.run import train as train_mod

    build = train_mod.build_model

    def keep(cfg):  # noqa: ANN001, ANN202
        model_seen["model"] = build(cfg)
        return model_seen["model"]

    train_mod.build_model = keep
    train(load_config(None, [*SHARD_RUN, *extra]), run_dir)
    state = {k: v.detach().clone() for k, v in model_seen["model"].state_dict().items()}
    torch.save({"batches": seen, "state": state}, f"{out}.rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize(
    "extra",
    [(), ("train.free_bits=0.1", "train.free_bits_batch_splits=2")],
    ids=["elbo", "free-bits-per-sub-batch"],
)
def test_vaeflow_data_parallel_path_shards_and_matches_one_process(tmp_path, extra):
    """vaeflow's own DDP path (train() under 2 gloo processes): every rank ends with the
    same parameters, rank r trained on exactly examples r, r+2, ... of every global batch
    (disjoint shards covering the batch), and the result equals one process training on
    the full batch (the same per-example noise), to float tolerance. With free bits
    floored per sub-batch (train.free_bits_batch_splits = 2, strided), each rank floors
    its own shard, which is one of the two sub-batches: again one process's result."""
    out = str(tmp_path / "shard")
    mp.spawn(
        _shard_worker,
        args=(2, _free_port(), str(tmp_path / "ddp"), out, tuple(extra)),
        nprocs=2,
        join=True,
    )
    ranks = [torch.load(f"{out}.rank{r}.pt", weights_only=True) for r in range(2)]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), f"ranks disagree on {key}"

    # The same run in this process, on the full batch.
    from vaeflow.config import load_config
    from vaeflow.models import posteriors, vae
    from vaeflow.run.train import train

    original = (posteriors.GaussianPosterior.sample, vae.VAE.forward)
    try:
        _deterministic_posterior_noise()
        full: list = []
        _record_training_batches(full)
        train(load_config(None, [*SHARD_RUN, *extra]), tmp_path / "single")
    finally:
        posteriors.GaussianPosterior.sample, vae.VAE.forward = original
    assert len(full) == len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == 5
    for step, batch in enumerate(full):
        shards = [ranks[r]["batches"][step] for r in range(2)]
        assert shards[0].shape[0] == shards[1].shape[0] == batch.shape[0] // 2
        assert torch.equal(shards[0], batch[0::2]) and torch.equal(shards[1], batch[1::2])
    single = load_checkpoint(tmp_path / "single/checkpoints/last.pt")["model"]
    for key, value in ranks[0]["state"].items():
        torch.testing.assert_close(value, single[key], rtol=1e-5, atol=1e-6, msg=key)
