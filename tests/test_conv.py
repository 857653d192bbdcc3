"""Tests of lipsort.conv: BCOP, RKO, OSSN, invertible downsampling, FFT spectra, export."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian

from lipsort.activations import MaxMin
from lipsort.attacks import pgd
from lipsort.certify import certified_radius, empirical_lipschitz, lipschitz_upper_bound
from lipsort.conv import (
    BCOP,
    OSSN,
    RKO,
    InvertibleDownsampling,
    bcop_kernel,
    circular_conv2d,
    component_invariants,
    embed_bcop,
    singular_values,
    strided_conv,
)
from lipsort.conv.reference import bcop_kernel_per_tap
from lipsort.parametrizations import bjorck_orthonormal, frozen

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def jacobian_svd(layer: nn.Module, c_in: int, size: tuple[int, int]) -> torch.Tensor:
    """Singular values of the layer's Jacobian at a random input (the layer is linear)."""
    x = torch.randn(1, c_in, *size, dtype=F64)
    jac = jacobian(lambda t: layer(t), x)
    n_in = c_in * size[0] * size[1]
    return torch.linalg.svdvals(jac.reshape(-1, n_in)).sort(descending=True).values


def train_random_objective(layer: nn.Module, c_in: int, size=(6, 6), steps=50, lr=0.1):
    """Adam on a random regression target: large steps that move the free parameters far."""
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    x = torch.randn(8, c_in, *size, dtype=F64)
    target = torch.randn(8, layer.out_channels, *size, dtype=F64)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((layer(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


# --------------------------------------------------------------------------- orthogonality


@pytest.mark.parametrize("channels,k", [(8, 3), (6, 2), (5, 4), (4, 1)])
def test_bcop_exactly_orthogonal_after_large_learning_rate(channels, k):
    torch.manual_seed(0)
    layer = BCOP(channels, channels, k, dtype=F64)
    start = [layer.ortho_orig.detach().clone()]
    losses = train_random_objective(layer, channels)
    moved = float((layer.ortho_orig.detach() - start[0]).abs().max())
    assert moved > 0.5  # the parameters travelled far from their orthonormal start
    assert losses[-1] < losses[0]
    for mode in ("train", "eval"):
        getattr(layer, mode)()
        s = singular_values(layer, (6, 6))
        assert s.numel() == channels * 36
        assert float((s - 1).abs().max()) < 1e-5


@pytest.mark.parametrize("c_in,c_out", [(3, 8), (8, 3)])
def test_bcop_isometry_and_coisometry(c_in, c_out):
    torch.manual_seed(1)
    layer = BCOP(c_in, c_out, 3, dtype=F64)
    train_random_objective(layer, c_in, steps=20)
    layer.eval()
    s = singular_values(layer, (5, 6))
    assert s.numel() == min(c_in, c_out) * 30
    assert float((s - 1).abs().max()) < 1e-10
    x = torch.randn(4, c_in, 5, 6, dtype=F64)
    y = circular_conv2d(x, layer.weight)  # without bias: the linear map
    ratio = y.flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)
    if c_in <= c_out:  # an isometry
        torch.testing.assert_close(ratio, torch.ones(4, dtype=F64), rtol=0, atol=1e-10)
    else:
        assert bool((ratio <= 1 + 1e-10).all()) and bool((ratio < 0.99).any())


@pytest.mark.parametrize("k", [2, 4])
def test_even_kernels_anchor_and_orthogonality(k):
    """Even kernels are anchored as padding='same' and exactly orthogonal (Jacobian SVD)."""
    torch.manual_seed(2)
    layer = BCOP(4, 4, k, dtype=F64).eval()
    x = torch.randn(2, 4, 5, 7, dtype=F64)
    conv = nn.Conv2d(4, 4, k, padding="same", padding_mode="circular", dtype=F64)
    with torch.no_grad():
        conv.weight.copy_(layer.weight)
        conv.bias.copy_(layer.bias)
    assert torch.equal(layer(x), conv(x))
    s = jacobian_svd(layer, 4, (5, 7))
    assert float((s - 1).abs().max()) < 1e-12


def test_rko_is_nonexpansive_after_training():
    torch.manual_seed(3)
    layer = RKO(6, 6, 3, dtype=F64)
    train_random_objective(layer, 6)
    layer.eval()
    s = singular_values(layer, (6, 6))
    assert float(s.max()) <= 1 + 1e-12
    assert float(s.min()) < 0.9  # a bound, not an orthogonal convolution
    bound = float(lipschitz_upper_bound(layer))
    assert float(s.max()) - 1e-12 <= bound <= 1 + 1e-12


def test_ossn_is_normalized_approximately_and_certified_exactly():
    torch.manual_seed(4)
    layer = OSSN(6, 6, 3, dtype=F64)
    with torch.no_grad():
        layer.weight_orig.mul_(5)  # norm well above 1: the normalization is active
    train_random_objective(layer, 6, steps=30, lr=0.01)
    exact_orig = float(singular_values(layer.weight_orig, (6, 6))[0])
    assert exact_orig > 1
    layer.eval()
    exact = float(singular_values(layer, (6, 6))[0])
    # σ̂ ≤ σ: the normalized kernel has norm σ/σ̂ ≥ 1, slightly.
    assert 1 - 1e-12 <= exact < 1.05
    assert float(lipschitz_upper_bound(layer)) == exact
    assert (
        float(
            empirical_lipschitz(
                nn.Sequential(layer, nn.Flatten()), torch.randn(3, 6, 6, 6, dtype=F64)
            )
        )
        <= exact
    )


def test_ossn_state_dict_round_trip_and_warm_start():
    torch.manual_seed(5)
    layer = OSSN(3, 4, 3, dtype=F64)
    with torch.no_grad():
        layer.weight_orig.mul_(10)
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    exact = float(singular_values(layer.weight_orig, 8)[0])
    estimates = []
    for _ in range(5):
        layer(x)
        with torch.no_grad():
            estimates.append(float(layer.weight_orig.norm() / layer.weight.norm()))  # σ̂
    # Warm start: each step refines the previous vector (σ̂ rises towards σ), never redraws it.
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(estimates))
    assert estimates[-1] <= exact and exact - estimates[-1] < 0.5 * (exact - estimates[0])
    other = OSSN(3, 4, 3, dtype=F64)
    other.load_state_dict(layer.state_dict())
    assert other.u.shape == (1, 4, 8, 8)
    layer.eval(), other.eval()
    assert torch.equal(other(x), layer(x))


# --------------------------------------------------------------------------- FFT spectrum


@pytest.mark.parametrize(
    "make,c_in,c_out,size",
    [
        (lambda: BCOP(3, 5, 3, dtype=F64), 3, 5, (5, 6)),
        (lambda: BCOP(5, 3, 2, dtype=F64), 5, 3, (4, 5)),
        (lambda: RKO(4, 3, 3, dtype=F64), 4, 3, (5, 5)),
        (lambda: OSSN(3, 4, 2, dtype=F64, input_size=(6, 4)), 3, 4, (6, 4)),
        # A 4×4 kernel on a 3×5 input: taps wrap around and are folded.
        (lambda: BCOP(2, 2, 4, dtype=F64), 2, 2, (3, 5)),
    ],
)
def test_fft_singular_values_equal_jacobian_svd(make, c_in, c_out, size):
    torch.manual_seed(6)
    layer = make().eval()
    with torch.no_grad():  # move off the construction so that the spectrum is not trivial
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    fft = singular_values(layer, size)
    brute = jacobian_svd(layer, c_in, size)[: fft.numel()]
    torch.testing.assert_close(fft, brute, rtol=0, atol=1e-10)


def test_singular_values_of_exported_conv_and_raw_kernel():
    torch.manual_seed(7)
    layer = RKO(3, 3, 3, dtype=F64).eval()
    conv = layer.to_conv2d()
    torch.testing.assert_close(singular_values(conv, 6), singular_values(layer.weight, 6))
    with pytest.raises(ValueError, match="stride-1 circular"):
        singular_values(nn.Conv2d(3, 3, 3, padding=1), 6)


def test_linf_bound_is_the_largest_row_sum_of_the_operator():
    torch.manual_seed(8)
    layer = RKO(3, 4, 3, dtype=F64).eval()
    x = torch.randn(1, 3, 5, 5, dtype=F64)
    jac = jacobian(lambda t: layer(t), x).reshape(4 * 25, 3 * 25)
    assert float(lipschitz_upper_bound(layer, norm="linf")) == pytest.approx(
        float(jac.abs().sum(1).max()), rel=1e-12
    )


# --------------------------------------------------------------------------- export, cache


def small_net(conv_cls=BCOP, **kw) -> nn.Sequential:
    return nn.Sequential(
        strided_conv(conv_cls, 1, 4, 4, 2, **kw),
        MaxMin(),
        conv_cls(4, 4, 3, **kw),
        MaxMin(),
        nn.Flatten(),
        bjorck_orthonormal(nn.Linear(4 * 4 * 4, 3, dtype=kw.get("dtype"))),
    )


@pytest.mark.parametrize("conv_cls", [BCOP, RKO, OSSN])
def test_frozen_exports_plain_conv2d_with_identical_outputs(conv_cls):
    torch.manual_seed(9)
    net = small_net(conv_cls)
    x = torch.randn(5, 1, 8, 8)
    net(x)  # a training step's forward pass (OSSN's vector at this size)
    plain = frozen(net)
    kinds = {type(m) for m in plain.modules()}
    assert nn.Conv2d in kinds and nn.PixelUnshuffle in kinds
    assert not kinds & {BCOP, RKO, OSSN, InvertibleDownsampling}
    assert all(m.padding_mode == "circular" for m in plain.modules() if isinstance(m, nn.Conv2d))
    assert plain.training  # the train/eval flags are kept
    assert torch.equal(plain.eval()(x), net.eval()(x))
    assert isinstance(net[2], conv_cls)  # the original is not modified
    conv = frozen(net[2])  # a layer on its own becomes an nn.Conv2d
    x4 = torch.randn(5, 4, 4, 4)
    assert type(conv) is nn.Conv2d and torch.equal(conv(x4), net[2](x4))


@pytest.mark.parametrize("conv_cls", [BCOP, RKO, OSSN])
def test_eval_cache_identical_and_invalidated_by_an_optimizer_step(conv_cls):
    torch.manual_seed(10)
    layer = conv_cls(4, 4, 3, input_size=6)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(2, 4, 6, 6)
    layer(x).square().sum().backward()  # gradients from a training-mode pass
    assert layer.weight.requires_grad
    layer.eval()
    w = layer.weight
    assert layer.weight is w and not w.requires_grad
    assert torch.equal(layer(x), layer(x))
    opt.step()
    w2 = layer.weight
    assert w2 is not w and not torch.equal(w2, w)
    assert layer.weight is w2
    # A write through .data bypasses the version counter; the sample of the free parameters
    # (a view of their storage) still sees it.
    free = layer.ortho_orig if conv_cls is BCOP else layer.weight_orig
    free.data.add_(0.05)  # not a rescaling: Björck's pre-scale would undo that
    w3 = layer.weight
    assert w3 is not w2 and not torch.equal(w3, w2)
    layer.train()
    assert torch.equal(layer.eval().weight, w3)  # what a fresh evaluation computes


def test_eval_mode_keeps_input_gradients():
    layer = BCOP(2, 2, 3).eval()
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.ortho_orig.grad is None


# --------------------------------------------------------------------------- certificates


def test_certified_points_survive_pgd():
    torch.manual_seed(11)
    net = small_net(BCOP, dtype=F64).eval()
    x = torch.rand(64, 1, 8, 8, dtype=F64)
    with torch.no_grad():
        logits = net(x)
    y = logits.argmax(1)  # labels the network gets right, with margins of all sizes
    lip = lipschitz_upper_bound(net)
    assert float(lip) == pytest.approx(1.0, abs=1e-5)
    assert float(empirical_lipschitz(net, x)) <= float(lip)
    radius = certified_radius(logits, y, lip)
    eps = float(radius.median())
    safe = radius > eps
    x_adv = pgd(net, x[safe], y[safe], eps=eps, steps=100)
    with torch.no_grad():
        assert torch.equal(net(x_adv).argmax(1), y[safe])
    # The attack is strong enough to matter: at 4× the radius it breaks most points.
    x_big = pgd(net, x, y, eps=4 * eps, steps=100)
    with torch.no_grad():
        assert float((net(x_big).argmax(1) != y).float().mean()) > 0.3


def test_bound_needs_an_input_size():
    layer = BCOP(2, 2, 3)
    with pytest.raises(ValueError, match="input size"):
        lipschitz_upper_bound(layer)
    layer(torch.randn(1, 2, 5, 5))
    assert float(lipschitz_upper_bound(layer)) == pytest.approx(1.0, abs=1e-5)


# --------------------------------------------------------------------------- components


@pytest.mark.parametrize("ranks", [(2, 2, 2, 2), (0, 4, 1, 3), (4, 4, 0, 2)])
def test_projector_ranks_and_det_label_the_component(ranks):
    torch.manual_seed(12)
    n = 4
    layer = BCOP(n, n, 3, projector_ranks=ranks, dtype=F64)
    expected_h = sum(n - r for r in ranks[0::2])
    expected_w = sum(n - r for r in ranks[1::2])
    for reflect in (False, True):
        if reflect:
            with torch.no_grad():
                layer.ortho_orig[0].neg_()
        sign, got_ranks = layer.component()
        assert sign == (-1 if reflect else 1) and got_ranks == ranks
        assert component_invariants(layer) == (sign, expected_h, expected_w)
        # Invariants cannot change along a (continuous) training path.
        train_random_objective(layer, n, steps=10, lr=0.05)
        assert component_invariants(layer) == (sign, expected_h, expected_w)


def test_component_invariants_reject_non_orthogonal_kernels():
    with pytest.raises(ValueError, match="not an orthogonal convolution"):
        component_invariants(RKO(3, 3, 3, dtype=F64))
    with pytest.raises(ValueError, match="square-channel"):
        component_invariants(BCOP(2, 4, 3, dtype=F64))


@pytest.mark.parametrize(
    "ranks,reflect", [((1, 2, 3, 0), False), ((3, 3, 0, 0), True), (None, False)]
)
def test_embedding_into_the_half_rank_component(ranks, reflect):
    torch.manual_seed(13)
    n = 3
    small = BCOP(n, n, 3, projector_ranks=ranks, dtype=F64)
    if reflect:
        with torch.no_grad():
            small.ortho_orig[1].neg_()
    train_random_objective(small, n, steps=10)
    small.eval()
    big = embed_bcop(small).eval()
    assert big.projector_ranks == (n,) * 4 == (2 * n // 2,) * 4
    # Every n-channel BCOP lands in the one component (det +1, half ranks) of 2n channels.
    assert component_invariants(big) == (1, 2 * n, 2 * n)
    s = singular_values(big, (5, 5))
    assert float((s - 1).abs().max()) < 1e-10
    x = torch.randn(3, n, 5, 5, dtype=F64)
    y = big(torch.cat([x, torch.zeros_like(x)], 1))
    torch.testing.assert_close(y[:, :n], small(x), rtol=0, atol=1e-10)
    torch.testing.assert_close(big.weight[:n, :n], small.weight, rtol=0, atol=1e-10)
    torch.testing.assert_close(
        big.weight[n:, :n], torch.zeros_like(small.weight), rtol=0, atol=1e-10
    )


# --------------------------------------------------------------------------- reference, ops


@pytest.mark.parametrize(
    "c_in,c_out,k,ranks",
    [(4, 4, 3, None), (3, 6, 4, None), (5, 2, 2, None), (4, 4, 3, (0, 1, 4, 2))],
)
def test_per_tap_reference_matches(c_in, c_out, k, ranks):
    torch.manual_seed(14)
    layer = BCOP(c_in, c_out, k, projector_ranks=ranks, dtype=F64)
    with torch.no_grad():
        for p in (layer.ortho_orig, layer.proj_orig):
            p.add_(0.3 * torch.randn_like(p))
    w, ref = layer.weight, bcop_kernel_per_tap(layer)
    torch.testing.assert_close(w, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(w)
    grads = torch.autograd.grad((w * g).sum(), (layer.ortho_orig, layer.proj_orig))
    grads_ref = torch.autograd.grad((ref * g).sum(), (layer.ortho_orig, layer.proj_orig))
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_bcop_gradcheck():
    torch.manual_seed(15)
    layer = BCOP(3, 3, 3, n_iters=6, dtype=F64)

    def kernel(h, v):
        return layer.kernel_map((h, v))

    h = layer.ortho_orig.detach().clone().requires_grad_(True)
    v = (layer.proj_orig.detach() + 0.1 * torch.randn_like(layer.proj_orig)).requires_grad_(True)
    assert torch.autograd.gradcheck(kernel, (h, v))


def test_bcop_kernel_composes_blocks_in_order():
    """ĥK = H·B(P1,Q1)·B(P2,Q2): the composed kernel is the composition of the operators."""
    torch.manual_seed(16)
    n = 3

    def proj(r):
        q = torch.linalg.qr(torch.randn(n, n, dtype=F64))[0][:, :r]
        return q @ q.T

    p1, q1, p2, q2 = proj(1), proj(2), proj(1), proj(2)
    h = torch.linalg.qr(torch.randn(n, n, dtype=F64))[0]
    k2 = bcop_kernel(h, torch.stack([p1, q1, p2, q2]))
    first = bcop_kernel(torch.eye(n, dtype=F64), torch.stack([p2, q2]))
    second = bcop_kernel(h, torch.stack([p1, q1]))
    x = torch.randn(1, n, 5, 5, dtype=F64)
    # Both 2×2 layers are anchored at 0 and the 3×3 one at 1: a one-pixel shift apart.
    composed = circular_conv2d(circular_conv2d(x, first), second).roll((1, 1), (2, 3))
    torch.testing.assert_close(circular_conv2d(x, k2), composed, rtol=0, atol=1e-12)


def test_unbatched_input_and_strided_shapes():
    torch.manual_seed(17)
    layer = BCOP(3, 5, 3)
    x = torch.randn(3, 6, 6)
    torch.testing.assert_close(layer(x), layer(x[None])[0])
    conv = strided_conv(BCOP, 16, 32, 4, 2, input_size=14)
    assert conv[1].in_channels == 64 and conv[1].kernel_size == (2, 2)
    assert conv[1].input_size == (7, 7)
    assert conv(torch.randn(2, 16, 14, 14)).shape == (2, 32, 7, 7)
    assert isinstance(strided_conv(RKO, 3, 3, 3, 1), RKO)
    d = InvertibleDownsampling(2)
    xd = torch.randn(2, 3, 4, 6, dtype=F64)
    s = jacobian_svd(d, 3, (4, 6))
    assert float((s - 1).abs().max()) < 1e-14
    assert lipschitz_upper_bound(nn.Sequential(d)) == 1
    assert d(xd).shape == (2, 12, 2, 3)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"stride": 2}, "stride 1 only.*strided_conv"),
        ({"padding": 0}, "padding='same' or 1 only"),
        ({"padding": "valid"}, "padding='same'"),
        ({"padding_mode": "zeros"}, "padding_mode='circular' only"),
        ({"kernel_size": (3, 2)}, "square k×k kernels"),
        ({"kernel_size": 0}, "kernel_size must be a positive integer"),
        ({"in_channels": 0}, "in_channels must be a positive integer"),
        ({"out_channels": 2.5}, "out_channels must be a positive integer"),
        ({"projector_ranks": 5}, r"ranks must lie in 0\.\.4"),
        ({"projector_ranks": (1, 2, 3)}, r"one rank per projector, 2\(k-1\) = 4"),
        ({"n_iters": -1}, "n_iters must be a non-negative integer"),
        ({"order": 5}, "order must be 1, 2, 3 or 4"),
        ({"input_size": (4, 4, 4)}, "input_size must be an int or a pair"),
    ],
)
def test_bcop_rejects_unsupported_arguments(kwargs, match):
    args = {"in_channels": 4, "out_channels": 4, "kernel_size": 3}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        BCOP(**args)


