"""The executable-book pipeline: chapters, profiles, goldens, table of contents and the runner."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest

import lipsort
from lipsort.book import ledger, pages
from lipsort.book import notebooks as ch
from lipsort.book import runner as reproduce

REPO = Path(lipsort.__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
GOLDEN = REPO / "tests" / "golden"
SLUGS = ch.discover(NOTEBOOKS)
needs_chapters = pytest.mark.skipif(not SLUGS, reason="no chapter in notebooks/ yet")

HEADER = """---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
    format_version: 0.13
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---
"""


def write_chapter(root: Path, slug: str, body: str, params: str = "n = 3") -> Path:
    """A minimal chapter: parameters cell, ``body``, then the finish call."""
    (root / "notebooks").mkdir(parents=True, exist_ok=True)
    text = (
        HEADER
        + f"\n# {slug}\n\n```{{code-cell}} ipython3\n:tags: [parameters]\n\n"
        + f'profile = "quick"\ndevice = "cpu"\nseed = 0\nresults_dir = ""\n{params}\n```\n\n'
        + f"```{{code-cell}} ipython3\n{body}\n```\n\n"
        + "```{code-cell} ipython3\n"
        + f'lipsort.book.finish("{slug}", results, profile=profile, results_dir=results_dir)\n```\n'
    )
    path = root / "notebooks" / f"{slug}.md"
    path.write_text(text)
    return path


def make_project(root: Path, profiles: str = "full:\n", claims: str = "") -> Path:
    (root / "book").mkdir(parents=True, exist_ok=True)
    (root / "notebooks").mkdir(parents=True, exist_ok=True)
    (root / "notebooks" / "profiles.yml").write_text(profiles)
    (root / "book" / "claims.yml").write_text(claims or "# no claims\n")
    return root


def code_cells(nb) -> list[str]:
    return [
        c.source.strip()
        for c in nb.cells
        if c.cell_type == "code" and "injected-parameters" not in c.metadata.get("tags", [])
    ]


# --- the repository's chapters ------------------------------------------------------------

@needs_chapters
def test_profiles_and_chapters_are_consistent():
    """Every override names an existing chapter and a real parameter of its notebook; the
    runner's startup validation passes for both profiles."""
    for profile in ("quick", "full"):
        jobs = reproduce.plan(REPO, profile=profile)
        assert [j.slug for j in jobs] == SLUGS


def test_profiles_file_only_overrides_real_parameters():
    profiles = ch.load_profiles(NOTEBOOKS / "profiles.yml")
    for profile, by_slug in profiles.items():
        for slug, overrides in by_slug.items():
            assert slug in SLUGS, f"profiles.yml: {profile}.{slug} is not a chapter (chapters: {SLUGS})"
            params = ch.parameters(ch.read_notebook(NOTEBOOKS / f"{slug}.md"), slug)
            unknown = sorted(set(overrides) - set(params))
            assert not unknown, f"profiles.yml: {profile}.{slug} overrides non-parameters {unknown}"


@needs_chapters
@pytest.mark.parametrize("slug", SLUGS)
def test_chapter_structure(slug):
    nb = ch.read_notebook(NOTEBOOKS / f"{slug}.md")
    params = ch.parameters(nb, slug)
    for name in ch.REQUIRED_PARAMETERS:
        assert name in params, f"{slug}: the parameters cell lacks {name!r}"
    assert params["profile"] == "quick" and params["device"] == "cpu" and params["results_dir"] == ""
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0] is ch.parameters_cell(nb), f"{slug}: the first code cell must be the parameters cell"
    assert ch.finish_slug(nb) == slug, f"{slug}: the last code cell must be lipsort.book.finish({slug!r}, ...)"
    last = code[-1].source.strip()
    assert "profile=profile" in last and "results_dir=results_dir" in last, last
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{slug}: kernelspec must be python3"


def goldens() -> list[str]:
    return sorted(p.stem for p in GOLDEN.glob("*.ipynb"))


