"""The benchmark CLI runs end to end on tiny sizes and reports ratios and checks.

Only the machinery and the correctness columns are asserted, never a speed.
"""

import json
import math
import re
import subprocess
import sys
from collections import defaultdict

import pytest
import torch

from lipsort import bench
from lipsort import functional as F

TINY = ["--quick", "--repeat", "1", "--min-time", "0.001", "--threads", "1"]


def test_reference_bjorck_matches_ours_at_convergence():
    w = torch.randn(12, 7, dtype=torch.float64)
    ref = bench.reference_bjorck(w, 60)
    assert torch.allclose(ref, F.bjorck(w, 60), atol=1e-10)
    assert torch.allclose(ref, F.polar(w), atol=1e-10)
    wide = torch.randn(5, 9, dtype=torch.float64)
    assert torch.allclose(bench.reference_bjorck(wide, 60), F.bjorck(wide, 60), atol=1e-10)


@pytest.mark.parametrize("g", [2, 3, 4, 6])
def test_naive_group_sort_matches_ours(g):
    x = torch.randn(4, 12, 3)
    assert torch.equal(bench.naive_group_sort(x, g), F.group_sort(x, g))


def test_cli_quick_run_reports_ratios_and_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    plot = tmp_path / "widths.png"
    assert bench.main([*TINY, "--json", str(path), "--plot", str(plot)]) == 0
    table = capsys.readouterr().out
    result = json.loads(path.read_text())  # strict JSON
    meta = result["meta"]
    assert meta["tiny"] is True and meta["device"] == "cpu" and meta["torch"] == torch.__version__
    assert plot.stat().st_size > 0
    rows = result["rows"]
    from lipsort.bench.nets import _flushing

    flushes = torch.set_flush_denormal(_flushing())  # supported? (the state stays as it is)
    benches = {*bench.BENCHMARKS, "bcop_kernel"} - (set() if flushes else {"subnormal"})
    assert {r["bench"] for r in rows} == benches  # bcop: two tables
    # How the polar factor got there, for every case it runs in: 3 raw weights, 2 + 2 layers.
    polar = [n for n in result["notes"] if n.startswith("lipsort")]
    assert len(polar) == 7, polar
    for note in polar:  # every call certified, its backward implicit or through the steps
        assert re.search(r": [1-9]\d* steps?, ", note) and re.search(r"backward: |back-propagated$", note), note

    cases = defaultdict(list)
    for r in rows:
        cases[(r["bench"], r["case"])].append(r)
        assert r["time_ms"] > 0 and r["replicates"] >= 1
        assert r["ratio"] > 0 and math.isfinite(r["ratio"])
        assert r["peak_mib"] is None  # measured by the profiler outside the quick mode
    for (name, case), group in cases.items():
        impls = [r["impl"] for r in group]
        assert impls.count("lipsort") == 1 and len(impls) >= 2, (name, case, impls)
        base = next(r["time_ms"] for r in group if r["impl"] == "lipsort")
        for r in group:
            assert r["ratio"] == pytest.approx(r["time_ms"] / base)
            assert r["impl"] in table
        assert case in table

    for r in rows:
        ours = r["impl"] == "lipsort"
        if r["bench"] in ("bjorck", "layer", "widths") and r["value"] is not None:
            assert 0 <= r["value"] < 1 and r["grad_error"] is not None
            if ours:  # certified polar factor: orthonormal, with the exact gradient
                assert r["value"] < 1e-5 and r["grad_error"] < 1e-3
        elif r["bench"] == "groupsort" and r["impl"] != "relu":
            assert r["value"] == 0  # all implementations agree exactly
        elif r["bench"] == "cache" and r["metric"] == "max|Δ logits|":
            # The cached weights are the plain ones; recomputing OSSN's in training mode takes
            # one more power-iteration step first, so its σ̂ (and logits) move a little.
            assert r["value"] <= 1e-6 or (r["impl"] == "recompute" and "OSSN" in r["case"])
        elif r["bench"] == "cache" and r["impl"] in ("lipsort", "linf"):
            assert r["value"] <= 1 + 1e-5  # exact norms of the cached weights
        elif r["bench"] == "mlp" and r["metric"] == "max ‖W‖₂" and r["impl"] != "unconstrained":
            assert r["value"] <= 1 + 1e-5
        elif r["bench"] == "mlp":
            assert r["value"] > 0  # minutes for the A3 run
        elif r["bench"] == "subnormal":  # flushed: none left; torch's default keeps them
            assert r["value"] == 0 if r["impl"] != "not flushed" else r["value"] > 0.2
        elif r["bench"] in ("bcop", "bcop_kernel") and not r["impl"].startswith("unconstrained"):
            # Exact singular values: both constructions orthogonal, with the same gradient.
            assert r["value"] < 1e-5 and r["grad_error"] < 1e-4
    assert "× lipsort" in table


def test_a_quick_run_leaves_the_measured_results_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # where the default book/results/bench/cpu.json would go
    assert bench.main(["groupsort", *TINY]) == 0
    assert "wrote" not in capsys.readouterr().out and not (tmp_path / "book").exists()


