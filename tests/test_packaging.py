"""The pins of environment.yml and pyproject.toml must agree, and torch must stay exact."""

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return reqs


def _name(req: str) -> str:
    for sep in ("==", ">=", "<=", "<", ">", "["):
        req = req.split(sep)[0]
    return req.strip().lower()


def test_environment_yml_has_the_same_pins_as_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    env_reqs = {_name(r): r.replace(" ", "") for r in pip if not r.startswith("-e")}
    py_reqs = {_name(r): r.replace(" ", "") for r in _pyproject_requirements()}
    # Packages installed without their dependencies (Makefile) are not pip requirements.
    assert env_reqs == py_reqs


def test_torch_is_pinned_exactly_everywhere():
    assert "torch==2.13.0" in _pyproject_requirements()
    assert "pip install torch==2.13.0" in (ROOT / "Makefile").read_text()
