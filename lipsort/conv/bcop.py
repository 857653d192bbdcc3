r"""Block convolution orthogonal parametrization (BCOP; Li et al., 2019; chapter 06).

Note [BCOP]. A symmetric projector :math:`P = VV^\top` (``V`` with orthonormal columns) gives
the 1-D two-tap kernel :math:`[P,\ I - P]`, whose symbol :math:`P + (I - P)z` is unitary for
:math:`|z| = 1` (:math:`P` and :math:`I - P` project onto complementary orthogonal subspaces),
so it is an orthogonal circular convolution. Two projectors give the 2-D ``2×2`` block

.. math:: B(P, Q) = \begin{bmatrix} PQ & P(I-Q) \\ (I-P)Q & (I-P)(I-Q) \end{bmatrix},
          \qquad \hat B(z_1, z_2) = (P + (I-P)z_1)(Q + (I-Q)z_2),

and a ``k×k`` kernel is an orthogonal ``n×n`` matrix ``H`` (the 1×1 part) times the block
convolution of ``k − 1`` such blocks:

.. math:: \hat K(z_1, z_2) = H \prod_{i=1}^{k-1} \hat B(P_i, Q_i)(z_1, z_2).

A product of unitary symbols is unitary: the convolution is exactly orthogonal for every
parameter value. ``H`` and each ``V`` are Björck-orthonormalized free matrices
(:func:`lipsort.functional.bjorck`), so the construction is orthogonal up to Björck's
convergence (to rounding from a well-conditioned start; the tests train it at a large learning
rate and check every singular value). With ``n = max(c_in, c_out)`` the layer is the top-left
``c_out×c_in`` channel block of an ``n``-channel orthogonal convolution (with ``H`` a
``c_out×c_in`` matrix with orthonormal rows or columns, :func:`bcop_kernel`): an isometry for
``c_in ≤ c_out``, and with orthonormal rows (so ``‖·‖₂ = 1``) for ``c_in > c_out``. The
projector ranks are fixed (default ``⌊n/2⌋``, as the authors): a rank is an integer that
cannot change continuously, and with ``det H`` it labels the connected component
(:func:`lipsort.conv.component_invariants`); :func:`embed_bcop` puts every ``n``-channel
BCOP into the half-rank component of ``2n`` channels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from .. import functional as LF
from .._checks import check_int
from ..certify import register_lipschitz_bound
from ..parametrizations import EvalCachedConstraint, register_frozen_export
from ._base import CircularConv2d, _bjorck_settings
from .spectrum import circular_conv_bound

__all__ = ["BCOP", "bcop_kernel", "embed_bcop", "projector_block"]


def _taps(ps: Tensor, qs: Tensor) -> Tensor:
    """Kernel ``(..., m, n, 2, 2)`` with taps ``ps[a] @ qs[b]``: every tap in one product."""
    return (ps.unsqueeze(-3) @ qs.unsqueeze(-4)).movedim((-4, -3), (-2, -1))


def _pair(p: Tensor) -> Tensor:
    """``(P, I − P)`` stacked on a new dimension −3."""
    eye = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device)
    return torch.stack((p, eye - p), dim=-3)


def projector_block(p: Tensor, q: Tensor) -> Tensor:
    r"""The ``2×2`` block :math:`B(P, Q)` of Note [BCOP] as a conv kernel ``(..., n, n, 2, 2)``.

    ``B[..., :, :, a, b] = P_a Q_b`` with :math:`P_0 = P,\ P_1 = I - P` (and the same for
    ``Q``), batched over leading dimensions. For symmetric projectors it is orthogonal.

    Example:
        >>> from lipsort.conv import singular_values
        >>> p = torch.diag(torch.tensor([1., 0., 0.]))           # projector onto e1
        >>> q = torch.full((3, 3), 1 / 3.)                         # onto (1, 1, 1)/√3
        >>> block = projector_block(p, q)
        >>> block.shape, bool(torch.allclose(singular_values(block, 5).float(), torch.ones(75)))
        (torch.Size([3, 3, 2, 2]), True)
    """
    if p.shape != q.shape or p.dim() < 2 or p.shape[-1] != p.shape[-2]:
        raise ValueError(
            f"p and q must be square matrices of one shape, got {tuple(p.shape)} and {tuple(q.shape)}"
        )
    return _taps(_pair(p), _pair(q))


def _compose(a: Tensor, b: Tensor) -> Tensor:
    r"""Block convolution: the kernel ``C`` with :math:`\hat C = \hat A \hat B`.

    ``C[:, :, i, j] = Σ_{a,b} A[:, :, a, b] @ B[:, :, i−a, j−b]``: a full 2-D convolution of the
    taps with a contraction over the middle channels, i.e. one ``nnf.conv2d`` call with the rows
    of ``A`` as the batch (so no Python loop over taps).
    """
    t1, t2 = b.shape[-2:]
    return nnf.conv2d(a, b.transpose(0, 1).flip(-2, -1), padding=(t1 - 1, t2 - 1))


def bcop_kernel(h: Tensor, projectors: Tensor) -> Tensor:
    r"""The BCOP kernel of Note [BCOP] from its 1×1 part and projectors.

    With ``n`` the projectors' size and ``h`` a ``c_out×c_in`` matrix with ``max(c_in, c_out)
    = n`` (orthonormal rows or columns), the symbol is

    .. math:: \hat K = H \prod_i \hat B(P_i, Q_i) \ \ (c_{out} \le c_{in}), \qquad
              \hat K = \prod_i \hat B(P_i, Q_i)\, H \ \ (c_{in} < c_{out}).

    Both are the ``c_out×c_in`` channel block of an ``n``-channel BCOP (``H`` is a block of an
    orthogonal matrix, and :math:`\hat B(P, Q) H_o = H_o \hat B(H_o^\top P H_o, H_o^\top Q H_o)`
    moves an orthogonal ``H_o`` through the blocks), so the construction covers the same set
    of kernels with ``H`` on the side where it is smaller.

    Args:
        h: the ``(c_out, c_in)`` 1×1 part.
        projectors: ``(2(k−1), n, n)`` symmetric projectors ``P_1, Q_1, P_2, Q_2, …``
            (``P_i`` acts along the height, ``Q_i`` along the width).

    Returns:
        The ``(c_out, c_in, k, k)`` kernel, ``k = 1 + len(projectors) // 2``.

    Example:
        >>> from lipsort.conv import singular_values
        >>> p = torch.diag(torch.tensor([1., 1., 0., 0.]))
        >>> h = torch.eye(4)[:, :2]                                   # 2 -> 4 channels
        >>> w = bcop_kernel(h, torch.stack([p, p.flip(0, 1)] * 2))
        >>> w.shape, bool(torch.allclose(singular_values(w, 6).float(), torch.ones(72)))
        (torch.Size([4, 2, 3, 3]), True)
    """
    if h.dim() != 2 or projectors.dim() != 3 or projectors.shape[-1] != projectors.shape[-2]:
        raise ValueError(
            f"h must be a (c_out, c_in) matrix and projectors (2(k-1), n, n), got "
            f"{tuple(h.shape)} and {tuple(projectors.shape)}"
        )
    c_out, c_in = h.shape
    if projectors.shape[0] == 0:
        return h[:, :, None, None]
    if projectors.shape[0] % 2:
        raise ValueError(f"projectors come in pairs (P_i, Q_i), got {projectors.shape[0]}")
    if projectors.shape[-1] != max(c_in, c_out):
        raise ValueError(
            f"projectors must be n×n with n = max(c_in, c_out) = {max(c_in, c_out)} for h of "
            f"shape {tuple(h.shape)}, got {tuple(projectors.shape)}"
        )
    ps, qs = _pair(projectors[0::2]), _pair(projectors[1::2])  # (k-1, 2, n, n)
    # H is folded into the first block's P-factors (or the last block's Q-factors), where its
    # product is smallest; all other blocks are built in one batched product.
    if c_out <= c_in:
        kernel = _taps(h @ ps[0], qs[0])
        for block in _taps(ps[1:], qs[1:]):
            kernel = _compose(kernel, block)
    else:
        kernel = _taps(ps[-1], qs[-1] @ h)
        for block in reversed(_taps(ps[:-1], qs[:-1])):
            kernel = _compose(block, kernel)
    return kernel


def _random_orthonormal(shape: tuple[int, ...], dtype, device) -> Tensor:
    """Haar-distributed matrices with orthonormal columns (tall) or rows (wide), in float64."""
    wide = shape[-2] < shape[-1]
    tall_shape = shape[:-2] + ((shape[-1], shape[-2]) if wide else shape[-2:])
    q, r = torch.linalg.qr(torch.randn(tall_shape, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    q = q.transpose(-1, -2) if wide else q
    return q.to(dtype=dtype or torch.get_default_dtype(), device=device)


class BCOPKernel(EvalCachedConstraint):
    r"""Maps the free matrices ``(H°, V°)`` of a :class:`BCOP` to its kernel (eval-cached).

    ``H = bjorck(H°)``, ``V_i = bjorck(V°_i)`` (columns beyond rank ``r_i`` masked),
    ``P_i = V_i V_iᵀ``, then :func:`bcop_kernel`. In eval mode the kernel is computed once and
    reused until the free matrices change (:class:`lipsort.parametrizations.EvalCachedConstraint`).
    """

    def __init__(self, ranks, n_iters, order, eval_iters):
        super().__init__()
        self.ranks = tuple(ranks)
        self.n_iters, self.order = n_iters, order
        self.eval_iters = n_iters if eval_iters is None else eval_iters
        r_max = max(self.ranks, default=0)
        if any(r != r_max for r in self.ranks):
            mask = torch.arange(r_max) < torch.tensor(self.ranks)[:, None]
            self.register_buffer("mask", mask[:, None, :].float(), persistent=False)
        else:
            self.mask = None

    def factors(self, h_orig: Tensor, v_orig: Tensor) -> tuple[Tensor, Tensor]:
        """``(H, V)``: the Björck-orthonormalized 1×1 part and projector bases."""
        iters = self.n_iters if self.training else self.eval_iters
        h = LF.bjorck(h_orig, iters, self.order)
        if v_orig.shape[0] == 0 or v_orig.shape[-1] == 0:
            return h, v_orig
        v = LF.bjorck(v_orig, iters, self.order)
        if self.mask is not None:
            v = v * self.mask.to(v.dtype)
        return h, v

    def constrain(self, original: tuple[Tensor, Tensor]) -> Tensor:
        h, v = self.factors(*original)
        return bcop_kernel(h, v @ v.transpose(-1, -2))

    def cache_inputs(self, original: tuple[Tensor, Tensor]) -> tuple[Tensor, ...]:
        return tuple(original)

    def cache_config(self) -> tuple:
        return (self.eval_iters, self.order)

    def extra_repr(self) -> str:
        return f"n_iters={self.n_iters}, order={self.order}, eval_iters={self.eval_iters}"


def _ranks(projector_ranks, n: int, count: int) -> tuple[int, ...]:
    if projector_ranks is None:
        return (n // 2,) * count
    if isinstance(projector_ranks, Sequence) and not isinstance(projector_ranks, str):
        ranks = tuple(check_int(r, "projector rank", 0) for r in projector_ranks)
        if len(ranks) != count:
            raise ValueError(
                f"projector_ranks needs one rank per projector, 2(k-1) = {count} for this "
                f"kernel size, got {len(ranks)}"
            )
    else:
        ranks = (check_int(projector_ranks, "projector_ranks", 0),) * count
    if any(r > n for r in ranks):
        raise ValueError(
            f"projector ranks must lie in 0..{n} (n = max(in_channels, out_channels)), got {ranks}"
        )
    return ranks


class BCOP(CircularConv2d):
    r"""Orthogonal convolution by block convolution of symmetric projectors (Note [BCOP]).

    Used like ``nn.Conv2d(in_channels, out_channels, kernel_size, padding="same",
    padding_mode="circular")``: a stride-1 circular convolution whose kernel ``weight`` is
    :math:`\hat K = H\prod_{i<k}\hat B(P_i, Q_i)` restricted to the top-left ``c_out×c_in``
    channels of the ``n = max(c_in, c_out)``-channel construction. Exactly orthogonal for
    ``c_in = c_out``, an isometry for ``c_in < c_out``, orthonormal rows for ``c_in > c_out``
    (for any parameter value, up to Björck's convergence). Even kernel sizes are anchored as
    ``padding="same"`` (Note [anchor] in ``lipsort.conv._base``); strided layers are built by
    :func:`lipsort.conv.strided_conv`.

    Free parameters: ``ortho_orig`` (``c_out×c_in``, for ``H``, which needs orthonormal rows or
    columns only: :func:`bcop_kernel`) and ``proj_orig`` (``(2(k−1), n, r_max)``, for the
    projector bases), initialized orthonormal. The kernel is computed once per forward pass
    in training mode (two batched Björck calls, the taps of all blocks in batched products,
    ``k − 2`` block convolutions) and cached in eval mode.

    Args:
        in_channels, out_channels: channel counts (any positive integers).
        kernel_size: ``k`` (an int or ``(k, k)``), ``k ≥ 1``; ``k = 1`` is the 1×1 part alone.
        n_iters: Björck iterations in training mode.
        order: Björck's Taylor order (1..4).
        eval_iters: Björck iterations in eval mode (default ``n_iters``).
        projector_ranks: the rank of every projector (default ``⌊n/2⌋``, as Li et al.), or one
            rank per projector ``(P_1, Q_1, P_2, …)``, each in ``0..n``.
        bias: add a learnable bias.
        stride, padding, padding_mode: accepted only as ``1``, ``"same"`` (or ``k//2`` for an
            odd ``k``) and ``"circular"``, for ``nn.Conv2d`` compatibility.
        input_size: the spatial size ``(H, W)`` of the inputs, for a certificate before any
            forward pass (it is recorded at each forward pass anyway).
        device, dtype: of the parameters.

    Raises:
        ValueError: unsupported stride, padding, padding mode, non-square kernel, bad channel
            counts, ranks or iteration counts; wrong input dimensions or channels at forward.

    Example:
        >>> from lipsort.conv import singular_values
        >>> _ = torch.manual_seed(0)
        >>> layer = BCOP(8, 8, 3, dtype=torch.float64)
        >>> x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
        >>> layer(x).shape
        torch.Size([2, 8, 6, 6])
        >>> bool((singular_values(layer) - 1).abs().max() < 1e-12)  # at the last input's size
        True
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
        projector_ranks: int | Sequence[int] | None = None,
        bias: bool = True,
        stride=1,
        padding="same",
        padding_mode: str = "circular",
        input_size=None,
        device=None,
        dtype=None,
    ):
        super().__init__(
            "BCOP",
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
        k = self.kernel_size[0]
        self.max_channels = n = max(self.in_channels, self.out_channels)
        ranks = _ranks(projector_ranks, n, 2 * (k - 1))
        factory = {"device": device, "dtype": dtype}
        shape = (self.out_channels, self.in_channels)
        self.ortho_orig = nn.Parameter(torch.empty(shape, **factory))
        self.proj_orig = nn.Parameter(torch.empty(2 * (k - 1), n, max(ranks, default=0), **factory))
        self.kernel_map = BCOPKernel(ranks, n_iters, order, eval_iters).to(device=device)
        self.reset_parameters()

    @property
    def n_iters(self) -> int:
        return self.kernel_map.n_iters

    @property
    def projector_ranks(self) -> tuple[int, ...]:
        return self.kernel_map.ranks

    def reset_parameters(self) -> None:
        """Orthonormal ``H°`` and ``V°`` (Björck's fixed points); bias uniform in ±1/√c_out."""
        with torch.no_grad():
            p = self.ortho_orig
            self.ortho_orig.copy_(_random_orthonormal(tuple(p.shape), p.dtype, p.device))
            v = self.proj_orig
            if v.numel():
                v.copy_(_random_orthonormal(tuple(v.shape), v.dtype, v.device))
            if self.bias is not None:
                bound = 1 / math.sqrt(self.out_channels)
                self.bias.uniform_(-bound, bound)

    @property
    def weight(self) -> Tensor:
        """The effective ``(c_out, c_in, k, k)`` kernel (cached in eval mode)."""
        return self.kernel_map.lookup((self.ortho_orig, self.proj_orig))

    def orthogonal_part(self) -> Tensor:
        """``H``, the Björck-orthonormalized ``c_out×c_in`` 1×1 part (in the current mode)."""
        return self.kernel_map.factors(self.ortho_orig, self.proj_orig)[0]

    def projectors(self) -> Tensor:
        """``(2(k−1), n, n)`` symmetric projectors ``P_1, Q_1, P_2, …`` (current mode)."""
        _, v = self.kernel_map.factors(self.ortho_orig, self.proj_orig)
        if v.shape[-1] == 0:
            n = self.max_channels
            return v.new_zeros(v.shape[0], n, n)
        return v @ v.transpose(-1, -2)

    def component(self) -> tuple[int | None, tuple[int, ...]]:
        """The construction's labels of its connected component: ``(sign det H, ranks)``.

        Both are integers no continuous training path can change; see
        :func:`lipsort.conv.component_invariants` for what the kernel itself determines.
        The sign is None for ``c_in ≠ c_out`` (matrices with orthonormal rows, or columns,
        of a given non-square shape form a connected set).
        """
        if self.in_channels != self.out_channels:
            return None, self.projector_ranks
        with torch.no_grad():
            sign = int(torch.sign(torch.linalg.det(self.orthogonal_part().to(torch.float64))))
        return sign, self.projector_ranks

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, n_iters={self.n_iters}, "
            f"projector_ranks={self.projector_ranks}"
        )


