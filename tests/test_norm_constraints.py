"""Tests of the chapter-03 glue (lipsort.experiments.norm_constraints): the scalar theory of
Björck's iteration against matrices, power-iteration and projection checks, the critic runs."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch

from lipsort import functional as F
from lipsort.experiments import norm_constraints as xn

F64 = torch.float64


# --------------------------------------------------------------------------- scalar map


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_map_increases_to_one_without_overshoot(order):
    s = np.linspace(1e-6, 1 - 1e-9, 10001)
    g = xn.bjorck_map(s, order)
    # Strictly between s and 1 in exact arithmetic; in floating point g rounds to 1 near s = 1.
    assert np.all(g > s) and np.all(g <= 1)
    assert np.all(g[s < 0.99] < 1)
    assert xn.bjorck_map(1.0, order) == 1.0


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_map_converges_with_order_p_plus_one(order):
    # |g_p(1 + e) − 1| ~ C e^(p+1): halving e divides the error by about 2^(p+1).
    e = np.array([1e-2, 5e-3])
    err = np.abs(xn.bjorck_map(1 + e, order) - 1)
    assert err[0] / err[1] == pytest.approx(2 ** (order + 1), rel=0.1)


def test_map_is_odd_and_matches_order1_formula():
    s = np.linspace(-3, 3, 101)
    assert np.allclose(xn.bjorck_map(s, 1), 1.5 * s - 0.5 * s**3)
    for p in (1, 2, 3, 4):
        assert np.allclose(xn.bjorck_map(-s, p), -xn.bjorck_map(s, p))


def test_closed_form_edges():
    e1, e2, e3 = (xn.region_edges_exact(p) for p in (1, 2, 3))
    assert e1["basin"] == pytest.approx(math.sqrt(3), abs=1e-12)
    assert e1["bounded"] == pytest.approx(math.sqrt(5), abs=1e-12)
    assert e2["basin"] == e2["bounded"] == pytest.approx(math.sqrt(7 / 3), abs=1e-12)
    assert e3["bounded"] == pytest.approx(math.sqrt(3), abs=1e-12)
    # g_1(√3) = 0 and g_1(√5) = −√5 (a 2-cycle), g_2 has a fixed point at √(7/3).
    assert xn.bjorck_map(math.sqrt(3), 1) == pytest.approx(0, abs=1e-12)
    assert xn.bjorck_map(math.sqrt(5), 1) == pytest.approx(-math.sqrt(5), abs=1e-12)
    assert xn.bjorck_map(math.sqrt(7 / 3), 2) == pytest.approx(math.sqrt(7 / 3), abs=1e-12)


def test_measured_regions_match_closed_forms_and_contain_sqrt2():
    df = xn.convergence_regions(n_grid=2001, n_iters=200)
    assert (df["max |numeric − closed form|"] < 1e-9).all()
    assert (df["basin"] > math.sqrt(2)).all()
    assert df.loc[1, "to +1 in between"] + df.loc[1, "to −1 in between"] == pytest.approx(1.0)
    assert np.isnan(df.loc[2, "to +1 in between"])  # even orders: no bounded band beyond the basin


def test_closed_forms_hold_beyond_order_four_and_approach_sqrt2():
    df = xn.convergence_regions(orders=[5, 6], n_grid=1001, n_iters=200)
    assert (df["max |numeric − closed form|"] < 1e-9).all()
    odd = [xn.region_edges_exact(p)["basin"] for p in (1, 3, 5, 7, 9)]
    even = [xn.region_edges_exact(p)["basin"] for p in (2, 4, 6, 8, 10)]
    for seq in (odd, even):
        assert np.all(np.diff(seq) < 0) and min(seq) > math.sqrt(2)


def test_fates_and_orbit():
    assert xn.fates([0.3, 1.6, 1.9, 2.3], 1).tolist() == [1, 1, -1, 2]
    orbit = xn.scalar_orbit([0.5, 3.0], 1, 20)
    assert orbit.shape == (21, 2)
    assert abs(orbit[-1, 0] - 1) < 1e-12 and np.isinf(orbit[-1, 1])


def test_iterations_to_tol_checks_its_input():
    assert xn.iterations_to_tol(1.0, 1).tolist() == [0]
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        xn.iterations_to_tol(1.5, 1)
    with pytest.raises(ValueError, match="order"):
        xn.taylor_coefficients(-1)


# --------------------------------------------------------------------------- matrices


@pytest.mark.parametrize("order", [1, 3])
def test_matrix_follows_scalar_map_with_sign_flips(order):
    out = xn.matrix_follows_scalar_map(order, [0.2, 1.0, 1.3, 1.65], n_iters=40)
    assert out["max_deviation"] < 1e-10
    assert out["limits"] == out["predicted"]
    assert out["orthonormality_error"] < 1e-12
    # 1.65 lies beyond the order-3 basin (1.589) but not beyond order 1's (√3).
    assert out["distance_to_polar"] == pytest.approx(2.0 if order == 3 else 0.0, abs=1e-9)


def test_matrix_follows_scalar_map_rejects_divergent_sigmas():
    with pytest.raises(ValueError, match="diverges"):
        xn.matrix_follows_scalar_map(2, [0.5, 2.0])


def test_sign_flip_example():
    out = xn.sign_flip_example(n=5, seed=1)
    assert out["orthonormality_error"] < 1e-12
    assert out["distance_to_polar"] == pytest.approx(2.0, abs=1e-12)


def test_prescaled_traces_are_monotone_bounded_and_predicted():
    recs = xn.bjorck_traces([(24, 24), (32, 16)], n_trials=2, n_iters=25, seed=3, progress=False)
    assert len(recs) == 2 * 2 * 4
    for r in recs:
        assert r["norm"].max() <= 1 + 1e-12
        assert r["min_increase"] >= -1e-12
        assert r["scalar_gap"] < 1e-9
        assert 0 < r["s_min"] <= 1
    summary = xn.trace_summary(recs)
    assert summary["all match"].all()
    # Higher orders never need more iterations.
    for shape in ("24×24", "32×16"):
        iters = summary.loc[shape, "max iters"].to_numpy()
        assert np.all(np.diff(iters) <= 0)


def test_iteration_count_equals_scalar_prediction_from_s_min():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(40, 40, generator=gen, dtype=F64)
    s_min = float(torch.linalg.svdvals(F.bjorck_prescale(w)).min())
    for p in (1, 2):
        k = int(xn.iterations_to_tol(s_min, p, 1e-6)[0])
        err = lambda n: float((torch.linalg.svdvals(F.bjorck(w, n_iters=n, order=p)) - 1).abs().max())  # noqa: E731
        assert err(k) <= 1e-6 < err(k - 1)


def test_flops():
    assert xn.flops_per_iteration(10, 10, 1) == 4000
    assert xn.flops_per_iteration(20, 10, 2) == 4 * 100 * 20 + 2 * 1000
    assert xn.flops_per_iteration(10, 20, 2) == xn.flops_per_iteration(20, 10, 2)


# --------------------------------------------------------------------------- power iteration


def test_marchenko_pastur_moments_and_power_theory():
    assert [xn.marchenko_pastur_moment(j, 1.0) for j in range(1, 6)] == [1, 2, 5, 14, 42]
    # m_2(c) = 1 + c, m_3(c) = 1 + 3c + c².
    assert xn.marchenko_pastur_moment(2, 0.3) == pytest.approx(1.3)
    assert xn.marchenko_pastur_moment(3, 0.3) == pytest.approx(1 + 0.9 + 0.09)
    assert xn.power_iteration_theory(0) == pytest.approx(0.5)
    assert xn.power_iteration_theory(1) == pytest.approx(math.sqrt(5 / 8))
    vals = [xn.power_iteration_theory(k, (300, 100)) for k in range(30)]
    assert np.all(np.diff(vals) > 0) and vals[-1] < 1


def test_power_iteration_never_overestimates():
    df = xn.power_iteration_gaps([(30, 30), (40, 20)], n_iters=[1, 3], n_trials=20, seed=1)
    assert len(df) == 2 * 2 * 20
    assert (df["ratio"] <= 1 + 1e-12).all() and (df["ratio"] > 0).all()
    med = df.groupby("iterations")["ratio"].median()
    assert med[3] > med[1]


# --------------------------------------------------------------------------- projection


def test_bisection_reference_agrees_with_condat():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(50, 33, generator=gen, dtype=F64) * torch.rand(50, 1, generator=gen, dtype=F64) * 0.3
    for r in (0.5, 1.0, 3.0):
        assert torch.allclose(xn.project_rows_l1_bisection(w, r), F.project_rows_l1(w, r), atol=1e-12, rtol=0)


def test_projection_checks():
    c = xn.projection_checks(64, 40, radius=2.0, seed=2)
    assert c["max_row_l1"] <= 2.0
    assert 0.2 < c["fraction_inside"] < 0.8
    assert c["inside_change"] == 0.0 and c["idempotence"] == 0.0
    assert c["vs_bisection"] < 1e-12 and c["kkt_violation"] < 1e-12 and c["outside_on_sphere"] < 1e-12


def test_sparsity_theory():
    assert xn.linf_sparsity_theory(1024) == pytest.approx(0.75)
    df = xn.projection_sparsity([4096], out_features=32)
    assert df.loc[4096, "measured"] == pytest.approx(df.loc[4096, "theory 1 − √2·n^(−1/4)"], abs=0.01)


# --------------------------------------------------------------------------- critics


def test_linf_w1_circle():
    assert xn.linf_w1_circle() == pytest.approx(2 * math.sqrt(2) / math.pi)
    assert xn.linf_w1_circle(4096) == pytest.approx(xn.linf_w1_circle(), abs=1e-6)  # O(1/n²) quadrature
    x = xn.circle_points(8)
    assert torch.allclose(x.norm(dim=1), torch.ones(8, dtype=F64))


@pytest.mark.parametrize("constraint", ["linf", "spectral", "bjorck"])
def test_short_critic_runs_respect_their_constraint(constraint):
    r = xn.train_constrained_critic(constraint, "maxmin", widths=(8, 8), steps=20, batch_size=16, lr=0.05,
                                    progress=False, n_eval=256)
    assert len(r.history.eval) >= 1 and math.isfinite(r.estimate)
    if constraint == "linf":
        assert r.lipschitz_linf <= 1.0
        # pointwise f(x) − f(0) ≤ ‖x‖∞, so the estimate is below the ℓ∞ distance
        assert r.estimate <= xn.linf_w1_circle(256) + 1e-12
    if constraint == "spectral":
        layers = r.weight_trace["per_layer"]
        assert layers.shape == (3, 20)
        assert layers.min() >= -1e-12  # σ̂ ≤ σ: the weight used never has norm below 1
    if constraint == "bjorck":
        assert r.lipschitz_l2 <= 1 + 1e-9
        assert r.weight_trace["bjorck"].max() < 1e-4
    assert r.certified <= xn.linf_w1_circle(256) + 1e-12 if constraint == "linf" else r.certified <= 1.0
    table = xn.critics_table([r])
    assert list(table.index) == [r.label]


def test_plots_smoke():
    import matplotlib.pyplot as plt

    recs = xn.bjorck_traces([(8, 8)], orders=[1, 2], n_trials=2, n_iters=5, progress=False)
    gaps = xn.power_iteration_gaps([(8, 8)], n_iters=[1, 2], n_trials=3)
    for fig in (
        xn.plot_scalar_maps(orders=(1, 2), n_grid=101),
        xn.plot_bjorck_convergence(recs, orders=(1, 2)),
        xn.plot_power_gaps(gaps, {"layer": np.array([1e-3, 1e-4])}),
        xn.plot_projection(xn.projection_sparsity([16, 64], out_features=8), n=16),
    ):
        assert fig.axes
        plt.close(fig)
