r"""Projected gradient attacks: empirical upper bounds on robust accuracy.

A certificate (:mod:`lipsort.certify`) says no perturbation within the radius can change a
prediction; an attack searches for one that does. On a certified point the attack must
fail — the test suite checks exactly that — and where it succeeds it proves the point is not
robust at that radius. Between the two lies the gap a tighter Lipschitz bound could close.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from ._checks import check_int
from .certify import _margin_values, margins

__all__ = ["pgd"]


def _per_sample(value, x: Tensor, name: str) -> Tensor:
    """A float or an (N,) tensor as an (N,) tensor in x's dtype and device."""
    v = torch.as_tensor(value, dtype=x.dtype, device=x.device).detach()
    if v.dim() == 0:
        v = v.expand(x.shape[0])
    if v.shape != (x.shape[0],):
        raise ValueError(
            f"{name} must be a float or a tensor of shape ({x.shape[0]},), "
            f"got shape {tuple(v.shape)}"
        )
    if bool((v < 0).any()) or bool(torch.isnan(v).any()):
        raise ValueError(f"{name} must be non-negative")
    return v


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape((-1,) + (1,) * (x.dim() - 1))


def _flat_norm(d: Tensor, ord: float) -> Tensor:
    return torch.linalg.vector_norm(d.reshape(d.shape[0], -1), ord=ord, dim=1)


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


# --------------------------------------------------------------------------- torchattacks

__all__ += [
    "A8_PGD_SEARCH",
    "A9_PGD",
    "BCOP_PGD_MNIST",
    "CertificateViolation",
    "assert_no_attack_inside_certificate",
    "fgsm",
    "pgd_l2",
    "pgd_linf",
    "pgd_linf_search",
    "pgd_training_transform",
    "vanishing_gradients",
]

#: Anil et al. (2019), A9 (LNets ``train_pgd.py``, ``manual_pgd``): ℓ∞, ε 0.3, 40 steps of 0.01.
A9_PGD = {"eps": 0.3, "steps": 40, "step_size": 0.01}
#: Li et al. (2019), BCOP MNIST evaluation: ℓ2, ε 1.58, 200 steps of 0.01, random start.
BCOP_PGD_MNIST = {"eps": 1.58, "steps": 200, "step_size": 0.01}


class CertificateViolation(AssertionError):
    """An attack changed a prediction inside its certified radius: the Lipschitz bound is wrong."""


class _PixelModel(nn.Module):
    """``model((x − μ)/σ)`` for pixel inputs ``x`` given in any shape with ``N·D`` entries."""

    def __init__(self, model: nn.Module, shape: torch.Size, normalization, like: Tensor):
        super().__init__()
        self.model, self.shape = model, tuple(shape)
        self.mean = self.std = None
        if normalization is not None:
            mean, std = (
                torch.as_tensor(v, dtype=like.dtype, device=like.device) for v in normalization
            )
            if not bool((std > 0).all()):
                raise ValueError("normalization std must be positive")
            self.mean, self.std = mean, std

    def forward(self, u: Tensor) -> Tensor:
        x = u.reshape((u.shape[0],) + self.shape)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return self.model(x)


def _check_eps(eps, name: str = "eps") -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):
        raise ValueError(f"{name} must be a finite non-negative number, got {eps!r}")
    return float(eps)


def _check_pixels(x: Tensor, y: Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise TypeError("x must be a floating-point tensor of shape (N, ...)")
    if x.numel() and (float(x.min()) < 0 or float(x.max()) > 1):
        raise ValueError(
            f"torchattacks attacks pixel inputs in [0, 1], got values in [{float(x.min()):.4g}, "
            f"{float(x.max()):.4g}]; for a model that expects normalized inputs, pass the pixels "
            "and normalization=(mean, std)"
        )
    if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],) or y.is_floating_point():
        raise ValueError(f"y must hold {x.shape[0]} integer class indices")


def _torchattack(cls_name: str, model, x, y, normalization, **kwargs) -> Tensor:
    import torchattacks  # lazily: the library core imports only torch and numpy

    _check_pixels(x, y)
    wrapped = _PixelModel(model, x.shape[1:], normalization, x)
    attack = getattr(torchattacks, cls_name)(wrapped, **kwargs)
    attack.set_device(x.device)
    # torchattacks' ℓ2 steps view perturbations as (N, 1, 1, 1)-scaled images: flatten each
    # input to (1, 1, D) (norms are unchanged), and reshape back inside the wrapped model.
    flat = x.detach().reshape(x.shape[0], 1, 1, -1)
    # torchattacks puts the model in eval mode and leaves it there or in training mode
    # depending on its version: restore every module's own flag.
    modes = {m: m.training for m in model.modules()}
    try:
        return attack(flat, y).reshape(x.shape).detach()
    finally:
        for m, mode in modes.items():
            m.training = mode


