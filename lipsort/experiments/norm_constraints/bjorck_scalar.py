r"""Björck's iteration one singular value at a time: the scalar map :math:`g_p`, its convergence regions and iteration counts."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..._checks import check_int

F64 = torch.float64


def taylor_coefficients(order: int) -> tuple[float, ...]:
    r"""Coefficients :math:`c_0..c_p` of :math:`(1 - q)^{-1/2} = \sum_k \binom{2k}{k} 4^{-k} q^k`.

    Example:
        >>> taylor_coefficients(3)
        (1.0, 0.5, 0.375, 0.3125)
    """
    order = check_int(order, "order", 0)
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
