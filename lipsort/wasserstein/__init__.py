r"""Wasserstein-1 estimation with Lipschitz critics (Kantorovich–Rubinstein duality, chapter 01).

.. math::
    W_1(P, Q) = \sup_{\mathrm{Lip}(f) \le 1} \mathbb E_{x \sim P} f(x) - \mathbb E_{x \sim Q} f(x).

Any critic ``f`` with :math:`\mathrm{Lip}(f) \le 1` gives a *lower* bound
:math:`\mathbb E_P f - \mathbb E_Q f \le W_1(P, Q)`; a critic with constant ``L > 1`` gives
:math:`(\mathbb E_P f - \mathbb E_Q f) / L \le W_1`. Training maximizes the bound over a family
of 1-Lipschitz networks; how close it gets measures how expressive the family is. Anil et al.
(2019) show that norm-constrained networks with ReLU cannot reach the optimum when it needs
gradient norm 1 everywhere (e.g. :math:`f = |x|`), while GroupSort networks can.

* :mod:`~lipsort.wasserstein.estimates`: :func:`dual_estimate`, :func:`exact_dual_estimate`,
  :func:`gradient_norms`, :func:`gradient_norm_stats`, :func:`exact_w1` (POT),
  :func:`heldout_estimate` (certified, with a confidence interval).
* :mod:`~lipsort.wasserstein.critics`: :func:`train_critic` and :func:`fit_critic`, the one
  critic pipeline (build, train, measure; :class:`CriticResult` with the certified estimate).
* :mod:`~lipsort.wasserstein.problems`: problems with exact :math:`W_1` and optimal critic
  (the paper's cones: :func:`absolute_value`, :func:`three_cones`, :func:`high_dim_cone`;
  :class:`TranslateProblem`, :class:`EmpiricalProblem`).
* :mod:`~lipsort.wasserstein.gan`: a WGAN whose critic is a Björck + GroupSort network
  (chapter 04); import it as ``lipsort.wasserstein.gan``.

Example:
    >>> import torch
    >>> pb = absolute_value()
    >>> float(dual_estimate(pb.critic, *pb.sample(64, torch.Generator().manual_seed(0))))
    1.0
"""

from .critics import CriticHistory, CriticResult, fit_critic, train_critic
from .estimates import (
    HeldoutEstimate,
    dual_estimate,
    exact_dual_estimate,
    exact_w1,
    gradient_norm_stats,
    gradient_norms,
    heldout_estimate,
)
from .problems import (
    PROBLEMS,
    ConeProblem,
    EmpiricalProblem,
    TranslateProblem,
    absolute_value,
    high_dim_cone,
    problem,
    three_cones,
)

__all__ = [
    "dual_estimate",
    "exact_dual_estimate",
    "gradient_norms",
    "gradient_norm_stats",
    "exact_w1",
    "HeldoutEstimate",
    "heldout_estimate",
    "CriticHistory",
    "train_critic",
    "CriticResult",
    "fit_critic",
    "ConeProblem",
    "TranslateProblem",
    "EmpiricalProblem",
    "absolute_value",
    "three_cones",
    "high_dim_cone",
    "PROBLEMS",
    "problem",
]
