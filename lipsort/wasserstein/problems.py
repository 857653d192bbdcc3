r"""Pairs of distributions whose Wasserstein-1 distance and optimal critic are known exactly.

The Wasserstein experiments of Anil et al. (2019) (chapter 01; the authors' configs
``absolute_value``, ``three_cones`` and ``high_dimensional_cone``) all have the same
structure: ``P`` puts its mass on spheres of radius ``r`` around a few centers, ``Q`` on the
centers themselves,

.. math::
    P = \frac1K \sum_{k=1}^K \mathrm{Unif}(S(c_k, r)), \qquad
    Q = \frac1K \sum_{k=1}^K \delta_{c_k}.

If the centers are at least ``2r`` apart, then

.. math:: W_1(P, Q) = r, \qquad f^\star(x) = \min_k \|x - c_k\|_2

is an optimal critic (Kantorovich potential) in
:math:`W_1(P, Q) = \sup_{\mathrm{Lip}(f) \le 1} \mathbb E_P f - \mathbb E_Q f`.

Proof. Moving each point of :math:`S(c_k, r)` straight to :math:`c_k` is a coupling of cost
``r``, so :math:`W_1 \le r`. The distance to the set of centers is 1-Lipschitz; it is 0 on
the support of ``Q`` and exactly ``r`` on the support of ``P`` (a point ``x`` of
:math:`S(c_k, r)` is at distance ``r`` from :math:`c_k` and at least
:math:`\|c_j - c_k\| - r \ge r` from any other center), so
:math:`\mathbb E_P f^\star - \mathbb E_Q f^\star = r` and :math:`W_1 \ge r`. The optimal
critic is a union of cones with apexes at the centers, whence the experiments' names; its
gradient has norm 1 everywhere except at the apexes (and the ridges between cones).

Problems (the experiment ids A1–A3 are those of the book and its ledger):

* :func:`absolute_value` (A1): :math:`P = \tfrac12\delta_{-1} + \tfrac12\delta_{+1}`,
  :math:`Q = \delta_0` in 1-D; :math:`W_1 = 1`, :math:`f^\star(x) = |x|`.
* :func:`three_cones` (A2): centers :math:`(-2, 0), (0, 0), (2, 0)` in 2-D, unit circles;
  :math:`W_1 = 1`.
* :func:`high_dim_cone` (A3): the origin against the unit sphere of :math:`\mathbb R^{128}`;
  :math:`W_1 = 1`, :math:`f^\star(x) = \|x\|_2`.

Example:
    >>> problem = absolute_value()
    >>> problem.w1
    1.0
    >>> x_p, x_q = problem.sample(4, generator=torch.Generator().manual_seed(0))
    >>> x_p.shape, x_q.shape
    (torch.Size([4, 1]), torch.Size([4, 1]))
    >>> problem.critic(torch.tensor([[-1.0], [0.0], [0.5]]))
    tensor([1.0000, 0.0000, 0.5000])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import check_int, check_positive

__all__ = ["ConeProblem", "absolute_value", "three_cones", "high_dim_cone", "PROBLEMS", "problem"]


class ConeProblem:
    r"""Spheres of radius ``r`` around ``K`` centers (``P``) against the centers (``Q``).

    Args:
        centers: ``(K, d)`` array-like of distinct centers, pairwise at least ``2·radius``
            apart (otherwise the closed forms below do not hold and a ``ValueError`` is raised).
        radius: sphere radius ``r > 0``; the exact distance is :math:`W_1(P, Q) = r`.
        name: a label for tables and plots.

    The properties :attr:`w1` (the exact :math:`W_1(P, Q)`) and :attr:`dim` (``d``) describe it.
    ``P`` picks a center uniformly, then a point uniformly on the sphere around it (a
    normalized Gaussian; in 1-D the "sphere" is the two points :math:`c \pm r`). In 1-D both
    distributions are discrete: :meth:`atoms_p` and :meth:`atoms_q` list their atoms and
    weights, so expectations can be computed exactly instead of sampled.

    Example:
        >>> pb = ConeProblem([[0.0, 0.0], [3.0, 0.0]], radius=1.5)
        >>> pb.w1, pb.dim
        (1.5, 2)
        >>> pb.critic(torch.tensor([[1.5, 0.0], [3.0, 2.0]]))
        tensor([1.5000, 2.0000])
    """

    def __init__(self, centers, radius: float = 1.0, name: str = "cones"):
        c = torch.as_tensor(centers, dtype=torch.float64)
        if c.dim() != 2 or c.shape[0] < 1 or c.shape[1] < 1:
            raise ValueError(f"centers must have shape (K, d) with K, d >= 1, got {tuple(c.shape)}")
        if not bool(torch.isfinite(c).all()):
            raise ValueError("centers must be finite")
        radius = check_positive(radius, "radius")
        if c.shape[0] > 1:
            gaps = torch.cdist(c, c) + torch.diag(torch.full((c.shape[0],), math.inf, dtype=torch.float64))
            closest = float(gaps.min())
            if closest < 2 * radius:
                raise ValueError(
                    f"centers must be at least 2*radius = {2 * radius} apart for W1 = radius to hold, "
                    f"but two of them are {closest:.6g} apart"
                )
        self.centers = c
        self.radius = float(radius)
        self.name = str(name)

    # ------------------------------------------------------------------ closed forms

    @property
    def w1(self) -> float:
        """The exact Wasserstein-1 distance between ``P`` and ``Q`` (the radius)."""
        return self.radius

    @property
    def dim(self) -> int:
        """Dimension of the ambient space."""
        return int(self.centers.shape[1])

    @property
    def is_discrete(self) -> bool:
        """True in 1-D, where both distributions have finitely many atoms."""
        return self.dim == 1

    def critic(self, x: Tensor) -> Tensor:
        r"""The optimal critic :math:`f^\star(x) = \min_k \|x - c_k\|_2`, shape ``(N,)``.

        1-Lipschitz, with :math:`\mathbb E_P f^\star - \mathbb E_Q f^\star = W_1(P, Q)`.
        """
        x = self._check_points(x)
        c = self.centers.to(dtype=x.dtype, device=x.device)
        return torch.cdist(x, c).amin(dim=1)

    # ------------------------------------------------------------------ sampling

    def _check_points(self, x) -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"points must be a floating-point torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"points must have shape (N, {self.dim}) for problem {self.name!r}, got {tuple(x.shape)}")
        return x

    def _centers_for(self, n: int, generator) -> Tensor:
        idx = torch.randint(self.centers.shape[0], (n,), generator=generator)
        return self.centers[idx]

    def sample_p(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32, device=None) -> Tensor:
        """``n`` points of ``P`` (uniform on the spheres), shape ``(n, d)``.

        Randomness comes from ``generator`` (a CPU ``torch.Generator``) so that a run is
        reproducible whatever the device; the result is moved to ``device``.
        """
        n = check_int(n, "n")
        centers = self._centers_for(n, generator)
        if self.dim == 1:
            # The "sphere" of the line: the two points c ± r, equally likely.
            u = torch.randint(2, (n, 1), generator=generator).to(torch.float64) * 2 - 1
        else:
            g = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
            # A zero Gaussian draw has probability 0; guard anyway so no NaN can appear.
            u = g / torch.linalg.vector_norm(g, dim=1, keepdim=True).clamp_min(1e-300)
        return (centers + self.radius * u).to(dtype=dtype, device=device)

    def sample_q(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32, device=None) -> Tensor:
        """``n`` points of ``Q`` (the centers, chosen uniformly), shape ``(n, d)``."""
        n = check_int(n, "n")
        return self._centers_for(n, generator).to(dtype=dtype, device=device)

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32, device=None) -> tuple[Tensor, Tensor]:
        """``(x_p, x_q)``: ``n`` points of each distribution."""
        return (
            self.sample_p(n, generator, dtype, device),
            self.sample_q(n, generator, dtype, device),
        )

    # ------------------------------------------------------------------ exact expectations

    def atoms_p(self, dtype=torch.float64, device=None) -> tuple[Tensor, Tensor]:
        """Atoms ``(2K, 1)`` and weights ``(2K,)`` of ``P`` (1-D problems only)."""
        self._require_discrete()
        pts = torch.cat([self.centers - self.radius, self.centers + self.radius])
        w = torch.full((pts.shape[0],), 1.0 / pts.shape[0], dtype=torch.float64)
        return pts.to(dtype=dtype, device=device), w.to(dtype=dtype, device=device)

    def atoms_q(self, dtype=torch.float64, device=None) -> tuple[Tensor, Tensor]:
        """Atoms ``(K, 1)`` and weights ``(K,)`` of ``Q`` (1-D problems only)."""
        self._require_discrete()
        k = self.centers.shape[0]
        w = torch.full((k,), 1.0 / k, dtype=torch.float64)
        return self.centers.to(dtype=dtype, device=device), w.to(dtype=dtype, device=device)

    def _require_discrete(self) -> None:
        if not self.is_discrete:
            raise ValueError(
                f"problem {self.name!r} lives in {self.dim} dimensions, where P (uniform on spheres) "
                "has no finite list of atoms; use sample_p instead"
            )

    def __repr__(self) -> str:
        return f"ConeProblem(name={self.name!r}, K={self.centers.shape[0]}, dim={self.dim}, radius={self.radius})"


def absolute_value() -> ConeProblem:
    r"""A1: :math:`P = \tfrac12\delta_{-1} + \tfrac12\delta_{+1}` against :math:`Q = \delta_0`.

    :math:`W_1 = 1` and the optimal critic is :math:`f^\star(x) = |x|` (up to a constant): the
    function that a network with monotone activations and norm-bounded weights cannot
    represent (chapter 01).

    Example:
        >>> absolute_value().atoms_p()[0].flatten().tolist()
        [-1.0, 1.0]
    """
    return ConeProblem([[0.0]], radius=1.0, name="absolute value (A1)")


def three_cones() -> ConeProblem:
    r"""A2: unit circles around :math:`(-2, 0), (0, 0), (2, 0)` against the three centers.

    :math:`W_1 = 1`; the optimal critic is the distance to the nearest center (three cones).
    Neighbouring circles touch at :math:`(\pm1, 0)`, which the closed form allows.

    Example:
        >>> three_cones().critic(torch.tensor([[1.0, 0.0], [2.0, 1.0]], dtype=torch.float64))
        tensor([1., 1.], dtype=torch.float64)
    """
    return ConeProblem([[-2.0, 0.0], [0.0, 0.0], [2.0, 0.0]], radius=1.0, name="three cones (A2)")


def high_dim_cone(dim: int = 128) -> ConeProblem:
    r"""A3: the unit sphere of :math:`\mathbb R^{d}` against the origin (paper: ``d = 128``).

    :math:`W_1 = 1` and :math:`f^\star(x) = \|x\|_2`, a single cone.

    Example:
        >>> pb = high_dim_cone(16)
        >>> x = pb.sample_p(3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> torch.allclose(x.norm(dim=1), torch.ones(3, dtype=torch.float64))
        True
    """
    dim = check_int(dim, "dim")
    return ConeProblem(torch.zeros(1, dim), radius=1.0, name=f"{dim}-D cone (A3)")


#: Problem constructors by experiment id.
PROBLEMS = {"A1": absolute_value, "A2": three_cones, "A3": high_dim_cone}


def problem(name: str, **kwargs) -> ConeProblem:
    """The problem of experiment ``name`` ("A1", "A2" or "A3"), e.g. ``problem("A3", dim=64)``.

    Example:
        >>> problem("A2").dim
        2
    """
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; choose one of {sorted(PROBLEMS)}")
    return PROBLEMS[name](**kwargs)