def pgd_linf(model, x, y, eps: float = 0.3, steps: int = 40, step_size: float = 0.01,
             random_start: bool = True, normalization=None) -> Tensor:
    r"""ℓ∞ PGD of ``torchattacks`` (Madry et al., 2018): ascent on the cross-entropy,
    :math:`x \leftarrow \Pi(x + \alpha\,\mathrm{sign}\,\nabla_x)` in
    :math:`\{\|x - x_0\|_\infty \le \varepsilon\} \cap [0, 1]^D`; defaults are :data:`A9_PGD`.

    ``x`` holds pixels in [0, 1] of any shape ``(N, ...)`` (ε is in pixel units); a model that
    expects ``(x − μ)/σ`` gets ``normalization=(μ, σ)`` (floats or tensors broadcastable to one
    input). Random starts draw from torch's global generator. Returns the adversarial pixels.

    Example:
        >>> net = nn.Linear(4, 3)
        >>> x, y = torch.rand(5, 4), torch.randint(0, 3, (5,))
        >>> bool(((pgd_linf(net, x, y, eps=0.1) - x).abs().max() <= 0.1 + 1e-6))
        True
    """
    return _torchattack("PGD", model, x, y, normalization, eps=_check_eps(eps),
                        alpha=_check_eps(step_size, "step_size"), steps=_check_steps(steps),
                        random_start=random_start)


def pgd_l2(model, x, y, eps: float = 1.58, steps: int = 200, step_size: float = 0.01,
           random_start: bool = True, normalization=None) -> Tensor:
    r"""ℓ2 PGD of ``torchattacks``: normalized-gradient steps projected onto
    :math:`\{\|x - x_0\|_2 \le \varepsilon\} \cap [0, 1]^D`; defaults are :data:`BCOP_PGD_MNIST`.
    Inputs as in :func:`pgd_linf`.

    Example:
        >>> net = nn.Linear(4, 3)
        >>> x, y = torch.rand(5, 4), torch.randint(0, 3, (5,))
        >>> bool(((pgd_l2(net, x, y, eps=0.1, steps=5) - x).norm(dim=1).max() <= 0.1 + 1e-6))
        True
    """
    return _torchattack("PGDL2", model, x, y, normalization, eps=_check_eps(eps),
                        alpha=_check_eps(step_size, "step_size"), steps=_check_steps(steps),
                        random_start=random_start)


def fgsm(model, x, y, eps: float = 0.3, normalization=None) -> Tensor:
    r"""FGSM of ``torchattacks`` (Goodfellow et al., 2015): one step
    :math:`x_0 + \varepsilon\,\mathrm{sign}\,\nabla_x \mathrm{CE}`, clipped to [0, 1].
    Inputs as in :func:`pgd_linf`."""
    return _torchattack("FGSM", model, x, y, normalization, eps=_check_eps(eps))


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
    x, e, a, ys, xs = x0, _bcast(eps, x0), _bcast(alpha, x0), y, x0
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
            x = (xs + torch.maximum(torch.minimum(step - xs, e), -e)).clamp(0.0, 1.0)
    return found, dist


def pgd_linf_search(model, x, y, eps: float = 0.3, steps: int = 20, rel_step: float = 0.01 / 0.3,
                    search_steps: int = 5, normalization=None) -> tuple[Tensor, Tensor]:
    r"""The closest ℓ∞ error found by iterated FGSM with a search over ε: the authors' A8
    attack (foolbox 1.x ``ProjectedGradientDescentAttack``, ``binary_search=5``,
    ``iterations=20``); defaults are :data:`A8_PGD_SEARCH`.

    One run at radius ε starts from the clean input :math:`x_0` and takes ``steps`` steps
    :math:`x \leftarrow \mathrm{clip}_{[0,1]}igl(x_0 + \mathrm{clip}_{\pmarepsilon}(x +
    lpha\,\mathrm{sign}\,
abla_x \mathrm{CE} - x_0)igr)`, :math:`lpha` = ``rel_step``·ε,
    and stops at its first misclassified iterate (argmax ≠ label). The search runs at ε, 1.5ε,
    2.25ε, … until a run succeeds (at most ``search_steps`` runs), then bisects
    ``search_steps`` times between 0 and the last radius that succeeded. Every error found
    counts, as foolbox keeps the closest. With the default step a run at ε reaches at most
    :math:`	frac{2}{3}arepsilon`, so the search, not ε, sets the radii tried.

    Accuracy under this attack at radius r is ``(dist > r).mean()``: correct, and no error
    found within r. Inputs as in :func:`pgd_linf` (pixels in [0, 1], optional
    ``normalization=(μ, σ)``); the model runs in eval mode, every module's mode is restored.

    Returns:
        ``(x_adv, dist)``: per sample the closest error found and its ℓ∞ distance (float64);
        an input misclassified already is its own error at distance 0, and where nothing was
        found ``x_adv`` is the input and ``dist`` is ``inf``.

    Example:
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
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
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
    finally:
        for m, mode in modes.items():
            m.training = mode
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
        >>> net = nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.tensor([[300.0, 0.0], [-300.0, 0.0]]))
        ...     _ = net.bias.copy_(torch.tensor([-150.0, 150.0]))
        >>> vanishing_gradients(net, torch.tensor([[0.9, 0.5], [0.52, 0.5]]), torch.tensor([0, 0]))
        tensor([ True, False])
    """
    _check_pixels(x, y)
    g = _PixelModel(model, x.shape[1:], normalization, x)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.enable_grad():
            u = x.detach().reshape(len(x), -1).requires_grad_(True)
            (grad,) = torch.autograd.grad(nnf.cross_entropy(g(u), y, reduction="sum"), u)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return (grad == 0).all(dim=1)


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return steps


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


