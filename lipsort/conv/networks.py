r"""The networks of Li et al. (2019), Table 1, and the LeNet of Anil et al.'s small-data test.

* :func:`bcop_small`: conv 16 4×4/2, conv 32 4×4/2, FC 100, FC 10 (Kolter and Wong's "small").
* :func:`bcop_large`: conv 32 3×3, conv 32 4×4/2, conv 64 3×3, conv 64 4×4/2, FC 512, FC 512,
  FC 10 ("large").
* :func:`fc3`: the 784-1024-1024-1024-10 Björck MLP.
* :func:`lenet`: conv 10 5×5, max-pool, conv 20 5×5, max-pool, FC 50, FC 10, with plain,
  reshaped-Björck or RKO convolutions (Anil et al.'s small-data MNIST experiment).

Every convolution is circular and size preserving; a strided ``k×k`` convolution is
invertible downsampling followed by a stride-1 ``(k/s)×(k/s)`` convolution
(:func:`lipsort.conv.strided_conv`), as the authors build them. Every fully connected layer
is Björck-orthonormal and MaxMin sits between layers, so with ``conv="bcop"`` each layer is
gradient-norm preserving and :func:`lipsort.certify.lipschitz_upper_bound` is 1 (up to
Björck's convergence).

Example:
    >>> import torch
    >>> from lipsort.certify import lipschitz_upper_bound
    >>> _ = torch.manual_seed(0)
    >>> net = bcop_small("bcop").eval()
    >>> net(torch.rand(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    >>> abs(float(lipschitz_upper_bound(net)) - 1) < 1e-4
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch  # noqa: F401  (the doctests use it)
from torch import nn

from .._checks import check_int
from ..activations import MaxMin
from ..certify import register_lipschitz_bound
from .baselines import OSSN, RKO, strided_conv
from .bcop import BCOP

__all__ = ["CONVS", "Scale", "bcop_large", "bcop_small", "fc3", "freeze_projectors", "lenet"]

#: The orthogonal-convolution layers of Table 1.
CONVS = ("bcop", "rko", "ossn")


class Scale(nn.Module):
    """Multiply by a fixed ``factor`` (its Lipschitz constant, in every norm).

    Example:
        >>> Scale(5.0)(torch.ones(2)).tolist()
        [5.0, 5.0]
    """

    def __init__(self, factor: float):
        super().__init__()
        self.factor = float(factor)

    def forward(self, x):
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor:g}"


register_lipschitz_bound(Scale, lambda module, norm: abs(module.factor))


def _conv_factory(conv: str, n_iters: int, allowed: Sequence[str] = CONVS):
    """``make(c_in, c_out, k, input_size)``: one stride-1 convolution of type ``conv``."""
    if conv not in allowed:
        raise ValueError(f"unknown conv {conv!r}; choose one of {tuple(allowed)}")

    def make(c_in, c_out, k, input_size):
        if conv == "bcop":
            return BCOP(c_in, c_out, k, n_iters, input_size=input_size)
        if conv == "rko":
            return RKO(c_in, c_out, k, n_iters, input_size=input_size)
        return OSSN(c_in, c_out, k, input_size=input_size)

    return make


def _bjorck_linear(n_in: int, n_out: int, n_iters: int) -> nn.Module:
    from ..parametrizations import bjorck_orthonormal

    return bjorck_orthonormal(nn.Linear(n_in, n_out), n_iters=n_iters)


def _convnet(convs, fcs, conv, in_channels, input_size, num_classes, n_iters) -> nn.Sequential:
    """``convs``: ``(c_out, k, stride)`` triples; ``fcs``: hidden widths of the dense part."""
    in_channels = check_int(in_channels, "in_channels")
    num_classes = check_int(num_classes, "num_classes")
    n_iters = check_int(n_iters, "n_iters")
    size = check_int(input_size, "input_size")
    make = _conv_factory(conv, n_iters)
    layers: list[nn.Module] = []
    c = in_channels
    for c_out, k, stride in convs:
        if size % stride:
            raise ValueError(
                f"input_size {input_size} is not divisible by the network's strides: a "
                f"{k}×{k}/{stride} convolution meets a {size}×{size} input"
            )
        layer = lambda a, b, kk, input_size=None: make(a, b, kk, input_size)  # noqa: E731
        layers += [strided_conv(layer, c, c_out, k, stride, input_size=size), MaxMin()]
        c, size = c_out, size // stride
    layers.append(nn.Flatten())
    width = c * size * size
    for h in fcs:
        layers += [_bjorck_linear(width, h, n_iters), MaxMin()]
        width = h
    layers.append(_bjorck_linear(width, num_classes, n_iters))
    return nn.Sequential(*layers)


def bcop_small(
    conv: str = "bcop",
    *,
    in_channels: int = 1,
    input_size: int = 28,
    num_classes: int = 10,
    n_iters: int = 20,
) -> nn.Sequential:
    """Li et al.'s Small network: conv 16 4×4/2, conv 32 4×4/2, FC 100, FC 10, MaxMin.

    Args:
        conv: ``"bcop"``, ``"rko"`` or ``"ossn"`` (10 power iterations).
        in_channels, input_size: of the square images (1, 28 for MNIST; 3, 32 for CIFAR-10).
        num_classes: outputs.
        n_iters: Björck iterations of every BCOP/RKO and dense layer (20, as the authors).

    Raises:
        ValueError: an unknown ``conv``, or an input size the strides do not divide.

    Example:
        >>> [type(m).__name__ for m in bcop_small("rko")][:3]
        ['Sequential', 'MaxMin', 'Sequential']
    """
    return _convnet(
        [(16, 4, 2), (32, 4, 2)], [100], conv, in_channels, input_size, num_classes, n_iters
    )


def bcop_large(
    conv: str = "bcop",
    *,
    in_channels: int = 1,
    input_size: int = 28,
    num_classes: int = 10,
    n_iters: int = 20,
    fc_width: int = 512,
) -> nn.Sequential:
    """Li et al.'s Large network: conv 32 3×3, conv 32 4×4/2, conv 64 3×3, conv 64 4×4/2,
    FC 512, FC 512, FC 10, MaxMin. Arguments as :func:`bcop_small`; ``fc_width`` replaces
    the 512 of the two hidden dense layers (a cheaper variant for smoke runs).

    Example:
        >>> sum(isinstance(m, MaxMin) for m in bcop_large("ossn"))
        6
    """
    convs = [(32, 3, 1), (32, 4, 2), (64, 3, 1), (64, 4, 2)]
    fc_width = check_int(fc_width, "fc_width")
    return _convnet(convs, [fc_width] * 2, conv, in_channels, input_size, num_classes, n_iters)


def fc3(in_features: int = 784, num_classes: int = 10, width: int = 1024, n_iters: int = 20):
    """The FC-3 baseline: flatten, then ``in-1024-1024-1024-10`` Björck layers with MaxMin.

    Example:
        >>> net = fc3()
        >>> net(torch.rand(3, 1, 28, 28)).shape
        torch.Size([3, 10])
    """
    from ..models import mlp

    sizes = [check_int(in_features, "in_features")] + [check_int(width, "width")] * 3
    net = mlp(sizes + [check_int(num_classes, "num_classes")], "maxmin", "bjorck", n_iters=n_iters)
    return nn.Sequential(nn.Flatten(), *net)


def lenet(
    conv: str = "standard",
    *,
    activation: str = "relu",
    n_iters: int = 5,
    in_channels: int = 1,
    input_size: int = 28,
    num_classes: int = 10,
) -> nn.Sequential:
    r"""LeNet of Anil et al.'s small-data experiment: conv 10 5×5, max-pool 2, conv 20 5×5,
    max-pool 2, FC 50, FC 10, with circular size-preserving convolutions.

    ``conv``: ``"standard"`` (``nn.Conv2d`` and ``nn.Linear``), ``"bjorck"`` (the authors'
    Björck convolution: the reshaped kernel orthonormalized, *without* the ``1/k``
    correction, so each convolution has norm at most ``k`` = :class:`RKO` followed by
    :class:`Scale` ``(k)``; Björck dense layers) or ``"rko"`` (with the correction, norm
    ≤ 1). ``n_iters``: Björck iterations (5, as the authors' configuration).

    Example:
        >>> net = lenet("bjorck")
        >>> net(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    if conv not in ("standard", "bjorck", "rko"):
        raise ValueError(f"unknown conv {conv!r}; choose one of ('standard', 'bjorck', 'rko')")
    if activation not in ("relu", "maxmin"):
        raise ValueError(f"unknown activation {activation!r}; choose 'relu' or 'maxmin'")
    size = check_int(input_size, "input_size")
    if size % 4:
        raise ValueError(f"lenet needs an input size divisible by 4 (two 2×2 poolings), got {size}")
    n_iters = check_int(n_iters, "n_iters")
    act = nn.ReLU if activation == "relu" else MaxMin

    def conv_layer(c_in, c_out):
        if conv == "standard":
            return nn.Conv2d(c_in, c_out, 5, padding="same", padding_mode="circular")
        layer = RKO(c_in, c_out, 5, n_iters)
        return layer if conv == "rko" else nn.Sequential(layer, Scale(5.0))

    def linear(n_in, n_out):
        return nn.Linear(n_in, n_out) if conv == "standard" else _bjorck_linear(n_in, n_out, n_iters)

    c_in = check_int(in_channels, "in_channels")
    flat = 20 * (size // 4) ** 2
    return nn.Sequential(
        conv_layer(c_in, 10), nn.MaxPool2d(2), act(),
        conv_layer(10, 20), nn.MaxPool2d(2), act(),
        nn.Flatten(), linear(flat, 50), act(), linear(50, check_int(num_classes, "num_classes")),
    )  # fmt: skip


def freeze_bcop(model: nn.Module) -> int:
    """Freeze every parameter of every :class:`BCOP` in ``model`` (orthogonal part, projectors,
    bias): Li et al.'s ablation *BCOP-Fixed*, whose convolutions keep their random orthogonal
    initialization while the dense layers train. Returns the number of frozen parameters;
    raises if ``model`` has no BCOP.

    Example:
        >>> net = bcop_small("bcop")
        >>> n = freeze_bcop(net)
        >>> n == sum(p.numel() for m in net.modules() if isinstance(m, BCOP) for p in m.parameters())
        True
        >>> all(p.requires_grad for p in net[-1].parameters())  # the last dense layer trains
        True
    """
    layers = [m for m in model.modules() if isinstance(m, BCOP)]
    if not layers:
        raise ValueError("freeze_bcop: the model has no BCOP layer")
    params = [p for m in layers for p in m.parameters()]
    for p in params:
        p.requires_grad_(False)
    return sum(p.numel() for p in params)


def freeze_projectors(model: nn.Module) -> int:
    """Freeze the projector parameters of every :class:`BCOP` in ``model``: the ablation of
    a finer ablation than Li et al.'s :func:`freeze_bcop` (only the spatial structure is fixed:
    the 1×1 parts, the biases and the dense layers train). Returns the number of frozen parameters; raises if ``model`` has no BCOP.

    Example:
        >>> net = bcop_small("bcop")
        >>> freeze_projectors(net) == sum(m.proj_orig.numel() for m in net.modules()
        ...                                if isinstance(m, BCOP))
        True
    """
    count = 0
    for m in model.modules():
        if isinstance(m, BCOP):
            m.proj_orig.requires_grad_(False)
            count += m.proj_orig.numel()
    if not any(isinstance(m, BCOP) for m in model.modules()):
        raise ValueError("freeze_projectors: the model has no BCOP layer")
    return count