@needs_chapters
def test_every_chapter_has_a_golden_and_back():
    if not goldens():
        pytest.skip("no golden notebooks in tests/golden yet: run `make golden`")
    assert set(goldens()) == set(SLUGS), (
        f"chapters without golden: {sorted(set(SLUGS) - set(goldens()))}; "
        f"goldens without chapter: {sorted(set(goldens()) - set(SLUGS))} (run `make golden`)"
    )


@needs_chapters
@pytest.mark.parametrize("slug", SLUGS)
def test_golden_code_matches_source(slug):
    path = GOLDEN / f"{slug}.ipynb"
    if not goldens():
        pytest.skip("no golden notebooks in tests/golden yet: run `make golden`")
    if not path.exists():
        pytest.fail(f"{slug} has no golden notebook {path}: run `make golden`")
    golden = nbformat.read(path, as_version=4)
    assert not any("injected-parameters" in c.metadata.get("tags", []) for c in golden.cells), (
        f"{path} was executed with injected parameters; goldens are the quick profile (`make golden`)"
    )
    assert code_cells(golden) == code_cells(ch.read_notebook(NOTEBOOKS / f"{slug}.md")), (
        f"{path} is stale: its code differs from notebooks/{slug}.md (run `make golden`)"
    )


@needs_chapters
@pytest.mark.parametrize("slug", SLUGS)
def test_papermill_reads_every_parameter(slug):
    # `papermill --help-notebook` lists what its own line parser reads, which a quote inside a
    # comment can derail: it must name every parameter the chapter assigns.
    from papermill.translators import PythonTranslator

    nb = ch.read_notebook(NOTEBOOKS / f"{slug}.md")
    seen = [p.name for p in PythonTranslator.inspect(ch.parameters_cell(nb, slug))]
    assert seen == list(ch.parameters(nb, slug)), f"papermill misreads the parameters cell of {slug}"


def test_toc_lists_every_chapter():
    toc = REPO / "book" / "_toc.yml"
    assert toc.read_text() == pages.render_toc(SLUGS, pages.extra_pages(REPO)), (
        "book/_toc.yml does not match notebooks/: run python -m lipsort.reproduce --render-only"
    )


# --- startup validation -------------------------------------------------------------------

def test_plan_injects_only_what_differs(tmp_path):
    make_project(tmp_path, profiles="full:\n  01_a:\n    n: 30\n")
    write_chapter(tmp_path, "01_a", "results = {'n': n}")
    (job,) = reproduce.plan(tmp_path, "quick")
    assert job.inject == {"results_dir": "../book/results/quick"}
    (job,) = reproduce.plan(tmp_path, "quick", output=tmp_path / "golden")
    assert job.inject == {}  # a golden has exactly the code cells of its source
    assert job.output == tmp_path / "golden" / "01_a.ipynb"
    (job,) = reproduce.plan(tmp_path, "full", seed=3)
    assert job.inject == {"profile": "full", "seed": 3, "results_dir": "../book/results/full", "n": 30}
    assert job.parameters == {"profile": "full", "device": "cpu", "seed": 3, "results_dir": "../book/results/full", "n": 30}


@pytest.mark.parametrize(
    "profiles, chapters, message",
    [
        ("full:\n  02_nope:\n    n: 1\n", None, "overrides for unknown chapter '02_nope'"),
        ("full:\n  01_a:\n    steps: 1\n", None, r"full.01_a overrides \['steps'\], which are not parameters of 01_a.md"),
        ("full:\n  01_a:\n    seed: 1\n", None, "which the runner sets"),
        ("quick:\n  01_a:\n    n: 1\n", None, "only 'full' takes overrides"),
        ("full:\n", ["03_missing"], r"unknown chapter\(s\) \['03_missing'\]"),
    ],
)
def test_plan_rejects_bad_configuration(tmp_path, profiles, chapters, message):
    make_project(tmp_path, profiles=profiles)
    write_chapter(tmp_path, "01_a", "results = {'n': n}")
    with pytest.raises(ch.ChapterError, match=message):
        reproduce.plan(tmp_path, "full", chapters=chapters)


