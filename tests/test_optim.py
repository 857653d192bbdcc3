"""AggMo against its update rule written out by hand."""

from __future__ import annotations

import io

import pytest
import pytorch_optimizer
import torch

from lipsort.optim import AggMo

D = torch.float64


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(6, 4, generator=g, dtype=D)
    b = torch.randn(6, generator=g, dtype=D)
    w = torch.nn.Parameter(torch.randn(4, generator=g, dtype=D))
    m = torch.nn.Parameter(torch.randn(3, 4, generator=g, dtype=D))
    return a, b, [w, m]


def _loss(a, b, params):
    w, m = params
    return ((a @ w - b) ** 2).mean() + (m @ w).sin().sum() + (m**2).sum() / 10


def _reference(a, b, init, lr, betas, steps):
    """v_i ← β_i v_i + g;  θ ← θ − (lr / K) Σ_i v_i, with v_i = 0 at the start."""
    params = [p.detach().clone().requires_grad_(True) for p in init]
    velocities = [[torch.zeros_like(p) for _ in betas] for p in params]
    for _ in range(steps):
        grads = torch.autograd.grad(_loss(a, b, params), params)
        with torch.no_grad():
            for p, g, vs in zip(params, grads, velocities):
                for i, beta in enumerate(betas):
                    vs[i] = beta * vs[i] + g
                p -= lr / len(betas) * sum(vs)
    return [p.detach() for p in params]


def _run(opt_factory, a, b, params, steps):
    opt = opt_factory(params)
    for _ in range(steps):
        opt.zero_grad()
        _loss(a, b, params).backward()
        opt.step()
    return opt


def test_is_the_maintained_implementation():
    assert AggMo is pytorch_optimizer.AggMo


@pytest.mark.parametrize("betas", [(0.0, 0.9, 0.99), (0.5, 0.95), (0.0, 0.3, 0.6, 0.9, 0.999)])
@pytest.mark.parametrize("foreach", [None, False])
def test_matches_the_update_rule_by_hand(betas, foreach):
    a, b, params = _problem()
    expected = _reference(a, b, params, lr=0.05, betas=betas, steps=25)
    _run(
        lambda ps: AggMo(ps, lr=0.05, betas=betas, weight_decay=0.0, foreach=foreach),
        a,
        b,
        params,
        25,
    )
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-12)


def test_default_betas_are_the_papers():
    _, _, params = _problem()
    assert AggMo(params, lr=0.1).param_groups[0]["betas"] == (0.0, 0.9, 0.99)


def test_param_groups_use_their_own_settings():
    a, b, params = _problem(2)
    init = [p.detach().clone() for p in params]
    groups = [
        {"params": [params[0]], "lr": 0.03, "betas": (0.0, 0.9)},
        {"params": [params[1]], "lr": 0.01},
    ]
    _run(lambda ps: AggMo(groups, lr=0.01, betas=(0.0, 0.5, 0.99)), a, b, params, 10)
    # Reference with both rules applied to their own parameter (gradients couple them, so
    # replay the joint dynamics by hand).
    ps = [p.clone().requires_grad_(True) for p in init]
    settings = [(0.03, (0.0, 0.9)), (0.01, (0.0, 0.5, 0.99))]
    vel = [[torch.zeros_like(p) for _ in s[1]] for p, s in zip(ps, settings)]
    for _ in range(10):
        grads = torch.autograd.grad(_loss(a, b, ps), ps)
        with torch.no_grad():
            for p, g, vs, (lr, betas) in zip(ps, grads, vel, settings):
                for i, beta in enumerate(betas):
                    vs[i] = beta * vs[i] + g
                p -= lr / len(betas) * sum(vs)
    for p, e in zip(params, ps):
        torch.testing.assert_close(p.detach(), e.detach(), rtol=1e-12, atol=1e-12)


def test_state_dict_round_trip():
    a, b, params = _problem(3)
    opt = _run(lambda ps: AggMo(ps, lr=0.05), a, b, params, 7)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    # Continue the original run ...
    _run(lambda ps: opt, a, b, params, 5)
    # ... and a restored copy from the checkpoint.
    restored = [torch.nn.Parameter(p) for p in saved["params"]]
    opt2 = AggMo(restored, lr=0.05)
    opt2.load_state_dict(saved["opt"])
    state = opt2.state[restored[0]]["momentum_buffer"]
    assert set(state) == {0.0, 0.9, 0.99} and all(v.abs().sum() > 0 for v in state.values())
    _run(lambda ps: opt2, a, b, restored, 5)
    for p, q in zip(params, restored):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)


# --------------------------------------------------------------------------- Parseval retraction


def _authors_parseval(w: torch.Tensor) -> torch.Tensor:
    """cemanil/LNets per_update_proj of type l_2: bjorck_orthonormalize (order 1, β = 1/2, one
    iteration); project_weights' two transposes cancel, so it runs on W (out × in) itself, with
    the in × in Gram matrix."""
    w_t_w = w.t().mm(w)
    return (1 + 0.5) * w - 0.5 * w.mm(w_t_w)


@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (6, 6)])
def test_parseval_is_the_authors_step_and_maps_each_singular_value(shape):
    from torch import nn

    from lipsort.optim import parseval_

    torch.manual_seed(0)
    layer = nn.Linear(shape[1], shape[0]).double()
    with torch.no_grad():
        layer.weight.mul_(3)
    before = layer.weight.detach().clone()
    assert parseval_(nn.Sequential(layer, nn.ReLU())) == 1
    after = layer.weight.detach()
    torch.testing.assert_close(after, _authors_parseval(before), rtol=1e-13, atol=1e-13)
    # σ ↦ 1.5σ − 0.5σ³ on the same singular vectors: |f(σ)| ≤ 1 for σ ≤ 2, negative beyond √3.
    s = torch.linalg.svdvals(before)
    expected = (1.5 * s - 0.5 * s**3).abs().sort(descending=True).values
    torch.testing.assert_close(torch.linalg.svdvals(after), expected, rtol=1e-12, atol=1e-12)


def test_parseval_keeps_trained_weights_inside_the_unit_spectral_ball():
    from torch import nn

    from lipsort.models import mlp
    from lipsort.optim import parseval_
    from lipsort.parametrizations import bjorck_orthonormal

    torch.manual_seed(0)
    net = mlp([12, 16, 16, 3], "maxmin", None).double()
    x, y = torch.rand(64, 12, dtype=torch.float64), torch.randint(0, 3, (64,))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    parseval_(net)
    for _ in range(50):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        parseval_(net)
        norms = [float(torch.linalg.matrix_norm(m.weight.detach(), 2)) for m in net if isinstance(m, nn.Linear)]
        assert max(norms) <= 1 + 1e-12
    # Repeated steps converge to orthonormal rows or columns; a parametrized layer is left alone.
    lone = nn.Linear(16, 12).double()
    for _ in range(60):
        parseval_(lone)
    torch.testing.assert_close(lone.weight @ lone.weight.mT, torch.eye(12, dtype=torch.float64))
    fixed = bjorck_orthonormal(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="found no unparametrized nn.Linear in ParametrizedLinear"):
        parseval_(fixed)
