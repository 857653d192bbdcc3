r"""Weight constraints for ``nn.Linear`` layers, built on :mod:`torch.nn.utils.parametrize`.

Each function takes a stock :class:`torch.nn.Linear`, registers a parametrization on its
``weight`` and returns the same module; ``module.weight`` is then the *effective* (constrained)
weight :math:`W = f(V)` of a free parameter
:math:`V` = ``module.parametrizations.weight.original``, which is what the optimizer updates
(chapter 03):

* :func:`bjorck_orthonormal`: :math:`W = UV^\top`, the orthonormal polar factor of
  :math:`V = U\Sigma V^\top` to a certified tolerance (or a fixed number of Björck–Bowie
  steps), so :math:`\|W\|_2 \le 1` always and :math:`\sigma_i(W) \approx 1`.
* :func:`spectral_normalized`: :math:`W = V / \hat\sigma(V)` with a power-iteration estimate
  :math:`\hat\sigma \le \sigma_{\max}(V)` (so :math:`\|W\|_2 \ge 1`, slightly).
* :func:`linf_projected`: every row of :math:`W` is the projection of the row of :math:`V`
  onto the ℓ1 ball of radius :math:`r`, so :math:`\|W\|_\infty = \max_i \|w_i\|_1 \le r`.

In eval mode the effective weight is computed once and cached (see :class:`EvalCachedConstraint`);
:func:`frozen` exports a model to plain layers holding those eval-mode weights.
Certificates multiply *exact* norms of the effective weights
(:func:`lipsort.functional.operator_norm`), never a power-iteration estimate.
"""

from __future__ import annotations

import copy
import numbers

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import _l1ball
from . import functional as F
from ._eval_cache import EvalCachedConstraint, register as _register
from ._checks import check_int, check_positive

__all__ = [
    "bjorck_orthonormal",
    "spectral_normalized",
    "linf_projected",
    "frozen",
    "register_frozen_export",
    "EvalCachedConstraint",
    "BjorckOrthonormal",
    "SpectralNormalized",
    "LinfProjected",
]

# Power iterations that warm-start the spectral-normalization vector when a weight is set.
_WARM_START_ITERS = 15


# --------------------------------------------------------------------------- argument checks


def _check_order(order) -> int:
    if isinstance(order, bool) or not isinstance(order, numbers.Integral) or not 1 <= order <= 4:
        raise ValueError(f"Björck order must be 1, 2, 3 or 4, got {order!r}")
    return int(order)


def _check_linear(module, fn_name: str) -> None:
    if not isinstance(module, nn.Linear):
        raise TypeError(
            f"{fn_name} constrains a torch.nn.Linear, got a {type(module).__name__}; "
            "orthogonal convolutions are the layers of lipsort.conv"
        )
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        raise ValueError(
            f"{fn_name} needs an initialized weight, got a {type(module).__name__} whose weight "
            "is uninitialized: run a forward pass through it first"
        )
    if parametrize.is_parametrized(module, "weight"):
        names = ", ".join(type(p).__name__ for p in module.parametrizations.weight)
        raise ValueError(
            f"{fn_name}: the weight of this {type(module).__name__} is already constrained by "
            f"{names}; stacking constraints is not supported (remove the first one with "
            "torch.nn.utils.parametrize.remove_parametrizations)"
        )


def _check_finite(w: Tensor, what: str) -> None:
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{what}: the weight of shape {tuple(w.shape)} has non-finite entries")


# --------------------------------------------------------------------------- Björck


def _polar_factor(w: Tensor) -> Tensor:
    r"""Orthonormal polar factor :math:`UV^\top` of :math:`W = U\Sigma V^\top`, in ``w``'s dtype.

    The closest (semi-)orthonormal matrix to ``w``, i.e. the limit of Björck's iteration. It is
    computed by an SVD in float64 (after dividing by ``max |wᵢⱼ|``, so any scale is safe)
    rather than by iterating Björck until convergence: the SVD is exact in one step whatever
    the conditioning, and for a rank-deficient ``w`` (e.g. zero-initialized), where the
    iteration keeps zero singular values at zero, it still returns an orthonormal matrix.
    """
    w64 = w.detach().to(torch.float64)
    w64 = w64 / w64.abs().amax().clamp_min(torch.finfo(torch.float64).tiny)
    u, _, vh = torch.linalg.svd(w64, full_matrices=False)
    return (u @ vh).to(w.dtype)


