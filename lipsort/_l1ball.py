"""Row-wise helpers of the ℓ1-ball projections of :mod:`lipsort.functional`
(:func:`~lipsort.functional.project_rows_l1`, :func:`~lipsort.functional.project_rows_l1_sphere`)."""

from __future__ import annotations

import contextlib

import torch

CLOSED_FORM = True  # BallProjection in eager autograd; through_operations() turns it off


@contextlib.contextmanager
def through_operations():
    """Differentiate :func:`lipsort.functional.project_rows_l1` by autograd through its
    operations inside the block, instead of its closed-form Jacobian (``python -m lipsort.bench
    linf`` times both)."""
    global CLOSED_FORM
    closed, CLOSED_FORM = CLOSED_FORM, False
    try:
        yield
    finally:
        CLOSED_FORM = closed


def threshold(a: torch.Tensor, radius: float) -> torch.Tensor:
    r"""The soft threshold θ of each row of ``a ≥ 0`` with :math:`\sum_j (a_j - \theta)_+ = r`.

    Newton's method on the convex, decreasing, piecewise-linear
    :math:`\varphi(\theta) = \sum_j (a_j - \theta)_+ - r`, i.e. Michelot's (1986) algorithm:
    :math:`\theta \leftarrow (\sum_{a_j > \theta} a_j - r) / |\{a_j > \theta\}|`. Started below
    the root, at :math:`\max(a_{\max} - r, (\sum_j a_j - r)/n)` (two of the sorting algorithm's
    candidates), θ only grows and the support only shrinks, so it stops at the exact θ once no
    row's support changes: at most ``n`` rounds, 4–10 on trained weights, each a pass over the
    matrix, where sorting every row costs 2–3 times more (Condat, 2016, compares the two).
    """
    n = a.shape[-1]
    theta = torch.maximum(a.amax(-1, keepdim=True) - radius, (a.sum(-1, keepdim=True) - radius) / n)
    count = None
    for _ in range(n + 1):
        d = (a - theta).clamp_min_(0)
        # The support's size as a sum of signs (d ≥ 0: exact, and the same division below):
        # count_nonzero took 6 times as long as the subtraction on 1024 × 1024.
        c = torch.sign(d).sum(-1, keepdim=True)
        if count is not None and torch.equal(c, count):
            break
        count = c
        # clamp_min(0): rounding must not move θ back (that could cycle).
        theta = theta + ((d.sum(-1, keepdim=True) - radius) / c.clamp_min(1)).clamp_min_(0)
    return theta


def row_sums_within(a: torch.Tensor, radius: float) -> torch.Tensor:
    """Rows of ``a ≥ 0`` whose sum is at most ``radius`` both in ``a``'s dtype and in float64
    (the precision of the certificates' norms). The float64 sum converts ``a`` internally: on a
    1024×1024 float32 matrix it costs about 7 times the float32 one."""
    ok = a.sum(-1, keepdim=True) <= radius
    if a.dtype != torch.float64:
        ok &= a.sum(-1, keepdim=True, dtype=torch.float64) <= radius
    return ok


