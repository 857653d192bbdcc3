"""Book glue: what the chapters of the book (``notebooks/``) call.

The chapter-specific training loops and plots live in submodules of this package; this
module exposes the ledger and :func:`finish`, the last cell of every chapter.
"""

from .ledger import Claim, ClaimsError, load_claims
from .record import finish

__all__ = ["Claim", "ClaimsError", "finish", "load_claims"]