def test_plan_rejects_incomplete_parameters_cell(tmp_path, capsys):
    make_project(tmp_path)
    path = write_chapter(tmp_path, "01_a", "results = {}")
    path.write_text(path.read_text().replace('results_dir = ""\n', ""))
    with pytest.raises(ch.ChapterError, match=r"01_a.md: the parameters cell lacks \['results_dir'\]"):
        reproduce.plan(tmp_path)
    path.write_text(path.read_text().replace("n = 3", "n = len('abc')"))
    with pytest.raises(ch.ChapterError, match="self-contained literals"):
        reproduce.plan(tmp_path)
    path.write_text(path.read_text().replace("n = len('abc')", "import os"))
    with pytest.raises(ch.ChapterError, match="may only hold assignments"):
        reproduce.plan(tmp_path)
    # The command line reports the same errors before running anything, with status 2.
    assert reproduce.main(["--root", str(tmp_path)]) == 2
    assert "may only hold assignments" in capsys.readouterr().err


def test_empty_book_renders_its_pages(tmp_path, capsys):
    make_project(tmp_path)
    assert reproduce.plan(tmp_path) == []
    assert reproduce.main(["--root", str(tmp_path)]) == 0
    assert "nothing to run" in capsys.readouterr().err
    assert "has no claims yet" in (tmp_path / "book" / "reproduction.md").read_text()
    assert "book/chapters" not in (tmp_path / "book" / "_toc.yml").read_text()


def test_cli_check_unknown_chapter(tmp_path, capsys):
    make_project(tmp_path)
    write_chapter(tmp_path, "01_a", "results = {}")
    assert reproduce.main(["--root", str(tmp_path), "--check", "01_a"]) == 0
    assert reproduce.main(["--root", str(tmp_path), "--check", "07_b"]) == 2
    assert "unknown chapter(s) ['07_b']" in capsys.readouterr().err


# --- the runner end to end ----------------------------------------------------------------

def test_failing_chapter_is_reported_and_others_are_kept(tmp_path, capsys, monkeypatch):
    """A broken chapter: the run goes on, writes the good chapter's results with provenance,
    keeps the partially executed notebook, exits 1 naming the cell error and the notebook."""
    claims = """
- id: T-good
  paper: anil2019
  statement: The answer is 42.
  published: 42
  source: exact
  chapter: 02_good
  key: answer
  expect: {approx: 42.0, tol: 0.5}
  profile: quick
"""
    make_project(tmp_path, claims=claims)
    write_chapter(tmp_path, "01_broken", "results = {'x': 1 / 0}")
    write_chapter(tmp_path, "02_good", "import lipsort.book\nresults = {'answer': 6 * 7.0}")

    monkeypatch.delenv(ledger.CLAIMS_ENV, raising=False)
    status = reproduce.main(["--root", str(tmp_path), "--profile", "quick"])
    out, err = capsys.readouterr()
    assert status == 1
    assert ledger.CLAIMS_ENV not in os.environ  # the kernels' ledger override does not leak
    broken_nb = tmp_path / "book" / "chapters" / "01_broken.ipynb"
    assert "ZeroDivisionError: division by zero" in err
    assert str(broken_nb) in err
    assert broken_nb.exists()  # the partially executed notebook is kept for inspection
    assert not (tmp_path / "book" / "results" / "quick" / "01_broken.json").exists()

    record = json.loads((tmp_path / "book" / "results" / "quick" / "02_good.json").read_text())
    assert record["results"] == {"answer": 42.0}
    prov = record["provenance"]
    assert prov["status"] == "ok" and prov["profile"] == "quick" and prov["seed"] == 0
    assert prov["parameters"]["n"] == 3 and prov["duration_s"] > 0
    assert prov["threads"]["torch"] >= 1 and prov["device"]["requested"] == "cpu"
    assert {"python", "torch", "lipsort", "numpy"} <= set(prov["versions"])
    assert "commit" in prov and "dirty" in prov and prov["date"]
    assert "01_broken  failed" in out and "02_good    ok" in out

    # Executed notebooks carry no timings; the pages are regenerated from the results.
    executed = nbformat.read(tmp_path / "book" / "chapters" / "02_good.ipynb", as_version=4)
    assert all("execution" not in c.metadata and "papermill" not in c.metadata for c in executed.cells)
    # The book collapses papermill's injected cell (results_dir differs from the default here).
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "hide-cell" in injected[0].metadata["tags"]
    ledger_page = (tmp_path / "book" / "reproduction.md").read_text()
    assert "| `T-good` | 42.00 | 42.00 ± 0.50 | 42.00 | — | ✓ quick · full not run |" in ledger_page
    assert "The answer is 42." in ledger_page.split("<details>")[1]
    assert "| 02_good | ok |" in (tmp_path / "book" / "status.md").read_text()
    assert "book/chapters/01_broken" in (tmp_path / "book" / "_toc.yml").read_text()

    # --render-only rebuilds the same pages from the results alone.
    before = ledger_page
    (tmp_path / "book" / "reproduction.md").unlink()
    assert reproduce.main(["--root", str(tmp_path), "--render-only"]) == 0
    assert (tmp_path / "book" / "reproduction.md").read_text() == before


