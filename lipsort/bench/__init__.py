r"""Benchmarks of the library against peers, reported as ratios measured in one run.

``python -m lipsort.bench [name ...] [--threads N] [--quick] [--device cpu|cuda]`` prints one
row per (case, implementation): the median time of the measured call (forward + backward, or
a whole training step; implementations of a case timed in interleaved rounds so that load
changes hit them alike), the ratio ``time / time of lipsort`` in the same case and run (above
1: lipsort is faster), an accuracy check, the relative gradient error against a converged
float64 reference where it applies, the memory autograd keeps for backward and the peak memory
of one call. It writes the results (with device and versions) to
``book/results/bench/<device>.json`` (``--json PATH`` elsewhere, ``--no-save`` not at all; a
``--quick`` run only with ``--json``) and, with ``--plot``, the cost-versus-width figure beside it. Absolute times depend on the
machine and its load; only ratios within one run are meant to be compared.

* ``bjorck``: :func:`lipsort.functional.polar` (certified polar factor), ``bjorck`` at a
  fixed count, the Frobenius-scaled reference and deel-torchlip's normalizers, applied to
  raw ``nn.Linear`` weights of the papers' MNIST shapes.
* ``layer``: a training step of a 1024×1024 constrained layer (batch 128) as users train it:
  :func:`lipsort.bjorck_orthonormal` at its defaults beside deel-torchlip's ``SpectralLinear``
  at its defaults and a plain ``nn.Linear``, at initialization and after 20 Adam steps.
* ``widths``: the same step after 20 Adam steps for widths 128 to 2048 (a cost curve).
* ``groupsort``: MaxMin and GroupSort(4) against reshape + sort, deel-torchlip and ReLU.
* ``cache``: evaluation of a Björck MLP, of one layer under each constraint and of Li et
  al.'s Small network with each orthogonal convolution (cached weights) against the plain
  layers (:func:`lipsort.frozen`) and against recomputing the weights at every forward pass.
* ``mlp``: a training step (Adam) of the paper's 784-1024-1024-1024-10 MaxMin MLP, and of
  A3's FullSort critic extrapolated to its 19,200 steps.
* ``bcop``: a training step (forward, and backward of a fixed cotangent to the parameters and,
  but for a network's first layer, the input; batch 128) of each BCOP layer of Li et al.'s
  Small and Large networks against the per-tap construction
  (:func:`lipsort.conv.reference.bcop_kernel_per_tap`, with autograd through its Björck steps
  as in the authors' code, and with lipsort's Björck) and a free circular convolution, with
  the exact max |σ − 1| of each kernel at the layer's input size.
* ``subnormal``: an Adam step of the paper's standard ReLU MLP whose moments have partly decayed
  into subnormal floats, flushed to zero (as after :func:`lipsort.setup`) or not (torch's default).
* ``stop``: training steps of the papers' networks at a fixed 20 Björck iterations, with the
  loop's early stop at the rounding floor (CPU) and with every step run.

New cases register a runner with :func:`register`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import asdict

import torch

from ._measure import Config, Row
from .convolutions import bench_bcop
from .nets import bench_groupsort, bench_linf, bench_mlp, bench_stop, bench_subnormal
from .peers import deel_torchlip, naive_group_sort, reference_bjorck
from .weights import bench_bjorck, bench_cache, bench_layer, bench_widths

__all__ = [
    "BENCHMARKS",
    "Row",
    "format_table",
    "main",
    "naive_group_sort",
    "reference_bjorck",
    "register",
    "run",
]

_RUNNERS: dict[str, Callable] = {
    "bjorck": bench_bjorck,
    "layer": bench_layer,
    "widths": bench_widths,
    "groupsort": bench_groupsort,
    "cache": bench_cache,
    "mlp": bench_mlp,
    "linf": bench_linf,
    "bcop": bench_bcop,
    "subnormal": bench_subnormal,
    "stop": bench_stop,
}
BENCHMARKS = tuple(_RUNNERS)


def register(name: str, runner: Callable[[Config, object, list], list[Row]]) -> None:
    """Add a benchmark: ``runner(cfg, deel, notes)`` returns rows (see ``_measure.measure_case``).

    The hook for cases defined outside this package (the built-in ones are in ``_RUNNERS``).
    """
    global BENCHMARKS
    _RUNNERS[name] = runner
    BENCHMARKS = tuple(_RUNNERS)


def _checked(names, device, repeat, iters, threads):
    unknown = [n for n in names if n not in _RUNNERS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {list(_RUNNERS)}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was requested but torch sees no GPU")
    if repeat < 1 or iters < 1:
        raise ValueError(f"repeat and iters must be at least 1, got repeat={repeat}, iters={iters}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    return device, threads or torch.get_num_threads()


def run(
    names=BENCHMARKS,
    device="cpu",
    repeat: int = 3,
    iters: int = 20,
    threads: int | None = None,
    min_time: float = 0.2,
    tiny: bool = False,
    progress: bool = True,
) -> dict:
    """Run the named benchmarks; returns ``{"meta": {...}, "notes": [...], "rows": [...]}``.

    ``tiny`` uses tiny sizes: a smoke test of the machinery, not a benchmark.

    Example:
        >>> res = run(["groupsort"], repeat=1, threads=1, min_time=0.001, tiny=True, progress=False)
        >>> {"lipsort", "naive", "relu"} <= {r["impl"] for r in res["rows"]}
        True
        >>> [r["ratio"] for r in res["rows"] if r["impl"] == "lipsort"]
        [1.0, 1.0, 1.0]
    """
    device, threads = _checked(names, device, repeat, iters, threads)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    cfg = Config(device, repeat, min_time, threads, iters, tiny, progress)
    deel = deel_torchlip()
    notes: list[str] = []
    if deel is None:
        notes.append("deel-torchlip is not installed: its rows are skipped (pip install deel-torchlip)")
    rows: list[Row] = []
    try:
        for name in names:
            rows += _RUNNERS[name](cfg, deel, notes)
    finally:
        torch.set_num_threads(previous_threads)
    meta = {
        "torch": torch.__version__,
        "numpy": __import__("numpy").__version__,
        "python": sys.version.split()[0],
        "device": str(device),
        "device_name": device_name(device),
        "threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),  # idle OpenMP threads spin or sleep
        "repeat": repeat,
        "iters": iters,
        "tiny": tiny,
        "deel_torchlip": deel[3] if deel else None,
    }
    return {"meta": meta, "notes": notes, "rows": [asdict(r) for r in rows]}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    from ..runtime import cpu_name

    return f"cpu: {cpu_name()} ({platform.machine()})"


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
        "grad err",
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
                _fmt(r.get("grad_error"), ".1e"),
                _fmt(r["saved_mib"], ".1f"),
                _fmt(r["peak_mib"], ".1f"),
            ]
        )
    widths = [
        max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
        for i, h in enumerate(header)
    ]
    right = {3, 4, 6, 7, 8, 9}

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




def default_path(device: torch.device) -> str:
    return os.path.join("book", "results", "bench", f"{device.type}.json")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lipsort.bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("names", nargs="*", metavar="name",
                        help=f"benchmarks to run, among {', '.join(_RUNNERS)} (default: all)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeat", type=int, default=3,
                        help="interleaved timing rounds per case (default 3)")
    parser.add_argument("--iters", type=int, default=20,
                        help="Björck iterations of the fixed-count contenders (default 20)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's current setting)")
    parser.add_argument("--min-time", type=float, default=0.2,
                        help="seconds spent timing a fast function per round (default 0.2)")
    parser.add_argument("--quick", "--tiny", dest="tiny", action="store_true",
                        help="tiny sizes: a smoke test of the machinery, not a benchmark")
    parser.add_argument("--json", metavar="PATH",
                        help="where to write the JSON results (default book/results/bench/<device>.json; "
                             "a --quick run writes none unless given this)")
    parser.add_argument("--no-save", action="store_true", help="write no JSON file")
    parser.add_argument("--plot", metavar="PATH", help="also draw the cost-versus-width curves (PNG)")
    args = parser.parse_args(argv)
    names = args.names or list(_RUNNERS)
    try:
        device, _ = _checked(names, args.device, args.repeat, args.iters, args.threads)
    except ValueError as err:
        parser.error(str(err))
    result = run(names, args.device, args.repeat, args.iters, args.threads, args.min_time, args.tiny)
    print(format_table(result))
    # A smoke run must not replace the measured results the performance page is built from.
    if not args.no_save and (args.json or not args.tiny):
        path = args.json or default_path(device)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(_json_safe(result), fh, indent=2, allow_nan=False, default=str)
            fh.write("\n")
        print(f"wrote {path}")
    if args.plot:
        from .report import plot_widths

        plot_widths(result, args.plot)
        print(f"wrote {args.plot}")
    return 0
