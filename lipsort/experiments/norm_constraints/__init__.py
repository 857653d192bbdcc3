r"""Book glue of chapter 03 (norm constraints): Björck, spectral normalization, ℓ∞ projection.

One module per section of the chapter, each a set of measurements and a figure:

* **Björck's iteration, one singular value at a time** (:mod:`.bjorck_scalar`, :mod:`.bjorck_matrices`). With :math:`W = U\Sigma V^\top`,
  an order-``p`` step :math:`W \leftarrow W \sum_{k \le p} c_k (I - W^\top W)^k` is
  :math:`U g_p(\Sigma) V^\top` with the scalar map

  .. math:: g_p(s) = s \sum_{k=0}^{p} c_k (1 - s^2)^k, \qquad c_k = \binom{2k}{k} 4^{-k},

  the order-``p`` Taylor polynomial of :math:`s \cdot (s^2)^{-1/2} = 1`. Everything about
  convergence (regions, iteration counts, monotonicity) is a property of :math:`g_p`
  (:func:`bjorck_map`, :func:`convergence_regions`, :func:`iterations_to_tol`), checked on
  matrices by :func:`bjorck_traces` and :func:`matrix_follows_scalar_map`.
* **Power iteration** (:mod:`.power_gaps`) under-estimates the spectral norm (:func:`power_iteration_gaps`).
* **ℓ1-ball projection** (:mod:`.l1_projection`) of rows, the ℓ∞ constraint (:func:`projection_checks`,
  :func:`projection_sparsity`).
* **Expressivity** (:mod:`.expressivity`): the same Wasserstein critic under each constraint
  (:func:`train_constrained_critic`), on the origin against the unit circle.

Example:
    >>> float(bjorck_map(0.5, 1))  # 1.5·0.5 − 0.5·0.5³
    0.6875
"""



from .bjorck_matrices import (
    bjorck_traces,
    flops_per_iteration,
    matrix_follows_scalar_map,
    plot_bjorck_convergence,
    sign_flip_example,
    trace_summary,
)
from .bjorck_scalar import (
    bjorck_map,
    convergence_regions,
    fates,
    iterations_to_tol,
    plot_scalar_maps,
    region_edges_exact,
    scalar_orbit,
    taylor_coefficients,
)
from .expressivity import (
    circle_points,
    critics_table,
    linf_w1_circle,
    plot_critics,
    train_constrained_critic,
)
from .l1_projection import (
    linf_sparsity_theory,
    plot_projection,
    project_rows_l1_bisection,
    projection_checks,
    projection_sparsity,
)
from .power_gaps import (
    marchenko_pastur_moment,
    plot_power_gaps,
    power_iteration_gaps,
    power_iteration_theory,
)

__all__ = [
    "taylor_coefficients",
    "bjorck_map",
    "scalar_orbit",
    "iterations_to_tol",
    "region_edges_exact",
    "fates",
    "convergence_regions",
    "plot_scalar_maps",
    "matrix_follows_scalar_map",
    "sign_flip_example",
    "flops_per_iteration",
    "bjorck_traces",
    "trace_summary",
    "plot_bjorck_convergence",
    "marchenko_pastur_moment",
    "power_iteration_theory",
    "power_iteration_gaps",
    "plot_power_gaps",
    "project_rows_l1_bisection",
    "projection_checks",
    "linf_sparsity_theory",
    "projection_sparsity",
    "plot_projection",
    "circle_points",
    "linf_w1_circle",
    "train_constrained_critic",
    "critics_table",
    "plot_critics",
]
