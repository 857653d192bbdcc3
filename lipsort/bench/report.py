"""Figures and markdown tables from benchmark results (matplotlib imported lazily)."""

from __future__ import annotations

from collections import defaultdict


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


def markdown(result: dict, bench: str) -> str:
    """The rows of one benchmark as a markdown table."""
    lines = ["| case | impl | ms | × lipsort | check | value | grad err | peak MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["bench"] != bench:
            continue

        def f(v, spec):
            return "–" if v is None else format(v, spec)

        lines.append(
            f"| {r['case']} | {r['impl']} | {r['time_ms']:.1f} | {r['ratio']:.2f} | {r['metric']} "
            f"| {f(r['value'], '.1e')} | {f(r.get('grad_error'), '.1e')} | {f(r['peak_mib'], '.0f')} |"
        )
    return "\n".join(lines)
