"""lipsort: Lipschitz networks that sort — GroupSort activations, orthonormal and
norm-constrained layers, losses and robustness certificates.

Example:
    >>> import torch, lipsort
    >>> net = torch.nn.Sequential(
    ...     lipsort.bjorck_orthonormal(torch.nn.Linear(4, 8)), lipsort.MaxMin(),
    ...     lipsort.bjorck_orthonormal(torch.nn.Linear(8, 2)))
    >>> bool(lipsort.lipschitz_upper_bound(net) <= 1 + 1e-4)
    True
"""

from . import functional
from .activations import FullSort, GroupSort, MaxMin
from .runtime import seed_everything, setup

__version__ = "0.1.0"

__all__ = [
    "functional",
    "GroupSort",
    "MaxMin",
    "FullSort",
    "seed_everything",
    "setup",
]
