r"""Aggregated momentum (AggMo; Lucas, Sun, Zemel, Grosse, ICLR 2019), the optimizer of
Anil et al. (2019) for their Wasserstein and robustness experiments, the projected-gradient
step of their ℓ∞-constrained networks (:func:`project_linf_`) and the retraction step of their
Parseval networks (:func:`parseval_`).

AggMo keeps ``K`` heavy-ball velocities with different damping factors
:math:`\beta_1, \dots, \beta_K` and steps along their average:

.. math::
    v_i \leftarrow \beta_i v_i + g \quad (i = 1..K), \qquad
    \theta \leftarrow \theta - \frac{\eta}{K} \sum_{i=1}^K v_i ,

with :math:`g` the gradient (plus ``weight_decay·θ`` if set) and velocities starting at 0.
Large :math:`\beta` give speed along low-curvature directions, small ones damp the
oscillations that large momentum causes; the paper's default is
:math:`\beta = (0, 0.9, 0.99)`, the setting of the authors' configs (cemanil/LNets).

:class:`AggMo` is the maintained implementation of ``pytorch-optimizer``
(``pytorch_optimizer.AggMo``), re-exported here; ``tests/test_optim.py`` checks it against the
update rule above written out by hand. Give it at least two *distinct* betas: its velocities are
keyed by the value of β (a repeated β shares one velocity, updated twice per step) and its
argument check reads ``betas[1]``.

Example:
    >>> w = torch.nn.Parameter(torch.tensor([1.0]))
    >>> opt = AggMo([w], lr=0.1, betas=(0.0, 0.9, 0.99))
    >>> for _ in range(2):
    ...     opt.zero_grad()
    ...     (w ** 2 / 2).sum().backward()  # g = w
    ...     opt.step()
    >>> # step 1: v = (1, 1, 1), w = 1 - 0.1·1 = 0.9
    >>> # step 2: g = 0.9, v = (0.9, 1.8, 1.89), w = 0.9 - 0.1·4.59/3 = 0.747
    >>> round(w.item(), 6)
    0.747
"""

from __future__ import annotations

import torch
from pytorch_optimizer import AggMo
from torch import nn
from torch.nn.utils import parametrize

from . import functional as F
from ._checks import check_positive

__all__ = ["AggMo", "parseval_", "plain_linears", "project_linf_"]


def plain_linears(model: nn.Module) -> list[nn.Linear]:
    """The ``nn.Linear`` layers of ``model`` whose weight has no parametrization: those that
    :func:`project_linf_` constrains (a parametrized weight is constrained already)."""
    return [m for m in model.modules() if isinstance(m, nn.Linear) and not parametrize.is_parametrized(m, "weight")]

