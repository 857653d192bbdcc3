"""Chapters of the book: discovery, the ``parameters`` cell, full-profile overrides.

A chapter is ``notebooks/NN_slug.md`` (jupytext MyST). Its first code cell is tagged
``parameters`` and assigns the quick-profile defaults; ``notebooks/profiles.yml`` maps
``full -> NN_slug -> {parameter: value}``. Everything here is checked before anything runs,
so a typo fails at startup instead of after an hour of computing.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ChapterError",
    "REQUIRED_PARAMETERS",
    "discover",
    "read_notebook",
    "parameters_cell",
    "parameters",
    "finish_slug",
    "load_profiles",
    "overrides_for",
]

#: Parameters every chapter must define (the runner sets them).
REQUIRED_PARAMETERS = ("profile", "device", "seed", "results_dir")
_CHAPTER_GLOB = "[0-9][0-9]_*.md"
_FINISH = re.compile(r"^\s*lipsort\.book\.finish\(\s*(['\"])(?P<slug>[^'\"]+)\1")


class ChapterError(ValueError):
    """A chapter, its parameters cell or the profiles file is malformed."""


def discover(notebooks_dir: str | Path) -> list[str]:
    """Slugs of ``notebooks_dir/NN_*.md`` in order (``["01_gradient_norm", ...]``)."""
    notebooks_dir = Path(notebooks_dir)
    if not notebooks_dir.is_dir():
        raise ChapterError(f"notebooks directory not found (tried {notebooks_dir})")
    return sorted(p.stem for p in notebooks_dir.glob(_CHAPTER_GLOB))


def read_notebook(path: str | Path):
    """The notebook at ``path`` (a jupytext ``.md``) as an nbformat node."""
    import jupytext

    path = Path(path)
    if not path.is_file():
        raise ChapterError(f"chapter notebook not found (tried {path})")
    return jupytext.read(path)


def parameters_cell(nb, name: str = "notebook"):
    """The first code cell tagged ``parameters``; an error if there is none."""
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            return cell
    raise ChapterError(f"{name} has no code cell tagged 'parameters'")


def parameters(nb, name: str = "notebook") -> dict[str, Any]:
    """Names and default values assigned by the ``parameters`` cell, in order.

    The cell must consist of plain assignments ``name = <literal expression>`` (comments
    allowed); it is evaluated without builtins.

    Example:
        >>> import nbformat
        >>> nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        ...     'profile = "quick"  # or "full"\\nsteps = 16 * 225', metadata={"tags": ["parameters"]})])
        >>> parameters(nb)
        {'profile': 'quick', 'steps': 3600}
    """
    source = parameters_cell(nb, name).source
    try:
        tree = ast.parse(source)
    except SyntaxError as err:
        raise ChapterError(f"{name}: the parameters cell is not valid Python: {err}") from err
    names = []
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            names.append(stmt.targets[0].id)
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            names.append(stmt.target.id)
        else:
            raise ChapterError(
                f"{name}: the parameters cell may only hold assignments 'name = value', "
                f"found {ast.unparse(stmt)!r} (line {stmt.lineno})"
            )
    namespace: dict[str, Any] = {"__builtins__": {}}
    try:
        exec(compile(tree, f"<parameters of {name}>", "exec"), namespace)
    except Exception as err:
        raise ChapterError(f"{name}: the parameters cell must be self-contained literals: {err!r}") from err
    return {n: namespace[n] for n in names}


def finish_slug(nb) -> str | None:
    """The slug passed to ``lipsort.book.finish`` by the last code cell, if it is that call."""
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    if not code:
        return None
    m = _FINISH.match(code[-1].source)
    return m.group("slug") if m else None


def load_profiles(path: str | Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Read ``profiles.yml``: ``{"full": {slug: {param: value}}}`` (empty blocks allowed).

    Only the ``full`` profile has overrides: the quick profile is the notebooks' defaults.
    """
    path = Path(path)
    if not path.is_file():
        raise ChapterError(f"profiles file not found (tried {path})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ChapterError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ChapterError(f"{path} must map profile -> chapter -> {{parameter: value}}")
    unknown = sorted(set(data) - {"full"})
    if unknown:
        raise ChapterError(
            f"{path}: unknown profile(s) {unknown}; only 'full' takes overrides "
            "(the quick profile is each notebook's parameters cell)"
        )
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for profile, chapters in data.items():
        chapters = chapters or {}
        if not isinstance(chapters, dict):
            raise ChapterError(f"{path}: {profile} must map chapter slugs to parameter overrides")
        out[profile] = {}
        for slug, params in chapters.items():
            params = params or {}
            if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
                raise ChapterError(f"{path}: {profile}.{slug} must map parameter names to values")
            out[profile][str(slug)] = dict(params)
    return out


def overrides_for(profiles: dict, profile: str, slug: str) -> dict[str, Any]:
    """Overrides of ``slug`` at ``profile`` (none at the quick profile)."""
    return dict(profiles.get(profile, {}).get(slug, {}))
