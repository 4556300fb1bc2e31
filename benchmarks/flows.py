"""Time vaeflow's flows against zuko and nflows on identical shapes; print markdown tables.

    python benchmarks/flows.py                                # every case, CPU, 20 repeats
    python benchmarks/flows.py --device cuda --repeats 50
    python benchmarks/flows.py --cases maf iaf --threads 2 --batch 128
    python benchmarks/flows.py --skip-sequential              # CPU: skip D-pass sampling
    python benchmarks/flows.py --check                        # verify the models, then time
    python benchmarks/flows.py --small --repeats 2 --warmup 0 # smoke run (tiny sizes)
    VAEFLOW_BENCH_DISABLE=zuko,nflows python benchmarks/flows.py --small  # pretend peers absent

Peers: ``pip install -e '.[bench]'`` (zuko, nflows). A peer that is not installed is
skipped with a line saying so; ``VAEFLOW_BENCH_DISABLE`` (comma-separated: ``zuko``,
``nflows``) makes the script treat installed peers as missing, which is how the smoke test
exercises that branch.

Every case builds the same architecture in the three libraries, in float32 (same number of
layers, conditioner widths and depths, masks or orders, N(0, I) base; the comment on each
case and the notes printed under the table say what still differs). For each library:

* **train step**: ``zero_grad``, the negative mean log-density of a batch, ``backward``
  (no optimiser step). For the conditional IAF it is what a VAE posterior does: draw
  ``z ~ q(z | c)`` with ``log q(z | c)`` in one pass, ``loss = mean(log q(z|c) - log N(z;
  0, I))`` (a one-sample KL to the prior), ``backward`` into the flow and the context.
* **sample**: one batch of samples without gradients (IAF: ``z`` and ``log q`` together).
  MAF and autoregressive-spline sampling is ``D`` sequential network passes per layer in
  every library: at ``D = 784`` on a CPU that is about a minute per call, so use
  ``--skip-sequential`` (or few ``--repeats``) there.

Columns: parameter count, median / min / max milliseconds over ``--repeats`` calls after
``--warmup`` calls, peak memory one call allocates above what existed before it (see
``_timing.peak_memory``; CPU numbers come from the profiler's allocation events), and the
ratio of each row's median to the fastest peer's median (so vaeflow's ratio is
"vaeflow / fastest peer": below 1 means vaeflow is faster). Data are random with the
case's shapes (timing does not depend on values): dequantised-MNIST-like logits for the
784-d cases, N(0, I) for the 64-d ones. Never run as a test (a smoke run is).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import math
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import machine_header, markdown_table, peak_memory, time_fn  # noqa: E402

from vaeflow.flows.density import FlowDensity, StandardNormal  # noqa: E402
from vaeflow.flows.registry import build_flow  # noqa: E402
from vaeflow.flows.spline import DEFAULT_TAIL_BOUND  # noqa: E402

PEERS = ("zuko", "nflows")
DISABLE_ENV = "VAEFLOW_BENCH_DISABLE"
INSTALL_HINT = "pip install -e '.[bench]'"

# Tail bound of vaeflow's splines (identity outside [-3, 3], DEFAULT_TAIL_BOUND), given to
# every library's spline (zuko's default bound is 5, nflows' default tail_bound is 1).
TAIL_BOUND = DEFAULT_TAIL_BOUND


# -- sizes and the timed callables -----------------------------------------------------------


@dataclass(frozen=True)
class Size:
    """Shapes of one case: features ``dim``, ``layers``, conditioner ``hidden`` width and
    ``num_hidden`` hidden layers, ``batch``, ``context`` width (0: none), spline ``bins``."""

    dim: int
    layers: int
    hidden: int
    batch: int
    num_hidden: int = 2
    context: int = 0
    bins: int = 8


@dataclass
class Bench:
    """One library's model for one case, as the three callables that get timed.

    Attributes:
        module: every parameter of the model (counted, zero_grad'ed).
        log_prob: ``() -> (B,)``: log-density of the case's batch (IAF: ``log q`` of a fresh
            sample); used by ``--check`` and by ``train_step``.
        sample: ``() -> Tensor``: one sampling pass, no gradients (IAF: ``z`` and ``log q``).
        train_step: ``() -> None``: ``zero_grad``, loss, ``backward``.
        check: ``() -> float`` or ``None``: a case-specific self-check returning an error
            (IAF: |one-pass log q - log q evaluated in the density direction|).
    """

    module: nn.Module
    log_prob: Callable[[], Tensor]
    sample: Callable[[], object]
    train_step: Callable[[], None]
    check: Callable[[], float] | None = None


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def density_bench(
    module: nn.Module, log_prob: Callable[[], Tensor], sample: Callable[[], Tensor]
) -> Bench:
    """Train step = ``zero_grad`` + ``-log_prob(x).mean()`` + ``backward``."""

    def step() -> None:
        module.zero_grad(set_to_none=True)
        (-log_prob().mean()).backward()

    def draw() -> Tensor:
        with torch.no_grad():
            return sample()

    return Bench(module, log_prob, draw, step)


def posterior_bench(
    module: nn.Module,
    context: Tensor,
    rsample_and_log_prob: Callable[[Tensor], tuple[Tensor, Tensor]],
    log_prob_at: Callable[[Tensor, Tensor], Tensor],
) -> Bench:
    """Conditional IAF as a VAE posterior: one-pass ``z, log q(z|c)``, KL-to-prior loss.

    ``rsample_and_log_prob(c) -> (z (B, D), log q (B,))`` (one sample per context row);
    ``log_prob_at(z, c) -> (B,)`` scores a given ``z`` in the density direction (``D``
    sequential passes per layer), used only by the check.
    """
    ctx = context.detach().clone().requires_grad_(True)

    def kl_loss(z: Tensor, log_q: Tensor) -> Tensor:
        log_prior = -0.5 * (z * z).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)
        return (log_q - log_prior).mean()

    def step() -> None:
        module.zero_grad(set_to_none=True)
        ctx.grad = None
        z, log_q = rsample_and_log_prob(ctx)
        kl_loss(z, log_q).backward()

    def draw() -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return rsample_and_log_prob(context)

    def check() -> float:
        with torch.no_grad():
            z, log_q = rsample_and_log_prob(context)
            return (log_q - log_prob_at(z, context)).abs().max().item()

    return Bench(module, lambda: rsample_and_log_prob(context)[1], draw, step, check)


# -- data ------------------------------------------------------------------------------------


def pixel_logits(batch: int, dim: int, device: torch.device) -> Tensor:
    """Dequantised 8-bit pixels in (0, 1), logit-transformed as in RealNVP/MAF
    (``logit(a + (1 - 2a) x)``, ``a = 0.05``): the input of a flow on MNIST."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (batch, dim), generator=g) + torch.rand(batch, dim, generator=g)
    a = 0.05
    return torch.logit(a + (1 - 2 * a) * x / 256).to(device)


