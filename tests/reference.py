"""Reference implementations and random inputs used only by the tests."""

from __future__ import annotations

import torch


def random_target(gen: torch.Generator, n: int, extreme: bool = False):
    """Random 1-Lipschitz breakpoints; ``extreme`` uses slopes ±1 (the boundary of the ball)."""
    xs = torch.cumsum(torch.rand(n, generator=gen, dtype=torch.float64) * 2 + 1e-3, 0) - 5
    s = torch.rand(n - 1, generator=gen, dtype=torch.float64) * 2 - 1
    if extreme:
        s = torch.where(s >= 0, 1.0, -1.0).to(torch.float64)
    ys = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(s * (xs[1:] - xs[:-1]), 0)])
    return xs, ys + torch.randn(1, generator=gen, dtype=torch.float64)


def random_matrix(shape, seed=0, dtype=torch.float64):
    """A Gaussian matrix (or batch) of ``shape`` from its own generator seeded ``seed``."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def svd_polar(w):
    """The polar factor U Vᵀ of ``w`` from its thin SVD (differentiable through torch's SVD)."""
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    return u @ vh
