"""The estimator against truths that do not come from the paper (chapter 04): translates, exact OT, held-out CIs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lipsort.models import mlp
from lipsort.wasserstein import (
    EmpiricalProblem,
    TranslateProblem,
    dual_estimate,
    exact_dual_estimate,
    exact_w1,
    fit_critic,
    heldout_estimate,
    high_dim_cone,
    three_cones,
)

D = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_critic(dim: int, activation: str, constraint: str | None, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    gs = 4 if activation == "groupsort" else None
    return mlp([dim, 16, 16, 1], activation=activation, constraint=constraint, group_size=gs).to(D).eval()


# ----------------------------------------------------------------------------- exact OT


def test_exact_w1_matches_the_one_dimensional_closed_form():
    # In 1-D with equal sizes, W1 of two uniform clouds is the mean gap of the sorted points.
    x_p = torch.randn(200, 1, generator=gen(0), dtype=D) * 2 + 1
    x_q = torch.rand(200, 1, generator=gen(1), dtype=D)
    closed = float((x_p.sort(0).values - x_q.sort(0).values).abs().mean())
    assert exact_w1(x_p, x_q) == pytest.approx(closed, rel=1e-10, abs=1e-12)


def test_exact_w1_with_weights_and_images():
    x_p = torch.tensor([[0.0], [4.0]], dtype=D)
    x_q = torch.tensor([[1.0]], dtype=D)
    # Mass 3/4 at 0 and 1/4 at 4, all moved to 1: 3/4 * 1 + 1/4 * 3.
    assert exact_w1(x_p, x_q, torch.tensor([0.75, 0.25], dtype=D)) == pytest.approx(1.5, abs=1e-12)
    imgs = torch.rand(6, 1, 3, 3, generator=gen(2), dtype=D)
    assert exact_w1(imgs, imgs + 0.5) == pytest.approx(0.5 * 3, rel=1e-10)  # shift 0.5 in 9 pixels


def test_translate_truth_is_exact_on_coupled_samples():
    pb = TranslateProblem([0.3, -1.2, 2.0], centers=[[0.0, 0.0, 0.0], [3.0, 1.0, -2.0]], std=0.7)
    assert pb.w1 == pytest.approx(math.sqrt(0.09 + 1.44 + 4.0), rel=1e-15)
    x_p, x_q = pb.sample_pairs(300, gen(0), D)
    # The clouds {x + s} and {x}: the identity coupling costs |s|, the linear critic gains |s|.
    assert exact_w1(x_p, x_q) == pytest.approx(pb.w1, rel=1e-9)
    assert float(dual_estimate(pb.critic, x_p, x_q)) == pytest.approx(pb.w1, rel=1e-12)
    for seed in range(3):
        f = random_critic(3, "maxmin", "bjorck", seed)
        assert heldout_estimate(f, x_p, x_q, paired=True).value <= pb.w1 + 1e-9


def test_translate_independent_samples_have_the_right_laws():
    pb = TranslateProblem([2.0, 0.0], std=0.5)
    x_p, x_q = pb.sample(20000, gen(3), D)
    assert torch.allclose(x_p.mean(0) - x_q.mean(0), pb.shift, atol=0.03)
    assert torch.allclose(x_q.std(0), torch.full((2,), 0.5, dtype=D), atol=0.02)


def test_fit_critic_on_a_translate_converges_to_the_shift():
    pb = TranslateProblem([1.5, 0.5], centers=[[-2.0, 0.0], [2.0, 0.0]], std=0.5)
    r = fit_critic(pb, (16, 16), "groupsort", "bjorck", group_size=4, steps=150, progress=False)
    h = r.heldout(*pb.sample_pairs(1000, gen(9)), paired=True)
    assert h.value <= pb.w1 + 1e-5  # certified: a lower bound on every coupled sample
    assert h.value == pytest.approx(pb.w1, rel=0.02)


# ----------------------------------------------------------------------------- empirical problems


def test_empirical_problem_is_the_uniform_measure_on_its_clouds():
    x_p = torch.randn(50, 2, generator=gen(0), dtype=D)
    x_q = torch.randn(40, 2, generator=gen(1), dtype=D) + 1
    pb = EmpiricalProblem(x_p, x_q)
    assert pb.is_discrete and pb.dim == 2
    assert pb.w1 == pytest.approx(exact_w1(x_p, x_q), rel=1e-12)
    atoms, w = pb.atoms_q()
    assert torch.equal(atoms, x_q) and torch.allclose(w, torch.full((40,), 1 / 40, dtype=D))
    draws = pb.sample_p(500, gen(2), D)
    assert bool((draws[:, None] == x_p[None]).all(-1).any(1).all())  # only rows of x_p, exactly


@pytest.mark.parametrize("activation", ["relu", "maxmin", "groupsort"])
def test_trained_critics_never_exceed_exact_ot_on_the_same_atoms(activation):
    x_p = torch.randn(120, 2, generator=gen(0), dtype=D) * 0.5 + torch.tensor([2.0, 0.0], dtype=D)
    x_q = torch.randn(100, 2, generator=gen(1), dtype=D)
    pb = EmpiricalProblem(x_p, x_q)
    r = fit_critic(pb, (16, 16), activation, "spectral", group_size=4, steps=100, lr=0.02, dtype=D, progress=False)
    # The estimate is exact on the atoms; spectral normalization is not exactly 1-Lipschitz,
    # but the certified value is, and duality bounds it by the exact OT value.
    assert r.estimate == pytest.approx(exact_dual_estimate(r.critic, pb), rel=1e-12)
    assert r.certified <= pb.w1 + 1e-9
    assert r.certified > 0.5 * pb.w1  # the critic did learn (W1 here is about 2)


# ----------------------------------------------------------------------------- held-out estimates


def test_cone_pairs_bound_every_one_lipschitz_critic():
    for pb in (three_cones(), high_dim_cone(16)):
        x_p, x_q = pb.sample_pairs(400, gen(0), D)
        assert torch.allclose((x_p - x_q).norm(dim=1), torch.ones(400, dtype=D))
        assert torch.equal(torch.cdist(x_q, pb.centers).min(1).values, torch.zeros(400, dtype=D))
        assert float(dual_estimate(pb.critic, x_p, x_q)) == pytest.approx(1.0, abs=1e-12)
        for seed, act in enumerate(["relu", "maxmin", "groupsort"]):
            f = random_critic(pb.dim, act, "bjorck", seed)
            assert heldout_estimate(f, x_p, x_q, paired=True).value <= 1 + 1e-9
        assert torch.equal(pb.sample_pairs(5, gen(4))[0], pb.sample_pairs(5, gen(4))[0])


def test_heldout_divides_by_the_certified_bound_and_never_inflates():
    pb = three_cones()
    x_p, x_q = pb.sample_pairs(500, gen(1), D)
    for seed in range(4):  # unconstrained critics: L > 1, the raw estimate can exceed W1
        torch.manual_seed(seed)
        f = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 1)).to(D)
        with torch.no_grad():
            f[0].weight.mul_(5)
        h = heldout_estimate(f, x_p, x_q, paired=True)
        assert h.lipschitz > 1
        with torch.no_grad():
            raw = float(dual_estimate(f, x_p, x_q))
        assert h.value == pytest.approx(raw / h.lipschitz, rel=1e-12)
        assert h.value <= 1 + 1e-12
    half = heldout_estimate(lambda x: 0.5 * pb.critic(x), x_p, x_q, lipschitz=0.5, paired=True)
    assert half.value == pytest.approx(0.5, abs=1e-12)  # L < 1: never scaled up


def test_heldout_interval_is_a_confidence_interval():
    # Linear critic on independent samples of a translate: the population value is |s|;
    # a 95 % interval must cover it in about 95 % of repetitions.
    pb = TranslateProblem([1.0, 0.0], std=1.0)
    cover = []
    for rep in range(300):
        x_p, x_q = pb.sample(200, gen(rep), D)
        h = heldout_estimate(pb.critic, x_p, x_q, lipschitz=1.0)
        assert h.low < h.value < h.high
        cover.append(h.low <= pb.w1 <= h.high)
    rate = sum(cover) / len(cover)
    assert 0.90 <= rate <= 0.99  # binomial(300, 0.95) lies in this range with probability > 0.999
    x_p, x_q = pb.sample(200, gen(0), D)
    narrow = heldout_estimate(pb.critic, x_p, x_q, lipschitz=1.0, level=0.5)
    wide = heldout_estimate(pb.critic, x_p, x_q, lipschitz=1.0, level=0.99)
    assert wide.high - wide.low > narrow.high - narrow.low


def test_paired_standard_error_uses_the_differences():
    x_q = torch.randn(400, 2, generator=gen(0), dtype=D)
    x_p = x_q + torch.tensor([1.0, 0.0], dtype=D) + 0.1 * torch.randn(400, 2, generator=gen(1), dtype=D)
    f = lambda x: x[:, 0]  # noqa: E731
    paired = heldout_estimate(f, x_p, x_q, lipschitz=1.0, paired=True)
    unpaired = heldout_estimate(f, x_p, x_q, lipschitz=1.0)
    assert paired.value == pytest.approx(unpaired.value, rel=1e-12)
    d = f(x_p) - f(x_q)
    assert paired.stderr == pytest.approx(float(d.std() / 20), rel=1e-12)
    assert paired.stderr < 0.2 * unpaired.stderr


def test_heldout_bad_inputs_raise():
    x = torch.randn(10, 2, dtype=D)
    f = lambda x: x[:, 0]  # noqa: E731
    with pytest.raises(ValueError, match="lipschitz="):
        heldout_estimate(f, x, x)
    with pytest.raises(ValueError, match="positive finite"):
        heldout_estimate(f, x, x, lipschitz=float("inf"))
    with pytest.raises(ValueError, match="positive finite"):
        heldout_estimate(f, x, x, lipschitz=-1.0)
    with pytest.raises(ValueError, match="level"):
        heldout_estimate(f, x, x, lipschitz=1.0, level=1.0)
    with pytest.raises(ValueError, match="equal sizes"):
        heldout_estimate(f, x, x[:5], lipschitz=1.0, paired=True)
    with pytest.raises(ValueError, match="at least 2"):
        heldout_estimate(f, x[:1], x, lipschitz=1.0)


def test_problem_bad_inputs_raise():
    with pytest.raises(ValueError, match="non-zero"):
        TranslateProblem([0.0, 0.0])
    with pytest.raises(ValueError, match="centers"):
        TranslateProblem([1.0, 0.0], centers=[[0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="std"):
        TranslateProblem([1.0], std=0.0)
    with pytest.raises(ValueError, match="same dimension"):
        EmpiricalProblem(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="finite"):
        EmpiricalProblem(torch.full((3, 2), float("nan")), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="shape"):
        EmpiricalProblem(torch.zeros(3), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="trailing shape"):
        exact_w1(torch.zeros(3, 2), torch.zeros(3, 3))
