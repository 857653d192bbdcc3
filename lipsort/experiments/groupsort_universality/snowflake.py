r"""Von Koch snowflakes and the exact signed distance to a union of polygons (chapter 02).

The signed distance function (SDF) of a closed set :math:`K` with boundary :math:`\partial K`,

.. math:: s(x) = \begin{cases} -\,d(x, \partial K) & x \in K \\
          \phantom{-}\,d(x, \partial K) & x \notin K \end{cases}

is 1-Lipschitz and its sign classifies every point: Béthune et al. (2022) use it to show that a
1-Lipschitz network can represent an arbitrarily complicated decision boundary, here two Von
Koch snowflakes. For pairwise disjoint simple polygons the boundary of the union is the union
of their edges, so :math:`d(x, \partial K)` is the smallest distance to an edge (exact, by
projection onto segments) and :math:`x \in K` is decided by the crossing number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..._checks import check_int

__all__ = [
    "koch_snowflake",
    "snowflake_area",
    "snowflake_perimeter",
    "polygon_area",
    "polygon_perimeter",
    "segment_distance",
    "inside_polygons",
    "signed_distance",
    "check_disjoint",
]

_CHUNK = 4096  # points per chunk: keeps the (points × edges) temporaries near 100 MB at most


def _check_polygon(p: Tensor, name: str = "polygon") -> Tensor:
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (n, 2), got {type(p).__name__}")
    if p.dim() != 2 or p.shape[1] != 2 or p.shape[0] < 3:
        raise ValueError(f"{name} must have shape (n, 2) with n >= 3 vertices, got {tuple(p.shape)}")
    if not p.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {p.dtype}")
    return p


def koch_snowflake(
    level: int,
    center: Sequence[float] = (0.0, 0.0),
    radius: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    r"""Vertices of the Von Koch snowflake of a given level, counter-clockwise.

    Level 0 is the equilateral triangle inscribed in the circle of ``radius`` around ``center``
    (side :math:`s = \sqrt3\,r`). Each level replaces every edge ``p → q`` by four edges of a
    third of its length, with an outward equilateral bump on the middle third, so level ``n``
    has :math:`3 \cdot 4^n` vertices, perimeter :math:`3s(4/3)^n` and area
    :math:`\tfrac{\sqrt3}{4}s^2\,(1 + \tfrac35(1 - (4/9)^n))`.

    Example:
        >>> koch_snowflake(2).shape
        torch.Size([48, 2])
        >>> round(float(polygon_area(koch_snowflake(3))) / float(snowflake_area(3)), 12)
        1.0
    """
    level = check_int(level, "level", 0)
    if not radius > 0:
        raise ValueError(f"radius must be positive, got {radius!r}")
    angles = torch.tensor([90.0, 210.0, 330.0], dtype=dtype) * (math.pi / 180)
    p = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1) * radius
    # Rotation by -60°: for a counter-clockwise polygon the exterior lies to the right of each edge.
    c, s = math.cos(-math.pi / 3), math.sin(-math.pi / 3)
    rot = torch.tensor([[c, -s], [s, c]], dtype=dtype)
    for _ in range(level):
        q = torch.roll(p, -1, dims=0)
        d = (q - p) / 3
        a = p + d
        b = p + 2 * d
        peak = a + d @ rot.T
        p = torch.stack([p, a, peak, b], dim=1).reshape(-1, 2)
    return p + torch.as_tensor(center, dtype=dtype)


def snowflake_area(level: int, radius: float = 1.0) -> float:
    r"""Closed-form area of :func:`koch_snowflake`: :math:`\tfrac{\sqrt3}{4}s^2(1 + \tfrac35(1 - (4/9)^n))`."""
    side = math.sqrt(3) * radius
    return math.sqrt(3) / 4 * side**2 * (1 + 0.6 * (1 - (4 / 9) ** level))


def snowflake_perimeter(level: int, radius: float = 1.0) -> float:
    r"""Closed-form perimeter of :func:`koch_snowflake`: :math:`3s(4/3)^n`."""
    return 3 * math.sqrt(3) * radius * (4 / 3) ** level


def polygon_area(p: Tensor) -> Tensor:
    """Signed area by the shoelace formula (positive for counter-clockwise vertices).

    Example:
        >>> float(polygon_area(torch.tensor([[0., 0.], [2., 0.], [2., 1.], [0., 1.]])))
        2.0
    """
    _check_polygon(p)
    q = torch.roll(p, -1, dims=0)
    return 0.5 * (p[:, 0] * q[:, 1] - q[:, 0] * p[:, 1]).sum()


def polygon_perimeter(p: Tensor) -> Tensor:
    """Sum of the edge lengths of a closed polygon."""
    _check_polygon(p)
    return (torch.roll(p, -1, dims=0) - p).norm(dim=1).sum()


def _edges(polygons: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    if isinstance(polygons, torch.Tensor):
        polygons = [polygons]
    if len(polygons) == 0:
        raise ValueError("need at least one polygon")
    starts, ends = [], []
    for k, p in enumerate(polygons):
        _check_polygon(p, f"polygons[{k}]")
        starts.append(p)
        ends.append(torch.roll(p, -1, dims=0))
    return torch.cat(starts), torch.cat(ends)


def segment_distance(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    r"""Euclidean distance from each point to each segment ``[a_k, b_k]``: shape ``(N, E)``.

    :math:`d = \|x - a - t(b - a)\|` with :math:`t = \operatorname{clamp}(\langle x-a, b-a\rangle
    / \|b-a\|^2, 0, 1)` (the projection onto the segment).

    Example:
        >>> segment_distance(torch.tensor([[0., 1.], [3., 0.]]), torch.tensor([[-1., 0.]]), torch.tensor([[1., 0.]]))
        tensor([[1.],
                [2.]])
    """
    d = b - a  # (E, 2)
    w = x[:, None, :] - a[None]  # (N, E, 2)
    len2 = (d * d).sum(-1).clamp_min(torch.finfo(x.dtype).tiny)
    t = ((w * d).sum(-1) / len2).clamp(0, 1)
    return (w - t[..., None] * d).norm(dim=-1)


def _min_distance(x: Tensor, a: Tensor, b: Tensor, candidates: int = 4) -> Tensor:
    """Distance from each point to the nearest segment, ``(N,)``.

    Ranking every edge with the exact formula costs several passes over ``(N, E, 2)`` tensors.
    Instead the squared distances are expanded into matrix products,
    ``‖x − a − t d‖² = ‖x‖² − 2⟨x, a⟩ + ‖a‖² − 2t(⟨x, d⟩ − ⟨a, d⟩) + t²‖d‖²``, which rank the
    edges up to a rounding error of about ``eps·‖x‖²`` (cancellation); the few best-ranked edges
    are then measured exactly by :func:`segment_distance` and the smallest is kept. An edge can
    be missed only if more than ``candidates`` edges are within that rounding error of the
    nearest one, and then their exact distances agree with it to ~1e-7 at worst.
    """
    d = b - a
    len2 = (d * d).sum(-1).clamp_min(torch.finfo(x.dtype).tiny)
    ad = (a * d).sum(-1)
    proj = x @ d.T - ad  # ⟨x − a, d⟩, (N, E)
    t = (proj / len2).clamp_(0, 1)
    sq = (x * x).sum(-1, keepdim=True) - 2 * (x @ a.T) + (a * a).sum(-1)
    sq = sq - t * (2 * proj - t * len2)
    k = min(candidates, a.shape[0])
    idx = sq.topk(k, dim=1, largest=False).indices  # (N, k)
    ak, dk = a[idx], d[idx]  # (N, k, 2)
    w = x[:, None] - ak
    tk = ((w * dk).sum(-1) / len2[idx]).clamp(0, 1)
    return (w - tk[..., None] * dk).norm(dim=-1).amin(1)


def _crossings(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Parity of the crossings of the ray ``{x + (t, 0), t > 0}`` with the edges: ``(N,)`` bool."""
    xa, ya, xb, yb = a[:, 0], a[:, 1], b[:, 0], b[:, 1]
    px, py = x[:, 0:1], x[:, 1:2]
    # Half-open rule (ya <= y < yb or yb <= y < ya): a vertex on the ray is counted once.
    straddle = (ya <= py) != (yb <= py)
    denom = torch.where(yb == ya, torch.ones_like(yb), yb - ya)
    x_cross = xa + (py - ya) * (xb - xa) / denom
    return ((straddle & (px < x_cross)).sum(1) % 2) == 1


