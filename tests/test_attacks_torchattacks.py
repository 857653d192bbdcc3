"""torchattacks wrappers and the certificate check: attacks never beat a certificate on a
Lipschitz net, do beat an unconstrained one, and catch a wrong Lipschitz constant."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lipsort.attacks import (
    A8_PGD_SEARCH,
    A9_PGD,
    BCOP_PGD_MNIST,
    CertificateViolation,
    assert_no_attack_inside_certificate,
    fgsm,
    pgd,
    pgd_l2,
    pgd_linf,
    pgd_linf_search,
    vanishing_gradients,
)
from lipsort.certify import lipschitz_upper_bound
from lipsort.data import loader
from lipsort.losses import MarginLoss
from lipsort.models import mlp
from lipsort.optim import project_linf_
from lipsort.training import fit


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _clusters(n=192, d=8, seed=0):
    """Three well-separated clusters in [0, 1]^d."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[0.2] * d, [0.8] * d, [0.2] * (d // 2) + [0.8] * (d - d // 2)])
    y = torch.randint(0, 3, (n,), generator=g)
    x = (centers[y] + 0.05 * torch.randn(n, d, generator=g)).clamp(0, 1)
    return x, y


def _train(net, epochs=30, loss=None, after_step=None):
    x, y = _clusters()
    torch.manual_seed(0)
    fit(
        net,
        lambda p: torch.optim.Adam(p, lr=1e-2),
        loss or nn.CrossEntropyLoss(),
        loader((x, y), 32),
        epochs,
        after_step=after_step,
        progress=False,
    )
    return net.eval()


@pytest.fixture(scope="module")
def bjorck_net():
    torch.manual_seed(1)
    net = mlp([8, 32, 32, 3], activation="maxmin", constraint="bjorck")
    return _train(net, epochs=15, loss=MarginLoss(0.5))


@pytest.fixture(scope="module")
def linf_net():
    torch.manual_seed(2)
    net = mlp([8, 32, 32, 3], activation="maxmin", constraint=None)
    project_linf_(net)
    return _train(net, loss=MarginLoss(0.5), after_step=project_linf_)


@pytest.fixture(scope="module")
def relu_net():
    torch.manual_seed(3)
    return _train(mlp([8, 64, 64, 3], activation="relu", constraint=None))


def _test_points():
    return _clusters(n=96, seed=7)


@pytest.mark.parametrize(("norm", "net_name"), [("l2", "bjorck_net"), ("linf", "linf_net")])
def test_no_attack_inside_the_certificate(norm, net_name, request):
    net = request.getfixturevalue(net_name)
    x, y = _test_points()
    grid = [0.0, 0.05, 0.1, 0.2, 0.4]
    report = assert_no_attack_inside_certificate(net, x, y, norm=norm, eps=grid, steps=30)
    assert report["lipschitz"] == pytest.approx(float(lipschitz_upper_bound(net, norm)))
    cert, att = report["certified_acc"], report["attack_acc"]
    assert cert[0] > 0.9 and cert[1] > 0.5  # the certificates are not vacuous
    # certified ≤ robust ≤ attacked accuracy at every radius; both decrease with ε.
    assert all(c <= a for c, a in zip(cert, att))
    assert cert == sorted(cert, reverse=True) and att[0] == pytest.approx(cert[0])


def test_attacks_succeed_on_an_unconstrained_net(relu_net):
    x, y = _test_points()
    clean = float((relu_net(x).argmax(1) == y).float().mean())
    assert clean > 0.9
    for attack, eps in ((pgd_linf, 0.4), (fgsm, 0.4), (pgd_l2, 1.5)):
        torch.manual_seed(0)
        x_adv = (
            attack(relu_net, x, y, eps=eps)
            if attack is fgsm
            else attack(relu_net, x, y, eps=eps, steps=40, step_size=eps / 10)
        )
        acc = float((relu_net(x_adv).argmax(1) == y).float().mean())
        assert acc < 0.5 * clean, attack.__name__
    report = assert_no_attack_inside_certificate(relu_net, x, y, norm="linf", eps=[0.4], steps=30)
    assert report["attack_acc"][0] < 0.5 * clean


