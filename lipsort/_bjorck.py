r"""Fixed-count Björck iterations with a hand-written backward (behind :func:`lipsort.functional.bjorck`).

One order-``p`` step on a tall (or square) ``X`` is :math:`X \mapsto X\,P(Q)` with
:math:`Q = I - X^\top X` and :math:`P(Q) = \sum_{k \le p} c_k Q^k` by Horner's rule (on a wide
``X``: :math:`P(Q)\,X` with :math:`Q = I - XX^\top`). Its adjoint at ``X`` for a cotangent
``Ḡ`` of the output is

.. math:: \bar X = \bar G P^\top - X(\bar Q + \bar Q^\top), \qquad
          \bar Q = \text{the adjoint of Horner's rule at } \bar P = X^\top \bar G,

which for order 1 (:math:`X \mapsto \tfrac32 X - \tfrac12 X G`, ``G = XᵀX``, one fused
``addmm``) is :math:`\tfrac32\bar G - \tfrac12\bar G G - \tfrac12 X(X^\top \bar G + \bar G^\top X)`:
three matrix products, where autograd's unrolled graph takes four and records a node for
every operation (on small matrices, the bookkeeping is most of the cost). The forward runs the
same operations as :func:`plain` (so the weight is bitwise the same either way), and the
gradient is the exact derivative of the function computed, up to rounding.

Note [converged tail]. Started near the manifold (as BCOP's factors and trained weights are),
the steps reach the rounding floor of :math:`\|X^\top X - I\|` in a handful of steps and the
rest of a fixed count of 20 change nothing but rounding. At an orthonormal ``X`` the step's
Jacobian (any order: :math:`P(0) = I`, :math:`P'(0) = \tfrac12`) is
:math:`\bar G \mapsto \bar G - \tfrac12 X(X^\top\bar G + \bar G^\top X)`, a projection:
applying it once or ``m`` times is the same. So the backward applies the adjoint of the
newest step once for the whole tail of steps after the first whose input is within ``d·eps``
of orthonormal (:func:`_converged_from`, found by bisection on CPU, where the error decreases
along the steps; on other devices every error is read in one sync, and the tail is the steps
after the last one above ``d·eps``: the two rules differ only where the error wanders about
the floor, i.e. in which rounding-level step starts the tail), whose inputs are then at the
rounding floor (~δ²), and of every earlier step as usual; what it drops is of the size of the
rounding it already carries. (For a wide ``X`` the same with ``XXᵀ`` and left products.)

Note [early stop]. For the same reason the forward may stop there: on CPU (where reading an
error back costs nothing) the loop ends after the first step whose input is within ``d·eps`` of
orthonormal, whose output is at the rounding floor; the steps left of the count would move it
by rounding only. A trained 1024×1024 weight, pre-scaled by the rigorous bound, reaches the
floor at its 7th step, so 8 of the 20 steps run. The stop is a function of the input alone
(deterministic), :func:`plain` and :class:`Steps` stop at the same step (the same weight), and
elsewhere (other devices, ``torch.func`` transforms, tracing) the full count runs, and
inside :func:`every_step`.
"""

from __future__ import annotations

import contextlib

import torch

from ._native import plus_transpose


STOP = True  # Note [early stop]; every_step() turns it off


@contextlib.contextmanager
def every_step():
    """Run the whole count of every fixed-count loop inside the block, without Note [early
    stop]: the literal arithmetic of ``n_iters`` steps (``python -m lipsort.bench stop``)."""
    global STOP
    stop, STOP = STOP, False
    try:
        yield
    finally:
        STOP = stop


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # mm and bmm skip matmul's broadcasting logic: per call, that is most of a small product.
    return torch.mm(a, b) if a.dim() == 2 else torch.bmm(a, b) if a.dim() == 3 else a @ b


def _addmm(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float, alpha: float):
    """``beta c + alpha a @ b`` in one fused call (2-D, or 3-D batches)."""
    if c.dim() == 2:
        return torch.addmm(c, a, b, beta=beta, alpha=alpha)
    return torch.baddbmm(c, a, b, beta=beta, alpha=alpha)


