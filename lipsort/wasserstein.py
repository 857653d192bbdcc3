r"""Wasserstein-1 estimation with a Lipschitz critic (Kantorovich–Rubinstein duality, chapter 01).

.. math::
    W_1(P, Q) = \sup_{\mathrm{Lip}(f) \le 1} \mathbb E_{x \sim P} f(x) - \mathbb E_{x \sim Q} f(x).

Any critic ``f`` with :math:`\mathrm{Lip}(f) \le 1` gives a *lower* bound
:math:`\mathbb E_P f - \mathbb E_Q f \le W_1(P, Q)`; a critic with constant ``L`` gives
:math:`(\mathbb E_P f - \mathbb E_Q f) / L \le W_1`. Training maximizes the bound over a
family of 1-Lipschitz networks (:func:`train_critic`); how close it gets measures how
expressive the family is. Anil et al. (2019) show that norm-constrained networks with ReLU
cannot reach the optimum when it needs gradient norm 1 everywhere (e.g. :math:`f = |x|`),
while GroupSort networks can.

* :func:`dual_estimate`: :math:`\mathbb E_P f - \mathbb E_Q f` from samples or from weighted
  atoms (exact for discrete distributions).
* :func:`train_critic`: maximize the estimate by stochastic gradient (AggMo or Adam), with a
  tqdm progress bar; returns a :class:`CriticHistory`.
* :func:`gradient_norms` and :func:`gradient_norm_stats`: input-gradient norms
  :math:`\|\nabla_x f(x)\|_2` of a scalar critic, the quantity that an optimal critic keeps
  at 1 on the transport paths.

Example:
    >>> import torch
    >>> from lipsort.distributions import absolute_value
    >>> pb = absolute_value()
    >>> float(dual_estimate(pb.critic, *pb.sample(64, torch.Generator().manual_seed(0))))
    1.0
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = [
    "dual_estimate",
    "exact_dual_estimate",
    "CriticHistory",
    "train_critic",
    "gradient_norms",
    "gradient_norm_stats",
]


# --------------------------------------------------------------------------- estimates


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
    :func:`lipsort.distributions.absolute_value`); the critic is evaluated at every atom once,
    without gradient, in ``dtype`` (default: the dtype of the critic's parameters). For a
    module the evaluation happens in eval mode; its training mode is restored afterwards.

    Example:
        >>> from lipsort.distributions import absolute_value
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


# --------------------------------------------------------------------------- training


@dataclass
class CriticHistory:
    """What :func:`train_critic` records.

    Attributes:
        train: the mini-batch estimate :math:`\\hat{\\mathbb E}_P f - \\hat{\\mathbb E}_Q f`
            at every step (before the update), a noisy training curve.
        eval_steps: the steps after which the critic was evaluated (the last one is ``steps``).
        eval: the evaluation estimate at those steps (``evaluate(critic)``).
    """

    train: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval: list[float] = field(default_factory=list)

    @property
    def final(self) -> float:
        """The last evaluation estimate."""
        if not self.eval:
            raise ValueError("the history holds no evaluation yet")
        return self.eval[-1]


def _check_positive_int(x, name: str, minimum: int = 1) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {x!r}")
    return int(x)


def _make_optimizer(optimizer, params, lr: float, betas):
    if callable(optimizer) and not isinstance(optimizer, str):
        return optimizer(params)
    if optimizer == "aggmo":
        from .optim import AggMo

        return AggMo(params, lr=lr, betas=tuple(betas) if betas is not None else (0.0, 0.9, 0.99))
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(betas) if betas is not None else (0.9, 0.999))
    raise ValueError(f"optimizer must be 'aggmo', 'adam' or a callable params -> Optimizer, got {optimizer!r}")


def _step_schedule(opt, milestones, gamma):
    """``LambdaLR`` multiplying the learning rate by ``gamma[i]`` from step ``milestones[i]`` on."""
    milestones = [_check_positive_int(m, "each milestone") for m in milestones]
    if milestones != sorted(set(milestones)):
        raise ValueError(f"milestones must be strictly increasing steps, got {milestones}")
    gammas = [gamma] * len(milestones) if isinstance(gamma, numbers.Real) else list(gamma)
    if len(gammas) != len(milestones) or not all(isinstance(g, numbers.Real) and g > 0 for g in gammas):
        raise ValueError(
            f"gamma must be a positive number or one positive factor per milestone ({len(milestones)}), got {gamma!r}"
        )
    if not milestones:
        return None

    def factor(step: int) -> float:
        out = 1.0
        for m, g in zip(milestones, gammas):
            if step >= m:
                out *= g
        return out

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_critic(
    critic: nn.Module,
    problem,
    steps: int,
    batch_size: int = 32,
    optimizer: str | Callable = "aggmo",
    lr: float = 0.01,
    betas: tuple[float, ...] | None = None,
    milestones: tuple[int, ...] = (),
    gamma: float | tuple[float, ...] = 0.9,
    max_grad_norm: float | None = 10.0,
    evaluate: Callable[[nn.Module], float] | None = None,
    eval_every: int | None = None,
    eval_samples: int = 2048,
    seed: int = 0,
    progress: bool = True,
    desc: str | None = None,
) -> CriticHistory:
    r"""Maximize the dual objective :math:`\mathbb E_P f - \mathbb E_Q f` over the critic's weights.

    Each step draws ``batch_size`` fresh points from each distribution and takes a gradient
    step on the loss :math:`-(\hat{\mathbb E}_P f - \hat{\mathbb E}_Q f)`; the 1-Lipschitz
    constraint is the critic's own (weight parametrizations), so no penalty is needed.
    Defaults follow the authors' configuration for the Wasserstein experiments: AggMo with
    :math:`\beta = (0, 0.9, 0.99)`, learning rate 0.01, batch 32, gradients clipped to norm
    10, learning rate multiplied by 0.9 at steps 512 and 1024 (pass them as ``milestones``).

    Args:
        critic: the network; trained in place (left in training mode).
        problem: provides ``sample_p(n, generator=..., dtype=..., device=...)`` and
            ``sample_q(...)`` (see :mod:`lipsort.distributions`).
        steps: number of optimizer steps.
        batch_size: points per distribution and step.
        optimizer: ``"aggmo"`` (:class:`lipsort.optim.AggMo`), ``"adam"`` or a callable
            ``params -> torch.optim.Optimizer``.
        lr, betas: learning rate and momentum factors of the named optimizers.
        milestones, gamma: step decay: from step ``milestones[i]`` on, the learning rate is
            multiplied by ``gamma`` (a number, or one factor per milestone). The authors' setting
            is ``milestones=(512, 1024), gamma=0.9``.
        max_grad_norm: gradient clipping threshold, or ``None``.
        evaluate: ``critic -> float``, the estimate recorded in ``history.eval`` (for example
            ``lambda f: exact_dual_estimate(f, problem)``); default: :func:`dual_estimate` on
            ``eval_samples`` fixed points of each distribution, in eval mode without gradient.
        eval_every: evaluate every that many steps (default: only at the end).
        eval_samples: size of the default evaluation set.
        seed: seed of the sampling generator (the critic's initialization is the caller's).
        progress: show a tqdm progress bar.
        desc: label of the progress bar.

    Returns:
        A :class:`CriticHistory`.

    Example:
        >>> from lipsort.distributions import absolute_value
        >>> _ = torch.manual_seed(0)
        >>> f = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> h = train_critic(f, absolute_value(), steps=5, progress=False)
        >>> len(h.train), h.eval_steps
        (5, [5])
    """
    # Plain tqdm: it renders as text in notebooks too, without needing ipywidgets.
    from tqdm import tqdm

    if not isinstance(critic, nn.Module):
        raise TypeError(f"critic must be an nn.Module, got {type(critic).__name__}")
    if not hasattr(problem, "sample_p") or not hasattr(problem, "sample_q"):
        raise TypeError(f"problem must provide sample_p(n, ...) and sample_q(n, ...), got {type(problem).__name__}")
    steps = _check_positive_int(steps, "steps")
    batch_size = _check_positive_int(batch_size, "batch_size")
    eval_samples = _check_positive_int(eval_samples, "eval_samples")
    if eval_every is not None:
        eval_every = _check_positive_int(eval_every, "eval_every")
    if not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm!r}")
    params = [p for p in critic.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the critic has no trainable parameters")
    dtype, device = params[0].dtype, params[0].device

    gen = torch.Generator().manual_seed(seed)
    if evaluate is None:
        x_p_eval = problem.sample_p(eval_samples, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype, device=device)
        x_q_eval = problem.sample_q(eval_samples, generator=torch.Generator().manual_seed(seed + 2), dtype=dtype, device=device)

        def evaluate(f: nn.Module) -> float:
            with torch.no_grad():
                return float(dual_estimate(f, x_p_eval, x_q_eval))

    def run_eval(step: int) -> None:
        critic.eval()
        try:
            value = float(evaluate(critic))
        finally:
            critic.train()
        history.eval_steps.append(step)
        history.eval.append(value)

    opt = _make_optimizer(optimizer, params, float(lr), betas)
    sched = _step_schedule(opt, milestones, gamma)
    history = CriticHistory()
    critic.train()
    bar = tqdm(range(1, steps + 1), desc=desc or "critic", disable=not progress, mininterval=5.0)
    for step in bar:
        x_p = problem.sample_p(batch_size, generator=gen, dtype=dtype, device=device)
        x_q = problem.sample_q(batch_size, generator=gen, dtype=dtype, device=device)
        estimate = dual_estimate(critic, x_p, x_q)
        if not bool(torch.isfinite(estimate)):
            raise FloatingPointError(f"the dual estimate became {float(estimate)} at step {step}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        (-estimate).backward()
        if max_grad_norm is not None:
            nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        if sched is not None:
            sched.step()
        history.train.append(float(estimate.detach()))
        if (eval_every is not None and step % eval_every == 0) or step == steps:
            if not history.eval_steps or history.eval_steps[-1] != step:
                run_eval(step)
                bar.set_postfix(estimate=f"{history.eval[-1]:.4f}", refresh=False)
    bar.close()
    return history


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
