"""The polar factor's predicted steps and its Chebyshev backward: the speed-ups keep the
certificate and the exact gradient, and a wrong prediction costs time, never correctness."""

import pytest
import torch

from lipsort import functional as F

DT = torch.float64


def _random(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _svd_polar(w):
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    return u @ vh


def _spread(shape, low, high, seed=0):
    """A matrix with singular values evenly spread over [low, high]."""
    u = _svd_polar(_random(shape, seed=seed))
    v = _svd_polar(_random((shape[1], shape[1]), seed=seed + 1))
    return (u * torch.linspace(low, high, shape[1], dtype=DT)) @ v.T


def _warmed(w):
    """A warm buffer as training leaves it: estimates from the previous, nearby weight."""
    warm = torch.zeros(2, min(w.shape), dtype=w.dtype)
    F.polar(w + 1e-3 * _random(w.shape, seed=99).to(w.dtype), warm=warm)
    return warm


@pytest.mark.parametrize("shape, low, high", [((48, 32), 0.7, 1.3), ((32, 32), 0.5, 1.5)])
def test_predicted_steps_run_unmeasured_and_still_certify(shape, low, high):
    w = _spread(shape, low, high)
    q = F.polar(w, warm=_warmed(w))
    assert F._polar.last["unmeasured"] >= 2  # the steps before the certifying one
    assert F._polar.last["steps"] == F._polar.last["unmeasured"] + 1  # the prediction held
    s = torch.linalg.svdvals(q)
    assert (s - 1).abs().max() <= 1e-12 and s.max() <= 1 + 1e-14
    assert torch.allclose(q, _svd_polar(w), atol=1e-11)


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


def test_schedule_predicts_the_steps_of_an_exactly_known_spectrum():
    # With the true extremes, the predicted scalings are the ones exact arithmetic takes: the
    # matrix diag(σ) after them is within the tolerance, and one step fewer is not.
    sigma = torch.linspace(0.25, 1.0, 50, dtype=DT)
    alphas = F._polar._schedule(0.25, 1.0, 1e-12, 50)

    def run(steps):
        s = sigma.clone()
        for a in steps:
            s = 1.5 * a * s - 0.5 * (a * s) ** 3
        return (s - 1).abs().max()

    assert run(alphas) <= 1e-12 < run(alphas[:-1])


@pytest.mark.parametrize("kappa", [1.2, 2.0, 3.5])
def test_chebyshev_iteration_reaches_its_tolerance(kappa):
    d = 24
    b = _svd_polar(_random((d, d), seed=3))
    lam = torch.linspace(1.0, kappa, d, dtype=DT)
    h = (b * lam) @ b.T
    c = _random((d, d), seed=4)
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
    g_out = _random(shape, seed=5)
    (grad,) = torch.autograd.grad(F.polar(w, warm=_warmed(w.detach())), w, g_out)
    (ref_grad,) = torch.autograd.grad(_svd_polar(w), w, g_out)
    assert F._polar.last["backward"].startswith("Chebyshev iteration")
    assert (grad - ref_grad).norm() <= 1e-9 * ref_grad.norm()


def test_polar_backward_when_chebyshev_misses_falls_back_to_conjugate_gradients(monkeypatch):
    w = _spread((40, 32), 0.8, 1.25).requires_grad_()
    monkeypatch.setattr(F._polar, "_chebyshev_plan", lambda *a: (0.2, 0.4, 6))  # a wrong interval
    g_out = _random((40, 32), seed=6)
    (grad,) = torch.autograd.grad(F.polar(w, warm=_warmed(w.detach())), w, g_out)
    (ref_grad,) = torch.autograd.grad(_svd_polar(w), w, g_out)
    assert F._polar.last["backward"].startswith("Chebyshev (6 products) unconverged, then conjugate")
    assert (grad - ref_grad).norm() <= 1e-9 * ref_grad.norm()


def test_a_stale_warm_start_cannot_flip_the_top_singular_direction():
    # Warm vectors blind to the top direction (σ = 1.8 against 0.8–1.2) estimate σ_max far too
    # low; a first scaling from them would send ασ_max past √3, where f(ασ) < 0 flips that
    # direction: still norm 1, no longer the polar factor. The first step proves α²λ_max < 3.
    sigma = torch.linspace(0.8, 1.2, 32, dtype=DT)
    sigma[0] = 1.8
    w = torch.diag(sigma)
    warm = _random((2, 32), seed=7)
    warm[:, 0] = 0
    assert torch.allclose(F.polar(w, warm=warm), _svd_polar(w), atol=1e-11)


@pytest.mark.parametrize("top", [2.0, 2.925, 3.4])
def test_a_lanczos_breakdown_does_not_fake_a_zero_singular_value(top):
    # diag(top, 1, …, 1): the Krylov space is 2-D, Lanczos breaks down exactly, and its zero
    # rows must not add a Ritz value 0 (which made α σ_max = √3 and the top direction's sign
    # a matter of rounding).
    w = torch.eye(48, dtype=DT)
    w[0, 0] = top
    assert torch.allclose(F.polar(w), torch.eye(48, dtype=DT), atol=1e-11)