@pytest.mark.parametrize("name,shown", [("groupsort", ("max_min", "relu")), ("bcop", ("BCOP", "per-tap"))])
def test_module_entry_point(tmp_path, name, shown):
    path = tmp_path / f"{name}.json"
    cmd = [sys.executable, "-m", "lipsort.bench", name, *TINY, "--json", str(path)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = json.loads(path.read_text())["rows"]
    assert {r["bench"] for r in rows} == ({name, "bcop_kernel"} if name == "bcop" else {name})
    assert all(word in done.stdout for word in shown)


def test_bcop_case_compares_the_per_tap_construction():
    from lipsort.bench.convolutions import TINY_LAYERS

    res = bench.run(["bcop"], repeat=1, threads=1, min_time=0.001, tiny=True, progress=False)
    steps = [r for r in res["rows"] if r["bench"] == "bcop"]
    kernels = [r for r in res["rows"] if r["bench"] == "bcop_kernel"]
    impls = ["lipsort", "per-tap", "per-tap, lipsort Björck", "unconstrained", "unconstrained, lipsort conv"]
    assert len(steps) == len(impls) * len(TINY_LAYERS)
    assert len(kernels) == (len(impls) - 2) * len(TINY_LAYERS)
    for net, c_in, c_out, k, size in TINY_LAYERS:
        case = [r for r in steps if f"{c_in}→{c_out} {k}×{k} @{size}×{size}" in r["case"]]
        assert sorted(r["impl"] for r in case) == sorted(impls)
        ours, peer, fast, free, conv = (next(r for r in case if r["impl"] == i) for i in impls)
        assert ours["ratio"] == 1.0 and peer["ratio"] == pytest.approx(peer["time_ms"] / ours["time_ms"])
        for r in (ours, peer, fast):
            assert r["metric"] == "max|σ-1|" and r["value"] < 1e-5 and r["grad_error"] < 1e-4
        assert free["grad_error"] is None and free["value"] >= 0
        assert conv["grad_error"] is None and conv["value"] == free["value"]  # the same free kernel
        # The kernel construction alone: the same three constructions, orthogonal, one gradient.
        case = [r for r in kernels if f"{c_in}→{c_out} {k}×{k} @{size}×{size}" in r["case"]]
        assert sorted(r["impl"] for r in case) == sorted(impls[:3])
        for r in case:
            assert r["value"] < 1e-5 and r["grad_error"] < 1e-4


def test_stop_case_times_the_early_stop_against_every_step():
    res = bench.run(["stop"], repeat=1, threads=1, min_time=0.001, tiny=True, progress=False)
    rows = [r for r in res["rows"] if r["bench"] == "stop"]
    assert len(rows) == 4 and {r["impl"] for r in rows} == {"lipsort", "every step"}
    for r in rows:  # both Björck loops end orthonormal: 20 steps, or stopped at the floor
        assert r["value"] < 1e-5 and r["time_ms"] > 0
    from lipsort.bench.report import page_table

    table = page_table(res, "stop")
    assert "BCOP Small" in table and "every step" in table


def test_linf_case_times_both_methods_and_each_keeps_its_bound():
    res = bench.run(["linf"], repeat=1, threads=1, min_time=0.001, tiny=True, progress=False)
    rows = {r["impl"]: r for r in res["rows"] if r["bench"] == "linf"}
    assert set(rows) == {"lipsort", "autograd through the projection", "projected gradient", "unconstrained"}
    for name in ("lipsort", "autograd through the projection", "projected gradient"):
        assert rows[name]["value"] <= 1.0 and rows[name]["time_ms"] > 0  # ‖W‖∞ ≤ 1 after the steps
    assert rows["unconstrained"]["value"] > 1.0
    from lipsort.bench.report import page_table

    assert "projected gradient" in page_table(res, "linf")


def test_peak_memory_sees_a_temporary():
    from lipsort.bench._measure import peak_bytes

    def step():
        return torch.ones(1 << 20).sum()  # a 4 MiB temporary, freed before returning

    assert 4 * 2**20 <= peak_bytes(step, torch.device("cpu")) < 8 * 2**20


def test_register_adds_a_benchmark(capsys):
    def runner(cfg, deel, notes):
        notes.append("custom ran")
        return []

    bench.register("custom", runner)
    try:
        result = bench.run(["custom"], repeat=1, threads=1, tiny=True, progress=False)
        assert "custom ran" in result["notes"] and "custom" in bench.BENCHMARKS
    finally:
        bench._RUNNERS.pop("custom")
        bench.BENCHMARKS = tuple(bench._RUNNERS)


def test_bad_arguments_exit_with_a_usage_error(capsys):
    for argv, message in ((["nope"], "unknown benchmark(s)"), (["--repeat", "0"], "repeat")):
        with pytest.raises(SystemExit) as info:
            bench.main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert message in err, err
    with pytest.raises(ValueError, match="choose from"):
        bench.run(["nope"])


def test_the_performance_page_shows_the_committed_benchmark_results():
    from pathlib import Path

    from lipsort.bench.report import fill_page

    book = Path(__file__).resolve().parents[1] / "book"
    text = (book / "performance.md").read_text(encoding="utf-8")
    assert text.count("<!-- bench: ") >= 7, "the page's tables are generated between bench markers"
    assert fill_page(text, book / "results" / "bench") == text, (
        "book/performance.md is stale: run python -m lipsort.reproduce --render-only"
    )


def test_a_performance_table_names_what_is_missing(tmp_path):
    from lipsort.bench.report import fill_page, page_table

    with pytest.raises(FileNotFoundError, match="nothing.json"):
        fill_page("<!-- bench: nothing.json layer -->\n<!-- /bench -->", tmp_path)
    with pytest.raises(ValueError, match="no rows of 'layer'"):
        page_table({"rows": [{"bench": "bcop"}]}, "layer")
    with pytest.raises(ValueError, match="unknown performance table"):
        page_table({"rows": []}, "speed")
