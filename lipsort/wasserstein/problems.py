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

Two more families test the estimator rather than the paper (chapter 04):
:class:`TranslateProblem` (a distribution and its translate, :math:`W_1` = the shift) and
:class:`EmpiricalProblem` (two point clouds, :math:`W_1` from an exact optimal-transport solver).

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

__all__ = [
    "ConeProblem",
    "TranslateProblem",
    "EmpiricalProblem",
    "absolute_value",
    "three_cones",
    "high_dim_cone",
    "PROBLEMS",
    "problem",
]


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
        return (centers + self.radius * self._directions(n, generator)).to(dtype=dtype, device=device)

    def _directions(self, n: int, generator) -> Tensor:
        if self.dim == 1:
            # The "sphere" of the line: the two points c ± r, equally likely.
            return torch.randint(2, (n, 1), generator=generator).to(torch.float64) * 2 - 1
        g = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        # A zero Gaussian draw has probability 0; guard anyway so no NaN can appear.
        return g / torch.linalg.vector_norm(g, dim=1, keepdim=True).clamp_min(1e-300)

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

    def sample_pairs(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32, device=None) -> tuple[Tensor, Tensor]:
        r"""``n`` coupled pairs: ``x_q[i]`` a center, ``x_p[i]`` a point of the sphere around it.

        Each pair moves a distance ``r``, so for every 1-Lipschitz ``f`` the paired estimate
        :math:`\frac1n \sum_i f(x_{p,i}) - f(x_{q,i}) \le r` holds exactly on the sample, not
        only in expectation: an evaluation set free of the excess that unequal numbers of points
        per center give independent samples.

        Example:
            >>> x_p, x_q = three_cones().sample_pairs(5, torch.Generator().manual_seed(0), torch.float64)
            >>> torch.allclose((x_p - x_q).norm(dim=1), torch.ones(5, dtype=torch.float64))
            True
        """
        n = check_int(n, "n")
        centers = self._centers_for(n, generator)
        return (centers + self.radius * self._directions(n, generator)).to(dtype=dtype, device=device), centers.to(
            dtype=dtype, device=device
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


class TranslateProblem:
    r"""A distribution ``Q`` and its translate ``P = Q + s``: :math:`W_1(P, Q) = \|s\|_2` exactly.

    ``Q`` is a mixture of isotropic Gaussians (centers ``centers``, standard deviation ``std``,
    equal weights), but the truth holds for any ``Q``: the coupling :math:`x \mapsto x + s`
    costs :math:`\|s\|`, and the 1-Lipschitz linear critic
    :math:`f^\star(x) = \langle x, s\rangle / \|s\|` gains exactly :math:`\|s\|`. A test of the
    estimator, not of the paper: the optimal critic is linear, so every activation can
    represent it, and a gap measures training and sampling, not expressiveness.

    Args:
        shift: the translation ``s`` (``(d,)``, non-zero).
        centers: ``(K, d)`` mixture centers of ``Q`` (default: the origin).
        std: standard deviation of each component (``> 0``).
        name: a label for tables and plots.

    Example:
        >>> pb = TranslateProblem([3.0, 4.0])
        >>> pb.w1, pb.dim
        (5.0, 2)
        >>> x_p, x_q = pb.sample_pairs(4, torch.Generator().manual_seed(0), torch.float64)
        >>> float((pb.critic(x_p) - pb.critic(x_q)).mean())
        5.0
    """

    is_discrete = False

    def __init__(self, shift, centers=None, std: float = 1.0, name: str = "translate"):
        s = torch.as_tensor(shift, dtype=torch.float64)
        if s.dim() != 1 or s.numel() < 1 or not bool(torch.isfinite(s).all()):
            raise ValueError(f"shift must be a finite vector of shape (d,), got {tuple(s.shape)}")
        if float(s.norm()) == 0:
            raise ValueError("shift must be non-zero (W1 = 0 has no direction for the optimal critic)")
        c = torch.zeros(1, s.numel(), dtype=torch.float64) if centers is None else torch.as_tensor(centers, dtype=torch.float64)
        if c.dim() != 2 or c.shape[0] < 1 or c.shape[1] != s.numel() or not bool(torch.isfinite(c).all()):
            raise ValueError(f"centers must be finite with shape (K, {s.numel()}), got {tuple(c.shape)}")
        self.shift, self.centers = s, c
        self.std = check_positive(std, "std")
        self.name = str(name)

    @property
    def w1(self) -> float:
        """The exact :math:`W_1(P, Q) = \\|s\\|_2`."""
        return float(self.shift.norm())

    @property
    def dim(self) -> int:
        """Dimension of the ambient space."""
        return int(self.shift.numel())

    def critic(self, x: Tensor) -> Tensor:
        r"""The optimal critic :math:`\langle x, s\rangle / \|s\|`, shape ``(N,)``."""
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"points must be a tensor of shape (N, {self.dim})")
        return x @ (self.shift / self.shift.norm()).to(x)

    def sample_q(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32, device=None) -> Tensor:
        """``n`` points of ``Q`` (the Gaussian mixture), shape ``(n, d)``."""
        n = check_int(n, "n")
        idx = torch.randint(self.centers.shape[0], (n,), generator=generator)
        x = self.centers[idx] + self.std * torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return x.to(dtype=dtype, device=device)

    def sample_p(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32, device=None) -> Tensor:
        """``n`` points of ``P = Q + s``, shape ``(n, d)``."""
        return (self.sample_q(n, generator, torch.float64) + self.shift).to(dtype=dtype, device=device)

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32, device=None) -> tuple[Tensor, Tensor]:
        """``(x_p, x_q)``: ``n`` independent points of each distribution."""
        return self.sample_p(n, generator, dtype, device), self.sample_q(n, generator, dtype, device)

    def sample_pairs(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32, device=None) -> tuple[Tensor, Tensor]:
        r"""``n`` coupled pairs ``(x + s, x)``, each moved by :math:`\|s\|` (see :meth:`ConeProblem.sample_pairs`)."""
        x_q = self.sample_q(n, generator, torch.float64)
        return (x_q + self.shift).to(dtype=dtype, device=device), x_q.to(dtype=dtype, device=device)

    def __repr__(self) -> str:
        return f"TranslateProblem(name={self.name!r}, dim={self.dim}, |shift|={self.w1:.6g}, std={self.std})"


