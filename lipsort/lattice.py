r"""Universality of MaxMin networks, made constructive in one dimension (chapter 02).

Anil et al. (2019) prove that 1-Lipschitz MaxMin networks with ``‖W‖∞ ≤ 1`` are dense in the
1-Lipschitz functions on a compact set, through a lattice form of the Stone–Weierstrass
theorem: the functions they compute are closed under pointwise ``max`` and ``min`` and can
interpolate any two points with values that respect the Lipschitz constraint. In one dimension
the argument becomes an explicit construction. A continuous piecewise-linear (PWL) function
with affine pieces :math:`\ell_1, \dots, \ell_m` is a *max of mins* of its pieces
(Ovchinnikov, 2002):

.. math:: f(x) = \max_{i} \min_{j \in S_i} \ell_j(x), \qquad
          S_i = \{\, j : \ell_j \ge \ell_i \text{ on } D_i \,\},

where :math:`D_i` is the interval on which :math:`f = \ell_i`. If :math:`f` is 1-Lipschitz,
every slope is in :math:`[-1, 1]`, so the pieces are rows of a first layer with
``‖W‖∞ ≤ 1``; MaxMin layers then compute the minima and the maximum by balanced binary trees,
and the linear layers between them only *select* units (one entry 1 per row, so
``‖W‖∞ = 1``). A unit that must cross a MaxMin layer unchanged is paired with a copy of
itself: ``MaxMin(v, v) = (v, v)``. The network equals :math:`f` exactly (up to the rounding
of the first affine layer), on the whole real line, and its Lipschitz bound
:math:`\prod_k \|W_k\|_\infty` is at most 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .activations import MaxMin

__all__ = ["LatticeForm", "lattice_pieces", "maxmin_network", "pwl_eval"]

# Relative tolerance of the Lipschitz check and of the comparisons between pieces: breakpoints
# given in floating point have slopes like 1 + 1e-16 that are 1 in exact arithmetic.
_RTOL = 1e-12


def _as_breakpoints(xs, ys) -> tuple[Tensor, Tensor]:
    xs = torch.as_tensor(xs, dtype=torch.float64).detach().cpu()
    ys = torch.as_tensor(ys, dtype=torch.float64).detach().cpu()
    if xs.dim() != 1 or ys.dim() != 1 or xs.shape != ys.shape:
        raise ValueError(
            f"xs and ys must be 1-D with the same length, got shapes {tuple(xs.shape)} and {tuple(ys.shape)}"
        )
    if xs.numel() < 2:
        raise ValueError(f"need at least two breakpoints to define a piecewise-linear function, got {xs.numel()}")
    if not (torch.isfinite(xs).all() and torch.isfinite(ys).all()):
        raise ValueError("breakpoints must be finite (found inf or nan in xs or ys)")
    dx = xs[1:] - xs[:-1]
    if not bool((dx > 0).all()):
        k = int(torch.nonzero(dx <= 0)[0])
        raise ValueError(f"xs must be strictly increasing, but xs[{k}]={float(xs[k])} >= xs[{k + 1}]={float(xs[k + 1])}")
    return xs, ys


def pwl_eval(xs, ys, x: Tensor) -> Tensor:
    """The piecewise-linear interpolant of the breakpoints ``(xs, ys)`` at ``x``.

    Outside ``[xs[0], xs[-1]]`` the first and last pieces are extended linearly (the network
    of :func:`maxmin_network` does the same). Computed in float64.

    Example:
        >>> pwl_eval([-1., 0., 1.], [1., 0., 1.], torch.tensor([-2., 0.5, 3.]))
        tensor([2.0000, 0.5000, 3.0000], dtype=torch.float64)
    """
    xs, ys = _as_breakpoints(xs, ys)
    x = torch.as_tensor(x, dtype=torch.float64)
    slopes = (ys[1:] - ys[:-1]) / (xs[1:] - xs[:-1])
    k = torch.searchsorted(xs[1:-1].contiguous(), x.contiguous(), right=True)
    return ys[k] + slopes[k] * (x - xs[k])


@dataclass(frozen=True)
class LatticeForm:
    r"""A max-min (lattice) representation :math:`f(x) = \max_i \min_{j \in S_i} (a_j x + b_j)`.

    Attributes:
        slopes: ``(m,)`` float64 slopes :math:`a_j` of the affine pieces, all in ``[-1, 1]``.
        intercepts: ``(m,)`` float64 intercepts :math:`b_j`.
        sets: the index sets :math:`S_i` (tuples of piece indices), none containing another.
        knots: the breakpoints where consecutive pieces meet (the interior ``xs``).
    """

    slopes: Tensor
    intercepts: Tensor
    sets: tuple[tuple[int, ...], ...]
    knots: Tensor

    def pieces(self, x: Tensor) -> Tensor:
        """Values of every affine piece at ``x``: shape ``x.shape + (m,)``."""
        x = torch.as_tensor(x, dtype=torch.float64)
        return x[..., None] * self.slopes + self.intercepts

    def group_minima(self, x: Tensor) -> Tensor:
        r"""The inner minima :math:`\min_{j \in S_i} \ell_j(x)`: shape ``x.shape + (n_sets,)``."""
        p = self.pieces(x)
        return torch.stack([p[..., list(s)].amin(-1) for s in self.sets], dim=-1)

    def __call__(self, x: Tensor) -> Tensor:
        """Evaluate the max of mins directly (the reference the network must match)."""
        return self.group_minima(x).amax(-1)


def lattice_pieces(xs, ys) -> LatticeForm:
    r"""Affine pieces and max-min index sets of a 1-Lipschitz piecewise-linear function.

    The function interpolates the breakpoints ``(xs[k], ys[k])`` linearly and extends its first
    and last pieces to the whole line. Collinear breakpoints are merged; piece ``i`` lives on
    :math:`D_i = [t_i, t_{i+1}]` (unbounded for the first and last piece) and
    :math:`S_i = \{j : \ell_j \ge \ell_i \text{ on } D_i\}`; sets containing another set are
    dropped, since their minimum is dominated.

    Args:
        xs: strictly increasing breakpoints, at least two.
        ys: values at the breakpoints.

    Raises:
        ValueError: if a segment has slope of magnitude above 1 (the target is not 1-Lipschitz),
            or if the breakpoints are malformed.

    Example:
        >>> form = lattice_pieces([-1., 0., 1.], [1., 0., 1.])   # |x| = max(-x, x)
        >>> form.slopes.tolist(), form.sets
        ([-1.0, 1.0], ((0,), (1,)))
        >>> lattice_pieces([0., 1.], [0., 2.])
        Traceback (most recent call last):
        ...
        ValueError: the target is not 1-Lipschitz: segment 0 on [0, 1] has slope 2 (|slope| must be <= 1)
    """
    xs, ys = _as_breakpoints(xs, ys)
    slopes = (ys[1:] - ys[:-1]) / (xs[1:] - xs[:-1])
    bad = slopes.abs() > 1 + _RTOL
    if bool(bad.any()):
        k = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"the target is not 1-Lipschitz: segment {k} on [{float(xs[k]):g}, {float(xs[k + 1]):g}] "
            f"has slope {float(slopes[k]):g} (|slope| must be <= 1)"
        )
    # Merge exactly collinear neighbours so that consecutive pieces are distinct lines. Only
    # exact equality: merging nearly equal slopes would move the function by more than the
    # round-off tolerance of the domination test below.
    keep = [0]
    for k in range(1, len(slopes)):
        if float(slopes[k]) != float(slopes[keep[-1]]):
            keep.append(k)
    knots = xs[[k for k in keep[1:]]]
    # Slopes within rounding of ±1 are set to ±1 exactly, so that ‖W‖∞ ≤ 1 holds exactly.
    a = slopes[keep].clamp(-1.0, 1.0)
    b = ys[keep] - a * xs[keep]
    m = len(keep)
    scale = 1 + ys.abs().max() + xs.abs().max()
    tol = 64 * torch.finfo(torch.float64).eps * float(scale)

    def dominates(j: int, i: int) -> bool:
        """Is ℓ_j ≥ ℓ_i on D_i? An affine gap is checked at finite ends and by slope at infinite ones."""
        ends = []
        if i > 0:
            ends.append(float(knots[i - 1]))
        elif a[j] > a[i]:  # D_0 extends to -∞: ℓ_j - ℓ_i must not decrease leftwards
            return False
        if i < m - 1:
            ends.append(float(knots[i]))
        elif a[j] < a[i]:  # D_{m-1} extends to +∞
            return False
        if not ends:  # a single piece: D_0 is the whole line
            return bool(a[j] == a[i]) and float(b[j] - b[i]) >= -tol
        return all(float((a[j] - a[i]) * t + (b[j] - b[i])) >= -tol for t in ends)

    sets = [tuple(j for j in range(m) if dominates(j, i)) for i in range(m)]
    # A set containing another has a smaller minimum everywhere: it never attains the max.
    minimal: list[tuple[int, ...]] = []
    for s in sets:
        if any(set(t) <= set(s) and t != s for t in sets) or s in minimal:
            continue
        minimal.append(s)
    return LatticeForm(slopes=a, intercepts=b, sets=tuple(minimal), knots=knots)


def maxmin_network(xs, ys=None, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    r"""Build, without training, a MaxMin network equal to a 1-Lipschitz PWL function.

    Layout: ``Linear(1, w₀)`` computes the affine pieces of every set :math:`S_i` (rows
    :math:`a_j \in [-1, 1]`, biases :math:`b_j`); then ``MaxMin`` layers alternate with
    bias-free selection layers (one 1 per row). The first ``⌈log₂ max|S_i|⌉`` MaxMin layers
    reduce each set to its minimum, the next ``⌈log₂ n_sets⌉`` reduce the minima to their
    maximum, and a last ``Linear(·, 1)`` reads the result. Units pair up inside a set; an odd
    one out is paired with a copy of itself, which MaxMin passes through unchanged. Every
    weight matrix has ``‖W‖∞ ≤ 1``, so the network is 1-Lipschitz in the ∞-norm (and, being
    scalar-in scalar-out, in every norm).

    Args:
        xs: breakpoints (see :func:`lattice_pieces`), or a :class:`LatticeForm`.
        ys: values at the breakpoints (omit when ``xs`` is a :class:`LatticeForm`).
        dtype: parameter dtype (float64 keeps the equality at rounding level).

    Example:
        >>> net = maxmin_network([-1., 0., 1.], [1., 0., 1.])   # |x|
        >>> x = torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None]
        >>> net(x).squeeze(1).tolist()
        [3.0, 2.0, 1.0, 0.0, 1.0, 2.0, 3.0]
        >>> [type(m).__name__ for m in net]
        ['Linear', 'MaxMin', 'Linear']
    """
    if isinstance(xs, LatticeForm):
        if ys is not None:
            raise ValueError("pass either a LatticeForm or breakpoints (xs, ys), not both")
        form = xs
    else:
        if ys is None:
            raise ValueError("maxmin_network needs the values ys at the breakpoints xs")
        form = lattice_pieces(xs, ys)

    # A source is ("piece", j) before the first linear layer, ("unit", k) afterwards.
    groups: list[list[tuple[str, int]]] = [[("piece", j) for j in s] for s in form.sets]
    layers: list[nn.Module] = []
    in_width = 1

    def linear(sources: list[tuple[str, int]], n_in: int) -> nn.Linear:
        lin = nn.Linear(n_in, len(sources), bias=True, dtype=dtype)
        with torch.no_grad():
            lin.weight.zero_()
            lin.bias.zero_()
            for r, (kind, idx) in enumerate(sources):
                if kind == "piece":
                    lin.weight[r, 0] = form.slopes[idx]
                    lin.bias[r] = form.intercepts[idx]
                else:
                    lin.weight[r, idx] = 1.0
        return lin

    def reduce_level(groups: list[list[tuple[str, int]]], take_min: bool):
        """One MaxMin level: pair the members of each group, keep the min (or max) of each pair."""
        nonlocal in_width
        rows: list[tuple[str, int]] = []
        new_groups = []
        for g in groups:
            new = []
            for p in range(0, len(g), 2):
                a, b = g[p], g[p + 1] if p + 1 < len(g) else g[p]  # odd one out: pair with itself
                pair = len(rows) // 2
                rows += [a, b]
                new.append(("unit", 2 * pair + (1 if take_min else 0)))  # MaxMin -> (max, min)
            new_groups.append(new)
        layers.append(linear(rows, in_width))
        layers.append(MaxMin())
        in_width = len(rows)
        return new_groups

    while any(len(g) > 1 for g in groups):
        groups = reduce_level(groups, take_min=True)
    top = [[g[0] for g in groups]]
    while len(top[0]) > 1:
        top = reduce_level(top, take_min=False)
    layers.append(linear(top[0], in_width))
    return nn.Sequential(*layers)
