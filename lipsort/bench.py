r"""Benchmarks of the library against peers, reported as ratios measured in one run.

``python -m lipsort.bench [bjorck] [groupsort] [cache] [--device cpu|cuda] [--repeat N]
[--json PATH]`` prints one table row per (case, implementation): the median time of a
forward + backward pass (measured with :class:`torch.utils.benchmark.Timer`, the
implementations of a case timed in interleaved rounds so that load changes hit them alike),
the ratio ``time / time of lipsort`` in the same case and run (above 1: lipsort is faster),
an accuracy or agreement check, and the memory autograd keeps for the backward pass. Absolute
times depend on the machine and its load; only ratios within one run are meant to be compared.

* ``bjorck``: :func:`lipsort.functional.bjorck` (order 1) against the straightforward
  reference :math:`W \leftarrow \tfrac32 W - \tfrac12 W (W^\top W)` after dividing by the
  Frobenius norm (as in the original code of Anil et al.) and, when installed, deel-torchlip's
  ``spectral_normalization`` + ``bjorck_normalization`` (run to the same iteration count), on
  the weight shapes of the papers' MNIST networks, at nn.Linear's default initialization.
  Accuracy: :math:`\max_i |\sigma_i - 1|` of the result.
* ``groupsort``: :func:`~lipsort.functional.max_min` / :func:`~lipsort.functional.group_sort`
  against a reshape-and-sort implementation and deel-torchlip's ``group_sort``.
* ``cache``: a Björck MLP in eval mode (constrained weights cached by
  :mod:`lipsort.parametrizations`) against the same model recomputing its weights at every
  forward pass (forward passes only, without gradient).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.metadata
import itertools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.benchmark import Timer

from . import functional as F
from .activations import MaxMin

__all__ = [
    "BENCHMARKS",
    "Row",
    "format_table",
    "main",
    "naive_group_sort",
    "reference_bjorck",
    "run",
]

BENCHMARKS = ("bjorck", "groupsort", "cache")


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
    peak_mib: float | None = None  # CUDA only: peak allocated memory during one pass
    note: str = ""


# --------------------------------------------------------------------------- peers


def reference_bjorck(w: torch.Tensor, n_iters: int = 20, beta: float = 0.5) -> torch.Tensor:
    r"""Order-1 Björck as in the reference code: Frobenius pre-scale, full ``WᵀW`` Gram.

    :math:`W_0 = W / \|W\|_F`, :math:`W_{k+1} = (1 + \beta) W_k - \beta W_k (W_k^\top W_k)`.
    The Gram matrix is always ``n × n`` (``n`` the number of columns), even for wide matrices.

    Example:
        >>> w = reference_bjorck(torch.randn(6, 4, dtype=torch.float64), 40)
        >>> torch.allclose(w.T @ w, torch.eye(4, dtype=torch.float64))
        True
    """
    w = w / torch.linalg.matrix_norm(w)
    for _ in range(n_iters):
        w = (1 + beta) * w - beta * w.mm(w.t().mm(w))
    return w


def naive_group_sort(x: torch.Tensor, group_size: int, dim: int = 1) -> torch.Tensor:
    """GroupSort by reshaping ``dim`` into ``(groups, group_size)`` and sorting, for any size.

    Example:
        >>> naive_group_sort(torch.tensor([[1., 3., 2., 0.]]), 2)
        tensor([[3., 1., 2., 0.]])
    """
    shape = list(x.shape)
    shape[dim : dim + 1] = [shape[dim] // group_size, group_size]
    return x.reshape(shape).sort(dim=dim + 1, descending=True).values.reshape(x.shape)


def _deel():
    """deel-torchlip's functional and normalizers modules and version, or ``None``."""
    try:
        functional = importlib.import_module("deel.torchlip.functional")
        normalizers = importlib.import_module("deel.torchlip.normalizers")
    except ImportError:
        return None
    try:
        version = importlib.metadata.version("deel-torchlip")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return functional, normalizers, version


# --------------------------------------------------------------------------- measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _saved_tensor_bytes(out: list):
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


