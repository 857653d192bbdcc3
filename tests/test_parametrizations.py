"""Tests of lipsort.parametrizations: Björck, spectral and L∞ constraints, eval cache, frozen."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from lipsort import functional
from lipsort.parametrizations import (
    BjorckOrthonormal,
    EvalCachedConstraint,
    LinfProjected,
    SpectralNormalized,
    bjorck_orthonormal,
    frozen,
    linf_projected,
    spectral_normalized,
)

F64 = torch.float64
CONSTRAINTS = {
    "bjorck": bjorck_orthonormal,
    "spectral": spectral_normalized,
    "linf": linf_projected,
}
# (in_features, out_features): weights of shape (out, in) that are square, wide, tall.
SHAPES = {"square": (16, 16), "wide": (24, 8), "tall": (8, 24)}


pytestmark = pytest.mark.usefixtures("one_thread")


def sv_error(w: torch.Tensor) -> float:
    """Largest |σᵢ - 1| over the exact singular values."""
    s = torch.linalg.svdvals(w.detach().to(F64))
    return float((s - 1).abs().max())


def original(layer: nn.Linear) -> torch.Tensor:
    return layer.parametrizations.weight.original


def param(layer: nn.Linear):
    return layer.parametrizations.weight[0]


def ill_conditioned(out_f: int, in_f: int, dtype, lo: float = -6.0, hi: float = 2.0):
    """U diag(s) Vᵀ with singular values log-spaced from 10^lo to 10^hi."""
    k = min(out_f, in_f)
    u, _ = torch.linalg.qr(torch.randn(out_f, k, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(in_f, k, dtype=F64))
    s = torch.logspace(lo, hi, k, dtype=F64)
    return ((u * s) @ v.T).to(dtype)


def initial_weight(kind: str, out_f: int, in_f: int, dtype) -> torch.Tensor:
    w = torch.randn(out_f, in_f, dtype=F64) / math.sqrt(in_f)
    if kind == "ill":
        return ill_conditioned(out_f, in_f, dtype)
    return (w * float(kind)).to(dtype)


def linear_with(weight: torch.Tensor, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def set_original(layer: nn.Linear, value: torch.Tensor) -> None:
    """Write the free parameter directly, bypassing right_inverse."""
    with torch.no_grad():
        original(layer).copy_(value)


def reference_weight(layer: nn.Linear) -> torch.Tensor:
    """The eval-mode effective weight recomputed from scratch with the functional ops."""
    p, v = param(layer), original(layer).detach()
    with torch.no_grad():
        if isinstance(p, BjorckOrthonormal):
            if p.eval_iters is None:  # the certified path, from a cold start in eval mode
                return functional.polar(v, p.tol)
            return functional.bjorck(v, p.eval_iters, p.order)
        if isinstance(p, SpectralNormalized):
            return v / functional.power_iteration(v, p.u, 0)[0]
        return functional.project_rows_l1(v, p.radius)


def train_steps(model: nn.Module, n_steps: int, lr: float = 1e-2, opt_cls=torch.optim.Adam, seed=0):
    """A few optimizer steps on a regression loss; returns the optimizer."""
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    n_in = next(m for m in model.modules() if isinstance(m, nn.Linear)).in_features
    x = torch.randn(32, n_in, generator=gen, dtype=F64).to(dtype)
    y = 3 * torch.randn(32, model(x).shape[1], generator=gen, dtype=F64).to(dtype)
    opt = opt_cls(model.parameters(), lr=lr)
    for _ in range(n_steps):
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
    return opt


# --------------------------------------------------------------------------- Björck


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("kind", ["1", "1e-8", "1e8", "ill"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_bjorck_singular_values_at_registration(shape, kind, dtype):
    torch.manual_seed(0)
    in_f, out_f = SHAPES[shape]
    layer = bjorck_orthonormal(linear_with(initial_weight(kind, out_f, in_f, dtype)))
    assert layer.weight.dtype == dtype
    assert sv_error(layer.weight) < 1e-4
    assert sv_error(layer.eval().weight) < 1e-4
    # The stored free parameter is the orthonormal polar factor of the given weight.
    assert sv_error(original(layer)) < (1e-12 if dtype == F64 else 1e-5)


@pytest.mark.parametrize("kind", ["1", "ill"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("opt_cls, lr", [(torch.optim.Adam, 1e-2), (torch.optim.SGD, 0.5)])
def test_bjorck_singular_values_after_training(shape, kind, opt_cls, lr):
    torch.manual_seed(1)
    in_f, out_f = SHAPES[shape]
    layer = bjorck_orthonormal(linear_with(initial_weight(kind, out_f, in_f, torch.float32)))
    before = layer.weight.detach().clone()
    train_steps(layer, 10, lr=lr, opt_cls=opt_cls)
    assert not torch.allclose(layer.weight, before, atol=1e-3)  # it did train
    assert sv_error(layer.weight) < 1e-4
    assert sv_error(layer.eval().weight) < 1e-4


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", ["wide", "tall"])
def test_bjorck_orders(order, shape):
    torch.manual_seed(2)
    in_f, out_f = SHAPES[shape]
    layer = bjorck_orthonormal(
        linear_with(ill_conditioned(out_f, in_f, F64)), n_iters=20, order=order
    )
    assert sv_error(layer.weight) < 1e-4
    train_steps(layer, 3)
    assert sv_error(layer.weight) < 1e-4
    assert sv_error(layer.eval().weight) < 1e-4


@settings(max_examples=30, deadline=None)
@given(
    out_f=st.integers(1, 10),
    in_f=st.integers(1, 10),
    log_scale=st.floats(-150, 150),
    order=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_bjorck_any_scale_stays_finite_and_contractive(out_f, in_f, log_scale, order, seed):
    # The free parameter is written directly (no polar factor): whatever its scale, the
    # effective weight and the gradients are finite and ‖W‖₂ ≤ 1.
    gen = torch.Generator().manual_seed(seed)
    # order 1: the certified default path; higher orders: the fixed-count iteration.
    n_iters = None if order == 1 else 20
    layer = bjorck_orthonormal(nn.Linear(in_f, out_f, dtype=F64), n_iters=n_iters, order=order)
    set_original(layer, torch.randn(out_f, in_f, generator=gen, dtype=F64) * 10.0**log_scale)
    x = torch.randn(4, in_f, generator=gen, dtype=F64)
    out = layer(x)
    out.pow(2).sum().backward()
    assert torch.isfinite(layer.weight).all() and torch.isfinite(out).all()
    assert torch.isfinite(original(layer).grad).all()
    assert torch.linalg.matrix_norm(layer.weight, 2) <= 1 + 1e-12


def test_bjorck_float32_extreme_scales_stay_finite():
    torch.manual_seed(3)
    for scale in (1e-30, 1e-8, 1e8, 1e30):
        layer = bjorck_orthonormal(nn.Linear(12, 6))
        set_original(layer, torch.randn(6, 12) * scale)
        layer(torch.randn(2, 12)).sum().backward()
        assert torch.isfinite(layer.weight).all()
        assert torch.isfinite(original(layer).grad).all()
        assert torch.linalg.matrix_norm(layer.weight, 2) <= 1 + 1e-6


def test_bjorck_eval_iters_honoured(monkeypatch):
    torch.manual_seed(4)
    layer = bjorck_orthonormal(nn.Linear(12, 12, dtype=F64), n_iters=20, eval_iters=60)
    # An ill-conditioned free parameter (condition number 1e6): 20 iterations are not enough.
    set_original(layer, ill_conditioned(12, 12, F64))
    train_err = sv_error(layer.weight)
    eval_err = sv_error(layer.eval().weight)
    assert train_err > 1e-2
    assert eval_err < 1e-10
    torch.testing.assert_close(layer.weight, functional.bjorck(original(layer), 60), rtol=0, atol=0)

    calls = []
    bjorck = functional.bjorck

    def spy(w, n_iters=20, order=1, prescale=True):
        calls.append(n_iters)
        return bjorck(w, n_iters, order, prescale)

    monkeypatch.setattr(functional, "bjorck", spy)
    layer.train()
    layer.weight
    layer.eval()
    layer.weight
    assert calls == [20, 60]

    zero = bjorck_orthonormal(nn.Linear(5, 3, dtype=F64), eval_iters=0).eval()
    with torch.no_grad():
        assert torch.equal(zero.weight, functional.bjorck_prescale(original(zero)))


def test_bjorck_right_inverse_on_assignment():
    torch.manual_seed(5)
    layer = bjorck_orthonormal(nn.Linear(10, 6, dtype=F64))
    x = torch.randn(6, 10, dtype=F64) * 1e5
    layer.weight = x
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    torch.testing.assert_close(original(layer), u @ vh, rtol=0, atol=1e-12)
    assert sv_error(layer.weight) < 1e-10
    # Rank-deficient (here zero) weights still give an orthonormal free parameter.
    layer.weight = torch.zeros(6, 10, dtype=F64)
    assert sv_error(original(layer)) < 1e-12
    assert sv_error(layer.weight) < 1e-10


def test_bjorck_default_is_the_certified_polar_factor_during_training():
    torch.manual_seed(16)
    layer = bjorck_orthonormal(nn.Linear(48, 64))
    assert "parametrizations.weight.0.warm" in layer.state_dict()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 48, generator=gen), torch.randn(32, 64, generator=gen)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for _ in range(15):
        opt.zero_grad()
        (layer(x) - y).pow(2).mean().backward()
        opt.step()
        v = original(layer).detach().double()
        assert sv_error(layer.weight) < 2e-6  # tol 1e-6 plus float32 rounding
        u, _, vh = torch.linalg.svd(v, full_matrices=False)
        torch.testing.assert_close(layer.weight.double(), u @ vh, rtol=0, atol=1e-5)
    assert sv_error(original(layer)) > 1e-2  # V itself has drifted off the manifold
    assert param(layer).warm.norm() > 0  # the warm start is in use
    # Eval mode starts cold: the eval weight is a function of V alone.
    torch.testing.assert_close(layer.eval().weight, functional.polar(original(layer).detach()))


def test_bjorck_gradcheck_wrt_original():
    torch.manual_seed(6)
    layer = bjorck_orthonormal(nn.Linear(5, 4, dtype=F64), n_iters=8)
    x = torch.randn(3, 5, dtype=F64)
    v = original(layer).detach().clone().requires_grad_()

    def output(v):
        return torch.func.functional_call(layer, {"parametrizations.weight.original": v}, (x,))

    assert torch.autograd.gradcheck(output, (v,))
    # Also away from the manifold (a raw weight), where the pre-scaling matters.
    assert torch.autograd.gradcheck(output, (torch.randn(4, 5, dtype=F64, requires_grad=True),))


# --------------------------------------------------------------------------- spectral


def exact_norm(w: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(w.detach(), 2))


@pytest.mark.parametrize("shape", [(20, 10), (32, 32)])
def test_spectral_norm_after_adam_training(shape):
    torch.manual_seed(7)
    layer = spectral_normalized(nn.Linear(*shape, dtype=F64))
    before = original(layer).detach().clone()
    train_steps(layer, 40, lr=1e-3)
    assert (original(layer) - before).abs().max() > 1e-2  # the free parameter did move
    for mode in (True, False):
        # σ̂ ≤ σ, so the exact norm is at least 1, and after training it is close to 1.
        assert 1 - 1e-12 <= exact_norm(layer.train(mode).weight) <= 1 + 1e-3


def test_spectral_estimate_lags_under_an_adversarial_objective():
    # Why certificates use exact norms: σ̂ = ‖V u‖ only sees the direction u, so an objective
    # that grows ‖W x‖ grows V in the directions orthogonal to u, faster than one power
    # iteration per step follows. The exact norm is then well above 1 (never below).
    torch.manual_seed(0)
    layer = spectral_normalized(nn.Linear(20, 10, dtype=F64))
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    x = torch.randn(64, 20, dtype=F64)
    norms = []
    for _ in range(15):
        opt.zero_grad()
        (-layer(x).norm()).backward()
        opt.step()
        norms.append(exact_norm(layer.weight))
    assert min(norms) >= 1 - 1e-12
    assert max(norms) > 1 + 1e-2


def test_spectral_u_buffer_and_warm_start():
    torch.manual_seed(8)
    layer = spectral_normalized(nn.Linear(12, 8, dtype=F64), n_power_iters=2)
    key = "parametrizations.weight.0.u"
    state = layer.state_dict()
    assert key in state and state[key].shape == (12,)
    # Warm start: σ̂ from the registered u is close to the exact norm.
    sigma_hat = functional.power_iteration(original(layer), param(layer).u, 0)[0]
    assert abs(float(sigma_hat.detach()) / exact_norm(original(layer)) - 1) < 1e-2
    with torch.no_grad():
        param(layer).u.copy_(torch.randn(12, dtype=F64))
    u0 = param(layer).u.clone()
    layer.eval()(torch.randn(2, 12, dtype=F64))
    assert torch.equal(param(layer).u, u0)  # not updated in eval mode
    layer.train()(torch.randn(2, 12, dtype=F64))
    assert not torch.equal(param(layer).u, u0)  # updated in training mode
    # Assigning a weight re-warms u on it.
    w = torch.diag(torch.tensor([5.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5], dtype=F64))
    layer.weight = torch.cat([w, torch.zeros(8, 4, dtype=F64)], 1)
    assert abs(float(param(layer).u[0].abs()) - 1) < 1e-9
    assert abs(exact_norm(layer.eval().weight) - 1) < 1e-9


def test_spectral_zero_weight_is_finite_and_recovers():
    layer = spectral_normalized(nn.Linear(6, 4, bias=False, dtype=F64))
    layer.weight = torch.zeros(4, 6, dtype=F64)
    assert torch.equal(layer.weight, torch.zeros(4, 6, dtype=F64))
    assert param(layer).u.norm() > 0.5  # u was not annihilated by the zero weight
    set_original(layer, torch.randn(4, 6, dtype=F64))
    for _ in range(30):
        layer.weight
    assert abs(exact_norm(layer.weight) - 1) < 1e-6


# --------------------------------------------------------------------------- L∞


@settings(max_examples=40, deadline=None)
@given(
    out_f=st.integers(1, 6),
    in_f=st.integers(1, 40),
    radius=st.floats(1e-3, 1e3),
    log_scale=st.floats(-3, 3),
    dtype=st.sampled_from([torch.float32, F64]),
    seed=st.integers(0, 2**16),
)
def test_linf_rows_in_ball_inside_unchanged_idempotent(out_f, in_f, radius, log_scale, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    layer = linf_projected(nn.Linear(in_f, out_f, dtype=dtype), radius=radius)
    v = (torch.randn(out_f, in_f, generator=gen, dtype=F64) * 10.0**log_scale).to(dtype)
    set_original(layer, v)
    w = layer.weight.detach()
    assert bool((w.abs().sum(-1) <= radius).all())
    inside = v.abs().sum(-1) <= radius
    assert torch.equal(w[inside], v[inside])
    assert torch.equal(functional.project_rows_l1(w, radius), w)
    layer.weight = w  # assigning a feasible weight keeps it
    assert torch.equal(layer.weight, w)
    assert torch.equal(layer.eval().weight, w)


def test_linf_right_inverse_rescales_rows_outside():
    torch.manual_seed(9)
    radius = 2.0
    w0 = torch.randn(6, 50, dtype=F64)
    w0[:3] *= 0.01  # rows 0..2 inside the ball (ℓ1 ≈ 0.4), rows 3..5 far outside (ℓ1 ≈ 40)
    assert bool((w0[:3].abs().sum(-1) <= radius).all() and (w0[3:].abs().sum(-1) > radius).all())
    layer = linf_projected(linear_with(w0), radius=radius)
    v = original(layer).detach()
    assert torch.equal(v[:3], w0[:3])
    torch.testing.assert_close(v[3:].abs().sum(-1), torch.full((3,), radius, dtype=F64))
    torch.testing.assert_close(v[3:] / radius, w0[3:] / w0[3:].abs().sum(-1, keepdim=True))
    assert bool((layer.weight != 0).all())  # no entry zeroed (a projection would zero most)
    assert bool((layer.weight.abs().sum(-1) <= radius).all())


def test_linf_after_training():
    torch.manual_seed(10)
    layer = linf_projected(nn.Linear(30, 8), radius=0.5)
    train_steps(layer, 20, lr=5e-2)
    for mode in (True, False):
        assert float(functional.operator_norm(layer.train(mode).weight.detach(), "inf")) <= 0.5


def test_linf_onto_sphere_is_the_authors_layer():
    # LNets' l_inf_projected forward, written out: signs and Condat's threshold under no_grad.
    def lnets(w, radius):
        a = w.detach().abs()
        s, _ = a.sort(dim=1, descending=True)
        cs = s.cumsum(1)
        k = torch.arange(1, a.shape[1] + 1, dtype=w.dtype)
        rho = ((cs - radius) / k < s).to(w.dtype).mul(k).argmax(1, keepdim=True)  # last index kept
        theta = (cs.gather(1, rho) - radius) / (rho + 1).to(w.dtype)
        return torch.sign(w).detach() * torch.clamp(w.abs() - theta, min=0)

    torch.manual_seed(11)
    radius = 1.5
    w0 = torch.randn(8, 40, dtype=F64)
    w0[:3] *= 0.01  # inside the ball: pushed out onto the sphere
    layer = linf_projected(linear_with(w0), radius=radius, onto="sphere")
    assert "onto=sphere" in repr(layer) and "onto" not in repr(linf_projected(nn.Linear(3, 3)))
    v = original(layer).detach().requires_grad_(True)
    ref = lnets(v, radius)
    torch.testing.assert_close(layer.weight, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.weight.abs().sum(-1), torch.full((8,), radius, dtype=F64))
    cot = torch.randn(8, 40, dtype=F64)
    (grad,) = torch.autograd.grad(layer.weight, original(layer), cot)
    (grad_ref,) = torch.autograd.grad(ref, v, cot)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-12)  # the threshold held constant
    assert torch.equal(grad[:3], cot[:3])
    train_steps(layer, 20, lr=5e-2)
    for mode in (True, False):
        assert float(functional.operator_norm(layer.train(mode).weight.detach(), "inf")) <= radius
    with pytest.raises(NotImplementedError, match="eager autograd only"):
        torch.func.grad(lambda t: torch.func.functional_call(
            layer.train(), {"parametrizations.weight.original": t}, (torch.ones(2, 40, dtype=F64),)).sum())(v.detach())
    with pytest.raises(ValueError, match="onto must be 'ball' or 'sphere'"):
        linf_projected(nn.Linear(3, 3), onto="plane")


# --------------------------------------------------------------------------- eval cache


def test_eval_cache_computed_once(monkeypatch):
    torch.manual_seed(11)
    layer = bjorck_orthonormal(nn.Linear(8, 8))
    calls = []
    polar = functional.polar
    monkeypatch.setattr(functional, "polar", lambda *a, **k: calls.append(1) or polar(*a, **k))
    x = torch.randn(4, 8)
    layer.eval()
    outs = [layer(x) for _ in range(3)] + [layer.weight for _ in range(3)]
    assert len(calls) == 1
    assert all(torch.equal(o, outs[0]) for o in outs[:3])
    assert layer.weight is layer.weight  # the cached tensor itself
    layer.train()
    layer(x)
    layer(x)
    assert len(calls) == 3  # no cache in training mode


@pytest.mark.parametrize("name", list(CONSTRAINTS))
def test_eval_cache_never_stale(name):
    torch.manual_seed(12)
    layer = CONSTRAINTS[name](nn.Linear(10, 6))
    x = torch.randn(5, 10)

    def check_fresh(old):
        assert not torch.equal(layer.weight, old)
        assert torch.equal(layer.weight, reference_weight(layer))
        return layer.weight.clone()

    w = layer.eval().weight.clone()
    # Optimizer step in training mode, then eval again.
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer.train()
    layer(x).pow(2).sum().backward()
    opt.step()
    layer.eval()
    w = check_fresh(w)
    # Optimizer step taken while in eval mode (gradients from a training-mode pass).
    layer.train()
    opt.zero_grad()
    layer(x).pow(2).sum().backward()
    layer.eval()
    layer(x)
    opt.step()
    w = check_fresh(w)
    # In-place write through .data, which does not bump the version counter.
    original(layer).data.mul_(0.5).add_(0.1)
    w = check_fresh(w)
    # load_state_dict from another constrained layer.
    other = CONSTRAINTS[name](nn.Linear(10, 6))
    layer.load_state_dict(other.state_dict())
    w = check_fresh(w)
    # Assignment.
    layer.weight = torch.randn(6, 10)
    w = check_fresh(w)
    # Dtype / device conversions.
    layer.double()
    assert layer.weight.dtype == F64
    assert torch.equal(layer.weight, reference_weight(layer))
    layer.to(torch.float32)
    assert layer.weight.dtype == torch.float32
    assert torch.equal(layer.weight, reference_weight(layer))
    # Back to training: the cache is dropped and gradients reach the free parameter again.
    layer.train()
    assert param(layer)._eval_cache is None
    assert layer.weight.requires_grad and layer.weight.grad_fn is not None


def test_eval_cache_follows_settings_and_spectral_u():
    torch.manual_seed(13)
    layer = bjorck_orthonormal(nn.Linear(6, 6, dtype=F64), n_iters=2).eval()
    w = layer.weight
    param(layer).eval_iters = 30
    assert not torch.equal(layer.weight, w)
    assert torch.equal(layer.weight, reference_weight(layer))

    # Spectral: same free parameter, different u (e.g. loaded from a checkpoint).
    sn = spectral_normalized(nn.Linear(6, 4, dtype=F64)).eval()
    w = sn.weight.clone()
    state = sn.state_dict()
    state["parametrizations.weight.0.u"] = torch.randn(6, dtype=F64)
    sn.load_state_dict(state)
    assert not torch.equal(sn.weight, w)
    assert torch.equal(sn.weight, reference_weight(sn))


def test_eval_mode_input_gradients_flow_weight_detached():
    torch.manual_seed(14)
    model = nn.Sequential(bjorck_orthonormal(nn.Linear(6, 4, dtype=F64)), nn.Tanh()).eval()
    with torch.inference_mode():  # the cache is first filled inside inference mode
        model(torch.randn(2, 6, dtype=F64))
    x = torch.randn(3, 6, dtype=F64, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    layer = model[0]
    assert not layer.weight.requires_grad
    assert original(layer).grad is None
    with torch.no_grad():  # d/dx Σ tanh(Wx + b) = (1 - tanh²(Wx + b)) W
        pre = x @ layer.weight.T + layer.bias
        expected = (1 - torch.tanh(pre) ** 2) @ layer.weight
    torch.testing.assert_close(x.grad, expected, rtol=1e-12, atol=1e-12)


def test_linf_eval_cache_is_detached_when_every_row_is_inside_the_ball():
    # The projection returns the rows unchanged then; the cache must still not be the parameter.
    layer = linf_projected(nn.Linear(4, 3, dtype=F64))
    with torch.no_grad():
        original(layer).copy_(torch.full((3, 4), 0.1, dtype=F64))
    layer.eval()
    w = layer.weight
    assert w is not original(layer) and not w.requires_grad
    assert torch.equal(w, original(layer))
    layer(torch.randn(2, 4, dtype=F64)).sum().backward()
    assert original(layer).grad is None


def test_eval_cache_not_copied_or_pickled():
    torch.manual_seed(15)
    layer = bjorck_orthonormal(nn.Linear(5, 5)).eval()
    w = layer.weight
    twin = copy.deepcopy(layer)
    assert param(twin)._eval_cache is None
    assert torch.equal(twin.weight, w)
    restored = pickle.loads(pickle.dumps(param(layer)))
    assert isinstance(restored, EvalCachedConstraint) and restored._eval_cache is None
    assert param(layer)._eval_cache is not None  # the original keeps its cache


def test_eval_weight_getter_keeps_torch_semantics():
    # The eval-mode getter returns the cache directly; whatever it does not handle falls back
    # to torch's parametrize getter.
    torch.manual_seed(16)
    layer = bjorck_orthonormal(nn.Linear(5, 5, dtype=F64)).eval()
    w = layer.weight
    assert layer.weight is w and torch.equal(w, reference_weight(layer))
    with parametrize.cached():  # torch's own cache context
        assert torch.equal(layer.weight, w)
    seen = []  # hooks on the parametrization still see every evaluation
    handle = param(layer).register_forward_hook(lambda *args: seen.append(1))
    layer.weight
    handle.remove()
    assert seen == [1]

    class Double(nn.Module):
        def forward(self, x):
            return 2 * x

    parametrize.register_parametrization(layer, "weight", Double())  # a second, stacked one
    assert torch.equal(layer.weight, 2 * w)
    parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    assert not parametrize.is_parametrized(layer) and torch.equal(layer.weight, 2 * w)


def test_registration_follows_module_mode():
    layer = bjorck_orthonormal(nn.Linear(4, 4).eval())
    assert not param(layer).training
    assert not layer.weight.requires_grad  # eval mode: cached, detached


# --------------------------------------------------------------------------- frozen


def mlp(name: str, seed: int = 0) -> nn.Sequential:
    from lipsort import MaxMin

    torch.manual_seed(seed)
    c = CONSTRAINTS[name]
    return nn.Sequential(
        c(nn.Linear(6, 8, dtype=F64)), MaxMin(), c(nn.Linear(8, 8, dtype=F64)), MaxMin(),
        c(nn.Linear(8, 3, dtype=F64)),
    )


@pytest.mark.parametrize("name", list(CONSTRAINTS))
def test_frozen_matches_eval_and_leaves_original(name):
    model = mlp(name)
    model[2].eval()  # mixed flags are restored on the copy
    flags = [model.training] + [m.training for m in model]
    inner_flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = frozen(model)  # no forward pass before

    assert not any(parametrize.is_parametrized(m) for m in plain.modules())
    assert all(type(m) is nn.Linear for m in plain if isinstance(m, nn.Linear))
    assert all(type(m.weight) is nn.Parameter for m in plain if isinstance(m, nn.Linear))
    keys = sorted(f"{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias"))
    assert sorted(plain.state_dict()) == keys
    assert [plain.training] + [m.training for m in plain] == flags

    # The original is untouched: still parametrized, same flags, same state, working weights.
    assert [m.training for m in model.modules()] == inner_flags
    assert all(parametrize.is_parametrized(model[i], "weight") for i in (0, 2, 4))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(param(model[i])._eval_cache is None for i in (0, 2, 4))

    x = torch.randn(7, 6, dtype=F64)
    expected = model.eval()(x)
    assert torch.equal(plain(x), expected)
    assert torch.equal(plain.eval()(x), expected)
    for i in (0, 2, 4):
        assert torch.equal(plain[i].weight, model[i].weight)


def test_frozen_of_a_single_layer_and_bad_input():
    layer = bjorck_orthonormal(nn.Linear(3, 3, dtype=F64))
    plain = frozen(layer)
    assert type(plain) is nn.Linear and plain.training
    assert torch.equal(plain.weight, layer.eval().weight)
    with pytest.raises(TypeError, match="Module"):
        frozen(torch.zeros(3))


# --------------------------------------------------------------------------- state_dict


@pytest.mark.parametrize("name", list(CONSTRAINTS))
def test_state_dict_round_trip(name):
    a = mlp(name, seed=0)
    train_steps(a, 3)
    b = mlp(name, seed=1)
    x = torch.randn(5, 6, dtype=F64)
    assert not torch.equal(a.eval()(x), b.eval()(x))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.eval()(x), b.eval()(x))
    assert torch.equal(a.train()(x), b.train()(x))
    assert torch.equal(a.train()(x), b.train()(x))  # spectral: u updated identically


# --------------------------------------------------------------------------- bad input


def test_bad_module_type():
    for fn in CONSTRAINTS.values():
        with pytest.raises(TypeError, match="Conv2d"):
            fn(nn.Conv2d(3, 4, 3))
        with pytest.raises(TypeError, match="Sequential"):
            fn(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="uninitialized"):
        bjorck_orthonormal(nn.LazyLinear(3))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_iters": -1}, "n_iters"),
        ({"n_iters": 2.5}, "n_iters"),
        ({"n_iters": True}, "n_iters"),
        ({"eval_iters": -3}, "eval_iters"),
        ({"eval_iters": "10"}, "eval_iters"),
        ({"order": 0}, "order"),
        ({"order": 5}, "order"),
        ({"order": 2.0}, "order"),
        ({"order": 2}, "order=2 applies to a fixed number"),
        ({"tol": 0}, "tol"),
        ({"tol": 1.5}, "tol"),
    ],
)
def test_bad_bjorck_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bjorck_orthonormal(nn.Linear(3, 3), **kwargs)


def test_bad_spectral_and_linf_arguments():
    for bad in (0, -1, 1.5, None):
        with pytest.raises(ValueError, match="n_power_iters"):
            spectral_normalized(nn.Linear(3, 3), n_power_iters=bad)
    for bad in (0, -1.0, math.nan, math.inf, "1", True):
        with pytest.raises(ValueError, match="radius"):
            linf_projected(nn.Linear(3, 3), radius=bad)


def test_double_registration_and_non_finite_weights():
    for first in CONSTRAINTS.values():
        layer = first(nn.Linear(4, 4))
        for second in CONSTRAINTS.values():
            with pytest.raises(ValueError, match="already constrained"):
                second(layer)
    for fn in CONSTRAINTS.values():
        bad = nn.Linear(3, 3)
        with torch.no_grad():
            bad.weight[0, 0] = math.nan
        with pytest.raises(ValueError, match="non-finite"):
            fn(bad)
    layer = bjorck_orthonormal(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="non-finite"):
        layer.weight = torch.full((3, 3), math.inf)


def test_parametrization_classes_validate_too():
    with pytest.raises(ValueError, match="n_iters"):
        BjorckOrthonormal(n_iters=-1)
    with pytest.raises(ValueError, match="radius"):
        LinfProjected(radius=0)
    with pytest.raises(ValueError, match="n_power_iters"):
        SpectralNormalized(3, n_power_iters=0)
