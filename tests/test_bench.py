"""The benchmark CLI runs end to end on tiny sizes and reports ratios and checks.

Only the machinery and the correctness columns are asserted, never a speed.
"""

import json
import math
import subprocess
import sys
from collections import defaultdict

import pytest
import torch

from lipsort import bench
from lipsort import functional as F

TINY = ["--tiny", "--repeat", "1", "--min-time", "0.001", "--threads", "1"]


def test_reference_bjorck_matches_ours_at_convergence():
    w = torch.randn(12, 7, dtype=torch.float64)
    ref = bench.reference_bjorck(w, 60)
    assert torch.allclose(ref, F.bjorck(w, 60), atol=1e-10)
    wide = torch.randn(5, 9, dtype=torch.float64)
    assert torch.allclose(bench.reference_bjorck(wide, 60), F.bjorck(wide, 60), atol=1e-10)


@pytest.mark.parametrize("g", [2, 3, 6])
def test_naive_group_sort_matches_ours(g):
    x = torch.randn(4, 6, 3)
    assert torch.equal(bench.naive_group_sort(x, g), F.group_sort(x, g))


def test_cli_tiny_run_reports_ratios_and_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert bench.main([*TINY, "--json", str(path)]) == 0
    table = capsys.readouterr().out
    result = json.loads(path.read_text())  # strict JSON
    assert result["meta"]["tiny"] is True and result["meta"]["iters"] == 5
    rows = result["rows"]
    benches = {r["bench"] for r in rows}
    assert {"bjorck", "groupsort"} <= benches
    try:
        import lipsort.parametrizations  # noqa: F401
    except ImportError:
        pass
    else:
        assert "cache" in benches

    cases = defaultdict(list)
    for r in rows:
        cases[(r["bench"], r["case"])].append(r)
        assert r["time_ms"] > 0 and r["replicates"] >= 1
        assert r["ratio"] > 0 and math.isfinite(r["ratio"])
    for (name, case), group in cases.items():
        impls = [r["impl"] for r in group]
        assert impls.count("lipsort") == 1 and len(impls) >= 2, (name, case, impls)
        base = next(r["time_ms"] for r in group if r["impl"] == "lipsort")
        for r in group:
            assert r["ratio"] == pytest.approx(r["time_ms"] / base)
            assert r["impl"] in table
        assert case in table

    for r in rows:
        if r["bench"] == "bjorck":  # pre-scaled order-1 Björck keeps every σ in (0, 1]
            assert 0 <= r["value"] < 1 and r["saved_mib"] is not None
        elif r["bench"] == "groupsort":  # all implementations agree exactly
            assert r["value"] == 0
        elif r["bench"] == "cache":  # the cached weights are the recomputed ones
            assert r["value"] <= 1e-6
    wide = [
        r for r in rows if r["bench"] == "bjorck" and "wide" in r["case"] and r["impl"] == "lipsort"
    ]
    assert wide and wide[0]["value"] < 1e-5  # 5 iterations converge for a 4x32 weight
    assert "× lipsort" in table


def test_module_entry_point(tmp_path):
    path = tmp_path / "gs.json"
    cmd = [sys.executable, "-m", "lipsort.bench", "groupsort", *TINY, "--json", str(path)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = json.loads(path.read_text())["rows"]
    assert {r["bench"] for r in rows} == {"groupsort"}
    assert "max_min" in done.stdout


def test_bad_arguments_exit_with_a_usage_error(capsys):
    for argv, message in ((["nope"], "unknown benchmark(s) nope"), (["--repeat", "0"], "repeat")):
        with pytest.raises(SystemExit) as info:
            bench.main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert message in err, err
    with pytest.raises(ValueError, match="choose from"):
        bench.run(["nope"])