def embed_bcop(layer: BCOP) -> BCOP:
    r"""A ``2n``-channel BCOP of half-rank projectors that computes ``layer`` on ``n`` channels.

    For an ``n``-channel BCOP (``c_in = c_out = n``, any projector ranks ``r_i``, either sign
    of ``det H``) the result has

    .. math:: H' = \begin{bmatrix} H & 0 \\ 0 & D \end{bmatrix}, \qquad
              P'_i = \begin{bmatrix} P_i & 0 \\ 0 & I - P_i \end{bmatrix},

    with ``D`` = ``I`` or a reflection so that ``det H' = +1``: every projector has rank
    :math:`r_i + (n - r_i) = n` and the symbol is block diagonal, so on the first ``n``
    channels it is ``layer``'s. All ``n``-channel BCOPs therefore lie in a single component
    of ``2n``-channel BCOPs, the one of the default ranks ``n = 2n/2`` and ``det = +1``
    (Li et al.'s argument for fixing the rank at half). The result uses ``layer``'s eval-mode
    factors, iteration settings, dtype, device and mode; its bias is ``(b, 0)``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> small = BCOP(3, 3, 3, projector_ranks=(0, 3, 1, 2), dtype=torch.float64).eval()
        >>> big = embed_bcop(small).eval()
        >>> big.projector_ranks, big.component()[0]
        ((3, 3, 3, 3), 1)
        >>> x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
        >>> y = big(torch.cat([x, torch.zeros_like(x)], 1))[:, :3]
        >>> bool(torch.allclose(y, small(x), atol=1e-12))
        True
    """
    if type(layer) is not BCOP:
        raise TypeError(f"embed_bcop takes a BCOP, got {type(layer).__name__}")
    if layer.in_channels != layer.out_channels:
        raise ValueError(
            "embed_bcop takes a BCOP with in_channels = out_channels, got "
            f"{layer.in_channels} -> {layer.out_channels}"
        )
    n, k = layer.in_channels, layer.kernel_size[0]
    km = layer.kernel_map
    with torch.no_grad():
        was = km.training
        km.eval()
        h, v = km.factors(layer.ortho_orig, layer.proj_orig)
        km.train(was)
        h, v = h.to(torch.float64), v.to(torch.float64)
        d = torch.eye(n, dtype=torch.float64, device=h.device)
        if torch.linalg.det(h) < 0:
            d[0, 0] = -1
        h2 = torch.block_diag(h, d)
        bases = []
        for i, r in enumerate(layer.projector_ranks):
            basis = v[i, :, :r]
            # Orthonormal basis of the complement range(I - P): the last n - r columns of a
            # complete QR of the basis.
            q = torch.linalg.qr(basis, mode="complete")[0] if r else torch.eye(n).to(basis)
            bases.append(torch.block_diag(basis, q[:, r:]))
    big = BCOP(
        2 * n,
        2 * n,
        k,
        km.n_iters,
        order=km.order,
        eval_iters=km.eval_iters,
        bias=layer.bias is not None,
        input_size=layer.input_size,
        device=layer.ortho_orig.device,
        dtype=layer.ortho_orig.dtype,
    )
    with torch.no_grad():
        big.ortho_orig.copy_(h2)
        if bases:
            big.proj_orig.copy_(torch.stack(bases))
        if layer.bias is not None:
            big.bias.copy_(torch.cat([layer.bias, torch.zeros_like(layer.bias)]))
    return big.train(layer.training)


register_lipschitz_bound(BCOP, circular_conv_bound)
register_frozen_export(BCOP, BCOP.to_conv2d)
