r"""Circular convolutions and the base class of the orthogonal convolution layers.

Note [anchor]. A stride-1 circular convolution with a ``k×k`` kernel computes, as
:func:`torch.nn.functional.conv2d` does (a cross-correlation),

.. math:: y_o[p] = \sum_{i}\sum_{a, b = 0}^{k-1} W_{o i a b}\;
          x_i\big[(p_1 + a - c) \bmod H,\ (p_2 + b - c) \bmod W\big],
          \qquad c = \lfloor (k-1)/2 \rfloor,

so the output has the input's size. The anchor ``c`` is PyTorch's ``padding="same"``
convention: ``c`` rows and columns of circular padding before, ``k - 1 - c`` after. For an odd
``k`` this is the centred ``padding=k//2``; for an even ``k`` (the ``2×2`` convolutions of the
strided layers) the extra padding row is after, and a frozen layer is then exactly
``nn.Conv2d(..., padding="same", padding_mode="circular")``. Any anchor gives the same
singular values (a circular shift is orthogonal): it only moves the output by a pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from .._checks import check_int
from ..functional import _eager_autograd

__all__ = ["circular_conv2d", "circular_conv2d_transpose"]


def _pads(kernel_size: tuple[int, int], adjoint: bool = False) -> tuple[int, int, int, int]:
    """``nnf.pad`` amounts (left, right, top, bottom) for the anchor of Note [anchor]."""
    (kh, kw) = kernel_size
    ch, cw = (kh - 1) // 2, (kw - 1) // 2
    if adjoint:  # the flipped kernel of the adjoint is anchored at k - 1 - c
        ch, cw = kh - 1 - ch, kw - 1 - cw
    return (cw, kw - 1 - cw, ch, kh - 1 - ch)


def _check_spatial(x: Tensor, kernel_size: tuple[int, int]) -> None:
    pads = _pads(kernel_size)
    h, w = x.shape[-2:]
    if max(pads[2:]) > h or max(pads[:2]) > w:
        raise ValueError(
            f"input of spatial size {(h, w)} is too small for a {kernel_size[0]}×{kernel_size[1]} "
            f"kernel: circular padding would wrap around more than once (need H, W ≥ "
            f"{max(pads[2:])}, {max(pads[:2])})"
        )


def circular_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    r"""Stride-1 circular convolution, output size = input size (Note [anchor] in this module).

    Exactly what ``nn.Conv2d(c_in, c_out, k, padding="same", padding_mode="circular")``
    computes with this ``weight`` and ``bias``.

    Args:
        x: ``(N, c_in, H, W)`` input.
        weight: ``(c_out, c_in, kh, kw)`` kernel.
        bias: ``(c_out,)`` or None.

    Example:
        >>> x, w = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 2, 2)
        >>> conv = nn.Conv2d(3, 4, 2, padding="same", padding_mode="circular", bias=False)
        >>> with torch.no_grad():
        ...     _ = conv.weight.copy_(w)
        >>> torch.equal(circular_conv2d(x, w), conv(x))
        True
    """
    _check_spatial(x, weight.shape[-2:])
    return _circular_conv2d(x, weight, bias)


def _circular_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """:func:`circular_conv2d` without its input-size check (for callers that made it)."""
    if x.requires_grad and torch.is_grad_enabled() and _eager_autograd():  # else no padding to fold back
        return _CircularConv.apply(x, weight, bias)
    return nnf.conv2d(nnf.pad(x, _pads(weight.shape[-2:]), mode="circular"), weight, bias)


def _adjoint(y: Tensor, weight: Tensor) -> Tensor:
    """:func:`circular_conv2d_transpose` without its input-size check."""
    flipped = weight.flip(-2, -1).transpose(0, 1)
    return nnf.conv2d(nnf.pad(y, _pads(weight.shape[-2:], adjoint=True), mode="circular"), flipped)


class _CircularConv(torch.autograd.Function):
    r"""The circular convolution with its adjoint as the input's gradient.

    Autograd through ``pad(x, mode="circular")`` and ``conv2d`` computes the gradient of the
    padded input and then folds the wrapped border back, a scatter that cost 3× the whole
    forward pass on CPU for 128 channels at 14×14 (batch 128; ``python -m lipsort.bench bcop``
    shows the step). The input's gradient is :math:`K^\top g`, itself one circular convolution
    (:func:`circular_conv2d_transpose`); the kernel's is the convolution's weight gradient on the
    padded input, recomputed from ``x`` so that every operation of this backward is
    differentiable (double backward, e.g. gradient penalties, goes through it).
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return nnf.conv2d(nnf.pad(x, _pads(weight.shape[-2:]), mode="circular"), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        gx = _adjoint(grad, weight) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            xp = nnf.pad(x, _pads(weight.shape[-2:]), mode="circular")
            gw = torch.ops.aten.convolution_backward(
                grad, xp, weight, None, (1, 1), (0, 0), (1, 1), False, (0, 0), 1, (False, True, False)
            )[1]
        gb = grad.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def circular_conv2d_transpose(y: Tensor, weight: Tensor) -> Tensor:
    r"""The adjoint of :func:`circular_conv2d` (without bias): :math:`\langle Kx, y\rangle =
    \langle x, K^\top y\rangle`.

    :math:`K^\top` is the circular convolution with the kernel flipped in space and transposed
    in channels, :math:`W'_{i o a b} = W_{o i (k-1-a) (k-1-b)}`, anchored at ``k − 1 − c``.

    Example:
        >>> x, y, w = torch.randn(1, 3, 5, 6), torch.randn(1, 4, 5, 6), torch.randn(4, 3, 2, 3)
        >>> lhs = (circular_conv2d(x, w) * y).sum()
        >>> rhs = (x * circular_conv2d_transpose(y, w)).sum()
        >>> bool(torch.allclose(lhs, rhs, atol=1e-4))
        True
    """
    _check_spatial(y, weight.shape[-2:])
    return _adjoint(y, weight)


# --------------------------------------------------------------------------- argument checks


def _bjorck_settings(n_iters, eval_iters, order) -> tuple[int, int | None, int]:
    """Checked ``(n_iters, eval_iters, order)`` of a Björck-orthonormalized kernel (RKO, BCOP)."""
    n_iters = check_int(n_iters, "n_iters", 0)
    if eval_iters is not None:
        eval_iters = check_int(eval_iters, "eval_iters", 0)
    if isinstance(order, bool) or order not in (1, 2, 3, 4):
        raise ValueError(f"Björck order must be 1, 2, 3 or 4, got {order!r}")
    return n_iters, eval_iters, order


def _square_kernel(kernel_size, layer: str) -> int:
    if isinstance(kernel_size, (tuple, list)):
        if len(kernel_size) != 2 or kernel_size[0] != kernel_size[1]:
            raise ValueError(
                f"{layer} supports square k×k kernels (an int or (k, k)), got kernel_size="
                f"{tuple(kernel_size)!r}"
            )
        kernel_size = kernel_size[0]
    return check_int(kernel_size, "kernel_size")


def _input_size(size, name: str = "input_size") -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, (tuple, list, torch.Size)):
        if len(size) != 2:
            raise ValueError(f"{name} must be an int or a pair (H, W), got {tuple(size)!r}")
        return (check_int(size[0], name), check_int(size[1], name))
    n = check_int(size, name)
    return (n, n)


