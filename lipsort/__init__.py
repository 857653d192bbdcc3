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

import importlib

from . import attacks, certify, functional, losses, models, parametrizations
from .activations import FullSort, GroupSort, MaxMin
from .certify import (
    certified_accuracy,
    certified_radius,
    empirical_lipschitz,
    lipschitz_upper_bound,
)
from .parametrizations import bjorck_orthonormal, frozen, linf_projected, spectral_normalized
from .runtime import seed_everything, setup

__version__ = "0.1.0"  # the one definition; pyproject.toml reads it

__all__ = [
    "attacks",
    "certify",
    "functional",
    "losses",
    "models",
    "optim",
    "parametrizations",
    "bjorck_orthonormal",
    "spectral_normalized",
    "linf_projected",
    "frozen",
    "certified_radius",
    "certified_accuracy",
    "lipschitz_upper_bound",
    "empirical_lipschitz",
    "GroupSort",
    "MaxMin",
    "FullSort",
    "seed_everything",
    "setup",
]


# Loaded on first access: optim imports pytorch-optimizer (slow), data imports torchvision,
# experiments (the chapters' glue) and book (the book's tooling) import plotting and notebook libraries.
_LAZY = ("optim", "data", "wasserstein", "lattice", "runtime", "experiments", "book", "bench", "reproduce")


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The training engine (lipsort.training) and the orthogonal convolutions (lipsort.conv).
_LAZY += ("training", "conv")
