r"""Book glue of chapter 03 (norm constraints): Björck, spectral normalization, ℓ∞ projection.

Four parts, each a set of measurements and a figure:

* **Björck's iteration, one singular value at a time.** With :math:`W = U\Sigma V^\top`,
  an order-``p`` step :math:`W \leftarrow W \sum_{k \le p} c_k (I - W^\top W)^k` is
  :math:`U g_p(\Sigma) V^\top` with the scalar map

  .. math:: g_p(s) = s \sum_{k=0}^{p} c_k (1 - s^2)^k, \qquad c_k = \binom{2k}{k} 4^{-k},

  the order-``p`` Taylor polynomial of :math:`s \cdot (s^2)^{-1/2} = 1`. Everything about
  convergence (regions, iteration counts, monotonicity) is a property of :math:`g_p`
  (:func:`bjorck_map`, :func:`convergence_regions`, :func:`iterations_to_tol`), checked on
  matrices by :func:`bjorck_traces` and :func:`matrix_follows_scalar_map`.
* **Power iteration** under-estimates the spectral norm (:func:`power_iteration_gaps`).
* **ℓ1-ball projection** of rows, the ℓ∞ constraint (:func:`projection_checks`,
  :func:`projection_sparsity`).
* **Expressivity**: the same Wasserstein critic under each constraint
  (:func:`train_constrained_critic`), on the origin against the unit circle.

Example:
    >>> float(bjorck_map(0.5, 1))  # 1.5·0.5 − 0.5·0.5³
    0.6875
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from .. import functional as F

__all__ = [
    "taylor_coefficients",
    "bjorck_map",
    "scalar_orbit",
    "iterations_to_tol",
    "region_edges_exact",
    "convergence_regions",
    "fates",
    "plot_scalar_maps",
    "matrix_follows_scalar_map",
    "sign_flip_example",
    "flops_per_iteration",
    "bjorck_traces",
    "trace_summary",
    "plot_bjorck_convergence",
    "marchenko_pastur_moment",
    "power_iteration_theory",
    "power_iteration_gaps",
    "plot_power_gaps",
    "project_rows_l1_bisection",
    "projection_checks",
    "linf_sparsity_theory",
    "projection_sparsity",
    "plot_projection",
    "circle_points",
    "linf_w1_circle",
    "CriticResult",
    "train_constrained_critic",
    "critics_table",
    "plot_critics",
]

F64 = torch.float64

# --------------------------------------------------------------------------- scalar theory


def taylor_coefficients(order: int) -> tuple[float, ...]:
    r"""Coefficients :math:`c_0..c_p` of :math:`(1 - q)^{-1/2} = \sum_k \binom{2k}{k} 4^{-k} q^k`.

    Example:
        >>> taylor_coefficients(3)
        (1.0, 0.5, 0.375, 0.3125)
    """
    if isinstance(order, bool) or not isinstance(order, int) or order < 0:
        raise ValueError(f"order must be a non-negative integer, got {order!r}")
    return tuple(math.comb(2 * k, k) / 4**k for k in range(order + 1))


def bjorck_map(s, order: int) -> np.ndarray:
    r"""The action :math:`g_p(s) = s \sum_{k \le p} c_k (1 - s^2)^k` of one Björck step on a singular value.

    ``s`` may be any real array (negative values describe a sign flip of a singular pair).

    Example:
        >>> bjorck_map(np.array([0.1, 1.0, 2.0]), 1).round(4).tolist()
        [0.1495, 1.0, -1.0]
    """
    s = np.asarray(s, dtype=np.float64)
    q = 1.0 - s * s
    poly = np.zeros_like(s)
    for c in reversed(taylor_coefficients(order)):
        poly = c + q * poly
    return np.asarray(s * poly)


def scalar_orbit(s0, order: int, n_iters: int) -> np.ndarray:
    r"""The iterates :math:`g_p^k(s_0)`, ``k = 0..n_iters``, shape ``(n_iters + 1, *s0.shape)``.

    Values whose magnitude exceeds 1e8 are set to ``inf`` (and stay there): the orbit diverges.

    Example:
        >>> scalar_orbit(0.5, 1, 3).round(6).tolist()
        [0.5, 0.6875, 0.868774, 0.9753]
    """
    x = np.asarray(s0, dtype=np.float64).copy()
    out = [x.copy()]
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(n_iters):
            x = bjorck_map(np.clip(x, -1e8, 1e8), order)
            x[~(np.abs(x) <= 1e8)] = np.inf
            out.append(x.copy())
    return np.stack(out)


def iterations_to_tol(s0, order: int, tol: float = 1e-4, max_iters: int = 1000) -> np.ndarray:
    r"""Number of steps until :math:`|g_p^k(s_0) - 1| \le` ``tol``, for ``s0`` in (0, 1].

    For a pre-scaled matrix every singular value lies in (0, 1] and :math:`g_p` is increasing
    there, so the smallest singular value is the last to arrive: the matrix needs
    ``iterations_to_tol(s_min)`` steps.

    Example:
        >>> iterations_to_tol([0.5, 1e-3], 1).tolist()
        [5, 20]
    """
    s = np.atleast_1d(np.asarray(s0, dtype=np.float64)).copy()
    if np.any(s <= 0) or np.any(s > 1):
        raise ValueError("iterations_to_tol expects starting values in (0, 1] (a pre-scaled matrix)")
    k = np.zeros(s.shape, dtype=np.int64)
    done = np.abs(s - 1) <= tol
    for i in range(1, max_iters + 1):
        s = bjorck_map(s, order)
        newly = ~done & (np.abs(s - 1) <= tol)
        k[newly] = i
        done |= newly
        if done.all():
            return k
    raise RuntimeError(f"some values did not reach tolerance {tol} in {max_iters} iterations")


def _poly_roots_in_s(coeffs_in_q: Sequence[float]) -> list[float]:
    """Real roots ``s > 1`` of ``sum_k a_k q^k = 0`` with ``q = 1 − s²``, sorted."""
    roots = np.roots(list(coeffs_in_q)[::-1])
    qs = sorted(float(r.real) for r in roots if abs(r.imag) < 1e-12 and r.real < 0)
    return sorted(math.sqrt(1 - q) for q in qs)


def region_edges_exact(order: int) -> dict[str, float]:
    r"""Closed-form edges of the convergence region of :math:`g_p` (roots of polynomials in :math:`q = 1 - s^2`).

    * ``basin``: the end of the interval :math:`(0, b_p)` whose every point converges to
      :math:`+1`. For odd ``p`` it is the first zero of :math:`g_p` above 1 (root of
      :math:`P_p(q) = 0`); for even ``p``, :math:`P_p > 0` and the first fixed point above 1
      (root of :math:`P_p(q) = 1`).
    * ``bounded``: beyond it every orbit diverges. For even ``p`` it is the same fixed point;
      for odd ``p`` the 2-cycle :math:`g_p(s) = -s` (root of :math:`P_p(q) = -1`).

    The characterization (which roots are the edges) is the claim that
    :func:`convergence_regions` checks numerically.

    Example:
        >>> {k: round(v, 6) for k, v in region_edges_exact(1).items()}  # √3, √5
        {'basin': 1.732051, 'bounded': 2.236068}
    """
    c = list(taylor_coefficients(order))
    if order % 2 == 1:
        basin = _poly_roots_in_s(c)[0]
        bounded = _poly_roots_in_s([c[0] + 1.0] + c[1:])[0]
    else:
        basin = bounded = _poly_roots_in_s([0.0] + c[1:])[0]
    return {"basin": basin, "bounded": bounded}


def _final_values(s, order: int, n_iters: int) -> np.ndarray:
    """:math:`g_p^{n}(s)` without storing the orbit; ``inf`` once an orbit leaves [−1e8, 1e8]."""
    x = np.asarray(s, dtype=np.float64).copy()
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(n_iters):
            x = bjorck_map(np.clip(x, -1e8, 1e8), order)
            x[~(np.abs(x) <= 1e8)] = np.inf
    return x


def fates(s, order: int, n_iters: int = 400, tol: float = 1e-9) -> np.ndarray:
    """Where each starting value goes: +1 (to +1), −1 (to −1), 2 (diverges), 0 (none of these).

    Example:
        >>> fates([0.5, 1.9, 2.5], 1).tolist()
        [1, -1, 2]
    """
    final = _final_values(s, order, n_iters)
    out = np.zeros(final.shape, dtype=np.int64)
    out[np.abs(final - 1) <= tol] = 1
    out[np.abs(final + 1) <= tol] = -1
    out[~np.isfinite(final)] = 2
    return out


def _first_change(pred, lo: float, hi: float, n_points: int = 1001, n_rounds: int = 6) -> float:
    """Locate where the vectorized ``pred`` switches from True (at lo) to False (at hi).

    Each round evaluates ``n_points`` points of the bracket and keeps the cell of the first
    False value, so the bracket shrinks by ``n_points − 1`` per round.
    """
    for _ in range(n_rounds):
        x = np.linspace(lo, hi, n_points)
        ok = pred(x)
        i = int(np.argmax(~ok)) if (~ok).any() else n_points - 1
        lo, hi = x[max(i - 1, 0)], x[i]
        if hi - lo <= 4 * np.finfo(np.float64).eps * hi:
            break
    return 0.5 * (lo + hi)


def convergence_regions(
    orders: Sequence[int] = (1, 2, 3, 4), s_max: float = 3.0, n_grid: int = 30001, n_iters: int = 400
):
    r"""Measure, for each order, where the scalar iteration converges, on a grid of (0, s_max].

    Columns: ``basin`` (largest :math:`b` with every grid point of :math:`(0, b)` converging
    to +1, refined by bisection), ``bounded`` (beyond it every grid point diverges, refined by
    bisection), the fractions of the grid points of (basin, bounded) that go to +1 and to −1,
    the closed forms of :func:`region_edges_exact` and the deviation between both.

    Example:
        >>> df = convergence_regions([1], n_grid=301, n_iters=200)
        >>> round(float(df.loc[1, "basin"]), 6)
        1.732051
    """
    import pandas as pd

    s = np.linspace(s_max / n_grid, s_max, n_grid)
    rows = {}
    for p in orders:
        fate = fates(s, p, n_iters)
        if fate[0] != 1:
            raise RuntimeError(f"order {p}: the smallest grid value does not converge to +1")
        i_basin = int(np.argmax(fate != 1)) if (fate != 1).any() else len(s) - 1
        lo, hi = s[i_basin - 1], s[i_basin]
        basin = _first_change(lambda x: fates(x, p, n_iters) == 1, lo, hi)
        bounded_idx = np.flatnonzero(fate != 2)
        j = int(bounded_idx[-1])
        if j == len(s) - 1:
            raise RuntimeError(f"order {p}: orbits stay bounded up to s_max={s_max}; raise s_max")
        bounded = _first_change(lambda x: fates(x, p, n_iters) != 2, s[j], s[j + 1])
        middle = (s > basin) & (s < bounded)
        exact = region_edges_exact(p)
        rows[p] = {
            "basin": basin,
            "basin (closed form)": exact["basin"],
            "bounded": bounded,
            "bounded (closed form)": exact["bounded"],
            "to +1 in between": float((fate[middle] == 1).mean()) if middle.any() else float("nan"),
            "to −1 in between": float((fate[middle] == -1).mean()) if middle.any() else float("nan"),
            "max |numeric − closed form|": max(abs(basin - exact["basin"]), abs(bounded - exact["bounded"])),
        }
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "order"
    return df


def plot_scalar_maps(orders: Sequence[int] = (1, 2, 3, 4), s_max: float = 2.5, n_grid: int = 2001):
    r"""Left: :math:`g_p(s)` with the identity and :math:`\pm 1`; right: the fate of each start value."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    s = np.linspace(1e-4, s_max, n_grid)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1.2, 1]})
    for p in orders:
        ax.plot(s, bjorck_map(s, p), label=f"order {p}")
    ax.plot(s, s, color="grey", lw=0.8, ls=":", label="identity")
    for y in (1, -1):
        ax.axhline(y, color="grey", lw=0.6)
    ax.axvline(math.sqrt(2), color="k", lw=0.8, ls="--", label="√2 (paper's region)")
    ax.set(xlabel="singular value s before a step", ylabel="after one step, $g_p(s)$", ylim=(-2.5, 2.5))
    ax.legend(fontsize=8, loc="lower left")
    cmap = ListedColormap(["#c0392b", "#dddddd", "#2e86c1", "#333333"])  # −1, none, +1, diverges
    img = np.stack([fates(s, p) for p in orders])
    bx.imshow(img + 1, aspect="auto", cmap=cmap, vmin=0, vmax=3, extent=(0, s_max, len(orders) + 0.5, 0.5),
              interpolation="nearest")
    bx.axvline(math.sqrt(2), color="k", lw=0.8, ls="--")
    bx.set(xlabel="starting singular value s", ylabel="order", yticks=list(range(1, len(orders) + 1)),
           yticklabels=[str(p) for p in orders], title="limit: blue +1, red −1, black diverges")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- Björck on matrices


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
    from tqdm.auto import tqdm

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