def test_even_kernel_padding_message_and_baseline_checks():
    with pytest.raises(ValueError, match="padding='same' only"):
        BCOP(4, 4, 2, padding=1)
    with pytest.raises(ValueError, match="RKO supports stride 1 only"):
        RKO(4, 4, 3, stride=2)
    with pytest.raises(ValueError, match="OSSN supports padding_mode='circular' only"):
        OSSN(4, 4, 3, padding_mode="reflect")
    with pytest.raises(ValueError, match="n_power_iters must be a positive integer"):
        OSSN(4, 4, 3, n_power_iters=0)
    with pytest.raises(ValueError, match="not known yet"):
        _ = OSSN(4, 4, 3).weight
    with pytest.raises(ValueError, match="divisible by stride"):
        strided_conv(BCOP, 1, 16, 3, 2)
    with pytest.raises(ValueError, match="divisible by 2"):
        InvertibleDownsampling(2)(torch.randn(1, 1, 5, 4))
    with pytest.raises(ValueError, match="needs the input size"):
        singular_values(BCOP(2, 2, 3))
    with pytest.raises(TypeError, match="embed_bcop takes a BCOP"):
        embed_bcop(RKO(2, 2, 3))
    with pytest.raises(ValueError, match="in_channels = out_channels"):
        embed_bcop(BCOP(2, 3, 3))