def project_linf_(model: nn.Module, radius: float = 1.0, onto: str = "ball") -> int:
    r"""Project the rows of every plain ``nn.Linear`` weight onto the ℓ1 ball, in place.

    The ℓ∞ method of Anil et al. (2019) for their provably robust MNIST nets (cemanil/LNets,
    ``per_update_proj``): *projected gradient descent*, one projection after every optimizer
    update (``fit(..., after_step=project_linf_)``), so that after every step

    .. math:: \|W\|_\infty = \max_i \|w_i\|_1 \le r, \qquad
              w_i \leftarrow \arg\min_{\|w\|_1 \le r} \|w - w_i\|_2

    (:func:`lipsort.functional.project_rows_l1`). :func:`lipsort.parametrizations.linf_projected` differs: it keeps a
    free weight and differentiates *through* the projection at every forward pass. Here the
    forward pass is a plain linear map and the constraint costs one projection per step.

    Rows already inside the ball are unchanged. The authors' ``project_on_linf_ball`` applies
    Condat's threshold to them too, a negative one, which moves them out onto the sphere
    :math:`\|w_i\|_1 = r`: ``onto="sphere"`` does that
    (:func:`lipsort.functional.project_rows_l1_sphere`). The row sums are checked in float64 — as
    :func:`lipsort.certify.lipschitz_upper_bound` measures them — and a row a rounding error
    above ``r`` is shrunk by a few ulps, so every layer's bound is at most ``r`` exactly.
    Parametrized ``nn.Linear`` layers are skipped: their constraint is their parametrization's.

    Args:
        model: a module holding ``nn.Linear`` layers (itself one, or any container).
        radius: the bound ``r > 0`` on every row's ℓ1 norm.
        onto: ``"ball"`` (the exact projection onto ``‖w_i‖₁ ≤ r``) or ``"sphere"`` (every
            row onto ``‖w_i‖₁ = r``, the authors' code).

    Returns:
        The number of layers projected.

    Raises:
        ValueError: a non-positive or non-finite ``radius``, an unknown ``onto``, or no plain
            ``nn.Linear`` in ``model`` (projecting nothing would leave the model unconstrained
            unnoticed).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> project_linf_(net)
        2
        >>> [bool(m.weight.abs().sum(1).max() <= 1) for m in (net[0], net[2])]
        [True, True]
    """
    r = check_positive(radius, "radius")
    project = {"ball": F.project_rows_l1, "sphere": F.project_rows_l1_sphere}.get(onto)
    if project is None:
        raise ValueError(f"onto must be 'ball' or 'sphere', got {onto!r}")
    layers = plain_linears(model)
    if not layers:
        raise ValueError(
            f"project_linf_ found no unparametrized nn.Linear in {type(model).__name__}; layers "
            "with a parametrization (e.g. linf_projected) are constrained already"
        )
    with torch.no_grad():
        for m in layers:
            w = project(m.weight, r)
            for k in range(8):
                over = w.abs().sum(-1, keepdim=True, dtype=torch.float64) > r
                if not bool(over.any()):
                    break
                w = torch.where(over, w * (1 - torch.finfo(w.dtype).eps * 2 ** (k + 1)), w)
            m.weight.copy_(w)
    return len(layers)


def parseval_(model: nn.Module) -> int:
    r"""One Björck step on every plain ``nn.Linear`` weight, in place: the Parseval retraction.

    The fifth linear type of Anil et al.'s MNIST comparison (cemanil/LNets
    ``fc_classification_parseval.json``: a standard layer and, after every optimizer update,
    ``per_update_proj`` of type ``l_2``, one order-1 Björck iteration at β = 1/2), after the
    Parseval networks of Cisse et al. (2017): :func:`lipsort.functional.bjorck` with one
    iteration and no pre-scale,

    .. math:: W \leftarrow \tfrac32 W - \tfrac12 W W^\top W .

    Each singular value moves to :math:`\tfrac32\sigma - \tfrac12\sigma^3`, towards 1, and
    at most 1 in absolute value for every :math:`\sigma \le 2`, so a step keeps
    :math:`\|W\|_2 \le 1` as long as no update takes a singular value beyond 2. It is a
    retraction, not a projection: certify a Parseval network with its exact bound
    (:func:`lipsort.certify.lipschitz_upper_bound`). Parametrized ``nn.Linear`` layers are
    skipped.

    Returns:
        The number of layers stepped.

    Raises:
        ValueError: no plain ``nn.Linear`` in ``model``.

    Example:
        >>> w = torch.tensor([[2.0, 0.0], [0.0, 0.5]])  # singular values 2 and 1/2
        >>> layer = nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(w)
        >>> parseval_(layer)
        1
        >>> layer.weight.detach().diagonal().tolist()  # 1.5σ − 0.5σ³
        [-1.0, 0.6875]
    """
    layers = plain_linears(model)
    if not layers:
        raise ValueError(f"parseval_ found no unparametrized nn.Linear in {type(model).__name__}")
    with torch.no_grad():
        for m in layers:
            m.weight.copy_(F.bjorck(m.weight, n_iters=1, prescale=False))
    return len(layers)