# --------------------------------------------------------------------------- power iteration


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


# --------------------------------------------------------------------------- ℓ1-ball projection


def project_rows_l1_bisection(w: Tensor, radius: float = 1.0, n_bisect: int = 200) -> Tensor:
    r"""Reference projection onto the ℓ1 ball by bisection on the soft threshold θ.

    The projection of a row outside the ball is :math:`\operatorname{sign}(w)(|w| - \theta)_+`
    with :math:`\sum_j (|w_j| - \theta)_+ = r`, a decreasing function of θ on
    :math:`[0, \max_j |w_j|]`: bisection finds θ to machine precision, independently of the
    sorting algorithm of :func:`lipsort.functional.project_rows_l1`.

    Example:
        >>> project_rows_l1_bisection(torch.tensor([[3., -1., 0.5]], dtype=torch.float64))
        tensor([[1., -0., 0.]], dtype=torch.float64)
    """
    a = w.abs()
    lo = torch.zeros(w.shape[:-1] + (1,), dtype=w.dtype)
    hi = a.amax(-1, keepdim=True)
    for _ in range(n_bisect):
        mid = 0.5 * (lo + hi)
        over = (a - mid).clamp_min(0).sum(-1, keepdim=True) > radius
        lo = torch.where(over, mid, lo)
        hi = torch.where(over, hi, mid)
    v = torch.sign(w) * (a - 0.5 * (lo + hi)).clamp_min(0)
    return torch.where(a.sum(-1, keepdim=True) <= radius, w, v)


