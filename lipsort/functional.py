"""Pure tensor operations behind every Lipschitz layer of the book.

Activations (chapter 02): :func:`group_sort`, :func:`max_min`, :func:`full_sort` permute the
units inside each group, so their Jacobian is a permutation matrix almost everywhere.

Weight constraints (chapter 03): :func:`bjorck` (orthonormalization by a fixed number of
iterations), :func:`polar` (the orthonormal polar factor to a certified tolerance, with an
implicit gradient: the fast path of :func:`lipsort.bjorck_orthonormal`), :func:`power_iteration`
(a spectral-norm *estimate*, never used to certify), :func:`project_rows_l1` (exact projection
of each row onto the ℓ1 ball, so ``‖W‖∞ ≤ r``; :func:`project_rows_l1_sphere` onto its sphere, the
authors' variant) and :func:`operator_norm` (exact norms used by
certificates).
"""

from __future__ import annotations

import math
import numbers

import torch

from . import _bjorck, _l1ball, _native, _native_op, _polar

__all__ = [
    "group_sort",
    "max_min",
    "full_sort",
    "bjorck",
    "bjorck_prescale",
    "polar",
    "power_iteration",
    "project_rows_l1",
    "project_rows_l1_sphere",
    "operator_norm",
]


def _check_tensor(x, name: str = "input") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _normalize_dim(x: torch.Tensor, dim: int) -> int:
    if x.dim() == 0:
        raise ValueError("input must have at least one dimension, got a scalar tensor")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for an input of shape {tuple(x.shape)}")
    return dim % x.dim()


