r"""A straightforward per-tap BCOP construction: the peer of :class:`lipsort.conv.BCOP`
in tests and in ``python -m lipsort.bench``.

It computes the same kernel from the same free parameters the way the construction reads in
the paper and the authors' code: ``2(k−1) + 1`` square ``n×n`` matrices (``n = max(c_in,
c_out)``), each Björck-orthonormalized on its own (differentiated by autograd through every
operation of the steps, as in the authors' code); projectors from their first ``r`` columns;
each ``2×2`` block as four matrix products; block convolution as a loop over pairs of taps;
``H`` multiplied into each tap, and the ``c_out×c_in`` channel block sliced at the end.
:class:`~lipsort.conv.BCOP`'s parameters are embedded into those square matrices with zero
rows or columns, which Björck's iteration keeps at zero, so both give one kernel. BCOP instead
orthonormalizes ``H`` at its ``c_out×c_in`` shape and the projector bases at ``n×r``, in one
batched call each, and builds the taps of all blocks in batched products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torch import Tensor

from .. import _bjorck
from .. import functional as LF
from .bcop import BCOP

__all__ = ["bcop_kernel_per_tap"]


def _matrix_conv(m1: dict, m2: dict, k: int, n: int, ref: Tensor) -> dict:
    """Block convolution of a ``k×k`` and a ``2×2`` dictionary of taps, one tap at a time."""
    result = {}
    for i in range(k + 1):
        for j in range(k + 1):
            acc = torch.zeros(n, n, dtype=ref.dtype, device=ref.device)
            for a in range(k):
                for b in range(k):
                    if 0 <= i - a < 2 and 0 <= j - b < 2:
                        acc = acc + m1[a, b] @ m2[i - a, j - b]
            result[i, j] = acc
    return result


def _bjorck_autograd(w: Tensor, n_iters: int, order: int) -> Tensor:
    """:func:`lipsort.functional.bjorck` with autograd through every operation of its steps."""
    return _bjorck.plain(LF.bjorck_prescale(w), n_iters, LF._BJORCK_COEFFS[: order + 1])


def bcop_kernel_per_tap(layer: BCOP, fast_bjorck: bool = False) -> Tensor:
    """The kernel of ``layer`` (in its current mode), built one matrix and one tap at a time.

    Equal to ``layer.weight`` up to rounding, differentiable in the same parameters. With
    ``fast_bjorck`` the Björck steps are :func:`lipsort.functional.bjorck`'s (a hand-written
    backward) instead of autograd's, to separate the two sources of BCOP's speed.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> layer = BCOP(6, 4, 3, dtype=torch.float64)
        >>> bool(torch.allclose(bcop_kernel_per_tap(layer), layer.weight, atol=1e-12))
        True
    """
    km = layer.kernel_map
    iters = km.n_iters if km.training else km.eval_iters
    c_out, c_in = layer.out_channels, layer.in_channels
    n, k = layer.max_channels, layer.kernel_size[0]
    left = c_out <= c_in  # H multiplies the blocks from the left (else from the right)
    h_square = nnf.pad(layer.ortho_orig, (0, n - c_in, 0, n - c_out))
    bjorck = LF.bjorck if fast_bjorck else _bjorck_autograd
    h = bjorck(h_square, iters, km.order)
    eye = torch.eye(n, dtype=h.dtype, device=h.device)
    projs = []
    for i, r in enumerate(layer.projector_ranks):
        v_orig = layer.proj_orig[i]
        v = bjorck(nnf.pad(v_orig, (0, n - v_orig.shape[-1])), iters, km.order)
        v = v[:, :r]
        projs.append(v @ v.T)
    taps = {(0, 0): eye} if k == 1 else None
    for block in range(k - 1):
        p, q = projs[2 * block], projs[2 * block + 1]
        b = {
            (0, 0): p @ q,
            (0, 1): p @ (eye - q),
            (1, 0): (eye - p) @ q,
            (1, 1): (eye - p) @ (eye - q),
        }
        taps = b if taps is None else _matrix_conv(taps, b, block + 1, n, h)
    rows = []
    for a in range(k):
        row = [(h @ taps[a, b] if left else taps[a, b] @ h)[:c_out, :c_in] for b in range(k)]
        rows.append(torch.stack(row, dim=-1))
    return torch.stack(rows, dim=-2)
