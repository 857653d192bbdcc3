"""Synthetic transport problems: the documented W1 and optimal critic are right (chapter 01).

Ground truth is POT's exact optimal transport (``ot.emd2``) between samples.
"""

from __future__ import annotations

import math

import ot
import pytest
import torch

from lipsort.wasserstein.problems import (
    ConeProblem,
    absolute_value,
    high_dim_cone,
    problem,
    three_cones,
)

D = torch.float64


pytestmark = pytest.mark.usefixtures("two_threads")


def emd_w1(x_p: torch.Tensor, x_q: torch.Tensor) -> float:
    """Exact W1 between two uniform empirical measures (Euclidean ground cost)."""
    m = torch.cdist(x_p, x_q).numpy()
    a = torch.full((x_p.shape[0],), 1.0 / x_p.shape[0], dtype=D).numpy()
    b = torch.full((x_q.shape[0],), 1.0 / x_q.shape[0], dtype=D).numpy()
    return float(ot.emd2(a, b, m, numItermax=10_000_000))


def mismatch(pb: ConeProblem, x_p: torch.Tensor, x_q: torch.Tensor) -> float:
    """Mass that cannot stay within its own cluster: sum_k (n_pk - n_qk)_+ / n."""
    k = pb.centers.shape[0]
    cp = torch.bincount(torch.cdist(x_p, pb.centers).argmin(1), minlength=k)
    cq = torch.bincount(torch.cdist(x_q, pb.centers).argmin(1), minlength=k)
    return float((cp - cq).clamp_min(0).sum()) / x_p.shape[0]


def test_a1_atoms_and_exact_w1():
    pb = absolute_value()
    assert pb.w1 == 1.0 and pb.dim == 1 and pb.is_discrete
    (xp, wp), (xq, wq) = pb.atoms_p(), pb.atoms_q()
    assert xp.flatten().tolist() == [-1.0, 1.0] and wp.tolist() == [0.5, 0.5]
    assert xq.flatten().tolist() == [0.0] and wq.tolist() == [1.0]
    w1 = ot.emd2(wp.numpy(), wq.numpy(), torch.cdist(xp, xq).numpy())
    assert w1 == pytest.approx(1.0, abs=1e-12)
    # The documented optimal critic |x| attains it on the atoms.
    f = pb.critic
    assert float((f(xp) * wp).sum() - (f(xq) * wq).sum()) == pytest.approx(1.0, abs=1e-12)


def test_a1_samples_are_balanced_signs():
    pb = absolute_value()
    n = 4000
    x = pb.sample_p(n, generator=torch.Generator().manual_seed(0), dtype=D)
    assert set(x.flatten().tolist()) == {-1.0, 1.0}
    frac = float((x > 0).to(D).mean())
    assert abs(frac - 0.5) <= 4 * math.sqrt(0.25 / n)  # 4 standard deviations
    assert torch.equal(pb.sample_q(7, dtype=D), torch.zeros(7, 1, dtype=D))


@pytest.mark.parametrize(
    "pb, n",
    [(absolute_value(), 500), (three_cones(), 900), (high_dim_cone(128), 400), (ConeProblem([[0.0, 0.0], [5.0, 1.0]], 2.5), 700)],
    ids=["A1", "A2", "A3", "custom-radius"],
)
def test_sampled_w1_agrees_with_documented(pb, n):
    gen = torch.Generator().manual_seed(1)
    x_p, x_q = pb.sample(n, generator=gen, dtype=D)
    assert x_p.shape == (n, pb.dim) and x_q.shape == (n, pb.dim)
    emp = emd_w1(x_p, x_q)
    # Every point of P is at distance >= r from every center, so W1(P_n, Q_n) >= r exactly;
    # mass that must leave its cluster (unequal counts) travels at most the diameter of the
    # configuration further, so W1(P_n, Q_n) <= r + m * (diameter), m from the sample counts.
    diam = float(torch.cdist(pb.centers, pb.centers).max()) + 2 * pb.radius
    m = mismatch(pb, x_p, x_q)
    assert pb.w1 - 1e-9 <= emp <= pb.w1 + m * diam + 1e-9
    assert m <= 0.1  # the bound above is informative: the clusters are balanced up to noise
    # The optimal critic attains the documented W1 on the samples, exactly.
    est = float(pb.critic(x_p).mean() - pb.critic(x_q).mean())
    assert est == pytest.approx(pb.w1, abs=1e-12)


