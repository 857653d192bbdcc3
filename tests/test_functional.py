"""Invariants of the pure operations: permutations, exact norms, convergence, projections."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lipsort import functional as F
from tests.reference import random_matrix, svd_polar

DT = torch.float64

SORTS = [
    ("group_sort3", lambda x, d: F.group_sort(x, 3, d)),
    ("max_min", lambda x, d: F.max_min(x, d)),
    ("group_sort2", lambda x, d: F.group_sort(x, 2, d)),
    ("full_sort", lambda x, d: F.full_sort(x, d)),
]


@pytest.mark.parametrize("name,op", SORTS)
@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_sorts_permute_each_group_and_preserve_norms(name, op, dim):
    x = random_matrix((6, 12, 6), seed=1)
    y = op(x, dim)
    assert y.shape == x.shape
    g = {"group_sort3": 3, "max_min": 2, "group_sort2": 2, "full_sort": x.shape[dim]}[name]
    xs = x.movedim(dim, -1).reshape(-1, x.shape[dim] // g, g)
    ys = y.movedim(dim, -1).reshape(-1, x.shape[dim] // g, g)
    # Same multiset in each group, sorted largest first.
    assert torch.equal(xs.sort(-1, descending=True).values, ys)
    for p in (1, 2, math.inf):
        assert torch.allclose(torch.linalg.vector_norm(y, p), torch.linalg.vector_norm(x, p), rtol=1e-14)


@pytest.mark.parametrize("name,op", SORTS)
def test_sort_jacobian_is_a_permutation(name, op):
    x = random_matrix((1, 12), seed=2)
    jac = torch.autograd.functional.jacobian(lambda t: op(t, 1), x).reshape(12, 12)
    assert set(jac.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(jac.sum(0), torch.ones(12, dtype=DT)) and torch.equal(jac.sum(1), torch.ones(12, dtype=DT))


def test_max_min_jacobian_is_a_permutation_at_ties():
    # Inputs with exact ties (e.g. zeros after a sparse layer) must not split the gradient.
    x = torch.zeros(1, 4, dtype=DT, requires_grad=True)
    jac = torch.autograd.functional.jacobian(lambda t: F.max_min(t, 1), x).reshape(4, 4)
    assert torch.equal(jac.sum(0), torch.ones(4, dtype=DT)) and set(jac.unique().tolist()) == {0.0, 1.0}


@settings(max_examples=40, deadline=None)
@given(
    groups=st.integers(1, 5),
    group_size=st.integers(1, 5),
    batch=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_gradient_norm_preserved(groups, group_size, batch, seed):
    x = random_matrix((batch, groups * group_size), seed).requires_grad_()
    g = random_matrix((batch, groups * group_size), seed + 1)
    (F.group_sort(x, group_size) * g).sum().backward()
    assert torch.allclose(x.grad.norm(dim=1), g.norm(dim=1), rtol=1e-14)


def test_max_min_equals_group_sort_2_and_full_sort_equals_one_group():
    x = random_matrix((5, 8))
    assert torch.equal(F.max_min(x), F.group_sort(x, 2))
    assert torch.equal(F.full_sort(x), F.group_sort(x, 8))


def test_gradcheck_functional_ops():
    x = random_matrix((3, 6), seed=4).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: F.group_sort(t, 3), (x,))
    assert torch.autograd.gradcheck(F.max_min, (x,))
    assert torch.autograd.gradcheck(F.full_sort, (x,))
    w = random_matrix((5, 3), seed=5).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: F.bjorck(t, 8, 2), (w,))
    v = random_matrix((4, 6), seed=6).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: F.project_rows_l1(3 * t), (v,))
    # The vector is updated without gradient; at convergence the estimate's gradient is that
    # of σ_max itself (u vᵀ, envelope theorem), which finite differences see.
    assert torch.autograd.gradcheck(lambda t: F.power_iteration(t, torch.ones(3, dtype=DT), 300)[0], (w,))


@pytest.mark.parametrize("shape", [(32, 32), (16, 48), (48, 16), (3, 7, 5)])
@pytest.mark.parametrize("scale", [1e-12, 1e-3, 1.0, 1e3, 1e12])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_bjorck_converges_for_any_scale(shape, scale, order):
    w = random_matrix(shape, seed=7) * scale
    out = F.bjorck(w, n_iters=40, order=order)
    s = torch.linalg.svdvals(out)
    assert torch.isfinite(out).all()
    assert (s - 1).abs().max() < 1e-4


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_bjorck_singular_values_increase_monotonically_to_one(order):
    # Pre-scaled iterates never overshoot: ‖W‖₂ ≤ 1 at every iteration, σ_min never decreases.
    w = random_matrix((24, 24), seed=8) @ torch.diag(torch.logspace(-3, 3, 24, dtype=DT))
    prev = torch.linalg.svdvals(F.bjorck_prescale(w))
    for n in range(1, 30):
        s = torch.linalg.svdvals(F.bjorck(w, n, order))
        assert s.max() <= 1 + 1e-12
        assert s.min() >= prev.min() - 1e-12
        prev = s


def test_bjorck_is_the_polar_factor_and_fixes_orthonormal_matrices():
    w = random_matrix((20, 12), seed=9)
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    assert torch.allclose(F.bjorck(w, 60), u @ vh, atol=1e-10)
    q = u @ vh
    assert torch.allclose(F.bjorck(q, 5), q, atol=1e-12)


@pytest.mark.parametrize("shape", [(9, 5), (5, 9), (6, 6), (3, 8, 4), (2, 3, 4, 7)])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_bjorck_adjoint_is_autograd_through_the_plain_steps(shape, order):
    # The hand-written backward against autograd through every operation of the same steps.
    from lipsort import _bjorck

    w = random_matrix(shape, seed=11).requires_grad_()
    cot = random_matrix(shape, seed=12)
    out = F.bjorck(w, 6, order)
    batch = F.bjorck_prescale(w).reshape(-1, *shape[-2:])  # plain takes 2-D or 3-D
    ref = _bjorck.plain(batch if len(shape) > 2 else batch[0], 6, F._BJORCK_COEFFS[: order + 1], stop=True)
    ref = ref.reshape(shape)
    assert out.grad_fn is not None and torch.equal(out, ref)
    (grad,) = torch.autograd.grad(out, w, cot)
    (grad_ref,) = torch.autograd.grad(ref, w, cot)
    assert torch.allclose(grad, grad_ref, rtol=0, atol=1e-13 * float(grad_ref.abs().max()))


def _near_orthonormal(shape, seed, dtype=torch.float64):
    u, _, vh = torch.linalg.svd(random_matrix(shape, seed=seed), full_matrices=False)
    return (u @ vh + 0.05 * random_matrix(shape, seed=seed + 1)).to(dtype)


@pytest.mark.parametrize("shape", [(16, 8), (8, 16), (12, 12), (4, 16, 8)])
@pytest.mark.parametrize("order", [1, 3])
def test_bjorck_adjoint_collapses_the_converged_tail_exactly(shape, order):
    # Note [converged tail]: from near the manifold most of 20 steps sit at the rounding floor;
    # the backward applies one adjoint for them all, and still matches autograd through all 20.
    from lipsort import _bjorck

    w = _near_orthonormal(shape, 21).requires_grad_()
    cot = random_matrix(shape, seed=23)
    coeffs = F._BJORCK_COEFFS[: order + 1]
    with torch.no_grad():
        x = F.bjorck_prescale(w).reshape(-1, *shape[-2:])
        x = x if len(shape) > 2 else x[0]
        eye, grams = torch.eye(min(shape[-2:]), dtype=w.dtype), []
        for _ in range(20):
            g, left = _bjorck._gram(x)
            grams.append(g)
            x = _bjorck.step(x, g, left, coeffs, eye)
    first = _bjorck._converged_from(grams, eye)
    assert 2 <= first <= 10  # converged within a few steps: most of the backward is skipped
    assert not _bjorck._converged(grams[first - 1], eye)
    assert all(_bjorck._converged(g, eye) for g in grams[first:])
    (grad,) = torch.autograd.grad(_bjorck.Steps.apply(w, 20, coeffs, True, False), w, cot)  # all 20 steps
    ref = _bjorck.plain(F.bjorck_prescale(w), 20, coeffs)
    (grad_ref,) = torch.autograd.grad(ref, w, cot)
    assert float((grad - grad_ref).norm() / grad_ref.norm()) < 1e-14


def test_bjorck_backward_skips_the_converged_tail(monkeypatch):
    # The adjoint steps the backward applies (one symmetric part each): the steps before the
    # first converged one, that one, and the newest standing for the rest.
    from lipsort import _bjorck

    w = _near_orthonormal((12, 12), 21).requires_grad_()
    applied = []
    monkeypatch.setattr(_bjorck, "plus_transpose", lambda m, sign: applied.append(1) or m + sign * m.mT)

    def twenty_steps():  # no early stop (Note [early stop]): all 20 run forward
        out = _bjorck.Steps.apply(w, 20, (1.0, 0.5), True, False)
        torch.autograd.grad(out, w, random_matrix((12, 12), seed=23))

    twenty_steps()
    skipping = len(applied)
    applied.clear()
    monkeypatch.setattr(_bjorck, "_converged_from", lambda grams, eye: len(grams))
    twenty_steps()
    assert len(applied) == 20 and 3 <= skipping <= 12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(64, 48), (48, 64), (3, 16, 16)])
def test_bjorck_stops_at_the_rounding_floor_with_the_full_counts_result(shape, dtype):
    # Note [early stop]: on CPU the loop ends after the first step whose input is within d·eps
    # of orthonormal; the 20-step result differs by rounding only, and the gradient is the
    # exact one of the steps taken (autograd through the same stopped loop).
    from lipsort import _bjorck

    w = _near_orthonormal(shape, 41, dtype).requires_grad_()
    coeffs, eps = (1.0, 0.5), torch.finfo(dtype).eps
    out = F.bjorck(w, 20)
    ctx = out.grad_fn
    assert ctx.stopped and ctx.n_iters < 20  # stopped early, and the count the backward used
    full = _bjorck.Steps.apply(w, 20, coeffs, True, False)
    assert float((out - full).detach().abs().max()) < 100 * eps
    ref = _bjorck.plain(F.bjorck_prescale(w), 20, coeffs, stop=True)
    assert torch.equal(out, ref)  # the same steps, the same weight
    with torch.no_grad():
        assert torch.equal(F.bjorck(w, 20), ref)
    cot = random_matrix(shape, seed=43).to(dtype)
    (grad,) = torch.autograd.grad(out, w, cot)
    (grad_ref,) = torch.autograd.grad(ref, w, cot)
    (grad_full,) = torch.autograd.grad(full, w, cot)
    assert float((grad - grad_ref).norm() / grad_ref.norm()) < 100 * eps
    assert float((grad - grad_full).norm() / grad_full.norm()) < 100 * eps
    # Under torch.func transforms no stop is tried (reading the error back inside vmap would
    # raise): jacrev runs and is the Jacobian of the 20 steps.
    small = _near_orthonormal((6, 4), 45, dtype)
    jac = torch.func.jacrev(lambda v: F.bjorck(v, 20))(small)
    every = torch.autograd.functional.jacobian(
        lambda v: _bjorck.plain(F.bjorck_prescale(v), 20, coeffs), small)
    torch.testing.assert_close(jac, every, rtol=0, atol=100 * eps)


@pytest.mark.parametrize("shape", [(4, 32, 16), (64, 64), (96, 128)])
def test_bjorck_converged_tail_float32_gradient_is_as_accurate(shape):
    # In float32 the collapsed backward is as accurate as autograd through every step (the
    # step whose input first reaches d·eps is not collapsed: its Jacobian is not yet the
    # projection to float32's precision at larger d).
    from lipsort import _bjorck

    w64 = _near_orthonormal(shape, 31)
    cot64 = random_matrix(shape, seed=33)
    w32, cot32 = w64.float().requires_grad_(), cot64.float()
    w64 = w32.detach().double().requires_grad_()
    # the reference: autograd through every float64 step (no collapsed tail)
    (ref,) = torch.autograd.grad(_bjorck.plain(F.bjorck_prescale(w64), 20, (1.0, 0.5)), w64, cot64)
    (ours,) = torch.autograd.grad(F.bjorck(w32, 20), w32, cot32)
    batch = F.bjorck_prescale(w32)
    (unrolled,) = torch.autograd.grad(_bjorck.plain(batch, 20, (1.0, 0.5)), w32, cot32)

    def err(g):
        return float((g.double() - ref).norm() / ref.norm())

    assert err(ours) < 1e-6 and err(ours) <= 1.5 * err(unrolled)


def test_bjorck_zero_matrix_gradient_is_finite_where_the_cotangent_is_zero():
    # The pre-scale of a zero matrix divides by max|w| and by the bound in turn (their product
    # underflows): the adjoint does the same, so a zero cotangent gives a zero gradient.
    w = torch.zeros(2, 5, 3, requires_grad=True)
    (grad,) = torch.autograd.grad(F.bjorck(w, 5), w, torch.zeros(2, 5, 3))
    assert torch.equal(grad, torch.zeros(2, 5, 3))


def test_bjorck_of_an_empty_batch_has_an_empty_gradient():
    w = torch.randn(0, 4, 3, requires_grad=True)
    F.bjorck(w, 5).sum().backward()
    assert w.grad.shape == (0, 4, 3)


@pytest.mark.parametrize("d", [64, 128])
def test_bjorck_converged_tail_keeps_the_step_that_first_reaches_the_floor(d):
    # Adversarial for Note [converged tail]: one singular value with 1 − σ² = 0.9·d·eps, so
    # the input already counts as converged, and a cotangent along its singular pair. The
    # first step's Jacobian differs from the projection by ~(1 − σ²) there: collapsing it too
    # (no `+ 1`) measured 1.5–1.7× autograd's float32 error; keeping it, within 1.1×.
    from lipsort import _bjorck

    gen = torch.Generator().manual_seed(d)
    u, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))
    s = torch.ones(d, dtype=torch.float64)
    s[0] = (1 - 0.9 * d * torch.finfo(torch.float32).eps) ** 0.5
    w32 = ((u * s) @ v.T).float()
    assert _bjorck._converged_from([_bjorck._gram(w32)[0]], torch.eye(d)) == 0
    cot = u[:, :1] @ v[:, :1].T
    x32, x64 = w32.clone().requires_grad_(), w32.double().requires_grad_()
    (ref,) = torch.autograd.grad(_bjorck.Steps.apply(x64, 20, (1.0, 0.5), False, False), x64, cot)
    (ours,) = torch.autograd.grad(_bjorck.Steps.apply(x32, 20, (1.0, 0.5), False, False), x32, cot.float())
    (unrolled,) = torch.autograd.grad(_bjorck.plain(x32, 20, (1.0, 0.5)), x32, cot.float())

    def err(g):
        return float((g.double() - ref).norm() / cot.norm())

    assert err(ours) <= 1.25 * err(unrolled)


def test_bjorck_converged_from_bisects_a_decreasing_error():
    from lipsort import _bjorck

    eye = torch.eye(4, dtype=torch.float64)
    errors = [1.0, 1e-1, 1e-4, 1e-9, 1e-16, 1e-16, 1e-16]
    grams = [eye + e * torch.diag(torch.tensor([1.0, 0, 0, 0], dtype=torch.float64)) for e in errors]
    assert _bjorck._converged_from(grams, eye) == 4
    assert _bjorck._converged_from(grams[:4], eye) == 4  # none converged: nothing collapses
    assert _bjorck._converged_from(grams[4:], eye) == 0
    assert _bjorck._converged_from([], eye) == 0


@pytest.mark.parametrize("order", [1, 3])
def test_bjorck_second_derivatives_and_transforms(order):
    w = random_matrix((7, 4), seed=13).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: F.bjorck(v, 3, order), (w,))
    # Double backward re-runs the steps differentiably: gradient penalties see Björck layers.
    assert torch.autograd.gradgradcheck(lambda v: F.bjorck(v, 3, order), (w,))
    # torch.func transforms and forward-mode AD take the plain loop.
    jac = torch.func.jacrev(lambda v: F.bjorck(v, 3, order))(w.detach())
    jac_fwd = torch.func.jacfwd(lambda v: F.bjorck(v, 3, order))(w.detach())
    assert torch.allclose(jac, jac_fwd, atol=1e-12)
    assert torch.allclose(jac, torch.autograd.functional.jacobian(lambda v: F.bjorck(v, 3, order), w), atol=1e-12)


def test_bjorck_prescale_is_a_rigorous_bound():
    for seed in range(20):
        w = random_matrix((10 + seed, 30), seed) * 10 ** (seed - 10)
        assert torch.linalg.matrix_norm(F.bjorck_prescale(w), 2) <= 1 + 1e-12


def test_power_iteration_underestimates_and_converges():
    w = random_matrix((30, 20), seed=10)
    exact = torch.linalg.matrix_norm(w, 2)
    u = random_matrix((20,), seed=11)
    for n in (1, 2, 5):
        sigma, _ = F.power_iteration(w, u, n)
        assert sigma <= exact + 1e-12
    sigma, u1 = F.power_iteration(w, u, 500)
    assert torch.allclose(sigma, exact, rtol=1e-8)
    assert torch.allclose(u1.norm(), torch.tensor(1.0, dtype=DT))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(1e-3, 1e3), radius=st.floats(0.1, 10), n=st.integers(1, 40))
def test_project_rows_l1_is_the_exact_projection(seed, scale, radius, n):
    w = random_matrix((8, n), seed) * scale
    p = F.project_rows_l1(w, radius)
    row = p.abs().sum(-1)
    inside = w.abs().sum(-1) <= radius
    assert (row <= radius).all()
    assert torch.equal(p[inside], w[inside])
    assert torch.equal(F.project_rows_l1(p, radius), p)
    # Optimality (KKT): a projected row lies on the sphere, keeps signs, and its nonzero
    # entries are |w| shrunk by one common threshold θ ≥ the magnitudes it zeroed.
    for i in torch.nonzero(~inside).flatten():
        assert torch.isclose(row[i], torch.tensor(radius, dtype=row.dtype), rtol=1e-12)
        nz = p[i] != 0
        theta = (w[i].abs() - p[i].abs())[nz]
        assert torch.allclose(theta, theta[0].expand_as(theta), atol=1e-9 * scale)
        assert (w[i].abs()[~nz] <= theta[0] + 1e-9 * scale).all()
        assert (torch.sign(p[i][nz]) == torch.sign(w[i][nz])).all()


def test_project_rows_l1_matches_a_brute_force_solver():
    # Bisection on the threshold θ of the soft-thresholding solution, to 1e-13.
    w = random_matrix((6, 9), seed=12) * 3
    p = F.project_rows_l1(w, 1.0)
    for i in range(6):
        a = w[i].abs()
        lo, hi = 0.0, float(a.max())
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if (a - mid).clamp_min(0).sum() > 1 else (lo, mid)
        assert torch.allclose(p[i], torch.sign(w[i]) * (a - hi).clamp_min(0), atol=1e-12)


def _sorting_threshold(a, radius):
    # The sorting algorithm (Condat, 2016, Algorithm 1): θ = max_k (Σ_{j≤k} a_(j) − r)/k.
    s = a.sort(dim=-1, descending=True).values
    k = torch.arange(1, a.shape[-1] + 1, dtype=a.dtype)
    return ((s.cumsum(-1) - radius) / k).amax(-1, keepdim=True)


def _project_rows_l1_by_sorting(w, radius):
    a = w.abs()
    theta = _sorting_threshold(a, radius).clamp_min(0)
    return torch.where(a.sum(-1, keepdim=True) <= radius, w, torch.sign(w) * (a - theta).clamp_min(0))


@pytest.mark.parametrize("case", ["ties", "equal rows", "one dominant", "sparse", "trained", "wide"])
def test_project_rows_l1_agrees_with_the_sorting_algorithm(case):
    # The threshold iteration and the sort give the same θ, on the inputs where an iteration
    # could stall or cycle: repeated magnitudes, a support of one, zeros, rows just outside.
    g = torch.Generator().manual_seed(3)
    w = {
        "ties": torch.randint(-3, 4, (64, 50), generator=g).to(DT) / 2,
        "equal rows": torch.full((8, 100), -0.3, dtype=DT),
        "one dominant": torch.cat([torch.full((16, 1), 5.0, dtype=DT), torch.rand(16, 30, generator=g, dtype=DT) * 1e-3], 1),
        "sparse": torch.randn(32, 200, generator=g, dtype=DT) * (torch.rand(32, 200, generator=g, dtype=DT) < 0.05),
        "trained": None,
        "wide": torch.randn(4, 5000, generator=g, dtype=DT),
    }[case]
    if w is None:  # a projected matrix after a small update: most rows barely outside
        p0 = _project_rows_l1_by_sorting(torch.randn(128, 256, generator=g, dtype=DT), 1.0)
        w = p0 + 1e-4 * torch.randn(128, 256, generator=g, dtype=DT)
    for radius in (0.5, 1.0, 7.0):
        p, ref = F.project_rows_l1(w, radius), _project_rows_l1_by_sorting(w, radius)
        assert torch.allclose(p, ref, rtol=0, atol=1e-12 * max(1.0, float(w.abs().max())))
        assert (p.abs().sum(-1) <= radius).all()


def test_project_rows_l1_float32_row_sums_are_inside_in_float64_too():
    # In float32 a soft-thresholded row's float64 sum can be a few ulps above the radius,
    # which the certificates (float64 norms) would see: the result must be inside in both.
    g = torch.Generator().manual_seed(5)
    w = torch.randn(1024, 784, generator=g) * 0.05
    p = F.project_rows_l1(w, 1.0)
    q = F.project_rows_l1(p + 1e-4 * torch.randn(1024, 784, generator=g), 1.0)  # an update later
    for m in (p, q):
        assert m.dtype == torch.float32
        assert (m.abs().sum(-1) <= 1.0).all()
        assert (m.abs().to(torch.float64).sum(-1) <= 1.0).all()
        assert (m.abs().to(torch.float64).sum(-1) > 1.0 - 1e-4).all()  # projected onto the sphere


@pytest.mark.parametrize("dtype", [torch.float32, DT])
def test_project_rows_l1_closed_form_backward_matches_autograd_through_the_operations(dtype):
    # Rows inside, outside and at the radius, with zeros: the eager path's closed-form
    # Jacobian (BallProjection) against autograd through the same operations, and the same
    # forward values bit for bit.
    from lipsort import _l1ball

    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 50, generator=g, dtype=DT) * torch.logspace(-2.5, 0.5, 64, dtype=DT)[:, None]
    w[::7, ::3] = 0
    w[5] = w[5] / w[5].abs().sum()  # on the sphere
    w = w.to(dtype)
    cot = torch.randn(64, 50, generator=g, dtype=dtype)
    fast = w.clone().requires_grad_(True)
    out = F.project_rows_l1(fast, 1.0)
    out.backward(cot)
    ref = w.clone().requires_grad_(True)
    out_ref = _l1ball.project(ref, 1.0, exact_theta=True)[0]
    out_ref.backward(cot)
    assert out.grad_fn.name().startswith("BallProjection")
    assert torch.equal(out.detach(), out_ref.detach())
    tol = 1e-12 if dtype == DT else 1e-5
    # Row 5 lies at the radius: in float32 its sum rounds below it while the float64 check
    # finds it above, so the operations clamp θ to 0 and differentiate the rounding guard's
    # rescale instead. The closed form keeps the projection's Jacobian there: it moves the row
    # along the sphere's face, orthogonally to its signs.
    rows = torch.arange(64) != 5
    assert torch.allclose(fast.grad[rows], ref.grad[rows], rtol=0, atol=tol * float(cot.abs().max()))
    assert abs(float(torch.sign(w[5]) @ fast.grad[5])) <= tol * float(cot[5].norm())
    assert torch.equal(fast.grad[3], cot[3])  # a row inside passes its gradient through
    x = (w[:12, :9].to(DT) * 3).requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda t: F.project_rows_l1(t), (x,))
    # Under torch.func the operations run, with the same Jacobian.
    jac = torch.func.jacrev(lambda t: F.project_rows_l1(t, 1.0))(w[:4].to(DT))
    row = w[:4].to(DT).clone().requires_grad_(True)
    F.project_rows_l1(row, 1.0).backward(torch.eye(4 * 50, dtype=DT)[7].view(4, 50))
    assert torch.allclose(jac.reshape(200, 4, 50)[7], row.grad, atol=1e-12, rtol=0)


def test_project_rows_l1_gradient_is_the_identity_on_rows_inside_the_ball():
    # Zeros included: a free weight at 0 in a row inside the ball must still get its gradient.
    w = torch.tensor([[0.2, 0.0, -0.3], [2.0, 0.0, -1.0]], dtype=DT, requires_grad=True)
    g = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], dtype=DT)
    (F.project_rows_l1(w) * g).sum().backward()
    assert torch.equal(w.grad[0], g[0])
    assert w.grad[1, 1] == 0  # outside the support of the projected row


def test_operator_norms_are_exact():
    w = random_matrix((7, 5), seed=13)
    assert torch.allclose(F.operator_norm(w, 2), torch.linalg.svdvals(w)[0])
    assert torch.allclose(F.operator_norm(w, "inf"), w.abs().sum(1).max())
    assert torch.allclose(F.operator_norm(w, math.inf), F.operator_norm(w, "inf"))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: F.group_sort(torch.zeros(2, 6), 4), "group_size=4 does not divide the 6 units"),
        (lambda: F.group_sort(torch.zeros(2, 6), 0), "positive integer"),
        (lambda: F.max_min(torch.zeros(2, 5)), "group_size=2 does not divide the 5 units"),
        (lambda: F.max_min(torch.zeros(2, 4), dim=3), "out of range"),
        (lambda: F.full_sort(torch.tensor(1.0)), "scalar"),
        (lambda: F.bjorck(torch.zeros(3), 5), "matrix"),
        (lambda: F.bjorck(torch.zeros(3, 3), 5, order=5), "order must be 1, 2, 3 or 4"),
        (lambda: F.bjorck(torch.zeros(3, 3), -1), "non-negative"),
        (lambda: F.bjorck(torch.zeros(3, 3, dtype=torch.int64), 5), "floating-point"),
        (lambda: F.power_iteration(torch.zeros(3, 4), torch.ones(3)), r"u must have shape \(4,\)"),
        (lambda: F.project_rows_l1(torch.zeros(3, 4), radius=0), "radius must be positive"),
        (lambda: F.operator_norm(torch.zeros(3, 4), 1), "p=2 and p=inf"),
        (lambda: F.max_min([1.0, 2.0]), "torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_bjorck_float32_extreme_scales_stay_finite(scale):
    w = random_matrix((40, 24), seed=14).float() * scale
    s = torch.linalg.svdvals(F.bjorck(w, n_iters=40))
    assert torch.isfinite(s).all() and (s - 1).abs().max() < 1e-4


# --------------------------------------------------------------------------- fast paths


@pytest.mark.parametrize("shape", [(12, 12), (20, 8), (8, 20), (48, 48)])
@pytest.mark.parametrize("kind", ["gauss", "near"])
def test_polar_is_the_polar_factor_with_its_exact_gradient(shape, kind):
    w = random_matrix(shape, seed=20)
    if kind == "near":  # the training regime: a perturbed orthonormal matrix (implicit backward)
        w = svd_polar(w) + 1e-2 * random_matrix(shape, seed=21)
    w.requires_grad_()
    g_out = random_matrix(shape, seed=22)
    q = F.polar(w)
    (grad,) = torch.autograd.grad(q, w, g_out)
    (ref_grad,) = torch.autograd.grad(svd_polar(w), w, g_out)
    assert torch.allclose(q, svd_polar(w.detach()), atol=1e-11)
    assert torch.linalg.matrix_norm(q.detach(), 2) <= 1 + 1e-12
    assert (grad - ref_grad).norm() <= 1e-8 * ref_grad.norm()


def test_polar_gradcheck_both_backward_paths():
    near = (svd_polar(random_matrix((6, 4), seed=23)) + 1e-3 * random_matrix((6, 4), seed=24)).requires_grad_()
    assert torch.autograd.gradcheck(F.polar, (near,))  # implicit (Lyapunov) backward
    far = (random_matrix((4, 6), seed=25) @ torch.diag(torch.logspace(-2, 0, 6, dtype=DT))).requires_grad_()
    assert torch.autograd.gradcheck(F.polar, (far,))  # ill-conditioned: through the steps


@pytest.mark.parametrize("shape", [(40, 32), (32, 32)])
@pytest.mark.parametrize("eigh", [True, False])
def test_polar_backward_solvers_give_the_exact_gradient(shape, eigh, monkeypatch):
    # Singular values over [0.5, 1.5]: the forward is not tracked, the backward solves the
    # Lyapunov equation; by eigendecomposition or conjugate gradients, the same gradient.
    u = svd_polar(random_matrix((shape[0], shape[1]), seed=36))
    v = svd_polar(random_matrix((shape[1], shape[1]), seed=37))
    w = ((u * torch.linspace(0.5, 1.5, shape[1], dtype=DT)) @ v.T).requires_grad_()
    calls = []
    solver = F._polar._lyapunov_skew_eigh if eigh else F._polar._lyapunov_skew
    monkeypatch.setattr(F._polar, "use_eigh", lambda *a: eigh)
    monkeypatch.setattr(F._polar, "_chebyshev_plan", lambda *a: None)  # its own test
    monkeypatch.setattr(F._polar, solver.__name__, lambda *a: calls.append(1) or solver(*a))
    g_out = random_matrix(shape, seed=38)
    (grad,) = torch.autograd.grad(F.polar(w), w, g_out)
    (ref_grad,) = torch.autograd.grad(svd_polar(w), w, g_out)
    assert calls == [1]
    assert (grad - ref_grad).norm() <= 1e-8 * ref_grad.norm()


@pytest.mark.parametrize("shape", [(24, 16), (16, 16), (16, 24)])
def test_polar_backward_near_the_manifold_is_a_neumann_series(shape):
    # As in training: a perturbed orthonormal weight. ‖H − I‖₂ ≤ 1 − √(1 − e0) makes the
    # series contract fast enough to beat conjugate gradients' bound, without inner products.
    w = (svd_polar(random_matrix(shape, seed=40)) + 0.001 * random_matrix(shape, seed=41)).requires_grad_()
    g_out = random_matrix(shape, seed=42)
    (grad,) = torch.autograd.grad(F.polar(w), w, g_out)
    (ref_grad,) = torch.autograd.grad(svd_polar(w), w, g_out)
    assert F._polar.last["backward"].startswith("Neumann series")
    assert (grad - ref_grad).norm() <= 1e-9 * ref_grad.norm()


def test_neumann_series_reaches_its_tolerance():
    h = torch.eye(20, dtype=DT) + 0.1 * torch.diag(torch.linspace(-1, 1, 20, dtype=DT))
    c = random_matrix((20, 20), seed=43)
    c = c - c.T
    e0 = float(torch.linalg.matrix_norm(h @ h - torch.eye(20, dtype=DT), 2))  # g0 = H²
    for rtol in (1e-4, 1e-8, 1e-12):
        steps = F._polar._neumann_steps(e0, rtol)
        z = F._polar._lyapunov_skew_neumann(h, c, steps)
        z_ref = F._polar._lyapunov_skew_eigh(*torch.linalg.eigh(h), c)
        assert (z - z_ref).norm() <= rtol * z_ref.norm()
        assert torch.equal(z, -z.T)
    assert F._polar._neumann_steps(0.8, 1e-5) is None  # ρ ≥ 1/2: conjugate gradients
    assert F._polar._neumann_steps(0.0, 1e-5) == 0  # H = I: Z = C/2


def test_polar_backward_takes_the_eigendecomposition_for_a_wide_spectrum_on_cpu(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert F._polar.use_eigh(1024, cpu, 500.0, 1e-5) and F._polar.use_eigh(64, cpu, 1e4, 1e-5)
    assert not F._polar.use_eigh(1024, cpu, 1.05, 1e-5)  # near orthonormal: a few CG steps
    assert not F._polar.use_eigh(64, cpu, 3.0, 1e-5)  # small: the eigensolver's overhead
    assert not F._polar.use_eigh(1024, cuda, 1e6, 1e-5)



@pytest.mark.parametrize("predicted", [True, False])
def test_polar_backward_on_a_raw_weight_ends_in_the_eigendecomposition(predicted, monkeypatch):
    # A raw square float32 weight (σ_min/σ_max ≈ 1e-3; after its one back-propagated step H's
    # condition number is still in the hundreds): whether the estimate predicts it or capped
    # conjugate gradients find out, the eigendecomposition solves it, and its gradient is
    # within float32's reach of the exact one, where conjugate gradients stop at their tolerance.
    torch.manual_seed(0)
    w = torch.nn.Linear(256, 256).weight.detach().clone().requires_grad_()
    calls = {"eigh": 0, "cg": 0}
    eigh, cg = F._polar._lyapunov_skew_eigh, F._polar._lyapunov_skew
    monkeypatch.setattr(F._polar, "_lyapunov_skew_eigh", lambda *a: calls.update(eigh=calls["eigh"] + 1) or eigh(*a))
    monkeypatch.setattr(F._polar, "_lyapunov_skew", lambda *a: calls.update(cg=calls["cg"] + 1) or cg(*a))
    monkeypatch.setattr(F._polar, "use_eigh", lambda *a: predicted)
    g_out = random_matrix((256, 256), seed=39)
    (grad,) = torch.autograd.grad(F.polar(w), w, g_out.float())
    (ref_grad,) = torch.autograd.grad(svd_polar(w.double()), w, g_out)
    assert calls == {"eigh": 1, "cg": 0 if predicted else 1}
    assert "eigendecomposition" in F._polar.last["backward"]
    assert (grad.double() - ref_grad).norm() <= 1e-5 * ref_grad.norm()  # CG alone: 5e-5


def test_polar_certifies_its_tolerance_in_float32():
    # Singular values spread over [0.6, 1.5], as after training steps.
    u = svd_polar(random_matrix((96, 64), seed=26))
    v = svd_polar(random_matrix((64, 64), seed=27))
    w = ((u * torch.linspace(0.6, 1.5, 64, dtype=DT)) @ v.T).float()
    s = torch.linalg.svdvals(F.polar(w, tol=1e-6).double())
    assert (s - 1).abs().max() <= 1e-6 + 1e-6  # the tolerance, plus float32 rounding
    loose = torch.linalg.svdvals(F.polar(w, tol=1e-2).double())
    assert (loose - 1).abs().max() <= 1e-2 + 1e-6 and loose.max() <= 1 + 1e-6


def test_polar_warm_start_refines_in_place_without_changing_the_result():
    w = svd_polar(random_matrix((30, 20), seed=28)) + 0.05 * random_matrix((30, 20), seed=29)
    warm = torch.zeros(2, 20, dtype=DT)
    cold = F.polar(w)
    warmed = F.polar(w, warm=warm)
    assert bool((warm.norm(dim=1) > 0.99).all())  # unit estimates written back
    again = F.polar(w, warm=warm)
    assert torch.allclose(cold, warmed, atol=1e-11) and torch.allclose(cold, again, atol=1e-11)


@pytest.mark.parametrize("low, lanczos_calls", [(0.6, 0), (0.05, 1)])
def test_polar_warm_estimates_replace_lanczos_only_for_a_moderate_spread(low, lanczos_calls,
                                                                         monkeypatch):
    # Singular values over [low, 1.5]: the warm vectors of a nearby weight give the estimates
    # when they say the Gram matrix's condition number is at most 10, a Lanczos run otherwise.
    u = svd_polar(random_matrix((40, 32), seed=32))
    v = svd_polar(random_matrix((32, 32), seed=33))
    w = (u * torch.linspace(low, 1.5, 32, dtype=DT)) @ v.T
    warm = torch.zeros(2, 32, dtype=DT)
    F.polar(w + 1e-3 * random_matrix((40, 32), seed=34), warm=warm)  # the previous training step
    calls = []
    lanczos = F._polar._lanczos_extremes
    spy = lambda *a, **k: calls.append(1) or lanczos(*a, **k)  # noqa: E731
    monkeypatch.setattr(F._polar, "_lanczos_extremes", spy)
    w.requires_grad_()
    g_out = random_matrix((40, 32), seed=35)
    q = F.polar(w, warm=warm)
    (grad,) = torch.autograd.grad(q, w, g_out)
    (ref_grad,) = torch.autograd.grad(svd_polar(w), w, g_out)
    assert len(calls) == lanczos_calls
    assert torch.allclose(q, svd_polar(w.detach()), atol=1e-11)
    assert (grad - ref_grad).norm() <= 1e-8 * ref_grad.norm()


@pytest.mark.parametrize("scale", [None, 1e-30, 1e30])
def test_polar_extreme_and_degenerate_inputs_stay_contractive(scale):
    # A rank-3 matrix cannot be certified (zero singular values stay zero): the fallback is
    # bjorck(), still ‖W‖₂ ≤ 1.
    if scale is None:
        w = random_matrix((16, 3), seed=30) @ random_matrix((3, 10), seed=31)
    else:
        w = random_matrix((16, 10), seed=30) * scale
    w = w.float().requires_grad_()
    q = F.polar(w)
    q.sum().backward()
    assert torch.isfinite(q).all() and torch.isfinite(w.grad).all()
    assert torch.linalg.matrix_norm(q.detach().double(), 2) <= 1 + 1e-6


def test_group_sort_4_jacobian_is_a_permutation_even_at_ties():
    for x in (torch.zeros(1, 8, dtype=DT), torch.tensor([[1.0, 1.0, 0.0, 1.0, 2.0, 2.0, 2.0, -1.0]], dtype=DT)):
        x.requires_grad_()
        jac = torch.autograd.functional.jacobian(lambda t: F.group_sort(t, 4), x).reshape(8, 8)
        assert set(jac.unique().tolist()) == {0.0, 1.0}
        assert torch.equal(jac.sum(0), torch.ones(8, dtype=DT)) and torch.equal(jac.sum(1), torch.ones(8, dtype=DT))
    y = random_matrix((3, 8, 5), seed=31).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: F.group_sort(t, 4, dim=1), (y,))
    # The 4-input sorting network (kept for other builds) sorts exactly, tie-safe too.
    x = torch.tensor([[1.0, 1.0, 0.0, 1.0, 2.0, 2.0, 2.0, -1.0]], dtype=DT, requires_grad=True)
    gdim = 2

    def net(t):
        return F._CompareExchange.apply(t.reshape(1, 2, 4), gdim, F.NETWORK_4)[0].reshape(1, 8)

    assert torch.equal(net(x), F.group_sort(x, 4))
    jac = torch.autograd.functional.jacobian(net, x).reshape(8, 8)
    assert torch.equal(jac.sum(0), torch.ones(8, dtype=DT)) and set(jac.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: F.polar(torch.zeros(3)), "matrix"),
        (lambda: F.polar(torch.zeros(2, 3, 3)), "one"),
        (lambda: F.polar(torch.eye(3), tol=2), "tol must be in"),
        (lambda: F.polar(torch.eye(3), max_iters=0), "max_iters"),
        (lambda: F.polar(torch.eye(3), grad_tol=0), "grad_tol"),
        (lambda: F.polar(torch.eye(3), warm=torch.zeros(2, 4)), r"warm must be a \(2, 3\)"),
    ],
)
def test_polar_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.fixture
def compare_exchange_calls(monkeypatch):
    """Record the input of every forward of the compare-exchange Function."""
    calls = []
    forward = F._CompareExchange.forward

    def spy(grouped, gdim, pairs):
        calls.append((tuple(grouped.shape), gdim, torch._C._functorch.is_functorch_wrapped_tensor(grouped)))
        return forward(grouped, gdim, pairs)

    monkeypatch.setattr(F._CompareExchange, "forward", staticmethod(spy))
    return calls


@pytest.mark.parametrize("in_dim", [0, 2])
def test_max_min_under_vmap_is_the_compare_exchange_on_the_whole_batch(compare_exchange_calls, in_dim):
    x = random_matrix((6, 4, 3), seed=40)
    x[1] = 0.0  # exact ties
    out = torch.func.vmap(lambda v: F.max_min(v, 0), in_dims=in_dim, out_dims=in_dim)(x)
    loop = torch.stack([F.max_min(v.contiguous(), 0) for v in x.unbind(in_dim)], in_dim)
    assert torch.equal(out, loop)
    # The vmap rule moves the batch first and runs the Function once, on plain tensors.
    per_sample = [n for d, n in enumerate(x.shape) if d != in_dim]
    batch = (x.shape[in_dim], per_sample[0] // 2, 2, *per_sample[1:])
    assert compare_exchange_calls[0] == (batch, 2, False)
    # vmap, then the loop, whose eager calls take the fused kernels where they are built.
    eager = 0 if F._native.kernels(x.dtype) else x.shape[in_dim]
    assert len(compare_exchange_calls) == 1 + eager


def test_max_min_jacobians_under_transforms_are_the_tie_safe_permutation(compare_exchange_calls):
    x = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0, 0.0], [0.0, 5.0, -1.0, 4.0, 7.0, -7.0], [0.0] * 6], dtype=DT)

    def f(v):
        return F.max_min(v, 0)

    jac_rev = torch.func.vmap(torch.func.jacrev(f))(x)
    jac_fwd = torch.func.vmap(torch.func.jacfwd(f))(x)
    assert len(compare_exchange_calls) == 2 and not any(c[2] for c in compare_exchange_calls)
    jac_auto = torch.stack([torch.autograd.functional.jacobian(f, v) for v in x])
    assert torch.equal(jac_rev, jac_auto) and torch.equal(jac_fwd, jac_auto)
    assert torch.equal(torch.func.jacfwd(f)(x[2]), torch.eye(6, dtype=DT))
    for v, jac in zip(x, jac_rev):
        assert set(jac.unique().tolist()) == {0.0, 1.0}
        assert torch.equal(jac.sum(0), torch.ones(6, dtype=DT)) and torch.equal(jac.sum(1), torch.ones(6, dtype=DT))
        assert torch.equal(jac @ v, f(v))
    # At a tie the routing keeps each unit in place; torch.maximum would give halves.
    assert torch.equal(jac_rev[2], torch.eye(6, dtype=DT))
    cot = random_matrix((3, 6), seed=41)
    grads = torch.func.vmap(torch.func.grad(lambda v, c: (f(v) * c).sum()))(x, cot)
    assert torch.equal(grads, torch.einsum("bi,bij->bj", cot, jac_auto))
    # Piecewise linear: every second derivative vanishes, in both modes.
    assert torch.equal(torch.func.jacrev(torch.func.jacrev(f))(x[1]), torch.zeros(6, 6, 6, dtype=DT))
    assert torch.equal(torch.func.jacfwd(torch.func.jacrev(f))(x[1]), torch.zeros(6, 6, 6, dtype=DT))


@pytest.mark.parametrize("network", ["pair", "sort4"])
def test_compare_exchange_gradcheck_forward_mode_batched_and_double_backward(network):
    if network == "pair":
        def op(t):
            return F.max_min(t, 1)
    else:
        def op(t):
            return F._CompareExchange.apply(t.reshape(3, 2, 4, 5), 2, F.NETWORK_4)[0].reshape(t.shape)

    x = random_matrix((3, 8, 5), seed=42).requires_grad_()
    assert torch.autograd.gradcheck(
        op, (x,), check_forward_ad=True, check_batched_grad=True, check_batched_forward_grad=True
    )
    assert torch.autograd.gradgradcheck(op, (x,), check_fwd_over_rev=True, check_batched_grad=True)


def test_group_sort_4_under_vmap_matches_the_loop():
    x = random_matrix((4, 8), seed=43)
    x[0, :4] = 1.0
    assert torch.equal(torch.func.vmap(lambda v: F.group_sort(v, 4, 0))(x), F.group_sort(x, 4))


def _condat_every_row(w: torch.Tensor, r: float) -> torch.Tensor:
    """The authors' projection, independently: the sorting threshold applied to every row, a
    negative one for rows inside the ball, zeros given sign +."""
    signs = torch.where(w < 0, -1.0, 1.0).to(w.dtype)
    return signs * (w.abs() - _sorting_threshold(w.abs(), r)).clamp_min(0)


@pytest.mark.parametrize("radius", [1.0, 0.3])
def test_project_rows_l1_sphere_is_the_authors_projection(radius):
    g = torch.Generator().manual_seed(11)
    w = torch.randn(64, 40, generator=g, dtype=DT) * torch.logspace(-3, 0.5, 64, dtype=DT)[:, None]
    w[0] = 0.0  # an all-zero row: every entry becomes r/n
    w[1, ::2] = 0.0  # zeros inside a row that is inside the ball
    v = F.project_rows_l1_sphere(w, radius)
    assert torch.allclose(v, _condat_every_row(w, radius), atol=1e-12, rtol=0)
    sums = v.abs().sum(-1)
    assert bool((sums <= radius).all()) and float((radius - sums).max()) < 1e-12
    inside = w.abs().sum(-1) < radius
    assert 0 < int(inside.sum()) < 64  # both kinds of rows were exercised
    assert torch.equal(v[~inside], F.project_rows_l1(w, radius)[~inside])
    assert bool((v[0] == radius / 40).all()) and bool((v[1] > 0)[w[1] == 0].all())


def test_project_linf_onto_the_sphere_and_its_errors():
    from lipsort.optim import project_linf_

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.ReLU(), torch.nn.Linear(20, 5))
    assert project_linf_(net, onto="sphere") == 2
    for m in (net[0], net[2]):
        sums = m.weight.abs().sum(-1, dtype=torch.float64)
        assert bool((sums <= 1).all()) and float((1 - sums).max()) < 1e-5  # float32 rounding
    with pytest.raises(ValueError, match="onto must be 'ball' or 'sphere', got 'shell'"):
        project_linf_(net, onto="shell")