def _grouped(x: torch.Tensor, group_size: int, dim: int) -> tuple[torch.Tensor, int]:
    """View ``x`` with ``dim`` split into (n_groups, group_size); returns the view and dim."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    dim = _normalize_dim(x, dim)
    n = x.shape[dim]
    if n % group_size != 0:
        raise ValueError(
            f"group_size={group_size} does not divide the {n} units along dim {dim} "
            f"(input shape {tuple(x.shape)})"
        )
    shape = x.shape[:dim] + (n // group_size, group_size) + x.shape[dim + 1 :]
    return x.reshape(shape), dim + 1


def _unwrapped(*tensors) -> bool:
    """Whether none of ``tensors`` is a torch.func wrapper (a vmap, grad or jvp level) or a
    batched tensor of the older vmap (``torch.autograd.functional.jacobian(vectorize=True)``)."""
    fn = torch._C._functorch
    return not any(
        fn.is_functorch_wrapped_tensor(t) or fn.is_legacy_batchedtensor(t) for t in tensors
    )


def _eager_autograd() -> bool:
    """Whether reverse-mode autograd is all that sees the call: no torch.func transform,
    forward-mode AD, tracing or compilation (the hand-written Functions' fast paths know only
    eager backward; under the others the plain operations run)."""
    return not (
        torch._C._are_functorch_transforms_active()
        or torch.autograd.forward_ad._current_level >= 0
        or torch._C._get_tracing_state() is not None
        or torch.compiler.is_compiling()
    )


def _route(t: torch.Tensor, gdim: int, pairs, masks) -> torch.Tensor:
    """Apply the recorded swaps to ``t`` in order: slot ``i`` takes ``where(keep, tᵢ, tⱼ)``, slot
    ``j`` the other one. Each step is its own inverse, so the reversed order is the transpose."""
    if torch.is_grad_enabled() or not _unwrapped(t, *masks):
        # Out of place, with ops that torch.func batches and autograd differentiates (for a
        # vmapped backward, forward-mode tangents and double backward).
        slots = list(t.unbind(gdim))
        for (i, j), keep in zip(pairs, masks):
            a, b = slots[i], slots[j]
            slots[i], slots[j] = torch.where(keep, a, b), torch.where(keep, b, a)
        return torch.stack(slots, gdim)
    # Eager fast path: write straight into strided slots of one output, no stacking copy.
    single = len(pairs) == 1 and t.shape[gdim] == 2
    out = torch.empty_like(t) if single else t.clone()
    src = t if single else out
    for (i, j), keep in zip(pairs, masks):
        a, b = src.select(gdim, i), src.select(gdim, j)
        if src is out:  # in place: keep slot i's value aside until slot j has read both
            to_i = torch.where(keep, a, b)
            torch.where(keep, b, a, out=out.select(gdim, j))
            out.select(gdim, i).copy_(to_i)
        else:
            torch.where(keep, a, b, out=out.select(gdim, i))
            torch.where(keep, b, a, out=out.select(gdim, j))
    return out


class _CompareExchange(torch.autograd.Function):
    """Compare-exchange steps on slots of a grouped tensor, with a tie-safe derivative.

    Each step ``(i, j)`` puts ``max`` in slot ``i`` and ``min`` in slot ``j`` and keeps one
    bool per group (``keep = xᵢ ≥ xⱼ``), returned after the result (non-differentiable). The
    backward, the forward-mode ``jvp`` and the double backward route every entry through the
    same swaps, so the Jacobian is exactly a permutation, even at ties (where
    ``torch.maximum`` would split the gradient in halves). Under ``torch.func.vmap`` the
    batch dimension is moved first and the same Function runs on the whole batch.
    """

    @classmethod
    def apply(cls, grouped, gdim, pairs):
        if torch._C._are_functorch_transforms_active():
            return super().apply(grouped, gdim, pairs)
        # Eager: what Function.apply does, less the inspect.signature binding of default
        # arguments it adds for setup_context Functions (forward has none) on every call,
        # which costs about as much as the whole compare-exchange of a small batch.
        (grouped,) = torch._functorch.utils.unwrap_dead_wrappers((grouped,))
        return super(torch.autograd.Function, cls).apply(grouped, gdim, pairs)

    @staticmethod
    def forward(grouped, gdim, pairs):
        # The vmap rule below hands plain tensors down, so the fast in-place kernels apply.
        single = len(pairs) == 1 and grouped.shape[gdim] == 2
        y = torch.empty_like(grouped) if single else grouped.clone()
        src = grouped if single else y
        masks = []
        for i, j in pairs:
            a, b = src.select(gdim, i), src.select(gdim, j)
            masks.append(torch.ge(a, b))
            if src is y:  # in place: keep the max aside until the min has read both slots
                hi = torch.maximum(a, b)
                torch.minimum(a, b, out=y.select(gdim, j))
                y.select(gdim, i).copy_(hi)
            else:
                torch.maximum(a, b, out=y.select(gdim, i))
                torch.minimum(a, b, out=y.select(gdim, j))
        return (y, *masks)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.gdim, ctx.pairs = inputs
        masks = output[1:]
        ctx.mark_non_differentiable(*masks)
        ctx.set_materialize_grads(False)  # no zero gradients for the masks
        ctx.save_for_backward(*masks)
        ctx.save_for_forward(*masks)

    @staticmethod
    def backward(ctx, grad, *_):
        if grad is None:  # the result took no part in the loss (only the masks did)
            return None, None, None
        masks = ctx.saved_tensors
        return _route(grad, ctx.gdim, ctx.pairs[::-1], masks[::-1]), None, None

    @staticmethod
    def jvp(ctx, tangent, *_):
        return (_route(tangent, ctx.gdim, ctx.pairs, ctx.saved_tensors), *(None for _ in ctx.pairs))

    @staticmethod
    def vmap(info, in_dims, grouped, gdim, pairs):
        outputs = _CompareExchange.apply(grouped.movedim(in_dims[0], 0), gdim + 1, pairs)
        return outputs, (0,) * len(outputs)


class _Fused(torch.autograd.Function):
    """MaxMin or GroupSort(4) of a contiguous CPU float tensor in one pass each way
    (:mod:`lipsort._native`).

    The eager path of :func:`group_sort` with pairs or quads: for pairs the same result, mask and
    tie-safe derivative as :class:`_CompareExchange`, without its grouped view, per-call
    signature binding and Python routing, which cost more than the arithmetic on a (256, 1024)
    batch; for quads one byte of source slots per group where ``torch.sort`` keeps an int64
    index per unit. Double backward and batched or unusual gradients take differentiable,
    batchable ops (:func:`_route`, or a scatter through the decoded slots). The same steps in
    C++ (:mod:`lipsort._native_op`) run instead where that operator could be built.
    """

    @staticmethod
    def forward(ctx, x, plan):
        pairs = plan.grouped_shape[plan.gdim] == 2
        y, saved = (_native.compare_exchange if pairs else _native.sort4)(x, plan)
        ctx.save_for_backward(saved)
        ctx.plan, ctx.pairs = plan, pairs
        return y

    @staticmethod
    def backward(ctx, grad):
        (saved,) = ctx.saved_tensors
        p, pairs = ctx.plan, ctx.pairs
        if not torch.is_grad_enabled() and _plain(grad):
            return (_native.route if pairs else _native.route4)(grad.contiguous(), saved, p), None
        g = grad.reshape(p.grouped_shape)  # double backward, batched, zero or lazy tensors
        if pairs:
            keep = _native.pair_keep(saved, p)
            return _route(g, p.gdim, ((0, 1),), (keep,)).reshape(grad.shape), None
        shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=saved.device)
        src = (saved.unsqueeze(p.gdim) >> shifts.view((4,) + (1,) * (saved.dim() - p.gdim))) & 3
        return torch.zeros_like(g).scatter(p.gdim, src.long().expand_as(g), g).reshape(grad.shape), None


def _plain(t: torch.Tensor) -> bool:
    """A dense CPU tensor whose memory holds its values (the kernels read raw pointers): not a
    subclass, zero tensor, negated view or functorch / batched wrapper."""
    return (
        type(t) is torch.Tensor
        and t.device.type == "cpu"
        and t.layout is torch.strided
        and not t._is_zerotensor()
        and not t.is_neg()
        and _unwrapped(t)
    )


def _fused(x: torch.Tensor, dim: int, group: int = 2) -> torch.Tensor | None:
    """MaxMin or GroupSort(4) through the C++ operator (else :class:`_Fused`) where the kernels
    apply (eager, contiguous CPU float32/64), else None: under torch.func transforms, forward-mode
    AD, tracing and compilation the compare-exchange Function or ``torch.sort``, whose rules they
    know."""
    if not (_plain(x) and x.is_contiguous() and _eager_autograd()):
        return None
    plan = _native.plan(x.shape, dim, x.dtype, group)
    if plan is None:
        return None
    y = _native_op.group_sort(x, dim, group)
    return super(torch.autograd.Function, _Fused).apply(x, plan) if y is None else y


# Sorting networks (Knuth, TAOCP 5.3.4), largest first: slot i gets the max. Only pairs go
# through one: for groups of 4 the five compare-exchanges on strided slices measured slower
# than torch.sort on this CPU build (python -m lipsort.bench groupsort), though exact too;
# the eager CPU path of groups of 4 is the fused kernel of _Fused instead.
_NETWORKS = {2: ((0, 1),)}
NETWORK_4 = ((0, 1), (2, 3), (0, 2), (1, 3), (1, 2))


def group_sort(x: torch.Tensor, group_size: int, dim: int = 1) -> torch.Tensor:
    """Sort consecutive groups of ``group_size`` units along ``dim``, largest first.

    ``GroupSort`` (Anil et al., 2019, chapter 02). Every group is permuted, so for each input
    the Jacobian is a permutation matrix: the map preserves every p-norm of its input and of
    the back-propagated gradient, and is 1-Lipschitz in every p-norm. Pairs go through a
    compare-exchange (one bool per pair kept for backward, instead of sort's int64 index per
    unit), also under ``torch.func`` transforms (``vmap``, ``grad``, ``jacrev``, ``jacfwd``)
    and for double backward; groups of 4 of a contiguous CPU float tensor in eager mode through
    a fused kernel (one byte of source slots per group; ties keep their order); other sizes
    and other cases through ``torch.sort``.

    Args:
        x: input tensor.
        group_size: number of units in each group; must divide ``x.shape[dim]``.
            ``group_size=2`` is :func:`max_min`, ``group_size=x.shape[dim]`` is :func:`full_sort`.
        dim: the dimension holding the units (channels for ``(N, C, ...)`` inputs).

    Example:
        >>> x = torch.tensor([[1., 3., 2., 0.]])
        >>> group_sort(x, 2)
        tensor([[3., 1., 2., 0.]])
        >>> group_sort(x, 4)
        tensor([[3., 2., 1., 0.]])
        >>> torch.func.jacfwd(lambda v: group_sort(v, 2, 0))(torch.zeros(2))  # a tie: no halves
        tensor([[1., 0.],
                [0., 1.]])
    """
    _check_tensor(x)
    if group_size in (2, 4):
        y = _fused(x, dim, group_size)
        if y is not None:
            return y
    grouped, gdim = _grouped(x, group_size, dim)
    if group_size in _NETWORKS:
        return _CompareExchange.apply(grouped, gdim, _NETWORKS[group_size])[0].reshape(x.shape)
    return grouped.sort(dim=gdim, descending=True).values.reshape(x.shape)


def max_min(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Replace each consecutive pair ``(a, b)`` along ``dim`` by ``(max(a, b), min(a, b))``.

    The paper's MaxMin: GroupSort with groups of two. It keeps the number of units (unlike a
    channel-doubling "MaxMin" that concatenates ``max(x, 0)`` and ``min(x, 0)``).
    Ties route each gradient to exactly one output, so the Jacobian is a permutation even there
    (also under ``torch.func`` transforms); backward keeps one bool per pair (per entry for
    CPU feature maps of fewer than 64 pixels).

    Example:
        >>> max_min(torch.tensor([[1., 3., -2., -5.]]))
        tensor([[ 3.,  1., -2., -5.]])
    """
    _check_tensor(x)
    return group_sort(x, 2, dim)


