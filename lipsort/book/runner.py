"""Run the book: execute every chapter at a profile and record its numbers and provenance.

Usage::

    python -m lipsort.reproduce --profile quick                 # all chapters, CPU
    python -m lipsort.reproduce --profile full --device cuda    # the paper-scale runs
    python -m lipsort.reproduce --profile quick 01_gradient_norm 03_norm_constraints
    python -m lipsort.reproduce --profile quick --output tests/golden   # nbval references
    python -m lipsort.reproduce --render-only                   # regenerate the pages only
    python -m lipsort.reproduce --profile full --check          # validate, run nothing
    python -m lipsort.reproduce --profile full -p steps=600 02_groupsort_universality  # partial

Each chapter ``notebooks/NN_slug.md`` (jupytext) is executed by papermill with the python3
kernel, in the ``notebooks/`` directory, with the parameters of the profile: the quick
profile is the notebook's own ``parameters`` cell, the full profile adds the overrides of
``notebooks/profiles.yml``. Only parameters that differ from the notebook's defaults are
injected, so a quick-profile notebook executed with ``--output`` has exactly the code cells
of its source. The executed notebook goes to ``book/chapters/<slug>.ipynb`` (or ``--output``),
the results with their provenance to ``book/results/<profile>/<slug>.json`` after each
chapter (an interrupted run keeps every chapter it finished), and at the end
``book/reproduction.md``, ``book/status.md`` and ``book/_toc.yml`` are regenerated.

``-p name=value`` (repeatable; values parsed as YAML, like papermill's ``-p``/``-y``) sets a
parameter on top of the profile. Every name must be a parameter of every selected chapter.
Such a run is *partial*: its results go to ``book/results/<profile>-partial/<digest>/<slug>.json``
(``<digest>`` a digest of the overrides, :func:`partial_dir`: runs of different parts of a chapter
sit side by side, a rerun with the same overrides replaces its own), never over the clean
results of the profile, with ``provenance.partial`` = the overrides that differ from the
profile (and ``provenance.profile_values`` = what the profile sets), and the ledger page shows
them as partial, never as the claim holding.

A rerun that reproduces a recorded file exactly (the same results and, in its provenance, the
same parameters, software, threads and device, from a clean tree) leaves that file as it is:
its provenance keeps naming the run that first produced the numbers, and building the book
on a clean checkout leaves the checkout clean when no number changed.

A failing chapter does not stop the others; the runner exits with status 1 and prints the
failing cell's error and the path of the partially executed notebook.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import notebooks as ch
from . import provenance as prov
from .ledger import CLAIMS_ENV, PARTIAL_SUFFIX, PROFILES, load_claims
from .pages import write_pages
from .record import write_json

__all__ = ["Job", "Outcome", "plan", "run", "main", "repo_root", "parse_override", "partial_dir"]

KERNEL = "python3"
DEVICES = ("cpu", "cuda")


def repo_root() -> Path:
    """The repository holding this package (``notebooks/`` and ``book/`` live there)."""
    return Path(__file__).resolve().parents[2]


@dataclass
class Job:
    """One chapter to execute: its source, defaults, effective and injected parameters."""

    slug: str
    source: Path
    defaults: dict[str, Any]
    parameters: dict[str, Any]  # effective values (defaults updated by the profile)
    inject: dict[str, Any]  # what papermill injects: the values that differ from the defaults
    output: Path
    partial: dict[str, Any] = field(default_factory=dict)  # -p overrides that differ from the profile
    results_dir: Path | None = None  # where finish() writes, relative paths resolved from notebooks/


@dataclass
class Outcome:
    """How one chapter went."""

    slug: str
    status: str  # "ok" | "failed" | "interrupted"
    duration_s: float
    notebook: Path
    error: str = ""
    results_written: bool | str = False  # True, False or "unchanged" (reproduced exactly)


def parse_override(text: str) -> tuple[str, Any]:
    """``"name=value"`` -> ``(name, value)``, the value parsed as YAML (``3600`` is an int,
    ``[512, 1024]`` a list, ``null`` None, ``paper`` a string).

    Example:
        >>> parse_override("steps=600"), parse_override("milestones=[512, 1024]"), parse_override("layout=paper")
        (('steps', 600), ('milestones', [512, 1024]), ('layout', 'paper'))
    """
    import yaml

    name, sep, raw = text.partition("=")
    name = name.strip()
    if not sep or not name.isidentifier():
        raise ch.ChapterError(f"-p expects name=value with a parameter name, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ch.ChapterError(f"-p {name}: {raw!r} is not a valid YAML value: {err}") from err
    return name, value


def plan(
    root: str | Path,
    profile: str = "quick",
    device: str = "cpu",
    seed: int | None = None,
    chapters: list[str] | None = None,
    output: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> list[Job]:
    """Validate everything and return the jobs, before anything runs.

    Raises a :class:`~lipsort.book.notebooks.ChapterError` (or a
    :class:`~lipsort.book.ledger.ClaimsError`) for: an unknown chapter on the command
    line or in ``profiles.yml``, an override that is not a parameter of that notebook's
    ``parameters`` cell, a notebook without ``profile``/``device``/``seed``/``results_dir``
    parameters, a malformed ledger, and an ``overrides`` (``-p``) name that is not a parameter
    of every selected chapter or is one the runner sets.
    """
    overrides = dict(overrides or {})
    root = Path(root).resolve()
    if profile not in PROFILES:
        raise ch.ChapterError(f"profile must be one of {PROFILES}, got {profile!r}")
    if device not in DEVICES:
        raise ch.ChapterError(f"device must be one of {DEVICES}, got {device!r}")
    notebooks = root / "notebooks"
    available = ch.discover(notebooks)
    selected = list(chapters) if chapters else available
    unknown = [s for s in selected if s not in available]
    if unknown:
        raise ch.ChapterError(f"unknown chapter(s) {unknown}; chapters in {notebooks}: {available}")
    profiles = ch.load_profiles(notebooks / "profiles.yml")
    load_claims(root / "book" / "claims.yml", notebooks)  # a broken ledger fails now, not at the end

    # Overrides of every chapter are checked, not only of the selected ones.
    params_of = {}
    for slug in sorted(set(available) | {s for p in profiles.values() for s in p}):
        if slug not in available:
            where = [p for p in profiles if slug in profiles[p]]
            raise ch.ChapterError(
                f"{notebooks / 'profiles.yml'}: overrides for unknown chapter {slug!r} "
                f"(profile {where[0]}); chapters: {available}"
            )
        defaults = ch.parameters(ch.read_notebook(notebooks / f"{slug}.md"), f"{slug}.md")
        missing = [p for p in ch.REQUIRED_PARAMETERS if p not in defaults]
        if missing:
            raise ch.ChapterError(f"{slug}.md: the parameters cell lacks {missing}")
        for prof, by_slug in profiles.items():
            bad = sorted(set(by_slug.get(slug, {})) - set(defaults))
            if bad:
                raise ch.ChapterError(
                    f"{notebooks / 'profiles.yml'}: {prof}.{slug} overrides {bad}, which are not "
                    f"parameters of {slug}.md (its parameters: {list(defaults)})"
                )
            reserved = sorted(set(by_slug.get(slug, {})) & set(ch.REQUIRED_PARAMETERS))
            if reserved:
                raise ch.ChapterError(
                    f"{notebooks / 'profiles.yml'}: {prof}.{slug} sets {reserved}, which the runner sets"
                )
        params_of[slug] = defaults

    reserved = sorted(set(overrides) & {"profile", "device", "results_dir"})
    if reserved:
        raise ch.ChapterError(f"-p cannot set {reserved}: use --profile/--device (results_dir is the runner's)")
    for slug in selected:
        bad = sorted(set(overrides) - set(params_of[slug]))
        if bad:
            raise ch.ChapterError(
                f"-p {bad}: not parameter(s) of {slug}.md (its parameters: {list(params_of[slug])})"
            )

    out_dir = Path(output).resolve() if output else root / "book" / "chapters"
    jobs = []
    for slug in selected:
        defaults = params_of[slug]
        effective = dict(defaults)
        effective.update(ch.overrides_for(profiles, profile, slug))
        partial = {k: v for k, v in overrides.items() if effective.get(k) != v}
        effective.update(overrides)
        # A partial run never overwrites the clean results of its profile.
        results_dir = root / "book" / "results" / profile
        if partial:
            results_dir = partial_dir(root / "book" / "results", profile, partial)
        effective["profile"] = profile
        effective["device"] = device
        if seed is not None:
            effective["seed"] = seed
        # --output (nbval references) records no results: its notebooks must not depend on
        # where they were executed.
        effective["results_dir"] = "" if output else os.path.relpath(results_dir, notebooks)
        inject = {k: v for k, v in effective.items() if k not in defaults or defaults[k] != v}
        jobs.append(Job(slug, notebooks / f"{slug}.md", defaults, effective, inject, out_dir / f"{slug}.ipynb",
                        partial, results_dir))
    return jobs


def partial_dir(results_root: Path, profile: str, partial: dict[str, Any]) -> Path:
    """The folder of a run of ``profile`` with the overrides ``partial``:
    ``<results_root>/<profile>-partial/<first 10 hex digits of the SHA-256 of the overrides as
    sorted JSON>``.

    Example:
        >>> partial_dir(Path("r"), "full", {"seeds": [0], "convs": ["rko"]}).as_posix()
        'r/full-partial/70a2c7d402'
    """
    text = json.dumps(partial, sort_keys=True, default=str)
    return Path(results_root) / (profile + PARTIAL_SUFFIX) / hashlib.sha256(text.encode()).hexdigest()[:10]


def _clean_metadata(path: Path) -> None:
    """Drop timings and machine paths that papermill/nbclient store in the notebook metadata
    (timings belong to ``book/status.md``); keep the parameters, and record the CPU model that
    executed it (``lipsort.cpu``: goldens compare exactly only there, see :mod:`.golden`).
    Papermill's injected-parameters cell gets the ``hide-cell`` tag: the book collapses it like
    the ``parameters`` cell."""
    import nbformat

    if not path.is_file():
        return
    nb = nbformat.read(path, as_version=4)
    pm = nb.metadata.get("papermill", {})
    nb.metadata["papermill"] = {k: pm[k] for k in ("parameters", "default_parameters") if k in pm}
    nb.metadata["lipsort"] = {"cpu": prov.cpu_name()}
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        tags = cell.metadata.get("tags", [])
        if "injected-parameters" in tags and "hide-cell" not in tags:
            cell.metadata["tags"] = [*tags, "hide-cell"]
    nbformat.write(nb, path)


def _describe_error(err: BaseException) -> str:
    from papermill.exceptions import PapermillExecutionError

    if isinstance(err, PapermillExecutionError):
        return f"cell In [{err.exec_count}] (cell {err.cell_index}) raised {err.ename}: {err.evalue}"
    return "".join(traceback.format_exception_only(type(err), err)).strip()


def _execute(job: Job, cwd: Path) -> None:
    import papermill

    nb = ch.read_notebook(job.source)
    nb.metadata.setdefault("kernelspec", {"name": KERNEL, "display_name": "Python 3", "language": "python"})
    job.output.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(
        nb,
        str(job.output),
        parameters=job.inject or None,
        kernel_name=KERNEL,
        cwd=str(cwd),
        progress_bar=False,
        log_output=False,
    )


def _read_record(path: Path) -> tuple[dict, str] | None:
    """A results file as ``(record, text)``, or ``None`` if it is missing or unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text), text
    except (OSError, ValueError):
        return None