class EmpiricalProblem:
    r"""The uniform measures on two finite point clouds: ``P`` on the rows of ``x_p``, ``Q`` on ``x_q``.

    Both distributions are discrete, so the dual estimate of a critic is exact on the atoms
    (:func:`lipsort.wasserstein.exact_dual_estimate`), and :attr:`w1` is the exact optimal
    transport value of the two clouds (:func:`lipsort.wasserstein.exact_w1`, POT's network
    simplex, computed once). Training samples with replacement from the clouds, so what a
    critic is trained and evaluated on is exactly the measure whose :math:`W_1` is known: a
    check of the estimator against an independent solver. Images are flattened first.

    Args:
        x_p, x_q: ``(N, d)`` and ``(M, d)`` finite floating-point tensors (stored in float64).
        name: a label for tables and plots.

    Example:
        >>> pb = EmpiricalProblem(torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0]]))
        >>> pb.w1, pb.dim, pb.atoms_p()[1].tolist()
        (1.0, 1, [0.5, 0.5])
    """

    is_discrete = True

    def __init__(self, x_p: Tensor, x_q: Tensor, name: str = "empirical"):
        clouds = []
        for x, label in ((x_p, "x_p"), (x_q, "x_q")):
            if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 2 or x.shape[0] < 1:
                raise ValueError(f"{label} must be a floating-point tensor of shape (N, d) with N >= 1")
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"{label} must be finite")
            clouds.append(x.detach().to(device="cpu", dtype=torch.float64))
        if clouds[0].shape[1] != clouds[1].shape[1]:
            raise ValueError(f"x_p and x_q must have the same dimension, got {clouds[0].shape[1]} and {clouds[1].shape[1]}")
        self.x_p, self.x_q = clouds
        self.name = str(name)
        self._w1: float | None = None

    @property
    def w1(self) -> float:
        """Exact :math:`W_1` of the two uniform empirical measures (POT, computed once)."""
        if self._w1 is None:
            from .estimates import exact_w1

            self._w1 = exact_w1(self.x_p, self.x_q)
        return self._w1

    @property
    def dim(self) -> int:
        """Dimension of the points."""
        return int(self.x_p.shape[1])

    def _draw(self, x: Tensor, n: int, generator, dtype, device) -> Tensor:
        idx = torch.randint(x.shape[0], (check_int(n, "n"),), generator=generator)
        return x[idx].to(dtype=dtype, device=device)

    def sample_p(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32, device=None) -> Tensor:
        """``n`` rows of ``x_p`` drawn uniformly with replacement."""
        return self._draw(self.x_p, n, generator, dtype, device)

    def sample_q(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32, device=None) -> Tensor:
        """``n`` rows of ``x_q`` drawn uniformly with replacement."""
        return self._draw(self.x_q, n, generator, dtype, device)

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32, device=None) -> tuple[Tensor, Tensor]:
        """``(x_p, x_q)``: ``n`` draws from each cloud."""
        return self.sample_p(n, generator, dtype, device), self.sample_q(n, generator, dtype, device)

    def atoms_p(self, dtype=torch.float64, device=None) -> tuple[Tensor, Tensor]:
        """The rows of ``x_p`` and their equal weights."""
        n = self.x_p.shape[0]
        return self.x_p.to(dtype=dtype, device=device), torch.full((n,), 1.0 / n, dtype=dtype, device=device)

    def atoms_q(self, dtype=torch.float64, device=None) -> tuple[Tensor, Tensor]:
        """The rows of ``x_q`` and their equal weights."""
        n = self.x_q.shape[0]
        return self.x_q.to(dtype=dtype, device=device), torch.full((n,), 1.0 / n, dtype=dtype, device=device)

    def __repr__(self) -> str:
        return f"EmpiricalProblem(name={self.name!r}, n_p={self.x_p.shape[0]}, n_q={self.x_q.shape[0]}, dim={self.dim})"


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