def test_a_wrong_constant_is_caught(linf_net):
    """Claim a constant only 2 times too small: the check finds 'certified' points it flips."""
    x, y = _test_points()
    lip = float(lipschitz_upper_bound(linf_net, "linf"))
    with pytest.raises(CertificateViolation, match="certified radius .* misclassified"):
        assert_no_attack_inside_certificate(linf_net, x, y, lipschitz=lip / 2, norm="linf")


def test_normalized_inputs():
    """A model fed (x − μ)/σ: attacked in pixel space, its constant is L/σ; forgetting the 1/σ
    (σ < 1 makes the true constant larger) is caught."""
    mu, sigma = 0.5, 0.25
    torch.manual_seed(4)
    net = mlp([8, 32, 3], activation="maxmin", constraint="bjorck")
    x, y = _clusters()
    fit(
        net,
        lambda p: torch.optim.Adam(p, lr=1e-2),
        MarginLoss(1.0),
        loader(((x - mu) / sigma, y), 32),
        20,
        progress=False,
    )
    net.eval()
    xt, yt = _test_points()
    report = assert_no_attack_inside_certificate(
        net, xt, yt, norm="l2", eps=[0.1], steps=20, normalization=(mu, sigma)
    )
    assert report["lipschitz"] == pytest.approx(float(lipschitz_upper_bound(net)) / sigma)
    with pytest.raises(CertificateViolation):
        assert_no_attack_inside_certificate(
            net,
            xt,
            yt,
            lipschitz=float(lipschitz_upper_bound(net)),
            norm="l2",
            normalization=(mu, sigma),
        )
    # Attacking with normalization=(μ, σ) is attacking the composed model.
    composed = nn.Sequential(_Normalize(mu, sigma), net)
    for attack in (pgd_linf, pgd_l2):
        torch.manual_seed(5)
        a = attack(net, xt, yt, eps=0.1, steps=5, normalization=(mu, sigma))
        torch.manual_seed(5)
        b = attack(composed, xt, yt, eps=0.1, steps=5)
        assert torch.equal(a, b)


class _Normalize(nn.Module):
    def __init__(self, mu, sigma):
        super().__init__()
        self.mu, self.sigma = mu, sigma

    def forward(self, x):
        return (x - self.mu) / self.sigma


def test_wrappers_stay_in_the_ball_and_keep_shapes():
    torch.manual_seed(6)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    x, y = torch.rand(10, 1, 4, 4, dtype=torch.float64), torch.randint(0, 4, (10,))
    net = net.to(torch.float64)
    for attack, norm, kwargs in (
        (pgd_linf, "linf", A9_PGD),
        (pgd_l2, "l2", {**BCOP_PGD_MNIST, "eps": 0.5, "steps": 20}),
        (fgsm, "linf", {"eps": 0.3}),
    ):
        x_adv = attack(net, x, y, **kwargs)
        assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
        d = (x_adv - x).flatten(1)
        size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
        assert bool((size <= kwargs["eps"] * (1 + 1e-12)).all()) and bool((size > 0).any())
        assert 0 <= float(x_adv.min()) and float(x_adv.max()) <= 1
    assert A9_PGD == {"eps": 0.3, "steps": 40, "step_size": 0.01}
    assert BCOP_PGD_MNIST == {"eps": 1.58, "steps": 200, "step_size": 0.01}
    # The library's own attack keeps working beside them.
    x2 = pgd(net, x, y, 0.1, norm="l2", steps=5)
    assert bool(((x2 - x).flatten(1).norm(dim=1) <= 0.1).all())