def projection_checks(m: int = 256, n: int = 256, radius: float = 1.0, seed: int = 0) -> dict[str, float]:
    r"""Properties of :func:`lipsort.functional.project_rows_l1` on rows of mixed ℓ1 norms.

    The rows of a Gaussian float64 matrix are scaled so that their ℓ1 norms are spread
    log-uniformly over :math:`[r/10, 10r]` (half inside the ball). Returns the largest row ℓ1
    norm after projection, the largest change of a row that was inside, the largest change
    when projecting twice, the largest deviation from the bisection reference, and the largest
    violation of the optimality condition (a projected row outside the ball satisfies
    :math:`|w_j - v_j| = \theta` on its support and :math:`|w_j| \le \theta` off it).

    Example:
        >>> c = projection_checks(16, 8)
        >>> c["max_row_l1"] <= 1, c["inside_change"], c["idempotence"]
        (True, 0.0, 0.0)
    """
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=gen, dtype=F64)
    target = radius * 10 ** (2 * torch.rand(m, 1, generator=gen, dtype=F64) - 1)
    w = w * target / w.abs().sum(-1, keepdim=True)
    v = F.project_rows_l1(w, radius)
    inside = w.abs().sum(-1) <= radius
    outside = ~inside
    theta = (w - v).abs().amax(-1)  # on the support |w − v| = θ; off it, |w| ≤ θ
    support = v != 0
    kkt_support = ((w - v).abs() - theta[:, None]).abs().masked_fill(~support, 0).amax(-1)
    kkt_off = (w.abs() - theta[:, None]).clamp_min(0).masked_fill(support, 0).amax(-1)
    return {
        "max_row_l1": float(v.abs().sum(-1).max()),
        "fraction_inside": float(inside.to(F64).mean()),
        "inside_change": float((v - w)[inside].abs().max()) if inside.any() else 0.0,
        "outside_on_sphere": float((v[outside].abs().sum(-1) - radius).abs().max()),
        "idempotence": float((F.project_rows_l1(v, radius) - v).abs().max()),
        "vs_bisection": float((v - project_rows_l1_bisection(w, radius)).abs().max()),
        "kkt_violation": float(torch.maximum(kkt_support, kkt_off)[outside].max()),
    }