#: Provenance entries that must agree for a rerun to count as the recorded run reproduced.
_SAME_RUN = ("profile", "status", "parameters", "versions", "threads", "device", "seed", "partial")


def _reproduces(new: dict, old: dict) -> bool:
    """Whether ``new`` gives exactly ``old``'s results in the same setting, ``old`` from a
    clean tree (a record from a dirty tree is always replaced)."""
    p_new, p_old = new.get("provenance") or {}, old.get("provenance") or {}
    if p_old.get("dirty") is not False or p_new.get("dirty") is not False:
        return False
    return new.get("results") == old.get("results") and all(
        p_new.get(k) == p_old.get(k) for k in _SAME_RUN
    )


def records_from_other_cpus(root: Path, slugs: list[str], cpu: str, profile: str = "quick") -> dict[str, str]:
    """``{slug: recorded CPU}`` for the committed ``profile`` records made on a CPU model other
    than ``cpu``. The goldens compare printed floats, and CPU models (e.g. AMD EPYC against
    Intel Xeon with AVX-512) round matrix products differently: goldens written on another
    model than the records' fail nbval there at unchanged code."""
    out = {}
    for slug in slugs:
        found = _read_record(Path(root) / "book" / "results" / profile / f"{slug}.json")
        recorded = ((found[0].get("provenance") or {}).get("device") or {}).get("cpu") if found else None
        if recorded and recorded != cpu:
            out[slug] = recorded
    return out


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def run(
    jobs: list[Job],
    root: str | Path,
    profile: str,
    device: str,
    record: bool = True,
) -> list[Outcome]:
    """Execute ``jobs`` in order; with ``record``, write each chapter's results and provenance.

    Keeps going after a failing chapter; stops (keeping what finished) on KeyboardInterrupt.
    """
    root = Path(root).resolve()
    # The kernels inherit the environment: finish() then checks this root's ledger.
    previous = os.environ.get(CLAIMS_ENV)
    os.environ[CLAIMS_ENV] = str(root / "book" / "claims.yml")
    try:
        return _run(jobs, root, profile, device, record)
    finally:
        if previous is None:
            os.environ.pop(CLAIMS_ENV, None)
        else:
            os.environ[CLAIMS_ENV] = previous


