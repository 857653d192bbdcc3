r"""The ℓ∞ constraint: row projection onto the ℓ1 ball, checked against bisection, and the sparsity it creates."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ... import functional as F

F64 = torch.float64


def project_rows_l1_bisection(w: Tensor, radius: float = 1.0, n_bisect: int = 200) -> Tensor:
    r"""Reference projection onto the ℓ1 ball by bisection on the soft threshold θ.

    The projection of a row outside the ball is :math:`\operatorname{sign}(w)(|w| - \theta)_+`
    with :math:`\sum_j (|w_j| - \theta)_+ = r`, a decreasing function of θ on
    :math:`[0, \max_j |w_j|]`: bisection finds θ to machine precision, independently of the
    Newton (Michelot) iteration of :func:`lipsort.functional.project_rows_l1`.

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
