r"""Robustness certificates from Lipschitz bounds.

If every logit difference of a classifier changes slowly, a large enough margin cannot be
overturned by a small perturbation. This module computes

* :func:`certified_radius` / :func:`certified_accuracy`: the radius guaranteed by a margin
  and a Lipschitz constant,
* :func:`lipschitz_upper_bound`: a rigorous constant for a network, the product of exact
  layer norms (Lip(f∘g) ≤ Lip(f)·Lip(g)), extensible through
  :func:`register_lipschitz_bound`,
* :func:`empirical_lipschitz`: a *lower* bound from gradient norms at sample points, in the
  same units, so that ``empirical_lipschitz(model, x) ≤ lipschitz_upper_bound(model)``.

Conventions. ``L`` is a bound on the network as a map from inputs to logits,
``‖f(x) − f(x')‖ ≤ L‖x − x'‖`` in the chosen norm (ℓ2 → ℓ2, or ℓ∞ → ℓ∞ which is a bound of
each logit in ℓ∞). For a single output (a binary score whose sign is the prediction) the
margin is ``y·f`` with ``y = ±1`` and its constant is ``L`` itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import functional as F
from ._checks import binary_labels
from .activations import FullSort, GroupSort, MaxMin

__all__ = [
    "certified_accuracy",
    "certified_radius",
    "empirical_lipschitz",
    "lipschitz_upper_bound",
    "margins",
    "register_lipschitz_bound",
]

_NORMS = ("l2", "linf")


def _check_norm(norm: str) -> str:
    if norm not in _NORMS:
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    return norm


def _pair_factor(norm: str) -> float:
    """``c`` with ``Lip(f_i − f_j) ≤ c·L``: ‖e_i − e_j‖₂ = √2 in ℓ2, ‖e_i − e_j‖₁ = 2 in ℓ∞."""
    return math.sqrt(2.0) if norm == "l2" else 2.0


def margins(logits: Tensor, labels: Tensor) -> Tensor:
    r"""Per-sample margin :math:`M = f_y - \max_{j \ne y} f_j` (``y·f`` for a single score).

    Positive iff the sample is correctly classified (ties count as errors).

    Example:
        >>> margins(torch.tensor([[3., 1., 2.], [0., 1., 0.]]), torch.tensor([0, 0]))
        tensor([ 1., -1.])
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError("logits must be a floating-point torch.Tensor")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if logits.dim() == 1 or (logits.dim() == 2 and logits.shape[1] == 1):
        n = logits.shape[0]
        pos = binary_labels(labels, n)
        f = logits.reshape(n)
        return torch.where(pos, f, -f)
    if logits.dim() != 2:
        raise ValueError(
            f"logits must have shape (N,), (N, 1) or (N, C), got {tuple(logits.shape)}"
        )
    n, c = logits.shape
    if labels.shape != (n,):
        raise ValueError(
            f"labels must have shape ({n},) for logits of shape {tuple(logits.shape)}, "
            f"got {tuple(labels.shape)}"
        )
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= c):
        raise ValueError(
            f"class indices must lie in [0, {c}), "
            f"got values in [{int(labels.min())}, {int(labels.max())}]"
        )
    return _margin_values(logits, labels)


def _margin_values(logits: Tensor, labels: Tensor) -> Tensor:
    """:func:`margins` without the checks, for labels already validated (attack loops)."""
    if logits.dim() == 1 or logits.shape[1] == 1:
        f = logits.reshape(-1)
        return torch.where(labels.reshape(-1) > 0, f, -f)
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return true - others.amax(1)


def _check_lipschitz(lipschitz) -> None:
    value = float(lipschitz)
    if not value > 0 or math.isinf(value):
        raise ValueError(f"lipschitz must be a positive finite number, got {value!r}")