def linf_sparsity_theory(fan_in) -> np.ndarray:
    r"""Predicted fraction of entries zeroed by projecting ``nn.Linear``'s initial rows onto the unit ℓ1 ball.

    The entries are :math:`\mathcal U(-a, a)` with :math:`a = 1/\sqrt{n}`, so :math:`|w|` is
    uniform on :math:`[0, a]`. For large :math:`n` the threshold solves
    :math:`n\,\mathbb E(|w| - \theta)_+ = n (a - \theta)^2 / (2a) = 1`, and the fraction of
    surviving entries is :math:`(a - \theta)/a = \sqrt{2/(na)} = \sqrt2\, n^{-1/4}`: the
    projection zeroes :math:`1 - \sqrt2\, n^{-1/4}` of the weights (valid while every row is
    outside the ball, :math:`\sqrt n / 2 > 1`).

    Example:
        >>> float(linf_sparsity_theory(1024))
        0.75
    """
    n = np.asarray(fan_in, dtype=np.float64)
    return 1 - math.sqrt(2) * n**-0.25


def projection_sparsity(fan_ins: Sequence[int] = (16, 64, 256, 1024, 4096), out_features: int = 256, seed: int = 0):
    """Fraction of zero entries after projecting a freshly initialized ``nn.Linear`` weight.

    Example:
        >>> df = projection_sparsity([1024], out_features=64)
        >>> abs(float(df.loc[1024, "measured"]) - 0.75) < 0.01
        True
    """
    import pandas as pd

    rows = {}
    torch.manual_seed(seed)
    for n in fan_ins:
        w = nn.Linear(n, out_features).weight.detach().to(F64)
        v = F.project_rows_l1(w)
        rows[n] = {
            "row ℓ1 before (mean)": float(w.abs().sum(-1).mean()),
            "measured": float((v == 0).to(F64).mean()),
            "theory 1 − √2·n^(−1/4)": float(linf_sparsity_theory(n)),
        }
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "fan-in n"
    return df