def project(w: torch.Tensor, radius: float, exact_theta: bool):
    r"""``(v, inside, support)``: the values of :func:`lipsort.functional.project_rows_l1`, the
    rows inside the ball, and the support ``|w| > θ`` (``None`` when every row is inside, or
    without ``exact_theta``).

    With ``exact_theta`` θ is recomputed from the support as :math:`(\sum_S |w_j| - r)/|S|`
    (differentiable where ``w`` requires a gradient), else Michelot's θ is used as found.
    """
    a = w.abs()
    inside = row_sums_within(a, radius)
    if bool(inside.all()):
        return w.clone(), inside, None  # a new tensor, as when a row moves: callers may cache it
    with torch.no_grad():
        theta = threshold(a.detach(), radius)
    support = None
    if exact_theta:
        support = a.detach() > theta
        # A product with the mask, not torch.where: the same values (a ≥ 0), without where's
        # branch per entry, which mispredicts on a mask in no order (5 ms on 1024 × 1024).
        theta = ((a * support).sum(-1, keepdim=True) - radius) / support.sum(-1, keepdim=True).clamp_min(1)
    theta = theta.clamp_min(0)
    v = w - torch.clamp(w, -theta, theta)  # = sign(w)(|w| − θ)_+
    # Rounding can leave a computed row sum a few ulps above the radius: shrink those rows
    # by a vanishing factor until the sum, computed exactly as above, is inside. After the
    # first check only the rows still over are read again (a third of a trained 1024 × 1024
    # weight's rows at the first check, a few percent at the second); a row's sum is the same
    # computed alone or in the whole matrix (each row is reduced on its own, in one order).
    eps = torch.finfo(w.dtype).eps
    va = v.abs()
    rows = torch.nonzero((~row_sums_within(va, radius) & ~inside).flatten()).flatten()
    for step in range(8):
        if rows.numel() == 0:
            break
        sub, sub_abs = v[rows], va[rows]
        sub = sub * (radius / sub_abs.sum(-1, keepdim=True)) * (1 - eps * 2**step)
        v = v.index_put((rows,), sub)
        va = va.index_put((rows,), sub.abs()) if step < 7 else va
        rows = rows[~row_sums_within(va[rows], radius).flatten()]
    # Rows inside are w itself, with the identity as their gradient (zeros included).
    return (torch.where(inside, w, v) if bool(inside.any()) else v), inside, support


class BallProjection(torch.autograd.Function):
    r"""Row-wise projection onto the ℓ1 ball with its Jacobian in closed form.

    On a row outside the ball, with support ``S`` and signs :math:`s_j`,
    :math:`v_j = s_j(|w_j| - \theta)` on ``S`` and :math:`\theta = (\sum_S |w_k| - r)/|S|`,
    so :math:`\partial v_j / \partial w_k = \delta_{jk} - s_j s_k / |S|` for ``j, k`` in ``S``
    and 0 elsewhere: the backward is :math:`\bar w = m \odot \bar v - s\,\langle s, \bar v
    \rangle / |S|` (``m`` the support's mask), three element-wise passes and a row sum where
    autograd through the forward's operations took about ten, several of them branchy
    ``where``s. A row inside the ball passes its gradient through. The rounding guard's
    rescale (a factor within a few ulps of 1) counts as a constant. The values are those of
    the differentiable path of :func:`project`, bit for bit.
    """

    @staticmethod
    def forward(ctx, w, radius):
        v, inside, support = project(w, radius, exact_theta=True)
        ctx.all_inside = support is None  # then every row is inside
        if not ctx.all_inside:
            mask = support.to(w.dtype)
            count = mask.sum(-1, keepdim=True).clamp_min(1)
            signs = torch.sign(w) * mask
            if bool(inside.any()):  # whole rows: the mask of these fills does not branch per entry
                mask.masked_fill_(inside, 1.0)
                signs.masked_fill_(inside, 0.0)
            ctx.save_for_backward(mask, signs, count)
        return v

    @staticmethod
    def backward(ctx, grad):
        if ctx.all_inside:
            return grad, None
        mask, signs, count = ctx.saved_tensors
        # Linear in grad with constant factors: double backward differentiates these ops.
        return grad * mask - signs * ((signs * grad).sum(-1, keepdim=True) / count), None


class SphereThreshold(torch.autograd.Function):
    r"""LNets' ``l_inf_projected`` layer: every row through Condat's threshold, differentiated
    with the threshold and the signs held constant.

    The values are :func:`lipsort.functional.project_rows_l1_sphere`'s (a row outside the ball
    projected onto it, a row inside pushed out onto the sphere :math:`\|w\|_1 = r`); the
    authors compute :math:`\operatorname{sign}(w)\max(|w| - \theta, 0)` with θ and the signs
    under ``no_grad``, so the derivative is the mask of the entries that stay non-zero (all of a
    row pushed out). Their layer keeps an entry that is exactly 0 at 0 (its sign is 0), where
    the sphere projection lifts it with the others.
    """

    @staticmethod
    def forward(ctx, w, radius):
        from .functional import project_rows_l1_sphere

        v = project_rows_l1_sphere(w, radius)
        ctx.save_for_backward((v != 0).to(w.dtype))
        return v

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None
