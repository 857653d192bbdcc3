"""What the attacks share: per-sample radii, norms, pixel-space models and argument checks."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn


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


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return steps


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Every module in eval mode inside the block; each module's own flag restored after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
