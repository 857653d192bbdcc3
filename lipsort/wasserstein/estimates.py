r"""Kantorovich–Rubinstein estimates of :math:`W_1` and the input-gradient norms of a critic.

.. math::
    W_1(P, Q) = \sup_{\mathrm{Lip}(f) \le 1} \mathbb E_{x \sim P} f(x) - \mathbb E_{x \sim Q} f(x).

* :func:`dual_estimate`: :math:`\mathbb E_P f - \mathbb E_Q f` from samples or from weighted
  atoms (exact for discrete distributions); :func:`exact_dual_estimate` on a problem's atoms.
* :func:`gradient_norms` and :func:`gradient_norm_stats`: input-gradient norms
  :math:`\|\nabla_x f(x)\|_2` of a scalar critic, the quantity that an optimal critic keeps
  at 1 on the transport paths.

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

import torch
from torch import Tensor, nn

__all__ = ["dual_estimate", "exact_dual_estimate", "gradient_norms", "gradient_norm_stats"]

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