def _run(jobs: list[Job], root: Path, profile: str, device: str, record: bool) -> list[Outcome]:
    from tqdm import tqdm

    notebooks = root / "notebooks"
    common = {
        **prov.git_state(root),
        "versions": prov.versions(),
        "profile": profile,
    }
    machine = prov.machine()
    outcomes: list[Outcome] = []
    bar = tqdm(jobs, desc=f"{profile} profile", unit="chapter", file=sys.stderr)
    for job in bar:
        bar.set_postfix_str(job.slug)
        target = (job.results_dir or root / "book" / "results" / profile) / f"{job.slug}.json"
        before = _mtime(target)
        previous = _read_record(target)
        start_date, start = prov.now(), time.perf_counter()
        status, error = "ok", ""
        try:
            _execute(job, notebooks)
        except KeyboardInterrupt:
            status, error = "interrupted", "interrupted by the user"
        except Exception as err:  # noqa: BLE001 - every chapter failure is reported, none stops the run
            status, error = "failed", _describe_error(err)
        duration = time.perf_counter() - start
        _clean_metadata(job.output)
        outcome = Outcome(job.slug, status, duration, job.output, error)
        if record and _mtime(target) not in (None, before):
            fresh = json.loads(target.read_text(encoding="utf-8"))
            runtime = fresh.get("runtime", {})
            provenance = {
                **common,
                "status": status,
                "date": start_date,
                "duration_s": round(duration, 1),
                "device": {"requested": device, "cpu": machine["cpu"], "gpu": runtime.get("cuda_device")},
                "threads": {
                    "torch": runtime.get("torch_threads"),
                    "cpu_count": machine["cpu_count"],
                    "OMP_NUM_THREADS": machine["OMP_NUM_THREADS"],
                },
                "seed": job.parameters.get("seed"),
                "parameters": job.parameters,
            }
            if job.partial:
                profile_values = dict(job.defaults)
                profile_values.update(ch.overrides_for(ch.load_profiles(notebooks / "profiles.yml"), profile, job.slug))
                provenance["partial"] = job.partial
                provenance["profile_values"] = {k: profile_values.get(k) for k in job.partial}
            if error:
                provenance["error"] = error
            new = {"results": fresh["results"], "provenance": provenance}
            if previous is not None and _reproduces(new, previous[0]):
                target.write_text(previous[1], encoding="utf-8")  # byte for byte as committed
                outcome.results_written = "unchanged"
            else:
                write_json(target, new)
                outcome.results_written = True
        outcomes.append(outcome)
        if status != "ok":
            bar.write(f"{job.slug}: {status}: {error}\n  notebook: {job.output}")
        if status == "interrupted":
            break
    bar.close()
    return outcomes


