"""The certified polar factor behind :func:`lipsort.functional.polar` (see its docstring).

Scaled Björck steps without gradient until a rigorous bound certifies the tolerance (the
scalings predicted from the first estimates, so only the step expected to certify is
measured), and the exact derivative of the polar factor from its Lyapunov equation (a Neumann
series near the manifold, Chebyshev's iteration for a well-conditioned small weight, conjugate
gradients, or, on CPU, an eigendecomposition where that costs fewer matrix products).
"""

from __future__ import annotations

import math

import torch

from ._native import plus_transpose


def default_tol(dtype: torch.dtype) -> float:
    # float32: 1e-6, a few times its rounding floor on σ (~3e-7 for a 1024-wide Gram).
    return 1e-12 if dtype == torch.float64 else max(1e-6, 8 * torch.finfo(dtype).eps)


#: What the latest call did, for ``python -m lipsort.bench`` (meaningful after one call of
#: :func:`lipsort.functional.polar` and its backward, not for a network of them): ``steps``, the
#: Björck steps that certified the forward, ``tracked``, how many of them autograd records,
#: ``backward``, how the implicit backward solved the Lyapunov equation, ``fallback`` where the
#: steps did not certify.
last: dict = {}

# Above this estimated condition number of the weight, back-propagating through the steps
# (3 products each) is cheaper than the implicit backward's conjugate gradients (~6√κ; on CPU
# at large widths an eigendecomposition caps that cost, see use_eigh, but the estimate the
# choice rests on can be far too low for a raw weight, so the steps still decide it).
_KAPPA_IMPLICIT = 6.0


def _step_map(s: float) -> float:
    """The order-1 Björck map on one singular value."""
    return 1.5 * s - 0.5 * s**3


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm().clamp_min(torch.finfo(x.dtype).tiny)


def _lanczos_extremes(g: torch.Tensor, start: torch.Tensor, steps: int = 8):
    """Ritz estimates of the extreme eigenpairs of a symmetric ``g`` from a Krylov space.

    Lanczos with full re-orthogonalization (``steps`` products with ``g``). The Ritz values lie
    in the spectrum (Cauchy interlacing): the top one under-estimates λ_max, the bottom one
    over-estimates λ_min. Returns ``(top vector, bottom vector, top value, bottom value)``.
    """
    steps = min(steps, g.shape[-1])
    basis = torch.zeros(steps, g.shape[-1], dtype=g.dtype, device=g.device)
    q = _unit(start)
    for j in range(steps):
        basis[j] = q
        w = g @ q
        for _ in range(2):  # twice is enough (Kahan): the basis stays orthonormal
            w = w - basis[: j + 1].mT @ (basis[: j + 1] @ w)
        q = _unit(w)  # a breakdown (g ≈ c I) gives noise, still orthogonal: harmless
    # An exact breakdown (w = 0) leaves zero rows, whose spurious Ritz value 0 would scale the
    # first step as if the spectrum reached 0: only the rows that span the Krylov space count.
    basis = basis[basis.norm(dim=-1) > 0.5]
    ritz, vecs = torch.linalg.eigh(basis @ g @ basis.mT)
    top, bottom = basis.mT @ vecs[:, -1], basis.mT @ vecs[:, 0]
    return _unit(top), _unit(bottom), float(ritz[-1]), float(ritz[0])


# Warm estimates are used only while they put the condition number of the Gram matrix below
# this: then Chen & Chow's α (α²(l² + lt + t²) = 3, l ≥ t/√10) keeps α σ_max ≤ √3 for any σ_max
# up to 1.19 t, far more than a refined warm Rayleigh quotient misses it by (about 1%).
_WARM_GRAM_KAPPA = 10.0


