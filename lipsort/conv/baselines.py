r"""Baselines of BCOP (Li et al., 2019) and the invertible downsampling of its strided layers.

* :class:`RKO` (reshaped kernel orthogonalization): Björck on the kernel reshaped to a
  ``c_out×(c_in k²)`` matrix, divided by ``k``. A circular convolution is that matrix applied
  to ``k²`` stacked shifted copies of the input, a map of norm ``k``, so
  :math:`\|\mathrm{conv}\|_2 \le k\,\|W_{\mathrm{resh}}\|_2 / k \le 1`; but the bound is not
  tight, and the layer is not gradient-norm preserving.
* :class:`OSSN` (operator spectral normalization): the kernel divided by
  :math:`\max(\hat\sigma, 1)`, with :math:`\hat\sigma` a power-iteration estimate of the norm
  of the convolution operator itself (not of a reshaped matrix). :math:`\hat\sigma` is a lower
  bound, so the layer is only approximately 1-Lipschitz; certificates use the exact FFT norm.
* :class:`InvertibleDownsampling` (pixel unshuffle) and :func:`strided_conv`: a ``k×k``
  stride-``s`` convolution becomes unshuffle by ``s`` (``c → c s²`` channels, a permutation
  of the pixels, hence orthogonal) then a stride-1 ``(k/s)×(k/s)`` convolution.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import functional as LF
from .._checks import check_int
from ..certify import register_lipschitz_bound
from ..parametrizations import EvalCachedConstraint, register_frozen_export
from ._base import CircularConv2d, _bjorck_settings, circular_conv2d, circular_conv2d_transpose
from .spectrum import circular_conv_bound, singular_values

__all__ = ["OSSN", "RKO", "InvertibleDownsampling", "strided_conv"]


# --------------------------------------------------------------------------- RKO


class RKOKernel(EvalCachedConstraint):
    r"""``W = bjorck(V.reshape(c_out, -1)).reshape(V.shape) / sqrt(kh·kw)`` (eval-cached)."""

    def __init__(self, n_iters: int, order: int, eval_iters: int | None):
        super().__init__()
        self.n_iters, self.order = n_iters, order
        self.eval_iters = n_iters if eval_iters is None else eval_iters

    def constrain(self, original: Tensor) -> Tensor:
        iters = self.n_iters if self.training else self.eval_iters
        flat = LF.bjorck(original.reshape(original.shape[0], -1), iters, self.order)
        kh, kw = original.shape[-2:]
        return flat.reshape(original.shape) / math.sqrt(kh * kw)

    def cache_config(self) -> tuple:
        return (self.eval_iters, self.order)


class RKO(CircularConv2d):
    r"""Reshaped-kernel orthogonalization: :math:`W = \operatorname{bjorck}(V_{\mathrm{resh}})/k`.

    The free kernel ``weight_orig`` ``(c_out, c_in, k, k)`` is reshaped to
    ``c_out×(c_in k²)``, Björck-orthonormalized (:func:`lipsort.functional.bjorck`) and
    divided by ``k`` (``√(kh·kw)``, as the authors' code), so the circular convolution has
    :math:`\|\cdot\|_2 \le \|W_{\mathrm{resh}}\|_2 \le 1` (module notes), usually well below
    1. Arguments as :class:`lipsort.conv.BCOP` (square kernels, stride 1, circular padding).

    Example:
        >>> from lipsort.conv import singular_values
        >>> _ = torch.manual_seed(0)
        >>> layer = RKO(4, 4, 3, dtype=torch.float64)
        >>> s = singular_values(layer, 8)
        >>> bool(s.max() <= 1), bool(s.min() < 0.9)
        (True, True)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        n_iters: int = 20,
        *,
        order: int = 1,
        eval_iters: int | None = None,
        bias: bool = True,
        stride=1,
        padding="same",
        padding_mode: str = "circular",
        input_size=None,
        device=None,
        dtype=None,
    ):
        super().__init__(
            "RKO",
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            padding_mode,
            bias,
            input_size,
            device,
            dtype,
        )
        n_iters, eval_iters, order = _bjorck_settings(n_iters, eval_iters, order)
        shape = (self.out_channels, self.in_channels) + self.kernel_size
        self.weight_orig = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.kernel_map = RKOKernel(n_iters, order, eval_iters)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Orthonormal rows (or columns) of the reshaped kernel; bias uniform in ±1/√c_out."""
        with torch.no_grad():
            nn.init.orthogonal_(self.weight_orig.view(self.out_channels, -1))
            if self.bias is not None:
                bound = 1 / math.sqrt(self.out_channels)
                self.bias.uniform_(-bound, bound)

    @property
    def weight(self) -> Tensor:
        """The effective kernel (cached in eval mode)."""
        return self.kernel_map.lookup(self.weight_orig)


def _rko_bound(module: RKO, norm: str) -> Tensor:
    # The construction's bound √(kh·kw)·‖W_resh‖₂ holds at every input size; the exact FFT
    # norm at the recorded input size is tighter. Both are rigorous: take the smaller.
    if norm == "linf":
        return circular_conv_bound(module, norm)
    with torch.no_grad():
        w = module.weight.detach().to(torch.float64)
    kh, kw = w.shape[-2:]
    bound = math.sqrt(kh * kw) * LF.operator_norm(w.reshape(w.shape[0], -1), 2)
    if module.input_size is not None:
        bound = torch.minimum(bound, singular_values(w, module.input_size)[0])
    return bound


# --------------------------------------------------------------------------- OSSN


class OSSNKernel(EvalCachedConstraint):
    r"""``W = V / max(σ̂, 1)``, :math:`\hat\sigma = \langle u, K_V v\rangle`,
    ``v = K_Vᵀu / ‖K_Vᵀu‖`` (``u``, ``v`` without gradient; eval-cached on ``(V, u)``)."""

    def constrain(self, original: tuple[Tensor, Tensor]) -> Tensor:
        w, u = original
        with torch.no_grad():
            v = circular_conv2d_transpose(u, w.detach())
            v = v / v.norm().clamp_min(1e-12)
        sigma = (u * circular_conv2d(v, w)).sum()
        # One-sided, as the authors' OSSN: only kernels with σ̂ > 1 are scaled down; the
        # gradient flows through σ̂.
        return w / sigma.clamp_min(1.0)

    def cache_inputs(self, original: tuple[Tensor, Tensor]) -> tuple[Tensor, ...]:
        return tuple(original)


class OSSN(CircularConv2d):
    r"""Convolution normalized by power iteration on the convolution operator (Li et al.).

    The effective kernel is :math:`W = V/\max(\hat\sigma, 1)`, where
    :math:`\hat\sigma = \langle u, K_V v\rangle` estimates the spectral norm of the circular
    convolution :math:`K_V` (not of a reshaped kernel) with a persistent unit vector ``u`` of
    the output space (the buffer ``u``, shape ``(1, c_out, H, W)``) and
    :math:`v = K_V^\top u/\|K_V^\top u\|`. Each training-mode forward pass first runs
    ``n_power_iters`` iterations :math:`v \leftarrow K^\top u/\|\cdot\|,\ u \leftarrow Kv/\|\cdot\|`
    from the previous ``u`` (warm start; 10 as the authors' code); ``u`` is drawn at random
    and given ``n_power_iters`` iterations when the input size is first seen or changes.
    The gradient flows through :math:`\hat\sigma`. In eval mode ``u`` is not updated and the
    kernel is cached.

    .. warning:: :math:`\hat\sigma \le \|K_V\|_2`, so :math:`\|W\|` can exceed 1 slightly
       (by much at high learning rates, where ``V`` moves faster than ``u`` follows).
       :func:`lipsort.certify.lipschitz_upper_bound` uses the exact FFT norm.

    Example:
        >>> from lipsort.conv import singular_values
        >>> _ = torch.manual_seed(0)
        >>> layer = OSSN(4, 4, 3, dtype=torch.float64)
        >>> with torch.no_grad():
        ...     _ = layer.weight_orig.mul_(10)  # a kernel of norm > 1 gets scaled down
        >>> _ = layer(torch.randn(2, 4, 8, 8, dtype=torch.float64))
        >>> s = float(singular_values(layer)[0])  # the exact norm, at the input's size
        >>> 1 <= s < 1.05  # σ̂ underestimates the norm: W is normalized to slightly above 1
        True
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        n_power_iters: int = 10,
        *,
        bias: bool = True,
        stride=1,
        padding="same",
        padding_mode: str = "circular",
        input_size=None,
        device=None,
        dtype=None,
    ):
        super().__init__(
            "OSSN",
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            padding_mode,
            bias,
            input_size,
            device,
            dtype,
        )
        self.n_power_iters = check_int(n_power_iters, "n_power_iters", 1)
        shape = (self.out_channels, self.in_channels) + self.kernel_size
        self.weight_orig = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.register_buffer("u", torch.empty(0, device=device, dtype=dtype))
        self.kernel_map = OSSNKernel()
        self.reset_parameters()
        if self.input_size is not None:
            self._prepare(self.input_size)

    def reset_parameters(self) -> None:
        """``nn.Conv2d``'s initialization of the free kernel and bias; ``u`` is redrawn."""
        nn.init.kaiming_uniform_(self.weight_orig, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
            nn.init.uniform_(self.bias, -bound, bound)
        self.u = self.u.new_empty(0)

    def _iterate(self, n: int) -> None:
        with torch.no_grad():
            w, u = self.weight_orig.detach(), self.u
            for _ in range(n):
                v = circular_conv2d_transpose(u, w)
                v = v / v.norm().clamp_min(1e-12)
                u_next = circular_conv2d(v, w)
                norm = u_next.norm()
                if not norm > 1e-12:  # K v = 0 (e.g. a zero kernel): keep u
                    break
                u = u_next / norm
            self.u.copy_(u)

    def _prepare(self, size: tuple[int, int]) -> None:
        if tuple(self.u.shape) != (1, self.out_channels) + tuple(size):
            w = self.weight_orig
            u = torch.randn((1, self.out_channels) + tuple(size), dtype=w.dtype, device=w.device)
            self.u = u / u.norm()
            self._iterate(self.n_power_iters)
        elif self.training:
            self._iterate(self.n_power_iters)

    @property
    def weight(self) -> Tensor:
        """The effective kernel ``V / max(σ̂, 1)`` (cached in eval mode)."""
        if self.u.dim() != 4:
            raise ValueError(
                "OSSN normalizes the operator at its input size, which is not known yet: run "
                "it on an input first, or pass input_size= at construction"
            )
        return self.kernel_map.lookup((self.weight_orig, self.u))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # `u` takes its shape from the input size: adopt the stored shape before loading.
        key = prefix + "u"
        if key in state_dict and state_dict[key].shape != self.u.shape:
            self.u = self.u.new_empty(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n_power_iters={self.n_power_iters}"


# --------------------------------------------------------------------------- downsampling


class InvertibleDownsampling(nn.PixelUnshuffle):
    r"""Pixel unshuffle by ``factor``: ``(N, C, H, W) → (N, C f², H/f, W/f)``, an orthogonal map.

    Each ``f×f`` patch of each channel becomes ``f²`` channels of one pixel (channel
    ``c f² + i f + j`` holds pixel ``(f p + i, f q + j)`` of channel ``c``, as
    ``torch.nn.PixelUnshuffle`` and the authors' code): a permutation of the entries, so it
    preserves every norm and is 1-Lipschitz in ℓ2 and ℓ∞.

    Example:
        >>> x = torch.randn(2, 3, 4, 6)
        >>> y = InvertibleDownsampling(2)(x)
        >>> y.shape, bool(torch.allclose(y.norm(), x.norm()))
        (torch.Size([2, 12, 2, 3]), True)
    """

    def __init__(self, factor: int = 2):
        super().__init__(check_int(factor, "factor"))

    def forward(self, x: Tensor) -> Tensor:
        f = self.downscale_factor
        if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"InvertibleDownsampling expects an (N, C, H, W) or (C, H, W) input, got {shape}"
            )
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(
                f"InvertibleDownsampling({f}) needs a spatial size divisible by {f}, got "
                f"{tuple(x.shape[-2:])}"
            )
        return super().forward(x)


def strided_conv(
    layer, in_channels: int, out_channels: int, kernel_size: int, stride: int, **kwargs
) -> nn.Module:
    r"""A ``k×k`` stride-``s`` orthogonal-convolution layer as Li et al. build it.

    ``nn.Sequential(InvertibleDownsampling(s), layer(c_in s², c_out, k/s, **kwargs))``: the
    unshuffle is orthogonal, so the composite is orthogonal (an isometry, …) exactly when the
    stride-1 convolution is. E.g. the Small network's ``4×4``/2 convolutions become ``2×2``
    convolutions on 4× the channels. ``stride=1`` returns ``layer(c_in, c_out, k, **kwargs)``.

    Args:
        layer: :class:`~lipsort.conv.BCOP`, :class:`RKO`, :class:`OSSN` or any callable
            ``layer(in_channels, out_channels, kernel_size, **kwargs)``.
        in_channels, out_channels, kernel_size, stride: of the strided convolution; ``stride``
            must divide ``kernel_size``.
        **kwargs: passed to ``layer``; an ``input_size`` is the size *before* downsampling.

    Example:
        >>> from lipsort.conv import BCOP
        >>> conv = strided_conv(BCOP, 1, 16, 4, 2)
        >>> conv[1].in_channels, conv[1].kernel_size
        (4, (2, 2))
        >>> conv(torch.randn(5, 1, 28, 28)).shape
        torch.Size([5, 16, 14, 14])
    """
    stride = check_int(stride, "stride")
    kernel_size = check_int(kernel_size, "kernel_size")
    if kernel_size % stride:
        raise ValueError(
            f"strided_conv needs kernel_size divisible by stride (the convolution after "
            f"downsampling has kernel k/stride), got kernel_size={kernel_size}, stride={stride}"
        )
    if stride == 1:
        return layer(in_channels, out_channels, kernel_size, **kwargs)
    size = kwargs.get("input_size")
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else size
        if h % stride or w % stride:
            raise ValueError(f"input_size {size!r} is not divisible by the stride {stride}")
        kwargs["input_size"] = (h // stride, w // stride)
    conv = layer(in_channels * stride * stride, out_channels, kernel_size // stride, **kwargs)
    return nn.Sequential(InvertibleDownsampling(stride), conv)


def _pixel_unshuffle_bound(module: nn.PixelUnshuffle, norm: str) -> float:
    return 1.0


def _export_downsampling(module: InvertibleDownsampling) -> nn.PixelUnshuffle:
    return nn.PixelUnshuffle(module.downscale_factor)


register_lipschitz_bound(RKO, _rko_bound)
register_lipschitz_bound(OSSN, circular_conv_bound)
register_lipschitz_bound(InvertibleDownsampling, _pixel_unshuffle_bound)
register_lipschitz_bound(nn.PixelUnshuffle, _pixel_unshuffle_bound)
register_frozen_export(RKO, RKO.to_conv2d)
register_frozen_export(OSSN, OSSN.to_conv2d)
register_frozen_export(InvertibleDownsampling, _export_downsampling)