# --- parameter overrides (-p) and the dirty-tree record ------------------------------------

def test_overrides_are_validated_and_recorded_as_partial(tmp_path, capsys, monkeypatch):
    make_project(tmp_path)
    write_chapter(tmp_path, "01_a", "import lipsort.book\nresults = {'n': float(n)}")
    write_chapter(tmp_path, "02_b", "results = {}", params="m = 1")
    assert reproduce.parse_override("n=[1, 2]") == ("n", [1, 2])
    with pytest.raises(ch.ChapterError, match="expects name=value"):
        reproduce.parse_override("n")
    # a name that is not a parameter of every selected chapter is refused, naming the chapter
    assert reproduce.main(["--root", str(tmp_path), "--check", "-p", "n=5"]) == 2
    assert "not parameter(s) of 02_b.md" in capsys.readouterr().err
    assert reproduce.main(["--root", str(tmp_path), "--check", "-p", "profile=full", "01_a"]) == 2
    assert "-p cannot set ['profile']" in capsys.readouterr().err

    monkeypatch.delenv(ledger.CLAIMS_ENV, raising=False)
    assert reproduce.main(["--root", str(tmp_path), "-p", "n=5", "01_a"]) == 0
    results = tmp_path / "book" / "results"
    assert not (results / "quick" / "01_a.json").exists()  # never over the clean results
    first = reproduce.partial_dir(results, "quick", {"n": 5})
    record = json.loads((first / "01_a.json").read_text())
    assert record["results"] == {"n": 5.0}
    assert record["provenance"]["partial"] == {"n": 5}
    assert record["provenance"]["profile_values"] == {"n": 3}
    # another set of overrides sits beside it; the same set again replaces its own record
    assert reproduce.main(["--root", str(tmp_path), "-p", "n=7", "01_a"]) == 0
    second = reproduce.partial_dir(results, "quick", {"n": 7})
    assert second != first and second.parent == first.parent == results / "quick-partial"
    assert json.loads((first / "01_a.json").read_text())["results"] == {"n": 5.0}
    assert json.loads((second / "01_a.json").read_text())["results"] == {"n": 7.0}
    assert sorted(p.name for p in first.parent.iterdir()) == sorted([first.name, second.name])
    status = (tmp_path / "book" / "status.md").read_text()
    assert "n=5" in status and "n=7" in status  # both partial runs are listed
    # an override equal to the profile's value is no override: the run is clean
    jobs = reproduce.plan(tmp_path, "quick", chapters=["01_a"], overrides={"n": 3})
    assert jobs[0].partial == {} and jobs[0].results_dir == results / "quick"