def plot_projection(sparsity, n: int = 64, seed: int = 0):
    """Left: one initialized row before and after projection; right: sparsity against fan-in."""
    import matplotlib.pyplot as plt

    torch.manual_seed(seed)
    w = nn.Linear(n, 1).weight.detach().to(F64)[0]
    v = F.project_rows_l1(w[None])[0]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.6))
    idx = np.arange(n)
    ax.bar(idx - 0.2, w.numpy(), width=0.4, label=f"initial row, ‖·‖₁ = {float(w.abs().sum()):.2f}")
    ax.bar(idx + 0.2, v.numpy(), width=0.4, label="projected, ‖·‖₁ = 1")
    ax.set(xlabel="entry", ylabel="weight", title=f"one row of nn.Linear({n}, ·)")
    ax.legend(fontsize=8)
    ns = np.array(sparsity.index, dtype=float)
    fine = np.geomspace(ns.min(), ns.max(), 200)
    bx.semilogx(fine, linf_sparsity_theory(fine), color="k", lw=1, label="1 − √2·n^(−1/4)")
    bx.semilogx(ns, sparsity["measured"], "o", label="measured")
    bx.set(xlabel="fan-in n", ylabel="fraction of zeroed weights", title="sparsity of the projection at init")
    bx.legend(fontsize=8)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- expressivity


def circle_points(n: int, dtype=F64) -> Tensor:
    """``n`` equispaced points of the unit circle, shape ``(n, 2)`` (an exact quadrature of
    the uniform distribution for trigonometric polynomials of degree < n).

    Example:
        >>> circle_points(4).round().tolist()
        [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [-0.0, -1.0]]
    """
    t = 2 * math.pi * torch.arange(n, dtype=F64) / n
    return torch.stack([t.cos(), t.sin()], 1).to(dtype)


def linf_w1_circle(n: int | None = None) -> float:
    r"""Wasserstein-1 distance between the uniform unit circle and its center in the ℓ∞ metric.

    Every point must travel to the center, so :math:`W_1^{\infty} = \mathbb E\|x\|_\infty =
    \frac{4}{\pi}\int_0^{\pi/4}\cos\theta\,d\theta = 2\sqrt2/\pi \approx 0.9003` (with ``n``:
    the same average over ``n`` equispaced points). A critic that is 1-Lipschitz in ℓ∞ cannot
    exceed it.

    Example:
        >>> round(linf_w1_circle(), 6), round(linf_w1_circle(4096), 6)
        (0.900316, 0.900316)
    """
    if n is None:
        return 2 * math.sqrt(2) / math.pi
    return float(circle_points(n).abs().amax(1).mean())