def normal_data(batch: int, dim: int, device: torch.device) -> Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randn(batch, dim, generator=g).to(device)


# -- vaeflow ---------------------------------------------------------------------------------


def vaeflow_density(name: str, options: dict, s: Size, x: Tensor) -> Bench:
    """A vaeflow density: ``FlowDensity(build_flow(...))`` with its StandardNormal base."""
    flow = build_flow(name, s.dim, s.layers, s.hidden, num_hidden=s.num_hidden, **options)
    density = FlowDensity(flow, StandardNormal(s.dim)).to(x.device)
    return density_bench(density, lambda: density.log_prob(x), lambda: density.sample(s.batch))


def vaeflow_iaf(s: Size, c: Tensor) -> Bench:
    """``build_flow("iaf")`` = ``Inverse`` of a MAF stack; its ``inverse`` (the sampling
    direction ``FlowDensity.sample_and_log_prob`` runs) is one MADE pass per layer."""
    flow = build_flow(
        "iaf", s.dim, s.layers, s.hidden, context_features=s.context, num_hidden=s.num_hidden
    )
    density = FlowDensity(flow, StandardNormal(s.dim)).to(c.device)

    def rsample(ctx: Tensor) -> tuple[Tensor, Tensor]:
        z, log_q = density.sample_and_log_prob(1, ctx)  # (1, B, D), (1, B)
        return z[0], log_q[0]

    return posterior_bench(density, c, rsample, lambda z, ctx: density.log_prob(z, ctx))


# -- zuko ------------------------------------------------------------------------------------