class BjorckOrthonormal(EvalCachedConstraint):
    r"""Parametrization :math:`W = \operatorname{polar}(V)` or :math:`\operatorname{bjorck}^{(n)}(V)`.

    See :func:`bjorck_orthonormal`. The buffer ``warm`` (in the ``state_dict``) warm-starts the
    certified path in training; eval mode starts cold (the eval weight is a function of ``V``).
    """

    def __init__(
        self,
        n_iters: int | None = None,
        order: int = 1,
        eval_iters: int | None = None,
        tol: float | None = None,
    ):
        super().__init__()
        self.n_iters = None if n_iters is None else check_int(n_iters, "n_iters", 0)
        self.order = _check_order(order)
        self.eval_iters = (
            self.n_iters if eval_iters is None else check_int(eval_iters, "eval_iters", 0)
        )
        if self.order != 1 and (self.n_iters is None or self.eval_iters is None):
            raise ValueError(
                f"Björck order={order} applies to a fixed number of iterations: pass n_iters "
                "(the certified default path, n_iters=None, uses its own scaled order-1 steps)"
            )
        if tol is not None and not (isinstance(tol, numbers.Real) and 0 < tol < 1):
            raise ValueError(f"tol must be a number in (0, 1), got {tol!r}")
        self.tol = None if tol is None else float(tol)
        self.register_buffer("warm", torch.zeros(2, 0))

    def constrain(self, original: Tensor) -> Tensor:
        n_iters = self.n_iters if self.training else self.eval_iters
        if n_iters is not None:
            return F.bjorck(original, n_iters, self.order)
        warm = None
        if self.training:
            d = min(original.shape)
            if self.warm.shape != (2, d) or self.warm.dtype != original.dtype:
                self.warm = original.new_zeros(2, d)
            warm = self.warm
        return F.polar(original, self.tol, warm=warm)

    def cache_config(self) -> tuple:
        return (self.eval_iters, self.order, self.tol)

    def right_inverse(self, weight: Tensor) -> Tensor:
        # Store the orthonormal polar factor of the given weight: training starts on the
        # manifold, where the certified path needs one step and the fixed-count iteration (its
        # pre-scale shrinks an orthonormal V to d^(-1/8)) reaches 1 - 1e-4 in 5–7, while from a
        # raw ill-conditioned weight 20 fixed steps can stay 1e-2 away.
        _check_finite(weight, "bjorck_orthonormal")
        self.warm = weight.new_zeros(2, min(weight.shape))  # a new weight: start cold
        return _polar_factor(weight)

    def extra_repr(self) -> str:
        if self.n_iters is None and self.eval_iters is None:
            return f"certified polar factor, tol={self.tol or 'default'}"
        return f"n_iters={self.n_iters}, order={self.order}, eval_iters={self.eval_iters}"


def bjorck_orthonormal(
    module: nn.Linear,
    n_iters: int | None = None,
    order: int = 1,
    eval_iters: int | None = None,
    tol: float | None = None,
) -> nn.Linear:
    r"""Constrain a Linear layer's weight to be (semi-)orthonormal by Björck's iteration.

    By default (``n_iters=None``) the effective weight is the orthonormal polar factor
    :math:`W = UV^\top` of the free parameter :math:`V = U\Sigma V^\top`, to a certified
    tolerance (:func:`lipsort.functional.polar`): scaled Björck steps run until a rigorous
    bound shows every singular value of ``W`` in ``[1 - tol, 1]``, and the gradient is the
    exact derivative of :math:`UV^\top` (implicit, from a Lyapunov equation). Near the manifold,
    as in training, that is one to five steps. With an integer ``n_iters`` it is exactly
    ``n_iters`` plain steps of order ``p`` after a rigorous pre-scale, with gradients through the
    iterations (:func:`lipsort.functional.bjorck`, as in the original code of Anil et al.)

    .. math:: W \leftarrow W \sum_{k=0}^{p} c_k (I - W^\top W)^k,
              \qquad c = (1, \tfrac12, \tfrac38, \tfrac5{16}, \tfrac{35}{128}).

    Either way every singular value of ``W`` lies in [0, 1] (up to rounding), so
    :math:`\|W\|_2 \le 1`. Registering (and assigning ``module.weight = X``) stores the
    orthonormal polar factor of the given weight as ``V``.

    Args:
        module: a ``torch.nn.Linear``; its weight has shape ``(out_features, in_features)``.
            Wide weights get orthonormal rows, tall ones orthonormal columns.
        n_iters: ``None`` (certified polar factor) or a fixed number of Björck iterations in
            training mode (non-negative integer).
        order: Taylor order ``p`` in 1..4 of the fixed-count iteration.
        eval_iters: iterations in eval mode (default: ``n_iters``); the eval weight is
            computed once and cached.
        tol: certified bound on ``max |σᵢ − 1|`` of the default path (default 1e-6 in
            float32, 1e-12 in float64).

    Returns:
        The same module, now parametrized.

    Raises:
        TypeError: if ``module`` is not a ``torch.nn.Linear``.
        ValueError: bad ``n_iters``/``order``/``eval_iters``/``tol``, a weight that is already
            constrained, uninitialized, or not finite.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> layer = bjorck_orthonormal(nn.Linear(8, 4))
        >>> s = torch.linalg.svdvals(layer.weight)
        >>> bool((s - 1).abs().max() < 1e-6)
        True
    """
    _check_linear(module, "bjorck_orthonormal")
    parametrization = BjorckOrthonormal(n_iters, order, eval_iters, tol).train(module.training)
    return _register(module, parametrization)


