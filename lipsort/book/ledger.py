"""The reproduction ledger: claims of the papers, each checked by one number of one chapter.

``book/claims.yml`` is a YAML list of claims. A claim names the chapter and the key of that
chapter's results dict that measures it, and an expectation:

* ``{approx: a, tol: t}`` holds when ``|value - a| <= t``;
* ``{min: m}`` holds when ``value >= m``, ``{max: M}`` when ``value <= M`` (both inclusive;
  ``min`` and ``max`` may be combined into a closed interval).

A claim's ``profile`` says where it must hold: ``quick`` claims hold at the quick profile and
at the full one; ``full`` claims hold only at the full profile (at quick they are reported,
not checked).

A claim's ``source`` says where its reference value comes from: ``paper`` (a number the paper
published; ``where`` then names the table, figure or section), ``exact`` (an analytic truth
the paper states or uses, e.g. W1 = 1 for its toy problems), ``derived`` (a result this book
proves or computes itself) or ``qualitative`` (a claim of the paper without a number). Every
claim says in ``tolerance`` where its bound comes from (the theory, float rounding or measured
seed-to-seed spread); ``deviation`` states, in one sentence, how the book's setting differs
from the paper's, where it does.

Example:
    >>> c = Claim(id="x", paper="anil2019", statement="s", published=1.0, source="exact",
    ...           chapter="01_demo", key="w1", expect={"approx": 1.0, "tol": 0.01}, profile="quick",
    ...           tolerance="seed spread")
    >>> c.holds(0.995), c.holds(1.02), c.expectation()
    (True, False, '1.000 ± 0.010')
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "Claim",
    "ClaimsError",
    "PAPERS",
    "PROFILES",
    "SOURCES",
    "claims_path",
    "load_claims",
    "claims_for",
    "must_hold",
    "decimals_for",
    "format_value",
    "validate_results",
]

#: Bibliography keys of the papers the ledger may cite.
PAPERS = ("anil2019", "li2019", "bethune2022")
#: Where a claim's reference value comes from.
SOURCES = ("paper", "exact", "derived", "qualitative")
#: Execution profiles, from cheapest to most faithful.
PROFILES = ("quick", "full")
#: Suffix of the results folder of a run with parameter overrides (``book/results/full-partial``).
PARTIAL_SUFFIX = "-partial"
#: Environment variable that points :func:`claims_path` to another ledger (used by the runner
#: and the tests to run chapters outside the repository).
CLAIMS_ENV = "LIPSORT_CLAIMS"

_REQUIRED = ("id", "paper", "statement", "published", "source", "chapter", "key", "expect", "profile")
#: Fields a claim may have (``where`` is required when ``source`` is ``paper``; the book's own
#: ledger gives every claim a ``tolerance``, tests/test_ledger.py checks).
_OPTIONAL = ("tolerance", "where", "deviation")
_EXPECT_FORMS = ({"approx", "tol"}, {"min"}, {"max"}, {"min", "max"})


class ClaimsError(ValueError):
    """The ledger file is missing or malformed."""


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _written_decimals(x: float) -> int:
    """Number of decimals in the shortest repr of ``x`` (``0.99`` -> 2, ``1`` -> 0)."""
    text = repr(float(x))
    if "e" in text or "E" in text:
        mantissa, exponent = text.lower().split("e")
        frac = mantissa.split(".")[1].rstrip("0") if "." in mantissa else ""
        return max(0, len(frac) - int(exponent))
    frac = text.split(".")[1].rstrip("0")
    return len(frac)


def decimals_for(expect: dict) -> int:
    """Decimals at which a value checked against ``expect`` is printed.

    One decimal finer than the tolerance (``tol: 0.01`` -> 3 decimals, ``tol: 0.05`` -> 3);
    for bounds, one decimal finer than the bound as written (``min: 0.99`` -> 3).

    Example:
        >>> decimals_for({"approx": 1.0, "tol": 0.01}), decimals_for({"min": 0.9}), decimals_for({"max": 5})
        (3, 2, 1)
    """
    if "tol" in expect:
        return max(0, math.ceil(-math.log10(expect["tol"]) - 1e-9) + 1)
    bounds = [expect[k] for k in ("min", "max") if k in expect]
    return max(_written_decimals(b) for b in bounds) + 1


def format_value(value: float, decimals: int | None = None) -> str:
    """``value`` at ``decimals`` decimals, or at 4 significant digits when ``decimals`` is None
    (integral values, such as counts, are then printed in full).

    Example:
        >>> format_value(0.123456, 3), format_value(1234.5678), format_value(0.000123456), format_value(60000.0)
        ('0.123', '1235', '0.0001235', '60000')
    """
    if decimals is not None:
        text = f"{value:.{decimals}f}"
    elif float(value).is_integer() and abs(value) < 1e15:
        text = str(int(value))
    else:
        text = f"{value:#.4g}"
        if "e" not in text:
            text = text.rstrip(".")
    # "-0.000" and "0.000" must print the same on every machine.
    if text.startswith("-") and float(text) == 0.0:
        text = text[1:]
    return text


@dataclass(frozen=True)
class Claim:
    """One ledger entry (see the module docstring for the fields)."""

    id: str
    paper: str
    statement: str
    published: float | None
    source: str
    chapter: str
    key: str
    expect: dict = field(hash=False)
    profile: str
    tolerance: str | None = None
    where: str | None = None
    deviation: str | None = None

    @property
    def decimals(self) -> int:
        """Print precision of values checked against this claim (:func:`decimals_for`)."""
        return decimals_for(self.expect)

    def holds(self, value: float) -> bool:
        """Whether ``value`` meets the expectation (bounds inclusive)."""
        e = self.expect
        if "tol" in e:
            return abs(value - e["approx"]) <= e["tol"]
        return ("min" not in e or value >= e["min"]) and ("max" not in e or value <= e["max"])

    def expectation(self) -> str:
        """The expectation as text, at the claim's precision: ``1.000 ± 0.010``, ``≥ 0.990``."""
        e, d = self.expect, self.decimals
        if "tol" in e:
            return f"{format_value(e['approx'], d)} ± {format_value(e['tol'], d)}"
        if "min" in e and "max" in e:
            return f"in [{format_value(e['min'], d)}, {format_value(e['max'], d)}]"
        if "min" in e:
            return f"≥ {format_value(e['min'], d)}"
        return f"≤ {format_value(e['max'], d)}"