def _time_interleaved(
    steps: dict[str, Callable[[], object]], repeat: int, min_time: float, threads: int
) -> dict[str, tuple[float, int]]:
    """Median seconds per call of each function, and the number of timings it is taken over.

    The functions are timed in ``repeat`` interleaved rounds (in alternating order), so a
    change of machine load affects them all alike and their ratios stay meaningful. In each
    round ``Timer.blocked_autorange`` calls a function once to size its blocks (a warm-up),
    then in blocks for at least ``min_time`` seconds: one call for slow functions, many for
    fast ones.
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


def _probe(fn: Callable[[], object], device: torch.device) -> tuple[object, float, float | None]:
    """One call: its result, its duration, and the CUDA peak memory it allocated (MiB)."""
    peak = None
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    elapsed = time.perf_counter() - t0
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return out, elapsed, peak


@dataclass
class _Config:
    device: torch.device
    repeat: int
    min_time: float
    threads: int
    iters: int
    tiny: bool
    progress: bool


def _measure_case(bench: str, case: str, impls, cfg: _Config, metric: str, check) -> list[Row]:
    """Measure every ``(name, forward, backward, note)`` of ``impls`` on one case.

    ``forward()`` builds the output (with its autograd graph), ``backward(out)`` finishes the
    pass (``None`` to time the forward alone); ``check(name, out)`` returns the accuracy or
    agreement value for ``metric``.
    """
    probes, steps = {}, {}
    for name, forward, backward, note in impls:
        saved: list[int] = []
        with _saved_tensor_bytes(saved):
            out, _, _ = _probe(forward, cfg.device)
        value = check(name, out)
        del out
        if backward is None:
            step = forward
        else:

            def step(forward=forward, backward=backward):
                return backward(forward())

        peak = None
        if cfg.device.type == "cuda":  # cheap there; on CPU the Timer's first call warms up
            _, _, peak = _probe(step, cfg.device)
        steps[name] = step
        probes[name] = (value, saved[0] / 2**20 if saved and saved[0] else None, peak, note)
    timed = _time_interleaved(steps, cfg.repeat, cfg.min_time, cfg.threads)
    rows = []
    for name, (value, saved_mib, peak, note) in probes.items():
        median, n = timed[name]
        rows.append(
            Row(
                bench,
                case,
                name,
                median * 1e3,
                float("nan"),
                n,
                metric,
                value,
                saved_mib,
                peak,
                note,
            )
        )
        if cfg.progress:
            print(
                f"  {bench} | {case} | {name}: {median * 1e3:.3f} ms, {metric} {value:.1e}",
                file=sys.stderr,
            )
    base = next(r.time_ms for r in rows if r.impl == "lipsort")
    for r in rows:
        r.ratio = r.time_ms / base
    return rows


# --------------------------------------------------------------------------- benchmarks


def _sigma_error(w: torch.Tensor) -> float:
    """max |σᵢ - 1| from the eigenvalues of the smaller Gram matrix, in float64."""
    w = w.detach().to(torch.float64)
    g = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    s = torch.linalg.eigvalsh(g).clamp_min(0).sqrt()
    return float((s - 1).abs().max())


def _fwd_bwd(fn, x0: torch.Tensor, grad_out: torch.Tensor):
    """``forward()`` applying ``fn`` to a fresh leaf copy of ``x0``, and its ``backward(out)``."""
    x = x0.clone().requires_grad_()
    return (lambda: fn(x)), (lambda out: torch.autograd.grad(out, x, grad_out))


def _bjorck_case(cfg: _Config, deel, m: int, k: int, kind: str) -> list[Row]:
    n = cfg.iters
    torch.manual_seed(0)
    # nn.Linear's default initialization: the weight a Björck layer starts from.
    w0 = nn.Linear(k, m).weight.detach().to(cfg.device)
    grad_out = torch.randn(m, k, device=cfg.device)
    impls = [
        (
            "lipsort",
            *_fwd_bwd(lambda w: F.bjorck(w, n, order=1), w0, grad_out),
            "rigorous pre-scale, smaller-side Gram",
        ),
        (
            "reference",
            *_fwd_bwd(lambda w: reference_bjorck(w, n), w0, grad_out),
            "Frobenius pre-scale, WᵀW Gram",
        ),
    ]
    if deel is not None:
        normalizers = deel[1]

        def deel_bjorck(w):
            w = normalizers.spectral_normalization(w)[0]
            # eps=0: no early stop, so it runs exactly n iterations like the others.
            return normalizers.bjorck_normalization(w, eps=0.0, maxiter=n)

        impls.append(
            (
                "deel-torchlip",
                *_fwd_bwd(deel_bjorck, w0, grad_out),
                "power-iteration pre-scale; gradient through the first 4 iterations only",
            )
        )
    return _measure_case(
        "bjorck",
        f"{m}x{k} {kind}, {n} it",
        impls,
        cfg,
        "max|σ-1|",
        lambda name, out: _sigma_error(out),
    )


def _bench_bjorck(cfg: _Config, deel, notes: list[str]) -> list[Row]:
    shapes = (
        [(32, 24, "tall"), (32, 32, "square"), (4, 32, "wide")]
        if cfg.tiny
        else [(1024, 784, "tall"), (1024, 1024, "square"), (10, 1024, "wide")]
    )
    return [row for m, k, kind in shapes for row in _bjorck_case(cfg, deel, m, k, kind)]


def _groupsort_case(cfg: _Config, deel, shape: tuple[int, ...], g: int) -> list[Row]:
    torch.manual_seed(0)
    x0 = torch.randn(shape, device=cfg.device)
    grad_out = torch.randn(shape, device=cfg.device)
    expected = naive_group_sort(x0, g)
    if g == 2:
        ours, what = F.max_min, "max_min (torch.where)"
    else:
        ours, what = (lambda x: F.group_sort(x, g)), "group_sort"
    impls = [
        ("lipsort", *_fwd_bwd(ours, x0, grad_out), what),
        ("naive", *_fwd_bwd(lambda x: naive_group_sort(x, g), x0, grad_out), "reshape + sort"),
    ]
    if deel is not None:
        functional = deel[0]
        impls.append(
            (
                "deel-torchlip",
                *_fwd_bwd(lambda x: functional.group_sort(x, g), x0, grad_out),
                "ascending order",
            )
        )

    def check(name, out):
        out = out.detach()
        if name == "deel-torchlip":  # sorts ascending: flip each group to compare
            grouped = list(shape)
            grouped[1:2] = [shape[1] // g, g]
            out = out.reshape(grouped).flip(2).reshape(shape)
        return float((out - expected).abs().max())

    op = "max_min" if g == 2 else f"group_sort g={g}"
    return _measure_case("groupsort", f"{op} {tuple(shape)}", impls, cfg, "max|Δ| vs naive", check)


def _bench_groupsort(cfg: _Config, deel, notes: list[str]) -> list[Row]:
    cases = (
        [((8, 32), 2), ((8, 32), 4), ((2, 8, 4, 4), 2)]
        if cfg.tiny
        else [((256, 1024), 2), ((256, 1024), 4), ((64, 128, 16, 16), 2)]
    )
    return [row for shape, g in cases for row in _groupsort_case(cfg, deel, shape, g)]


def _bench_cache(cfg: _Config, deel, notes: list[str]) -> list[Row]:
    try:
        P = importlib.import_module("lipsort.parametrizations")
        bjorck_orthonormal = P.bjorck_orthonormal
    except (ImportError, AttributeError) as err:
        notes.append(
            f"cache: skipped, lipsort.parametrizations.bjorck_orthonormal is not available ({err})"
        )
        return []
    sizes = [24, 32, 32, 4] if cfg.tiny else [784, 1024, 1024, 10]
    batch = 8 if cfg.tiny else 256
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        if i:
            layers.append(MaxMin())
        layers.append(bjorck_orthonormal(nn.Linear(a, b), n_iters=cfg.iters))
    recompute = nn.Sequential(*layers).to(cfg.device).train()
    cached = copy.deepcopy(recompute).eval()
    x = torch.rand(batch, sizes[0], device=cfg.device)

    def forward(model):
        with torch.no_grad():
            return model(x)

    reference = forward(recompute)
    impls = [
        ("lipsort", lambda: forward(cached), None, "eval mode, weights cached"),
        ("recompute", lambda: forward(recompute), None, "Björck at every forward"),
    ]
    case = f"MLP {'-'.join(map(str, sizes))} batch {batch}, {cfg.iters} it"
    return _measure_case(
        "cache",
        case,
        impls,
        cfg,
        "max|Δ logits|",
        lambda name, out: float((out - reference).abs().max()),
    )


_RUNNERS = {"bjorck": _bench_bjorck, "groupsort": _bench_groupsort, "cache": _bench_cache}


def _checked(names, device, repeat, iters, threads, tiny):
    """Validated ``(device, iters, threads)``; a ValueError names the bad argument."""
    unknown = [n for n in names if n not in _RUNNERS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was requested but torch sees no GPU")
    if iters is None:
        iters = 5 if tiny else 20
    if repeat < 1 or iters < 1:
        raise ValueError(f"repeat and iters must be at least 1, got repeat={repeat}, iters={iters}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    return device, iters, threads or torch.get_num_threads()


def run(
    names=BENCHMARKS,
    device="cpu",
    repeat: int = 2,
    iters: int | None = None,
    threads: int | None = None,
    min_time: float = 0.2,
    tiny: bool = False,
    progress: bool = True,
) -> dict:
    """Run the named benchmarks and return ``{"meta": {...}, "notes": [...], "rows": [...]}``.

    ``iters`` (Björck iterations) defaults to 20, or 5 with ``tiny`` (tiny sizes: a smoke test
    of the machinery, not a benchmark).

    Example:
        >>> res = run(["groupsort"], repeat=1, threads=1, min_time=0.001, tiny=True, progress=False)
        >>> {"lipsort", "naive"} <= {r["impl"] for r in res["rows"]}
        True
        >>> [r["ratio"] for r in res["rows"] if r["impl"] == "lipsort"]
        [1.0, 1.0, 1.0]
    """
    device, iters, threads = _checked(names, device, repeat, iters, threads, tiny)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    cfg = _Config(device, repeat, min_time, threads, iters, tiny, progress)
    deel = _deel()
    notes: list[str] = []
    if deel is None:
        notes.append(
            "deel-torchlip is not installed: its rows are skipped (pip install deel-torchlip)"
        )
    rows: list[Row] = []
    try:
        for name in names:
            rows += _RUNNERS[name](cfg, deel, notes)
    finally:
        torch.set_num_threads(previous_threads)
    meta = {
        "torch": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": threads,
        "repeat": repeat,
        "iters": iters,
        "tiny": tiny,
        "deel_torchlip": deel[2] if deel else None,
    }
    return {"meta": meta, "notes": notes, "rows": [asdict(r) for r in rows]}


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def format_table(result: dict) -> str:
    """The rows of :func:`run` as a fixed-width text table, with the notes below it."""
    header = [
        "bench",
        "case",
        "impl",
        "median ms",
        "× lipsort",
        "check",
        "value",
        "saved MiB",
        "peak MiB",
    ]
    lines = []
    for r in result["rows"]:
        lines.append(
            [
                r["bench"],
                r["case"],
                r["impl"],
                _fmt(r["time_ms"], ".3f"),
                _fmt(r["ratio"], ".2f"),
                r["metric"],
                _fmt(r["value"], ".1e"),
                _fmt(r["saved_mib"], ".1f"),
                _fmt(r["peak_mib"], ".1f"),
            ]
        )
    widths = [
        max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
        for i, h in enumerate(header)
    ]
    right = {3, 4, 6, 7, 8}

    def render(cells):
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    meta = result["meta"]
    title = (
        f"torch {meta['torch']} on {meta['device_name']}, {meta['threads']} thread(s), "
        f"deel-torchlip {meta['deel_torchlip'] or 'not installed'}; "
        "'× lipsort' = median time / lipsort's median time in the same case (> 1: lipsort faster)"
    )
    out = [title, render(header), render(["-" * w for w in widths])]
    previous = None
    for line in lines:
        key = (line[0], line[1])
        shown = line if key != previous else ["", ""] + line[2:]
        out.append(render(shown))
        previous = key
    seen = set()
    for r in result["rows"]:
        if r["note"] and (r["bench"], r["impl"]) not in seen:
            seen.add((r["bench"], r["impl"]))
            out.append(f"  {r['bench']}/{r['impl']}: {r['note']}")
    out += [f"note: {n}" for n in result["notes"]]
    return "\n".join(out)


def _json_safe(obj):
    """NaN and infinities become ``null`` (strict JSON has no such numbers)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lipsort.bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="name",
        help=f"benchmarks to run, among {', '.join(BENCHMARKS)} (default: all)",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--repeat",
        type=int,
        default=2,
        help="interleaved timing rounds per case (default 2); a slow function runs twice per round",
    )
    parser.add_argument(
        "--iters", type=int, default=None, help="Björck iterations (default 20, 5 with --tiny)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's current setting)"
    )
    parser.add_argument(
        "--min-time",
        type=float,
        default=0.2,
        help="seconds spent timing a fast function per round (default 0.2)",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="tiny sizes and 5 Björck iterations (a smoke test, not a benchmark)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    names = args.names or list(BENCHMARKS)
    bad = [n for n in names if n not in BENCHMARKS]
    if bad:
        parser.error(f"unknown benchmark(s) {', '.join(bad)}; choose from {', '.join(BENCHMARKS)}")
    try:
        _checked(names, args.device, args.repeat, args.iters, args.threads, args.tiny)
    except ValueError as err:
        parser.error(str(err))
    result = run(
        names, args.device, args.repeat, args.iters, args.threads, args.min_time, args.tiny
    )
    print(format_table(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(_json_safe(result), fh, indent=2, allow_nan=False, default=str)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
