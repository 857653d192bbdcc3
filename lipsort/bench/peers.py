"""Peer implementations the benchmarks (and the tests) compare the library against."""

from __future__ import annotations

import importlib
import importlib.metadata

import torch

__all__ = ["reference_bjorck", "naive_group_sort", "deel_torchlip"]


def reference_bjorck(w: torch.Tensor, n_iters: int = 20, beta: float = 0.5) -> torch.Tensor:
    r"""Order-1 Björck as in the reference code: Frobenius pre-scale, full ``WᵀW`` Gram.

    :math:`W_0 = W / \|W\|_F`, :math:`W_{k+1} = (1 + \beta) W_k - \beta W_k (W_k^\top W_k)`.
    The Gram matrix is always ``n × n`` (``n`` the number of columns), even for wide matrices.

    Example:
        >>> w = reference_bjorck(torch.randn(6, 4, dtype=torch.float64), 40)
        >>> torch.allclose(w.T @ w, torch.eye(4, dtype=torch.float64))
        True
    """
    w = w / torch.linalg.matrix_norm(w)
    for _ in range(n_iters):
        w = (1 + beta) * w - beta * w.mm(w.t().mm(w))
    return w


def naive_group_sort(x: torch.Tensor, group_size: int, dim: int = 1) -> torch.Tensor:
    """GroupSort by reshaping ``dim`` into ``(groups, group_size)`` and sorting, for any size.

    Example:
        >>> naive_group_sort(torch.tensor([[1., 3., 2., 0.]]), 2)
        tensor([[3., 1., 2., 0.]])
    """
    shape = list(x.shape)
    shape[dim : dim + 1] = [shape[dim] // group_size, group_size]
    return x.reshape(shape).sort(dim=dim + 1, descending=True).values.reshape(x.shape)


def deel_torchlip():
    """deel-torchlip's ``(functional, normalizers, SpectralLinear, version)``, or ``None``."""
    try:
        functional = importlib.import_module("deel.torchlip.functional")
        normalizers = importlib.import_module("deel.torchlip.normalizers")
        spectral_linear = importlib.import_module("deel.torchlip").SpectralLinear
    except (ImportError, AttributeError):
        return None
    try:
        version = importlib.metadata.version("deel-torchlip")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return functional, normalizers, spectral_linear, version
