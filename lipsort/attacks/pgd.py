r"""lipsort's own projected gradient ascent (margin or cross-entropy, ℓ2 or ℓ∞, per-sample
radii) and the adversarial-training transform built on it."""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from .._checks import check_int
from ..certify import _margin_values, margins
from ._common import _bcast, _check_eps, _check_steps, _flat_norm, _per_sample

__all__ = ["pgd", "pgd_training_transform"]


def _project(delta: Tensor, eps: Tensor, norm: str) -> Tensor:
    """Project each perturbation onto its ε-ball (ℓ2: radial scaling; ℓ∞: clipping)."""
    if norm == "linf":
        e = _bcast(eps, delta)
        return torch.maximum(torch.minimum(delta, e), -e)
    n = _flat_norm(delta, 2)
    scale = torch.where(
        n > eps, eps / n.clamp_min(torch.finfo(delta.dtype).tiny), torch.ones_like(n)
    )
    out = delta * _bcast(scale, delta)
    # Rounding can leave the scaled norm an ulp above ε: shrink those by a vanishing factor.
    over = (_flat_norm(out, 2) > eps).to(delta.dtype)
    return out * _bcast(1 - over * (4 * torch.finfo(delta.dtype).eps), delta)


def _snap(x_adv: Tensor, x: Tensor, eps: Tensor, norm: str) -> Tensor:
    """Move coordinates one ulp towards ``x`` until ``‖x_adv − x‖ ≤ ε`` holds as computed.

    ``x + δ`` is rounded, so ``(x + δ) − x`` can exceed ``‖δ‖ ≤ ε`` by an ulp; stepping towards
    the clean input cannot leave the ball nor the input box (which contains ``x``).
    """
    for _ in range(8):
        d = x_adv - x
        if norm == "linf":
            bad = d.abs() > _bcast(eps, x)
        else:
            bad = _bcast(_flat_norm(d, 2) > eps, x).expand_as(x)
        if not bool(bad.any()):
            break
        x_adv = torch.where(bad, torch.nextafter(x_adv, x), x_adv)
    return x_adv


def _random_start(x: Tensor, eps: Tensor, norm: str, generator) -> Tensor:
    if norm == "linf":
        u = torch.rand(x.shape, dtype=x.dtype, device=x.device, generator=generator)
        return (2 * u - 1) * _bcast(eps, x)
    # Uniform in the ℓ2 ball: Gaussian direction, radius ε·U^(1/d).
    g = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
    d = g[0].numel()
    u = torch.rand(x.shape[0], dtype=x.dtype, device=x.device, generator=generator)
    r = eps * u ** (1.0 / d)
    return g / _bcast(_flat_norm(g, 2).clamp_min(torch.finfo(x.dtype).tiny), x) * _bcast(r, x)