def _zuko_base(zuko, dim: int):
    return zuko.flows.UnconditionalDistribution(
        zuko.distributions.DiagNormal, torch.zeros(dim), torch.ones(dim), buffer=True
    )


def zuko_density(flow: nn.Module, s: Size, x: Tensor) -> Bench:
    flow = flow.to(x.device)
    return density_bench(flow, lambda: flow().log_prob(x), lambda: flow().sample((s.batch,)))


def zuko_rqs(zuko):
    """zuko's spline with vaeflow's tail bound (zuko's default bound is 5)."""
    return partial(zuko.transforms.MonotonicRQSTransform, bound=TAIL_BOUND)


def zuko_spline_shapes(bins: int) -> list[tuple[int, ...]]:
    # widths K, heights K, interior derivatives K - 1: the same 3K - 1 as vaeflow/nflows.
    return [(bins,), (bins,), (bins - 1,)]


def zuko_coupling_stack(zuko, s: Size, **kwargs) -> nn.Module:
    """Couplings on alternating masks, vaeflow's convention: layer 0 keeps even features."""
    layers = [
        zuko.flows.GeneralCouplingTransform(
            features=s.dim,
            mask=torch.arange(s.dim) % 2 == i % 2,  # True: the unchanged half
            hidden_features=[s.hidden] * s.num_hidden,
            **kwargs,
        )
        for i in range(s.layers)
    ]
    return zuko.flows.Flow(layers, _zuko_base(zuko, s.dim))


def zuko_iaf(zuko, s: Size, c: Tensor) -> Bench:
    """zuko's IAF recipe: a MAF whose lazy transform is inverted, ``Flow(maf.transform.inv,
    maf.base)``; ``rsample_and_log_prob`` then runs the MAF's one-pass direction on the
    noise. (``MAF(passes=2)`` would be a coupling flow, not an IAF.)"""
    maf = zuko.flows.MAF(
        s.dim, s.context, transforms=s.layers, hidden_features=[s.hidden] * s.num_hidden
    )
    flow = zuko.flows.Flow(maf.transform.inv, maf.base).to(c.device)
    return posterior_bench(
        flow, c, lambda ctx: flow(ctx).rsample_and_log_prob(), lambda z, ctx: flow(ctx).log_prob(z)
    )


# -- nflows ----------------------------------------------------------------------------------


class NflowsMLP(nn.Module):
    """nflows' plain ``nets.MLP`` as a coupling conditioner: nflows calls
    ``net(x, context)``, which ``nets.MLP`` does not accept (its own examples use the
    residual ``ResidualNet``); this adapter concatenates an optional context, as vaeflow
    and zuko do, and adds no parameters. ``hidden_features`` is what nflows' spline
    coupling reads to scale its raw bin widths/heights down by ``sqrt(hidden)``, as it
    does with its own nets (without it nflows warns and skips that elementwise scaling)."""

    def __init__(self, nflows, n_in: int, n_out: int, hidden: int, num_hidden: int) -> None:
        super().__init__()
        self.net = nflows.nn.nets.MLP((n_in,), (n_out,), [hidden] * num_hidden)
        self.hidden_features = hidden

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.net(x if context is None else torch.cat([x, context], dim=-1))


def _nflows_made_kwargs(s: Size) -> dict:
    # use_residual_blocks=False: a plain MADE (nflows' default is residual blocks). With
    # feed-forward blocks nflows' MADE has 1 + num_blocks hidden layers.
    return {
        "hidden_features": s.hidden,
        "num_blocks": s.num_hidden - 1,
        "use_residual_blocks": False,
    }


def nflows_autoregressive_stack(nflows, s: Size, layer_fn: Callable[[], nn.Module]) -> nn.Module:
    """``layer, ReversePermutation, layer, ...``: vaeflow's ``permutation="reverse"``."""
    layers: list[nn.Module] = []
    for i in range(s.layers):
        if i > 0:
            layers.append(nflows.transforms.ReversePermutation(s.dim))
        layers.append(layer_fn())
    return nflows.transforms.CompositeTransform(layers)


