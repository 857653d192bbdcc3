"""Accuracy-against-epoch figures of the status page, drawn from the curves result files keep."""

from __future__ import annotations

import pytest

from lipsort.book import curves, pages


def _record(date, **values):
    return {"results": values, "provenance": {"date": date}}


def test_curves_are_parsed_and_the_later_run_wins():
    records = {
        "aa/06_demo": _record("2026-01-02", **{"mnist.large.bcop.test_acc.e001": 0.5, "mnist.large.bcop.cert158.e001": 0.1}),
        "bb/06_demo": _record("2026-01-03", **{"mnist.large.bcop.test_acc.e001": 0.7,
                                               "mnist.large.bcop.test_acc.e002": 0.8, "clean": 99.0}),
        "05_other": _record("2026-01-01", **{"mnist.relu.test_acc.e010": 0.9, "mnist.relu.clean": 0.9}),
        "cc/07_none": _record("2026-01-05", **{"b4.acc": 0.9}),
    }
    got = curves.chapter_curves(records)
    assert set(got) == {"05_other", "06_demo"}  # a chapter without curves gets no figure
    assert got["06_demo"][("mnist.large.bcop", "test_acc")] == [(1, 0.7), (2, 0.8)]  # the later record's
    assert got["06_demo"][("mnist.large.bcop", "cert158")] == [(1, 0.1)]  # kept: only the earlier one has it
    assert got["05_other"] == {("mnist.relu", "test_acc"): [(10, 0.9)]}


def test_figures_are_written_once_and_shown_on_the_status_page(tmp_path):
    records = {"aa/06_demo": _record("2026-01-02", **{"mnist.small.rko.test_acc.e001": 0.5,
                                                      "mnist.small.rko.test_acc.e002": 0.6,
                                                      "mnist.small.rko.cert158.e002": 0.2})}
    files = curves.write_figures(records, tmp_path, "full")
    png = tmp_path / files["06_demo"]
    assert files == {"06_demo": "results/curves/full-06_demo.png"} and png.read_bytes()[:4] == b"\x89PNG"
    stamp = png.stat().st_mtime_ns
    assert curves.write_figures(records, tmp_path, "full") == files and png.stat().st_mtime_ns == stamp
    results = {"quick": {}, "full": {}, "quick-partial": {}, "full-partial": records}
    status = pages.render_status(results, figures={"full": files})
    assert "```{figure} results/curves/full-06_demo.png" in status
    assert "```{figure}" not in pages.render_status(results)


def test_curve_keys_are_the_ones_the_figures_read():
    key = curves.curve_key("mnist.small.rko", "cert158", 7)
    assert curves.epoch_curves({key: 0.5}) == {("mnist.small.rko", "cert158"): [(7, 0.5)]}
    with pytest.raises(ValueError, match="metric 'cert.158'"):
        curves.curve_key("mnist", "cert.158", 1)
    with pytest.raises(ValueError, match="metric 'cert.x'"):
        curves.curve_key("mnist", "cert.x", 1)  # would read back as run 'mnist.cert', metric 'x'


def test_panels_follow_the_metrics():
    fig = curves.draw({("a", "test_acc"): [(1, 0.5)], ("a", "cert030"): [(1, 0.4)], ("b", "test_acc"): [(1, 0.6)]}, "t")
    axes = fig.get_axes()
    assert [ax.get_ylabel() for ax in axes] == ["test accuracy (%)", "certified accuracy at ε = 0.3 (%)"]
    assert [line.get_ydata()[0] for line in axes[0].get_lines()] == [50.0, 60.0]
