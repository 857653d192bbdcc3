"""Chapter glue: the measurements, tables and figures of each chapter of the book, one module per chapter.

* :mod:`~lipsort.experiments.gradient_norm`: chapter 01 (gradient norm preservation, A1).
* :mod:`~lipsort.experiments.groupsort_universality`: chapter 02 (GroupSort, universality, B1).
* :mod:`~lipsort.experiments.norm_constraints`: chapter 03 (Björck, spectral, ℓ∞ constraints).

Submodules load on first access, so ``import lipsort.experiments`` stays light; the library
they use is :mod:`lipsort` itself, and the book's tooling is :mod:`lipsort.book`.

Example:
    >>> import lipsort.experiments as ex
    >>> ex.norm_constraints.bjorck_map(1.0, 2)
    array(1.)
"""

import importlib


def __getattr__(name: str):
    # ``lipsort.experiments.gradient_norm`` works without importing the submodule first.
    if name.startswith("_"):
        raise AttributeError(name)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name == f"{__name__}.{name}":
            raise AttributeError(f"module {__name__!r} has no attribute or submodule {name!r}") from None
        raise
