r"""Power iteration under-estimates the spectral norm: the Marchenko–Pastur theory of the gap and its measurement."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ... import functional as F

F64 = torch.float64


def marchenko_pastur_moment(j: int, c: float) -> float:
    r"""``j``-th moment of the Marchenko–Pastur law of ratio ``c`` (mean 1): a Narayana polynomial.

    .. math:: m_j(c) = \sum_{r=0}^{j-1} \frac{1}{r+1}\binom{j}{r}\binom{j-1}{r} c^r

    (Catalan numbers for ``c = 1``). It is the limit of :math:`\frac1n \operatorname{tr}
    (A^j)` for :math:`A = W^\top W / m` and a Gaussian ``m × n`` matrix with :math:`n/m \to c`.

    Example:
        >>> [marchenko_pastur_moment(j, 1.0) for j in range(1, 5)]
        [1.0, 2.0, 5.0, 14.0]
    """
    return float(sum(math.comb(j, r) * math.comb(j - 1, r) * c**r / (r + 1) for r in range(j)))


def power_iteration_theory(n_iters: int, shape: tuple[int, int] = (1, 1)) -> float:
    r"""Large-matrix limit of :math:`\hat\sigma / \sigma_{\max}` after ``n_iters`` power iterations from a random vector.

    After ``k`` iterations :math:`u \propto A^k u_0` with :math:`A = W^\top W`, so
    :math:`\hat\sigma^2 = u_0^\top A^{2k+1} u_0 / u_0^\top A^{2k} u_0`. For a random
    :math:`u_0` and a large Gaussian ``W`` both quadratic forms concentrate on the normalized
    traces, the Marchenko–Pastur moments of ratio :math:`c = \min(m,n)/\max(m,n)`, while
    :math:`\sigma_{\max}^2 \to (1 + \sqrt c)^2` in the same units:

    .. math:: \frac{\hat\sigma}{\sigma_{\max}} \to \frac{\sqrt{m_{2k+1}(c)/m_{2k}(c)}}{1 + \sqrt c},

    which is :math:`\sqrt{5/8} \approx 0.791` for a square matrix and one iteration.

    Example:
        >>> round(power_iteration_theory(1), 4), round(power_iteration_theory(1, (256, 128)), 4)
        (0.7906, 0.7932)
    """
    c = min(shape) / max(shape)
    m_odd = marchenko_pastur_moment(2 * n_iters + 1, c)
    m_even = marchenko_pastur_moment(2 * n_iters, c) if n_iters > 0 else 1.0
    return math.sqrt(m_odd / m_even) / (1 + math.sqrt(c))


def power_iteration_gaps(
    shapes: Sequence[tuple[int, int]], n_iters: Sequence[int] = (1, 2, 5, 10, 20), n_trials: int = 50, seed: int = 0
):
    r"""Ratio :math:`\hat\sigma / \sigma_{\max}` of power iteration from a random start, on fresh Gaussian matrices.

    Returns a DataFrame with one row per (shape, iterations, trial): the ratio, which is at
    most 1 because :math:`\|Wu\|_2 \le \|W\|_2` for a unit ``u``; the exact
    :math:`\sigma_{\max}` comes from an SVD.

    Example:
        >>> df = power_iteration_gaps([(16, 16)], n_iters=[1], n_trials=5)
        >>> bool((df["ratio"] <= 1 + 1e-12).all())
        True
    """
    import pandas as pd

    gen = torch.Generator().manual_seed(seed)
    rows = []
    for shape in shapes:
        ws = torch.randn(n_trials, *shape, generator=gen, dtype=F64)
        u0s = torch.randn(n_trials, shape[1], generator=gen, dtype=F64)
        sigmas = torch.linalg.matrix_norm(ws, 2)  # exact, one batched SVD
        for t in range(n_trials):
            w, u0, sigma = ws[t], u0s[t], float(sigmas[t])
            for k in n_iters:
                est, _ = F.power_iteration(w, u0, k)
                rows.append({"shape": f"{shape[0]}×{shape[1]}", "iterations": k, "trial": t,
                             "ratio": float(est) / sigma, "theory": power_iteration_theory(k, shape)})
    return pd.DataFrame(rows)


def plot_power_gaps(gaps, trace: dict | None = None):
    """Left: ``1 − σ̂/σ`` against power iterations on fresh matrices; right: during training."""
    import matplotlib.pyplot as plt

    ncols = 2 if trace is not None else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 3.6), squeeze=False)
    ax = axes[0, 0]
    for shape, g in gaps.groupby("shape", sort=False):
        stats = g.assign(gap=1 - g["ratio"]).groupby("iterations")["gap"]
        med, lo, hi = stats.median(), stats.quantile(0.1), stats.quantile(0.9)
        line, = ax.loglog(med.index, np.maximum(med.values, 1e-17), marker="o", label=shape)
        ax.fill_between(med.index, np.maximum(lo.values, 1e-17), np.maximum(hi.values, 1e-17), alpha=0.2,
                        color=line.get_color())
        theory = g.groupby("iterations")["theory"].first()
        ax.loglog(theory.index, 1 - theory.values, ls="--", lw=0.8, color=line.get_color())
    ax.set(xlabel="power iterations from a random vector", ylabel="1 − σ̂/σ  (median, 10–90%)",
           title="fresh Gaussian matrices (dashed: Marchenko–Pastur limit)")
    ax.legend(fontsize=8)
    if trace is not None:
        bx = axes[0, 1]
        for name, excess in trace.items():
            bx.semilogy(np.arange(1, len(excess) + 1), np.maximum(excess, 1e-17), lw=0.8, label=name)
        bx.set(xlabel="training step", ylabel="‖W‖₂ − 1 of the weight used", title="spectral-normalized critic")
        bx.legend(fontsize=8)
    fig.tight_layout()
    return fig