@pytest.mark.parametrize("pb", [absolute_value(), three_cones(), high_dim_cone(32)], ids=["A1", "A2", "A3"])
def test_optimal_critic_is_one_lipschitz(pb):
    gen = torch.Generator().manual_seed(2)
    # Points everywhere, not only on the supports: the critic must be 1-Lipschitz on R^d.
    x = 3 * torch.randn(2000, pb.dim, generator=gen, dtype=D)
    y = x + torch.randn(2000, pb.dim, generator=gen, dtype=D) * torch.rand(2000, 1, generator=gen, dtype=D)
    ratio = (pb.critic(x) - pb.critic(y)).abs() / (x - y).norm(dim=1)
    assert float(ratio.max()) <= 1 + 1e-12
    # ... and its slope is 1 almost everywhere (it is a distance function).
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(pb.critic(xr).sum(), xr)
    assert torch.allclose(g.norm(dim=1), torch.ones(2000, dtype=D), atol=1e-12)


def test_spheres_are_uniform_and_on_radius():
    n = 6000
    pb = three_cones()
    x = pb.sample_p(n, generator=torch.Generator().manual_seed(3), dtype=D)
    c = pb.centers[torch.cdist(x, pb.centers).argmin(1)]
    u = x - c
    assert torch.allclose(u.norm(dim=1), torch.ones(n, dtype=D), atol=1e-12)
    # Uniform angle: E[cos θ] = E[sin θ] = 0 and E[cos 2θ] = 0, each with std <= 1/sqrt(2n).
    theta = torch.atan2(u[:, 1], u[:, 0])
    for stat in (torch.cos(theta), torch.sin(theta), torch.cos(2 * theta)):
        assert abs(float(stat.mean())) <= 4 / math.sqrt(2 * n)
    # The three centers are equally likely.
    counts = torch.bincount(torch.cdist(x, pb.centers).argmin(1), minlength=3).to(D) / n
    assert float((counts - 1 / 3).abs().max()) <= 4 * math.sqrt(2 / 9 / n)
    # 128-D sphere: unit norms and a mean near the origin.
    hd = high_dim_cone(128)
    z = hd.sample_p(2000, generator=torch.Generator().manual_seed(4), dtype=D)
    assert torch.allclose(z.norm(dim=1), torch.ones(2000, dtype=D), atol=1e-12)
    assert float(z.mean(0).norm()) <= 4 / math.sqrt(2000)


def test_reproducible_dtype_device():
    pb = three_cones()
    a = pb.sample(50, generator=torch.Generator().manual_seed(5))
    b = pb.sample(50, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].dtype == torch.float32
    c = pb.sample_p(50, generator=torch.Generator().manual_seed(5), dtype=D, device="cpu")
    assert c.dtype == D and torch.allclose(c.float(), a[0])


def test_registry():
    assert problem("A1").w1 == 1.0
    assert problem("A2").centers.shape == (3, 2)
    assert problem("A3", dim=16).dim == 16
    assert problem("A3").dim == 128
    with pytest.raises(ValueError, match="unknown problem"):
        problem("A9")


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="at least 2\\*radius"):
        ConeProblem([[0.0], [1.0]], radius=1.0)
    with pytest.raises(ValueError, match="shape \\(K, d\\)"):
        ConeProblem([0.0, 1.0])
    with pytest.raises(ValueError, match="radius"):
        ConeProblem([[0.0]], radius=0.0)
    with pytest.raises(ValueError, match="radius"):
        ConeProblem([[0.0]], radius=float("nan"))
    with pytest.raises(ValueError, match="finite"):
        ConeProblem([[float("inf")]])
    pb = three_cones()
    for n in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            pb.sample_p(n)
    with pytest.raises(ValueError, match="no finite list of atoms"):
        pb.atoms_p()
    with pytest.raises(ValueError, match="shape \\(N, 2\\)"):
        pb.critic(torch.zeros(4, 3))
    with pytest.raises(TypeError, match="floating-point"):
        pb.critic(torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="dim"):
        high_dim_cone(0)