def full_sort(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Sort all units along ``dim``, largest first (GroupSort with a single group).

    Example:
        >>> full_sort(torch.tensor([[1., 3., 2.]]))
        tensor([[3., 2., 1.]])
    """
    _check_tensor(x)
    dim = _normalize_dim(x, dim)
    return x.sort(dim=dim, descending=True).values


# Taylor coefficients of (1 - q)^(-1/2) = sum_k binom(2k, k) / 4^k q^k: 1, 1/2, 3/8, 5/16, 35/128.
_BJORCK_COEFFS = tuple(math.comb(2 * k, k) / 4**k for k in range(5))


def _check_matrix(w: torch.Tensor, name: str = "weight") -> None:
    _check_tensor(w, name)
    if w.dim() < 2:
        raise ValueError(f"{name} must be a matrix (or a batch of matrices), got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {w.dtype}")


def bjorck_prescale(w: torch.Tensor) -> torch.Tensor:
    """Divide ``w`` by a rigorous upper bound of its spectral norm, so that ``‖W‖₂ ≤ 1``.

    First by ``max |wᵢⱼ|`` (so that the Gram matrix neither overflows nor underflows), then by
    ``‖(WᵀW)²‖_F^(1/4) ≥ ‖W‖₂``, which is tighter than the Frobenius norm: it over-estimates
    ``‖W‖₂`` by at most ``d^(1/8)`` (``d`` the smaller side) instead of ``d^(1/2)``.

    Example:
        >>> w = bjorck_prescale(1e6 * torch.randn(30, 20, dtype=torch.float64))
        >>> bool(torch.linalg.matrix_norm(w, 2) <= 1)
        True
    """
    _check_matrix(w)
    return _bjorck.prescale(w)[0]


def bjorck(w: torch.Tensor, n_iters: int = 20, order: int = 1, prescale: bool = True) -> torch.Tensor:
    r"""Björck–Bowie orthonormalization: the closest (semi-)orthonormal matrix to ``w``.

    Each iteration applies the order-``p`` Taylor expansion of :math:`(W^\top W)^{-1/2}`:

    .. math:: W \leftarrow W \sum_{k=0}^{p} c_k Q^k, \qquad Q = I - W^\top W,
              \qquad c = (1, \tfrac12, \tfrac38, \tfrac5{16}, \tfrac{35}{128}),

    so order 1 is :math:`W \leftarrow \tfrac32 W - \tfrac12 W W^\top W`. The Gram matrix is
    formed on the smaller side (:math:`WW^\top` and a left product for wide matrices). With
    ``prescale`` the input is first divided by a rigorous bound of its spectral norm
    (:func:`bjorck_prescale`): then every singular value lies in (0, 1], each iteration
    increases it without overshooting 1, and the iteration converges for any input scale.
    Gradients flow through the iterations (chapter 03), by their hand-written adjoint
    (:mod:`lipsort._bjorck`): exact for the function computed. On CPU the loop ends after the first
    iteration whose input has ``‖WᵀW − I‖_F ≤ d·eps``: the rest would change only rounding.

    Args:
        w: a ``(m, n)`` matrix or a batch ``(..., m, n)``.
        n_iters: number of iterations (at most, on CPU).
        order: Taylor order ``p`` in 1..4.
        prescale: divide by a spectral bound first (turn off only if ``‖W‖₂ ≤ 1`` already).

    Example:
        >>> w = bjorck(torch.randn(64, 32, dtype=torch.float64), n_iters=25)
        >>> torch.allclose(w.T @ w, torch.eye(32, dtype=torch.float64), atol=1e-6)
        True
    """
    _check_matrix(w)
    if isinstance(order, bool) or order not in (1, 2, 3, 4):
        raise ValueError(f"Björck order must be 1, 2, 3 or 4, got {order!r}")
    if isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 0:
        raise ValueError(f"n_iters must be a non-negative integer, got {n_iters!r}")
    if w.dim() > 3:  # the steps take 2-D matrices or 3-D batches
        return bjorck(w.reshape(-1, *w.shape[-2:]), n_iters, order, prescale).reshape(w.shape)
    coeffs = _BJORCK_COEFFS[: order + 1]
    eager = _unwrapped(w) and _eager_autograd()
    stop = eager and w.device.type == "cpu" and _bjorck.STOP  # Note [early stop] in lipsort._bjorck
    if n_iters and w.requires_grad and torch.is_grad_enabled() and eager:
        # One node with the adjoint of the pre-scale and the steps.
        return _bjorck.Steps.apply(w, n_iters, coeffs, prescale, stop)
    if prescale:
        w = bjorck_prescale(w)
    return _bjorck.plain(w, n_iters, coeffs, stop)


def polar(
    w: torch.Tensor,
    tol: float | None = None,
    max_iters: int = 50,
    warm: torch.Tensor | None = None,
    grad_tol: float | None = None,
) -> torch.Tensor:
    r"""The orthonormal polar factor :math:`UV^\top` of :math:`W = U\Sigma V^\top`, to a certified tolerance.

    Scaled order-1 Björck steps :math:`X \leftarrow \alpha X(\tfrac32 I - \tfrac12\alpha^2
    X^\top X)` (Chen & Chow's scaling, from Rayleigh-quotient estimates of the extreme
    singular values, which predict the scalings of every step up to the one expected to
    certify: those before it run unmeasured; the first scaling is proven safe,
    :math:`\alpha^2\lambda_{\max} < 3`, by an upper bound) run without gradient from :math:`X_0 = W / c`,
    ``c`` a lower bound of :math:`\|W\|_2`, until a rigorous bound shows that the result has
    every singular value in
    :math:`[1 - \text{tol}, 1]`: with :math:`e \ge \|X^\top X - I\|_2` (a Frobenius norm, or
    :math:`\|(X^\top X - I)^2\|_F^{1/2}`) the last step maps every singular value into
    :math:`[\min f(\alpha\sqrt{1 \mp e}), 1]`, :math:`f(s) = \tfrac32 s - \tfrac12 s^3 \le 1`
    on :math:`[0, \sqrt3]`. So :math:`\|W\|_2 \le 1` (up to rounding) and the result is
    :math:`UV^\top` to ``tol``, a deterministic function of ``w`` (and of ``warm``, which only
    changes how fast it gets there). The gradient is that of :math:`UV^\top` itself, from the
    Lyapunov equation of the polar decomposition :math:`W/c = QH`:

    .. math:: \nabla_W = \tfrac1c\left(QZ + (I - QQ^\top)\,G H^{-1}\right),
              \qquad HZ + ZH = Q^\top G - G^\top Q,

    solved to relative accuracy ``grad_tol`` (a residual for conjugate gradients and
    Chebyshev's iteration, an error bound for the series) by conjugate gradients, by
    Chebyshev's iteration on the estimated spectrum of :math:`H` for a well-conditioned
    weight up to 256 wide (checked by its residual, else conjugate gradients), in closed
    form when :math:`H` is within ``grad_tol`` of :math:`I`, by the Neumann series of
    :math:`Z = \tfrac12(C - (H - I)Z - Z(H - I))` when :math:`\|H - I\|_2` is small enough
    that it needs no more products than conjugate gradients would, or, on CPU where the
    condition number of :math:`W` makes conjugate gradients cost more than an eigendecomposition
    :math:`H = B\Lambda B^\top`, exactly as :math:`Z = B\big((B^\top C B)_{ij}/(\lambda_i +
    \lambda_j)\big)B^\top`. Only the result is kept for backward, not
    the iterates. If ``max_iters`` steps do not certify (e.g. a rank-deficient ``w``), it
    returns :func:`bjorck` ``(w, max_iters)`` instead (rigorous pre-scale, gradient through
    the iterations).

    Args:
        w: a ``(m, n)`` matrix (wide ones get orthonormal rows).
        tol: certified bound on :math:`\max_i |\sigma_i - 1|` (default 1e-6 in float32,
            1e-12 in float64).
        max_iters: most steps before falling back.
        warm: optional ``(2, min(m, n))`` buffer of estimates of the top and bottom singular
            vectors, refined in place (zeros: cold start); a warm start saves steps.
        grad_tol: relative accuracy of the gradient (default 1e-5 in float32, 1e-10 in float64).

    Example:
        >>> w = torch.randn(64, 32, dtype=torch.float64, requires_grad=True)
        >>> q = polar(w)
        >>> u, _, vh = torch.linalg.svd(w.detach(), full_matrices=False)
        >>> torch.allclose(q, u @ vh, atol=1e-10)
        True
        >>> bool(torch.linalg.matrix_norm(q, 2) <= 1 + 1e-12)
        True
    """
    _check_matrix(w)
    if w.dim() != 2:
        raise ValueError(f"polar takes one (m, n) matrix, got shape {tuple(w.shape)}")
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters must be a positive integer, got {max_iters!r}")
    tol = _polar.default_tol(w.dtype) if tol is None else float(tol)
    if not 0 < tol < 1:
        raise ValueError(f"tol must be in (0, 1), got {tol!r}")
    if grad_tol is None:
        grad_tol = 1e-10 if w.dtype == torch.float64 else 1e-5
    elif not (isinstance(grad_tol, numbers.Real) and 0 < grad_tol < 1):
        raise ValueError(f"grad_tol must be a number in (0, 1), got {grad_tol!r}")
    d = min(w.shape)
    if warm is not None and (not isinstance(warm, torch.Tensor) or warm.shape != (2, d)):
        shape = tuple(warm.shape) if isinstance(warm, torch.Tensor) else type(warm).__name__
        raise ValueError(f"warm must be a ({2}, {d}) tensor for a weight of shape {tuple(w.shape)}, got {shape}")
    out = _polar.solve(w, tol, max_iters, warm, grad_tol)
    if out is None:
        _polar.last.update(fallback=f"bjorck(w, {max_iters})")
        return bjorck(w, max_iters)
    return out


def power_iteration(
    w: torch.Tensor, u: torch.Tensor, n_iters: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Estimate :math:`\sigma_{\max}(W)` by power iteration on :math:`W^\top W`.

    ``u`` is a current estimate of the top right singular vector (shape ``(n,)`` for an
    ``(m, n)`` matrix). The vector is updated without gradient; the estimate
    :math:`\hat\sigma = \|W u\|_2` is differentiable in ``w``. It is a *lower* bound of the
    true norm (``‖Wu‖ ≤ ‖W‖₂`` for a unit ``u``): fine for training, never for a certificate.

    Returns:
        ``(sigma_hat, u)``: the estimate and the updated unit vector.

    Example:
        >>> w = torch.diag(torch.tensor([3., 1.]))
        >>> s, u = power_iteration(w, torch.tensor([1., 1.]), n_iters=30)
        >>> round(float(s), 4)
        3.0
    """
    _check_matrix(w)
    _check_tensor(u, "u")
    if w.dim() != 2:
        raise ValueError(f"power_iteration takes one (m, n) matrix, got shape {tuple(w.shape)}")
    if u.shape != (w.shape[-1],):
        raise ValueError(f"u must have shape ({w.shape[-1]},) for a weight of shape {tuple(w.shape)}, got {tuple(u.shape)}")
    if isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 0:
        raise ValueError(f"n_iters must be a non-negative integer, got {n_iters!r}")
    eps = 1e-12
    with torch.no_grad():
        wd = w.detach()
        u = u / u.norm().clamp_min(eps)
        for _ in range(n_iters):
            u_next = wd.T @ (wd @ u)
            norm = u_next.norm()
            # W u = 0 (e.g. a zero weight): keep u rather than collapse to the zero vector,
            # from which the iteration could never recover once W changes.
            if not norm > eps:
                break
            u = u_next / norm
    return torch.linalg.vector_norm(w @ u), u


def _check_l1_args(w: torch.Tensor, radius: float) -> None:
    _check_matrix(w)
    if not radius > 0:
        raise ValueError(f"radius must be positive, got {radius!r}")


def project_rows_l1(w: torch.Tensor, radius: float = 1.0) -> torch.Tensor:
    r"""Project each row of ``w`` onto the ℓ1 ball of ``radius``, so ``‖W‖∞ ≤ radius``.

    Exact Euclidean projection :math:`\arg\min_{\|v\|_1 \le r}\|v - w_i\|_2`: soft-thresholding
    :math:`v = \operatorname{sign}(w)\max(|w| - \theta, 0)` with the threshold θ of
    :math:`\sum_j (|w_j| - \theta)_+ = r`, found by Michelot's algorithm vectorized over rows
    (:func:`lipsort._l1ball.threshold`). The gradient is that of
    :math:`\theta = (\sum_{j \in S} |w_j| - r)/|S|` on the support ``S``, the same as through
    the sorting algorithm's formula, in closed form in eager autograd
    (:class:`lipsort._l1ball.BallProjection`). Rows already inside the ball are returned
    unchanged, and the result is idempotent: its row sums, computed in its dtype and in
    float64, never exceed ``radius``, even after rounding.

    Example:
        >>> project_rows_l1(torch.tensor([[3., -1., 0.5], [0.25, 0.5, 0.]]))
        tensor([[1.0000, 0.0000, 0.0000],
                [0.2500, 0.5000, 0.0000]])
    """
    _check_l1_args(w, radius)
    if _l1ball.CLOSED_FORM and w.requires_grad and torch.is_grad_enabled() and _eager_autograd():
        return _l1ball.BallProjection.apply(w, radius)
    return _l1ball.project(w, radius, torch.is_grad_enabled() and w.requires_grad)[0]


def project_rows_l1_sphere(w: torch.Tensor, radius: float = 1.0) -> torch.Tensor:
    r"""Project each row of ``w`` onto the ℓ1 *sphere* :math:`\|v\|_1 = r`: what the authors'
    ``project_on_linf_ball`` (cemanil/LNets) computes.

    A row outside the ball gets :func:`project_rows_l1`'s projection, which lies on the sphere.
    A row inside, of norm :math:`s < r`, is pushed out to it: Condat's threshold
    :math:`\theta = (s - r)/n` is then negative, and :math:`v = \operatorname{sign}(w)(|w| -
    \theta)` adds :math:`(r - s)/n` to every :math:`|w_j|`, zeros included (with sign +, as
    the authors' ``signs[signs == 0] = 1``). That is the Euclidean projection of an inside
    point onto the sphere. Row sums never exceed ``r`` after rounding (as
    :func:`project_rows_l1`), and are within rounding of it. No gradient: a training-loop
    projection (:func:`lipsort.optim.project_linf_` with ``onto="sphere"``).

    Example:
        >>> project_rows_l1_sphere(torch.tensor([[3., -1., 0.5], [0.25, 0.5, 0.]]))
        tensor([[1.0000, 0.0000, 0.0000],
                [0.3333, 0.5833, 0.0833]])
    """
    _check_l1_args(w, radius)
    with torch.no_grad():
        a = w.abs()
        s = a.sum(-1, keepdim=True, dtype=torch.float64)
        lift = ((radius - s) / w.shape[-1]).clamp_min(0).to(w.dtype)
        signs = torch.where(w < 0, -1.0, 1.0).to(w.dtype)
        return project_rows_l1(signs * (a + lift), radius)  # only rounding can leave a row above r


def operator_norm(w: torch.Tensor, p: float | str = 2) -> torch.Tensor:
    r"""Exact operator norm :math:`\|W\|_{p \to p}` of a matrix, for ``p`` in {2, inf}.

    ``p=2``: the largest singular value (from an SVD, not an estimate). ``p=inf``: the
    largest row ℓ1 norm. These are the norms that certificates multiply.

    Example:
        >>> float(operator_norm(torch.tensor([[3., -4.], [0., 1.]]), "inf"))
        7.0
    """
    _check_matrix(w)
    if p in (2, "2", "l2"):
        return torch.linalg.matrix_norm(w, ord=2)
    if p in (math.inf, "inf", "linf"):
        return w.abs().sum(-1).amax(-1)
    raise ValueError(f"operator_norm supports p=2 and p=inf, got p={p!r}")