# --------------------------------------------------------------------------- spectral


class SpectralNormalized(EvalCachedConstraint):
    r"""Parametrization :math:`W = V / \hat\sigma(V)` (see :func:`spectral_normalized`).

    The power-iteration vector ``u`` is a buffer (in the ``state_dict``), updated by
    ``n_power_iters`` steps at each training-mode evaluation and left alone in eval mode.
    """

    def __init__(self, in_features: int, n_power_iters: int = 1, dtype=None, device=None):
        super().__init__()
        self.n_power_iters = check_int(n_power_iters, "n_power_iters", 1)
        u = torch.randn(in_features, dtype=dtype, device=device)
        self.register_buffer("u", u / u.norm())

    def _sigma(self, original: Tensor, n_iters: int) -> Tensor:
        sigma, u = F.power_iteration(original, self.u, n_iters)
        if n_iters:
            with torch.no_grad():
                # A zero vector is absorbing for power iteration (it stays zero, and σ̂ = 0
                # afterwards): keep the previous vector if this step annihilated it.
                self.u.copy_(torch.where(u.norm() > 0, u, self.u))
        # σ̂ = 0 only for V u = 0 (e.g. V = 0), where W = V / tiny = 0.
        return sigma.clamp_min(torch.finfo(original.dtype).tiny)

    def constrain(self, original: Tensor) -> Tensor:
        return original / self._sigma(original, self.n_power_iters if self.training else 0)

    def cache_inputs(self, original: Tensor) -> tuple[Tensor, ...]:
        return (original, self.u)

    def right_inverse(self, weight: Tensor) -> Tensor:
        # V is stored as given (W = V/σ̂ is scale-invariant); a new weight gets a fresh
        # warm start of u so that σ̂ is accurate from the first step.
        _check_finite(weight, "spectral_normalized")
        with torch.no_grad():
            _, u = F.power_iteration(weight, self.u, _WARM_START_ITERS)
            if bool(u.norm() > 0):  # zero for V u = 0, e.g. a zero weight: keep a random u
                self.u.copy_(u)
        return weight.clone()

    def extra_repr(self) -> str:
        return f"n_power_iters={self.n_power_iters}"