def test_forward_rejects_wrong_inputs():
    layer = BCOP(3, 3, 5)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\) or unbatched \(C, H, W\)"):
        layer(torch.randn(3, 8))
    with pytest.raises(ValueError, match="in_channels=3, got an input with 2 channels"):
        layer(torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match="wrap around more than once"):
        layer(torch.randn(1, 3, 1, 8))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(1, 3, 8, 8, dtype=torch.long))


def test_deepcopy_and_odd_channel_counts():
    torch.manual_seed(18)
    layer = BCOP(5, 5, 3, dtype=F64).eval()
    assert layer.projector_ranks == (2, 2, 2, 2)
    x = torch.randn(1, 5, 6, 6, dtype=F64)
    y = layer(x)
    clone = copy.deepcopy(layer)
    assert torch.equal(clone(x), y)
    assert clone.weight is not layer.weight


@pytest.mark.parametrize("conv_cls", [BCOP, RKO, OSSN])
def test_frozen_network_keeps_its_exact_certificate(conv_cls):
    torch.manual_seed(11)
    net = small_net(conv_cls, dtype=torch.float64)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    net(x)  # records each convolution's input size
    net.eval()
    plain = frozen(net)
    for norm in ("l2", "linf"):
        assert float(lipschitz_upper_bound(plain, norm)) == pytest.approx(
            float(lipschitz_upper_bound(net, norm)), rel=1e-12
        )
    # Teeth: the bound is the exact norm at the recorded size, not a constant.
    conv = next(m for m in plain.modules() if type(m) is nn.Conv2d)
    with torch.no_grad():
        conv.weight.mul_(3.0)
    assert float(lipschitz_upper_bound(plain)) == pytest.approx(3 * float(lipschitz_upper_bound(net)))


