"""Network builders shared by the chapters: fully connected nets whose Lipschitz constant is
controlled layer by layer (Lip(f∘g) ≤ Lip(f)·Lip(g), chapter 01)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ._checks import check_int
from .activations import FullSort, GroupSort, MaxMin
from .certify import register_lipschitz_bound

__all__ = ["mlp", "Scale", "ACTIVATIONS", "CONSTRAINTS"]


class Abs(nn.Module):
    """Elementwise ``|x|``: 1-Lipschitz and gradient-norm preserving, but not monotone."""

    def forward(self, x):
        return x.abs()


register_lipschitz_bound(Abs, lambda module, norm: 1.0)


class Scale(nn.Module):
    r"""Multiply by a fixed factor: :math:`x \mapsto c\,x`, Lipschitz constant :math:`|c|` in every norm.

    Anil et al. (2019) put one after every linear layer to give a 1-Lipschitz network the
    constant :math:`K` (``l_constant`` in cemanil/LNets), :math:`c = K^{1/n}` for ``n`` linear
    layers (:func:`mlp` with ``l_constant``): the ℓ∞ robustness net of their A8 has
    :math:`K = 1000` and a hinge margin scaled by :math:`K`. The factor is a buffer, not a
    parameter: it is saved with the model and never trained.

    Example:
        >>> from lipsort.certify import lipschitz_upper_bound
        >>> float(lipschitz_upper_bound(nn.Sequential(Scale(-3.0), nn.ReLU(), Scale(0.5))))
        1.5
    """

    def __init__(self, factor: float):
        super().__init__()
        factor = float(factor)
        if not math.isfinite(factor):
            raise ValueError(f"Scale factor must be finite, got {factor!r}")
        self.register_buffer("factor", torch.tensor(factor, dtype=torch.float64))

    def forward(self, x):
        return x * self.factor.to(x.dtype)

    def extra_repr(self) -> str:
        return f"factor={float(self.factor):g}"


register_lipschitz_bound(Scale, lambda module, norm: abs(float(module.factor)))


ACTIVATIONS = ("relu", "abs", "maxmin", "groupsort", "fullsort")
CONSTRAINTS = ("bjorck", "spectral", "linf", None)
INITS = ("torch", "lnets")


def _lnets_init(layer: nn.Linear) -> nn.Linear:
    r"""LNets' ``DenseLinear.reset_parameters``: an orthogonal weight scaled by the gain
    :math:`1/\sqrt{\text{fan-in}}` (every singular value :math:`1/\sqrt{\text{fan-in}}`), then the bias
    uniform in :math:`\pm 1/\sqrt{\text{fan-in}}`."""
    bound = 1.0 / math.sqrt(layer.in_features)
    with torch.no_grad():
        nn.init.orthogonal_(layer.weight, gain=bound)
        if layer.bias is not None:
            layer.bias.uniform_(-bound, bound)
    return layer


def _activation(name: str, group_size: int | None) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "abs":
        return Abs()
    if name == "maxmin":
        return MaxMin()
    if name == "fullsort":
        return FullSort()
    if name == "groupsort":
        if group_size is None:
            raise ValueError("activation='groupsort' needs group_size (the size of each group)")
        return GroupSort(group_size)
    raise ValueError(f"unknown activation {name!r}; choose one of {ACTIVATIONS}")


def _constrain(layer: nn.Linear, constraint: str | None, kwargs: dict) -> nn.Linear:
    from . import parametrizations as P

    if constraint is None:
        if kwargs:
            raise ValueError(f"unconstrained layers take no constraint options, got {sorted(kwargs)}")
        return layer
    builders = {"bjorck": P.bjorck_orthonormal, "spectral": P.spectral_normalized, "linf": P.linf_projected}
    if constraint not in builders:
        raise ValueError(f"unknown constraint {constraint!r}; choose one of {CONSTRAINTS}")
    return builders[constraint](layer, **kwargs)


def mlp(
    sizes: Sequence[int],
    activation: str = "maxmin",
    constraint: str | None = "bjorck",
    group_size: int | None = None,
    *,
    l_constant: float | None = None,
    init: str = "torch",
    **constraint_kwargs,
) -> nn.Sequential:
    r"""Fully connected network ``sizes[0] → sizes[1] → … → sizes[-1]``.

    Every linear layer carries ``constraint`` ("bjorck": orthonormal, "spectral": ‖W‖₂ ≈ 1 by
    power iteration, "linf": ‖W‖∞ ≤ 1, or None); ``activation`` sits between layers, none after
    the last. ``constraint_kwargs`` go to the parametrization (e.g. ``n_iters=20``).
    ``l_constant`` ``K > 0`` adds a :class:`Scale` by :math:`K^{1/n}` after each of the ``n``
    linear layers (LNets' ``FCNet``), so that 1-Lipschitz layers make a ``K``-Lipschitz net.
    ``init`` is the linear layers' initialization before their constraint: ``"torch"``
    (``nn.Linear``'s) or ``"lnets"`` (the authors': orthogonal with gain :math:`1/\sqrt{\text{fan-in}}`).

    Example:
        >>> net = mlp([2, 8, 8, 1], activation="groupsort", group_size=4, constraint=None)
        >>> [type(m).__name__ for m in net]
        ['Linear', 'GroupSort', 'Linear', 'GroupSort', 'Linear']
    """
    sizes = list(sizes)
    if len(sizes) < 2:
        raise ValueError(f"sizes must list at least two positive integers (input, ..., output), got {sizes}")
    sizes = [check_int(s, "each size") for s in sizes]
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}")
    if l_constant is not None and not (l_constant > 0 and math.isfinite(l_constant)):
        raise ValueError(f"l_constant must be a positive finite number, got {l_constant!r}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
    per_layer = None if l_constant is None else float(l_constant) ** (1.0 / (len(sizes) - 1))
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = nn.Linear(n_in, n_out)
        if init == "lnets":
            _lnets_init(linear)
        layers.append(_constrain(linear, constraint, dict(constraint_kwargs)))
        if per_layer is not None:
            layers.append(Scale(per_layer))
        if i < len(sizes) - 2:
            if activation in ("maxmin", "groupsort") and n_out % (group_size or 2):
                raise ValueError(
                    f"hidden width {n_out} is not divisible by the group size {group_size or 2} "
                    f"of activation {activation!r}"
                )
            layers.append(_activation(activation, group_size))
    return nn.Sequential(*layers)