@dataclass
class CriticResult:
    """A trained critic of the circle problem and its measurements (see :func:`train_constrained_critic`)."""

    label: str
    constraint: str
    activation: str
    critic: nn.Module
    estimate: float
    lipschitz_l2: float
    lipschitz_linf: float
    history: object
    weight_trace: dict = field(default_factory=dict)
    grad_norm_mean: float = float("nan")

    @property
    def certified(self) -> float:
        r"""A guaranteed lower bound of :math:`W_1` (ℓ2): the estimate over the smallest rigorous ℓ2 constant.

        For a scalar critic, :math:`|f(x) - f(y)| \le L_\infty \|x - y\|_\infty \le L_\infty
        \|x - y\|_2`, so :math:`\min(L_2, L_\infty)` bounds its ℓ2 constant.
        """
        return self.estimate / max(min(self.lipschitz_l2, self.lipschitz_linf), 1.0)


class _WeightTrace:
    """Forward hook on a parametrization: a norm of every training-mode weight it returns.

    Weights are buffered and measured by one batched SVD per ``chunk`` steps (a small LAPACK
    call per step would dominate the run time): ``‖W‖₂ − 1`` for ``kind="spectral"``,
    ``max |σ − 1|`` for ``kind="bjorck"``.
    """

    def __init__(self, kind: str, chunk: int = 256):
        self.kind, self.chunk = kind, chunk
        self.pending: list[Tensor] = []
        self.values: list[np.ndarray] = []

    def __call__(self, module, inputs, output):
        if module.training:
            self.pending.append(output.detach().to(F64).clone())
            if len(self.pending) >= self.chunk:
                self.flush()

    def flush(self) -> np.ndarray:
        if self.pending:
            s = torch.linalg.svdvals(torch.stack(self.pending)).cpu()
            v = s[:, 0] - 1 if self.kind == "spectral" else (s - 1).abs().amax(dim=1)
            self.values.append(v.numpy())
            self.pending = []
        return np.concatenate(self.values) if self.values else np.zeros(0)


