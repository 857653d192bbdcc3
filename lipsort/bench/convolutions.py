"""Benchmark of orthogonal convolutions: a BCOP training step against the per-tap construction."""

from __future__ import annotations

import copy

import torch
from torch import nn

import torch.nn.functional as nnf

from ..conv import BCOP, circular_conv2d, singular_values
from ..conv._base import _pads
from ..conv.reference import bcop_kernel_per_tap
from ._measure import Config, Row, measure_case
from .weights import _train, rel_error

# The BCOP layers of Li et al.'s networks (lipsort.conv.bcop_small / bcop_large on 28×28
# MNIST): (network, c_in, c_out, k, input size). A strided 4×4/2 convolution is invertible
# downsampling then a 2×2 BCOP on 4× the channels at half the size.
LAYERS = (
    ("Small", 4, 16, 2, 14),
    ("Small", 64, 32, 2, 7),
    ("Large", 1, 32, 3, 28),
    ("Large", 128, 32, 2, 14),
    ("Large", 32, 64, 3, 14),
    ("Large", 256, 64, 2, 7),
)
TINY_LAYERS = (("tiny", 4, 8, 3, 6), ("tiny", 8, 4, 2, 4))


def _autograd_circular_conv2d(x, kernel, bias):
    """The circular convolution as ``nn.Conv2d(..., padding_mode="circular")`` computes it, padding
    then ``conv2d``, differentiated by autograd through both: what a straightforward layer runs."""
    return nnf.conv2d(nnf.pad(x, _pads(kernel.shape[-2:]), mode="circular"), kernel, bias)


class _PerTap(nn.Module):
    """A BCOP layer's convolution with its kernel built by the per-tap reference construction,
    run as a straightforward layer would (:func:`_autograd_circular_conv2d`)."""

    def __init__(self, layer, fast_bjorck: bool = False):
        super().__init__()
        self.layer, self.fast_bjorck = layer, fast_bjorck

    def kernel(self) -> torch.Tensor:
        return bcop_kernel_per_tap(self.layer, self.fast_bjorck)

    def forward(self, x):
        return _autograd_circular_conv2d(x, self.kernel(), self.layer.bias)


