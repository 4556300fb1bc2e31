"""Shared timing / memory / table helpers for the scripts in ``benchmarks/``.

Four small functions, so every benchmark measures and prints the same way:

* :func:`time_fn`: wall time of repeated calls (median / min / max seconds), with the
  CUDA queue drained around every call so the time is the GPU work, not the launch.
* :func:`peak_memory`: the peak memory one call allocates on top of what was already
  allocated when it started (activations, gradients, temporaries), in MiB.
* :func:`markdown_table`: a GitHub markdown table from headers and rows.
* :func:`machine_header`: one line naming the torch build, device, threads and Python.

Never imported by the library or the tests' library code; the benchmark scripts put this
folder on ``sys.path`` and ``from _timing import ...``.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

__all__ = ["time_fn", "peak_memory", "markdown_table", "machine_header"]


def _device(device: torch.device | str) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], object],
    repeats: int = 20,
    warmup: int = 3,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Time ``repeats`` calls of ``fn`` after ``warmup`` untimed calls.

    Each call is timed on its own with :func:`time.perf_counter`; on CUDA the device is
    synchronised before and after each call, so a timing covers the kernels the call
    queued and not only their launch.

    Args:
        fn: the work to time (no arguments; its result is discarded).
        repeats: timed calls (at least 1).
        warmup: untimed calls first (allocator, cuDNN/cuBLAS heuristics, lazy init).
        device: where ``fn`` runs (``"cpu"``, ``"cuda"``, a ``torch.device``).

    Returns:
        ``{"median": s, "min": s, "max": s}`` in seconds per call.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = _device(device)
    for _ in range(warmup):
        fn()
    times: list[float] = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def _device_type_matches(kind: object, name: str) -> bool:
    # kineto reports a DeviceType enum (``DeviceType.CPU``); compare by its name.
    return str(kind).split(".")[-1].lower() == name


def _cpu_peak_bytes(fn: Callable[[], object]) -> int | None:
    """Peak CPU memory one call of ``fn`` allocates above its starting level, in bytes.

    ``torch.profiler`` with ``profile_memory=True`` records one ``[memory]`` event per
    allocation (``nbytes > 0``) and per free (``nbytes < 0``) of the CPU allocator, with a
    timestamp; their running sum in time order follows the memory held by tensors. The
    profiler cannot attribute the free of a block allocated before it started (it warns
    "Memory block of unknown size was allocated before the profiling started" and drops
    the event), so ``fn`` runs twice under it and only the second call, marked with
    ``record_function``, is measured: everything that call frees was allocated while the
    profiler was watching (or is never freed), and the result means what the CUDA
    allocator's peak does: the maximum over the call of the live level minus the level
    at its start. Returns ``None`` if this torch build does not expose the events (the
    profiler's result object is not a stable public API).
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    marker = "_timing.peak_memory"
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
            with record_function(marker):
                fn()
        events = list(prof.profiler.kineto_results.events())
        window = next(e for e in events if e.name() == marker)
        t0, t1 = window.start_ns(), window.end_ns()
        memory = sorted(
            (e.start_ns(), e.nbytes())
            for e in events
            if e.name() == "[memory]" and _device_type_matches(e.device_type(), "cpu")
        )
    except (AttributeError, RuntimeError, TypeError, StopIteration):
        return None
    live, base, peak = 0, None, 0
    for t, nbytes in memory:
        if t > t1:
            break
        if t >= t0 and base is None:
            base = peak = live
        live += nbytes
        if base is not None:
            peak = max(peak, live)
    return 0 if base is None else peak - base


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> float | None:
    """Peak memory that one call of ``fn`` allocates above what was allocated before it.

    What is counted is the same on both devices: tensors created during the call
    (activations saved for backward, gradients when they are (re)allocated, temporaries,
    samples), at their high-water mark. Parameters, inputs and anything else that existed
    before the call are *not* counted. Run ``fn`` once beforehand so lazy initialisation
    is not measured (the benchmarks call this after :func:`time_fn`).

    * CUDA: ``torch.cuda.max_memory_allocated()`` after
      ``torch.cuda.reset_peak_memory_stats()``, minus ``memory_allocated()`` at the start
      (the caching allocator's view of live tensors, not the reserved pool).
    * CPU: the CPU allocator has no peak counter, and the process's peak RSS
      (``resource.getrusage``) is a lifetime high-water mark dominated by whatever ran
      first, so it cannot isolate one call. Instead ``fn`` runs (twice, the second one
      measured) under ``torch.profiler`` with ``profile_memory=True``, and the peak of the
      running sum of its allocation/free events above the level at the start of the call
      is reported (see :func:`_cpu_peak_bytes`). This counts tensor storage only (not
      allocator fragmentation or non-torch memory), like the CUDA number. The profiled
      calls are slower, but they are not timed.

    Args:
        fn: the work to measure (no arguments).
        device: where ``fn`` runs.

    Returns:
        MiB (``2**20`` bytes), or ``None`` if it cannot be measured here (the table should
        then say ``n/a``).
    """
    device = _device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if device.type == "cpu":
        peak = _cpu_peak_bytes(fn)
        return None if peak is None else peak / 2**20
    return None


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table (``|`` in cells is escaped).

    Args:
        headers: column titles.
        rows: one sequence of cells per row, each as long as ``headers``; cells are
            converted with ``str``.

    Returns:
        The table, lines joined by ``\\n``, without a trailing newline.
    """

    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, headers {len(headers)}: {row!r}")
    return "\n".join([line(headers), "|" + "---|" * len(headers), *map(line, rows)])


def _cpu_model() -> str:
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                return text.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_header(device: torch.device | str, threads: int) -> str:
    """One line describing where the numbers were measured.

    Args:
        device: the benchmark's device.
        threads: torch intra-op CPU threads (``torch.get_num_threads()``).

    Returns:
        e.g. ``"torch 2.14.1+cu130, device cpu (AMD EPYC 7B13, 2 logical CPUs), threads 1,
        Python 3.11.7"``.
    """
    device = _device(device)
    cpu = f"{_cpu_model()}, {os.cpu_count()} logical CPUs"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        where = f"cuda ({name}; host {cpu})"
    else:
        where = f"{device.type} ({cpu})"
    return (
        f"torch {torch.__version__}, device {where}, threads {threads}, "
        f"Python {platform.python_version()}"
    )
