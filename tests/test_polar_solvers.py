"""The polar factor's predicted steps and its Chebyshev backward: the speed-ups keep the
certificate and the exact gradient, and a wrong prediction costs time, never correctness."""

import pytest
import torch

from lipsort import functional as F
from tests.reference import random_matrix, svd_polar

DT = torch.float64


def _spread(shape, low, high, seed=0):
    """A matrix with singular values evenly spread over [low, high]."""
    u = svd_polar(random_matrix(shape, seed=seed))
    v = svd_polar(random_matrix((shape[1], shape[1]), seed=seed + 1))
    return (u * torch.linspace(low, high, shape[1], dtype=DT)) @ v.T


def _warmed(w):
    """A warm buffer as training leaves it: estimates from the previous, nearby weight."""
    warm = torch.zeros(2, min(w.shape), dtype=w.dtype)
    F.polar(w + 1e-3 * random_matrix(w.shape, seed=99).to(w.dtype), warm=warm)
    return warm


@pytest.mark.parametrize("shape, low, high", [((48, 32), 0.7, 1.3), ((32, 32), 0.5, 1.5)])
def test_predicted_steps_run_unmeasured_and_still_certify(shape, low, high):
    w = _spread(shape, low, high)
    q = F.polar(w, warm=_warmed(w))
    assert F._polar.last["unmeasured"] >= 2  # the steps before the certifying one
    assert F._polar.last["steps"] == F._polar.last["unmeasured"] + 1  # the prediction held
    s = torch.linalg.svdvals(q)
    assert (s - 1).abs().max() <= 1e-12 and s.max() <= 1 + 1e-14
    assert torch.allclose(q, svd_polar(w), atol=1e-11)


def test_a_prediction_that_is_too_short_falls_back_to_measured_steps(monkeypatch):
    # Estimates that miss the bottom of the spectrum predict too few steps: the check at the
    # predicted last step fails, measured steps finish, and the result is certified as ever.
    w = _spread((40, 32), 0.5, 1.5)
    schedule = F._polar._schedule
    monkeypatch.setattr(F._polar, "_schedule", lambda lo, t, *a: schedule(0.9, t, *a))
    q = F.polar(w, warm=_warmed(w))
    assert F._polar.last["unmeasured"] >= 1  # predicted, from the wrong estimate
    assert F._polar.last["steps"] > F._polar.last["unmeasured"] + 1
    s = torch.linalg.svdvals(q)
    assert (s - 1).abs().max() <= 1e-12 and s.max() <= 1 + 1e-14


@pytest.mark.parametrize("lo", [0.05, 0.25, 0.6, 0.9])
@pytest.mark.parametrize("tol", [1e-6, 1e-12])
def test_schedule_is_sufficient_and_at_most_one_step_long(lo, tol):
    # With the true extremes, the predicted scalings take diag(σ) within the tolerance, and
    # the margin on the predicted error costs at most one step over what exact arithmetic needs.
    sigma = torch.linspace(lo, 1.0, 50, dtype=DT)
    alphas = F._polar._schedule(lo, 1.0, tol, 50)

    def error(steps):
        s = sigma.clone()
        for a in steps:
            s = 1.5 * a * s - 0.5 * (a * s) ** 3
        return (s - 1).abs().max()

    assert error(alphas) <= tol
    needed = next(k for k in range(len(alphas) + 1) if error(alphas[:k]) <= tol)
    assert len(alphas) <= needed + 1


@pytest.mark.parametrize("kappa", [1.2, 2.0, 3.5])
def test_chebyshev_iteration_reaches_its_tolerance(kappa):
    d = 24
    b = svd_polar(random_matrix((d, d), seed=3))
    lam = torch.linspace(1.0, kappa, d, dtype=DT)
    h = (b * lam) @ b.T
    c = random_matrix((d, d), seed=4)
    c = c - c.T
    ref = F._polar._lyapunov_skew_eigh(lam, b, c)
    for rtol in (1e-5, 1e-10):
        lo, hi, steps = F._polar._chebyshev_plan(float(lam[-1] ** 2), float(lam[0] ** 2), rtol)
        z = F._polar._lyapunov_skew_chebyshev(h, c, lo, hi, steps, rtol)
        residual = h @ z + z @ h - c
        assert residual.norm() <= rtol * c.norm()
        assert (z - ref).norm() <= rtol * c.norm() / 2  # error ≤ residual / λ_min(L), λ_min(L) = 2
    # An interval that misses the spectrum does not converge: None, the caller falls back.
    assert F._polar._lyapunov_skew_chebyshev(h, c, 0.2, 0.4, 6, 1e-5) is None
    assert F._polar._chebyshev_plan(16.0, 0.5, 1e-5) is None  # κ(H) over 4: conjugate gradients


@pytest.mark.parametrize("shape", [(40, 32), (32, 32), (32, 48)])
def test_polar_backward_by_chebyshev_is_the_exact_gradient(shape):
    w = _spread(shape if shape[0] >= shape[1] else shape[::-1], 0.8, 1.25)
    w = (w if shape[0] >= shape[1] else w.T).requires_grad_()
    g_out = random_matrix(shape, seed=5)
    (grad,) = torch.autograd.grad(F.polar(w, warm=_warmed(w.detach())), w, g_out)
    (ref_grad,) = torch.autograd.grad(svd_polar(w), w, g_out)
    assert F._polar.last["backward"].startswith("Chebyshev iteration")
    assert (grad - ref_grad).norm() <= 1e-9 * ref_grad.norm()


def test_polar_backward_when_chebyshev_misses_falls_back_to_conjugate_gradients(monkeypatch):
    w = _spread((40, 32), 0.8, 1.25).requires_grad_()
    monkeypatch.setattr(F._polar, "_chebyshev_plan", lambda *a: (0.2, 0.4, 6))  # a wrong interval
    g_out = random_matrix((40, 32), seed=6)
    (grad,) = torch.autograd.grad(F.polar(w, warm=_warmed(w.detach())), w, g_out)
    (ref_grad,) = torch.autograd.grad(svd_polar(w), w, g_out)
    assert F._polar.last["backward"].startswith("Chebyshev (6 products) unconverged, then conjugate")
    assert (grad - ref_grad).norm() <= 1e-9 * ref_grad.norm()


def test_a_stale_warm_start_cannot_flip_the_top_singular_direction():
    # Warm vectors blind to the top direction (σ = 1.8 against 0.8–1.2) estimate σ_max far too
    # low; a first scaling from them would send ασ_max past √3, where f(ασ) < 0 flips that
    # direction: still norm 1, no longer the polar factor. The first step proves α²λ_max < 3.
    sigma = torch.linspace(0.8, 1.2, 32, dtype=DT)
    sigma[0] = 1.8
    w = torch.diag(sigma)
    warm = random_matrix((2, 32), seed=7)
    warm[:, 0] = 0
    assert torch.allclose(F.polar(w, warm=warm), svd_polar(w), atol=1e-11)


@pytest.mark.parametrize("top", [2.0, 2.925, 3.4])
def test_a_lanczos_breakdown_does_not_fake_a_zero_singular_value(top):
    # diag(top, 1, …, 1): the Krylov space is 2-D, Lanczos breaks down exactly, and its zero
    # rows must not add a Ritz value 0 (which made α σ_max = √3 and the top direction's sign
    # a matter of rounding).
    w = torch.eye(48, dtype=DT)
    w[0, 0] = top
    assert torch.allclose(F.polar(w), torch.eye(48, dtype=DT), atol=1e-11)
