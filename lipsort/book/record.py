"""The last cell of every chapter: print the key numbers, check the ledger, save the results.

A chapter ends with exactly one call::

    lipsort.book.finish("NN_slug", results, profile=profile, results_dir=results_dir)

In a notebook the key numbers are displayed as a :class:`KeyNumbers` object: Markdown tables
in the book (the claims: claim, expected, value, status; every key number in a collapsed
block), aligned plain text as its ``text/plain``. Both are what nbval compares across
machines, so each value is printed at the precision its claim needs (one decimal finer than
the tolerance) and values without a claim at 4 significant digits; never raw floats.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .ledger import (
    PARTIAL_SUFFIX,
    PROFILES,
    Claim,
    claims_for,
    format_value,
    load_claims,
    must_hold,
    validate_results,
)

__all__ = ["finish", "KeyNumbers", "SLUG_PATTERN", "write_json"]

#: Chapter slugs: two digits, an underscore, a name (``01_gradient_norm``).
SLUG_PATTERN = re.compile(r"^[0-9]{2}_[A-Za-z0-9_-]+$")


def write_json(path: str | Path, data: dict) -> Path:
    """Write ``data`` as indented JSON atomically (a reader never sees a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)])


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _md_table(rows: list[tuple[str, ...]], header: tuple[str, ...], align: str) -> list[str]:
    """A Markdown table; ``align`` has one letter per column, ``l`` or ``r``."""
    rule = {"l": ":--", "r": "--:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule[a] for a in align) + "|"]
    lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]
    return lines


@dataclass(frozen=True, repr=False)
class KeyNumbers:
    """A chapter's key numbers and ledger checks, as :func:`finish` displays them.

    Its ``repr`` is aligned plain text (what a terminal and nbval's ``text/plain`` see) and
    ``_repr_markdown_`` gives the book's rendering: a table of the claims (claim, expected,
    value, status), then every key number in a collapsed ``<details>`` block. Both are pure
    functions of the fields, so they are identical on every run that computes the same numbers.

    Attributes:
        slug: the chapter.
        profile: the profile it ran at.
        values: ``(key, formatted value)`` for every result, in the chapter's order.
        claims: ``(claim id, key, formatted value, expectation, status)`` for each claim.

    Example:
        >>> k = KeyNumbers("01_demo", "quick", (("w1", "0.998"),),
        ...                (("demo-w1", "w1", "0.998", "1.000 ± 0.010", "holds"),))
        >>> print(k._repr_markdown_().splitlines()[2])
        | Claim | Expected | Value | Status |
        >>> k._repr_markdown_().splitlines()[4]  # no line break inside the expectation
        '| `demo-w1` | 1.000\\xa0±\\xa00.010 | 0.998 | holds |'
    """

    slug: str
    profile: str
    values: tuple[tuple[str, str], ...]
    claims: tuple[tuple[str, str, str, str, str], ...] = ()

    def __repr__(self) -> str:
        lines = [f"Key numbers of {self.slug} (profile {self.profile})"]
        lines.append(_table(list(self.values), ("key", "value")))
        if self.claims:
            lines += ["", "Claims", _table(list(self.claims), ("id", "key", "value", "expected", "status"))]
        return "\n".join(lines)

    __str__ = __repr__

    def _repr_markdown_(self) -> str:
        values = [(f"`{k}`", v) for k, v in self.values]
        if not self.claims:
            return "\n".join(
                [f"Key numbers of `{self.slug}` at the *{self.profile}* profile (no claim):", ""]
                + _md_table(values, ("Key", "Value"), "lr")
            )
        # Non-breaking spaces keep "≤ 0.0010" and "1.000 ± 0.010" on one line in a narrow column.
        rows = [
            (f"`{cid}`", expected.replace(" ", "\u00a0"), value, "**FAILS**" if st == "FAILS" else st)
            for cid, _key, value, expected, st in self.claims
        ]
        # A blank line after <summary> and before </details>: the table between the two HTML
        # blocks is parsed as Markdown (CommonMark, GFM and MyST alike).
        return "\n".join(
            [f"Ledger claims of `{self.slug}` checked at the *{self.profile}* profile:", ""]
            + _md_table(rows, ("Claim", "Expected", "Value", "Status"), "llrl")
            + ["", "<details>", f"<summary>All {len(values)} key numbers</summary>", ""]
            + _md_table(values, ("Key", "Value"), "lr")
            + ["", "</details>"]
        )


