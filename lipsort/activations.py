"""GroupSort activations as modules (chapter 02).

All three permute units within groups: norm-preserving and gradient-norm-preserving, hence
1-Lipschitz in every p-norm. They keep the number of units.
"""

from __future__ import annotations

import torch  # noqa: F401  (the doctests use it)
from torch import Tensor, nn

from . import functional as F
from ._checks import check_int

__all__ = ["GroupSort", "MaxMin", "FullSort"]


class GroupSort(nn.Module):
    """Sort groups of ``group_size`` consecutive units along ``dim`` (largest first).

    ``group_size`` is the size of each group (not the number of groups) and must divide the
    number of units; ``GroupSort(2)`` is :class:`MaxMin`.

    Example:
        >>> GroupSort(3)(torch.tensor([[1., 2., 3., 6., 5., 4.]]))
        tensor([[3., 2., 1., 6., 5., 4.]])
    """

    def __init__(self, group_size: int = 2, dim: int = 1):
        super().__init__()
        check_int(group_size, "group_size")
        self.group_size = group_size
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return F.group_sort(x, self.group_size, self.dim)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, dim={self.dim}"


class MaxMin(nn.Module):
    """Pairwise ``(max, min)`` of consecutive units along ``dim`` (GroupSort with groups of 2).

    Example:
        >>> MaxMin()(torch.tensor([[0., 1., 5., -5.]]))
        tensor([[ 1.,  0.,  5., -5.]])
    """

    def __init__(self, dim: int = 1):
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return F.max_min(x, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class FullSort(nn.Module):
    """Sort all units along ``dim`` (GroupSort with one group).

    Example:
        >>> FullSort()(torch.tensor([[0., 2., 1.]]))
        tensor([[2., 1., 0.]])
    """

    def __init__(self, dim: int = 1):
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return F.full_sort(x, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