def certified_radius(
    logits: Tensor, labels: Tensor, lipschitz: float | Tensor = 1.0, norm: str = "l2"
) -> Tensor:
    r"""Radius within which no perturbation can change the prediction.

    With margin :math:`M = f_y(x) - \max_{j\ne y} f_j(x)` and ``L`` as in the module notes:

    .. math::
        r_2 = \frac{M}{\sqrt2\,L}, \qquad r_\infty = \frac{M}{2L}.

    Proof sketch (ℓ2). For any pair :math:`i, j`, :math:`f_i - f_j = (e_i - e_j)^\top f` and
    :math:`\|e_i - e_j\|_2 = \sqrt2`, so
    :math:`|(f_i - f_j)(x) - (f_i - f_j)(x')| \le \sqrt2\,L\,\|x - x'\|_2`. If
    :math:`\|x - x'\|_2 < r_2` then for every :math:`j \ne y`,
    :math:`(f_y - f_j)(x') > (f_y - f_j)(x) - M \ge 0`: class ``y`` still wins. In ℓ∞ each
    logit moves by at most :math:`L\|x - x'\|_\infty`, a difference by twice that. For a
    single score the margin is :math:`y f` and the radius :math:`y f / L` in both norms.

    A misclassified sample gets a radius ≤ 0 (a tie gives 0).

    Args:
        logits: ``(N, C)`` logits, or ``(N,)`` / ``(N, 1)`` binary scores.
        labels: ``(N,)`` class indices, or binary labels in {0, 1} or {−1, +1}.
        lipschitz: the network's constant ``L`` (float or 0-dim tensor), e.g. from
            :func:`lipschitz_upper_bound`.
        norm: ``"l2"`` or ``"linf"``.

    Example:
        >>> certified_radius(torch.tensor([[3., 1.], [0., 2.]]), torch.tensor([0, 0]), 2.0)
        tensor([ 0.7071, -0.7071])
    """
    _check_norm(norm)
    _check_lipschitz(lipschitz)
    m = margins(logits, labels)
    lip = torch.as_tensor(lipschitz, dtype=m.dtype, device=m.device)
    if logits.dim() == 1 or logits.shape[1] == 1:
        return m / lip
    return m / (_pair_factor(norm) * lip)


def certified_accuracy(
    logits: Tensor,
    labels: Tensor,
    eps: float | Sequence[float] | Tensor,
    lipschitz: float | Tensor = 1.0,
    norm: str = "l2",
) -> float | Tensor:
    """Fraction of samples whose certified radius is strictly larger than ``eps``.

    At ``eps = 0`` this is the clean accuracy (ties count as errors); it does not increase
    with ``eps``.

    Args:
        logits, labels, lipschitz, norm: as in :func:`certified_radius`.
        eps: a float (returns a float) or a sequence / 1-D tensor of radii (returns a tensor
            of accuracies, one per radius).

    Example:
        >>> logits, y = torch.tensor([[3., 1.], [2., 1.], [0., 2.]]), torch.tensor([0, 0, 0])
        >>> certified_radius(logits, y)
        tensor([ 1.4142,  0.7071, -1.4142])
        >>> certified_accuracy(logits, y, [0.0, 0.5, 1.0, 1.5])
        tensor([0.6667, 0.6667, 0.3333, 0.0000])
        >>> round(certified_accuracy(logits, y, 0.0), 4)
        0.6667
    """
    radius = certified_radius(logits, labels, lipschitz, norm)
    if radius.numel() == 0:
        raise ValueError("certified_accuracy needs at least one sample")
    scalar = isinstance(eps, (int, float)) or (isinstance(eps, torch.Tensor) and eps.dim() == 0)
    e = torch.as_tensor(eps, dtype=radius.dtype, device=radius.device)
    if e.dim() > 1:
        raise ValueError(
            f"eps must be a float or a 1-D sequence of radii, got shape {tuple(e.shape)}"
        )
    if bool((e < 0).any()) or bool(torch.isnan(e).any()):
        bad = e[(e < 0) | torch.isnan(e)].tolist()
        raise ValueError(f"eps must be a non-negative radius (not NaN), got {bad}")
    acc = (radius[None, :] > e.reshape(-1, 1)).to(radius.dtype).mean(1)
    return float(acc[0]) if scalar else acc


# ---------------------------------------------------------------------------------------
# Upper bounds: a registry of per-layer constants.

BoundFn = Callable[[nn.Module, str], "float | Tensor"]
_REGISTRY: dict[type, BoundFn] = {}