def train_constrained_critic(
    constraint: str | None,
    activation: str,
    widths: Sequence[int] = (64, 64, 64),
    steps: int = 1000,
    batch_size: int = 256,
    lr: float = 0.01,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    n_eval: int = 4096,
    seed: int = 0,
    dtype=F64,
    device="cpu",
    progress: bool = True,
) -> CriticResult:
    r"""Train a critic ``2 → widths → 1`` for :math:`W_1(\mathrm{Unif}(S^1), \delta_0) = 1`.

    The problem is :func:`lipsort.distributions.high_dim_cone` in 2-D and training is
    :func:`lipsort.wasserstein.train_critic` (AggMo). The estimate
    :math:`\mathbb E_{S^1} f - f(0)` is evaluated on ``n_eval`` equispaced points of the
    circle. While training, the *weights actually used* by each constrained layer are traced
    through forward hooks on the parametrizations: ``‖W‖₂ − 1`` for spectral normalization
    and ``max |σ − 1|`` for Björck, exact (SVD), one value per step; ``weight_trace`` holds the
    worst layer under the constraint's name and all layers under ``"per_layer"``
    (layers × steps). The mean input gradient norm is measured on the points of a 64 × 64
    grid inside the unit disc. ``device`` holds the critic and the evaluation points (the
    training batches are drawn on the CPU, then moved).

    Example:
        >>> r = train_constrained_critic("bjorck", "maxmin", widths=(8,), steps=3, progress=False)
        >>> r.lipschitz_l2 <= 1 + 1e-4, len(r.weight_trace["bjorck"])
        (True, 3)
    """
    from torch.nn.utils import parametrize

    from ..certify import lipschitz_upper_bound
    from ..distributions import high_dim_cone
    from ..models import mlp
    from ..wasserstein import dual_estimate, gradient_norms, train_critic

    torch.manual_seed(seed)
    critic = mlp([2, *widths, 1], activation=activation, constraint=constraint).to(dtype=dtype, device=device)
    traces: dict[str, np.ndarray] = {}
    per_layer: list[_WeightTrace] = []
    handles = []
    if constraint in ("spectral", "bjorck"):
        for m in critic.modules():
            if parametrize.is_parametrized(m, "weight"):
                per_layer.append(_WeightTrace(constraint))
                handles.append(m.parametrizations.weight[0].register_forward_hook(per_layer[-1]))
    problem = high_dim_cone(2)
    x_eval = circle_points(n_eval, dtype).to(device)
    origin = torch.zeros(1, 2, dtype=dtype, device=device)

    def evaluate(f: nn.Module) -> float:
        with torch.no_grad():
            return float(dual_estimate(f, x_eval, origin))

    history = train_critic(
        critic, problem, steps=steps, batch_size=batch_size, lr=lr, milestones=tuple(milestones), gamma=gamma,
        evaluate=evaluate, eval_every=max(1, steps // 20), seed=seed, progress=progress,
        desc=f"{constraint} / {activation}",
    )
    for h in handles:
        h.remove()
    if per_layer:
        layers = np.stack([t.flush() for t in per_layer])
        traces[constraint] = layers.max(axis=0)
        traces["per_layer"] = layers
    critic.eval()
    with torch.no_grad():
        estimate = float(dual_estimate(critic, x_eval, origin))
    g = torch.linspace(-1, 1, 64, dtype=dtype, device=device)
    grid = torch.cartesian_prod(g, g)
    grid = grid[grid.norm(dim=1) <= 1]
    label = f"{constraint or 'none'} + {activation}"
    return CriticResult(
        label=label, constraint=str(constraint), activation=activation, critic=critic, estimate=estimate,
        lipschitz_l2=float(lipschitz_upper_bound(critic, "l2")), lipschitz_linf=float(lipschitz_upper_bound(critic, "linf")),
        history=history, weight_trace=traces, grad_norm_mean=float(gradient_norms(critic, grid).mean()),
    )


def critics_table(results: Sequence[CriticResult]):
    """One row per critic: estimate, exact ℓ2 and ℓ∞ product bounds, certified estimate, mean gradient norm."""
    import pandas as pd

    rows = {
        r.label: {
            "estimate": r.estimate,
            "L (ℓ2 product)": r.lipschitz_l2,
            "L (ℓ∞ product)": r.lipschitz_linf,
            "certified W1 lower bound": r.certified,
            "mean ‖∇f‖ on the disc": r.grad_norm_mean,
        }
        for r in results
    }
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "critic"
    return df


def plot_critics(results: Sequence[CriticResult], resolution: int = 101):
    """Each critic ``f(x) − f(0)`` on [−1.5, 1.5]², then the estimates during training."""
    import matplotlib.pyplot as plt

    n = len(results)
    fig, axes = plt.subplots(1, n + 1, figsize=(3.3 * (n + 1), 3.4), layout="constrained")
    g = torch.linspace(-1.5, 1.5, resolution, dtype=F64)
    xx, yy = torch.meshgrid(g, g, indexing="xy")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    t = torch.linspace(0, 2 * math.pi, 200)
    for ax, r in zip(axes, results):
        p = next(r.critic.parameters())
        with torch.no_grad():
            z = r.critic(pts.to(dtype=p.dtype, device=p.device)).reshape(resolution, resolution).double().cpu()
            z = z - r.critic(torch.zeros(1, 2, dtype=p.dtype, device=p.device)).double().cpu()
        cs = ax.contourf(xx.numpy(), yy.numpy(), z.numpy(), levels=np.linspace(-0.25, 1.5, 15), extend="both",
                         cmap="viridis")
        ax.plot(t.cos(), t.sin(), color="w", lw=0.8)
        ax.set(title=f"{r.label}\nestimate {r.estimate:.3f}", xticks=[], yticks=[], aspect="equal")
    fig.colorbar(cs, ax=list(axes[:n]), fraction=0.02, pad=0.01, label="f(x) − f(0)")
    ax = axes[-1]
    for r in results:
        ax.plot(r.history.eval_steps, r.history.eval, label=r.label)
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="W1 = 1")
    ax.axhline(linf_w1_circle(), color="grey", lw=0.8, ls=":", label="2√2/π (ℓ∞)")
    ax.set(xlabel="step", ylabel="estimate", ylim=(0.5, 1.05), title="training")
    ax.legend(fontsize=6, loc="lower right")
    return fig