def test_git_state_records_dirty_trees_but_not_generated_files(tmp_path):
    import subprocess

    from lipsort.book import provenance

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "t@example.org")
    git("config", "user.name", "t")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-q", "-m", "a")
    assert provenance.git_state(tmp_path)["dirty"] is False
    # what the runner itself writes does not make the tree dirty
    for rel in ("book/results/quick/01_a.json", "book/chapters/01_a.ipynb", "book/status.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("{}")
    assert provenance.git_state(tmp_path)["dirty"] is False
    (tmp_path / "a.py").write_text("x = 2\n")
    assert provenance.git_state(tmp_path)["dirty"] is True


def test_a_rerun_that_reproduces_a_clean_record_leaves_it_untouched(tmp_path, capsys, monkeypatch):
    import subprocess

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True, text=True)

    make_project(tmp_path)
    write_chapter(tmp_path, "01_a", "import lipsort.book\nresults = {'n': float(n)}")
    git("init", "-q")
    git("config", "user.email", "t@example.org")
    git("config", "user.name", "t")
    git("add", "-A")
    git("commit", "-q", "-m", "chapter")
    monkeypatch.delenv(ledger.CLAIMS_ENV, raising=False)
    assert reproduce.main(["--root", str(tmp_path), "01_a"]) == 0
    target = tmp_path / "book" / "results" / "quick" / "01_a.json"
    first = target.read_bytes()
    assert json.loads(first)["provenance"]["dirty"] is False
    git("add", "-A")
    git("commit", "-q", "-m", "results")
    capsys.readouterr()
    assert reproduce.main(["--root", str(tmp_path), "01_a"]) == 0
    assert "unchanged" in capsys.readouterr().out
    assert target.read_bytes() == first  # same numbers: the committed record stays
    assert git("status", "--porcelain", "book/results").stdout == ""

    # Another number, another setting or a dirty record is written anew.
    old = json.loads(first)
    assert reproduce._reproduces(json.loads(first), old)
    assert not reproduce._reproduces({**old, "results": {"n": 4.0}}, old)
    other = {**old, "provenance": {**old["provenance"], "threads": {"torch": 99}}}
    assert not reproduce._reproduces(other, old)
    dirty = {**old, "provenance": {**old["provenance"], "dirty": True}}
    assert not reproduce._reproduces(old, dirty) and not reproduce._reproduces(dirty, old)


def test_records_from_other_cpus_names_each_chapter_recorded_elsewhere(tmp_path):
    quick = tmp_path / "book" / "results" / "quick"
    quick.mkdir(parents=True)
    for slug, cpu in (("01_a", "AMD EPYC"), ("02_b", "Intel(R) Xeon(R) Processor")):
        (quick / f"{slug}.json").write_text(json.dumps({"results": {}, "provenance": {"device": {"cpu": cpu}}}))
    (quick / "03_c.json").write_text("{truncated")
    slugs = ["01_a", "02_b", "03_c", "04_missing"]
    assert reproduce.records_from_other_cpus(tmp_path, slugs, "AMD EPYC") == {"02_b": "Intel(R) Xeon(R) Processor"}
    assert reproduce.records_from_other_cpus(tmp_path, slugs, "Intel(R) Xeon(R) Processor") == {"01_a": "AMD EPYC"}


def test_committed_quick_records_name_their_cpu():
    # The warning above relies on every committed quick record naming its CPU model.
    root = Path(lipsort.__file__).resolve().parents[1]
    for path in sorted((root / "book" / "results" / "quick").glob("*.json")):
        assert json.loads(path.read_text())["provenance"]["device"]["cpu"], path
