"""Losses: values against hand computations and torch, reductions, gradients, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as nnf

from lipsort.losses import HingeLoss, HKRLoss, KRLoss, MarginLoss, TauCrossEntropyLoss

D = torch.float64


def _data(n=12, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=D)
    y = torch.randint(0, c, (n,), generator=g)
    return logits, y


# ----------------------------------------------------------------------------- hand versions


def _margin_by_hand(logits, y, m, p=1):
    out = []
    for f, t in zip(logits.tolist(), y.tolist()):
        out.append(sum(max(0.0, m - f[t] + f[j]) ** p for j in range(len(f)) if j != t) / len(f))
    return torch.tensor(out, dtype=D)


def _kr_binary_by_hand(f, pos):
    f, pos = f.tolist(), pos.tolist()
    fp = [v for v, s in zip(f, pos) if s]
    fn = [v for v, s in zip(f, pos) if not s]

    def mean(v):
        return sum(v) / len(v) if v else 0.0

    return mean(fp) - mean(fn)


def _kr_multiclass_by_hand(logits, y):
    c = logits.shape[1]
    return sum(_kr_binary_by_hand(logits[:, k], y == k) for k in range(c)) / c


def _hinge_multiclass_by_hand(logits, y, m):
    c = logits.shape[1]
    out = []
    for f, t in zip(logits.tolist(), y.tolist()):
        s = (c - 1) * max(0.0, m - f[t]) + sum(max(0.0, m + f[k]) for k in range(c) if k != t)
        out.append(s / c)
    return torch.tensor(out, dtype=D)


# ------------------------------------------------------------------------------ MarginLoss


@pytest.mark.parametrize("margin", [0.0, 0.3, 1.0, 2.5])
@pytest.mark.parametrize("p", [1, 2])
def test_margin_loss_is_torch_multi_margin_and_hand_formula(margin, p):
    logits, y = _data(20, 5)
    hand = _margin_by_hand(logits, y, margin, p)
    none = MarginLoss(margin, p=p, reduction="none")(logits, y)
    torch.testing.assert_close(none, hand)
    torch.testing.assert_close(
        none, nnf.multi_margin_loss(logits, y, p=p, margin=margin, reduction="none")
    )
    torch.testing.assert_close(MarginLoss(margin, p=p)(logits, y), hand.mean())
    torch.testing.assert_close(MarginLoss(margin, p=p, reduction="sum")(logits, y), hand.sum())


def test_margin_loss_is_a_sum_over_classes_not_a_max():
    # Two wrong classes both inside the margin: the loss adds both terms.
    logits, y = torch.tensor([[1.0, 0.5, 0.8]], dtype=D), torch.tensor([0])
    expected = ((1 - 1.0 + 0.5) + (1 - 1.0 + 0.8)) / 3
    assert MarginLoss(1.0)(logits, y).item() == pytest.approx(expected)


def test_margin_loss_zero_iff_margin_reached():
    logits = torch.tensor([[3.0, 1.0, 2.0], [3.0, 1.0, 2.0]], dtype=D)
    y = torch.tensor([0, 0])
    assert MarginLoss(1.0)(logits, y).item() == 0.0  # f_y - max_j f_j = 1
    assert MarginLoss(1.0 + 1e-6)(logits, y).item() > 0.0


# ---------------------------------------------------------------------------------- KRLoss


@pytest.mark.parametrize("labels01", [True, False])
@pytest.mark.parametrize("column", [True, False])
def test_kr_binary_by_hand(labels01, column):
    g = torch.Generator().manual_seed(3)
    f = torch.randn(15, generator=g, dtype=D)
    pos = torch.rand(15, generator=g) > 0.4
    labels = pos.long() if labels01 else 2 * pos.long() - 1
    scores = f[:, None] if column else f
    target = labels[:, None].to(D) if column else labels
    kr = _kr_binary_by_hand(f, pos)
    assert KRLoss()(scores, target).item() == pytest.approx(-kr, rel=1e-12)
    terms = KRLoss(reduction="none")(scores, target)
    assert terms.shape == (15,)
    assert terms.mean().item() == pytest.approx(-kr, rel=1e-12)
    assert KRLoss(reduction="sum")(scores, target).item() == pytest.approx(-15 * kr, rel=1e-12)


def test_kr_multiclass_one_vs_rest_by_hand():
    logits, y = _data(30, 4, seed=5)
    assert set(y.tolist()) == {0, 1, 2, 3}
    assert KRLoss()(logits, y).item() == pytest.approx(
        -_kr_multiclass_by_hand(logits, y), rel=1e-12
    )
    # A class absent from the batch: its positive side counts 0, its negative side still counts.
    y2 = torch.where(y == 3, torch.zeros_like(y), y)
    assert KRLoss()(logits, y2).item() == pytest.approx(
        -_kr_multiclass_by_hand(logits, y2), rel=1e-12
    )


def test_kr_is_invariant_to_shifts_and_linear_in_scale():
    logits, y = _data(16, 3, seed=7)
    kr = KRLoss()(logits, y)
    torch.testing.assert_close(KRLoss()(logits + 5.0, y), kr)
    torch.testing.assert_close(KRLoss()(3.0 * logits, y), 3.0 * kr)


# --------------------------------------------------------------------------------- HKRLoss


@pytest.mark.parametrize("alpha", [0.0, 0.5, 10.0, 300.0])
@pytest.mark.parametrize("margin", [0.1, 1.0])
def test_hkr_binary_is_minus_kr_plus_alpha_hinge(alpha, margin):
    g = torch.Generator().manual_seed(11)
    f = torch.randn(20, generator=g, dtype=D)
    y = (torch.rand(20, generator=g) > 0.5).long()
    signs = 2.0 * y - 1
    hinge = nnf.relu(margin - signs * f).mean()
    expected = KRLoss()(f, y) + alpha * hinge
    assert HKRLoss(alpha, margin)(f, y).item() == pytest.approx(
        expected.item(), rel=1e-12, abs=1e-12
    )
    assert HKRLoss(alpha, margin)(f, 2 * y - 1).item() == pytest.approx(
        expected.item(), rel=1e-12, abs=1e-12
    )
    assert HKRLoss(alpha, margin, reduction="none")(f, y).mean().item() == pytest.approx(
        expected.item(), rel=1e-12, abs=1e-12
    )


@pytest.mark.parametrize("alpha", [0.0, 5.0, 50.0])
def test_hkr_multiclass_by_hand(alpha):
    logits, y = _data(25, 5, seed=13)
    hinge = _hinge_multiclass_by_hand(logits, y, 0.7)
    expected = -_kr_multiclass_by_hand(logits, y) + alpha * hinge.mean().item()
    assert HKRLoss(alpha, 0.7)(logits, y).item() == pytest.approx(expected, rel=1e-12)
    terms = HKRLoss(alpha, 0.7, reduction="none")(logits, y)
    assert terms.shape == (25,)
    assert HKRLoss(alpha, 0.7, reduction="sum")(logits, y).item() == pytest.approx(
        terms.sum().item(), rel=1e-12
    )


def test_hkr_hinge_vanishes_when_every_logit_has_the_margin():
    # True logit ≥ m, all others ≤ -m: only the KR term is left.
    logits = torch.tensor([[1.5, -1.0, -2.0], [-1.0, 1.0, -1.2]], dtype=D)
    y = torch.tensor([0, 1])
    torch.testing.assert_close(HKRLoss(100.0, 1.0)(logits, y), KRLoss()(logits, y))


# --------------------------------------------------------------------- TauCrossEntropyLoss


def test_tau_ce_at_one_is_cross_entropy():
    logits, y = _data(10, 6)
    for reduction in ("mean", "sum", "none"):
        torch.testing.assert_close(
            TauCrossEntropyLoss(1.0, reduction)(logits, y),
            nnf.cross_entropy(logits, y, reduction=reduction),
        )


@pytest.mark.parametrize("tau", [0.05, 0.5, 4.0, 64.0])
def test_tau_ce_scaling(tau):
    logits, y = _data(10, 6, seed=2)
    torch.testing.assert_close(
        TauCrossEntropyLoss(tau)(logits, y), nnf.cross_entropy(tau * logits, y) / tau
    )
    # L_τ(f) = L_1(τ f) / τ.
    torch.testing.assert_close(
        TauCrossEntropyLoss(tau)(logits, y), TauCrossEntropyLoss(1.0)(tau * logits, y) / tau
    )


def test_tau_ce_large_tau_tends_to_the_margin_hinge():
    # CE(τf)/τ → max_j f_j − f_y as τ → ∞ (log-sum-exp/τ → max).
    logits, y = _data(50, 4, seed=4)
    limit = logits.amax(1) - logits.gather(1, y[:, None]).squeeze(1)
    got = TauCrossEntropyLoss(1e4, reduction="none")(logits, y)
    assert bool((got >= limit - 1e-12).all())  # up to rounding
    assert (got - limit).max().item() <= math.log(4) / 1e4 + 1e-12


def test_tau_ce_binary_is_logistic():
    g = torch.Generator().manual_seed(8)
    f = torch.randn(12, generator=g, dtype=D)
    y = (torch.rand(12, generator=g) > 0.5).long()
    for tau in (0.5, 1.0, 8.0):
        expected = nnf.binary_cross_entropy_with_logits(tau * f, y.to(D)) / tau
        torch.testing.assert_close(TauCrossEntropyLoss(tau)(f, y), expected)
        torch.testing.assert_close(TauCrossEntropyLoss(tau)(f[:, None], 2 * y - 1), expected)


# ------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    "loss, binary",
    [
        (MarginLoss(0.5), False),
        (MarginLoss(0.5, p=2), False),
        (KRLoss(), False),
        (KRLoss(), True),
        (HKRLoss(10.0, 0.5), False),
        (HKRLoss(10.0, 0.5), True),
        (TauCrossEntropyLoss(3.0), False),
        (TauCrossEntropyLoss(3.0), True),
    ],
)
def test_gradcheck(loss, binary):
    logits, y = _data(8, 3, seed=21)
    if binary:
        logits, y = logits[:, 0], (y > 0).long()
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: loss(f, y), (logits,))


def test_margin_gradient_by_hand():
    logits = torch.tensor([[1.0, 0.5, -2.0]], dtype=D, requires_grad=True)
    MarginLoss(1.0)(logits, torch.tensor([0])).backward()
    # Only j = 1 is inside the margin: d/df = (-1, +1, 0) / C.
    torch.testing.assert_close(logits.grad, torch.tensor([[-1.0, 1.0, 0.0]], dtype=D) / 3)


def test_kr_gradient_is_the_class_weights():
    f = torch.zeros(5, dtype=D, requires_grad=True)
    KRLoss()(f, torch.tensor([1, 1, 0, 0, 0])).backward()
    torch.testing.assert_close(f.grad, torch.tensor([-0.5, -0.5, 1 / 3, 1 / 3, 1 / 3], dtype=D))


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "loss", [MarginLoss(), KRLoss(), HingeLoss(), HKRLoss(), TauCrossEntropyLoss()]
)
def test_bad_class_labels_and_shapes_raise(loss):
    logits = torch.zeros(4, 3, dtype=D)
    with pytest.raises(ValueError, match="class indices"):
        loss(logits, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match="class indices"):
        loss(logits, torch.tensor([0, -1, 2, 0]))
    with pytest.raises(TypeError, match="integer"):
        loss(logits, torch.tensor([0.0, 1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="shape"):
        loss(logits, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="shape"):
        loss(torch.zeros(4, 3, 2, dtype=D), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(TypeError, match="floating"):
        loss(torch.zeros(4, 3, dtype=torch.long), torch.tensor([0, 1, 2, 0]))


@pytest.mark.parametrize("loss", [KRLoss(), HingeLoss(), HKRLoss(), TauCrossEntropyLoss()])
def test_bad_binary_labels_raise(loss):
    f = torch.zeros(4, dtype=D)
    with pytest.raises(ValueError, match=r"\{0, 1\}"):
        loss(f, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"\{0, 1\}"):
        loss(f, torch.tensor([-1, 0, 1, 1]))
    with pytest.raises(ValueError, match="shape"):
        loss(f, torch.tensor([0, 1, 1]))


def test_margin_loss_needs_logits_per_class():
    with pytest.raises(ValueError, match="C >= 2"):
        MarginLoss()(torch.zeros(4, dtype=D), torch.tensor([0, 1, 1, 0]))


@pytest.mark.parametrize(
    "make",
    [
        lambda: MarginLoss(-1.0),
        lambda: MarginLoss(1.0, p=3),
        lambda: MarginLoss(reduction="avg"),
        lambda: KRLoss(reduction="max"),
        lambda: HKRLoss(alpha=-1.0),
        lambda: HKRLoss(margin=-0.1),
        lambda: HingeLoss(margin=-1.0),
        lambda: HingeLoss(reduction="avg"),
        lambda: TauCrossEntropyLoss(0.0),
        lambda: TauCrossEntropyLoss(-2.0),
    ],
)
def test_bad_hyperparameters_raise(make):
    with pytest.raises(ValueError):
        make()


# ------------------------------------------------------------- literal values worked by hand


def test_values_worked_out_by_hand_binary():
    # f = (2, 0.5, -1, 0), labels (+, +, -, -): E+ f = 1.25, E- f = -0.5, so KR = 1.75.
    f = torch.tensor([2.0, 0.5, -1.0, 0.0], dtype=D)
    y = torch.tensor([1, 1, 0, 0])
    assert KRLoss()(f, y).item() == pytest.approx(-1.75, abs=1e-15)
    # Hinge at m = 1: (1-2)+ = 0, (1-0.5)+ = 0.5, (1-1)+ = 0, (1-0)+ = 1 -> mean 0.375.
    assert HingeLoss(1.0)(f, y).item() == pytest.approx(0.375, abs=1e-15)
    assert HingeLoss(1.0, reduction="sum")(f, y).item() == pytest.approx(1.5, abs=1e-15)
    # HKR with alpha = 10: -1.75 + 10 * 0.375 = 2.0.
    assert HKRLoss(10.0, 1.0)(f, y).item() == pytest.approx(2.0, abs=1e-14)
    # m = 0 keeps only the misclassified: here none (every sign is right or zero) -> HKR = -KR.
    assert HKRLoss(10.0, 0.0)(f, y).item() == pytest.approx(-1.75, abs=1e-15)
    # tau-CE, binary: log(1 + exp(-tau*y*f)) / tau; at f = 0.5, y = +, tau = 2: log(1 + e^-1) / 2.
    one = TauCrossEntropyLoss(2.0)(torch.tensor([0.5], dtype=D), torch.tensor([1]))
    assert one.item() == pytest.approx(0.5 * math.log1p(math.exp(-1.0)), rel=1e-14)
    assert one.item() == pytest.approx(0.1566308, abs=1e-7)


def test_values_worked_out_by_hand_multiclass():
    logits = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]], dtype=D)
    y = torch.tensor([0, 1, 0])
    # Class 0: E_{y=0} f0 = 2, E_{y!=0} f0 = 0 -> 2. Class 1: E_{y=1} f1 = 2, E_{y!=1} f1 = 0.5
    # -> 1.5. One-vs-rest KR = (2 + 1.5) / 2 = 1.75.
    assert KRLoss()(logits, y).item() == pytest.approx(-1.75, abs=1e-15)
    # Hinge at m = 1, C = 2 (true-class weight C - 1 = 1), per sample, then the mean:
    # (0 + 1)/2 = 0.5; (1 + 0)/2 = 0.5; (0 + 2)/2 = 1 -> 2/3.
    torch.testing.assert_close(
        HingeLoss(1.0, reduction="none")(logits, y), torch.tensor([0.5, 0.5, 1.0], dtype=D)
    )
    # C = 3: (2 (1-2)+ + (1-0.5)+ + (1+0.3)+) / 3 = (0 + 0.5 + 1.3) / 3 = 0.6.
    three = torch.tensor([[2.0, -0.5, 0.3]], dtype=D)
    assert HingeLoss(1.0)(three, torch.tensor([0])).item() == pytest.approx(0.6, abs=1e-15)
    # tau-CE at tau = 0.5 of logits (1, -1), class 0: CE((0.5, -0.5)) / 0.5 = 2 log(1 + e^-1).
    got = TauCrossEntropyLoss(0.5)(torch.tensor([[1.0, -1.0]], dtype=D), torch.tensor([0]))
    assert got.item() == pytest.approx(2 * math.log1p(math.exp(-1.0)), rel=1e-14)
    assert got.item() == pytest.approx(0.6265233, abs=1e-7)
    # MarginLoss (sum over wrong classes / C) of (2, 1.5, -1) at m = 1: (0.5 + 0) / 3.
    m = MarginLoss(1.0)(torch.tensor([[2.0, 1.5, -1.0]], dtype=D), torch.tensor([0]))
    assert m.item() == pytest.approx(1 / 6, abs=1e-15)


def test_hinge_loss_is_the_hinge_term_of_hkr():
    logits, y = _data(20, 4, seed=17)
    for m in (0.0, 0.3, 1.2):
        torch.testing.assert_close(
            HingeLoss(m, reduction="none")(logits, y), _hinge_multiclass_by_hand(logits, y, m)
        )
        # HKR = -KR + alpha * hinge, for any alpha.
        torch.testing.assert_close(
            HKRLoss(7.0, m)(logits, y), KRLoss()(logits, y) + 7.0 * HingeLoss(m)(logits, y)
        )


def test_hinge_zero_iff_every_logit_has_the_margin():
    logits = torch.tensor([[1.0, -1.0, -1.5]], dtype=D)
    y = torch.tensor([0])
    assert HingeLoss(1.0)(logits, y).item() == 0.0
    assert HingeLoss(1.0 + 1e-9)(logits, y).item() > 0.0


def test_hinge_gradcheck():
    logits, y = _data(8, 3, seed=23)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: HingeLoss(0.4)(f, y), (logits,))
