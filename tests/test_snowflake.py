"""Von Koch snowflakes and the exact signed distance to a union of polygons (chapter 02)."""

import math

import pytest
import torch

from lipsort.experiments.groupsort_universality.snowflake import (
    check_disjoint,
    inside_polygons,
    koch_snowflake,
    polygon_area,
    polygon_perimeter,
    segment_distance,
    signed_distance,
    snowflake_area,
    snowflake_perimeter,
)

F64 = torch.float64


def two_flakes(level: int):
    return [koch_snowflake(level, (-1.1, 0.0), 1.0), koch_snowflake(level, (1.1, 0.3), 0.8)]


@pytest.mark.parametrize("level", range(6))
def test_snowflake_counts_area_perimeter(level):
    p = koch_snowflake(level, center=(0.3, -2.0), radius=1.7)
    assert p.shape == (3 * 4**level, 2)
    # Counter-clockwise (positive signed area) and matching the closed forms.
    assert float(polygon_area(p)) == pytest.approx(snowflake_area(level, 1.7), rel=1e-12)
    assert float(polygon_perimeter(p)) == pytest.approx(snowflake_perimeter(level, 1.7), rel=1e-12)
    # Every edge has the same length s / 3^n.
    edges = (torch.roll(p, -1, 0) - p).norm(dim=1)
    assert torch.allclose(edges, torch.full_like(edges, math.sqrt(3) * 1.7 / 3**level), rtol=1e-12)


def test_snowflake_is_simple():
    # Every vertex keeps a clear distance from the edges it does not belong to (the crossing
    # number and the edge distance assume a simple polygon).
    p = koch_snowflake(3)
    n = p.shape[0]
    a, b = p, torch.roll(p, -1, 0)
    d = segment_distance(p, a, b)  # vertex i to edge k
    idx = torch.arange(n)
    adjacent = (idx[:, None] == idx[None]) | (idx[:, None] == (idx[None] + 1) % n)
    assert float(d[~adjacent].min()) > 0.1 * math.sqrt(3) / 27


def test_square_closed_form():
    sq = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=F64)
    x = torch.rand(5000, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 8 - 4
    q = x.abs() - 1
    exact = q.clamp_min(0).norm(dim=1) + q.amax(1).clamp_max(0)
    assert torch.allclose(signed_distance(x, [sq]), exact, atol=1e-14)
    # Clockwise vertices give the same function.
    assert torch.allclose(signed_distance(x, [sq.flip(0)]), exact, atol=1e-14)


def test_sign_at_known_points():
    polys = two_flakes(4)
    pts = torch.tensor(
        [[-1.1, 0.0], [1.1, 0.3], [0.0, 0.15], [-1.1, 1.5], [5.0, 5.0], [-1.1, 0.99]], dtype=F64
    )
    inside = inside_polygons(pts, polys).tolist()
    assert inside == [True, True, False, False, False, True]
    s = signed_distance(pts, polys)
    assert (s[:2] < 0).all() and (s[2:5] > 0).all() and s[5] < 0
    # Level 1 is a hexagram: the centre's nearest boundary points are its six concave vertices,
    # at r/sqrt(3) (the feet of the perpendiculars, edge midpoints of the triangle, are gone).
    hexagram = signed_distance(torch.tensor([[0.0, 0.0]], dtype=F64), [koch_snowflake(1, radius=2.0)])
    assert float(hexagram) == pytest.approx(-2.0 / math.sqrt(3), rel=1e-12)
    # At any level the snowflake contains its level-0 triangle (inradius r/2) and keeps those
    # concave vertices, so the depth of the centre lies in [r/2, r/sqrt(3)].
    for depth, r in ((-float(s[0]), 1.0), (-float(s[1]), 0.8)):
        assert r / 2 <= depth <= r / math.sqrt(3) + 1e-12
    # A vertex is on the boundary.
    assert float(signed_distance(polys[0][5:6], polys).abs()) == 0.0


def test_matches_brute_force():
    polys = two_flakes(3)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(400, 2, generator=gen, dtype=F64) * torch.tensor([5.0, 3.0], dtype=F64) - torch.tensor([2.5, 1.5], dtype=F64)
    s = signed_distance(x, polys)
    # Brute force: densely sampled boundary points (spacing h) bound the distance within h/2.
    dense = []
    for p in polys:
        q = torch.roll(p, -1, 0)
        t = torch.linspace(0, 1, 101, dtype=F64)[:-1]
        dense.append((p[:, None] + t[None, :, None] * (q - p)[:, None]).reshape(-1, 2))
    dense = torch.cat(dense)
    h = max(math.sqrt(3) * r / 27 / 100 for r in (1.0, 0.8))
    brute = torch.cdist(x, dense).amin(1)
    assert (brute >= s.abs() - 1e-12).all() and (brute <= s.abs() + h / 2 + 1e-12).all()
    # Brute-force sign: winding number of each polygon around the point.
    wind = torch.zeros(x.shape[0], dtype=F64)
    for p in polys:
        v = p[None] - x[:, None]
        w = torch.roll(v, -1, 1)
        ang = torch.atan2(v[..., 0] * w[..., 1] - v[..., 1] * w[..., 0], (v * w).sum(-1))
        wind += ang.sum(1) / (2 * math.pi)
    assert torch.equal(wind.round().abs() > 0.5, s < 0)


def test_one_lipschitz_on_random_pairs():
    polys = two_flakes(4)
    gen = torch.Generator().manual_seed(2)
    a = torch.rand(2000, 2, generator=gen, dtype=F64) * 5 - 2.5
    # Short and long displacements, many of them crossing the boundary.
    b = a + torch.randn(2000, 2, generator=gen, dtype=F64) * torch.where(torch.arange(2000) < 1000, 0.05, 1.0)[:, None]
    sa, sb = signed_distance(a, polys), signed_distance(b, polys)
    assert ((sa - sb).abs() <= (a - b).norm(dim=1) + 1e-12).all()
    assert ((sa < 0) != (sb < 0)).sum() > 50


def test_overlapping_polygons_rejected():
    with pytest.raises(ValueError, match="intersect"):
        signed_distance(torch.zeros(1, 2, dtype=F64), [koch_snowflake(2), koch_snowflake(2, (0.9, 0.0))])
    # One polygon inside another is not a disjoint union either.
    with pytest.raises(ValueError, match="intersect"):
        check_disjoint([koch_snowflake(2), koch_snowflake(2, radius=0.2)])


def test_bad_input():
    with pytest.raises(ValueError, match="non-negative integer"):
        koch_snowflake(-1)
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        signed_distance(torch.zeros(3, dtype=F64), [koch_snowflake(0)])
    with pytest.raises(ValueError, match=r"n >= 3 vertices"):
        signed_distance(torch.zeros(1, 2, dtype=F64), [torch.zeros(2, 2, dtype=F64)])