def _warm_extremes(g: torch.Tensor, u: torch.Tensor, z: torch.Tensor, e: torch.Tensor):
    """Extreme eigenpair estimates of a symmetric ``g`` from nearby warm vectors.

    Three power steps refine ``u`` (a trained weight's top singular values cluster, and one
    step left its estimate 2% low, which cost a Björck step at width 1024) and one shifted
    power step ``(λ̂ I − g) z`` refines ``z`` (it favours the bottom of the spectrum); the
    estimates are their Rayleigh quotients (the top one ≤ λ_max, the bottom one ≥ λ_min). Six
    matrix-vector products where a Lanczos run takes dozens of small operations, which
    dominate at small widths. Returns ``(float(e), estimates)`` in one host sync, the
    estimates ``(u, z, top, bottom)`` or ``None`` when they say the spectrum is too wide to
    rely on them (:data:`_WARM_GRAM_KAPPA`).
    """
    u = _unit(g @ (g @ (g @ u)))  # λ_max(g) is within a small factor of 1: no overflow
    top = u @ (g @ u)
    z = _unit(top * z - g @ z)
    ev, ru, rz = torch.stack((e, top, z @ (g @ z))).tolist()
    if not rz > 0 or ru > _WARM_GRAM_KAPPA * rz:
        return ev, None
    return ev, (u, z, ru, rz)


def _error_after(alpha: float, e: float) -> float:
    """Rigorous error of a step with scaling α when every eigenvalue of the Gram matrix lies
    in ``[1 − e, 1 + e]``: the step maps σ to f(ασ), concave, so its extremes are at the ends."""
    if e >= 1:
        return 1.0
    return 1 - min(_step_map(alpha * math.sqrt(1 - e)), _step_map(alpha * math.sqrt(1 + e)))


# The certifying check bounds ‖g − I‖₂ by a Frobenius norm (or ‖(g − I)²‖_F^½), looser than the
# spectral e the prediction sees: predicting with 1.5 e made the prediction fall one step short
# in 11, 14 and 4 of 150 Adam steps at widths 64, 128 and 512 (127, 19, 4 with e itself), with
# 426, 445 and 448 steps in all against 431, 445 and 448 measuring every step (2 e: 3 steps
# more at width 64).
_SCHEDULE_MARGIN = 1.5


def _schedule(lo: float, t: float, tol: float, max_iters: int, first: float | None = None) -> list[float]:
    """Chen & Chow's scalings predicted from estimates ``[lo, t]`` of the extreme singular values.

    In exact arithmetic a step with α maps ``[lo, t]`` into ``[min(f(α lo), f(α t)), 1]``, so
    the scalings up to the first step expected to certify (:func:`_error_after` at the
    predicted ``e = max(1 − lo², t² − 1)``, times :data:`_SCHEDULE_MARGIN` after the first
    step, whose check uses a looser bound) follow from the first estimates: the steps before
    that one need no measurement (no host sync, none of the ~15 small operations a
    measurement costs, which dominate the step at widths ≤ 256). ``first`` forces the first
    scaling; its ``[lo, t]`` is then a rigorous interval, checked without the margin.
    """
    alphas: list[float] = []
    while len(alphas) < max_iters:
        alpha = first if first is not None and not alphas else math.sqrt(3.0 / (lo * lo + lo * t + t * t))
        margin = 1.0 if first is not None and not alphas else _SCHEDULE_MARGIN
        alphas.append(alpha)
        if _error_after(alpha, margin * max(1 - lo * lo, t * t - 1)) <= tol:
            break
        lo, t = min(_step_map(alpha * lo), _step_map(alpha * t)), 1.0
    return alphas


# The first step keeps α² λ_max(g0) at most this times 3: f(ασ) > 0 for every σ, with room
# for the rounding of the bounds that prove it.
_ALPHA_SAFETY = 0.99
# Up to this width a d×d product costs less than LAPACK's Cholesky factorization, whose fixed
# cost dominates there (at 128 on 2 CPU threads: 19 µs against 105 µs): the first step's bound
# on λ_max tries the product first.
_SMALL_WIDTH = 256


def _safe_first_scaling(alpha: float, g0: torch.Tensor, e0: float, center: float,
                        eye: torch.Tensor) -> float:
    """The first step's α, lowered where needed so that α² λ_max(g0) < 3 rigorously.

    Beyond, f(ασ) < 0 flips that singular direction: the result would still certify but not
    be the polar factor. The estimates bound λ_max from below only, so an upper bound must
    prove ``λ_max ≤ L = 0.99·3/α²``: ``1 + e0`` (free); at small widths
    ``s + ‖(g0 − sI)²‖_F^½`` centred on the estimates' midpoint ``s`` (one product, within
    ``d^¼`` of the spectrum's half-width); a Cholesky factorization of ``L·I − g0``; else (a
    stale warm start or a Krylov space that missed the top direction) α comes from the
    upper bound ``min(1 + e0, ‖g0‖_∞)``.
    """
    limit = _ALPHA_SAFETY * 3.0 / (alpha * alpha)
    if 1 + e0 <= limit:
        return alpha
    if g0.shape[-1] <= _SMALL_WIDTH:
        m = g0 - center * eye
        if center + math.sqrt(float(torch.linalg.matrix_norm(m @ m))) <= limit:
            return alpha
    if int(torch.linalg.cholesky_ex(limit * eye - g0).info) == 0:
        return alpha
    bound = min(1 + e0, float(torch.linalg.matrix_norm(g0, ord=math.inf)))
    return min(alpha, math.sqrt(_ALPHA_SAFETY * 3.0 / bound))


