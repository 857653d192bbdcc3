r"""The authors' A8 attack: iterated FGSM on the cross-entropy inside foolbox 1.x's search over
ε, and the inputs it cannot move (vanishing cross-entropy gradients)."""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torch import Tensor

from ._common import (
    _bcast,
    _check_eps,
    _check_pixels,
    _check_steps,
    _eval_mode,
    _flat_norm,
    _PixelModel,
)
from .pgd import _project

__all__ = ["A8_PGD_SEARCH", "pgd_linf_search", "vanishing_gradients"]

#: Anil et al. (2019), A8 evaluation (LNets ``projected_gradient_descent.json`` run through
#: foolbox 1.x's ``ProjectedGradientDescentAttack``): 20 steps of ε/30 (foolbox's default 0.01 at
#: its default ε = 0.3) from the clean input, ε searched from 0.3 with 5 steps each way.
A8_PGD_SEARCH = {"eps": 0.3, "steps": 20, "rel_step": 0.01 / 0.3, "search_steps": 5}


def _first_errors(g, x0: Tensor, y: Tensor, eps: Tensor, alpha: Tensor, steps: int):
    """One run of iterated FGSM at per-sample radius ``eps`` and step ``alpha``, each sample
    stopping at its first misclassified iterate: ``(x_adv, dist)``, the first error and its ℓ∞
    distance (float64), or the clean input and ``inf`` where none was found."""
    dist = torch.full((len(x0),), float("inf"), dtype=torch.float64, device=x0.device)
    found = x0.clone()
    idx = torch.arange(len(x0), device=x0.device)
    x, e, a, ys, xs = x0, eps, _bcast(alpha, x0), y, x0
    for t in range(steps + 1):
        # The logits of an iterate both say whether it is an error and, if not, give the
        # gradient of the next step: one forward per step.
        leaf = x.detach().requires_grad_(t < steps)
        with torch.enable_grad():
            logits = g(leaf)
        x, keep = leaf.detach(), None
        if t > 0:
            wrong = logits.detach().argmax(1) != ys
            if bool(wrong.any()):
                hit = idx[wrong]
                found[hit] = x[wrong]
                dist[hit] = _flat_norm((x[wrong] - xs[wrong]).to(torch.float64), float("inf"))
                keep = ~wrong
                idx, ys, xs, e, a = idx[keep], ys[keep], xs[keep], e[keep], a[keep]
                logits, x = logits[keep], x[keep]
        if t == steps or not len(idx):
            break
        (grad,) = torch.autograd.grad(nnf.cross_entropy(logits, ys, reduction="sum"), leaf)
        with torch.no_grad():
            grad = grad if keep is None else grad[keep]
            step = x + a * grad.sign()
            x = (xs + _project(step - xs, e, "linf")).clamp(0.0, 1.0)
    return found, dist


