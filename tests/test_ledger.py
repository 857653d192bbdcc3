"""The reproduction ledger: schema validation, expectation checks, finish(), committed results."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

import lipsort
from lipsort.book import curves, ledger, pages
from lipsort.book.ledger import Claim, ClaimsError, load_claims
from lipsort.book.record import finish

REPO = Path(lipsort.__file__).resolve().parents[1]
BOOK = REPO / "book"

GOOD = {
    "id": "T1-demo",
    "paper": "anil2019",
    "statement": "E|X| is sqrt(2/pi).",
    "published": 0.7979,
    "source": "exact",
    "chapter": "01_demo",
    "key": "mean.abs",
    "expect": {"approx": 0.8, "tol": 0.01},
    "profile": "quick",
}


def make_root(tmp_path: Path, entries, chapters=("01_demo",)) -> Path:
    (tmp_path / "book").mkdir(exist_ok=True)
    (tmp_path / "notebooks").mkdir(exist_ok=True)
    for slug in chapters:
        (tmp_path / "notebooks" / f"{slug}.md").write_text("")
    text = entries if isinstance(entries, str) else yaml.safe_dump(entries, sort_keys=False)
    (tmp_path / "book" / "claims.yml").write_text(text)
    return tmp_path / "book" / "claims.yml"


def claim(**changes) -> Claim:
    return Claim(**{**GOOD, **changes})


# --- schema -------------------------------------------------------------------------------

def test_valid_ledger_loads(tmp_path):
    path = make_root(tmp_path, [GOOD, {**GOOD, "id": "T2", "expect": {"min": 0.5}, "profile": "full"}])
    claims = load_claims(path)
    assert [c.id for c in claims] == ["T1-demo", "T2"]
    assert claims[1].expect == {"min": 0.5}


def test_comment_only_ledger_is_empty(tmp_path):
    assert load_claims(make_root(tmp_path, "# header only\n")) == []


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ClaimsError, match="tried .*nope.yml"):
        load_claims(tmp_path / "nope.yml")


@pytest.mark.parametrize(
    "entry, message",
    [
        ({k: v for k, v in GOOD.items() if k != "key"}, r"lacks the required field\(s\) \['key'\]"),
        ({**GOOD, "tolerances": "x"}, r"unknown field\(s\) \['tolerances'\]"),
        ({**GOOD, "tolerance": 1}, "'tolerance' must be a non-empty string when given"),
        ({**GOOD, "deviation": ""}, "'deviation' must be a non-empty string when given"),
        ({**GOOD, "source": "paper"}, "source 'paper' needs 'where'"),
        ({**GOOD, "paper": "anil2018"}, "paper 'anil2018' is not one of"),
        ({**GOOD, "source": "blog"}, "source 'blog' is not one of"),
        ({**GOOD, "profile": "medium"}, "profile 'medium' is not one of"),
        ({**GOOD, "published": "97%"}, "published must be a finite number or null"),
        ({**GOOD, "expect": {"approx": 1.0}}, "expect must be"),
        ({**GOOD, "expect": {"min": 1, "tol": 0.1}}, "expect must be"),
        ({**GOOD, "expect": {"approx": 1.0, "tol": 0}}, "expect.tol must be positive"),
        ({**GOOD, "expect": {"min": 2, "max": 1}}, "exceeds expect.max"),
        ({**GOOD, "expect": {"min": ".9"}}, "expect.min must be a finite number"),
        ({**GOOD, "chapter": "09_missing"}, r"chapter '09_missing' has no notebook \(tried .*09_missing.md\)"),
        ({**GOOD, "statement": ""}, "'statement' must be a non-empty string"),
    ],
)
def test_schema_errors(tmp_path, entry, message):
    with pytest.raises(ClaimsError, match=message):
        load_claims(make_root(tmp_path, [entry]))


def test_duplicate_ids_rejected(tmp_path):
    with pytest.raises(ClaimsError, match="duplicate claim id 'T1-demo'"):
        load_claims(make_root(tmp_path, [GOOD, GOOD]))


def test_not_a_list_and_bad_yaml(tmp_path):
    with pytest.raises(ClaimsError, match="must hold a YAML list"):
        load_claims(make_root(tmp_path, {"id": "x"}))
    with pytest.raises(ClaimsError, match="not valid YAML"):
        load_claims(make_root(tmp_path, "- [unclosed\n"))


# --- expectations -------------------------------------------------------------------------

def test_approx_is_inclusive():
    c = claim(expect={"approx": 1.0, "tol": 0.25})  # exact in binary: no rounding at the edge
    assert c.holds(1.25) and c.holds(0.75) and c.holds(1.0)
    assert not c.holds(1.2500001) and not c.holds(0.7499999)


def test_bounds_are_inclusive():
    assert claim(expect={"min": 0.5}).holds(0.5) and not claim(expect={"min": 0.5}).holds(0.4999)
    assert claim(expect={"max": 0.5}).holds(0.5) and not claim(expect={"max": 0.5}).holds(0.5001)
    both = claim(expect={"min": 0.0, "max": 1.0})
    assert both.holds(0.0) and both.holds(1.0) and not both.holds(-1e-9) and not both.holds(1.0 + 1e-9)


def test_precision_follows_tolerance():
    assert ledger.decimals_for({"approx": 1, "tol": 0.01}) == 3
    assert ledger.decimals_for({"approx": 1, "tol": 0.05}) == 3
    assert ledger.decimals_for({"approx": 1, "tol": 0.5}) == 2
    assert ledger.decimals_for({"approx": 90, "tol": 2}) == 1
    assert ledger.decimals_for({"min": 0.99}) == 3
    assert ledger.format_value(-0.0001, 3) == "0.000"
    assert claim(expect={"min": 0.99}).expectation() == "≥ 0.990"
    assert claim(expect={"approx": 1.0, "tol": 0.01}).expectation() == "1.000 ± 0.010"


def test_must_hold_by_profile():
    quick, full = claim(profile="quick"), claim(profile="full")
    assert ledger.must_hold(quick, "quick") and ledger.must_hold(quick, "full")
    assert not ledger.must_hold(full, "quick") and ledger.must_hold(full, "full")


# --- finish -------------------------------------------------------------------------------

def test_finish_passes_prints_and_writes(tmp_path, capsys):
    path = make_root(tmp_path, [GOOD])
    out = tmp_path / "results"
    assert finish("01_demo", {"mean.abs": 0.80412, "other": 1234.5678}, results_dir=out, claims_file=path) is None
    text = capsys.readouterr().out
    assert "mean.abs  0.804" in text  # tol 0.01 -> 3 decimals
    assert "other     1235" in text  # no claim -> 4 significant digits
    assert "T1-demo" in text and "holds" in text
    record = json.loads((out / "01_demo.json").read_text())
    assert record["results"] == {"mean.abs": 0.80412, "other": 1234.5678}
    assert record["claims"] == {"T1-demo": "holds"}


def test_finish_raises_on_failing_claim_after_writing(tmp_path, capsys):
    path = make_root(tmp_path, [GOOD, {**GOOD, "id": "T3-ok", "expect": {"min": 0.0}}])
    with pytest.raises(AssertionError, match=r"(?s)1 claim\(s\) of chapter 01_demo fail.*T1-demo: mean.abs = 0.900"):
        finish("01_demo", {"mean.abs": 0.9}, results_dir=tmp_path / "r", claims_file=path)
    assert "FAILS" in capsys.readouterr().out
    # The failing value is recorded, so the ledger page can show it.
    assert json.loads((tmp_path / "r" / "01_demo.json").read_text())["claims"]["T1-demo"] == "fails"


def test_partial_runs_report_claims_without_checking_them(tmp_path, capsys):
    # A -p run (fewer steps or seeds) writes to <profile>-partial/: evidence, not a verdict.
    path = make_root(tmp_path, [{**GOOD, "profile": "full"}])
    finish("01_demo", {"mean.abs": 0.9}, profile="full", results_dir=tmp_path / "full-partial", claims_file=path)
    assert "reported (partial run)" in capsys.readouterr().out
    record = json.loads((tmp_path / "full-partial" / "01_demo.json").read_text())
    assert record["claims"]["T1-demo"] == "reported (partial run)"


def test_a_partial_run_may_leave_experiments_out_but_a_full_one_may_not(tmp_path, capsys):
    path = make_root(tmp_path, [GOOD, {**GOOD, "id": "T2-other", "key": "other.key"}])
    finish("01_demo", {"mean.abs": 1.0}, profile="full", results_dir=tmp_path / "full-partial", claims_file=path)
    record = json.loads((tmp_path / "full-partial" / "01_demo.json").read_text())
    assert record["claims"] == {"T1-demo": "reported (partial run)", "T2-other": "not in this partial run"}
    assert "not in this partial run" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"lack key\(s\) 'other.key' \(claim T2-other\)"):
        finish("01_demo", {"mean.abs": 1.0}, profile="full", results_dir=tmp_path / "full", claims_file=path)


def test_full_claims_are_only_reported_at_quick(tmp_path, capsys):
    path = make_root(tmp_path, [{**GOOD, "profile": "full"}])
    finish("01_demo", {"mean.abs": 0.9}, profile="quick", claims_file=path)
    assert "reported (full profile claim)" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="T1-demo"):
        finish("01_demo", {"mean.abs": 0.9}, profile="full", claims_file=path)


def test_finish_uses_the_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv(ledger.CLAIMS_ENV, str(make_root(tmp_path, [GOOD])))
    with pytest.raises(AssertionError, match="T1-demo"):
        finish("01_demo", {"mean.abs": 0.5})
    finish("01_demo", {"mean.abs": 0.8})


def test_finish_validates_results(tmp_path):
    path = make_root(tmp_path, [GOOD])
    with pytest.raises(ValueError, match=r"chapter 01_demo: the results lack key\(s\) 'mean.abs' \(claim T1-demo\)"):
        finish("01_demo", {"mean": 0.8}, claims_file=path)
    with pytest.raises(TypeError, match="must be a dict"):
        finish("01_demo", [("mean.abs", 0.8)], claims_file=path)
    with pytest.raises(TypeError, match="the dict is flat"):
        finish("01_demo", {"mean.abs": 0.8, "nested": {"a": 1.0}}, claims_file=path)
    with pytest.raises(TypeError, match="must be a number"):
        finish("01_demo", {"mean.abs": 0.8, "flag": True}, claims_file=path)
    with pytest.raises(ValueError, match="'mean.abs' is not finite"):
        finish("01_demo", {"mean.abs": math.nan}, claims_file=path)
    with pytest.raises(ValueError, match="slug must look like"):
        finish("demo", {"mean.abs": 0.8}, claims_file=path)
    with pytest.raises(ValueError, match="profile must be one of"):
        finish("01_demo", {"mean.abs": 0.8}, profile="medium", claims_file=path)


def test_finish_accepts_numpy_and_torch_scalars(tmp_path):
    import numpy as np
    import torch

    path = make_root(tmp_path, [GOOD])
    finish("01_demo", {"mean.abs": np.float32(0.8), "t": torch.tensor(2.0)}, results_dir=tmp_path, claims_file=path)
    assert json.loads((tmp_path / "01_demo.json").read_text())["results"]["t"] == 2.0


# --- the committed ledger and results -----------------------------------------------------

def committed_results() -> dict:
    return pages.load_results(BOOK / "results")


def test_committed_ledger_is_valid():
    load_claims(BOOK / "claims.yml")


def test_committed_reproduction_page_is_up_to_date():
    results = committed_results()
    if not any(results.values()):
        pytest.skip("no committed results in book/results/ yet (python -m lipsort.reproduce writes them)")
    expected = pages.render_reproduction(load_claims(BOOK / "claims.yml"), results)
    assert (BOOK / "reproduction.md").read_text() == expected, (
        "book/reproduction.md is stale: run python -m lipsort.reproduce --render-only"
    )
    import yaml

    estimates = yaml.safe_load((BOOK / "estimates.yml").read_text()) if (BOOK / "estimates.yml").is_file() else {}
    full_runs = {**results["full"], **results["full" + ledger.PARTIAL_SUFFIX]}
    figures = {"full": curves.figure_files(full_runs, "full")}
    assert (BOOK / "status.md").read_text() == pages.render_status(results, estimates, figures)
    drawn = {f"results/curves/{p.name}" for p in (BOOK / "results" / "curves").glob("*.png")}
    assert drawn == set(figures["full"].values()), "stale curve figures: run python -m lipsort.reproduce --render-only"


def test_every_committed_claim_says_where_its_tolerance_comes_from():
    claims = load_claims(BOOK / "claims.yml")
    assert all(c.tolerance for c in claims), [c.id for c in claims if not c.tolerance]
    assert all(c.where for c in claims if c.source == "paper")
    # The book's own results are labelled derived, not passed off as the papers'.
    assert {c.id for c in claims if c.source == "derived"} >= {
        "A1-relu-optimum-attains-bound", "A-bjorck-region-order1", "A-power-iteration-one-step-gap",
        "A-linf-projection-sparsity", "A-expressivity-linf-reaches-ceiling"}


def test_ledger_tables_have_at_most_six_columns():
    """Every table of the reproduction page fits a 1366-px screen: at most six columns."""
    text = (BOOK / "reproduction.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert rows, "the reproduction page has no table"
    widest = max(len(line.replace("\\|", "").strip("|").split("|")) for line in rows)
    assert widest <= 6, f"a ledger table has {widest} columns"


def test_the_latest_partial_run_that_measured_a_claim_is_shown():
    claims = [Claim(**{**GOOD, "id": "T-a"}), Claim(**{**GOOD, "id": "T-b", "key": "other"})]

    def record(date, steps, **values):
        return {"results": values, "provenance": {"date": date, "partial": {"steps": steps}}}

    results = {"quick": {}, "full": {}, "quick-partial": {}, "full-partial": {
        "aa/01_demo": record("2026-01-03", 90, **{"mean.abs": 0.9}),
        "bb/01_demo": record("2026-01-02", 60, **{"mean.abs": 0.8}),
        "cc/01_demo": record("2026-01-04", 30, other=1.0),  # newer, but not of T-a
    }}
    page = pages.render_reproduction(claims, results)
    row = next(line for line in page.splitlines() if line.startswith("| `T-a`"))
    assert "*partial* 0.90" in row and "steps=90" in page
    status = pages.render_status(results)
    assert all(f"steps={n}" in status for n in (30, 60, 90))


def test_page_marks_partial_runs_and_never_counts_them():
    claims = [Claim(**{**GOOD, "id": "T-a"}), Claim(**{**GOOD, "id": "T-d", "source": "derived"})]
    results = {"quick": {}, "full": {}, "quick-partial": {}, "full-partial": {
        "01_demo": {"results": {"mean.abs": 0.8}, "provenance": {"partial": {"steps": 60}}}}}
    page = pages.render_reproduction(claims, results)
    assert "*partial* " in page and "steps=60" in page
    assert "· partial ✓" in page
    summary = page.split("## Summary")[1].split("##")[0]
    assert "0 of 1, 1 not run (1 partial)" in summary
    # papers' claims and derived checks are separate tables
    assert page.index("### The papers' claims") < page.index("### Derived checks")
    assert "<details>" in page


def test_quick_claims_hold_in_committed_results():
    """The claim check: fails as soon as a quick-profile claim stops holding (or lacks a value)."""
    results = committed_results()
    if not results["quick"]:
        pytest.skip("no committed quick-profile results in book/results/quick/ yet")
    problems = []
    for c in load_claims(BOOK / "claims.yml"):
        for profile in ("quick", "full"):
            if not ledger.must_hold(c, profile):
                continue
            record = results[profile].get(c.chapter)
            if record is None:
                if profile == "quick":
                    problems.append(f"{c.id}: no quick-profile results for chapter {c.chapter}")
                continue
            value = record["results"].get(c.key)
            if value is None:
                problems.append(f"{c.id}: key {c.key!r} missing from book/results/{profile}/{c.chapter}.json")
            elif not c.holds(value):
                problems.append(
                    f"{c.id} fails at {profile}: {c.key} = {ledger.format_value(value, c.decimals)}, "
                    f"expected {c.expectation()}"
                )
    assert not problems, "\n".join(problems)