def claims_path() -> Path:
    """Path of the ledger: ``$LIPSORT_CLAIMS`` if set, else ``<repo>/book/claims.yml``.

    The default is located relative to the installed package (an editable install of the
    repository), so it does not depend on the working directory.
    """
    env = os.environ.get(CLAIMS_ENV)
    if env:
        return Path(env)
    import lipsort

    return Path(lipsort.__file__).resolve().parents[1] / "book" / "claims.yml"


def _check_entry(i: int, entry: Any, path: Path, notebooks_dir: Path) -> Claim:
    where = f"{path}: entry {i}"
    if not isinstance(entry, dict):
        raise ClaimsError(f"{where} must be a mapping of claim fields, got {type(entry).__name__}")
    if isinstance(entry.get("id"), str):
        where += f" (id {entry['id']!r})"
    missing = [k for k in _REQUIRED if k not in entry]
    if missing:
        raise ClaimsError(f"{where} lacks the required field(s) {missing}")
    unknown = sorted(set(entry) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise ClaimsError(f"{where} has unknown field(s) {unknown}; allowed: {list(_REQUIRED + _OPTIONAL)}")
    for k in ("id", "statement", "chapter", "key"):
        if not isinstance(entry[k], str) or not entry[k].strip():
            raise ClaimsError(f"{where}: {k!r} must be a non-empty string, got {entry[k]!r}")
    if entry["paper"] not in PAPERS:
        raise ClaimsError(f"{where}: paper {entry['paper']!r} is not one of {PAPERS}")
    if entry["source"] not in SOURCES:
        raise ClaimsError(f"{where}: source {entry['source']!r} is not one of {SOURCES}")
    for k in _OPTIONAL:
        if k in entry and (not isinstance(entry[k], str) or not entry[k].strip()):
            raise ClaimsError(f"{where}: {k!r} must be a non-empty string when given, got {entry[k]!r}")
    if entry["source"] == "paper" and "where" not in entry:
        raise ClaimsError(
            f"{where}: source 'paper' needs 'where' (the table, figure or section that publishes the number)"
        )
    if entry["profile"] not in PROFILES:
        raise ClaimsError(f"{where}: profile {entry['profile']!r} is not one of {PROFILES}")
    if entry["published"] is not None and not _is_number(entry["published"]):
        raise ClaimsError(f"{where}: published must be a finite number or null, got {entry['published']!r}")
    expect = entry["expect"]
    if not isinstance(expect, dict) or set(expect) not in _EXPECT_FORMS:
        raise ClaimsError(
            f"{where}: expect must be {{approx: a, tol: t}}, {{min: m}}, {{max: M}} or "
            f"{{min: m, max: M}}, got {expect!r}"
        )
    for k, v in expect.items():
        if not _is_number(v):
            raise ClaimsError(f"{where}: expect.{k} must be a finite number, got {v!r}")
    if "tol" in expect and expect["tol"] <= 0:
        raise ClaimsError(f"{where}: expect.tol must be positive, got {expect['tol']!r}")
    if "min" in expect and "max" in expect and expect["min"] > expect["max"]:
        raise ClaimsError(f"{where}: expect.min {expect['min']} exceeds expect.max {expect['max']}")
    notebook = notebooks_dir / f"{entry['chapter']}.md"
    if not notebook.is_file():
        raise ClaimsError(f"{where}: chapter {entry['chapter']!r} has no notebook (tried {notebook})")
    return Claim(**{k: entry[k] for k in _REQUIRED}, **{k: entry[k] for k in _OPTIONAL if k in entry})


def load_claims(path: str | Path | None = None, notebooks_dir: str | Path | None = None) -> list[Claim]:
    """Read and validate the ledger.

    Args:
        path: the YAML file; default :func:`claims_path`.
        notebooks_dir: where chapters live; default ``notebooks/`` next to the file's ``book/``
            folder (``<path>/../../notebooks``).

    Returns:
        The claims in file order (an empty file, or one with comments only, has none).

    Raises:
        ClaimsError: missing file (naming the path tried), bad YAML, a non-list document,
            a missing/unknown/ill-typed field, an unknown paper/source/profile, a ``paper``
            claim without ``where``, a malformed ``expect``, a duplicate id or a chapter
            without ``notebooks/<chapter>.md``.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "book").mkdir(); (root / "notebooks").mkdir()
        >>> _ = (root / "notebooks" / "01_demo.md").write_text("")
        >>> _ = (root / "book" / "claims.yml").write_text('''
        ... - {id: c1, paper: anil2019, statement: s, published: 1.0, source: exact,
        ...    chapter: 01_demo, key: w1, expect: {min: 0.9}, profile: quick, tolerance: theory}
        ... ''')
        >>> [c.id for c in load_claims(root / "book" / "claims.yml")]
        ['c1']
    """
    path = Path(path) if path is not None else claims_path()
    if not path.is_file():
        raise ClaimsError(f"claims ledger not found (tried {path})")
    notebooks_dir = Path(notebooks_dir) if notebooks_dir is not None else path.resolve().parents[1] / "notebooks"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ClaimsError(f"{path} is not valid YAML: {err}") from err
    if data is None:
        return []
    if not isinstance(data, list):
        raise ClaimsError(f"{path} must hold a YAML list of claims, got {type(data).__name__}")
    claims, seen = [], set()
    for i, entry in enumerate(data):
        claim = _check_entry(i, entry, path, notebooks_dir)
        if claim.id in seen:
            raise ClaimsError(f"{path}: duplicate claim id {claim.id!r}")
        seen.add(claim.id)
        claims.append(claim)
    return claims


def claims_for(claims: list[Claim], chapter: str) -> list[Claim]:
    """The claims measured by ``chapter``, in ledger order."""
    return [c for c in claims if c.chapter == chapter]


def must_hold(claim: Claim, profile: str) -> bool:
    """Whether ``claim`` is checked at ``profile`` (quick claims everywhere, full claims at full).

    Example:
        >>> c = Claim("x", "anil2019", "s", None, "paper", "01_demo", "k", {"min": 0}, "full")
        >>> must_hold(c, "quick"), must_hold(c, "full")
        (False, True)
    """
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    return PROFILES.index(profile) >= PROFILES.index(claim.profile)


def validate_results(results: Any, chapter: str = "?") -> dict[str, float]:
    """Check that ``results`` is a flat dict of string keys to finite real numbers.

    Returns a copy with plain ``float`` values (numpy and 0-d torch scalars are accepted).

    Example:
        >>> validate_results({"a.b": 1, "c": 0.5})
        {'a.b': 1.0, 'c': 0.5}
    """
    if not isinstance(results, dict):
        raise TypeError(f"results of chapter {chapter} must be a dict {{key: number}}, got {type(results).__name__}")
    out = {}
    for k, v in results.items():
        if not isinstance(k, str) or not k:
            raise TypeError(f"results of chapter {chapter}: keys must be non-empty strings, got {k!r}")
        if isinstance(v, bool) or isinstance(v, (dict, list, tuple, str)) or v is None:
            raise TypeError(
                f"results of chapter {chapter}: {k!r} must be a number (the dict is flat), got {type(v).__name__}"
            )
        try:
            x = float(v)
        except (TypeError, ValueError) as err:
            raise TypeError(f"results of chapter {chapter}: {k!r} must be a number, got {v!r}") from err
        if not math.isfinite(x):
            raise ValueError(f"results of chapter {chapter}: {k!r} is not finite ({x})")
        out[k] = x
    return out