def inside_polygons(x: Tensor, polygons: Sequence[Tensor]) -> Tensor:
    """Whether each point lies inside an odd number of the polygons (crossing number, even-odd
    rule): ``(N,)`` bool. For disjoint, non-nested polygons this is "inside any of them"; a
    polygon nested in another cuts a hole.

    Example:
        >>> sq = torch.tensor([[0., 0.], [1., 0.], [1., 1.], [0., 1.]])
        >>> inside_polygons(torch.tensor([[0.5, 0.5], [1.5, 0.5]]), [sq]).tolist()
        [True, False]
    """
    x = _check_points(x)
    out = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for k, p in enumerate([polygons] if isinstance(polygons, torch.Tensor) else polygons):
        _check_polygon(p, f"polygons[{k}]")
        p = p.to(x.dtype)
        a, b = p, torch.roll(p, -1, dims=0)
        for i in range(0, x.shape[0], _CHUNK):
            out[i : i + _CHUNK] ^= _crossings(x[i : i + _CHUNK], a, b)
    return out


def _check_points(x: Tensor) -> Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"points must be a torch.Tensor of shape (N, 2), got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(f"points must have shape (N, 2), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"points must be floating point, got dtype {x.dtype}")
    return x


def _orient(p, q, r):
    return (q[..., 0] - p[..., 0]) * (r[..., 1] - p[..., 1]) - (q[..., 1] - p[..., 1]) * (r[..., 0] - p[..., 0])