def _check_geometry(layer: str, kernel_size: int, stride, padding, padding_mode) -> None:
    strided = "build strided layers with lipsort.conv.strided_conv (invertible downsampling, "
    strided += "then a stride-1 convolution with kernel k/stride, as Li et al.)"
    if stride not in (1, (1, 1), [1, 1]):
        raise ValueError(f"{layer} supports stride 1 only, got stride={stride!r}; {strided}")
    if padding_mode != "circular":
        raise ValueError(
            f"{layer} supports padding_mode='circular' only (it is orthogonal as a circular "
            f"convolution; with zero padding it is not), got padding_mode={padding_mode!r}"
        )
    same = padding == "same" or (
        kernel_size % 2 == 1 and padding in (kernel_size // 2, (kernel_size // 2,) * 2)
    )
    if not same:
        odd = f" or {kernel_size // 2}" if kernel_size % 2 else ""
        raise ValueError(
            f"{layer} supports padding='same'{odd} only (output size = input size, where the "
            f"circular convolution is orthogonal), got padding={padding!r} for a "
            f"{kernel_size}×{kernel_size} kernel"
        )


# --------------------------------------------------------------------------- base layer


class CircularConv2d(nn.Module):
    """Base of :class:`BCOP`, :class:`RKO`, :class:`OSSN`: a stride-1 circular convolution
    whose kernel ``weight`` is computed from free parameters by the subclass.

    Subclasses define ``weight`` (the effective kernel, differentiable in training mode,
    cached in eval mode) and may override :meth:`_prepare` (called with the input size before
    each forward pass). ``input_size`` is the spatial size of the last input (or the one given
    at construction): the ℓ2 operator norm of a circular convolution depends on it, and
    :func:`lipsort.certify.lipschitz_upper_bound` measures the layer at that size.
    """

    def __init__(
        self,
        layer: str,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride,
        padding,
        padding_mode: str,
        bias: bool,
        input_size,
        device,
        dtype,
    ):
        super().__init__()
        self.in_channels = check_int(in_channels, "in_channels")
        self.out_channels = check_int(out_channels, "out_channels")
        k = _square_kernel(kernel_size, layer)
        _check_geometry(layer, k, stride, padding, padding_mode)
        self.kernel_size = (k, k)
        self.input_size = _input_size(input_size)
        if not isinstance(bias, bool):
            raise ValueError(f"bias must be True or False, got {bias!r}")
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    @property
    def weight(self) -> Tensor:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def _prepare(self, size: tuple[int, int]) -> None:
        """Hook run before each forward pass with the input's spatial size."""

    def forward(self, x: Tensor) -> Tensor:
        name = type(self).__name__
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} expects a floating-point tensor, got {type(x).__name__}")
        if x.dim() not in (3, 4):
            raise ValueError(
                f"{name} expects an (N, C, H, W) or unbatched (C, H, W) input, got shape "
                f"{tuple(x.shape)}"
            )
        if x.shape[-3] != self.in_channels:
            raise ValueError(
                f"{name} has in_channels={self.in_channels}, got an input with {x.shape[-3]} "
                f"channels (shape {tuple(x.shape)})"
            )
        _check_spatial(x, self.kernel_size)
        size = (int(x.shape[-2]), int(x.shape[-1]))
        if size != self.input_size:
            self.input_size = size
        self._prepare(size)
        batched = x if x.dim() == 4 else x.unsqueeze(0)
        y = _circular_conv2d(batched, self.weight, self.bias)  # the input size is checked above
        return y if x.dim() == 4 else y.squeeze(0)

    def _eval_weight(self) -> Tensor:
        """The eval-mode kernel, without changing the layer's mode (or its caches) if possible."""
        if not self.training:
            return self.weight
        self.eval()
        try:
            return self.weight
        finally:
            self.train()

    def to_conv2d(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` (``padding="same"``, ``padding_mode="circular"``) holding the
        eval-mode kernel and bias: its outputs are identical to this layer's in eval mode. It
        keeps this layer's ``input_size`` as an attribute, so that
        :func:`lipsort.certify.lipschitz_upper_bound` still gives the exact constant."""
        w = self._eval_weight().detach()
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            padding="same",
            padding_mode="circular",
            bias=self.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(w)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        conv.input_size = self.input_size  # the spectrum of a circular convolution depends on it
        return conv.train(self.training)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"padding='same', padding_mode='circular', bias={self.bias is not None}"
        )