def test_bad_input_names_the_problem():
    net = nn.Linear(4, 3)
    x, y = torch.rand(5, 4), torch.randint(0, 3, (5,))
    for eps in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps must be a finite non-negative number"):
            pgd_linf(net, x, y, eps=eps)
        with pytest.raises(ValueError, match="eps must be a finite non-negative number"):
            assert_no_attack_inside_certificate(net, x, y, eps=[0.1, eps])
    with pytest.raises(ValueError, match=r"pixel inputs in \[0, 1\].*normalization"):
        pgd_l2(net, x * 3 - 1, y, eps=0.1)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        pgd_linf(net, x, y, steps=0)
    with pytest.raises(ValueError, match="integer class indices"):
        fgsm(net, x, y.float())
    with pytest.raises(TypeError, match=r"layer Sequential\.1 of type .*Softplus"):
        assert_no_attack_inside_certificate(nn.Sequential(nn.Linear(4, 3), nn.Softplus()), x, y)


@pytest.mark.parametrize("training", [True, False])
def test_torchattacks_wrappers_keep_the_models_mode(training):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).train(training)
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    for attack in (lambda: pgd_linf(net, x, y, eps=0.1, steps=2), lambda: fgsm(net, x, y, eps=0.1)):
        attack()
        assert all(m.training == training for m in net.modules())


# --------------------------------------------------------------------------- the ε search


def _search_one(net, x0, y, eps, steps, rel_step, k):
    """The authors' protocol for one input, written as foolbox 1.x runs it: ``_run_one`` at a
    radius, the exponential then the binary search; the closest error of all runs."""
    best = [float("inf")]

    def run(e):
        x = x0.clone()
        for _ in range(steps):
            x.requires_grad_(True)
            loss = nn.functional.cross_entropy(net(x[None]), y[None])
            (g,) = torch.autograd.grad(loss, x)
            with torch.no_grad():
                x = (x0 + (x + e * rel_step * g.sign() - x0).clamp(-e, e)).clamp(0, 1)
                if int(net(x[None]).argmax(1)) != int(y):
                    best[0] = min(best[0], float((x - x0).abs().max()))
                    return True
        return False

    if int(net(x0[None]).argmax(1)) != int(y):
        return 0.0
    for _ in range(k):
        if run(eps):
            break
        eps *= 1.5
    else:
        return best[0]
    good, bad = eps, 0.0
    for _ in range(k):
        mid = (good + bad) / 2
        good, bad = (mid, bad) if run(mid) else (good, mid)
    return best[0]


def test_search_follows_the_authors_protocol_sample_by_sample(relu_net):
    """The batched search gives, for every input, what the one-input loop of foolbox gives."""
    x, y = _test_points()
    x, y = x[:24], y[:24]
    y[:2] = (relu_net(x[:2]).argmax(1) + 1) % 3  # two inputs misclassified already
    x_adv, dist = pgd_linf_search(relu_net, x, y, eps=0.3, steps=8, search_steps=3)
    expected = [_search_one(relu_net, x[i], y[i], 0.3, 8, 0.01 / 0.3, 3) for i in range(len(x))]
    for d, e in zip(dist.tolist(), expected):
        assert d == pytest.approx(e, rel=1e-6, abs=1e-7) or d == e == float("inf")
    assert dist[:2].tolist() == [0.0, 0.0] and torch.equal(x_adv[:2], x[:2])
    found = torch.isfinite(dist) & (dist > 0)
    assert 4 <= int(found.sum()) < len(x) - 2  # some are found, some are not: both paths run
    # Each returned input is an error at the distance returned, inside the box.
    assert bool((relu_net(x_adv[found]).argmax(1) != y[found]).all())
    linf = (x_adv - x).abs().amax(1).double()
    assert torch.allclose(linf[found], dist[found]) and 0 <= float(x_adv.min()) <= float(x_adv.max()) <= 1
    assert A8_PGD_SEARCH == {"eps": 0.3, "steps": 20, "rel_step": 0.01 / 0.3, "search_steps": 5}


