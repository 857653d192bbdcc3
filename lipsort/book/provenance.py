"""Provenance of a chapter's results: which code, software and machine produced them.

Recorded next to every results file (``book/results/<profile>/<slug>.json``) and rendered
in ``book/status.md``; measured timings live there, never in the notebooks.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from ..runtime import cpu_name

__all__ = ["git_state", "versions", "cpu_name", "machine", "now"]

#: Distributions whose versions are recorded.
PACKAGES = ("lipsort", "torch", "torchvision", "numpy", "papermill", "jupytext", "POT", "torchattacks")
#: Generated files that do not make a checkout "dirty" (they are the runner's own output).
GENERATED = ("book/results", "book/chapters", "book/reproduction.md", "book/status.md", "book/_toc.yml", "tests/golden")


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_state(root: str | Path) -> dict:
    """``{"commit": sha or None, "dirty": bool or None}`` of the checkout at ``root``.

    ``dirty`` is true when tracked or untracked files differ from the commit, ignoring the
    runner's generated output (:data:`GENERATED`); both are None outside a git checkout.

    Example:
        >>> import tempfile
        >>> git_state(tempfile.mkdtemp())
        {'commit': None, 'dirty': None}
    """
    root = Path(root)
    if _git(root, "rev-parse", "--show-toplevel") is None:
        return {"commit": None, "dirty": None}
    commit = _git(root, "rev-parse", "--verify", "--quiet", "HEAD") or None
    excludes = [f":(exclude){p}" for p in GENERATED]
    status = _git(root, "status", "--porcelain", "--", ".", *excludes)
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def versions() -> dict[str, str]:
    """Python, platform and the installed versions of :data:`PACKAGES` (absent ones omitted)."""
    out = {"python": platform.python_version(), "platform": platform.platform(terse=True)}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def machine() -> dict:
    """CPU model, logical core count and the thread-related environment."""
    return {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
