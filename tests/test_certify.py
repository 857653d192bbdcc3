"""Certificates, Lipschitz bounds and attacks: the certificate is never beaten by an attack."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal

from lipsort import FullSort, GroupSort, MaxMin
from lipsort.attacks import pgd
from lipsort.certify import (
    certified_accuracy,
    certified_radius,
    empirical_lipschitz,
    lipschitz_upper_bound,
    margins,
    register_lipschitz_bound,
)
from lipsort.losses import MarginLoss
from lipsort.parametrizations import bjorck_orthonormal

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- radius


def test_radius_formula_by_hand():
    logits = torch.tensor([[3.0, 1.0, 2.5], [0.0, 4.0, 1.0], [1.0, 1.0, 0.0]], dtype=D)
    y = torch.tensor([0, 1, 0])
    # margins: 3 - 2.5 = 0.5; 4 - 1 = 3; tie 1 - 1 = 0.
    assert torch.equal(margins(logits, y), torch.tensor([0.5, 3.0, 0.0], dtype=D))
    r2 = certified_radius(logits, y, lipschitz=2.0, norm="l2")
    torch.testing.assert_close(r2, torch.tensor([0.5, 3.0, 0.0], dtype=D) / (2 * math.sqrt(2)))
    rinf = certified_radius(logits, y, lipschitz=2.0, norm="linf")
    torch.testing.assert_close(rinf, torch.tensor([0.5, 3.0, 0.0], dtype=D) / 4)
    # A 0-dim tensor constant works like a float.
    torch.testing.assert_close(certified_radius(logits, y, torch.tensor(2.0, dtype=D)), r2)


def test_radius_binary_scores():
    f = torch.tensor([2.0, -1.0, 0.5, -3.0], dtype=D)
    for labels in (
        torch.tensor([1, 0, 0, 0]),
        torch.tensor([1, -1, -1, -1]),
        torch.tensor([[1.0], [0.0], [0.0], [0.0]]),
    ):
        for norm in ("l2", "linf"):
            r = certified_radius(f, labels, lipschitz=0.5, norm=norm)
            torch.testing.assert_close(r, torch.tensor([4.0, 2.0, -1.0, 6.0], dtype=D))
    torch.testing.assert_close(
        certified_radius(f[:, None], torch.tensor([1, 0, 0, 0])),
        torch.tensor([2.0, 1.0, -0.5, 3.0], dtype=D),
    )


def test_misclassified_radius_not_positive():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 7, generator=g, dtype=D)
    y = torch.randint(0, 7, (500,), generator=g)
    wrong = logits.argmax(1) != y
    assert wrong.any() and (~wrong).any()
    for norm in ("l2", "linf"):
        r = certified_radius(logits, y, 3.0, norm)
        assert bool((r[wrong] <= 0).all()) and bool((r[~wrong] > 0).all())


def test_certified_accuracy_monotone_and_clean_at_zero():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(400, 5, generator=g, dtype=D)
    y = torch.randint(0, 5, (400,), generator=g)
    clean = (logits.argmax(1) == y).double().mean().item()
    eps = torch.linspace(0, 2, 41, dtype=D)
    for norm in ("l2", "linf"):
        acc = certified_accuracy(logits, y, eps, lipschitz=0.7, norm=norm)
        assert isinstance(acc, torch.Tensor) and acc.shape == (41,)
        assert bool((acc[1:] <= acc[:-1]).all())
        assert acc[0].item() == pytest.approx(clean)
        assert acc[-1].item() < acc[0].item()
        a0 = certified_accuracy(logits, y, 0.0, lipschitz=0.7, norm=norm)
        assert isinstance(a0, float) and a0 == pytest.approx(clean)
        assert certified_accuracy(logits, y, [0.0, 0.3], 0.7, norm)[1].item() == pytest.approx(
            certified_accuracy(logits, y, 0.3, 0.7, norm)
        )


def test_certified_accuracy_is_strict():
    logits, y = torch.tensor([[math.sqrt(2.0), 0.0]], dtype=D), torch.tensor([0])
    r = certified_radius(logits, y).item()
    assert certified_accuracy(logits, y, r) == 0.0
    assert certified_accuracy(logits, y, r * (1 - 1e-9)) == 1.0


@pytest.mark.parametrize(
    "call, exc",
    [
        (lambda: certified_radius(torch.zeros(3, 4), torch.tensor([0, 1, 4])), ValueError),
        (lambda: certified_radius(torch.zeros(3, 4), torch.tensor([0.0, 1.0, 2.0])), TypeError),
        (lambda: certified_radius(torch.zeros(3, 4), torch.tensor([0, 1])), ValueError),
        (lambda: certified_radius(torch.zeros(3), torch.tensor([0, 2, 1])), ValueError),
        (
            lambda: certified_radius(torch.zeros(3, 4), torch.tensor([0, 1, 2]), lipschitz=0.0),
            ValueError,
        ),
        (
            lambda: certified_radius(torch.zeros(3, 4), torch.tensor([0, 1, 2]), norm="l1"),
            ValueError,
        ),
        (lambda: certified_accuracy(torch.zeros(3, 4), torch.tensor([0, 1, 2]), -0.1), ValueError),
        (
            lambda: certified_radius(torch.zeros(3, 4, dtype=torch.long), torch.tensor([0, 1, 2])),
            TypeError,
        ),
    ],
)
def test_bad_inputs_raise(call, exc):
    with pytest.raises(exc):
        call()


# ----------------------------------------------------------------------- upper bounds


def _plain_mlp(sizes, act=nn.ReLU, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(D)


def test_upper_bound_exact_for_single_linear():
    torch.manual_seed(0)
    lin = nn.Linear(7, 5).to(D)
    sigma = torch.linalg.svdvals(lin.weight.detach())[0]
    b2 = lipschitz_upper_bound(lin)
    assert b2.dtype == torch.float64 and b2.dim() == 0
    assert b2.item() == pytest.approx(sigma.item(), rel=1e-12)
    binf = lipschitz_upper_bound(lin, "linf")
    assert binf.item() == pytest.approx(lin.weight.detach().abs().sum(1).max().item(), rel=1e-12)
    # The bound is attained: the Jacobian of a linear map is its weight.
    x = torch.randn(3, 7, dtype=D)
    jac = torch.autograd.functional.jacobian(lambda v: lin(v), x[0])
    assert torch.linalg.matrix_norm(jac, 2).item() == pytest.approx(b2.item(), rel=1e-12)


@pytest.mark.parametrize(
    "act", [nn.ReLU, MaxMin, nn.Tanh, lambda: nn.LeakyReLU(0.2), lambda: GroupSort(4), FullSort]
)
def test_upper_bound_dominates_jacobian_norms(act):
    for seed in range(3):
        net = _plain_mlp([6, 16, 16, 4], act=act, seed=seed)
        l2 = lipschitz_upper_bound(net, "l2").item()
        linf = lipschitz_upper_bound(net, "linf").item()
        x = torch.randn(20, 6, dtype=D)
        for xi in x:
            jac = torch.autograd.functional.jacobian(lambda v, net=net: net(v[None])[0], xi)
            assert torch.linalg.matrix_norm(jac, 2).item() <= l2 * (1 + 1e-12)
            assert jac.abs().sum(1).max().item() <= linf * (1 + 1e-12)


def test_upper_bound_layer_constants_and_nesting():
    torch.manual_seed(0)
    lin = nn.Linear(4, 4).to(D)
    s = lipschitz_upper_bound(lin).item()
    net = nn.Sequential(
        nn.Flatten(),
        nn.Sequential(lin, nn.LeakyReLU(3.0)),
        nn.Dropout(0.5),
        nn.Identity(),
        nn.Sigmoid(),
        MaxMin(),
    )
    assert lipschitz_upper_bound(net).item() == pytest.approx(s * 3.0 * 0.25, rel=1e-12)
    assert lipschitz_upper_bound(nn.Sequential(nn.LeakyReLU(0.1), nn.Tanh())).item() == 1.0
    assert lipschitz_upper_bound(nn.Sequential()).item() == 1.0


def test_upper_bound_uses_effective_parametrized_weight():
    torch.manual_seed(0)
    lin = orthogonal(nn.Linear(8, 8).to(D))
    with torch.no_grad():
        lin.parametrizations.weight.original.mul_(5.0)
    assert lipschitz_upper_bound(lin).item() == pytest.approx(1.0, abs=1e-12)

    sn = torch.nn.utils.parametrizations.spectral_norm(nn.Linear(8, 3).to(D), n_power_iterations=50)
    sn.train()
    sn(torch.randn(2, 8, dtype=D))
    sn.eval()
    exact = torch.linalg.svdvals(sn.weight.detach())[0].item()
    assert lipschitz_upper_bound(nn.Sequential(sn, nn.ReLU())).item() == pytest.approx(
        exact, rel=1e-12
    )


@pytest.mark.parametrize("layer", [nn.Conv2d(1, 1, 3), nn.BatchNorm1d(4), nn.Softplus()])
def test_upper_bound_rejects_unknown_layers(layer):
    net = nn.Sequential(nn.Linear(4, 4), nn.Sequential(layer))
    with pytest.raises(TypeError, match=type(layer).__name__):
        lipschitz_upper_bound(net)


def test_upper_bound_does_not_match_subclasses_silently():
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(TypeError, match="Doubled"):
        lipschitz_upper_bound(nn.Sequential(Doubled(3, 3)))


def test_register_lipschitz_bound():
    class Scale(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c = c

        def forward(self, x):
            return self.c * x

    register_lipschitz_bound(Scale, lambda m, norm: abs(m.c))
    net = nn.Sequential(Scale(-3.0), nn.ReLU(), Scale(0.5))
    assert lipschitz_upper_bound(net, "linf").item() == 1.5
    with pytest.raises(TypeError):
        register_lipschitz_bound(int, lambda m, n: 1.0)
    register_lipschitz_bound(Scale, lambda m, norm: -1.0)
    with pytest.raises(ValueError, match="Scale"):
        lipschitz_upper_bound(net)


# ----------------------------------------------------------------------- lower bounds


def test_empirical_lipschitz_of_linear_map_by_hand():
    w = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0], [2.0, 2.0, 2.0]], dtype=D)
    lin = nn.Linear(3, 3, bias=False).to(D)
    with torch.no_grad():
        lin.weight.copy_(w)
    x = torch.randn(5, 3, dtype=D)
    pairs = [w[i] - w[j] for i in range(3) for j in range(i + 1, 3)]
    l2 = max(p.norm().item() for p in pairs) / math.sqrt(2)
    l1 = max(p.abs().sum().item() for p in pairs) / 2
    assert empirical_lipschitz(lin, x, "l2").item() == pytest.approx(l2, rel=1e-12)
    assert empirical_lipschitz(lin, x, "linf").item() == pytest.approx(l1, rel=1e-12)
    single = nn.Linear(3, 1, bias=False).to(D)
    with torch.no_grad():
        single.weight.copy_(w[:1])
    assert empirical_lipschitz(single, x, "l2").item() == pytest.approx(math.sqrt(5), rel=1e-12)
    assert empirical_lipschitz(single, x, "linf").item() == pytest.approx(3.0, rel=1e-12)


def test_empirical_lipschitz_leaves_parameters_alone():
    net = _plain_mlp([3, 8, 2])
    before = [p.detach().clone() for p in net.parameters()]
    empirical_lipschitz(net, torch.randn(7, 3, dtype=D), chunk_size=3)
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("out", [1, 2, 5])
def test_upper_bound_dominates_empirical(norm, out):
    for seed, act in enumerate([nn.ReLU, MaxMin, nn.Tanh]):
        net = _plain_mlp([4, 12, 12, out], act=act, seed=seed)
        x = 3 * torch.randn(300, 4, dtype=D)
        lo = empirical_lipschitz(net, x, norm).item()
        hi = lipschitz_upper_bound(net, norm).item()
        assert 0 < lo <= hi * (1 + 1e-12)


# ----------------------------------------------------------------------------- attacks


def test_pgd_stays_in_ball_and_box_and_keeps_model_state():
    net = _plain_mlp([5, 16, 3], seed=3).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x = 0.2 + 0.6 * torch.rand(64, 5, generator=g, dtype=D)
    y = torch.randint(0, 3, (64,), generator=g)
    eps = 0.05 + 0.3 * torch.rand(64, generator=g, dtype=D)
    for norm in ("l2", "linf"):
        for loss in ("margin", "ce"):
            xa = pgd(net, x, y, eps, norm=norm, steps=30, loss=loss, clamp=(0.0, 1.0), generator=g)
            d = (xa - x).norm(dim=1) if norm == "l2" else (xa - x).abs().amax(1)
            assert bool((d <= eps).all())
            assert xa.min() >= 0.0 and xa.max() <= 1.0
            assert not xa.requires_grad
            with torch.no_grad():
                # The best iterate is never worse than the clean input.
                assert bool((margins(net(xa), y) <= margins(net(x), y)).all())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())


def test_pgd_zero_eps_returns_input_and_bad_args_raise():
    net = _plain_mlp([2, 4, 2]).eval()
    x, y = torch.randn(3, 2, dtype=D), torch.tensor([0, 1, 0])
    assert torch.equal(pgd(net, x, y, 0.0, steps=5), x)
    with pytest.raises(ValueError):
        pgd(net, x, y, 0.1, norm="l1")
    with pytest.raises(ValueError):
        pgd(net, x, y, torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError):
        pgd(net, x, y, -0.1)
    with pytest.raises(ValueError):
        pgd(net, x, y, 0.1, loss="hinge")


# --------------------------------------------------- the guarantee: no attack beats it


def _moons(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved half circles with noise 0.1, rescaled into [0.2, 0.8]²."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g, dtype=D) * math.pi
    y = torch.arange(n) % 2
    upper = torch.stack([torch.cos(t), torch.sin(t)], 1)
    lower = torch.stack([1 - torch.cos(t), 0.5 - torch.sin(t)], 1)
    x = torch.where(y[:, None] == 0, upper, lower) + 0.1 * torch.randn(n, 2, generator=g, dtype=D)
    return 0.2 + 0.2 * (x - torch.tensor([-1.0, -0.5], dtype=D)), y


def _train(net: nn.Module, loss_fn, x, y, steps: int = 300, lr: float = 0.01) -> nn.Module:
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        opt.step()
    return net.eval()


def _variants():
    return ["relu", "orthogonal", "bjorck"]


@pytest.fixture(scope="module")
def moons():
    return _moons(160, seed=0)


@pytest.fixture(scope="module")
def trained(moons):
    """Small classifiers of the two moons, trained once for the module."""
    x, y = moons
    nets = {}
    torch.manual_seed(0)
    relu = nn.Sequential(
        nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2)
    ).to(D)
    nets["relu"] = _train(relu, nn.CrossEntropyLoss(), x, y)
    for name, constrain in [("orthogonal", orthogonal), ("bjorck", bjorck_orthonormal)]:
        torch.manual_seed(0)
        net = nn.Sequential(
            constrain(nn.Linear(2, 32)), MaxMin(), constrain(nn.Linear(32, 32)), MaxMin(), constrain(nn.Linear(32, 2))
        ).to(D)
        nets[name] = _train(net, MarginLoss(0.1), x, y)
    return nets


def _certified(net, x, y, norm):
    with torch.no_grad():
        logits = net(x)
    lip = lipschitz_upper_bound(net, norm)
    r = certified_radius(logits, y, lip, norm)
    keep = r > 0
    return x[keep], y[keep], r[keep], margins(logits[keep], y[keep])


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("variant", _variants())
def test_pgd_never_beats_the_certificate(trained, moons, variant, norm):
    net = trained[variant]
    x, y = moons
    xs, ys, r, m = _certified(net, x, y, norm)
    assert len(ys) >= 0.85 * len(y)  # the nets do learn the moons
    eps = 0.99 * r
    worst = m.clone()
    g = torch.Generator().manual_seed(1)
    for loss, steps in (("margin", 300), ("ce", 100)):
        with parametrize.cached():  # the weights are fixed during an attack
            xa = pgd(net, xs, ys, eps, norm=norm, steps=steps, loss=loss, generator=g)
            with torch.no_grad():
                worst = torch.minimum(worst, margins(net(xa), ys))
        d = (xa - xs).norm(dim=1) if norm == "l2" else (xa - xs).abs().amax(1)
        assert bool((d <= eps).all())
    # The certificate: no prediction of a certified point changes within 0.99·radius ...
    assert bool((worst > 0).all()), f"{int((worst <= 0).sum())} certified points flipped"
    # ... and since the margin can only shrink by c·L·‖δ‖, at least 1% of it survives.
    assert bool((worst >= 0.01 * m * (1 - 1e-9)).all())
    used = (m - worst) / (0.99 * m)  # fraction of the certified margin budget the attack spent
    print(
        f"\n{variant} {norm}: certified {len(ys)}/{len(y)}, min margin after attack / clean margin "
        f"{(worst / m).min().item():.4f}, max budget used {used.max().item():.4f}"
    )
    if variant != "relu" and norm == "l2":
        # Orthonormal MaxMin nets are tight in ℓ2: the attack gets close to the bound, so a
        # wrong constant (e.g. a missing √2) would have been caught.
        assert used.max().item() > 0.9


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("variant", _variants())
def test_independent_attack_never_beats_the_certificate(trained, moons, variant, norm):
    torchattacks = pytest.importorskip("torchattacks")
    net = trained[variant]
    x, y = moons
    xs, ys, r, _ = _certified(net, x, y, norm)
    image_net = nn.Sequential(
        nn.Flatten(), net
    ).eval()  # torchattacks expects (N, C, H, W) in [0, 1]
    order = torch.argsort(r)
    torch.manual_seed(2)
    for idx in order.chunk(4):  # one radius per group: just below the group's smallest radius
        eps = 0.99 * r[idx].min().item()
        cls = torchattacks.PGDL2 if norm == "l2" else torchattacks.PGD
        attack = cls(image_net, eps=eps, alpha=2.5 * eps / 100, steps=100, random_start=True)
        with parametrize.cached():
            xa = attack(xs[idx].reshape(-1, 1, 1, 2), ys[idx]).reshape(-1, 2)
            with torch.no_grad():
                assert bool((margins(net(xa), ys[idx]) > 0).all())


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_finds_adversarials_above_the_boundary_distance(trained, moons, norm):
    """PGD is not toothless: where an adversarial example exists, it finds one."""
    net = trained["relu"]
    x, y = moons
    xs, ys, r, _ = _certified(net, x, y, norm)
    xs, ys, r = xs[::3], ys[::3], r[::3]
    # Brute force in 2-D: the smallest radius on a grid, over 180 directions on the unit
    # sphere of the norm, where the prediction flips — an adversarial example exists there.
    theta = torch.arange(180, dtype=D) * (2 * math.pi / 180)
    dirs = torch.stack([torch.cos(theta), torch.sin(theta)], 1)
    if norm == "linf":
        dirs = dirs / dirs.abs().amax(1, keepdim=True)
    radii = torch.linspace(0, 0.5, 101, dtype=D)[1:]
    with torch.no_grad():
        pts = xs[:, None, None, :] + radii[None, :, None, None] * dirs[None, None, :, :]
        flipped = (
            net(pts.reshape(-1, 2)).argmax(1).reshape(len(xs), len(radii), len(dirs))
            != ys[:, None, None]
        )
    found = flipped.any(2)
    has = found.any(1)
    first = torch.where(found, radii[None, :], torch.full_like(found, math.inf, dtype=D)).amin(1)
    xs, ys, r, dist = xs[has], ys[has], r[has], first[has]
    assert len(ys) >= 20
    eps = 1.05 * dist
    success = torch.zeros_like(ys, dtype=torch.bool)
    g = torch.Generator().manual_seed(3)
    for random_start in (True, False):  # a random restart and the clean start
        xa = pgd(net, xs, ys, eps, norm=norm, steps=200, random_start=random_start, generator=g)
        with torch.no_grad():
            success |= margins(net(xa), ys) <= 0
    print(
        f"\nrelu {norm}: brute-force distance / certified radius: median "
        f"{(dist / r).median().item():.1f} (min {(dist / r).min().item():.1f}), "
        f"PGD success at 1.05×distance {success.double().mean().item():.3f}"
    )
    assert (dist / r).min().item() > 1.5  # well above the certified radius
    assert success.double().mean().item() >= 0.95