def _series_rows(rows: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """Consecutive rows ``<key>.e001, <key>.e002, …`` (a quantity after every epoch) as one row
    with the first and last values: the results file keeps every value, the display a line.

    Example:
        >>> _series_rows((("a", "1"), ("c.e001", "0.5"), ("c.e002", "0.6"), ("c.e003", "0.7")))
        (('a', '1'), ('c.e001…e003', '0.5 → 0.7 (3 values)'))
    """
    out: list[tuple[str, str]] = []
    run: list[tuple[str, str, str]] = []  # (prefix, suffix, value) of the series being read

    def close():
        if len(run) >= 3:
            out.append((f"{run[0][0]}.e{run[0][1]}…e{run[-1][1]}", f"{run[0][2]} → {run[-1][2]} ({len(run)} values)"))
        else:
            out.extend((f"{p}.e{e}", v) for p, e, v in run)
        run.clear()

    for key, value in rows:
        m = re.fullmatch(r"(.+)\.e(\d+)", key)
        if m and (not run or run[0][0] == m[1]):
            run.append((m[1], m[2], value))
            continue
        close()
        if m:
            run.append((m[1], m[2], value))
        else:
            out.append((key, value))
    close()
    return tuple(out)


def _show(report: KeyNumbers) -> None:
    """Display ``report`` in a notebook (Markdown and plain text), print it elsewhere."""
    try:
        from IPython import get_ipython
    except ImportError:  # IPython is a book dependency, not a library one
        shell = None
    else:
        shell = get_ipython()
    if shell is None:
        print(report)
    else:
        from IPython.display import display

        display(report)


def _runtime() -> dict:
    """What only the kernel knows: its torch thread count and accelerator."""
    import torch

    info = {"torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def finish(
    slug: str,
    results: dict,
    profile: str = "quick",
    results_dir: str | os.PathLike = "",
    *,
    claims_file: str | os.PathLike | None = None,
) -> None:
    """Show a chapter's key numbers, check its ledger claims and save its results.

    Every claim of ``book/claims.yml`` whose ``chapter`` is ``slug`` is shown with its value
    and expectation; claims that must hold at ``profile`` (:func:`~.ledger.must_hold`) are
    checked, full-profile claims are only reported at the quick profile.

    Args:
        slug: the chapter, ``NN_name`` (the notebook is ``notebooks/<slug>.md``).
        results: flat dict ``{dotted.key: finite number}``.
        profile: ``"quick"`` or ``"full"``.
        results_dir: if non-empty, ``<results_dir>/<slug>.json`` is written (before the check,
            so that failing values are recorded too). A folder named ``<profile>-partial``, or
            one inside it (the runner's choice for a run with ``-p`` overrides,
            ``<profile>-partial/<digest>``), marks a partial run: its claims
            are reported, never checked, since fewer steps or seeds need not meet them, and
            it may leave experiments out (their claims show as not in this partial run).
        claims_file: ledger to use instead of :func:`~.ledger.claims_path`.

    Returns nothing, so that the last cell of a chapter shows only the displayed
    :class:`KeyNumbers` (printed outside IPython, as in the example).

    Raises:
        TypeError, ValueError: malformed results, a bad slug or profile, or (except in a
            partial run) a claim whose key is missing from ``results``.
        AssertionError: listing every claim that must hold at ``profile`` and does not.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "book").mkdir(); (root / "notebooks").mkdir()
        >>> _ = (root / "notebooks" / "01_demo.md").write_text("")
        >>> _ = (root / "book" / "claims.yml").write_text('''
        ... - {id: demo-w1, paper: anil2019, statement: W1 is 1., published: 1.0, source: exact,
        ...    chapter: 01_demo, key: w1, expect: {approx: 1.0, tol: 0.01}, profile: quick}
        ... ''')
        >>> finish("01_demo", {"w1": 0.99812, "loss": 0.0123456}, claims_file=root / "book" / "claims.yml")
        Key numbers of 01_demo (profile quick)
        key   value
        ----  -------
        w1    0.998
        loss  0.01235
        <BLANKLINE>
        Claims
        id       key  value  expected       status
        -------  ---  -----  -------------  ------
        demo-w1  w1   0.998  1.000 ± 0.010  holds
    """
    if not isinstance(slug, str) or not SLUG_PATTERN.match(slug):
        raise ValueError(f"slug must look like 'NN_name' (e.g. '01_gradient_norm'), got {slug!r}")
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    results = validate_results(results, slug)
    claims: list[Claim] = claims_for(load_claims(claims_file), slug)
    partial = bool(results_dir) and any(
        part.endswith(PARTIAL_SUFFIX) for part in Path(results_dir).parts[-2:]
    )
    missing = [c for c in claims if c.key not in results]
    if missing and not partial:
        detail = ", ".join(f"{c.key!r} (claim {c.id})" for c in missing)
        raise ValueError(
            f"chapter {slug}: the results lack key(s) {detail} required by book/claims.yml; "
            f"keys present: {sorted(results)}"
        )

    # A key checked by several claims is printed at the finest of their precisions.
    decimals: dict[str, int] = {}
    for c in claims:
        decimals[c.key] = max(decimals.get(c.key, 0), c.decimals)
    rows = _series_rows(tuple((k, format_value(v, decimals.get(k))) for k, v in results.items()))

    failed, statuses, crow = [], {}, []
    for c in claims:
        if c.key not in results:  # a partial run may leave experiments out
            statuses[c.id] = "not in this partial run"
            crow.append((c.id, c.key, "—", c.expectation(), "not in this partial run"))
            continue
        value = results[c.key]
        if partial:
            status = "reported (partial run)"
        elif must_hold(c, profile):
            status = "holds" if c.holds(value) else "FAILS"
            if status == "FAILS":
                failed.append(c)
        else:
            status = f"reported ({c.profile} profile claim)"
        statuses[c.id] = status.lower()
        crow.append((c.id, c.key, format_value(value, c.decimals), c.expectation(), status))
    _show(KeyNumbers(slug, profile, rows, tuple(crow)))

    if results_dir:
        record = {
            "chapter": slug,
            "profile": profile,
            "results": results,
            "claims": statuses,
            "runtime": _runtime(),
        }
        write_json(Path(results_dir) / f"{slug}.json", record)

    if failed:
        lines = [
            f"  {c.id}: {c.key} = {format_value(results[c.key], c.decimals)}, expected {c.expectation()}"
            f" ({c.statement})"
            for c in failed
        ]
        raise AssertionError(
            f"{len(failed)} claim(s) of chapter {slug} fail at profile {profile}:\n" + "\n".join(lines)
        )


def glue_text(name: str, text) -> None:
    """Make a formatted number available to the chapter's prose as ``{glue:md}`name```.

    Glued as Markdown, so the book shows ``0.998`` rather than the quoted repr of a string.
    """
    from IPython.display import Markdown
    from myst_nb import glue

    glue(name, Markdown(str(text)), display=False)


def glue_result(name: str, results: dict, key: str, fmt="{}") -> None:
    """:func:`glue_text` of ``results[key]`` formatted by ``fmt`` (a format string or a callable),
    or "not measured in this run" when a run's parameters left that result out."""
    if key not in results:
        return glue_text(name, "not measured in this run")
    glue_text(name, fmt(results[key]) if callable(fmt) else fmt.format(results[key]))
