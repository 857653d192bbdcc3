"""The package layout: a light core, the chapters' glue and the book's tooling one level down."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ["functional", "activations", "parametrizations", "certify", "losses", "attacks", "models", "wasserstein"]
#: The book's toolchain: none of it may be needed to import the core.
HEAVY = ["papermill", "jupytext", "yaml", "pandas", "matplotlib", "seaborn", "ot", "torchvision"]

_BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {heavy!r}:
            raise ImportError(f"blocked for the test: {{name}}")
sys.meta_path.insert(0, Block())
import lipsort
{imports}
print("ok")
"""


def test_core_imports_without_the_book_toolchain():
    imports = "\n".join(f"import lipsort.{m}" for m in CORE)
    code = _BLOCKER.format(heavy=HEAVY, imports=imports)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def _modules():
    return sorted(p for p in (ROOT / "lipsort").rglob("*.py"))


def test_no_module_is_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in _modules() if (n := len(p.read_text().splitlines())) > 600}
    assert not long, f"split these modules: {long}"


def test_no_two_modules_share_a_name():
    names: dict[str, list[str]] = {}
    for p in _modules():
        name = p.parent.name if p.name == "__init__.py" else p.stem
        if name not in ("__main__",):
            names.setdefault(name, []).append(str(p.relative_to(ROOT)))
    shared = {k: v for k, v in names.items() if len(v) > 1}
    assert not shared, shared


@pytest.mark.parametrize("entry", ["lipsort.reproduce", "lipsort.bench"])
def test_entry_points_answer_help(entry):
    out = subprocess.run([sys.executable, "-m", entry, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and "usage" in out.stdout.lower(), out.stderr[-2000:]