class _FreeConv(nn.Module):
    """A free kernel through lipsort's circular convolution (the convolution's share of a
    lipsort layer's step)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias

    def forward(self, x):
        return circular_conv2d(x, self.weight, self.bias)


def _free(model: nn.Module) -> list[torch.Tensor]:
    """The free parameters of the kernel (bias excluded)."""
    layer = model.layer if isinstance(model, _PerTap) else model
    return [layer.ortho_orig, layer.proj_orig] if hasattr(layer, "ortho_orig") else [layer.weight]


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _kernel(model: nn.Module) -> torch.Tensor:
    return model.kernel() if isinstance(model, _PerTap) else model.weight


def _bcop_case(cfg: Config, net: str, c_in: int, c_out: int, k: int, size: int, input_grad: bool) -> list[Row]:
    batch = 4 if cfg.tiny else 128
    torch.manual_seed(0)
    layer = BCOP(c_in, c_out, k, cfg.iters, input_size=size)
    models = {
        "lipsort": layer,
        "per-tap": _PerTap(copy.deepcopy(layer)),
        "per-tap, lipsort Björck": _PerTap(copy.deepcopy(layer), fast_bjorck=True),
        "unconstrained": nn.Conv2d(c_in, c_out, k, padding="same", padding_mode="circular"),
    }
    models["unconstrained, lipsort conv"] = _FreeConv(copy.deepcopy(models["unconstrained"]))
    models = {name: m.to(cfg.device).train() for name, m in models.items()}
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, c_in, size, size, generator=gen).to(cfg.device)
    y = torch.randn(batch, c_out, size, size, generator=gen).to(cfg.device)
    # The timed step back-propagates a fixed cotangent, as the layers after it would in a
    # network: a loss on the layer's own output (batch × c_out × size² entries: a mean-square
    # error there took 7.7 of the 11 ms of the free 1→32 convolution's step at 28×28) would be
    # timed as part of every contender's step.
    cot = torch.randn(batch, c_out, size, size, generator=gen).to(cfg.device) / y.numel() ** 0.5
    x64, cot64 = x.to(torch.float64), cot.to(torch.float64)
    x.requires_grad_(input_grad)

    def reference_grad(bcop) -> torch.Tensor:
        """The gradient of ⟨layer(x), cot⟩ in the free parameters through the per-tap
        construction in float64 (same Björck counts), at ``bcop``'s current parameters."""
        ref = copy.deepcopy(bcop).to(torch.float64)
        out = _autograd_circular_conv2d(x64, bcop_kernel_per_tap(ref), ref.bias)
        return _flat(torch.autograd.grad(out, _free(ref), cot64))

    # A few Adam steps first, so that the parameters leave the orthonormal initialization.
    for m in models.values():
        _train(m, x, y, 2 if cfg.tiny else 5)
    impls = []
    notes = {
        "lipsort": "BCOP: batched Björck of H (c_out×c_in) and V (n×r), batched taps",
        "per-tap": "2(k-1)+1 square n×n Björcks (autograd through each step), taps one product at a time",
        "per-tap, lipsort Björck": "the same with lipsort's Björck (hand-written backward)",
        "unconstrained": "circular nn.Conv2d, free kernel",
        "unconstrained, lipsort conv": "free kernel, lipsort.conv.circular_conv2d (adjoint backward)",
    }
    for name, m in models.items():

        def forward(m=m):
            m.zero_grad(set_to_none=True)
            x.grad = None
            return m(x)

        impls.append((name, forward, lambda out: out.backward(cot), notes[name]))

    def check(name, out):
        m = models[name]
        with torch.no_grad():
            err = float((singular_values(_kernel(m).detach(), size) - 1).abs().max())
        if name.startswith("unconstrained"):
            return err, None
        # The two copies trained apart (by rounding): each is compared at its own parameters.
        grad = _flat(torch.autograd.grad(out, _free(m), cot))
        return err, rel_error(grad, reference_grad(m.layer if isinstance(m, _PerTap) else m))

    name = f"{net} BCOP {c_in}→{c_out} {k}×{k} @{size}×{size}"
    step = "train step" + ("" if x.requires_grad else ", no input gradient")
    rows = measure_case("bcop", f"{name}, batch {batch}, {step}", impls, cfg, "max|σ-1|", check)
    return rows + _kernel_rows(cfg, name, {i: m for i, m in models.items() if not i.startswith("unconstrained")})


def _kernel_rows(cfg: Config, name: str, models: dict) -> list[Row]:
    """The kernel construction alone: forward and backward of the kernel for a fixed random
    cotangent (what the construction adds to any convolution's step)."""
    cot = torch.randn(_kernel(models["lipsort"]).shape, generator=torch.Generator().manual_seed(2))
    cot = cot.to(cfg.device)
    impls = []
    for impl, m in models.items():
        free = _free(m)
        impls.append((impl, lambda m=m: _kernel(m), lambda k, free=free: torch.autograd.grad(k, free, cot), ""))

    def check(impl, kernel):
        layer = models[impl].layer if isinstance(models[impl], _PerTap) else models[impl]
        ref = copy.deepcopy(layer).to(torch.float64)
        ref_grad = torch.autograd.grad(bcop_kernel_per_tap(ref), _free(ref), cot.to(torch.float64))
        grad = torch.autograd.grad(kernel, _free(models[impl]), cot)
        size = layer.input_size[0]
        err = float((singular_values(kernel.detach(), size) - 1).abs().max())
        return err, rel_error(_flat(grad), _flat(ref_grad))

    return measure_case("bcop_kernel", f"{name}, kernel construction", impls, cfg, "max|σ-1|", check)


def bench_bcop(cfg: Config, deel, notes: list[str]) -> list[Row]:
    """Forward + backward of each BCOP layer of Li et al.'s Small and Large networks, and of
    its kernel construction alone."""
    layers = TINY_LAYERS if cfg.tiny else LAYERS
    notes.append(
        "bcop: max|σ-1| is exact (every singular value of the circular convolution at the "
        "layer's input size, by the FFT); grad err against the per-tap construction in float64"
    )
    # A network's first layer takes the image, which needs no gradient; every other layer's
    # step also back-propagates to its input, as in training.
    rows, seen = [], set()
    for spec in layers:
        rows += _bcop_case(cfg, *spec, input_grad=spec[0] in seen)
        seen.add(spec[0])
    return rows