def nflows_coupling_stack(nflows, s: Size, coupling: Callable[..., nn.Module]) -> nn.Module:
    """Couplings on alternating masks; nflows' mask marks the *transformed* features."""
    layers = [
        coupling(
            (torch.arange(s.dim) % 2 != i % 2).int(),
            lambda n_in, n_out: NflowsMLP(nflows, n_in, n_out, s.hidden, s.num_hidden),
        )
        for i in range(s.layers)
    ]
    return nflows.transforms.CompositeTransform(layers)


def nflows_density(nflows, transform: nn.Module, s: Size, x: Tensor) -> Bench:
    flow = nflows.flows.Flow(transform, nflows.distributions.StandardNormal([s.dim])).to(x.device)
    return density_bench(flow, lambda: flow.log_prob(x), lambda: flow.sample(s.batch))


def nflows_iaf(nflows, s: Size, c: Tensor) -> Bench:
    """nflows' IAF: ``InverseTransform`` of a MAF stack, so ``Flow.sample_and_log_prob``
    (which runs ``transform.inverse``) is the MAF layers' one-pass ``forward``."""
    T = nflows.transforms
    maf = nflows_autoregressive_stack(
        nflows,
        s,
        lambda: T.MaskedAffineAutoregressiveTransform(
            s.dim, context_features=s.context, **_nflows_made_kwargs(s)
        ),
    )
    flow = nflows.flows.Flow(
        T.InverseTransform(maf), nflows.distributions.StandardNormal([s.dim])
    ).to(c.device)

    def rsample(ctx: Tensor) -> tuple[Tensor, Tensor]:
        z, log_q = flow.sample_and_log_prob(1, context=ctx)  # (B, 1, D), (B, 1)
        return z[:, 0], log_q[:, 0]

    return posterior_bench(flow, c, rsample, lambda z, ctx: flow.log_prob(z, context=ctx))


# -- the cases -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One comparison: sizes, how each library builds it, and what still differs."""

    name: str
    title: str  # formatted with the Size's fields
    size: Size
    small: Size
    data: Callable[[int, int, torch.device], Tensor]  # (batch, width, device) -> data/context
    build: Callable[[str, object, Size, Tensor], Bench]  # (library, module, size, data)
    sequential_sampling: bool
    note: str


def _maf(lib, m, s: Size, x: Tensor) -> Bench:
    # MAF, reverse order between layers, MADE with s.num_hidden hidden layers, ReLU.
    # vaeflow: ReversePermutation between AffineAutoregressive layers (natural order each);
    # zuko: no permutation op, the layers alternate natural / reversed MADE orders (the
    # same map); nflows: ReversePermutation between layers, like vaeflow. Affine maps and
    # scale squashing differ only elementwise: vaeflow exp(5 tanh(s/5)), zuko
    # exp(s / (1 + |s| / 6.9)), nflows softplus(s) + 1e-3.
    if lib == "vaeflow":
        return vaeflow_density("maf", {"permutation": "reverse"}, s, x)
    if lib == "zuko":
        flow = m.flows.MAF(s.dim, transforms=s.layers, hidden_features=[s.hidden] * s.num_hidden)
        return zuko_density(flow, s, x)
    T = m.transforms
    made = _nflows_made_kwargs(s)
    t = nflows_autoregressive_stack(
        m, s, lambda: T.MaskedAffineAutoregressiveTransform(s.dim, **made)
    )
    return nflows_density(m, t, s, x)


def _realnvp(lib, m, s: Size, x: Tensor) -> Bench:
    # Affine couplings on alternating even/odd masks, no permutation or LU mixing between
    # them (zuko's RealNVP/NICE has none, so vaeflow uses permutation="alternate" instead
    # of its default learned LU layers). Conditioner: plain MLP with s.num_hidden hidden
    # layers of s.hidden ReLU units. Elementwise scale: vaeflow exp(3 tanh(s/3)), zuko
    # exp(s / (1 + |s| / 6.9)), nflows sigmoid(s + 2) + 1e-3. nflows: plain nets.MLP via a
    # context-accepting adapter (its RealNVP class uses residual nets).
    if lib == "vaeflow":
        return vaeflow_density("realnvp", {"permutation": "alternate"}, s, x)
    if lib == "zuko":
        return zuko_density(zuko_coupling_stack(m, s), s, x)
    return nflows_density(
        m, nflows_coupling_stack(m, s, m.transforms.AffineCouplingTransform), s, x
    )