def _objective(logits: Tensor, y: Tensor, loss: str) -> tuple[Tensor, Tensor]:
    """(per-sample loss to ascend, per-sample margin to track); ``y`` already validated."""
    m = _margin_values(logits, y)
    if loss == "margin":
        return -m, m
    if logits.dim() == 1 or logits.shape[1] == 1:
        return nnf.softplus(-m), m  # logistic loss of the signed margin
    return nnf.cross_entropy(logits, y, reduction="none"), m


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    norm: str = "l2",
    steps: int = 100,
    step_size: float | Tensor | None = None,
    random_start: bool = True,
    loss: str = "margin",
    clamp: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    r"""Projected gradient ascent (Madry et al., 2018) inside the ε-ball around each input.

    Each step moves along the steepest ascent direction of the loss for the norm —
    :math:`\delta \leftarrow \delta + \alpha\, g/\|g\|_2` in ℓ2,
    :math:`\delta \leftarrow \delta + \alpha\,\mathrm{sign}(g)` in ℓ∞ — then projects back
    onto :math:`\|\delta\|\le\varepsilon` and, if ``clamp`` is given, onto the input box.
    The default loss is the negative margin :math:`-(f_y - \max_{j\ne y} f_j)` (the
    Carlini–Wagner objective used by LConvNet's ``PGDAttacker``); ``loss="ce"`` uses the
    cross-entropy. Over all iterates (the clean input included) the one with the *smallest
    margin* is returned per sample, so a success found early is never lost.

    The model is used as given: put it in eval mode first (a train-mode BatchNorm would update
    its statistics). Parameters and their ``.grad`` are never modified: gradients are taken
    with respect to the input only.

    Args:
        model: maps a batch ``x`` to ``(N, C)`` logits or ``(N,)``/``(N, 1)`` binary scores.
        x: clean inputs, batch first.
        y: labels: class indices, or binary labels in {0, 1} / {−1, +1}.
        eps: radius, a float or one per sample (shape ``(N,)``), taken in ``x``'s dtype.
        norm: ``"l2"`` or ``"linf"``.
        steps: number of gradient steps.
        step_size: α, a float or per sample; default ``2.5·ε/steps`` (Madry et al.).
        random_start: start from a uniform random point of the ball.
        loss: ``"margin"`` or ``"ce"``.
        clamp: ``(lo, hi)`` bounds of valid inputs (e.g. ``(0, 1)`` for images), or None.
        generator: random generator for the start (the global one if None).
        progress: show a tqdm bar over the steps.

    Returns:
        Adversarial inputs, detached, with ``‖x_adv − x‖ ≤ ε`` per sample as computed in
        floating point (the rounding of ``x + δ`` is corrected by ulp steps towards ``x``).

    Example:
        >>> model = nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1., 0.], [-1., 0.]]))
        >>> # margin 1 and L = √2: certified radius 1/(√2·√2) = 0.5, exact here
        >>> x, y = torch.tensor([[0.5, 0.0]]), torch.tensor([0])
        >>> x_adv = pgd(model, x, y, eps=0.6, steps=20)
        >>> model(x_adv).argmax(1).item(), bool((x_adv - x).norm() <= 0.6)
        (1, True)
    """
    if norm not in ("l2", "linf"):
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    if loss not in ("margin", "ce"):
        raise ValueError(f"loss must be 'margin' or 'ce', got {loss!r}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError("x must be a floating-point tensor with a batch dimension")
    steps = check_int(steps, "steps", 0)
    x = x.detach()
    if x.shape[0] == 0:
        return x.clone()
    eps_t = _per_sample(eps, x, "eps")
    alpha = _per_sample(
        2.5 * eps_t / max(steps, 1) if step_size is None else step_size, x, "step_size"
    )
    if clamp is not None:
        lo, hi = clamp
        if not lo < hi:
            raise ValueError(f"clamp must be (lo, hi) with lo < hi, got {clamp!r}")
        if bool((x < lo).any()) or bool((x > hi).any()):
            raise ValueError(f"clean inputs lie outside the clamp box {clamp!r}")

    def feasible(delta: Tensor) -> Tensor:
        delta = _project(delta, eps_t, norm)
        if clamp is not None:
            delta = (x + delta).clamp(lo, hi) - x
        return delta

    delta = torch.zeros_like(x)
    if random_start:
        delta = feasible(_random_start(x, eps_t, norm, generator))

    best_x = x.clone()
    with torch.no_grad():
        best_m = margins(model(x), y)  # validates the labels once

    iterator = range(steps + 1)
    if progress:
        from tqdm import tqdm  # text bars: tqdm.auto wants ipywidgets in notebooks

        iterator = tqdm(iterator, desc=f"PGD {norm}", leave=False)
    with torch.enable_grad():
        for t in iterator:
            x_adv = x + delta
            if clamp is not None:
                x_adv = x_adv.clamp(lo, hi)  # x + δ is rounded: keep it in the box
            x_adv = _snap(x_adv.detach(), x, eps_t, norm).requires_grad_(True)
            objective, m = _objective(model(x_adv), y, loss)
            with torch.no_grad():
                better = m < best_m
                best_m = torch.where(better, m, best_m)
                best_x = torch.where(_bcast(better, x), x_adv, best_x)
            if t == steps:
                break
            (g,) = torch.autograd.grad(objective.sum(), x_adv)
            with torch.no_grad():
                if norm == "linf":
                    direction = g.sign()
                else:
                    direction = g / _bcast(_flat_norm(g, 2).clamp_min(torch.finfo(g.dtype).tiny), g)
                delta = feasible(delta + _bcast(alpha, x) * direction)
    return best_x.detach()


def pgd_training_transform(eps: float = 0.3, steps: int = 40, step_size: float = 0.01,
                           norm: str = "linf", loss: str = "margin",
                           clamp: tuple[float, float] | None = (0.0, 1.0)):
    r"""A batch transform for adversarial training (Madry et al., 2018): ``fit(...,
    input_transform=pgd_training_transform())`` trains on PGD inputs instead of clean ones.

    The defaults are the A9 baseline of Anil et al. (``manual_pgd(eps=0.3, iters=40)``: ℓ∞,
    steps of 0.01 from a uniform random start, inputs clamped to [0, 1], ascent on the margin
    — their ``cw_loss``). It runs :func:`pgd` in eval mode (restoring the mode after); the
    random start uses torch's global generator, which training checkpoints save.

    Example:
        >>> net = nn.Linear(4, 3)
        >>> x, y = torch.rand(6, 4), torch.randint(0, 3, (6,))
        >>> x_adv = pgd_training_transform(eps=0.1, steps=3)(net, x, y)
        >>> bool((x_adv - x).abs().max() <= 0.1), net.training
        (True, True)
    """
    eps, step_size, steps = _check_eps(eps), _check_eps(step_size, "step_size"), _check_steps(steps)

    def transform(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        was_training = model.training
        model.eval()
        try:
            return pgd(
                model,
                x,
                y,
                eps,
                norm=norm,
                steps=steps,
                step_size=step_size,
                loss=loss,
                clamp=clamp,
            )
        finally:
            model.train(was_training)

    return transform