def check_disjoint(polygons: Sequence[Tensor], allow_nested: bool = False) -> None:
    """Raise ``ValueError`` unless the boundaries of the polygons are pairwise disjoint (no edge
    crossings or contacts) and, unless ``allow_nested``, none lies inside another: the
    conditions under which :func:`signed_distance` is exact (for nested polygons the set is
    the even-odd region, as in Béthune et al.'s scene).

    Example:
        >>> check_disjoint([koch_snowflake(1, (-1.2, 0)), koch_snowflake(1, (1.2, 0))])
        >>> check_disjoint([koch_snowflake(1), koch_snowflake(1, (0.5, 0))])
        Traceback (most recent call last):
        ...
        ValueError: polygons 0 and 1 intersect: their closures are not disjoint, so the signed distance of the union would not be the distance to their edges
    """
    polygons = [polygons] if isinstance(polygons, torch.Tensor) else list(polygons)
    for i in range(len(polygons)):
        for j in range(i + 1, len(polygons)):
            p, q = polygons[i], polygons[j].to(polygons[i].dtype)
            a, b = p[:, None], torch.roll(p, -1, 0)[:, None]
            c, d = q[None], torch.roll(q, -1, 0)[None]
            # Closed segments meet iff they cross properly (strict orientation changes on both
            # sides) or an endpoint of one lies on the other (point-to-segment distance 0).
            d1, d2 = _orient(a, b, c), _orient(a, b, d)
            d3, d4 = _orient(c, d, a), _orient(c, d, b)
            proper = bool(((d1 * d2 < 0) & (d3 * d4 < 0)).any())
            contact = bool(
                segment_distance(q, p, torch.roll(p, -1, 0)).amin() <= 0
                or segment_distance(p, q, torch.roll(q, -1, 0)).amin() <= 0
            )
            touching = proper or contact
            nested = not allow_nested and bool(
                inside_polygons(q[:1], [p]).any() or inside_polygons(p[:1], [q]).any()
            )
            if touching or nested:
                raise ValueError(
                    f"polygons {i} and {j} intersect: their closures are not disjoint, so the signed "
                    "distance of the union would not be the distance to their edges"
                )


def signed_distance(x: Tensor, polygons: Sequence[Tensor], check: bool = True) -> Tensor:
    r"""Exact signed distance from points to the region bounded by disjoint simple polygons
    (even-odd rule: the union when none is nested).

    Negative inside, positive outside: :math:`s(x) = \pm \min_k d(x, [a_k, b_k])` over every edge
    of every polygon, the sign from the crossing number. 1-Lipschitz, computed in the dtype of
    ``x`` in chunks of points.

    Args:
        x: ``(N, 2)`` points.
        polygons: a list of ``(n_k, 2)`` vertex arrays (simple, pairwise disjoint; either
            orientation).
        check: verify the polygons are disjoint first (:func:`check_disjoint`).

    Example:
        >>> sq = torch.tensor([[-1., -1.], [1., -1.], [1., 1.], [-1., 1.]], dtype=torch.float64)
        >>> signed_distance(torch.tensor([[0., 0.], [0.5, 0.], [4., 5.]], dtype=torch.float64), [sq])
        tensor([-1.0000, -0.5000,  5.0000], dtype=torch.float64)
    """
    x = _check_points(x)
    polygons = [polygons] if isinstance(polygons, torch.Tensor) else list(polygons)
    polygons = [p.to(device=x.device, dtype=x.dtype) for p in polygons]
    if check:
        check_disjoint(polygons)
    a, b = _edges(polygons)
    dist = torch.cat([_min_distance(x[i : i + _CHUNK], a, b) for i in range(0, x.shape[0], _CHUNK)])
    return torch.where(inside_polygons(x, polygons), -dist, dist)
