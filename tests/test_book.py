"""The book as a reader sees it: built from the golden notebooks with ``-W``, then read.

The build (about 15 s) runs once per session in a temporary copy of the book: the committed
pages of ``book/`` plus ``tests/golden/*.ipynb`` as ``book/chapters``. The checks read the
HTML a browser would load: the math must typeset without a network, the setup cells must be
collapsed, each chapter's key numbers must be a table, the ledger's tables must fit a screen.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import lipsort
from lipsort.book import notebooks as ch
from lipsort.book.ledger import claims_for, load_claims
from lipsort.book.record import KeyNumbers, finish

REPO = Path(lipsort.__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"
SLUGS = ch.discover(REPO / "notebooks")
CLAIMS_HEADER = ["Claim", "Expected", "Value", "Status"]
#: The reproduction ledger must fit a 1366-pixel-wide screen (issue 7): at most six columns.
MAX_LEDGER_COLUMNS = 6

_no_goldens = pytest.mark.skipif(
    not SLUGS or not list(GOLDEN.glob("*.ipynb")), reason="no chapters or golden notebooks yet"
)


def needs_goldens(test):
    """A check of the built book: marked ``book`` (``make test`` runs it; ``-m "not book"``
    leaves the build out)."""
    return pytest.mark.book(_no_goldens(test))


def _soup(path: Path):
    from bs4 import BeautifulSoup  # a dependency of jupyter-book's theme

    return BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")


def _is_remote(url: str) -> bool:
    return url.startswith("//") or urlsplit(url).scheme in ("http", "https")


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> Path:
    """Build the book from the goldens; return its ``_build/html`` folder."""
    src = tmp_path_factory.mktemp("book-src")
    shutil.copy2(REPO / "_config.yml", src / "_config.yml")
    # Not book/chapters: whatever was executed there last (maybe the full profile) is not tested.
    shutil.copytree(REPO / "book", src / "book", ignore=shutil.ignore_patterns("chapters"))
    (src / "book" / "chapters").mkdir()
    for nb in GOLDEN.glob("*.ipynb"):
        shutil.copy2(nb, src / "book" / "chapters" / nb.name)
    out = tmp_path_factory.mktemp("book-out")
    # autodoc (book/api.md) documents this checkout, not whatever lipsort is installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [
        sys.executable, "-c", "from jupyter_book.cli.main import main; main()",
        "build", str(src), "--toc", str(src / "book" / "_toc.yml"), "--path-output", str(out),
        "-W", "--keep-going",
    ]  # fmt: skip
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"jupyter-book build failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return out / "_build" / "html"


def _pages(html: Path) -> list[Path]:
    return sorted(p for p in html.rglob("*.html") if "_static" not in p.parts)


def _chapter(html: Path, slug: str) -> Path:
    return html / "book" / "chapters" / f"{slug}.html"


@needs_goldens
def test_math_is_typeset_without_network(html):
    """No page loads a script or stylesheet from another host, and every page with math
    loads a MathJax that exists in the build."""
    pages_with_math = 0
    for page in _pages(html):
        soup = _soup(page)
        remote = [t.get("src") for t in soup.find_all("script") if _is_remote(t.get("src") or "")]
        remote += [t.get("href") for t in soup.find_all("link", rel="stylesheet") if _is_remote(t.get("href") or "")]
        assert not remote, f"{page.relative_to(html)} loads {remote} from the network"
        if not soup.select(".math"):
            continue
        pages_with_math += 1
        mathjax = [t["src"] for t in soup.find_all("script", src=True) if "mathjax" in t["src"].lower()]
        assert mathjax, f"{page.relative_to(html)} has math but loads no MathJax"
        for src in mathjax:
            target = (page.parent / urlsplit(src).path).resolve()
            assert target.is_file() and target.stat().st_size > 100_000, (
                f"{page.relative_to(html)}: MathJax {src} is missing from the build ({target})"
            )
    assert pages_with_math >= len(SLUGS), f"only {pages_with_math} pages with math: was math rendered at all?"


@needs_goldens
@pytest.mark.parametrize("slug", SLUGS)
def test_setup_cells_are_collapsed(html, slug):
    """The parameters cell and the imports cell sit in a closed <details> block."""
    cells = _soup(_chapter(html, slug)).select("div.cell")
    params = [c for c in cells if "tag_parameters" in c["class"]]
    assert len(params) == 1, f"{slug}: {len(params)} parameters cells in the page"
    setup = cells[: cells.index(params[0]) + 2]  # the parameters cell and the imports cell after it
    for cell in setup:
        hidden = cell.find("details", class_="hide")
        assert hidden is not None and not hidden.has_attr("open"), f"{slug}: a setup cell is shown:\n{str(cell)[:500]}"
        assert cell.select_one("details.hide .cell_input") is not None


@needs_goldens
@pytest.mark.parametrize("slug", SLUGS)
def test_key_numbers_are_a_table(html, slug):
    """The last cell's output is the claims table: one row per ledger claim of the chapter."""
    last = _soup(_chapter(html, slug)).select("div.cell")[-1]
    assert "finish(" in last.select_one(".cell_input").get_text(), f"{slug}: the last cell is not finish()"
    output = last.select_one(".cell_output")
    assert output is not None, f"{slug}: finish() shows nothing"
    assert not output.select("pre"), f"{slug}: the key numbers are plain text:\n{output.get_text()[:500]}"
    tables = output.find_all("table")
    assert tables, f"{slug}: the key numbers output has no table:\n{str(output)[:500]}"
    claims = claims_for(load_claims(REPO / "book" / "claims.yml", REPO / "notebooks"), slug)
    header = [th.get_text(strip=True) for th in tables[0].select("thead th")]
    if claims:
        assert header == CLAIMS_HEADER, f"{slug}: first table's header is {header}"
        ids = [tr.select("td")[0].get_text(strip=True) for tr in tables[0].select("tbody tr")]
        assert ids == [c.id for c in claims]
        every = tables[1]
        assert every.find_parent("details") is not None, f"{slug}: the table of every key number is not collapsed"
    else:
        every = tables[0]
    assert [th.get_text(strip=True) for th in every.select("thead th")] == ["Key", "Value"]