def register_lipschitz_bound(cls: type, fn: BoundFn) -> None:
    """Teach :func:`lipschitz_upper_bound` the constant of a layer type.

    ``fn(module, norm)`` returns a rigorous upper bound of the layer's Lipschitz constant in
    ``norm`` ("l2" or "linf") as a float or a 0-dim tensor. Matching is on the exact class
    (a subclass may change ``forward``, so it must be registered itself); parametrized
    modules (``torch.nn.utils.parametrize``) match their original class.

    Example:
        >>> class Halve(nn.Module):
        ...     def forward(self, x):
        ...         return x / 2
        >>> register_lipschitz_bound(Halve, lambda module, norm: 0.5)
        >>> float(lipschitz_upper_bound(nn.Sequential(Halve(), nn.ReLU(), Halve())))
        0.25
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"cls must be an nn.Module subclass, got {cls!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable as fn(module, norm), got {fn!r}")
    _REGISTRY[cls] = fn


def _module_class(module: nn.Module) -> type:
    cls = type(module)
    # parametrize swaps the class for a generated subclass "Parametrized<Name>(cls)".
    if parametrize.is_parametrized(module):
        cls = cls.__bases__[0]
    return cls


def _linear_bound(module: nn.Linear, norm: str) -> Tensor:
    # The effective weight (through any parametrization). The norm is computed in float64:
    # its rounding (~1e-16 relative) is then negligible next to the precision of float32
    # weights, whose exact norm it measures (e.g. a float32 row sum that rounds to the
    # ℓ1 radius can exceed it by ~1e-7; the float64 sum sees it).
    w = module.weight.detach().to(torch.float64)
    return F.operator_norm(w, 2 if norm == "l2" else "inf")


def _one(module: nn.Module, norm: str) -> float:
    return 1.0


def _leaky_relu_bound(module: nn.LeakyReLU, norm: str) -> float:
    return max(1.0, abs(float(module.negative_slope)))


for _cls in (GroupSort, MaxMin, FullSort, nn.ReLU, nn.Tanh, nn.Identity, nn.Flatten, nn.Dropout):
    register_lipschitz_bound(_cls, _one)
register_lipschitz_bound(nn.Linear, _linear_bound)
register_lipschitz_bound(nn.LeakyReLU, _leaky_relu_bound)
register_lipschitz_bound(nn.Sigmoid, lambda module, norm: 0.25)


def lipschitz_upper_bound(model: nn.Module, norm: str = "l2") -> Tensor:
    r"""Rigorous Lipschitz constant of a network: the product of its layers' exact constants.

    .. math:: \mathrm{Lip}(f_K \circ \dots \circ f_1) \le \prod_k \mathrm{Lip}(f_k),

    with ``‖W‖₂`` (largest singular value, from an SVD) or ``‖W‖∞`` (largest row ℓ1 norm)
    for each ``nn.Linear`` — its *effective* weight ``module.weight``, so constrained layers
    are measured as they compute — 1 for GroupSort/MaxMin/FullSort, ReLU, Tanh, Identity,
    Flatten and Dropout (the eval-mode map), ``max(1, |slope|)`` for LeakyReLU and 1/4 for
    Sigmoid. ``nn.Sequential`` is traversed recursively; other layers can be added with
    :func:`register_lipschitz_bound`. Never an estimate: power iteration would give a lower
    bound, useless for a certificate. Biases do not matter.

    Returns:
        A 0-dim float64 tensor (no gradient).

    Raises:
        TypeError: for a layer whose constant is unknown, naming its type.

    Example:
        >>> lin = nn.Linear(3, 2)
        >>> with torch.no_grad():
        ...     _ = lin.weight.copy_(torch.tensor([[3., 0., 0.], [0., -4., 1.]]))
        >>> float(lipschitz_upper_bound(nn.Sequential(lin, nn.ReLU())))  # doctest: +ELLIPSIS
        4.123...
        >>> float(lipschitz_upper_bound(nn.Sequential(lin, nn.Sigmoid()), norm="linf"))
        1.25
    """
    _check_norm(norm)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    with torch.no_grad():
        return _bound(model, norm, path=type(model).__name__)


def _bound(module: nn.Module, norm: str, path: str) -> Tensor:
    if type(module) is nn.Sequential:
        total = torch.ones((), dtype=torch.float64)
        for name, child in module.named_children():
            b = _bound(child, norm, f"{path}.{name}")
            total = total * b.to(total.device)
        return total
    cls = _module_class(module)
    fn = _REGISTRY.get(cls)
    if fn is None:
        raise TypeError(
            f"cannot bound the Lipschitz constant of layer {path} of type "
            f"{cls.__module__}.{cls.__qualname__}; "
            f"register one with lipsort.certify.register_lipschitz_bound({cls.__name__}, fn)"
        )
    value = torch.as_tensor(fn(module, norm), dtype=torch.float64).detach()
    if value.dim() != 0 or not bool(value >= 0):
        raise ValueError(
            f"the bound registered for {cls.__name__} returned {value!r}, not a non-negative scalar"
        )
    return value.cpu()


# ---------------------------------------------------------------------------------------
# Lower bounds: gradient norms at sample points.


def _jacobian_rows(model: nn.Module, x: Tensor) -> Tensor:
    """Per-sample Jacobians ``(N, C, D)`` of ``model`` at ``x`` by one backward pass per output.

    Samples are assumed independent (true for any model in eval mode), so the gradient of the
    batch sum of output ``k`` is the stack of the per-sample gradients of ``f_k``.
    """
    with torch.enable_grad():
        xr = x.detach().clone().requires_grad_(True)
        out = model(xr)
        if not isinstance(out, torch.Tensor) or out.shape[:1] != x.shape[:1]:
            raise ValueError(f"model output must be a tensor with batch dimension {x.shape[0]}")
        out = out.reshape(x.shape[0], -1)
        rows = []
        for k in range(out.shape[1]):
            (g,) = torch.autograd.grad(
                out[:, k].sum(), xr, retain_graph=k + 1 < out.shape[1], allow_unused=True
            )
            rows.append(torch.zeros_like(xr) if g is None else g)
    return torch.stack(rows, 1).reshape(x.shape[0], out.shape[1], -1).detach()


def empirical_lipschitz(
    model: nn.Module, x: Tensor, norm: str = "l2", chunk_size: int = 256
) -> Tensor:
    r"""A *lower* bound of the certificate constant from gradients at the points ``x``.

    For ``C ≥ 2`` outputs:

    .. math::
        \hat L = \max_{n} \max_{i < j} \frac{\|\nabla_x (f_i - f_j)(x_n)\|_q}{c},
        \qquad (q, c) = (2, \sqrt2) \text{ in ℓ2}, \quad (1, 2) \text{ in ℓ∞}

    (``q`` is the dual norm: the ℓ∞-Lipschitz constant of a scalar function is the sup of
    its gradient's ℓ1 norm). Since :math:`\mathrm{Lip}(f_i - f_j) \le c\,L`, this is at
    most any valid ``L``, in particular :func:`lipschitz_upper_bound`; the gap between the
    two measures how loose the product bound is (or, for gradient-norm-preserving networks,
    how close to tight). For a single output it is :math:`\max_n \|\nabla f(x_n)\|_q`.

    Jacobians come from batched autograd (one backward pass per output, ``chunk_size``
    samples at a time), which works for any module; samples must be processed independently
    (put the model in eval mode). Parameters' ``.grad`` are not touched.

    Returns:
        A 0-dim tensor in the model's output dtype.

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = lin.weight.copy_(torch.tensor([[1., 0.], [0., -1.]]))
        >>> float(empirical_lipschitz(lin, torch.randn(4, 2)))  # ‖(1, 1)‖₂ / √2
        1.0
    """
    _check_norm(norm)
    if (
        not isinstance(x, torch.Tensor)
        or not x.is_floating_point()
        or x.dim() < 1
        or x.shape[0] == 0
    ):
        raise ValueError("x must be a non-empty floating-point batch of inputs")
    q = 2 if norm == "l2" else 1
    best = None
    for start in range(0, x.shape[0], chunk_size):
        jac = _jacobian_rows(model, x[start : start + chunk_size])
        c = jac.shape[1]
        if c == 1:
            vals = torch.linalg.vector_norm(jac[:, 0], ord=q, dim=-1)
        else:
            i, j = torch.triu_indices(c, c, offset=1, device=jac.device)
            diffs = jac[:, i] - jac[:, j]
            vals = torch.linalg.vector_norm(diffs, ord=q, dim=-1) / _pair_factor(norm)
        m = vals.max()
        best = m if best is None else torch.maximum(best, m)
    return best
