"""Argument checks shared by the library: one phrasing for every integer, number and label error.

Example:
    >>> check_int(3, "steps")
    3
    >>> check_int(True, "steps")
    Traceback (most recent call last):
    ...
    ValueError: steps must be a positive integer, got True
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

__all__ = ["check_int", "check_positive", "binary_labels"]


def _integer_kind(minimum: int) -> str:
    if minimum == 0:
        return "a non-negative integer"
    if minimum == 1:
        return "a positive integer"
    return f"an integer >= {minimum}"


def check_int(value, name: str, minimum: int = 1) -> int:
    """``value`` as an ``int`` if it is an integer ``>= minimum`` (bools are refused), else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be {_integer_kind(minimum)}, got {value!r}")
    return int(value)


def check_positive(value, name: str) -> float:
    """``value`` as a ``float`` if it is a finite real number ``> 0`` (bools are refused), else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def binary_labels(labels, n: int, what: str = "binary scores") -> Tensor:
    r"""Validate the labels of ``n`` binary scores and return them as a boolean ``(n,)`` tensor (True = positive).

    Labels have shape ``(n,)`` or ``(n, 1)`` and all lie in :math:`\{0, 1\}` or all in
    :math:`\{-1, +1\}`, in any real dtype.

    Example:
        >>> binary_labels(torch.tensor([-1, 1, 1]), 3).tolist()
        [False, True, True]
    """
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.shape not in ((n,), (n, 1)):
        raise ValueError(f"labels must have shape ({n},) or ({n}, 1) for {n} {what}, got {tuple(labels.shape)}")
    if labels.is_complex():
        raise TypeError(f"binary labels must be real, got dtype {labels.dtype}")
    t = labels.reshape(n)
    values = set(torch.unique(t).tolist())
    if not (values <= {0, 1} or values <= {-1, 1}):
        raise ValueError(f"binary labels must all lie in {{0, 1}} or all in {{-1, +1}}, got {sorted(values)}")
    return t > 0