@needs_goldens
def test_ledger_tables_fit_a_screen(html):
    soup = _soup(html / "book" / "reproduction.html")
    tables = soup.find_all("table")
    assert tables, "the ledger page has no table"
    for table in tables:
        widest = max(len(tr.find_all(["th", "td"], recursive=False)) for tr in table.find_all("tr"))
        head = [th.get_text(strip=True) for th in table.select("thead th")]
        assert widest <= MAX_LEDGER_COLUMNS, f"a ledger table has {widest} columns: {head}"
    # The generated pages drop the right-hand column and take the stylesheet that widens them.
    for page in ("reproduction.html", "status.html"):
        text = (html / "book" / page).read_text(encoding="utf-8")
        assert "bd-sidebar-secondary" not in text, f"{page} still has the right-hand column"
        assert "_static/lipsort.css" in text, f"{page} does not load lipsort.css"
    css = (html / "_static" / "lipsort.css").read_text(encoding="utf-8")
    assert "#reproduction-ledger" in css and "#run-status" in css


@needs_goldens
def test_api_page_documents_the_modules(html):
    soup = _soup(html / "book" / "api.html")
    documented = {t["id"] for t in soup.select("dt.sig[id]")}
    assert {"lipsort.functional.group_sort", "lipsort.runtime.setup"} <= documented
    # Napoleon turned Google-style sections into field lists.
    assert soup.select("dl.field-list"), "no Args/Returns field list on the API page"


# --- the key-numbers display itself (no build) ---------------------------------------------

def _demo():
    return KeyNumbers(
        "01_demo",
        "quick",
        (("w1", "0.998"), ("ratio|x", "2")),
        (
            ("demo-w1", "w1", "0.998", "1.000 ± 0.010", "holds"),
            ("demo-bad", "w1", "0.998", "≥ 0.999", "FAILS"),
        ),
    )


def test_key_numbers_markdown_is_a_claims_table_then_every_number():
    md = _demo()._repr_markdown_().splitlines()
    assert md[2] == "| " + " | ".join(CLAIMS_HEADER) + " |"
    rows = [line for line in md if line.startswith("| `demo")]
    assert rows == ["| `demo-w1` | 1.000\xa0±\xa00.010 | 0.998 | holds |", "| `demo-bad` | ≥\xa00.999 | 0.998 | **FAILS** |"]
    assert "| `ratio\\|x` | 2 |" in md  # a pipe in a cell does not split it
    assert md.index("<details>") < md.index("| Key | Value |") < md.index("</details>")


def test_key_numbers_without_claims_is_one_table():
    md = KeyNumbers("01_demo", "full", (("a", "1"),))._repr_markdown_()
    assert "<details>" not in md and "| `a` | 1 |" in md and "*full*" in md


def test_finish_displays_key_numbers_in_a_notebook(tmp_path, monkeypatch, capsys):
    """Inside IPython, finish() displays a KeyNumbers (Markdown and the plain text nbval
    compares), and prints nothing itself."""
    import IPython
    import IPython.display

    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "01_demo.md").write_text("")
    (tmp_path / "book").mkdir()
    claims = tmp_path / "book" / "claims.yml"
    claims.write_text(
        "- {id: demo-w1, paper: anil2019, statement: W1 is 1., published: 1.0, source: exact,\n"
        "   chapter: 01_demo, key: w1, expect: {approx: 1.0, tol: 0.01}, profile: quick}\n"
    )
    shown = []
    monkeypatch.setattr(IPython, "get_ipython", lambda: object())
    monkeypatch.setattr(IPython.display, "display", lambda *objs: shown.extend(objs))
    finish("01_demo", {"w1": 0.99812}, claims_file=claims)
    assert capsys.readouterr().out == ""
    (report,) = shown
    assert isinstance(report, KeyNumbers)
    assert report.claims == (("demo-w1", "w1", "0.998", "1.000 ± 0.010", "holds"),)
    assert repr(report).splitlines()[0] == "Key numbers of 01_demo (profile quick)"
    assert "| `demo-w1` | 1.000\xa0±\xa00.010 | 0.998 | holds |" in report._repr_markdown_()