def spectral_normalized(module: nn.Linear, n_power_iters: int = 1) -> nn.Linear:
    r"""Divide a Linear layer's weight by a power-iteration estimate of its spectral norm.

    The effective weight is :math:`W = V / \hat\sigma` with :math:`\hat\sigma = \|V u\|_2` and
    ``u`` the current estimate of the top right singular vector of ``V``
    (:func:`lipsort.functional.power_iteration`; Miyato et al., 2018). ``u`` is a buffer of the
    parametrization (``parametrizations.weight.0.u`` in the ``state_dict``), warm-started with
    15 iterations at registration and on ``module.weight = X``, then refined by
    ``n_power_iters`` steps at every training-mode evaluation of the weight (not in eval mode).

    .. warning:: :math:`\hat\sigma \le \sigma_{\max}(V)` (``u`` is a unit vector), so
       :math:`\|W\|_2 = \sigma_{\max}(V)/\hat\sigma \ge 1`: the layer is only *approximately*
       1-Lipschitz. Certificates must use exact norms of the effective weight
       (:func:`lipsort.functional.operator_norm`), never :math:`\hat\sigma`.

    Args:
        module: a ``torch.nn.Linear``.
        n_power_iters: power-iteration steps per training-mode evaluation (integer ≥ 1).

    Returns:
        The same module, now parametrized.

    Raises:
        TypeError: if ``module`` is not a ``torch.nn.Linear``.
        ValueError: bad ``n_power_iters``, or a weight that is already constrained,
            uninitialized, or not finite.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> layer = spectral_normalized(nn.Linear(16, 8)).eval()
        >>> norm = float(torch.linalg.matrix_norm(layer.weight, 2))
        >>> abs(norm - 1) < 1e-3
        True
        >>> "parametrizations.weight.0.u" in layer.state_dict()
        True
    """
    _check_linear(module, "spectral_normalized")
    weight = module.weight
    parametrization = SpectralNormalized(
        weight.shape[1], n_power_iters, dtype=weight.dtype, device=weight.device
    ).train(module.training)
    return _register(module, parametrization)


# --------------------------------------------------------------------------- L∞


class LinfProjected(EvalCachedConstraint):
    r"""Parametrization :math:`w_i = \Pi_{\|\cdot\|_1 \le r}(v_i)` (see :func:`linf_projected`)."""

    def __init__(self, radius: float = 1.0, onto: str = "ball"):
        super().__init__()
        self.radius = check_positive(radius, "radius")
        if onto not in ("ball", "sphere"):
            raise ValueError(f"onto must be 'ball' or 'sphere', got {onto!r}")
        self.onto = onto

    def constrain(self, original: Tensor) -> Tensor:
        if self.onto == "ball":
            return F.project_rows_l1(original, self.radius)
        if not (original.requires_grad and torch.is_grad_enabled()):
            return F.project_rows_l1_sphere(original, self.radius)
        if not F._eager_autograd():
            raise NotImplementedError(
                "linf_projected(onto='sphere') is differentiable in eager autograd only, not under "
                "torch.func transforms, forward-mode AD, tracing or compilation; use onto='ball'"
            )
        return _l1ball.SphereThreshold.apply(original, self.radius)

    def cache_config(self) -> tuple:
        return (self.radius, self.onto)

    def right_inverse(self, weight: Tensor) -> Tensor:
        # Rows outside the ball are rescaled onto its surface rather than projected: the
        # projection soft-thresholds, so for a wide random row (ℓ1 norm ~ n) it zeroes most
        # entries, and a zero entry stays zero under training because entries below the
        # threshold get no gradient. Rescaling keeps every entry alive; rows inside the ball
        # are kept as they are.
        _check_finite(weight, "linf_projected")
        l1 = weight.abs().sum(-1, keepdim=True)
        return torch.where(l1 > self.radius, weight * (self.radius / l1), weight)

    def extra_repr(self) -> str:
        # The default's repr is what it was before ``onto`` existed: it names checkpoints.
        return f"radius={self.radius}" + ("" if self.onto == "ball" else f", onto={self.onto}")


def linf_projected(module: nn.Linear, radius: float = 1.0, onto: str = "ball") -> nn.Linear:
    r"""Constrain each row of a Linear layer's weight to the ℓ1 ball: :math:`\|W\|_\infty \le r`.

    The effective weight is the row-wise Euclidean projection onto the ℓ1 ball

    .. math:: w_i = \arg\min_{\|w\|_1 \le r} \|w - v_i\|_2
              = \operatorname{sign}(v_i) \max(|v_i| - \theta_i, 0),

    (:func:`lipsort.functional.project_rows_l1`), so the operator norm
    :math:`\|W\|_{\infty\to\infty} = \max_i \|w_i\|_1 \le r` exactly as computed (the layer is
    ``r``-Lipschitz in ℓ∞). Rows already inside the ball are unchanged. On registration and on
    ``module.weight = X``, rows of ``X`` outside the ball are *rescaled* onto its surface, which
    keeps all their entries non-zero (and trainable).

    ``onto="sphere"`` is the authors' layer instead (LNets ``l_inf_projected``, A6 of Anil et
    al.): every row through Condat's threshold, so a row inside the ball is pushed out onto the
    sphere :math:`\|w_i\|_1 = r` too (:func:`lipsort.functional.project_rows_l1_sphere`), and
    the gradient holds the threshold and the signs constant, as theirs does
    (:class:`lipsort._l1ball.SphereThreshold`; eager autograd only).

    Args:
        module: a ``torch.nn.Linear``.
        radius: the bound ``r > 0`` on every row's ℓ1 norm.
        onto: ``"ball"`` (the projection, differentiated exactly) or ``"sphere"`` (the
            authors' layer).

    Returns:
        The same module, now parametrized.

    Raises:
        TypeError: if ``module`` is not a ``torch.nn.Linear``.
        ValueError: a non-positive or non-finite ``radius``, an ``onto`` other than the two,
            or a weight that is already constrained, uninitialized, or not finite.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> layer = linf_projected(nn.Linear(16, 4), radius=2.0)
        >>> bool(layer.weight.abs().sum(1).max() <= 2.0)
        True
    """
    _check_linear(module, "linf_projected")
    parametrization = LinfProjected(radius, onto).train(module.training)
    return _register(module, parametrization)