def _polar_iterate(v: torch.Tensor, tol: float, max_iters: int, warm, kappa_max: float):
    """Scaled Björck steps on a tall matrix until certified.

    Without gradient, unless ``v`` requires one and the estimated condition number of ``v``
    exceeds ``kappa_max`` (where the implicit backward, whose conjugate gradients take
    ``O(√κ)`` products, would cost more than back-propagating through the steps). Returns
    ``(q, scale, g0, e0, u, z, tracked)`` (``g0`` the Gram matrix of ``v / scale``, ``e0`` a
    rigorous bound on ``‖g0 − I‖₂``, ``u``/``z`` the refined top/bottom singular vector
    estimates, ``tracked`` whether ``q`` carries the autograd graph of the steps) or ``None``
    when ``max_iters`` steps do not certify.
    """
    last.clear()
    d = v.shape[-1]
    eye = torch.eye(d, dtype=v.dtype, device=v.device)
    tiny = torch.finfo(v.dtype).tiny
    with torch.no_grad():
        vd = v.detach()
        # One host sync for the scale, the Frobenius norm and whether the warm start is set.
        norms = torch.stack((torch.linalg.vector_norm(vd, math.inf), torch.linalg.vector_norm(vd)))
        if warm is not None:
            norms = torch.cat((norms, torch.linalg.vector_norm(warm, dim=-1)))
        amax, fro, *warm_norms = norms.tolist()
        amax = max(amax, tiny)
        if not 1e-15 < amax < 1e15:  # extreme scales: normalize once (squares would under/overflow)
            vd, scale0 = vd / amax, amax
            amax, fro = 1.0, float(torch.linalg.vector_norm(vd))
        else:
            scale0 = 1.0
        fro /= amax
        warm_ok = warm is not None and all(0 < n < math.inf for n in warm_norms)
        if warm_ok:
            u, z = warm[0] / warm_norms[0], warm[1] / warm_norms[1]
        else:  # deterministic cold start: the eval-mode weight is a function of v alone
            u = _unit(torch.ones(d, dtype=v.dtype, device=v.device))
            z = _unit(torch.linspace(-1.0, 1.0, d, dtype=v.dtype, device=v.device) + 0.5 / d)
        # Matrix-vector products of v / amax (entries in [-1, 1]: no overflow, whatever the
        # scale), without forming it.
        for _ in range(0 if warm_ok else 4):
            u = _unit(vd.mT @ (vd @ u / amax))
        # Both are lower bounds of σ_max (a unit vector's image; the RMS singular value), so
        # the top singular value of x = v / (amax c) is ≥ 1 and within a small factor of 1.
        vu = vd @ u / amax
        c = max(float(vu.norm()), fro / math.sqrt(d), tiny)
        if warm_ok:  # one more power step, normalized by the estimates below
            u = vd.mT @ vu
        x = vd / (amax * c)
        g0 = x.mT @ x
        e0 = torch.linalg.matrix_norm(g0 - eye)
        estimates = None
        if warm_ok:  # the estimates come with e0, in one sync, whether needed or not
            e0, estimates = _warm_extremes(g0, u, z, e0)
        else:
            e0 = float(e0)
        if e0 < 0.1:
            # Near the manifold (training): a plain first step, no estimates needed; the
            # rigorous interval √(1 ∓ e0) predicts the rest, with ‖E‖₂ ≤ ‖E²‖_F^½ (one
            # product, which the first step's certificate would take anyway).
            e_mat = g0 - eye
            e0 = min(e0, math.sqrt(float(torch.linalg.matrix_norm(e_mat @ e_mat))))
            ru = rz = 1.0
            predict = (math.sqrt(1 - e0), math.sqrt(1 + e0), 1.0)
            if estimates is not None:
                u, z = estimates[:2]
        elif estimates is None:
            # Estimates of the extreme singular values and vectors of x (those of v); after
            # a scaled step the old extremes both map to the new bottom. Start: u ± z.
            u = _unit(u)
            u, z, ru, rz = _lanczos_extremes(g0, u + torch.where(u @ z < 0, -z, z))
        else:
            u, z, ru, rz = estimates
    # c ≤ σ_max(x) so λ_max(g0) ≥ 1: clamping the estimate at 1 keeps it a lower bound.
    ru = max(ru, 1.0)
    tracked = v.requires_grad and torch.is_grad_enabled() and ru > kappa_max**2 * max(rz, tiny)
    lo0, t0 = math.sqrt(min(max(rz, 0.0), ru)), math.sqrt(ru)
    if e0 >= 0.1:
        predict = (lo0, t0, None)
    # Steps before the last predicted one run unmeasured, where the prediction is reliable: from
    # the rigorous interval, or from warm estimates (a cold Lanczos run's bottom estimate of a
    # raw weight cost 1 step in 7 to 14 when its scalings were not refined). Tracked steps
    # measure every one: they watch for the point where the implicit backward takes over.
    predicted = not tracked and (e0 < 0.1 or estimates is not None)
    alphas = _schedule(*predict[:2], tol, max_iters, predict[2]) if predicted else []
    unmeasured = max(len(alphas) - 1, 0)
    alpha0 = alphas[0] if alphas else math.sqrt(3.0 / (lo0 * lo0 + lo0 * t0 + t0 * t0))
    with torch.no_grad():
        safe0 = _safe_first_scaling(alpha0, g0, e0, (ru + max(rz, 0.0)) / 2, eye)
    if safe0 < alpha0:  # the estimates were wrong: no prediction from them
        alphas, unmeasured = [], 0
    amax *= scale0
    if tracked:
        x = v / (amax * c)
    g = g0
    # The implicit backward's anchor: the matrix, its scale, Gram matrix, bound on ‖g0 − I‖₂
    # and the estimates of g0's extreme eigenvalues (None: the backward measures them).
    anchor = None if tracked else (v, amax * c, g0, e0, None if e0 < 0.1 else (ru, rz))
    for k in range(max_iters):
        if k or tracked:
            g = x.mT @ x
        certified = False
        if k < unmeasured:
            alpha = alphas[k]
        elif k == unmeasured > 0:
            # The step predicted to certify, at its predicted scaling: only the bound to check.
            with torch.no_grad():
                alpha, e_mat = alphas[k], g - eye
                e = float(torch.linalg.matrix_norm(e_mat))
                # The Frobenius bound is loose by up to √d: ‖E²‖_F^½ is tighter, for a product,
                # unless even ‖E‖_F/√d ≤ ‖E‖₂ could not certify.
                if e < 1 and _error_after(alpha, e) > tol >= _error_after(alpha, e / math.sqrt(d)):
                    e = min(e, math.sqrt(float(torch.linalg.matrix_norm(e_mat @ e_mat))))
                certified = alpha * alpha * (1 + e) <= 3 and _error_after(alpha, e) <= tol
        if k > unmeasured or not unmeasured:  # measured: estimates and bound from g
            with torch.no_grad():
                e_mat = g.detach() - eye
                if k == 0:
                    e, t, lo = e0, t0, lo0
                else:  # after a step every σ ≤ 1 (in exact arithmetic): the top is at most 1
                    # Rayleigh quotients of the old extreme directions: each is ≥ λ_min(g), so
                    # the scaling below errs on the cautious side. The steps keep the singular
                    # vectors, so one power step on I − g per step (weights 1 − λ ≥ 0) keeps
                    # sharpening z towards the bottom one, and with it the scaling.
                    gd = g.detach()
                    w = z - gd @ z  # zero only if z lies where g = I exactly: keep z then
                    z = torch.where(w.norm() > 0, _unit(w), z)
                    ru_k, rz_k, e = torch.stack(
                        (u @ (gd @ u), z @ (gd @ z), torch.linalg.matrix_norm(e_mat))
                    ).tolist()
                    t, lo = 1.0, math.sqrt(min(max(min(ru_k, rz_k), 0.0), 1.0))
                    if tracked and t < kappa_max * lo:
                        # Well conditioned now: polar(x) = polar(v) (the steps keep the singular
                        # vectors), so differentiate the polar factor implicitly from here on and
                        # back-propagate only through the steps taken so far.
                        anchor = (x, 1.0, gd, e, None)
                        tracked = False
                        last.update(tracked=k)
                        x, g = x.detach(), gd
                # Chen & Chow's scaling: α² (l² + l t + t²) = 3 maps [l, t] onto [f(αl), 1] with
                # f(αl) = f(αt), the widest interval one step can close. An over-estimated l
                # only makes the step more cautious.
                alpha = math.sqrt(3.0 / (lo * lo + lo * t + t * t)) if k else safe0

                err = _error_after(alpha, e)  # rigorous: e ≥ ‖g − I‖₂
                model = 1 - min(_step_map(alpha * lo), _step_map(alpha * t))
                if err > tol and e < 1 and model <= tol:
                    # The estimates say this is the last step but the Frobenius bound is loose
                    # (by up to √d): ‖E‖₂ ≤ ‖E²‖_F^½ is tighter, for one product.
                    e = min(e, math.sqrt(float(torch.linalg.matrix_norm(e_mat @ e_mat))))
                    err = _error_after(alpha, e)
                # ‖out‖₂ ≤ 1 in exact arithmetic: f(s) ≤ 1 for 0 ≤ s ≤ √3, and α σ ≤ α √(1 + e).
                certified = alpha * alpha * (1 + e) <= 3 and err <= tol
        if k < unmeasured:  # α(3/2 x − α²/2 x g), one fused product: later steps correct its rounding
            x = torch.addmm(x, x, g, beta=1.5 * alpha, alpha=-0.5 * alpha**3)
        else:
            # x + x Δ rather than x P: the product then rounds relative to the small
            # correction Δ = P − I, which halves the rounding floor of the result's
            # singular values.
            step = g * (-0.5 * alpha**3)
            step.diagonal().add_(1.5 * alpha - 1)
            x = torch.addmm(x, x, step)
        if certified:
            last.update(steps=k + 1, tracked=k + 1 if tracked else last.get("tracked", 0),
                        unmeasured=unmeasured)
            return x, anchor, u, z
    return None


