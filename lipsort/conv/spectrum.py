r"""Exact spectra and component invariants of circular convolutions (chapter 06).

A circular convolution on ``H×W`` inputs is diagonalized by the 2-D discrete Fourier transform
(Sedghi et al., 2019): at each frequency :math:`\omega = (2\pi j_1/H, 2\pi j_2/W)` it acts on
the channels as the ``c_out×c_in`` matrix

.. math:: \hat K(\omega) = \sum_{a,b} W_{\cdot\cdot a b}\, e^{-\mathrm i(\omega_1 a + \omega_2 b)},

so its ``H·W·min(c_in, c_out)`` singular values are those of the ``H·W`` small matrices
:math:`\hat K(\omega)` (one batched SVD), and it is orthogonal iff every :math:`\hat K(\omega)`
is unitary. Taps beyond the input size wrap around (they are folded modulo ``H``, ``W``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..certify import register_lipschitz_bound
from ._base import CircularConv2d, _input_size

__all__ = ["circular_conv_bound", "component_invariants", "plain_conv_bound", "singular_values"]


def _kernel_of(layer_or_kernel) -> tuple[Tensor, tuple[int, int] | None]:
    """(kernel, recorded input size) of a layer of this package, an nn.Conv2d or a tensor."""
    if isinstance(layer_or_kernel, torch.Tensor):
        w = layer_or_kernel
        if w.dim() != 4:
            raise ValueError(
                f"a kernel must have shape (c_out, c_in, kh, kw), got {tuple(w.shape)}"
            )
        return w.detach(), None
    if isinstance(layer_or_kernel, CircularConv2d):
        with torch.no_grad():
            return layer_or_kernel.weight.detach(), layer_or_kernel.input_size
    if isinstance(layer_or_kernel, nn.Conv2d):
        conv = layer_or_kernel
        k = conv.kernel_size
        same = conv.padding == "same" or (
            all(s % 2 == 1 for s in k) and tuple(conv.padding) == (k[0] // 2, k[1] // 2)
        )
        if not (
            conv.padding_mode == "circular"
            and same
            and conv.stride == (1, 1)
            and conv.dilation == (1, 1)
            and conv.groups == 1
        ):
            raise ValueError(
                "singular_values takes an nn.Conv2d only as a stride-1 circular convolution "
                "(padding='same' or k//2 for odd k, padding_mode='circular', dilation 1, "
                f"groups 1), got {conv}"
            )
        size = getattr(conv, "input_size", None)  # recorded by CircularConv2d.to_conv2d
        return conv.weight.detach(), None if size is None else _input_size(size)
    raise TypeError(
        "singular_values takes a kernel tensor (c_out, c_in, kh, kw), a layer of lipsort.conv "
        f"or a circular nn.Conv2d, got {type(layer_or_kernel).__name__}"
    )


def _symbol(kernel: Tensor, size: tuple[int, int]) -> Tensor:
    """:math:`\\hat K(\\omega)` on the ``H×W`` frequency grid: ``(H, W, c_out, c_in)`` complex128."""
    h, w = size
    kh, kw = kernel.shape[-2:]
    k = kernel.to(torch.float64)
    # Fold the taps modulo the input size (a kernel larger than the input wraps around).
    mh, mw = -(-kh // h), -(-kw // w)
    k = torch.nn.functional.pad(k, (0, mw * w - kw, 0, mh * h - kh))
    k = k.reshape(k.shape[0], k.shape[1], mh, h, mw, w).sum(dim=(2, 4))
    return torch.fft.fft2(k).permute(2, 3, 0, 1)


def singular_values(layer_or_kernel, input_size=None) -> Tensor:
    r"""Every singular value of a circular convolution on ``input_size`` inputs, by the FFT.

    The operator :math:`\mathbb R^{c_{in} H W} \to \mathbb R^{c_{out} H W}` has the singular
    values of the per-frequency matrices :math:`\hat K(\omega)` (module notes), computed in
    float64 with one batched SVD. They equal the singular values of the layer's Jacobian
    (the test suite checks this against ``torch.autograd.functional.jacobian``). The anchor of
    the kernel (Note [anchor] in ``lipsort.conv._base``) does not change them.

    Args:
        layer_or_kernel: a ``(c_out, c_in, kh, kw)`` kernel, a layer of :mod:`lipsort.conv`
            (its current effective kernel, in its current mode) or a stride-1 circular
            ``nn.Conv2d`` (e.g. an export of :func:`lipsort.parametrizations.frozen`).
        input_size: ``(H, W)`` or an int; default: the layer's ``input_size`` (the size of its
            last input, or the one given at construction).

    Returns:
        A 1-D float64 tensor of ``H·W·min(c_in, c_out)`` values, largest first.

    Example:
        >>> from lipsort.conv import BCOP
        >>> _ = torch.manual_seed(0)
        >>> layer = BCOP(4, 4, 3, dtype=torch.float64).eval()
        >>> s = singular_values(layer, (6, 6))
        >>> s.shape, bool((s - 1).abs().max() < 1e-10)
        (torch.Size([144]), True)
    """
    kernel, recorded = _kernel_of(layer_or_kernel)
    size = _input_size(input_size) if input_size is not None else recorded
    if size is None:
        raise ValueError(
            "singular_values needs the input size (H, W): the spectrum of a circular "
            "convolution depends on it; pass input_size, or run the layer on an input first"
        )
    s = torch.linalg.svdvals(_symbol(kernel, size))
    return s.reshape(-1).sort(descending=True).values


def component_invariants(layer_or_kernel, atol: float = 1e-6) -> tuple[int, int, int]:
    r"""Integer invariants that label the connected components of orthogonal convolutions.

    For an orthogonal ``n×n``-channel kernel the symbol
    :math:`K(z_1, z_2) = \sum_{a,b} W_{\cdot\cdot ab} z_1^a z_2^b` is unitary on the torus,
    so :math:`\det K` is a polynomial of modulus 1 there, i.e. a monomial
    :math:`\pm z_1^{d_1} z_2^{d_2}`. The sign and the degrees are integers that vary
    continuously with the kernel, hence constant on each connected component of the space of
    orthogonal convolutions. For BCOP, :math:`K = H\prod_i (P_i + (I - P_i) z_1)
    (Q_i + (I - Q_i) z_2)` and :math:`\det(P + (I-P)z) = z^{n - \operatorname{rank} P}`, so
    :math:`(\operatorname{sign}\det H,\ \sum_i (n - \operatorname{rank} P_i),\
    \sum_i (n - \operatorname{rank} Q_i))`: the 1×1 part's determinant and the projector ranks
    label the components.

    The coefficients of :math:`\det K` are recovered exactly by evaluating it on a grid of
    ``n(k−1)+1`` roots of unity per axis and inverting the DFT.

    Args:
        layer_or_kernel: a square-channel kernel ``(n, n, kh, kw)`` or layer (as in
            :func:`singular_values`).
        atol: tolerance on the coefficients of :math:`\det K` (the leading one must be ±1
            within it, the others 0).

    Returns:
        ``(sign, degree_h, degree_w)``.

    Raises:
        ValueError: the kernel is not square in its channels, or is not orthogonal (its
            determinant is not a signed monomial within ``atol``).

    Example:
        >>> from lipsort.conv import BCOP
        >>> _ = torch.manual_seed(0)
        >>> layer = BCOP(4, 4, 3, projector_ranks=(2, 1, 0, 4), dtype=torch.float64)
        >>> sign, dh, dw = component_invariants(layer)  # (4-2) + (4-0), (4-1) + (4-4)
        >>> (dh, dw), sign == layer.component()[0]
        ((6, 3), True)
    """
    kernel, _ = _kernel_of(layer_or_kernel)
    n, m, kh, kw = kernel.shape
    if n != m:
        raise ValueError(
            f"component_invariants needs a square-channel kernel (n, n, kh, kw), got "
            f"{tuple(kernel.shape)}: only c_in = c_out convolutions can be orthogonal"
        )
    size = (n * (kh - 1) + 1, n * (kw - 1) + 1)
    # fft2 evaluates the symbol at z = exp(-2πi j/M); ifft2 of the determinants then gives
    # the coefficients of det K (its degree is below M along each axis, so nothing aliases).
    det = torch.linalg.det(_symbol(kernel, size))
    coeffs = torch.fft.ifft2(det)
    mags = coeffs.abs()
    flat = int(mags.reshape(-1).argmax())
    dh, dw = divmod(flat, size[1])
    lead = coeffs[dh, dw]
    rest = mags.clone()
    rest[dh, dw] = 0
    if abs(abs(float(lead.real)) - 1) > atol or abs(float(lead.imag)) > atol or rest.max() > atol:
        raise ValueError(
            "the kernel is not an orthogonal convolution: the determinant of its symbol is not "
            f"a signed monomial ±z1^a z2^b (leading coefficient {complex(lead):.3g}, largest "
            f"other {float(rest.max()):.3g}, atol={atol})"
        )
    return (1 if float(lead.real) > 0 else -1, dh, dw)


def circular_conv_bound(module: CircularConv2d, norm: str) -> Tensor:
    r"""Exact Lipschitz constant of a layer of this package, for :mod:`lipsort.certify`.

    ``"l2"``: the largest singular value (:func:`singular_values`) of its current kernel at its
    ``input_size``: the exact norm of the map it computes on inputs of that size (a
    power-iteration estimate would be a *lower* bound). ``"linf"``: the largest ℓ1 norm of a
    row of the operator, :math:`\max_o \sum_{i,a,b} |W_{oiab}|`, exact for inputs at least as
    large as the kernel and an upper bound otherwise (taps that wrap around share an entry).
    """
    if module.input_size is None and norm != "linf":
        raise ValueError(
            f"the ℓ2 constant of this {type(module).__name__} depends on its input size, which "
            "is not known yet: run the model on an input first, or pass input_size= to the layer"
        )
    with torch.no_grad():
        return _kernel_bound(module.weight.detach(), module.input_size, norm)


def _kernel_bound(kernel: Tensor, size, norm: str) -> Tensor:
    """The exact ℓ2 (at ``size``) or ℓ∞ constant of a circular convolution with ``kernel``."""
    w = kernel.to(torch.float64)
    if norm == "linf":
        return w.abs().sum(dim=(1, 2, 3)).amax()
    return singular_values(w, size)[0]


def plain_conv_bound(module: nn.Conv2d, norm: str) -> Tensor:
    r"""Exact Lipschitz constant of a stride-1 circular ``nn.Conv2d``, for :mod:`lipsort.certify`.

    The layers :func:`lipsort.parametrizations.frozen` exports from this package are such
    convolutions, and carry the ``input_size`` of the layer they come from; on another
    ``nn.Conv2d`` set ``conv.input_size = (H, W)``. As :func:`circular_conv_bound`: the largest
    singular value on ``H×W`` inputs (``"l2"``), the largest ℓ1 norm of an operator row
    (``"linf"``).

    Raises:
        TypeError: a convolution that is not stride-1 circular (zero padding, strides, groups,
            dilation): its constant is not computed here.
        ValueError: ``"l2"`` without a recorded ``input_size``.

    Example:
        >>> conv = nn.Conv2d(2, 2, 3, padding="same", padding_mode="circular", bias=False)
        >>> with torch.no_grad():
        ...     _ = conv.weight.zero_()
        ...     conv.weight[0, 1, 1, 1], conv.weight[1, 0, 1, 1] = 1.0, -1.0  # swap and negate
        >>> conv.input_size = (5, 5)
        >>> round(float(plain_conv_bound(conv, "l2")), 12)  # an orthogonal map
        1.0
    """
    try:
        kernel, size = _kernel_of(module)
    except ValueError as err:
        raise TypeError(
            f"cannot bound the Lipschitz constant of {module}: lipsort computes it for stride-1 "
            "circular convolutions only (padding='same', padding_mode='circular', as "
            "lipsort.parametrizations.frozen exports them)"
        ) from err
    if size is None and norm != "linf":
        raise ValueError(
            f"the ℓ2 constant of {module} depends on its input size: set conv.input_size = (H, W) "
            "(layers exported by lipsort.parametrizations.frozen carry it)"
        )
    return _kernel_bound(kernel, size, norm)


register_lipschitz_bound(nn.Conv2d, plain_conv_bound)