def test_plain_conv2d_bound_names_what_it_supports():
    zero_padded = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1))
    with pytest.raises(TypeError, match="stride-1 circular convolutions only"):
        lipschitz_upper_bound(zero_padded)
    circular = nn.Conv2d(2, 2, 3, padding="same", padding_mode="circular")
    with pytest.raises(ValueError, match=r"set conv.input_size = \(H, W\)"):
        lipschitz_upper_bound(circular)
    circular.input_size = (6, 6)
    assert float(lipschitz_upper_bound(circular)) == pytest.approx(
        float(singular_values(circular.weight, (6, 6))[0])
    )


@pytest.mark.parametrize("k", [2, 3, 5])
def test_circular_conv2d_gradients_are_autograds_through_the_padding(k):
    """The adjoint backward gives autograd's gradients through pad + conv2d, double backward
    included; under torch.func transforms the plain operations run (jacrev)."""
    import torch.nn.functional as nnf

    from lipsort.conv._base import _pads

    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64, requires_grad=True)
    x, w, b = torch.randn(2, 3, 5, 6, **f64), torch.randn(4, 3, k, k, **f64), torch.randn(4, **f64)
    assert torch.autograd.gradcheck(circular_conv2d, (x, w, b))
    assert torch.autograd.gradgradcheck(circular_conv2d, (x, w, b))
    cot = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    ours = torch.autograd.grad(circular_conv2d(x, w, b), (x, w, b), cot)
    plain = nnf.conv2d(nnf.pad(x, _pads((k, k)), mode="circular"), w, b)
    assert "CircularConv" in type(circular_conv2d(x, w, b).grad_fn).__name__  # the adjoint path ran
    for ours_g, ref_g in zip(ours, torch.autograd.grad(plain, (x, w, b), cot)):
        torch.testing.assert_close(ours_g, ref_g, rtol=1e-12, atol=1e-12)
    # Only the input needs a gradient (a frozen kernel), and only the kernel (a first layer).
    g_x, = torch.autograd.grad(circular_conv2d(x, w.detach()), (x,), cot)
    g_w, = torch.autograd.grad(circular_conv2d(x.detach(), w), (w,), cot)
    torch.testing.assert_close(g_x, ours[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_w, ours[1], rtol=1e-12, atol=1e-12)
    jac = torch.func.jacrev(lambda v: circular_conv2d(v, w.detach()))(x[:1].detach())
    torch.testing.assert_close(jac.reshape(4 * 30, 3 * 30), jacobian(
        lambda v: circular_conv2d(v, w.detach()), x[:1].detach()).reshape(4 * 30, 3 * 30))
