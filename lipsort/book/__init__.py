"""The book's build tooling: the papermill runner, the reproduction ledger, generated pages, provenance.

* :mod:`~lipsort.book.runner`: ``python -m lipsort.reproduce`` (profiles, overrides, results).
* :mod:`~lipsort.book.notebooks`: chapter discovery, parameters cells, profile overrides.
* :mod:`~lipsort.book.ledger`: ``book/claims.yml``, the claims and when they must hold.
* :mod:`~lipsort.book.record`: :func:`finish`, the last cell of every chapter, :func:`glue_text` and
  :func:`glue_result`.
* :mod:`~lipsort.book.pages`: ``book/reproduction.md``, ``book/status.md``, ``book/_toc.yml``.
* :mod:`~lipsort.book.provenance`: commit, tree state, versions and device of a run.

Example:
    >>> from lipsort.book import ledger
    >>> ledger.PROFILES
    ('quick', 'full')
"""

from .ledger import Claim, ClaimsError, load_claims
from .record import finish, glue_result, glue_text

__all__ = ["Claim", "ClaimsError", "finish", "glue_result", "glue_text", "load_claims"]