def _lyapunov_skew(h: torch.Tensor, c: torch.Tensor, rtol: float, max_iters: int = 500):
    """Solve ``h z + z h = c`` for skew ``c`` (so skew ``z``), ``h`` symmetric positive definite.

    Conjugate gradients on the operator ``L(z) = h z + z h = h z − (h z)ᵀ`` (one product per
    step), which is positive definite on skew matrices with condition number ``κ(h)``. Returns
    ``(z, converged)``: whether the residual reached ``rtol`` within ``max_iters`` products.
    """
    z = torch.zeros_like(c)
    r, p = c.clone(), c.contiguous().clone()

    def dot(a, b):  # one pass, no temporary (these are d×d: per-op overhead counts)
        return float(torch.vdot(a.reshape(-1), b.reshape(-1)))

    rr = dot(r, r)
    target = rtol * rtol * rr
    products = 0
    for _ in range(max_iters):
        if rr <= target:
            break
        products += 1
        hp = h @ p
        lp = plus_transpose(hp, -1)  # exactly skew, so the residual stays exactly skew
        step = rr / dot(p, lp)
        z.add_(p, alpha=step)
        r.sub_(lp, alpha=step)
        rr, rr_old = dot(r, r), rr
        p.mul_(rr / rr_old).add_(r)
    last.update(backward=f"conjugate gradients, {products} products")
    return z, rr <= target