def _iaf(lib, m, s: Size, c: Tensor) -> Bench:
    # Conditional IAF = inverse of a conditional MAF stack (reverse order between layers),
    # sampled with log q in one pass per layer. Context enters the MADE's first hidden
    # layer in all three: vaeflow and nflows through a separate nn.Linear(C, hidden) added
    # to the masked first layer (nflows adds ReLU(context_layer(c)), an elementwise
    # difference), zuko by concatenating c to the masked first layer's input (so zuko has
    # no separate context bias: `hidden` fewer parameters per layer). vaeflow additionally
    # appends one fixed permutation at the end when the reversals do not compose to the
    # identity (odd number of reversals, here 3), so its output order is the input order.
    if lib == "vaeflow":
        return vaeflow_iaf(s, c)
    if lib == "zuko":
        return zuko_iaf(m, s, c)
    return nflows_iaf(m, s, c)


def _nsf_coupling(lib, m, s: Size, x: Tensor) -> Bench:
    # Rational-quadratic spline couplings, alternating even/odd masks without permutations
    # (vaeflow permutation="none"), K bins, identity (linear) tails outside
    # [-TAIL_BOUND, TAIL_BOUND] = vaeflow's bound 3 in all three, 3K - 1 parameters per
    # transformed feature, plain MLP conditioner. zuko: GeneralCouplingTransform with its
    # MonotonicRQSTransform (bound=3) rather than NSF(passes=2), which is a 2-block masked
    # MADE that also transforms the conditioning half with constant splines. Bin/derivative
    # parameterisations differ elementwise (min bin size, softplus vs exp derivatives).
    if lib == "vaeflow":
        return vaeflow_density("nsf_coupling", {"permutation": "none", "num_bins": s.bins}, s, x)
    if lib == "zuko":
        flow = zuko_coupling_stack(m, s, univariate=zuko_rqs(m), shapes=zuko_spline_shapes(s.bins))
        return zuko_density(flow, s, x)
    coupling = partial(
        m.transforms.PiecewiseRationalQuadraticCouplingTransform,
        num_bins=s.bins,
        tails="linear",
        tail_bound=TAIL_BOUND,
    )
    return nflows_density(m, nflows_coupling_stack(m, s, coupling), s, x)


def _nsf_autoregressive(lib, m, s: Size, x: Tensor) -> Bench:
    # Autoregressive rational-quadratic splines: a MADE per layer (as in the MAF case,
    # reverse order between layers, same MADE), K bins, linear tails outside [-3, 3].
    # vaeflow appends a final fixed permutation here too (3 reversals). nflows divides
    # the raw widths and heights by sqrt(hidden) in the coupling layer only (elementwise;
    # its MADE has no `hidden_features` attribute, so the autoregressive layer does not).
    if lib == "vaeflow":
        return vaeflow_density(
            "nsf_autoregressive", {"permutation": "reverse", "num_bins": s.bins}, s, x
        )
    if lib == "zuko":
        flow = m.flows.MAF(
            s.dim,
            transforms=s.layers,
            hidden_features=[s.hidden] * s.num_hidden,
            univariate=zuko_rqs(m),
            shapes=zuko_spline_shapes(s.bins),
        )
        return zuko_density(flow, s, x)
    T = m.transforms
    made = _nflows_made_kwargs(s)
    t = nflows_autoregressive_stack(
        m,
        s,
        lambda: T.MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
            s.dim, num_bins=s.bins, tails="linear", tail_bound=TAIL_BOUND, **made
        ),
    )
    return nflows_density(m, t, s, x)


def _context(batch: int, width: int, device: torch.device) -> Tensor:
    return normal_data(batch, width, device)