def _summary(outcomes: list[Outcome]) -> str:
    rows = [("chapter", "status", "duration (s)", "results")]
    rows += [
        (o.slug, o.status, f"{o.duration_s:.1f}", {True: "written", "unchanged": "unchanged"}.get(o.results_written, "-"))
        for o in outcomes
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lipsort.reproduce",
        description="Execute the book's chapters at a profile; record results, provenance and the ledger pages.",
    )
    p.add_argument("chapters", nargs="*", help="chapter slugs (default: every notebooks/NN_*.md, in order)")
    p.add_argument("--profile", choices=PROFILES, default="quick")
    p.add_argument("--device", choices=DEVICES, default="cpu")
    p.add_argument("--seed", type=int, default=None, help="override every chapter's seed")
    p.add_argument(
        "-p",
        dest="overrides",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a notebook parameter on top of the profile (repeatable; YAML value); the run is "
        "recorded as partial in book/results/<profile>-partial/<digest of the overrides>/",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help="write executed notebooks here instead of book/chapters/ and record no results "
        "(make golden uses tests/golden)",
    )
    p.add_argument("--root", type=Path, default=None, help="project root holding notebooks/ and book/ (default: this repository)")
    p.add_argument("--render-only", action="store_true", help="only regenerate reproduction.md, status.md, _toc.yml and the tables of performance.md")
    p.add_argument("--check", action="store_true", help="validate chapters, overrides and ledger; run nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    root = (args.root or repo_root()).resolve()
    if args.render_only:
        for path in write_pages(root):
            print(f"wrote {path}")
        return 0
    try:
        overrides = dict(parse_override(o) for o in args.overrides)
        jobs = plan(root, args.profile, args.device, args.seed, args.chapters, args.output, overrides)
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ch.ChapterError("--device cuda was requested but torch sees no GPU")
    except ValueError as err:  # ChapterError and ClaimsError
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not jobs:
        print(f"no chapter in {root / 'notebooks'} (NN_*.md): nothing to run", file=sys.stderr)
    if args.check:
        for job in jobs:
            print(f"{job.slug}: inject {job.inject}" + (f" (partial: {job.partial})" if job.partial else ""))
        return 0
    if args.profile == "quick" and args.device == "cpu":
        cpu = prov.cpu_name()
        for slug, recorded in records_from_other_cpus(root, [job.slug for job in jobs], cpu).items():
            print(f"warning: {slug}'s committed quick record was made on {recorded!r}, this CPU is "
                  f"{cpu!r}: its printed floats may differ, so goldens written here may "
                  "not match a run on the records' CPU", file=sys.stderr)
    outcomes = run(jobs, root, args.profile, args.device, record=args.output is None)
    print("\n" + _summary(outcomes))
    if args.output is None:
        write_pages(root)
        print(f"\nregenerated {root / 'book' / 'reproduction.md'}, status.md and _toc.yml")
    bad = [o for o in outcomes if o.status != "ok"]
    for o in bad:
        print(f"\n{o.slug} {o.status}: {o.error}\n  notebook: {o.notebook}", file=sys.stderr)
    if any(o.status == "interrupted" for o in bad):
        return 130
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