def _attacks_at(model, g, x, y, eps: float, norm: str, steps: int, normalization):
    """(name, adversarial inputs) of every attack of the ε-grid check, one after the other."""
    alpha = 2.5 * eps / steps
    attack = pgd_linf if norm == "linf" else pgd_l2
    yield (
        f"torchattacks PGD {norm} at eps={eps}",
        attack(model, x, y, eps, steps, alpha, True, normalization),
    )
    if norm == "linf":
        yield f"torchattacks FGSM at eps={eps}", fgsm(model, x, y, eps, normalization)
    yield (
        f"lipsort pgd {norm} at eps={eps}",
        pgd(g, x, y, eps, norm=norm, steps=steps, clamp=(0.0, 1.0)),
    )


def assert_no_attack_inside_certificate(
    model: nn.Module, x: Tensor, y: Tensor, lipschitz: float | Tensor | None = None,
    norm: str = "linf", eps=None, steps: int = 40, per_point_steps: int = 100,
    normalization=None, slack: float = 1e-3, batch_size: int = 500, search: dict | None = None,
) -> dict:
    r"""Attack every certified point inside its certificate and raise if one is flipped.

    The map attacked is :math:`g(x) = f((x - \mu)/\sigma)` on pixels ``x`` in [0, 1] (``f`` =
    ``model``; :math:`\mu, \sigma` = ``normalization`` if given), whose constant ``L`` is
    ``lipschitz`` if given, else ``lipschitz_upper_bound(model, norm) / min σ`` (a
    normalization multiplies the constant by :math:`1/\sigma`). Certified radii
    :math:`r_i` come from :func:`lipsort.certify.certified_radius`. Two checks:

    * per point (``per_point_steps > 0``): :func:`pgd` (margin loss) at each certified
      point's own radius :math:`(1 - \text{slack})\,r_i`;
    * for each ``eps`` (a float or a grid): ``torchattacks`` PGD in ``norm`` (``steps``
      steps of :math:`2.5\varepsilon/\text{steps}`, random start), FGSM (ℓ∞) and :func:`pgd` at
      ε, on every correctly classified point; those with :math:`(1-\text{slack})\,r_i > \varepsilon`
      must all resist;
    * with ``search`` (ℓ∞ only; keyword arguments of :func:`pgd_linf_search`, e.g.
      :data:`A8_PGD_SEARCH`): the closest error that search finds for every point, which must
      lie at or beyond :math:`(1-\text{slack})\,r_i`.

    ``slack`` keeps float32 rounding of the margins from counting as a violation; any real
    error of the bound (a missing √2 or σ) is far larger.

    Returns:
        ``{"n", "lipschitz", "radius"`` (float64, per point), ``"eps"``, ``"certified_acc"``
        (radius > ε), ``"attack_acc"`` (correct and no attack succeeded)``}``: the lower and
        upper bounds of robust accuracy at each ε; with ``search`` also ``"search_dist"`` (per
        point, float64) and ``"search_acc"`` (distance > ε), another upper bound.

    Raises:
        CertificateViolation: an attack flipped a certified point; the message names the
            attack, the sample, its radius and the perturbation's norm.
        ValueError: bad ``eps``, ``slack`` or pixels outside [0, 1].

    Example:
        >>> net = nn.Linear(2, 2)  # logits (x₁ − ½, ½ − x₁): ‖W‖∞ = 1, margins 2|x₁ − ½|
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        ...     _ = net.bias.copy_(torch.tensor([-0.5, 0.5]))
        >>> x, y = torch.tensor([[0.9, 0.5], [0.2, 0.5]]), torch.tensor([0, 1])
        >>> report = assert_no_attack_inside_certificate(net, x, y, eps=[0.1, 0.35, 0.5], steps=10)
        >>> [round(r, 6) for r in report["radius"].tolist()]  # the distances to x₁ = ½: tight
        [0.4, 0.3]
        >>> report["certified_acc"], report["attack_acc"]
        ([1.0, 0.5, 0.0], [1.0, 0.5, 0.0])
    """
    from .certify import certified_radius, lipschitz_upper_bound

    _check_pixels(x, y)
    grid = [] if eps is None else [eps] if isinstance(eps, (int, float)) else list(eps)
    grid = [_check_eps(e) for e in grid]
    if not 0 <= slack < 1:
        raise ValueError(f"slack must lie in [0, 1), got {slack!r}")
    if search is not None and norm != "linf":
        raise ValueError(f"search is an ℓ∞ attack, got norm={norm!r}")
    g = _PixelModel(model, x.shape[1:], normalization, x)
    if lipschitz is None:
        lipschitz = float(lipschitz_upper_bound(model, norm))
        if g.std is not None:
            lipschitz /= float(g.std.min())
    was_training = model.training
    model.eval()
    order = float("inf") if norm == "linf" else 2.0
    try:
        with torch.no_grad():
            parts = zip(x.split(batch_size), y.split(batch_size))
            radius = torch.cat([certified_radius(g(a), b, lipschitz, norm) for a, b in parts])
            radius = radius.to(torch.float64)
        safe = radius * (1 - slack)

        def flipped(x_adv: Tensor, idx: Tensor) -> Tensor:
            with torch.no_grad():
                return margins(g(x_adv), y[idx]) <= 0

        def check(name: str, x_adv: Tensor, idx: Tensor, at: Tensor, bad: Tensor | None = None) -> Tensor:
            bad = flipped(x_adv, idx) if bad is None else bad
            dist = _flat_norm((x_adv - x[idx]).to(torch.float64), order)
            inside = bad & (dist < safe[idx]) & (at < safe[idx])
            if bool(inside.any()):
                k = int(inside.nonzero()[0])
                raise CertificateViolation(
                    f"{name} flipped {int(inside.sum())} certified point(s); e.g. sample "
                    f"{int(idx[k])}: certified radius {float(radius[idx[k]]):.6g} ({norm}, L = "
                    f"{lipschitz:.6g}) but the input at distance {float(dist[k]):.6g} is "
                    f"misclassified. The Lipschitz bound does not hold for this model (an "
                    f"unbounded layer, an input normalization not divided out?)"
                )
            return bad

        if per_point_steps:
            idx = (radius > 0).nonzero().flatten()
            for part in idx.split(batch_size):
                x_adv = pgd(g, x[part], y[part], safe[part].to(x.dtype), norm=norm,
                            steps=per_point_steps, clamp=(0.0, 1.0))
                check("PGD at each point's radius", x_adv, part, torch.zeros_like(safe[part]))
        certified, robust = [], []
        for e in grid:
            idx = (radius > 0).nonzero().flatten()
            survived = torch.zeros(len(x), dtype=torch.bool)
            for part in idx.split(batch_size):
                at = torch.full((len(part),), e, dtype=torch.float64, device=radius.device)
                ok = torch.ones(len(part), dtype=torch.bool)
                xs, ys = x[part], y[part]
                if e > 0:
                    for name, x_adv in _attacks_at(model, g, xs, ys, e, norm, steps, normalization):
                        ok &= ~check(name, x_adv, part, at).cpu()
                survived[part.cpu()] = ok
            certified.append(float((radius > e).to(torch.float64).mean()))
            robust.append(float(survived.to(torch.float64).mean()))
        report = {"n": len(x), "lipschitz": float(lipschitz), "radius": radius, "eps": grid,
                  "certified_acc": certified, "attack_acc": robust}
        if search is not None:
            dist = []
            for part in torch.arange(len(x), device=x.device).split(batch_size):
                x_adv, d = pgd_linf_search(model, x[part], y[part], normalization=normalization, **search)
                # Judged by the search's own criterion (argmax ≠ label), at its distance.
                check("PGD with the ε search", x_adv, part, torch.zeros_like(d), torch.isfinite(d))
                dist.append(d)
            report["search_dist"] = dist = torch.cat(dist)
            report["search_acc"] = [float((dist > e).to(torch.float64).mean()) for e in grid]
    finally:
        model.train(was_training)
    return report