# A symmetric eigendecomposition of a d×d matrix costs about this many d×d products on CPU
# (torch.linalg.eigh against a product, float32 and float64, 2 threads of an Intel Xeon: 18–39
# at d ≤ 128, 16–23 at 256, 9–11 at 512, 6–8 from 1024). With many threads products scale
# better than eigh, so these favour it more than they should there; the cap on conjugate
# gradients in the backward bounds what a wrong choice costs (about three times the cheaper).
# GPU eigensolvers are far slower relative to their products: conjugate gradients there.
def _eigh_products(d: int, device: torch.device) -> float | None:
    if device.type != "cpu":
        return None
    return 35.0 if d <= 128 else 23.0 if d <= 256 else 11.0 if d <= 512 else 8.0


def _cg_iterations(kappa: float, rtol: float) -> float:
    """Conjugate-gradient iterations to reduce the residual by ``rtol`` at condition ``kappa``
    (the classical bound ``2((√κ − 1)/(√κ + 1))^k``; in practice often fewer)."""
    s = math.sqrt(kappa)
    if not s < 1e12:
        return math.inf
    return math.log(2 / rtol) / math.log((s + 1) / max(s - 1, 1e-300)) if s > 1 + 1e-12 else 1.0


def _eigh_budget(d: int, device: torch.device) -> float | None:
    """The conjugate-gradient steps that cost what the eigendecomposition solve does (its
    ``eigh`` and 4 products; each step a product plus a transpose-add, ~1.5 products)."""
    cost = _eigh_products(d, device)
    return None if cost is None else (cost + 4) / 1.5