def _gram(w: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Gram matrix on the smaller side: ``WᵀW`` for tall or square ``W``, ``WWᵀ`` for wide
    (2-D, or 3-D batches)."""
    left = w.shape[-2] < w.shape[-1]
    wt = w.transpose(-1, -2)
    return (_mm(w, wt) if left else _mm(wt, w)), left


def prescale(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(w / (a b), a, b)``: ``a = max |wᵢⱼ|`` (so the Gram matrix neither overflows nor
    underflows) and ``b = ‖(GᵀG)²‖_F^(1/4)`` of ``G = w / a``, per matrix (shapes
    ``(..., 1, 1)``), so ``a b ≥ ‖W‖₂``; see :func:`lipsort.functional.bjorck_prescale`."""
    tiny = torch.finfo(w.dtype).tiny
    # Detached: the result is invariant to this positive rescaling, so its gradient is the same
    # with or without it, and the subgradient of a max is avoided.
    amax = w.detach().abs().amax(dim=(-2, -1), keepdim=True).clamp_min(tiny)
    w = w / amax
    g, _ = _gram(w)
    # vector_norm over the matrix dimensions: the Frobenius norm bit for bit (it is what
    # matrix_norm calls), without matrix_norm's few microseconds of checks per call.
    bound = (torch.linalg.vector_norm(g @ g, dim=(-2, -1)).clamp_min(tiny) ** 0.25)[..., None, None]
    return w / bound, amax, bound.detach()


def _prescale_adjoint(grad, x: torch.Tensor, g: torch.Tensor, amax: torch.Tensor, bound: torch.Tensor):
    r"""The cotangent of ``W`` from that of ``X = W / β(W)``, :math:`\beta = \operatorname{tr}
    (G^4)^{1/8}` (1-homogeneous, ``G`` the Gram matrix on the smaller side, ``β = a b``): with
    :math:`\nabla\beta = X G_X^3` (:math:`G_X^3 X` for a wide ``X``; :math:`G_X` its Gram
    matrix, :math:`\operatorname{tr} G_X^4 = 1`),
    :math:`\bar W = (\bar X - \langle \bar X, X\rangle X G_X^3) / \beta`. Divided by ``b``
    and ``a`` in turn, as the forward did (their product can underflow)."""
    left = x.shape[-2] < x.shape[-1]
    g3 = _mm(_mm(g, g), g)
    inner = (grad * x).sum(dim=(-2, -1), keepdim=True)
    return (grad - inner * (_mm(g3, x) if left else _mm(x, g3))).div_(bound).div_(amax)


def _horner(q: torch.Tensor, coeffs, eye: torch.Tensor) -> list[torch.Tensor]:
    """``[h_{p-1}, …, h_0]``: ``h_{p-1} = c_{p-1} I + c_p Q``, ``h_j = c_j I + Q h_{j+1}``,
    ``P = h_0``; the same operations as :func:`step`."""
    hs = [coeffs[-2] * eye + coeffs[-1] * q]
    for c in reversed(coeffs[:-2]):
        hs.append(c * eye + _mm(q, hs[-1]))
    return hs


def step(w: torch.Tensor, g: torch.Tensor, left: bool, coeffs, eye: torch.Tensor) -> torch.Tensor:
    """One Björck step given the Gram matrix ``g`` of ``w`` (see the module docstring)."""
    if len(coeffs) == 2:  # order 1: 3/2 W − 1/2 W G (or G W), one fused product
        return _addmm(w, g, w, 1.5, -0.5) if left else _addmm(w, w, g, 1.5, -0.5)
    poly = _horner(eye - g, coeffs, eye)[-1]
    return _mm(poly, w) if left else _mm(w, poly)


def plain(w: torch.Tensor, n_iters: int, coeffs, stop: bool = False) -> torch.Tensor:
    """``n_iters`` steps (with ``stop``, fewer: Note [early stop]), differentiated (if at all)
    by autograd through every operation."""
    eye = torch.eye(min(w.shape[-2:]), dtype=w.dtype, device=w.device)
    for _ in range(n_iters):
        g, left = _gram(w)
        w = step(w, g, left, coeffs, eye)
        if stop and _converged(g.detach(), eye):
            break
    return w


def _gram_error(g: torch.Tensor, eye: torch.Tensor) -> torch.Tensor:
    """``max ‖G − I‖_F / (d·eps)`` over the batch (≤ 1: near the rounding floor)."""
    return torch.linalg.vector_norm(g - eye, dim=(-2, -1)).max() / (g.shape[-1] * torch.finfo(g.dtype).eps)


def _converged(g: torch.Tensor, eye: torch.Tensor) -> bool:
    """Whether ``‖G − I‖_F ≤ d·eps`` for every matrix of the batch (of an empty one: vacuously)."""
    # Compared on the host (a CPU read costs nothing): two operations fewer per step than
    # _gram_error, which the stop checks of small matrices (BCOP's) notice.
    if g.numel() == 0:
        return True
    err = float(torch.linalg.vector_norm(g - eye, dim=(-2, -1)).max())
    return err <= g.shape[-1] * torch.finfo(g.dtype).eps


def _converged_from(grams: list[torch.Tensor], eye: torch.Tensor) -> int:
    """The index of the first step whose Gram error is ``≤ d·eps``, every later one assumed
    so too (``len(grams)`` if the last is not): on CPU a bisection, ``⌈log₂ n⌉ + 1`` checks
    (Note [converged tail]); elsewhere all errors in one reduction, one host sync."""
    n = len(grams)
    if not grams or grams[0].numel() == 0:  # an empty batch: nothing to skip
        return n
    if grams[0].device.type != "cpu":
        ok = (torch.stack([_gram_error(g, eye) for g in grams]) <= 1).tolist()
        return next((i for i in range(n) if all(ok[i:])), n)
    lo, hi = 0, n  # grams[hi:] converged, the first converged index lies in [lo, hi]
    if not _converged(grams[-1], eye):
        return hi
    hi -= 1
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _converged(grams[mid], eye) else (mid + 1, hi)
    return hi


class Steps(torch.autograd.Function):
    """``n_iters`` Björck steps; backward by the adjoint of each step, newest first."""

    @staticmethod
    def forward(ctx, w, n_iters, coeffs, prescaled, stop):
        eye = torch.eye(min(w.shape[-2:]), dtype=w.dtype, device=w.device)
        saved = []
        # The pre-scale's adjoint is hand-written too: through autograd, its few small
        # operations cost as much as the steps on BCOP's matrices.
        x, amax, bound = prescale(w) if prescaled else (w, None, None)
        ctx.stopped = False
        for _ in range(n_iters):  # the same operations as plain(), so the same weight
            g, left = _gram(x)
            saved += [x, g]
            x = step(x, g, left, coeffs, eye)
            if stop and _converged(g, eye):
                ctx.stopped = True
                break
        ctx.n_iters, ctx.coeffs, ctx.prescaled = len(saved) // 2, coeffs, prescaled
        # The input is saved (a double backward re-runs everything differentiably from it).
        ctx.save_for_backward(w, amax, bound, *saved)
        return x

    @staticmethod
    def backward(ctx, grad):
        w, amax, bound, *saved = ctx.saved_tensors
        coeffs = ctx.coeffs
        if torch.is_grad_enabled():  # create_graph: differentiate the plain loop instead
            with torch.enable_grad():  # (the steps the forward took, no more)
                out = plain(prescale(w)[0] if ctx.prescaled else w, ctx.n_iters, coeffs)
            return torch.autograd.grad(out, w, grad, create_graph=True)[0], None, None, None, None
        eye = torch.eye(saved[1].shape[-1], dtype=grad.dtype, device=grad.device)
        # The input of step `first` is within d·eps of orthonormal, so its output and every
        # later iterate are at the rounding floor (~δ²): the adjoint of the newest step
        # stands for all of those. (Not step `first` itself: at d·eps its Jacobian still
        # differs from the projection by ~δ/2, which grows with d.)
        if ctx.stopped or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            # Stopped early, the newest step's input is the first at the floor: no tail. Inside
            # a CUDA graph: no host sync, so no collapse.
            first = len(saved) // 2
        else:
            first = _converged_from(saved[1::2], eye) + 1
        newest = len(saved) - 2
        for i in range(newest, -1, -2):
            if first * 2 <= i < newest:
                continue
            x, g = saved[i], saved[i + 1]
            left = x.shape[-2] < x.shape[-1]
            if len(coeffs) == 2:  # order 1: Ḡ P − ½ X S (or P Ḡ − ½ S X), S = XᵀḠ + ḠᵀX
                m = _mm(grad, x.mT) if left else _mm(x.mT, grad)
                sym = plus_transpose(m, 1)
                if left:
                    grad = _addmm(_addmm(grad, g, grad, 1.5, -0.5), sym, x, 1.0, -0.5)
                else:
                    grad = _addmm(_addmm(grad, grad, g, 1.5, -0.5), x, sym, 1.0, -0.5)
                continue
            q = eye - g
            hs = _horner(q, coeffs, eye)
            poly = hs[-1]
            # out = P x (wide) or x P: the cotangent of P, then back through Horner's rule.
            pbar = _mm(grad, x.mT) if left else _mm(x.mT, grad)
            grad = _mm(poly.mT, grad) if left else _mm(grad, poly.mT)
            qbar = None
            for h in reversed(hs[:-1]):  # h_{j+1} for j = 0, 1, …: h_j = c_j I + Q h_{j+1}
                term = _mm(pbar, h.mT)
                qbar = term if qbar is None else qbar + term
                pbar = _mm(q.mT, pbar)
            term = coeffs[-1] * pbar
            qbar = term if qbar is None else qbar + term
            sym = plus_transpose(qbar, 1)  # Q = I − G, G = xᵀx (or x xᵀ): Ḡ = −Q̄
            grad = grad - (_mm(sym, x) if left else _mm(x, sym))
        if ctx.prescaled:
            grad = _prescale_adjoint(grad, saved[0], saved[1], amax, bound)
        return grad, None, None, None, None
