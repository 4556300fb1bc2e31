"""Measure every registered flow's exactness in float64 and its speed; print tables.

    python benchmarks/flow_exactness.py            # exactness + timing, D=5 / D=16
    python benchmarks/flow_exactness.py --no-time  # exactness only

Exactness: worst |inverse(forward(x)) - x| and |ld_fwd + ld_inv| over both directions
("round trip"), and worst |logabsdet - slogdet(J)| with J the brute-force autograd
Jacobian ("log-det"), for each family with and without context, after moving every
parameter away from its identity initialisation. These are the same checks the tests
assert (``tests/flows/harness.py``); here they are printed instead of asserted.
Timing: median wall time of one forward and one inverse call on a batch, CPU threads as
set, never asserted anywhere.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.flows.harness import (  # noqa: E402
    _out_like,
    check_logdet_bruteforce,
    check_roundtrip,
    directions,
    make_inputs,
    perturb,
)
from vaeflow.flows.registry import FLOWS, build_flow  # noqa: E402

VECTOR_D = 5
IMAGE_SHAPE = (2, 4, 4)


def exactness(name: str, context_features: int) -> tuple[str, str]:
    spec = FLOWS[name]
    feats = VECTOR_D if spec.data == "vector" else IMAGE_SHAPE
    # Conv conditioners amplify a 0.3-std perturbation of every weight ~3x per conv, so
    # image flows get 0.1 (as in tests/flows/test_registry.py): large enough to move every
    # layer far from the identity, small enough to stay well conditioned.
    flow = perturb(
        build_flow(name, feats, num_layers=2, hidden=16, context_features=context_features),
        scale=0.1 if spec.data == "image" else 0.3,
    )
    flow.eval()
    x, ctx = make_inputs(flow, lead=(2, 2))
    d = directions(flow, x, ctx)
    rt = "n/a (sampling only)"
    if d.forward and d.inverse:
        rt = f"{check_roundtrip(flow, x, ctx, atol=float('inf')):.1e}"
    errs = []
    if d.forward:
        errs.append(check_logdet_bruteforce(flow, x, ctx, atol=float("inf")))
    if d.inverse:
        errs.append(
            check_logdet_bruteforce(flow, _out_like(flow, x), ctx, inverse=True, atol=float("inf"))
        )
    return rt, f"{max(errs):.1e}"


def timing(name: str, batch: int, d: int, reps: int) -> tuple[str, str]:
    spec = FLOWS[name]
    feats = d if spec.data == "vector" else (4, 8, 8)
    flow = build_flow(name, feats, num_layers=4, hidden=64).float().eval()
    x = torch.randn(batch, *flow.event_shape)
    u = torch.randn(batch, *flow.out_event_shape)
    out = []
    for fn, arg, ok in ((flow, x, spec.density), (flow.inverse, u, spec.sampling)):
        if not ok:
            out.append("-")
            continue
        with torch.no_grad():
            fn(arg)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn(arg)
                times.append(time.perf_counter() - t0)
        out.append(f"{1e3 * sorted(times)[len(times) // 2]:.2f}")
    return out[0], out[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--no-time", action="store_true")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float64)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(
        f"Exactness (float64; vector D={VECTOR_D}, images {IMAGE_SHAPE}; 2 layers; "
        "parameters perturbed by N(0, 0.3^2), images N(0, 0.1^2))"
    )
    print("| flow | exact | round trip | log-det vs slogdet(J) | ctx round trip | ctx log-det |")
    print("|---|---|---|---|---|---|")
    for name in FLOWS:
        a = exactness(name, 0)
        b = exactness(name, 3)
        print(f"| {name} | {FLOWS[name].exact} | {a[0]} | {a[1]} | {b[0]} | {b[1]} |", flush=True)
    if args.no_time:
        return
    torch.set_default_dtype(torch.float32)
    print(
        f"\nSpeed (float32, batch {args.batch}, vector D={args.dim}, images (4, 8, 8); "
        "4 layers, hidden 64; median ms)"
    )
    print("| flow | forward (density) ms | inverse (sampling) ms |")
    print("|---|---|---|")
    for name in FLOWS:
        f, i = timing(name, args.batch, args.dim, args.reps)
        print(f"| {name} | {f} | {i} |", flush=True)


if __name__ == "__main__":
    main()