def use_eigh(d: int, device: torch.device, kappa: float, rtol: float) -> bool:
    """Whether the Lyapunov solve of the backward is predicted cheaper by eigendecomposition
    than by conjugate gradients at condition number ``kappa``."""
    budget = _eigh_budget(d, device)
    return budget is not None and _cg_iterations(kappa, rtol) > budget


def _neumann_steps(e0: float, rtol: float) -> int | None:
    """Products for :func:`_lyapunov_skew_neumann` to reach relative error ``rtol`` when
    ``‖g0 − I‖₂ ≤ e0`` (then ``‖H − I‖₂ ≤ ρ = 1 − √(1 − e0)``, H = √g0, and the error
    shrinks by ρ per product from ``ρ‖Z‖``), or None if ``ρ ≥ 1/2``."""
    if not 0 <= e0 < 1:
        return None
    rho = e0 / (1.0 + math.sqrt(1.0 - e0))  # = 1 − √(1 − e0), without cancellation
    if not rho < 0.5:
        return None
    return max(math.ceil(math.log(rtol) / math.log(rho)) - 1, 0) if rho > 0 else 0


def _lyapunov_skew_neumann(h: torch.Tensor, c: torch.Tensor, steps: int) -> torch.Tensor:
    """``h z + z h = c`` as the fixed point of ``z = (c − (E z + z E)) / 2``, ``E = h − I``:
    a contraction by ``‖E‖₂``, one product per step, no inner products (no host syncs)."""
    e = h.clone()
    e.diagonal().sub_(1.0)
    z = c * 0.5
    for _ in range(steps):
        # E z + z E = E z − (E z)ᵀ for symmetric E and skew z.
        z = torch.sub(c, plus_transpose(e @ z, -1)).mul_(0.5)
    last.update(backward=f"Neumann series, {steps} products")
    return z


# Margin on the Rayleigh-quotient estimates of H's extreme eigenvalues (refined estimates are
# within about 1% of them) when they set the interval of the Chebyshev iteration below, the
# widest estimated κ(H) it is used at (beyond, conjugate gradients adapt to the spectrum), and
# the widest d×d it is used at: it takes a product or two more than conjugate gradients (whose
# convergence beats their bound), which its fewer small operations repay only while products
# are cheap (on 2 CPU threads, A/B runs of one script: a trained 128×128 layer's step 4–5%
# faster, 256×256 1–6%; 1024×1024 7% slower, 8 products against 6).
_CHEBYSHEV_MARGIN = 0.02
_CHEBYSHEV_KAPPA = 4.0
_CHEBYSHEV_MAX_WIDTH = 256


def _chebyshev_plan(ru: float, rz: float, rtol: float) -> tuple[float, float, int] | None:
    """Interval ``[lo, hi]`` of the Lyapunov operator's spectrum and the products for
    :func:`_lyapunov_skew_chebyshev`, from estimates ``rz ≤ ru`` of the extreme eigenvalues
    of ``g0 = H²`` (the operator ``z ↦ Hz + zH`` has its spectrum in ``[2a, 2b]`` when ``H`` has
    it in ``[a, b]``). After ``k`` products the residual is at most ``1/T_k(σ)`` of ``‖C‖``,
    ``σ = (hi + lo)/(hi − lo)``, the rate of conjugate gradients' bound. None where the
    estimated κ(H) exceeds :data:`_CHEBYSHEV_KAPPA`."""
    if not 0 < rz <= ru < math.inf:
        return None
    lo, hi = 2 * math.sqrt(rz) * (1 - _CHEBYSHEV_MARGIN), 2 * math.sqrt(ru) * (1 + _CHEBYSHEV_MARGIN)
    if not hi <= _CHEBYSHEV_KAPPA * lo:
        return None
    # 1/T_k(σ) ≤ rtol ⇔ k ≥ acosh(1/rtol) / acosh(σ).
    steps = math.ceil(math.acosh(1 / rtol) / math.acosh((hi + lo) / (hi - lo)))
    return lo, hi, max(steps, 1)


