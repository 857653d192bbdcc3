"""Accuracy-against-epoch figures of a profile's runs, drawn from their result files.

A chapter that trains for epochs keeps each curve in its results as one key per epoch,
``<run>.<metric>.eNNN`` (``mnist.large.bcop.test_acc.e002``, ``mnist.relu.test_acc.e117``;
accuracies as fractions): checkpoints are not committed, result files are. The status page
shows, per chapter, one panel per metric with a line per run, from the records of the profile
and of its partial runs; where two records hold the same curve, the later run's is drawn.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

__all__ = ["curve_key", "epoch_curves", "chapter_curves", "draw", "figure_files", "write_figures"]

_KEY = re.compile(r"^(?P<run>.+)\.(?P<metric>[a-z_]+\d*)\.e(?P<epoch>\d{3})$")


def curve_key(run: str, metric: str, epoch: int) -> str:
    """The result key of ``run``'s ``metric`` after ``epoch``, as :func:`epoch_curves` reads it.

    >>> curve_key("mnist.large.bcop", "cert158", 2)
    'mnist.large.bcop.cert158.e002'
    """
    key = f"{run}.{metric}.e{epoch:03d}"
    m = _KEY.match(key)
    if not m or m["metric"] != metric:  # the key must read back as this metric
        raise ValueError(f"metric {metric!r} must be lower-case letters and '_', then digits (e.g. test_acc, cert158)")
    return key


def epoch_curves(results: dict) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """``{(run, metric): [(epoch, value), ...]}`` (sorted by epoch) from a record's results.

    >>> epoch_curves({"mnist.relu.test_acc.e002": 0.9, "mnist.relu.test_acc.e001": 0.8, "clean": 1.0})
    {('mnist.relu', 'test_acc'): [(1, 0.8), (2, 0.9)]}
    """
    out: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for key, value in results.items():
        m = _KEY.match(key)
        if m and isinstance(value, (int, float)):
            out.setdefault((m["run"], m["metric"]), []).append((int(m["epoch"]), float(value)))
    return {k: sorted(v) for k, v in sorted(out.items())}


def chapter_curves(records: dict[str, dict]) -> dict[str, dict[tuple[str, str], list[tuple[int, float]]]]:
    """``{slug: curves}`` merged over ``records`` (``{"<slug>"|"<digest>/<slug>": record}``),
    the later record (provenance date) replacing a curve that an earlier one also holds."""
    out: dict[str, dict] = {}
    dated = sorted(records.items(), key=lambda kv: str((kv[1].get("provenance") or {}).get("date", "")))
    for key, record in dated:
        curves = epoch_curves(record.get("results") or {})
        if curves:
            out.setdefault(key.rsplit("/", 1)[-1], {}).update(curves)
    return dict(sorted(out.items()))


def _metric_label(metric: str) -> str:
    if metric == "test_acc":
        return "test accuracy (%)"
    m = re.fullmatch(r"cert(\d{3})", metric)
    return f"certified accuracy at ε = {int(m[1]) / 100:g} (%)" if m else metric


def draw(curves: dict[tuple[str, str], list[tuple[int, float]]], title: str):
    """A matplotlib figure: one panel per metric (test accuracy first), a line per run, in %."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    metrics = sorted({m for _, m in curves}, key=lambda m: (m != "test_acc", m))
    runs = sorted({r for r, _ in curves})
    ncol = max(1, min(len(runs), 3 * len(metrics)))  # legend columns that fit the figure's width
    fig = Figure(figsize=(4.6 * len(metrics), 3.4 + 0.2 * -(-len(runs) // ncol)), layout="constrained")
    # A colour per run: tab20 once the default cycle's 10 would repeat.
    colors = ([f"C{i}" for i in range(10)] if len(runs) <= 10
              else [matplotlib.colormaps["tab20"](i % 20) for i in range(len(runs))])
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        for i, run in enumerate(runs):
            points = curves.get((run, metric))
            if not points:
                continue
            epochs, values = zip(*points)
            ax.plot(epochs, [100 * v for v in values], color=colors[i], label=run,
                    marker="o" if len(points) <= 25 else None, markersize=3)  # fmt: skip
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(_metric_label(metric))
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize=7)
    fig.suptitle(title, fontsize=10)
    return fig


def figure_files(records: dict[str, dict], prefix: str) -> dict[str, str]:
    """``{slug: "results/curves/<prefix>-<slug>.png"}`` (relative to ``book/``) for each chapter
    of ``records`` that kept curves."""
    return {slug: f"results/curves/{prefix}-{slug}.png" for slug in chapter_curves(records)}


def write_figures(records: dict[str, dict], book: Path, prefix: str) -> dict[str, str]:
    """Draw :func:`chapter_curves` of ``records`` to :func:`figure_files` under ``book``; a file
    whose bytes would not change is left as it is (the PNG carries no date or version, so
    re-rendering an unchanged book leaves the checkout clean). Returns :func:`figure_files`."""
    files = figure_files(records, prefix)
    for slug, curves in chapter_curves(records).items():
        buf = io.BytesIO()
        draw(curves, slug).savefig(buf, format="png", dpi=110, metadata={"Software": None})
        path = Path(book) / files[slug]
        if not path.is_file() or path.read_bytes() != buf.getvalue():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(buf.getvalue())
    return files
