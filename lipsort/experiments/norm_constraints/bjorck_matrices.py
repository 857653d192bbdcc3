r"""Björck's iteration on matrices: it follows the scalar map, sign flips, cost, and convergence traces."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ... import functional as F
from .bjorck_scalar import iterations_to_tol, scalar_orbit

F64 = torch.float64


def _random_orthogonal(n: int, gen: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def matrix_follows_scalar_map(order: int, sigmas: Sequence[float], n_iters: int = 50, seed: int = 0) -> dict:
    r"""Run un-prescaled Björck on :math:`W = U \operatorname{diag}(\sigma) V^\top` and compare with :math:`g_p`.

    In exact arithmetic :math:`U^\top W_k V = \operatorname{diag}(g_p^k(\sigma))`, signs
    included. Returns the largest deviation over all iterations (while the scalar orbit stays
    bounded), the limits predicted and observed on the diagonal, and the distance of the final
    matrix to the polar factor :math:`UV^\top` (2 when one limit is −1: the matrix is
    orthonormal but is not the closest orthonormal matrix).

    Example:
        >>> out = matrix_follows_scalar_map(1, [0.5, 1.9], n_iters=30)
        >>> out["limits"], out["max_deviation"] < 1e-9
        ([1.0, -1.0], True)
    """
    gen = torch.Generator().manual_seed(seed)
    sig = torch.tensor(list(sigmas), dtype=F64)
    n = sig.numel()
    u, v = _random_orthogonal(n, gen), _random_orthogonal(n, gen)
    w = u @ torch.diag(sig) @ v.T
    orbit = scalar_orbit(sig.numpy(), order, n_iters)
    if not np.isfinite(orbit).all():
        raise ValueError("matrix_follows_scalar_map: some sigma diverges; pick values inside the bounded region")
    dev = 0.0
    for k in range(1, n_iters + 1):
        w = F.bjorck(w, n_iters=1, order=order, prescale=False)
        d = u.T @ w @ v
        dev = max(dev, float((d - torch.diag(torch.from_numpy(orbit[k]))).abs().max()))
    diag = torch.diagonal(u.T @ w @ v)
    return {
        "max_deviation": dev,
        "limits": [float(round(x)) for x in diag.tolist()],
        "predicted": [float(round(x)) for x in orbit[-1].tolist()],
        "orthonormality_error": float((w.T @ w - torch.eye(n, dtype=F64)).abs().max()),
        "distance_to_polar": float(torch.linalg.matrix_norm(w - u @ v.T, 2)),
    }


def sign_flip_example(n: int = 4, seed: int = 0) -> dict:
    r"""One order-1 step on a matrix with singular values 1 and 2, without pre-scaling.

    :math:`g_1(2) = 3 - 4 = -1`: the result is exactly orthonormal, yet it is not the closest
    orthonormal matrix (the polar factor) — one singular pair has flipped sign.

    Example:
        >>> out = sign_flip_example()
        >>> round(out["orthonormality_error"], 12), round(out["distance_to_polar"], 6)
        (0.0, 2.0)
    """
    gen = torch.Generator().manual_seed(seed)
    u, v = _random_orthogonal(n, gen), _random_orthogonal(n, gen)
    sig = torch.ones(n, dtype=F64)
    sig[0] = 2.0
    w = u @ torch.diag(sig) @ v.T
    w1 = F.bjorck(w, n_iters=1, order=1, prescale=False)
    return {
        "orthonormality_error": float((w1.T @ w1 - torch.eye(n, dtype=F64)).abs().max()),
        "distance_to_polar": float(torch.linalg.matrix_norm(w1 - u @ v.T, 2)),
        "norm_before": float(torch.linalg.matrix_norm(w, 2)),
    }


def flops_per_iteration(m: int, n: int, order: int) -> int:
    r"""Floating-point operations of one order-``p`` Björck step on an ``m × n`` matrix.

    With :math:`d = \min(m, n)` and :math:`D = \max(m, n)`: the Gram matrix (:math:`2d^2D`),
    :math:`p - 1` products of :math:`d \times d` matrices for the polynomial (Horner, starting
    from :math:`c_{p-1} I + c_p Q`, which needs no product), and the final product
    (:math:`2d^2D`): :math:`4d^2D + 2(p-1)d^3`, i.e. ``p + 1`` matrix products for a square
    matrix. Additions of identities are not counted.

    Example:
        >>> flops_per_iteration(100, 100, 1) / 1e6, flops_per_iteration(100, 100, 3) / 1e6
        (4.0, 8.0)
    """
    d, big = min(m, n), max(m, n)
    return 4 * d * d * big + 2 * (order - 1) * d**3


def bjorck_traces(
    shapes: Sequence[tuple[int, int]],
    orders: Sequence[int] = (1, 2, 3, 4),
    n_trials: int = 10,
    n_iters: int = 30,
    seed: int = 0,
    progress: bool = True,
):
    r"""Singular values of pre-scaled Björck iterates on Gaussian matrices, every iteration.

    For each shape and trial one Gaussian float64 matrix is drawn, pre-scaled by
    :func:`lipsort.functional.bjorck_prescale` and iterated with each order. Returns a list of
    records (dicts) with ``shape``, ``order``, ``trial``, ``s_min`` (smallest pre-scaled
    singular value), ``err`` (``max |σ − 1|`` after each of ``0..n_iters`` steps), ``norm``
    (the exact ``‖W_k‖₂``), ``min_increase`` (smallest change of a sorted singular value
    between consecutive steps), ``scalar_gap`` (largest deviation of the sorted singular values
    from :math:`g_p^k` applied to the initial ones) and ``flops`` (per iteration).

    Example:
        >>> recs = bjorck_traces([(8, 4)], orders=[1], n_trials=1, n_iters=10, progress=False)
        >>> bool(recs[0]["err"][-1] < 1e-6), bool(recs[0]["norm"].max() <= 1 + 1e-12)
        (True, True)
    """
    from tqdm import tqdm  # text bars: tqdm.auto wants ipywidgets in notebooks

    gen = torch.Generator().manual_seed(seed)
    records = []
    # All trials of a shape go through Björck and the SVD as one batch: a few large LAPACK
    # calls instead of thousands of small ones.
    jobs = [(shape, p) for shape in shapes for p in orders]
    w0 = {}
    for shape in shapes:
        w0[shape] = F.bjorck_prescale(torch.randn(n_trials, *shape, generator=gen, dtype=F64))
    for shape, p in tqdm(jobs, desc="Björck traces", disable=not progress, mininterval=1.0):
        w = w0[shape]
        svals = [torch.linalg.svdvals(w).numpy()]
        for _ in range(n_iters):
            w = F.bjorck(w, n_iters=1, order=p, prescale=False)
            svals.append(torch.linalg.svdvals(w).numpy())
        svals = np.sort(np.stack(svals), axis=-1)  # (n_iters + 1, trials, d)
        orbit = np.sort(scalar_orbit(svals[0], p, n_iters), axis=-1)
        for trial in range(n_trials):
            sv = svals[:, trial]
            records.append(
                {
                    "shape": tuple(shape),
                    "order": p,
                    "trial": trial,
                    "s_min": float(sv[0].min()),
                    "err": np.abs(sv - 1).max(axis=1),
                    "norm": sv.max(axis=1),
                    "min_increase": float(np.diff(sv, axis=0).min()),
                    "scalar_gap": float(np.abs(sv - orbit[:, trial]).max()),
                    "flops": flops_per_iteration(*shape, p),
                }
            )
    return records


def trace_summary(records, tol: float = 1e-4):
    """Per (shape, order): iterations to ``tol`` (measured on the matrix, and predicted from ``s_min``).

    Columns: median and max measured iterations over trials (NaN for a trace that never
    reaches ``tol``), max predicted, whether every trial matched its prediction (a trace that
    does not reach ``tol`` matches a prediction beyond its length), and MFLOPs to reach ``tol``
    (median).

    Example:
        >>> recs = bjorck_traces([(8, 4)], orders=[1, 2], n_trials=2, n_iters=15, progress=False)
        >>> bool(trace_summary(recs)["all match"].all())
        True
    """
    import pandas as pd

    rows = []
    for r in records:
        n_iters = len(r["err"]) - 1
        hit = np.flatnonzero(r["err"] <= tol)
        # A trace that never reaches tol only says "more than n_iters": compare censored counts.
        k = int(hit[0]) if hit.size else n_iters + 1
        pred = min(int(iterations_to_tol(r["s_min"], r["order"], tol)[0]), n_iters + 1)
        rows.append({"shape": f"{r['shape'][0]}×{r['shape'][1]}", "order": r["order"],
                     "iters": k if hit.size else np.nan, "predicted": pred, "match": k == pred,
                     "mflops": k * r["flops"] / 1e6 if hit.size else np.nan})
    df = pd.DataFrame(rows)
    out = df.groupby(["shape", "order"], sort=False).agg(
        **{"median iters": ("iters", "median"), "max iters": ("iters", "max"),
           "max predicted": ("predicted", "max"), "all match": ("match", "all"),
           "median MFLOPs": ("mflops", "median")}
    )
    return out


def plot_bjorck_convergence(records, orders: Sequence[int] = (1, 2, 3, 4), tol: float = 1e-4):
    """Top: ``max |σ − 1|`` against iterations, one panel per shape (median and range over
    trials); bottom row, last panel: against MFLOPs for the hardest (first) shape."""
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in records))
    fig, axes = plt.subplots(1, len(shapes) + 1, figsize=(4 * (len(shapes) + 1), 3.6), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, shape in zip(axes, shapes):
        for i, p in enumerate(orders):
            errs = np.stack([r["err"] for r in records if r["shape"] == shape and r["order"] == p])
            errs = np.maximum(errs, 1e-16)
            k = np.arange(errs.shape[1])
            ax.semilogy(k, np.median(errs, 0), color=colors[i], label=f"order {p}")
            ax.fill_between(k, errs.min(0), errs.max(0), color=colors[i], alpha=0.2)
        ax.axhline(tol, color="k", lw=0.8, ls="--")
        ax.axvline(20, color="grey", lw=0.8, ls=":")
        ax.set(title=f"{shape[0]}×{shape[1]} Gaussian", xlabel="iterations")
    axes[0].set_ylabel("max |σ − 1|")
    axes[0].legend(fontsize=8)
    ax = axes[-1]
    shape = shapes[0]
    for i, p in enumerate(orders):
        recs = [r for r in records if r["shape"] == shape and r["order"] == p]
        errs = np.maximum(np.median(np.stack([r["err"] for r in recs]), 0), 1e-16)
        ax.semilogy(np.arange(errs.size) * recs[0]["flops"] / 1e6, errs, color=colors[i], label=f"order {p}")
    ax.axhline(tol, color="k", lw=0.8, ls="--")
    ax.set(title=f"{shape[0]}×{shape[1]}: cost", xlabel="MFLOPs (median trial)")
    fig.tight_layout()
    return fig