def _lyapunov_skew_chebyshev(h: torch.Tensor, c: torch.Tensor, lo: float, hi: float, steps: int,
                             rtol: float):
    """``h z + z h = c`` by ``steps`` Chebyshev iterations on ``[lo, hi]`` (Saad, *Iterative
    methods for sparse linear systems*, Alg. 12.1): the rate of conjugate gradients without
    their inner products, whose host syncs (two per product) dominate at small widths; one
    norm at the end checks the residual. Returns ``z`` if the residual is within
    ``rtol ‖c‖``, else None (the interval missed the spectrum)."""
    theta, delta = (hi + lo) / 2, (hi - lo) / 2
    sigma = theta / delta
    rho = 1 / sigma
    r = c.clone()
    d = c / theta
    z = torch.zeros_like(c)
    for k in range(steps):
        z.add_(d)
        r.sub_(plus_transpose(h @ d, -1))  # L(d) = hd + dh = hd − (hd)ᵀ for skew d
        if k + 1 < steps:
            rho, rho_old = 1 / (2 * sigma - rho), rho
            d.mul_(rho * rho_old).add_(r, alpha=2 * rho / delta)
    res, ref = torch.stack((torch.linalg.vector_norm(r), torch.linalg.vector_norm(c))).tolist()
    if not res <= rtol * ref:
        return None
    last.update(backward=f"Chebyshev iteration, {steps} products")
    return z


