"""Time the k=5000 importance-sampled test NLL of an MNIST VAE; print a table.

    python benchmarks/nll_eval.py                       # IWAE-size MLP VAE, CPU
    python benchmarks/nll_eval.py --posterior iaf --prior realnvp --images 20
    python benchmarks/nll_eval.py --device cuda --images 200

The model is untrained (timing does not depend on the weights). Each row evaluates
``--images`` binarised MNIST-shaped inputs with ``k`` samples, ``batch`` images at a time
and ``chunk`` samples per pass, and reports seconds per image and, on CUDA, the
allocator's peak memory (not measured on CPU: the resident-set high-water mark is
dominated by the warm-up). Never run as a test.
"""

from __future__ import annotations

import argparse
import time

import torch

from vaeflow.build import build_model
from vaeflow.config import ModelConfig, from_dict


def make_model(posterior: str | None, prior: str | None, latent: int) -> torch.nn.Module:
    cfg = {
        "x_shape": [1, 28, 28],
        "latent_dim": latent,
        "encoder": {"name": "mlp", "options": {"hidden": [200, 200]}},
        "decoder": {"name": "mlp", "options": {"hidden": [200, 200]}},
        "posterior": {"flow": posterior, "num_layers": 4, "hidden": 200, "context_features": 64},
        "prior": {"name": "flow", "flow": prior} if prior else {"name": "standard_normal"},
    }
    return build_model(from_dict(ModelConfig, cfg))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--images", type=int, default=10)
    p.add_argument("--k", type=int, default=5000)
    p.add_argument("--batch", type=int, nargs="*", default=[1, 10])
    p.add_argument("--chunk", type=int, nargs="*", default=[500, 1000, 5000])
    p.add_argument("--posterior", default=None, help="posterior flow name (default: Gaussian)")
    p.add_argument("--prior", default=None, help="prior flow name (default: N(0, I))")
    p.add_argument("--latent", type=int, default=50)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = make_model(args.posterior, args.prior, args.latent).to(device).eval()
    x = torch.bernoulli(torch.full((args.images, 1, 28, 28), 0.13)).to(device)
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"posterior {args.posterior or 'gaussian'}, prior {args.prior or 'N(0,I)'}, "
        f"latent {args.latent}, k={args.k}, {args.images} images\n"
    )
    print("| batch | chunk | s / image | peak memory MiB |")
    print("|---|---|---|---|")
    for batch in args.batch:
        for chunk in args.chunk:
            model.log_likelihood(x[:batch], k=min(args.k, 2 * chunk), chunk=chunk)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for i in range(0, args.images, batch):
                model.log_likelihood(x[i : i + batch], k=args.k, chunk=chunk)
            if device.type == "cuda":
                torch.cuda.synchronize()
                mem = f"{torch.cuda.max_memory_allocated() / 2**20:.0f}"
            else:
                mem = "-"
            dt = (time.perf_counter() - t0) / args.images
            print(f"| {batch} | {chunk} | {dt:.3f} | {mem} |", flush=True)


if __name__ == "__main__":
    main()
