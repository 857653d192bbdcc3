"""Book glue: what the chapters of the book (``notebooks/``) call.

Chapter-specific training loops and plots live in submodules (``lipsort.experiments.<name>``),
loaded on first access so that ``import lipsort.experiments`` stays light; this module
exposes the ledger and :func:`finish`, the last cell of every chapter.

Example:
    >>> import lipsort.experiments as ex
    >>> ex.ledger.PROFILES
    ('quick', 'full')
"""

import importlib

from .ledger import Claim, ClaimsError, load_claims
from .record import finish, glue_text

__all__ = ["Claim", "ClaimsError", "finish", "glue_text", "load_claims"]


def __getattr__(name: str):
    # ``lipsort.experiments.universality`` works without importing the submodule first.
    if name.startswith("_"):
        raise AttributeError(name)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name == f"{__name__}.{name}":
            raise AttributeError(f"module {__name__!r} has no attribute or submodule {name!r}") from None
        raise
