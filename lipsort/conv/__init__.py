r"""Orthogonal convolutions (Li et al., 2019; chapter 06).

* :class:`BCOP`: exactly orthogonal circular convolutions by block convolution of symmetric
  projectors (:mod:`lipsort.conv.bcop`), with :func:`bcop_kernel`, :func:`projector_block`
  and :func:`embed_bcop` (every ``n``-channel BCOP inside the half-rank ``2n``-channel one).
* Baselines :class:`RKO` and :class:`OSSN`; :class:`InvertibleDownsampling` and
  :func:`strided_conv` for the strided layers (:mod:`lipsort.conv.baselines`).
* :func:`singular_values` (exact, by the FFT) and :func:`component_invariants`
  (:mod:`lipsort.conv.spectrum`); :func:`circular_conv2d` and its adjoint.
* The networks of Table 1 and Anil et al.'s LeNet: :func:`bcop_small`, :func:`bcop_large`,
  :func:`fc3`, :func:`lenet`, :func:`freeze_bcop`, :func:`freeze_projectors` (:mod:`lipsort.conv.networks`).
* :func:`~lipsort.conv.reference.bcop_kernel_per_tap`: the straightforward construction,
  a peer for tests and benchmarks.

Importing this package registers every layer with
:func:`lipsort.certify.lipschitz_upper_bound` (exact FFT norms at the layer's input size) and
:func:`lipsort.parametrizations.frozen` (export to ``nn.Conv2d(padding="same",
padding_mode="circular")`` and ``nn.PixelUnshuffle``).

Example:
    >>> import torch
    >>> from lipsort.certify import lipschitz_upper_bound
    >>> from lipsort.conv import BCOP, strided_conv
    >>> from lipsort import MaxMin
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(strided_conv(BCOP, 1, 8, 4, 2), MaxMin(), BCOP(8, 8, 3)).eval()
    >>> net(torch.randn(2, 1, 12, 12)).shape
    torch.Size([2, 8, 6, 6])
    >>> abs(float(lipschitz_upper_bound(net)) - 1) < 1e-5
    True
"""

from ._base import CircularConv2d, circular_conv2d, circular_conv2d_transpose
from .baselines import OSSN, RKO, InvertibleDownsampling, strided_conv
from .bcop import BCOP, bcop_kernel, embed_bcop, projector_block
from .networks import CONVS, Scale, bcop_large, bcop_small, fc3, freeze_bcop, freeze_projectors, lenet
from .spectrum import component_invariants, singular_values

__all__ = [
    "BCOP",
    "CONVS",
    "Scale",
    "bcop_large",
    "bcop_small",
    "fc3",
    "freeze_bcop",
    "freeze_projectors",
    "lenet",
    "OSSN",
    "RKO",
    "CircularConv2d",
    "InvertibleDownsampling",
    "bcop_kernel",
    "circular_conv2d",
    "circular_conv2d_transpose",
    "component_invariants",
    "embed_bcop",
    "projector_block",
    "singular_values",
    "strided_conv",
]