def _lyapunov_skew_eigh(lam: torch.Tensor, basis: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``h z + z h = c`` from ``h = B diag(λ) Bᵀ``: ``z = B ((Bᵀ c B) ⊘ (λᵢ + λⱼ)) Bᵀ``."""
    z = basis @ ((basis.mT @ c @ basis) / (lam[:, None] + lam[None, :])) @ basis.mT
    return plus_transpose(z, -1).mul_(0.5)  # exactly skew, as c


class _PolarGrad(torch.autograd.Function):
    """Identity on the polar factor ``q`` of ``w``; backward: the exact derivative of ``w ↦ q``."""

    @staticmethod
    def forward(ctx, w, q, g0, scale, e0, grad_tol, top, bottom, extremes):
        ctx.save_for_backward(w, q, g0, top, bottom)
        ctx.scale, ctx.e0, ctx.grad_tol, ctx.extremes = scale, e0, grad_tol, extremes
        return q.view_as(q)

    @staticmethod
    def backward(ctx, grad):
        v, q, g0, top, bottom = ctx.saved_tensors
        d = q.shape[-1]
        # v / scale = Q H. dQ = Q Ω + (I − QQᵀ) dW H⁻¹ with H Ω + Ω H = Qᵀ dW − dWᵀ Q, so the
        # adjoint is Q Z + (I − QQᵀ) G H⁻¹ with H Z + Z H = QᵀG − GᵀQ (then divided by scale).
        a = q.mT @ grad
        c = plus_transpose(a, -1)
        e0, tol = ctx.e0, ctx.grad_tol
        tall = v.shape[-2] > d
        # ‖H − I‖₂ ≤ ‖g0 − I‖₂ ≤ e0: Z = C/2 to relative accuracy e0. Below the rounding
        # floor of a computed d×d Gram matrix (~d·eps in Frobenius norm) H is I to working
        # precision: nothing finer can be resolved from it.
        floor = 2 * d * torch.finfo(q.dtype).eps
        if e0 <= max(tol, floor):
            last.update(backward="H = I")
            gw = torch.mm(q, c).mul_(0.5)
            if tall:
                gw.add_(grad).sub_(q @ a)
        elif e0 * e0 <= tol:  # H = I + E/2 + O(E²) with E = g0 − I: first order is enough
            last.update(backward="first order in H − I")
            eye = torch.eye(d, dtype=q.dtype, device=q.device)
            e_mat = g0 - eye
            ec = e_mat @ c
            z = 0.5 * c - 0.125 * plus_transpose(ec, -1)
            gw = q @ z + ((grad - q @ a) @ (eye - 0.5 * e_mat) if tall else 0)
        else:
            h = plus_transpose(q.mT @ (v / ctx.scale), 1).mul_(0.5)
            budget = _eigh_budget(d, q.device)
            z = lam = None
            tried = ""
            # Near the manifold (training) the Neumann series costs no more products than
            # conjugate gradients' bound at κ(H) ≤ √((1 + e0)/(1 − e0)) (nor than the
            # eigendecomposition), and far fewer small operations.
            neumann = _neumann_steps(e0, tol)
            if (
                neumann is not None
                and neumann <= math.ceil(_cg_iterations(math.sqrt((1 + e0) / (1 - e0)), tol))
                and (budget is None or neumann <= budget)
            ):
                z = _lyapunov_skew_neumann(h, c, neumann)
            else:
                # κ(h) = κ(v), estimated from the refined extreme singular vectors of the
                # forward (Rayleigh quotients: an under-estimate, by far for a raw weight).
                ru, rz = ctx.extremes or torch.stack((top @ (g0 @ top), bottom @ (g0 @ bottom))).tolist()
                kappa = math.sqrt(ru / rz) if rz > 0 else math.inf
                # Well conditioned (a trained weight): Chebyshev's iteration, about as many
                # products as conjugate gradients, with fewer small operations and one sync.
                plan = _chebyshev_plan(ru, rz, tol) if d <= _CHEBYSHEV_MAX_WIDTH else None
                if plan is not None and plan[2] <= math.ceil(_cg_iterations(kappa, tol)) + 1:
                    z = _lyapunov_skew_chebyshev(h, c, *plan, tol)
                    tried = "" if z is not None else f"Chebyshev ({plan[2]} products) unconverged, then "
            if z is None and budget is not None:
                # Conjugate gradients first unless the estimate already says they cost more
                # than the eigendecomposition, and that once they have spent twice as much
                # without converging (the estimate can be a few times low for a modest spread
                # too: 1024×784 raw).
                if not use_eigh(d, q.device, kappa, tol):
                    z, converged = _lyapunov_skew(h, c, tol, math.ceil(2 * budget))
                    last["backward"] = tried + last["backward"]
                    tried = f"{last['backward']} unconverged, then "
                    z = z if converged else None
                if z is None:
                    lam, basis = torch.linalg.eigh(h)
                    # Positive definite to working precision, else conjugate gradients.
                    if not bool(lam[0] > d * torch.finfo(h.dtype).eps * lam[-1]):
                        lam = None
                    last.update(backward=f"{tried}eigendecomposition")
                last["backward"] += f" (κ ≈ {kappa:.3g})"
            if lam is not None:
                gw = q @ _lyapunov_skew_eigh(lam, basis, c)
                if tall:  # (I − QQᵀ) G H⁻¹ with H⁻¹ = B diag(1/λ) Bᵀ
                    gw = gw + ((grad - q @ a) @ basis).div_(lam) @ basis.mT
            else:
                if z is None:
                    z, _ = _lyapunov_skew(h, c, tol)
                    last["backward"] = tried + last["backward"]
                gw = q @ z
                if tall:
                    chol = torch.linalg.cholesky(h)
                    gw = gw + torch.cholesky_solve((grad - q @ a).mT, chol).mT
        return gw.div_(ctx.scale), None, None, None, None, None, None, None, None


def solve(w: torch.Tensor, tol: float, max_iters: int, warm, grad_tol: float):
    """The certified polar factor of a 2-D ``w`` with its implicit gradient, or ``None``."""
    wide = w.shape[-2] < w.shape[-1]
    v = w.mT if wide else w
    result = _polar_iterate(v, tol, max_iters, warm, _KAPPA_IMPLICIT)
    if result is None:
        return None
    q, anchor, u, z = result
    if warm is not None:
        with torch.no_grad():
            warm.copy_(torch.stack((u, z)))
    if anchor is not None and anchor[0].requires_grad and torch.is_grad_enabled():
        q = _PolarGrad.apply(anchor[0], q, anchor[2], anchor[1], anchor[3], grad_tol, u, z, anchor[4])
    return q.mT if wide else q