def test_search_distance_on_a_linear_model():
    """Two classes with logits (a·x + b, 0): sign steps against a cut the margin by α‖a‖₁ each,
    so the error closest to x lies at t = (a·x + b)/‖a‖₁. The search never finds one closer,
    and with 5 bisections and steps of ε/30 it finds one within about 6% of t."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, generator=g, dtype=torch.float64)
    net = nn.Linear(16, 2).double()
    with torch.no_grad():  # the boundary a·(x − ½) = 0 passes through the centre of the box
        net.weight.copy_(torch.stack([a, torch.zeros_like(a)]))
        net.bias.copy_(torch.tensor([-0.5 * float(a.sum()), 0.0]))
    x = 0.45 + 0.1 * torch.rand(64, 16, generator=g, dtype=torch.float64)
    t = 0.02 + 0.16 * torch.rand(64, generator=g, dtype=torch.float64)
    # Moved along sign(a) to the distance t; the attack then moves at most ~t back, inside the box.
    x += (t - (x - 0.5) @ a / a.abs().sum())[:, None] * a.sign()
    assert float(x.min()) >= 0.2 and float(x.max()) <= 0.8
    y = torch.zeros(64, dtype=torch.long)
    x_adv, dist = pgd_linf_search(net, x, y)
    assert bool(torch.isfinite(dist).all())
    assert bool((dist >= t * (1 - 1e-9)).all()), float((dist / t).min())
    assert bool((dist <= 1.06 * t + 1e-3).all()), float((dist / t).max())


def test_search_never_beats_the_certificate_and_catches_a_wrong_constant(linf_net):
    x, y = _test_points()
    grid = [0.0, 0.1, 0.2, 0.3]
    report = assert_no_attack_inside_certificate(linf_net, x, y, norm="linf", eps=grid, steps=10,
                                                 per_point_steps=0, search=A8_PGD_SEARCH)
    radius, dist = report["radius"], report["search_dist"]
    certified = radius > 0
    assert int(certified.sum()) > 80 and bool((dist[certified] >= radius[certified] * (1 - 1e-3)).all())
    assert all(c <= s for c, s in zip(report["certified_acc"], report["search_acc"]))
    assert report["search_acc"][0] == pytest.approx(report["certified_acc"][0])
    assert report["search_acc"][-1] < report["search_acc"][0]  # the search does find errors
    lip = float(lipschitz_upper_bound(linf_net, "linf"))
    with pytest.raises(CertificateViolation, match="ε search"):  # only the search attacks here
        assert_no_attack_inside_certificate(linf_net, x, y, lipschitz=lip / 2, norm="linf",
                                            per_point_steps=0, search=A8_PGD_SEARCH)
    with pytest.raises(ValueError, match="search is an ℓ∞ attack"):
        assert_no_attack_inside_certificate(linf_net, x, y, norm="l2", search=A8_PGD_SEARCH)


@pytest.mark.parametrize("training", [True, False])
def test_search_inputs_and_modes(training):
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).train(training)
    with torch.no_grad():  # constant logits: class 0 wins everywhere
        net[1].weight.zero_()
        net[1].bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    x, y = torch.rand(5, 1, 2, 2), torch.tensor([0, 0, 1, 0, 2])
    x_adv, dist = pgd_linf_search(net, x, y, steps=3, search_steps=2)
    assert dist.tolist() == [float("inf"), float("inf"), 0.0, float("inf"), 0.0]
    assert torch.equal(x_adv, x) and x_adv.shape == x.shape
    assert all(m.training == training for m in net.modules())
    for kwargs, message in (({"eps": 0.0}, "eps and rel_step must be positive"),
                            ({"rel_step": -1.0}, "rel_step must be a finite non-negative"),
                            ({"steps": 0}, "steps must be a positive integer"),
                            ({"search_steps": 0}, "steps must be a positive integer")):
        with pytest.raises(ValueError, match=message):
            pgd_linf_search(net, x, y, **kwargs)
    with pytest.raises(ValueError, match=r"pixel inputs in \[0, 1\]"):
        pgd_linf_search(net, x + 1, y)


def test_vanishing_gradients_blind_the_search_at_any_radius():
    """Logits (s(x₁ − ½), −s(x₁ − ½)) with s = 300: the gap 2s|x₁ − ½| passes float32's ~104
    at |x₁ − ½| ≈ 0.17. Beyond, the cross-entropy gradient is exactly zero and the search never
    moves, although the boundary is at most 0.4 away; below, it finds the boundary."""
    net = nn.Linear(2, 2)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[300.0, 0.0], [-300.0, 0.0]]))
        net.bias.copy_(torch.tensor([-150.0, 150.0]))
    x1 = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.55, 0.1, 0.2, 0.4])
    x, y = torch.stack([x1, torch.full_like(x1, 0.5)], 1), (x1 < 0.5).long()
    gap = 600 * (x1 - 0.5).abs()
    vanishing = vanishing_gradients(net, x, y)
    assert vanishing.tolist() == (gap > 110).tolist() and bool(vanishing.any() and not vanishing.all())
    _, dist = pgd_linf_search(net, x, y)
    assert bool(torch.isinf(dist[vanishing]).all())
    assert bool(torch.isfinite(dist[~vanishing]).all())
    assert bool((dist[~vanishing] >= (x1[~vanishing] - 0.5).abs().double()).all())
    # In float64 exp(−gap) no longer underflows at these gaps: every point is found.
    _, dist64 = pgd_linf_search(net.double(), x.double(), y)
    assert not bool(vanishing_gradients(net, x.double(), y).any()) and bool(torch.isfinite(dist64).all())


def test_search_tries_the_authors_radii_and_keeps_the_closest_error(monkeypatch):
    """The control flow alone, with each run replaced by a script: sample 0 is broken at radii
    of at least 0.2, at distance 0.2 in its first run and just inside the radius afterwards
    (so its last success is not its closest); sample 1 at radii of at least 0.5."""
    import lipsort.attacks.search as search

    tried = {0: [], 1: []}

    def scripted(g, x0, y, eps, alpha, steps):
        ids = x0[:, 0].long().tolist()  # the sample's id rides in its first pixel
        dist = []
        for i, r in zip(ids, eps.tolist()):
            tried[i].append(round(r, 6))  # the radius comes in the inputs' float32
            assert alpha.tolist()[len(dist)] == pytest.approx(r / 30)
            ok = r >= (0.2 if i == 0 else 0.5)
            dist.append((0.2 if len(tried[i]) == 1 else 0.99 * r) if ok else float("inf"))
        return x0.clone(), torch.tensor(dist, dtype=torch.float64)

    monkeypatch.setattr(search, "_first_errors", scripted)
    net = nn.Sequential(nn.Flatten(), nn.Linear(2, 2))
    with torch.no_grad():  # always class 0: every input is correct at first
        net[1].weight.zero_()
        net[1].bias.copy_(torch.tensor([1.0, 0.0]))
    x, y = torch.tensor([[0.0, 0.5], [1.0, 0.5]]), torch.tensor([0, 0])
    _, dist = pgd_linf_search(net, x, y)
    assert tried[0] == [0.3, 0.15, 0.225, 0.1875, 0.20625, 0.196875]
    assert tried[1][:3] == [0.3, 0.45, 0.675] and len(tried[1]) == 8  # grown twice, then bisected
    assert tried[1][3:] == [0.3375, 0.50625, 0.421875, 0.464063, 0.485156]
    assert dist[0] == 0.2  # the first success, not the last one (0.99 · 0.20625)
    assert dist[1] == pytest.approx(0.99 * 0.50625)