CASES: dict[str, Case] = {
    c.name: c
    for c in [
        Case(
            "maf",
            "MAF, {layers} layers, MADE {hidden}x{num_hidden}, D={dim}",
            Size(dim=784, layers=5, hidden=512, batch=256),
            Size(dim=16, layers=5, hidden=32, batch=8),
            pixel_logits,
            _maf,
            True,
            "reverse order between layers in all three (zuko alternates MADE orders, the "
            "others permute); scale squashing differs elementwise "
            "(vaeflow 5 tanh(s/5), zuko s/(1+|s|/6.9), nflows softplus+1e-3).",
        ),
        Case(
            "realnvp",
            "RealNVP affine coupling, {layers} layers, MLP {hidden}x{num_hidden}, D={dim}",
            Size(dim=784, layers=8, hidden=512, batch=256),
            Size(dim=16, layers=8, hidden=32, batch=8),
            pixel_logits,
            _realnvp,
            False,
            "alternating even/odd masks, no permutation/LU between couplings (vaeflow "
            "permutation='alternate'; its default is learned LU mixing); plain MLP "
            "conditioners (nflows through a context-accepting adapter).",
        ),
        Case(
            "iaf",
            "conditional IAF, {layers} layers, MADE {hidden}x{num_hidden}, D={dim}, "
            "context {context} (z and log q)",
            Size(dim=64, layers=4, hidden=512, batch=256, context=256),
            Size(dim=16, layers=4, hidden=32, batch=8, context=16),
            _context,
            _iaf,
            False,
            "inverse of a conditional MAF, one MADE pass per layer to sample z with log q; "
            "zuko feeds the context through the masked first layer (no separate context "
            "bias), vaeflow adds a final fixed permutation (odd number of reversals).",
        ),
        Case(
            "nsf_coupling",
            "NSF coupling, {layers} layers, MLP {hidden}x{num_hidden}, {bins} bins, D={dim}",
            Size(dim=64, layers=4, hidden=512, batch=256),
            Size(dim=16, layers=4, hidden=32, batch=8),
            normal_data,
            _nsf_coupling,
            False,
            f"alternating masks, no permutations, K bins, linear tails outside "
            f"[-{TAIL_BOUND:g}, {TAIL_BOUND:g}] (vaeflow's default; zuko's is 5, nflows' 1), "
            "3K-1 parameters per feature; zuko via GeneralCouplingTransform + "
            "MonotonicRQSTransform.",
        ),
        Case(
            "nsf_autoregressive",
            "NSF autoregressive, {layers} layers, MADE {hidden}x{num_hidden}, {bins} bins, "
            "D={dim}",
            Size(dim=64, layers=4, hidden=512, batch=256),
            Size(dim=16, layers=4, hidden=32, batch=8),
            normal_data,
            _nsf_autoregressive,
            True,
            f"MADE as in the MAF case, K bins, linear tails outside "
            f"[-{TAIL_BOUND:g}, {TAIL_BOUND:g}]; vaeflow adds a final fixed permutation.",
        ),
    ]
}
"""Case name -> :class:`Case`. The hidden width of the spline cases is not fixed by the
issue; 512 (two hidden layers) matches the other cases."""


# -- peers -----------------------------------------------------------------------------------


def load_peers() -> tuple[dict[str, object], list[str]]:
    """Import the installed peers; return ``{name: module}`` and one message per missing."""
    disabled = {p.strip() for p in os.environ.get(DISABLE_ENV, "").split(",") if p.strip()}
    unknown = disabled - set(PEERS)
    if unknown:
        raise SystemExit(f"{DISABLE_ENV}: unknown peer(s) {sorted(unknown)}; known: {PEERS}")
    found: dict[str, object] = {}
    missing: list[str] = []
    for name in PEERS:
        if name in disabled:
            missing.append(f"{name} not installed: {INSTALL_HINT} (pretended by {DISABLE_ENV})")
            continue
        try:
            module = importlib.import_module(name)
            # the submodules the builders use (nflows' top level imports none of them)
            for sub in ("flows", "transforms", "distributions", "nn"):
                importlib.import_module(f"{name}.{sub}")
            if name == "nflows":
                importlib.import_module("nflows.nn.nets")
        except ImportError as e:
            missing.append(f"{name} not installed: {INSTALL_HINT} ({e})")
            continue
        found[name] = module
    return found, missing


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


# -- main ------------------------------------------------------------------------------------


def _ms(t: dict[str, float] | None) -> str:
    if t is None:
        return "-"
    return f"{t['median'] * 1e3:.2f} / {t['min'] * 1e3:.2f} / {t['max'] * 1e3:.2f}"


def _mib(m: float | None) -> str:
    return "n/a" if m is None else f"{m:.1f}"