def pgd_linf_search(model, x, y, eps: float = 0.3, steps: int = 20, rel_step: float = 0.01 / 0.3,
                    search_steps: int = 5, normalization=None) -> tuple[Tensor, Tensor]:
    r"""The closest ℓ∞ error found by iterated FGSM with a search over ε: the authors' A8
    attack (foolbox 1.x ``ProjectedGradientDescentAttack``, ``binary_search=5``,
    ``iterations=20``); defaults are :data:`A8_PGD_SEARCH`.

    One run at radius ε starts from the clean input :math:`x_0` and takes ``steps`` steps
    :math:`x \leftarrow \mathrm{clip}_{[0,1]}\bigl(x_0 + \mathrm{clip}_{\pm\varepsilon}(x +
    \alpha\,\mathrm{sign}\,\nabla_x \mathrm{CE} - x_0)\bigr)`, :math:`\alpha` = ``rel_step``·ε,
    and stops at its first misclassified iterate (argmax ≠ label). The search runs at ε, 1.5ε,
    2.25ε, … until a run succeeds (at most ``search_steps`` runs), then bisects
    ``search_steps`` times between 0 and the last radius that succeeded. Every error found
    counts, as foolbox keeps the closest. With the default step a run at ε reaches at most
    :math:`\tfrac{2}{3}\varepsilon`, so the search, not ε, sets the radii tried.

    Accuracy under this attack at radius r is ``(dist > r).mean()``: correct, and no error
    found within r. Inputs as in :func:`pgd_linf` (pixels in [0, 1], optional
    ``normalization=(μ, σ)``); the model runs in eval mode, every module's mode is restored.

    Returns:
        ``(x_adv, dist)``: per sample the closest error found and its ℓ∞ distance (float64);
        an input misclassified already is its own error at distance 0, and where nothing was
        found ``x_adv`` is the input and ``dist`` is ``inf``.

    Example:
        >>> from torch import nn
        >>> net = nn.Linear(2, 2)  # logits (x₁ − ½, ½ − x₁): the boundary is x₁ = ½
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        ...     _ = net.bias.copy_(torch.tensor([-0.5, 0.5]))
        >>> x, y = torch.tensor([[0.9, 0.5], [0.2, 0.5], [0.9, 0.5]]), torch.tensor([0, 1, 1])
        >>> x_adv, dist = pgd_linf_search(net, x, y)
        >>> [round(d, 3) for d in dist.tolist()]  # the distances to x₁ = ½: 0.4, 0.3 (and 0: wrong)
        [0.401, 0.304, 0.0]
    """
    _check_pixels(x, y)
    eps = _check_eps(eps)
    rel_step = _check_eps(rel_step, "rel_step")
    if eps == 0 or rel_step == 0:
        raise ValueError(f"eps and rel_step must be positive, got eps={eps!r}, rel_step={rel_step!r}")
    steps, search_steps = _check_steps(steps), _check_steps(search_steps)
    g = _PixelModel(model, x.shape[1:], normalization, x)
    flat = x.detach().reshape(len(x), -1)
    with _eval_mode(model):
        with torch.no_grad():
            wrong = g(flat).argmax(1) != y
        x_adv = flat.clone()
        dist = torch.where(wrong, 0.0, float("inf")).to(torch.float64)

        def run(idx: Tensor, radius: Tensor) -> Tensor:
            """Attack the samples ``idx`` at ``radius`` (float64); keep closer errors; which succeeded."""
            r = radius.to(flat.dtype)
            adv, d = _first_errors(g, flat[idx], y[idx], r, r * rel_step, steps)
            closer = d < dist[idx]
            x_adv[idx[closer]], dist[idx[closer]] = adv[closer], d[closer]
            return torch.isfinite(d)

        radius = torch.full((len(x),), eps, dtype=torch.float64, device=x.device)
        good = torch.full_like(radius, float("inf"))
        pending = (~wrong).nonzero().flatten()
        for _ in range(search_steps):  # grow ε by 1.5 until a run succeeds
            if not len(pending):
                break
            ok = run(pending, radius[pending])
            good[pending[ok]] = radius[pending[ok]]
            radius[pending[~ok]] *= 1.5
            pending = pending[~ok]
        idx = torch.isfinite(good).nonzero().flatten()
        bad = torch.zeros_like(good)
        for _ in range(search_steps if len(idx) else 0):  # then bisect [bad, good]
            mid = (good[idx] + bad[idx]) / 2
            ok = run(idx, mid)
            good[idx] = torch.where(ok, mid, good[idx])
            bad[idx] = torch.where(ok, bad[idx], mid)
    return x_adv.reshape(x.shape), dist


def vanishing_gradients(model, x, y, normalization=None) -> Tensor:
    r"""Which inputs have a cross-entropy input gradient of exactly zero.

    :math:`\nabla_x \mathrm{CE} = J^\top(p - e_y)` vanishes once every other class's softmax
    probability underflows, i.e. once the logit gap exceeds about 104 in float32 (``exp(−104)``
    is below the smallest subnormal) — the margins a hinge loss at ``l_constant`` 1000 trains
    for. There every attack that steps along the sign of this gradient from the clean input
    (FGSM, :func:`pgd_linf_search`) stays where it is: such inputs are never broken by it, at
    any ε. Inputs as in :func:`pgd_linf`; returns a bool per input.

    Example:
        >>> from torch import nn
        >>> net = nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.tensor([[300.0, 0.0], [-300.0, 0.0]]))
        ...     _ = net.bias.copy_(torch.tensor([-150.0, 150.0]))
        >>> vanishing_gradients(net, torch.tensor([[0.9, 0.5], [0.52, 0.5]]), torch.tensor([0, 0]))
        tensor([ True, False])
    """
    _check_pixels(x, y)
    g = _PixelModel(model, x.shape[1:], normalization, x)
    with _eval_mode(model), torch.enable_grad():
        u = x.detach().reshape(len(x), -1).requires_grad_(True)
        (grad,) = torch.autograd.grad(nnf.cross_entropy(g(u), y, reduction="sum"), u)
    return (grad == 0).all(dim=1)