# --------------------------------------------------------------------------- export


def frozen(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every parametrized tensor replaced by its eval-mode value.

    Each parametrization is removed with ``leave_parametrized=True`` on a copy put in eval mode,
    so the copy holds plain ``nn.Parameter`` weights equal to the effective eval-mode weights
    (no Björck iterations or projections at inference, no dependence on a cache); each module's
    train/eval flag is then restored to the one it had. ``frozen(model)`` in eval mode gives the
    same outputs as ``model.eval()``; ``model`` itself is not modified. Layers of a type
    registered with :func:`register_frozen_export` (the convolutions of :mod:`lipsort.conv`)
    are replaced by the plain layer their exporter returns.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(bjorck_orthonormal(nn.Linear(4, 4)), nn.ReLU())
        >>> plain = frozen(net)
        >>> parametrize.is_parametrized(plain[0])
        False
        >>> x = torch.randn(3, 4)
        >>> torch.equal(plain(x), net.eval()(x))
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"frozen expects a torch.nn.Module, got a {type(model).__name__}")
    clone = copy.deepcopy(model)
    modes = [(m, m.training) for m in clone.modules()]
    clone.eval()
    for m in list(clone.modules()):
        if parametrize.is_parametrized(m):
            # A deep copy of a parametrized module shares its generated class (which holds the
            # `weight` property) with the original, and remove_parametrizations deletes that
            # property from the class: give the copy a class of its own first, or the
            # original model would lose its weights.
            cls = type(m)
            namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
            m.__class__ = type(cls.__name__, cls.__bases__, namespace)
            for name in list(m.parametrizations.keys()):
                parametrize.remove_parametrizations(m, name, leave_parametrized=True)
    clone = _export_registered(clone, dict(modes))
    for m, mode in modes:
        m.training = mode
    return clone


# --------------------------------------------------------------------------- export hooks

_FROZEN_EXPORTS: dict[type, object] = {}


def register_frozen_export(cls: type, fn) -> None:
    """Teach :func:`frozen` to replace layers of type ``cls`` by ``fn(layer)``.

    ``fn`` receives the layer (a copy, in eval mode) and returns a plain module with the same
    eval-mode outputs, e.g. an ``nn.Conv2d``; it gets the layer's train/eval flag. Matching is
    on the exact class, as in :func:`lipsort.certify.register_lipschitz_bound`.

    Example:
        >>> class Double(nn.Module):
        ...     def forward(self, x):
        ...         return 2 * x
        >>> def export(layer):
        ...     lin = nn.Linear(1, 1, bias=False)
        ...     _ = nn.init.constant_(lin.weight, 2.0)
        ...     return lin
        >>> register_frozen_export(Double, export)
        >>> frozen(nn.Sequential(Double()))
        Sequential(
          (0): Linear(in_features=1, out_features=1, bias=False)
        )
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"cls must be an nn.Module subclass, got {cls!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable as fn(layer), got {fn!r}")
    _FROZEN_EXPORTS[cls] = fn


def _export_registered(module: nn.Module, modes: dict) -> nn.Module:
    fn = _FROZEN_EXPORTS.get(type(module))
    if fn is not None:
        return fn(module).train(modes.get(module, module.training))
    for name, child in list(module._modules.items()):
        if child is not None:
            new = _export_registered(child, modes)
            if new is not child:
                module._modules[name] = new
    return module
