"""Figures and markdown tables from benchmark results (matplotlib imported lazily)."""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path


def plot_widths(result: dict, path: str) -> None:
    """Median training-step time of each contender against the layer width (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in result["rows"]:
        if r["bench"] == "widths" and r.get("x"):
            curves[r["impl"]].append((r["x"], r["time_ms"]))
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for impl, pts in curves.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("width n (n×n layer, batch 128)")
    ax.set_ylabel("training step, median ms")
    meta = result["meta"]
    ax.set_title(f"after 20 Adam steps; {meta['device_name']}, {meta['threads']} threads", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- the performance page
#
# book/performance.md holds its tables between markers
#     <!-- bench: cpu.json layer -->  ...  <!-- /bench -->
# that :func:`fill_page` regenerates from ``book/results/bench/<file>`` (so no number on the page
# is typed by hand); ``python -m lipsort.reproduce --render-only`` calls it.

_DASH = "–"


def _fmt(v, spec: str) -> str:
    return _DASH if v is None else format(v, spec)


def _rows(result: dict, bench: str) -> list[dict]:
    rows = [r for r in result["rows"] if r["bench"] == bench]
    if not rows:
        raise ValueError(f"the benchmark result has no rows of {bench!r} (it has {sorted({r['bench'] for r in result['rows']})})")
    return rows


def _grouped(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["case"], []).append(r)
    return groups


def _pick(rows: list[dict], impl: str) -> dict:
    for r in rows:
        if r["impl"] == impl:
            return r
    raise ValueError(f"no {impl!r} row in case {rows[0]['case']!r} (impls: {[r['impl'] for r in rows]})")


def _vs(r: dict, spec: str = ".1f", unit: str = "") -> str:
    """``time (ratio×)``, the ratio being this row's time over lipsort's in the same case."""
    return f"{r['time_ms']:{spec}}{unit} ({r['ratio']:.2f}×)"


_CHECK_HEADER = ["| case | impl | ms | × lipsort | max\\|σ−1\\| | grad err | peak MiB |", "|---|---|---|---|---|---|---|"]


def _check_table(result: dict, bench: str, case_name, impl_names: dict) -> list[str]:
    lines = list(_CHECK_HEADER)
    for case, rows in _grouped(_rows(result, bench)).items():
        for i, r in enumerate(rows):
            lines.append(f"| {case_name(case) if i == 0 else ''} | {impl_names.get(r['impl'], r['impl'])} | {r['time_ms']:.1f} "
                         f"| {r['ratio']:.2f} | {_fmt(r['value'], '.1e')} | {_fmt(r.get('grad_error'), '.1e')} "
                         f"| {_fmt(r['peak_mib'], '.0f')} |")  # fmt: skip
    return lines


def _layer(result: dict) -> list[str]:
    return _check_table(result, "layer", lambda case: case.rsplit(", ", 1)[-1],
                        {"lipsort bjorck(20)": "lipsort `n_iters=20`"})  # fmt: skip


def _bjorck(result: dict) -> list[str]:
    return _check_table(result, "bjorck", lambda case: case.split()[0].replace("x", "×"),
                        {"lipsort": "lipsort `polar`", "lipsort bjorck(20)": "`bjorck(w, 20)`",
                         "reference": "reference (Frobenius pre-scale)", "deel-torchlip": "deel-torchlip, 20 it"})  # fmt: skip


def _widths(result: dict) -> list[str]:
    lines = ["| width | lipsort ms | deel-torchlip (× lipsort) | deel grad err | nn.Linear ms |", "|---|---|---|---|---|"]
    groups = sorted(_grouped(_rows(result, "widths")).values(), key=lambda rows: rows[0]["x"])
    for rows in groups:
        ours, deel, plain = (_pick(rows, impl) for impl in ("lipsort", "deel-torchlip", "nn.Linear"))
        lines.append(f"| {ours['x']:g} | {ours['time_ms']:.1f} | {deel['time_ms']:.1f} ({deel['ratio']:.2f}) "
                     f"| {_fmt(deel.get('grad_error'), '.1e')} | {plain['time_ms']:.1f} |")  # fmt: skip
    return lines


def _activation_name(case: str) -> str:
    name, shape = case.split(" (", 1)
    if name.startswith("group_sort g="):
        return f"GroupSort({name.split('=')[1]}) ({shape}"
    return {"max_min": "MaxMin"}.get(name, name) + f" ({shape}"


def _activations(result: dict) -> list[str]:
    lines = ["| case | lipsort ms | lipsort, Python Function | lipsort, PyTorch ops | reshape + sort | deel-torchlip "
             "| ReLU |", "|---|---|---|---|---|---|---|"]
    for case, rows in _grouped(_rows(result, "groupsort")).items():
        impls = {r["impl"]: r for r in rows}
        cells = [_vs(impls[k], ".2f") if k in impls else _DASH
                 for k in ("python-function", "pytorch-ops", "naive", "deel-torchlip", "relu")]
        lines.append(f"| {_activation_name(case)} | {impls['lipsort']['time_ms']:.2f} | {' | '.join(cells)} |")
    return lines


def _cache(result: dict) -> list[str]:
    lines = ["| case | lipsort (cached) | plain layers (`frozen`) | recomputing the weight |", "|---|---|---|---|"]
    for case, rows in _grouped(_rows(result, "cache")).items():
        impls = {r["impl"]: r for r in rows}
        if "plain" in impls:  # a network: its frozen copy and the uncached forward
            net = case.removeprefix("eval ").split(" batch")[0]
            if net.startswith("Small network"):  # Li et al.'s, with one kind of convolution
                net = f"Small network, {net.split()[-1]} convolutions (Björck dense, MaxMin)"
            else:
                net += " (Björck, MaxMin)"
            lines.append(f"| {net} | {impls['lipsort']['time_ms']:.1f} ms "
                         f"| {_vs(impls['plain'], unit=' ms')} | {_vs(impls['recompute'], unit=' ms')} |")  # fmt: skip
        else:  # one layer under each constraint, against nn.Linear
            kinds = " / ".join(f"{impls[k]['time_ms']:.1f}" for k in ("lipsort", "spectral", "linf"))
            lines.append(f"| one {case.split()[1].replace('x', '×')} layer: Björck / spectral / ℓ∞ | {kinds} ms "
                         f"| {_vs(impls['nn.Linear'], unit=' ms')} | {_DASH} |")  # fmt: skip
    return lines


_MNIST_STEPS = math.ceil(60_000 / 128)  # steps of an MNIST epoch at the benchmark's batch of 128


def _networks(result: dict) -> list[str]:
    lines = ["| case | impl | step ms | × lipsort | peak MiB | full run |", "|---|---|---|---|---|---|"]
    names = {"lipsort bjorck(20)": "lipsort `n_iters=20`", "deel-torchlip": "deel-torchlip (`SpectralLinear`, GroupSort2)"}
    for case, rows in _grouped(_rows(result, "mlp")).items():
        mnist = case.startswith("MLP")
        for i, r in enumerate(rows):
            full = ""
            if r["impl"].startswith("lipsort") and mnist:
                full = f"{r['time_ms'] * _MNIST_STEPS / 6e4:.1f} min per 60,000-image epoch ({_MNIST_STEPS} steps)"
            elif r["impl"].startswith("lipsort"):  # the benchmark's own extrapolation to A3's run
                full = f"{r['value']:.0f} min for the run ({r['note']})"
            label = ("MNIST MLP" if mnist else "A3 critic") if i == 0 else ""
            lines.append(f"| {label} | {names.get(r['impl'], r['impl'])} | {r['time_ms']:.1f} | {r['ratio']:.2f} "
                         f"| {_fmt(r['peak_mib'], '.0f')} | {full} |")  # fmt: skip
    return lines


def _bcop_layer(case: str) -> str:
    """``"Small 4→16 2×2 @14"`` from a case ``"Small BCOP 4→16 2×2 @14×14, …"``."""
    net, _, shape, kernel, size = case.split(",")[0].split()
    return f"{net} {shape} {kernel} {size.split('×')[0]}"


def _bcop(result: dict) -> list[str]:
    lines = ["| layer | lipsort ms | per-tap | per-tap, lipsort Björck | free conv, lipsort | free nn.Conv2d "
             "| max\\|σ−1\\| (lipsort / per-tap) | per-tap ÷ free lipsort conv |",
             "|---|---|---|---|---|---|---|---|"]
    for case, rows in _grouped(_rows(result, "bcop")).items():
        impls = {r["impl"]: r for r in rows}
        ours, tap, free = (_pick(rows, impl) for impl in ("lipsort", "per-tap", "unconstrained"))
        fast, conv = (_vs(impls[i]) if i in impls else _DASH
                      for i in ("per-tap, lipsort Björck", "unconstrained, lipsort conv"))
        floor = impls.get("unconstrained, lipsort conv", free)
        lines.append(f"| {_bcop_layer(case)} | {ours['time_ms']:.1f} | {_vs(tap)} | {fast} | {conv} | {_vs(free)} "
                     f"| {_fmt(ours['value'], '.0e')} / {_fmt(tap['value'], '.0e')} "
                     f"| {tap['time_ms'] / floor['time_ms']:.2f}× |")  # fmt: skip
    return lines


def _bcop_kernel(result: dict) -> list[str]:
    lines = ["| layer | lipsort ms | per-tap | per-tap, lipsort Björck | grad err (lipsort / per-tap) |",
             "|---|---|---|---|---|"]
    for case, rows in _grouped(_rows(result, "bcop_kernel")).items():
        ours, tap, fast = (_pick(rows, impl) for impl in ("lipsort", "per-tap", "per-tap, lipsort Björck"))
        lines.append(f"| {_bcop_layer(case)} | {ours['time_ms']:.2f} | {_vs(tap, '.2f')} "
                     f"| {_vs(fast, '.2f')} | {_fmt(ours['grad_error'], '.0e')} / {_fmt(tap['grad_error'], '.0e')} |")  # fmt: skip
    return lines


def _subnormal(result: dict) -> list[str]:
    lines = ["| case | flushed (lipsort) | not flushed (torch's default) | no subnormal moments | subnormal fraction (not flushed) |",
             "|---|---|---|---|---|"]
    for case, rows in _grouped(_rows(result, "subnormal")).items():
        ours, slow, fresh = (_pick(rows, impl) for impl in ("lipsort", "not flushed", "no subnormal moments"))
        lines.append(f"| {case} | {ours['time_ms']:.1f} ms | {_vs(slow, unit=' ms')} | {_vs(fresh, unit=' ms')} "
                     f"| {slow['value']:.2f} |")  # fmt: skip
    return lines


def _stop(result: dict) -> list[str]:
    lines = ["| case | early stop (lipsort) | every step | max \\|‖W‖₂ − 1\\| (stop / every step) | peak MiB (stop / every step) |",
             "|---|---|---|---|---|"]
    for case, rows in _grouped(_rows(result, "stop")).items():
        ours, full = (_pick(rows, impl) for impl in ("lipsort", "every step"))
        lines.append(f"| {case.split(', batch')[0]} | {ours['time_ms']:.0f} ms | {_vs(full, '.0f', ' ms')} "
                     f"| {_fmt(ours['value'], '.0e')} / {_fmt(full['value'], '.0e')} "
                     f"| {_fmt(ours['peak_mib'], '.0f')} / {_fmt(full['peak_mib'], '.0f')} |")  # fmt: skip
    return lines


def _linf(result: dict) -> list[str]:
    impls = ("lipsort", "autograd through the projection", "projected gradient", "unconstrained")
    lines = ["| case | closed form (lipsort) | autograd through the projection | projected gradient (A8) "
             "| unconstrained | max ‖W‖∞ (same order) | peak MiB (same order) |",
             "|---|---|---|---|---|---|---|"]
    for case, rows in _grouped(_rows(result, "linf")).items():
        r = [_pick(rows, impl) for impl in impls]
        lines.append(f"| {case.split(', batch')[0]} | {r[0]['time_ms']:.1f} ms | {_vs(r[1], unit=' ms')} "
                     f"| {_vs(r[2], unit=' ms')} | {_vs(r[3], unit=' ms')} "
                     f"| {' / '.join(_fmt(x['value'], '.3g') for x in r)} "
                     f"| {' / '.join(_fmt(x['peak_mib'], '.0f') for x in r)} |")  # fmt: skip
    return lines


def _polar(result: dict) -> list[str]:
    """What the polar factor did in each case (the notes of ``weights.polar_note``)."""
    return [f"- {n}" for n in result.get("notes", []) if n.startswith("lipsort")]


#: The tables of the performance page, by the name its markers use.
PAGE_TABLES = {"layer": _layer, "widths": _widths, "bjorck": _bjorck, "activations": _activations,
               "cache": _cache, "networks": _networks, "bcop": _bcop, "bcop_kernel": _bcop_kernel,
               "polar": _polar, "subnormal": _subnormal, "stop": _stop, "linf": _linf}  # fmt: skip


def page_table(result: dict, name: str) -> str:
    """One table of ``book/performance.md`` (a key of :data:`PAGE_TABLES`) from a benchmark result."""
    if name not in PAGE_TABLES:
        raise ValueError(f"unknown performance table {name!r}; known: {sorted(PAGE_TABLES)}")
    return "\n".join(PAGE_TABLES[name](result))


_MARKER = re.compile(r"(<!-- bench: (\S+) (\S+) -->\n)(.*?)(<!-- /bench -->)", re.S)


def fill_page(text: str, results_dir: str | Path) -> str:
    """``text`` with every ``<!-- bench: <file> <table> -->`` … ``<!-- /bench -->`` block
    regenerated from ``<results_dir>/<file>`` (an error names a missing file or table).

    Example:
        >>> import json, tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> row = dict(bench="widths", impl="lipsort", case="8x8", x=8, time_ms=1.0, ratio=1.0)
        >>> rows = [row, {**row, "impl": "deel-torchlip", "time_ms": 2.0, "ratio": 2.0, "grad_error": 0.5},
        ...         {**row, "impl": "nn.Linear", "time_ms": 0.1, "ratio": 0.1}]
        >>> _ = (d / "r.json").write_text(json.dumps({"rows": rows}))
        >>> print(fill_page("<!-- bench: r.json widths -->\\nold\\n<!-- /bench -->", d))
        <!-- bench: r.json widths -->
        | width | lipsort ms | deel-torchlip (× lipsort) | deel grad err | nn.Linear ms |
        |---|---|---|---|---|
        | 8 | 1.0 | 2.0 (2.00) | 5.0e-01 | 0.1 |
        <!-- /bench -->
    """
    cache: dict[str, dict] = {}

    def table(m: re.Match) -> str:
        name, kind = m.group(2), m.group(3)
        if name not in cache:
            path = Path(results_dir) / name
            if not path.is_file():
                raise FileNotFoundError(f"the performance page needs {path}: run python -m lipsort.bench (see book/performance.md)")
            cache[name] = json.loads(path.read_text(encoding="utf-8"))
        return f"{m.group(1)}{page_table(cache[name], kind)}\n{m.group(5)}"

    return _MARKER.sub(table, text)
