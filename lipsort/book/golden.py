"""nbval over the golden notebooks: exact on the CPU model that executed them.

CPU models round floating-point reductions differently (AMD EPYC against Intel Xeon with
AVX-512: matrix products, hence every trained network), so a golden's printed numbers are
reproducible only on the CPU model that wrote it, which the runner records in its metadata
(``lipsort.cpu``). ``python -m lipsort.book.golden [DIR] [--exact] [PYTEST ARGS]``
re-executes DIR's goldens with nbval: those written on this CPU model are compared as they
are; the others with every number masked (each cell must still run, and its text, table
layout and claim verdicts must match), and the run ends by saying which goldens were compared
that way. ``--exact`` fails on them instead.

Example:
    >>> mask_numbers("L = 0.998,   margin −6.2e−09 at step 12 of eps0.3")
    'L = #, margin # at step # of eps0.3'
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

from . import provenance as prov

__all__ = ["MASK_RULES", "NUMBER", "golden_cpu", "main", "mask_numbers", "split_by_cpu"]

#: A printed number: sign (ASCII or Unicode minus), digits, decimals, exponent.
#: Digits inside a name (``A8``, ``eps0.3``, ``e001``) are not numbers and stay as they are.
NUMBER = r"(?<![\w.])[-+−]?\d+(?:\.\d+)?(?:[eE][-+−]?\d+)?(?!\w)"

#: The sanitizers added for another CPU's goldens: every number becomes ``#``, and runs of
#: spaces one space, since a number printed with another width shifts a text table's padding.
MASK_RULES = (f"\n[number-of-another-cpu]\nregex: {NUMBER}\nreplace: #\n"
              "\n[padding-of-another-cpu]\nregex: [ ]{2,}\nreplace: \x20\n")


def mask_numbers(text: str) -> str:
    """``text`` as the masked comparison sees it: numbers as ``#``, runs of spaces as one."""
    from nbval.plugin import get_sanitize_patterns

    for regex, replace in get_sanitize_patterns(MASK_RULES):
        text = re.sub(regex, replace, text)
    return text


def golden_cpu(path: Path) -> str | None:
    """The CPU model recorded in a golden notebook's metadata, ``None`` if it has none."""
    import nbformat

    return (nbformat.read(path, as_version=4).metadata.get("lipsort") or {}).get("cpu")


def split_by_cpu(paths: list[Path], cpu: str) -> tuple[list[Path], dict[Path, str | None]]:
    """``(written on cpu, {other: its recorded CPU})``."""
    same, other = [], {}
    for p in paths:
        recorded = golden_cpu(p)
        if recorded == cpu:
            same.append(p)
        else:
            other[p] = recorded
    return same, other


def _nbval(paths: list[Path], sanitize: Path, extra: list[str]) -> int:
    cmd = [sys.executable, "-m", "pytest", "--nbval", "--nbval-current-env",
           "--nbval-sanitize-with", str(sanitize), *extra, *map(str, paths)]
    return subprocess.run(cmd, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --exact: a golden of another CPU model fails instead of being compared masked (for a
    # machine that must check every number, such as the one the goldens are written on).
    exact = "--exact" in argv
    argv = [a for a in argv if a != "--exact"]
    folder = Path(argv.pop(0) if argv and not argv[0].startswith("-") else "tests/golden")
    paths = sorted(folder.glob("*.ipynb"))
    if not paths:
        print(f"no golden notebooks in {folder} (make golden writes them)")
        return 0
    sanitize = folder / "sanitize.cfg"
    if not sanitize.is_file():
        print(f"error: {sanitize} is missing: nbval needs its sanitizers", file=sys.stderr)
        return 2
    cpu = prov.cpu_name()
    same, other = split_by_cpu(paths, cpu)
    notes = [f"{p.name} was written on {repr(r) if r else 'an unrecorded CPU'}" for p, r in other.items()]
    if other and exact:
        print(f"error: --exact, but this CPU is {cpu!r} and " + "; ".join(notes), file=sys.stderr)
        return 1
    rc = _nbval(same, sanitize, argv) if same else 0
    if other:
        with tempfile.TemporaryDirectory() as tmp:
            masked = Path(tmp) / "sanitize-masked.cfg"
            masked.write_text(sanitize.read_text(encoding="utf-8") + MASK_RULES, encoding="utf-8")
            rc = max(rc, _nbval(list(other), masked, argv))
        # After nbval's output, where it is seen: which goldens were not checked number by number.
        print(f"\nwarning: this CPU is {cpu!r}; " + "; ".join(notes) + ". Their numbers were "
              "masked, their text and verdicts compared. An exact check needs goldens written "
              "on this CPU model (make golden) from code whose outputs are known to be right.",
              file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
