r"""Theory checks of chapter 07: the best loss a 1-Lipschitz classifier can reach, the limits of
τ-cross-entropy, the Wasserstein bound on mean certifiable robustness, and weight growth.

* :func:`optimal_1d_loss`: the exact minimum of :math:`\mathbb E\,\mathrm{BCE}(\tau g)` over
  1-Lipschitz :math:`g` for the 1-D mixtures of experiment B2 (a convex problem on a grid).
* :func:`tau_limits`: :math:`\mathrm{CE}(\tau f)/\tau` against its small- and large-τ limits.
* :func:`w1_balanced`: :math:`W_1` between the two classes of a point cloud (exact, by optimal
  transport), the ceiling of the mean certifiable robustness of 1-Lipschitz classifiers.
* :func:`logistic_two_points`: gradient descent on the logistic loss of two separable points,
  unconstrained (the weight grows like log t) against a 1-Lipschitz linear model.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as nnf

from ...losses import TauCrossEntropyLoss

__all__ = ["MIXTURES", "mixture_density", "bayes_1d_loss", "optimal_1d_loss", "tau_limits", "w1_balanced",
           "logistic_two_points"]

#: B2's classes (weight, mean, standard deviation): label 1 is P, label 0 is Q.
MIXTURES = {1: ((0.9, -2.0, 0.3), (0.1, 1.0, 0.1)), 0: ((0.9, 2.0, 0.3), (0.1, -1.0, 0.1))}


def mixture_density(x: np.ndarray, label: int) -> np.ndarray:
    """Density of class ``label`` of :data:`MIXTURES` at ``x``."""
    return sum(w * np.exp(-0.5 * ((x - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))
               for w, m, s in MIXTURES[label])


def _masses(lo: float, hi: float, n_grid: int):
    x = np.linspace(lo, hi, n_grid)
    p, q = mixture_density(x, 1), mixture_density(x, 0)
    return x, p / p.sum(), q / q.sum()


def bayes_1d_loss(lo: float = -4.0, hi: float = 4.0, n_grid: int = 801) -> float:
    r"""The conditional entropy :math:`H(Y \mid X)` of B2's balanced problem: the smallest BCE of
    *any* classifier, which the 1-Lipschitz optimum approaches as τ grows (τg may then be any
    τ-Lipschitz function)."""
    _, p, q = _masses(lo, hi, n_grid)
    m = 0.5 * (p + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(m > 0, 0.5 * p / m, 0.5)
        h = -(np.where(r > 0, r * np.log(r), 0) + np.where(r < 1, (1 - r) * np.log1p(-r), 0))
    return float(m @ h)


def optimal_1d_loss(tau: float, lo: float = -4.0, hi: float = 4.0, n_grid: int = 801) -> tuple[float, np.ndarray, np.ndarray]:
    r"""Minimum over 1-Lipschitz :math:`g` of :math:`\tfrac12\mathbb E_P\,\ell(\tau g) + \tfrac12\mathbb E_Q\,\ell(-\tau g)`,
    :math:`\ell(z) = \log(1 + e^{-z})` (class-balanced BCE on the logit :math:`\tau g`).

    The classes are discretized on a grid of spacing ``h`` (masses = density × h, renormalized);
    :math:`g_i = c + h\sum_{j<i} s_j` with slopes :math:`s_j \in [-1, 1]` is exactly the set of
    1-Lipschitz functions on the grid, and the objective is convex in ``(c, s)``: L-BFGS-B finds
    its minimum. Returns ``(loss, grid, g)``.
    """
    from scipy.optimize import minimize

    x, p, q = _masses(lo, hi, n_grid)
    h = x[1] - x[0]

    def objective(theta):
        g = theta[0] + h * np.concatenate([[0.0], np.cumsum(theta[1:])])
        z = tau * g
        loss = 0.5 * (p @ np.logaddexp(0, -z) + q @ np.logaddexp(0, z))
        dz = 0.5 * tau * (-p / (1 + np.exp(z)) + q / (1 + np.exp(-z)))  # d loss / d g_i
        tail = np.cumsum(dz[::-1])[::-1]  # sum over i >= k
        return loss, np.concatenate([[dz.sum()], h * tail[1:]])

    theta0 = np.concatenate([[0.0], np.zeros(n_grid - 1)])
    bounds = [(None, None)] + [(-1.0, 1.0)] * (n_grid - 1)
    # Tight tolerances and a long history: with L-BFGS-B's defaults (or ftol 1e-13) the value
    # moved by 1e-5 under a 1e-15 change of the start, enough to flip its fourth decimal.
    res = minimize(objective, theta0, jac=True, method="L-BFGS-B", bounds=bounds,
                   options={"maxiter": 50000, "maxcor": 50, "ftol": 1e-16, "gtol": 1e-14})
    g = res.x[0] + h * np.concatenate([[0.0], np.cumsum(res.x[1:])])
    return float(res.fun), x, g


def tau_limits(taus=(1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0), n: int = 64, seed: int = 0):
    r"""Distance of the binary τ-CE to its two limits, for random scores on a balanced batch.

    Small τ: :math:`\mathrm{CE}(\tau f)/\tau = \log 2/\tau - \tfrac12\mathbb E[y f] + O(\tau)`, and
    with balanced classes :math:`\mathbb E[yf] = \tfrac12\mathrm{KR}(f)`. Large τ: it tends to
    :math:`\mathbb E\,(-y f)_+`, the hinge with margin 0, within :math:`\log 2/\tau`.

    The next term of the small-τ expansion is :math:`\tau\,\mathbb E[f^2]/8` (from
    :math:`\log(1+e^{-z}) = \log 2 - z/2 + z^2/8 + O(z^4)`), returned as ``second_order``.

    Returns a DataFrame with columns tau, small_gap, second_order, large_gap.
    """
    import pandas as pd

    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(n, generator=gen, dtype=torch.float64)
    y = torch.arange(n) % 2
    s = 2.0 * y - 1
    kr = f[y == 1].mean() - f[y == 0].mean()
    rows = []
    for tau in taus:
        ce = TauCrossEntropyLoss(tau)(f, y)
        rows.append({"tau": tau,
                     "small_gap": float((ce - (math.log(2) / tau - kr / 4)).abs()),
                     "second_order": float(tau * f.pow(2).mean() / 8),
                     "large_gap": float((ce - nnf.relu(-s * f).mean()).abs())})
    return pd.DataFrame(rows)


def w1_balanced(x: torch.Tensor, y: torch.Tensor) -> float:
    r""":math:`W_1` (Euclidean cost) between the empirical measures of the classes 1 and 0.

    By Kantorovich–Rubinstein, :math:`\sup_{\mathrm{Lip}(f)\le 1} \mathbb E_1 f - \mathbb E_0 f = W_1`,
    so with balanced classes the mean signed certified radius :math:`\mathbb E[y f]` of any
    1-Lipschitz classifier is at most :math:`W_1/2`. Exact: POT's network simplex (``ot.emd2``).
    """
    import ot

    a, b = x[y == 1].double().numpy(), x[y == 0].double().numpy()
    cost = ot.dist(a, b, metric="euclidean")
    return float(ot.emd2(np.full(len(a), 1 / len(a)), np.full(len(b), 1 / len(b)), cost,
                         numItermax=10_000_000))


def logistic_two_points(steps: int = 10000, lr: float = 1.0):
    r"""Gradient descent on :math:`\log(1 + e^{-y(wx + b)})` for the two points :math:`x = \pm 1`, :math:`y = \pm 1`.

    Unconstrained, the loss tends to 0 and :math:`w_t` grows without bound (like :math:`\log t`);
    projected onto :math:`|w| \le 1` (a 1-Lipschitz model) it converges to :math:`w = 1, b = 0`
    and the loss to :math:`\log(1 + e^{-1})`, the exact minimum over 1-Lipschitz models.

    Returns a dict of numpy arrays: steps, norm_free, loss_free, norm_lip, loss_lip.
    """
    x = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    y = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    out = {"steps": np.arange(1, steps + 1)}
    for name, project in (("free", False), ("lip", True)):
        w = torch.zeros(2, dtype=torch.float64, requires_grad=True)  # (weight, bias)
        norms, losses = [], []
        for _ in range(steps):
            loss = nnf.softplus(-y * (w[0] * x + w[1])).mean()
            (grad,) = torch.autograd.grad(loss, w)
            with torch.no_grad():
                w -= lr * grad
                if project:
                    w[0].clamp_(-1.0, 1.0)
            norms.append(float(w.detach().norm()))
            losses.append(float(loss.detach()))
        out[f"norm_{name}"], out[f"loss_{name}"] = np.array(norms), np.array(losses)
    return out
