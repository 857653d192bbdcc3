r"""Kantorovich–Rubinstein estimates of :math:`W_1` and the input-gradient norms of a critic.

.. math::
    W_1(P, Q) = \sup_{\mathrm{Lip}(f) \le 1} \mathbb E_{x \sim P} f(x) - \mathbb E_{x \sim Q} f(x).

* :func:`dual_estimate`: :math:`\mathbb E_P f - \mathbb E_Q f` from samples or from weighted
  atoms (exact for discrete distributions); :func:`exact_dual_estimate` on a problem's atoms.
* :func:`gradient_norms` and :func:`gradient_norm_stats`: input-gradient norms
  :math:`\|\nabla_x f(x)\|_2` of a scalar critic, the quantity that an optimal critic keeps
  at 1 on the transport paths.
* :func:`exact_w1`: the exact optimal-transport value of two discrete measures (POT), and
  :func:`heldout_estimate`: a held-out, certified estimate with a confidence interval.

Example:
    >>> import torch
    >>> from lipsort.wasserstein import absolute_value
    >>> pb = absolute_value()
    >>> float(dual_estimate(pb.critic, *pb.sample(64, torch.Generator().manual_seed(0))))
    1.0
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "dual_estimate",
    "exact_dual_estimate",
    "gradient_norms",
    "gradient_norm_stats",
    "exact_w1",
    "HeldoutEstimate",
    "heldout_estimate",
]


def _critic_values(critic: Callable[[Tensor], Tensor], x: Tensor, name: str) -> Tensor:
    out = critic(x)
    if not isinstance(out, Tensor):
        raise TypeError(f"the critic must return a tensor, got {type(out).__name__} for {name}")
    if out.shape == (x.shape[0], 1):
        out = out[:, 0]
    if out.shape != (x.shape[0],):
        raise ValueError(
            f"the critic must return one score per sample, shape ({x.shape[0]},) or ({x.shape[0]}, 1), "
            f"got {tuple(out.shape)} for {name} of shape {tuple(x.shape)}"
        )
    return out


def _check_samples(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch of shape (N, ...) with N >= 1, got {tuple(x.shape)}")


def _check_weights(w: Tensor | None, n: int, name: str) -> Tensor | None:
    if w is None:
        return None
    if not isinstance(w, Tensor) or w.shape != (n,):
        shape = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
        raise ValueError(f"{name} must be a tensor of shape ({n},), got {shape}")
    if bool((w < 0).any()) or not math.isclose(float(w.sum()), 1.0, rel_tol=0, abs_tol=1e-6):
        raise ValueError(f"{name} must be non-negative and sum to 1, got sum {float(w.sum()):.6g}")
    return w


def dual_estimate(
    critic: Callable[[Tensor], Tensor],
    x_p: Tensor,
    x_q: Tensor,
    weights_p: Tensor | None = None,
    weights_q: Tensor | None = None,
) -> Tensor:
    r"""The Kantorovich–Rubinstein objective :math:`\mathbb E_P f - \mathbb E_Q f`.

    With samples, the expectations are means; with ``weights_p``/``weights_q`` (probability
    vectors over the rows of ``x_p``/``x_q``) they are weighted sums, which is exact when the
    rows are the atoms of discrete distributions. For a critic with
    :math:`\mathrm{Lip}(f) \le 1` the population value is a lower bound of :math:`W_1(P, Q)`.
    Differentiable (it is the negated training loss). Both batches go through the critic in a
    single call, so the critic must treat samples independently (no batch statistics).

    Args:
        critic: a callable (e.g. an ``nn.Module``) mapping ``(N, ...)`` to ``(N,)`` or ``(N, 1)``.
        x_p, x_q: batches of points of ``P`` and ``Q`` with the same trailing shape.
        weights_p, weights_q: optional probability vectors over the rows.

    Returns:
        A 0-dim tensor.

    Example:
        >>> f = lambda x: x.abs().sum(1)
        >>> x_p, w_p = torch.tensor([[-1.0], [1.0]]), torch.tensor([0.25, 0.75])
        >>> float(dual_estimate(f, x_p, torch.zeros(1, 1), w_p))
        1.0
    """
    _check_samples(x_p, "x_p")
    _check_samples(x_q, "x_q")
    if x_p.shape[1:] != x_q.shape[1:]:
        raise ValueError(
            f"x_p and x_q must hold points of the same shape, got {tuple(x_p.shape[1:])} and {tuple(x_q.shape[1:])}"
        )
    wp = _check_weights(weights_p, x_p.shape[0], "weights_p")
    wq = _check_weights(weights_q, x_q.shape[0], "weights_q")
    if x_p.dtype == x_q.dtype and x_p.device == x_q.device:
        # One forward pass for both batches: a parametrized weight (e.g. Björck's iteration)
        # is then computed once per estimate instead of twice.
        both = _critic_values(critic, torch.cat([x_p, x_q]), "the points of x_p and x_q")
        fp, fq = both[: x_p.shape[0]], both[x_p.shape[0] :]
    else:
        fp = _critic_values(critic, x_p, "x_p")
        fq = _critic_values(critic, x_q, "x_q")
    ep = fp.mean() if wp is None else (fp * wp.to(fp)).sum()
    eq = fq.mean() if wq is None else (fq * wq.to(fq)).sum()
    return ep - eq


def exact_dual_estimate(critic: Callable[[Tensor], Tensor], problem, dtype=None, device=None) -> float:
    r""":math:`\mathbb E_P f - \mathbb E_Q f` computed on the atoms of a discrete problem.

    ``problem`` provides ``atoms_p()``/``atoms_q()`` (e.g.
    :func:`lipsort.wasserstein.absolute_value`); the critic is evaluated at every atom once,
    without gradient, in ``dtype`` (default: the dtype of the critic's parameters). For a
    module the evaluation happens in eval mode; its training mode is restored afterwards.

    Example:
        >>> from lipsort.wasserstein import absolute_value
        >>> exact_dual_estimate(lambda x: 0.5 * x.abs().sum(1), absolute_value())
        0.5
    """
    if not hasattr(problem, "atoms_p") or not hasattr(problem, "atoms_q"):
        raise TypeError(f"problem must provide atoms_p() and atoms_q(), got {type(problem).__name__}")
    if dtype is None or device is None:
        p = next(iter(critic.parameters()), None) if isinstance(critic, nn.Module) else None
        dtype = dtype or (p.dtype if p is not None else torch.float64)
        device = device or (p.device if p is not None else None)
    x_p, w_p = problem.atoms_p(dtype=dtype, device=device)
    x_q, w_q = problem.atoms_q(dtype=dtype, device=device)
    was_training = critic.training if isinstance(critic, nn.Module) else None
    try:
        if was_training:
            critic.eval()
        with torch.no_grad():
            return float(dual_estimate(critic, x_p, x_q, w_p, w_q))
    finally:
        if was_training:
            critic.train()


# --------------------------------------------------------------------------- gradient norms


def gradient_norms(critic: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    r"""Per-sample input-gradient norms :math:`\|\nabla_x f(x_n)\|_2` of a scalar critic.

    One backward pass of :math:`\sum_n f(x_n)`: valid because samples are processed
    independently (put a module in eval mode; the parametrizations of :mod:`lipsort` still let
    gradients flow to the inputs there). At the kinks of a piecewise-linear critic autograd
    returns one of the one-sided gradients.

    Returns:
        A ``(N,)`` tensor, detached.

    Example:
        >>> gradient_norms(lambda x: (3 * x[:, 0] - 4 * x[:, 1]), torch.randn(5, 2))
        tensor([5., 5., 5., 5., 5.])
    """
    _check_samples(x, "x")
    with torch.enable_grad():
        xr = x.detach().clone().requires_grad_(True)
        out = _critic_values(critic, xr, "x")
        g = torch.autograd.grad(out.sum(), xr, allow_unused=True)[0] if out.requires_grad else None
    if g is None:  # a critic that does not depend on its input
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    return torch.linalg.vector_norm(g.reshape(x.shape[0], -1), dim=1).detach()


def gradient_norm_stats(norms: Tensor, threshold: float = 0.99) -> dict[str, float]:
    r"""Summary of gradient norms: mean, median, min, max and the fraction ``>= threshold``.

    The fraction measures how much of the domain a critic spends at (nearly) full slope: an
    optimal critic has :math:`\|\nabla f\| = 1` on every transport path.

    Example:
        >>> gradient_norm_stats(torch.tensor([1.0, 1.0, 0.5, 0.0]))["frac_unit"]
        0.5
    """
    if not isinstance(norms, Tensor) or norms.dim() != 1 or norms.numel() == 0:
        raise ValueError("norms must be a non-empty 1-D tensor")
    n = norms.detach().to(torch.float64)
    return {
        "mean": float(n.mean()),
        "median": float(n.median()),
        "min": float(n.min()),
        "max": float(n.max()),
        "frac_unit": float((n >= threshold).to(torch.float64).mean()),
    }


# --------------------------------------------------------------------------- exact OT, held-out


def exact_w1(x_p: Tensor, x_q: Tensor, weights_p: Tensor | None = None, weights_q: Tensor | None = None) -> float:
    r"""Exact :math:`W_1` between two discrete measures by linear programming (POT's ``ot.emd2``).

    .. math:: W_1 = \min_{\pi \ge 0,\ \pi 1 = a,\ \pi^\top 1 = b} \sum_{ij} \pi_{ij}\, \|x_{p,i} - x_{q,j}\|_2,

    with ``a``, ``b`` the weights (default uniform), solved in float64 by the network simplex
    on the Euclidean cost matrix (``N × M`` memory). An independent ground truth for the dual
    estimates: every 1-Lipschitz critic gives at most this value on the same atoms.
    POT (module ``ot``) is imported here only.

    Example:
        >>> exact_w1(torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [1.0]]))
        1.0
    """
    import ot

    _check_samples(x_p, "x_p")
    _check_samples(x_q, "x_q")
    if x_p.shape[1:] != x_q.shape[1:]:
        raise ValueError(f"x_p and x_q must have the same trailing shape, got {tuple(x_p.shape)} and {tuple(x_q.shape)}")
    a = _check_weights(weights_p, x_p.shape[0], "weights_p")
    b = _check_weights(weights_q, x_q.shape[0], "weights_q")
    xp = x_p.detach().reshape(x_p.shape[0], -1).to(device="cpu", dtype=torch.float64)
    xq = x_q.detach().reshape(x_q.shape[0], -1).to(device="cpu", dtype=torch.float64)
    a = torch.full((xp.shape[0],), 1.0 / xp.shape[0], dtype=torch.float64) if a is None else a.detach().cpu().double()
    b = torch.full((xq.shape[0],), 1.0 / xq.shape[0], dtype=torch.float64) if b is None else b.detach().cpu().double()
    # Renormalize in float64: POT checks that both marginals carry the same mass.
    a, b = a / a.sum(), b / b.sum()
    cost = torch.cdist(xp, xq)
    return float(ot.emd2(a.numpy(), b.numpy(), cost.numpy(), numItermax=100 * (xp.shape[0] + xq.shape[0]) ** 2))


@dataclass(frozen=True)
class HeldoutEstimate:
    r"""A held-out dual estimate of :math:`W_1` with a normal-approximation confidence interval.

    All three numbers are divided by ``max(lipschitz, 1)`` (the certified scaling of
    :attr:`lipsort.wasserstein.CriticResult.certified`), so they estimate a quantity that is
    a lower bound of :math:`W_1` whatever the critic's true constant.

    Attributes:
        value: :math:`(\bar f_P - \bar f_Q) / \max(L, 1)` on the held-out samples.
        low, high: the ends of the ``level`` confidence interval of the population value.
        stderr: its standard error (also scaled).
        lipschitz: the certified Lipschitz bound ``L`` used.
        n_p, n_q: sample sizes; paired: whether the differences were paired.
        level: confidence level.
    """

    value: float
    low: float
    high: float
    stderr: float
    lipschitz: float
    n_p: int
    n_q: int
    paired: bool
    level: float

    def __str__(self) -> str:
        return f"{self.value:.4f} [{self.low:.4f}, {self.high:.4f}]"


def heldout_estimate(
    critic: Callable[[Tensor], Tensor],
    x_p: Tensor,
    x_q: Tensor,
    lipschitz: float | None = None,
    level: float = 0.95,
    paired: bool = False,
) -> HeldoutEstimate:
    r"""Certified held-out estimate :math:`(\bar f_P - \bar f_Q)/\max(L, 1)` with a confidence interval.

    Evaluate the critic, without gradient, on samples it was not trained on. Independent
    samples give the standard error
    :math:`\sqrt{s_P^2 / n_P + s_Q^2 / n_Q}`; ``paired=True`` (coupled samples such as
    :meth:`lipsort.wasserstein.ConeProblem.sample_pairs`, ``n_P = n_Q``) uses the differences
    :math:`d_i = f(x_{p,i}) - f(x_{q,i})`, :math:`s_d / \sqrt n`. The interval is
    :math:`\text{value} \pm z_{(1+\text{level})/2}\, \text{stderr}` (central limit theorem).

    The estimate is never reported at a scale the critic's Lipschitz bound does not support:
    everything is divided by :math:`\max(L, 1)`, with ``L`` given or, for an ``nn.Module``,
    the exact product bound :math:`\min(L_2, L_\infty)` of
    :func:`lipsort.certify.lipschitz_upper_bound` (a critic with :math:`L > 1` only bounds
    :math:`L \cdot W_1`).

    Raises:
        ValueError: no ``lipschitz`` for a critic that is not a module, a non-finite or
            non-positive ``lipschitz``, ``level`` outside (0, 1), fewer than two samples, or
            paired samples of different sizes.

    Example:
        >>> x_q = torch.randn(400, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> e = heldout_estimate(lambda x: 2 * x[:, 0], x_q + torch.tensor([1.0, 0.0], dtype=torch.float64),
        ...                      x_q, lipschitz=2.0, paired=True)
        >>> round(e.value, 6), round(e.stderr, 6)  # the slope-2 critic is scaled back to slope 1
        (1.0, 0.0)
    """
    from statistics import NormalDist

    _check_samples(x_p, "x_p")
    _check_samples(x_q, "x_q")
    if not (isinstance(level, float | int) and 0 < level < 1):
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if x_p.shape[0] < 2 or x_q.shape[0] < 2:
        raise ValueError(f"need at least 2 samples of each distribution for a standard error, got {x_p.shape[0]} and {x_q.shape[0]}")
    if paired and x_p.shape[0] != x_q.shape[0]:
        raise ValueError(f"paired samples must have equal sizes, got {x_p.shape[0]} and {x_q.shape[0]}")
    if lipschitz is None:
        if not isinstance(critic, nn.Module):
            raise ValueError("pass lipschitz= (a certified bound) for a critic that is not an nn.Module")
        from ..certify import lipschitz_upper_bound

        lipschitz = min(float(lipschitz_upper_bound(critic, "l2")), float(lipschitz_upper_bound(critic, "linf")))
    lipschitz = float(lipschitz)
    if not math.isfinite(lipschitz) or lipschitz <= 0:
        raise ValueError(f"lipschitz must be a positive finite bound, got {lipschitz}")
    was_training = critic.training if isinstance(critic, nn.Module) else None
    try:
        if was_training:
            critic.eval()
        with torch.no_grad():
            fp = _critic_values(critic, x_p, "x_p").to(torch.float64)
            fq = _critic_values(critic, x_q, "x_q").to(torch.float64)
    finally:
        if was_training:
            critic.train()
    if paired:
        d = fp - fq
        value, se = float(d.mean()), float(d.std() / math.sqrt(d.numel()))
    else:
        value = float(fp.mean() - fq.mean())
        se = math.sqrt(float(fp.var()) / fp.numel() + float(fq.var()) / fq.numel())
    scale = max(lipschitz, 1.0)
    z = NormalDist().inv_cdf((1 + level) / 2)
    value, se = value / scale, se / scale
    return HeldoutEstimate(value, value - z * se, value + z * se, se, lipschitz, fp.numel(), fq.numel(), bool(paired), float(level))
