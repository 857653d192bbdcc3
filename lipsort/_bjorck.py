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
"""

from __future__ import annotations

import torch

from ._native import plus_transpose


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


def plain(w: torch.Tensor, n_iters: int, coeffs) -> torch.Tensor:
    """``n_iters`` steps, differentiated (if at all) by autograd through every operation."""
    eye = torch.eye(min(w.shape[-2:]), dtype=w.dtype, device=w.device)
    for _ in range(n_iters):
        g, left = _gram(w)
        w = step(w, g, left, coeffs, eye)
    return w


class Steps(torch.autograd.Function):
    """``n_iters`` Björck steps; backward by the adjoint of each step, newest first."""

    @staticmethod
    def forward(ctx, w, n_iters, coeffs):
        eye = torch.eye(min(w.shape[-2:]), dtype=w.dtype, device=w.device)
        saved = []
        x = w
        for _ in range(n_iters):
            g, left = _gram(x)
            saved += [x, g]
            x = step(x, g, left, coeffs, eye)
        ctx.n_iters, ctx.coeffs = n_iters, coeffs
        # The input is saved as itself (first iterate): a double backward re-runs the steps
        # differentiably from it.
        ctx.save_for_backward(*saved)
        return x

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        coeffs = ctx.coeffs
        if torch.is_grad_enabled():  # create_graph: differentiate the plain loop instead
            w = saved[0]
            with torch.enable_grad():
                out = plain(w, ctx.n_iters, coeffs)
            return torch.autograd.grad(out, w, grad, create_graph=True)[0], None, None
        eye = torch.eye(saved[1].shape[-1], dtype=grad.dtype, device=grad.device)
        for i in range(len(saved) - 2, -1, -2):
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
        return grad, None, None
