"""Timing and memory measurement shared by the benchmarks: interleaved medians, peaks."""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.benchmark import Timer


@dataclass
class Row:
    """One implementation measured on one case."""

    bench: str
    case: str
    impl: str
    time_ms: float
    ratio: float  # time / time of lipsort in the same case (1.0 for lipsort itself)
    replicates: int
    metric: str = ""
    value: float | None = None
    saved_mib: float | None = None  # tensors autograd saves for backward
    peak_mib: float | None = None  # peak memory allocated during one call, above the start
    note: str = ""
    grad_error: float | None = None  # relative gradient error against a converged reference
    x: float | None = None  # the swept parameter of a curve (e.g. the width)


@dataclass
class Config:
    device: torch.device
    repeat: int
    min_time: float
    threads: int
    iters: int
    tiny: bool
    progress: bool


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def saved_tensor_bytes(out: list):
    """Sum the storage bytes of the distinct tensors autograd saves for backward."""
    storages: dict[tuple, int] = {}

    def pack(t):
        try:
            s = t.untyped_storage()
            storages[(t.device.type, s.data_ptr())] = s.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield
    out.append(sum(storages.values()))


def peak_bytes(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory allocated by one call of ``fn`` above what was allocated before it.

    CUDA: the caching allocator's peak. CPU: the running sum of the profiler's allocation and
    free records, in the order the ops started (an op's frees may be counted before its
    allocations, so this can under-state short-lived temporaries inside one op).
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Allocations are charged to the op that made them (self memory: without its children),
    # frees that happen outside an op are "[memory]" events.
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    total = peak = 0
    for e in events:
        total += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, total)
    return float(peak)


def time_interleaved(
    steps: dict[str, Callable[[], object]], repeat: int, min_time: float, threads: int
) -> dict[str, tuple[float, int]]:
    """Median seconds per call of each function, and the number of timings it is taken over.

    The functions are timed in ``repeat`` interleaved rounds (in alternating order), so a
    change of machine load affects them all alike and their ratios stay meaningful. In each
    round ``Timer.blocked_autorange`` calls a function once to size its blocks (a warm-up),
    then in blocks for at least ``min_time`` seconds.
    """
    timers = {
        name: Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
        for name, fn in steps.items()
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    for r in range(repeat):
        for name in order if r % 2 == 0 else order[::-1]:
            times[name] += timers[name].blocked_autorange(min_run_time=min_time).times
    return {name: (statistics.median(t), len(t)) for name, t in times.items()}


def measure_case(bench: str, case: str, impls, cfg: Config, metric: str, check, x=None):
    """Measure every ``(name, forward, backward, note)`` of ``impls`` on one case.

    ``forward()`` builds the output (with its autograd graph), ``backward(out)`` finishes the
    pass (``None`` to time ``forward`` alone). ``check(name, out)`` returns the accuracy value
    for ``metric``, or ``(value, grad_error)``. Ratios are taken to the impl named "lipsort".
    """
    probes, steps = {}, {}
    for name, forward, backward, note in impls:
        saved: list[int] = []
        with saved_tensor_bytes(saved):
            out = forward()
        checked = check(name, out)
        value, grad_error = checked if isinstance(checked, tuple) else (checked, None)
        del out
        if backward is None:
            step = forward
        else:

            def step(forward=forward, backward=backward):
                return backward(forward())

        # The CPU profiler is slow to parse (~0.5 s a call): not in the quick smoke test.
        peak = None if cfg.tiny and cfg.device.type == "cpu" else peak_bytes(step, cfg.device) / 2**20
        steps[name] = step
        probes[name] = (value, grad_error, saved[0] / 2**20 if saved[0] else None, peak, note)
    timed = time_interleaved(steps, cfg.repeat, cfg.min_time, cfg.threads)
    rows = []
    for name, (value, grad_error, saved_mib, peak, note) in probes.items():
        median, n = timed[name]
        rows.append(
            Row(bench, case, name, median * 1e3, float("nan"), n, metric, value, saved_mib,
                peak, note, grad_error, x)
        )
        if cfg.progress:
            print(f"  {bench} | {case} | {name}: {median * 1e3:.3f} ms", file=sys.stderr)
    base = next(r.time_ms for r in rows if r.impl == "lipsort")
    for r in rows:
        r.ratio = r.time_ms / base
    return rows


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call (synchronized on CUDA)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0
