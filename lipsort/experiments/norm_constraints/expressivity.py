r"""Expressivity under each constraint: the same Wasserstein critic on the unit circle against its center."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ...wasserstein import CriticResult, dual_estimate, fit_critic, high_dim_cone

F64 = torch.float64


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
    r"""Fit a critic ``2 → widths → 1`` for :math:`W_1(\mathrm{Unif}(S^1), \delta_0) = 1`.

    :func:`lipsort.wasserstein.fit_critic` on :func:`lipsort.wasserstein.high_dim_cone` in 2-D
    (AggMo), with the estimate :math:`\mathbb E_{S^1} f - f(0)` evaluated on ``n_eval``
    equispaced points of the circle, the exact norms of the weights used at every step traced
    (``weight_trace``), and input-gradient norms on the points of a 64 × 64 grid inside the
    unit disc.

    Example:
        >>> r = train_constrained_critic("bjorck", "maxmin", widths=(8,), steps=3, progress=False)
        >>> r.lipschitz_l2 <= 1 + 1e-4, len(r.weight_trace["bjorck"])
        (True, 3)
    """
    x_eval = circle_points(n_eval, dtype).to(device)
    origin = torch.zeros(1, 2, dtype=dtype, device=device)

    def evaluate(f: nn.Module) -> float:
        with torch.no_grad():
            return float(dual_estimate(f, x_eval, origin))

    g = torch.linspace(-1, 1, 64, dtype=dtype)
    grid = torch.cartesian_prod(g, g)
    return fit_critic(
        high_dim_cone(2), widths, activation, constraint, steps=steps, batch_size=batch_size, lr=lr,
        milestones=milestones, gamma=gamma, evaluate=evaluate, eval_every=max(1, steps // 20),
        grad_points=grid[grid.norm(dim=1) <= 1], trace_weights=True, seed=seed, dtype=dtype, device=device,
        progress=progress, label=f"{constraint or 'none'} + {activation}",
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
            "mean ‖∇f‖ on the disc": r.grad_stats["mean"],
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
