r"""Training Lipschitz critics on the dual objective: the one critic pipeline of the book.

* :func:`train_critic`: maximize :math:`\mathbb E_P f - \mathbb E_Q f` over a given critic's
  weights by stochastic gradient (AggMo or Adam, the authors' step schedule), with a tqdm
  progress bar; returns a :class:`CriticHistory`.
* :func:`fit_critic`: build a critic for a problem (widths, activation, constraint), train it,
  and measure it: a :class:`CriticResult` with the final estimate, the exact ℓ2 and ℓ∞ product
  bounds of its Lipschitz constant, the *certified* estimate (the one definition used by every
  chapter), input-gradient norms and, optionally, the exact norms of the weights used in training.

Example:
    >>> from lipsort.wasserstein import absolute_value
    >>> r = fit_critic(absolute_value(), (16, 16), "maxmin", "bjorck", steps=20, progress=False)
    >>> r.certified <= 1 + 1e-6  # a certified estimate never exceeds W1 = 1
    True
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from .._checks import check_int, check_positive
from ..training import checkpoint as ckpt
from .estimates import dual_estimate, exact_dual_estimate, gradient_norm_stats, gradient_norms, heldout_estimate

__all__ = ["CriticHistory", "train_critic", "CriticResult", "fit_critic"]


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


def _make_optimizer(optimizer, params, lr: float, betas):
    if callable(optimizer) and not isinstance(optimizer, str):
        return optimizer(params)
    if optimizer == "aggmo":
        from ..optim import AggMo

        return AggMo(params, lr=lr, betas=tuple(betas) if betas is not None else (0.0, 0.9, 0.99))
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(betas) if betas is not None else (0.9, 0.999))
    raise ValueError(f"optimizer must be 'aggmo', 'adam' or a callable params -> Optimizer, got {optimizer!r}")


def _step_schedule(opt, milestones, gamma):
    """``LambdaLR`` multiplying the learning rate by ``gamma[i]`` from step ``milestones[i]`` on."""
    milestones = [check_int(m, "each milestone") for m in milestones]
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
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
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
            ``sample_q(...)`` (see :mod:`lipsort.cones`).
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
        checkpoint: a file (:mod:`lipsort.training.checkpoint` format) written atomically every
            ``checkpoint_every`` steps and at the end. If it exists, training resumes from it
            (critic, optimizer, schedule, sampling generator and history) and ends with the same
            weights as an uninterrupted run; a finished run is not trained again. A checkpoint
            of a run with other settings raises :class:`~lipsort.training.checkpoint.CheckpointError`.
        checkpoint_every: steps between checkpoints.

    Returns:
        A :class:`CriticHistory`.

    Example:
        >>> from lipsort.wasserstein import absolute_value
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
    steps = check_int(steps, "steps")
    batch_size = check_int(batch_size, "batch_size")
    eval_samples = check_int(eval_samples, "eval_samples")
    if eval_every is not None:
        eval_every = check_int(eval_every, "eval_every")
    lr = check_positive(lr, "lr")
    if max_grad_norm is not None:
        max_grad_norm = check_positive(max_grad_norm, "max_grad_norm")
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
    history, start = CriticHistory(), 0
    checkpoint_every = check_int(checkpoint_every, "checkpoint_every")
    config = {"batch_size": batch_size, "optimizer": optimizer if isinstance(optimizer, str) else repr(optimizer),
              "lr": float(lr), "betas": None if betas is None else list(map(float, betas)),
              "milestones": list(milestones), "gamma": gamma if isinstance(gamma, numbers.Real) else list(gamma),
              "max_grad_norm": max_grad_norm, "eval_every": eval_every, "seed": seed}  # fmt: skip
    state = ckpt.load_run(checkpoint, config, "critic", steps)
    if state is not None:
        critic.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        gen.set_state(state["rng"]["sampling"])
        history = CriticHistory(**{k: list(v) for k, v in state["history"].items()})
        start = int(state["epoch"])

    def save(step: int) -> None:
        ckpt.save_atomic(ckpt.new_checkpoint(
            epoch=step, config=config, model=critic.state_dict(), optimizer=opt.state_dict(),
            scheduler={} if sched is None else sched.state_dict(), rng={"sampling": gen.get_state()},
            history={"train": history.train, "eval_steps": history.eval_steps, "eval": history.eval}), checkpoint)  # fmt: skip

    critic.train()
    bar = tqdm(range(start + 1, steps + 1), desc=desc or "critic", disable=not progress, mininterval=5.0,
               initial=start, total=steps)  # fmt: skip
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
        if checkpoint is not None and (step % checkpoint_every == 0 or step == steps):
            save(step)
    bar.close()
    return history


# --------------------------------------------------------------------------- fit and measure


@dataclass
class CriticResult:
    r"""A trained critic and its measurements (see :func:`fit_critic`).

    Attributes:
        label: display name, e.g. ``"MaxMin / bjorck"``.
        activation, constraint: how the critic was built (``constraint`` is ``"none"`` for none).
        critic: the trained network, in eval mode.
        history: the training curve (:class:`CriticHistory`).
        estimate: the final evaluation estimate :math:`\mathbb E_P f - \mathbb E_Q f`.
        lipschitz_l2, lipschitz_linf: exact products of the layers' ℓ2 and ℓ∞ operator norms
            (:func:`lipsort.certify.lipschitz_upper_bound`), rigorous upper bounds of the
            critic's Lipschitz constant in each norm.
        grad_norms: input-gradient norms at the requested points (empty if none).
        weight_trace: with ``trace_weights``, per constrained layer and training step the exact
            ``‖W‖₂ − 1`` (spectral) or ``max |σ − 1|`` (Björck) of the weight actually used:
            ``"per_layer"`` (layers × steps) and the worst layer under the constraint's name.
    """

    label: str
    activation: str
    constraint: str
    critic: nn.Module
    history: CriticHistory
    estimate: float
    lipschitz_l2: float
    lipschitz_linf: float
    grad_norms: Tensor = field(default_factory=lambda: torch.zeros(0))
    weight_trace: dict = field(default_factory=dict)

    @property
    def lipschitz(self) -> float:
        r"""The smallest rigorous ℓ2 Lipschitz constant known: :math:`\min(L_2, L_\infty)`.

        For a scalar critic :math:`|f(x) - f(y)| \le L_\infty \|x - y\|_\infty \le L_\infty
        \|x - y\|_2`, so the ℓ∞ product bounds the ℓ2 constant too.
        """
        return min(self.lipschitz_l2, self.lipschitz_linf)

    @property
    def certified(self) -> float:
        r"""A guaranteed lower bound of :math:`W_1`: the estimate divided by ``max(lipschitz, 1)``.

        A critic with constant :math:`L > 1` only bounds :math:`L \cdot W_1`; one with
        :math:`L \le 1` already gives a lower bound.
        """
        return self.estimate / max(self.lipschitz, 1.0)

    @property
    def grad_stats(self) -> dict[str, float]:
        """:func:`lipsort.wasserstein.gradient_norm_stats` of :attr:`grad_norms`."""
        return gradient_norm_stats(self.grad_norms)

    def heldout(self, x_p: Tensor, x_q: Tensor, level: float = 0.95, paired: bool = False):
        """:func:`lipsort.wasserstein.heldout_estimate` of this critic, certified by :attr:`lipschitz`.

        ``x_p``, ``x_q`` are moved to the critic's device and dtype.
        """
        p = next(self.critic.parameters())
        return heldout_estimate(
            self.critic, x_p.to(device=p.device, dtype=p.dtype), x_q.to(device=p.device, dtype=p.dtype),
            lipschitz=self.lipschitz, level=level, paired=paired,
        )


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
            self.pending.append(output.detach().to(torch.float64).clone())
            if len(self.pending) >= self.chunk:
                self.flush()

    def flush(self) -> np.ndarray:
        if self.pending:
            s = torch.linalg.svdvals(torch.stack(self.pending)).cpu()
            v = s[:, 0] - 1 if self.kind == "spectral" else (s - 1).abs().amax(dim=1)
            self.values.append(v.numpy())
            self.pending = []
        return np.concatenate(self.values) if self.values else np.zeros(0)


def _trace_hooks(critic: nn.Module, constraint: str | None) -> list[tuple[_WeightTrace, object]]:
    from torch.nn.utils import parametrize

    if constraint not in ("spectral", "bjorck"):
        return []
    out = []
    for m in critic.modules():
        if parametrize.is_parametrized(m, "weight"):
            trace = _WeightTrace(constraint)
            out.append((trace, m.parametrizations.weight[0].register_forward_hook(trace)))
    return out


def fit_critic(
    problem,
    widths: Sequence[int],
    activation: str = "maxmin",
    constraint: str | None = "bjorck",
    *,
    steps: int,
    group_size: int | None = None,
    bjorck_iters: int | None = None,
    batch_size: int = 32,
    optimizer: str | Callable = "aggmo",
    lr: float = 0.01,
    betas: tuple[float, ...] | None = None,
    milestones: Sequence[int] = (),
    gamma: float | Sequence[float] = 0.9,
    max_grad_norm: float | None = 10.0,
    evaluate: Callable[[nn.Module], float] | None = None,
    eval_every: int | None = None,
    grad_points: Tensor | None = None,
    trace_weights: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    threads: int | None = None,
    progress: bool = True,
    label: str | None = None,
    checkpoint: str | os.PathLike | None = None,
) -> CriticResult:
    r"""Build, train and measure a critic ``problem.dim → widths → 1`` for :math:`W_1(P, Q)`.

    The critic is :func:`lipsort.models.mlp` with the given activation and weight constraint,
    initialized from ``torch.manual_seed(seed)``; training is :func:`train_critic` (the
    authors' AggMo setting by default, a step schedule from ``milestones``/``gamma``). The
    estimate is ``evaluate(critic)`` in eval mode: by default exact on the atoms of a discrete
    problem (:func:`exact_dual_estimate`), else :func:`dual_estimate` on fixed held-out samples.

    Args:
        problem: provides ``sample_p``/``sample_q`` and ``dim`` (see :mod:`lipsort.wasserstein.problems`).
        widths: hidden widths, e.g. ``(128, 128)`` for the ``[1, 128, 128, 1]`` critics of A1.
        activation, constraint, group_size: as in :func:`lipsort.models.mlp`.
        steps, batch_size, optimizer, lr, betas, milestones, gamma, max_grad_norm, eval_every:
            as in :func:`train_critic`.
        bjorck_iters: Björck iterations of ``constraint="bjorck"`` (default: the layer's default).
        evaluate: ``critic -> float``, the estimate (see above).
        grad_points: points where input-gradient norms are measured (``(N, dim)``), or ``None``.
        trace_weights: record the exact norms of the weights used at every training step.
        seed: seed of the initialization and of the training batches.
        dtype, device: of the critic (batches are drawn on the CPU generator, then moved).
        threads: torch CPU threads while fitting (:func:`lipsort.runtime.num_threads`).
        progress: show a tqdm progress bar.
        label: display name (default ``"<activation> / <constraint>"``).
        checkpoint: a checkpoint file of the training (see :func:`train_critic`): a rerun
            resumes it, or only measures the critic if its training had finished.
    """
    from ..certify import lipschitz_upper_bound
    from ..models import mlp
    from ..runtime import num_threads

    widths = [check_int(w, "each width") for w in widths]
    kwargs = {"n_iters": bjorck_iters} if constraint == "bjorck" and bjorck_iters is not None else {}
    gs = group_size if activation == "groupsort" else None
    label = label or f"{activation} / {constraint or 'none'}"
    if evaluate is None and getattr(problem, "is_discrete", False):

        def evaluate(f: nn.Module) -> float:
            return exact_dual_estimate(f, problem)

    with num_threads(threads if torch.device(device).type == "cpu" else None):
        torch.manual_seed(seed)
        critic = mlp([problem.dim, *widths, 1], activation=activation, constraint=constraint, group_size=gs, **kwargs)
        critic = critic.to(dtype=dtype, device=device)
        hooks = _trace_hooks(critic, constraint) if trace_weights else []
        history = train_critic(
            critic, problem, steps=steps, batch_size=batch_size, optimizer=optimizer, lr=lr, betas=betas,
            milestones=tuple(milestones), gamma=gamma if isinstance(gamma, numbers.Real) else tuple(gamma),
            max_grad_norm=max_grad_norm, evaluate=evaluate, eval_every=eval_every, seed=seed, progress=progress,
            desc=label, checkpoint=checkpoint,
        )
        for _, handle in hooks:
            handle.remove()
        traces: dict = {}
        if hooks:
            layers = np.stack([t.flush() for t, _ in hooks])
            traces = {constraint: layers.max(axis=0), "per_layer": layers}
        critic.eval()
        estimate = history.final
        grads = torch.zeros(0) if grad_points is None else gradient_norms(critic, grad_points.to(dtype=dtype, device=device)).cpu()
        return CriticResult(
            label=label, activation=activation, constraint=str(constraint or "none"), critic=critic, history=history,
            estimate=estimate, lipschitz_l2=float(lipschitz_upper_bound(critic, "l2")),
            lipschitz_linf=float(lipschitz_upper_bound(critic, "linf")), grad_norms=grads, weight_trace=traces,
        )