def run_check(bench: Bench) -> str:
    """Finite log-densities of the right shape, and the case's self-check (``--check``)."""
    with torch.no_grad():
        lp = bench.log_prob()
    if lp.dim() != 1 or not torch.isfinite(lp).all():
        raise AssertionError(f"log_prob not finite or not (B,): {tuple(lp.shape)}")
    if bench.check is None:
        return "ok"
    err = bench.check()
    if not err < 1e-3:
        raise AssertionError(f"one-pass log q differs from the density direction by {err:.2e}")
    return f"ok (log q vs density direction: {err:.1e})"


def _perturb(module: nn.Module, scale: float = 0.05) -> None:
    # vaeflow's layers start as the exact identity (zero last layers); move them away so
    # the checks are not trivially satisfied. Only used by --check.
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default 20; 2 --small)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--batch", type=int, default=None, help="override every case's batch")
    p.add_argument("--small", action="store_true", help="tiny sizes (D=16, hidden 32, batch 8)")
    p.add_argument(
        "--skip-sequential",
        action="store_true",
        help="do not time sampling where it is D sequential passes (MAF, NSF autoregressive)",
    )
    p.add_argument("--check", action="store_true", help="verify every model before timing")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats if args.repeats is not None else (2 if args.small else 20)
    device = torch.device(args.device)
    torch.set_default_dtype(torch.float32)

    peers, missing = load_peers()
    print(machine_header(device, torch.get_num_threads()))
    versions = ", ".join(f"{n} {_version(n)}" for n in peers)
    print(
        f"float32, repeats {repeats} after {args.warmup} warm-up calls"
        f"{', small sizes' if args.small else ''}; peers: {versions or 'none'}"
    )
    for line in missing:
        print(line)
    print()

    headers = [
        "case",
        "library",
        "params",
        "train step ms (median / min / max)",
        "sample ms (median / min / max)",
        "peak MiB (train / sample)",
        "train ratio",
        "sample ratio",
    ]
    rows: list[list[str]] = []
    failures = 0
    libraries = ["vaeflow", *peers]
    for name in args.cases:
        case = CASES[name]
        size = case.small if args.small else case.size
        if args.batch:
            size = replace(size, batch=args.batch)
        data = case.data(size.batch, size.context or size.dim, device)
        results: dict[str, tuple[int, dict | None, dict | None, str]] = {}
        for lib in libraries:
            torch.manual_seed(0)
            try:
                bench = case.build(lib, peers.get(lib), size, data)
                n_params = _n_params(bench.module)
                if args.check:
                    _perturb(bench.module)
                    status = run_check(bench)
                    print(f"check {name} / {lib}: {status}")
                train = time_fn(bench.train_step, repeats, args.warmup, device)
                mem_train = peak_memory(bench.train_step, device)
                if case.sequential_sampling and args.skip_sequential:
                    sample, mem_sample = None, None
                else:
                    sample = time_fn(bench.sample, repeats, args.warmup, device)
                    mem_sample = peak_memory(bench.sample, device)
                mem = f"{_mib(mem_train)} / {_mib(mem_sample) if sample else '-'}"
                results[lib] = (n_params, train, sample, mem)
            except Exception as e:  # one failing library must not hide the other rows
                failures += 1
                traceback.print_exc()
                results[lib] = (0, None, None, f"failed: {type(e).__name__}: {e}"[:160])
        fastest = {
            key: min(
                (r[i]["median"] for lib, r in results.items() if lib in peers and r[i]),
                default=None,
            )
            for key, i in (("train", 1), ("sample", 2))
        }
        for lib, (n_params, train, sample, mem) in results.items():
            ratios = [
                f"{t['median'] / fastest[key]:.2f}" if t and fastest[key] else "-"
                for key, t in (("train", train), ("sample", sample))
            ]
            skipped = case.sequential_sampling and args.skip_sequential and train is not None
            sample_cell = "skipped (sequential)" if skipped else _ms(sample)
            rows.append([name, lib, f"{n_params:,}", _ms(train), sample_cell, mem, *ratios])
    print(markdown_table(headers, rows))
    print()
    print("Cases (what is identical in every library, then what still differs):")
    for name in args.cases:
        case = CASES[name]
        size = case.small if args.small else case.size
        title = case.title.format(**vars(size))
        print(f"- {name}: {title}, batch {args.batch or size.batch}. {case.note}")
    if failures:
        print(f"\n{failures} row(s) failed (tracebacks on stderr)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
