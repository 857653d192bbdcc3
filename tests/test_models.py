"""Network builders: Scale layers and the l_constant of Anil et al.'s FCNet."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lipsort.certify import empirical_lipschitz, lipschitz_upper_bound
from lipsort.models import Scale, mlp
from lipsort.optim import project_linf_


def test_scale_multiplies_and_is_a_buffer():
    s = Scale(-2.5)
    x = torch.randn(3, 4, dtype=torch.float64)
    assert torch.equal(s(x), -2.5 * x)
    assert s(x.float()).dtype == torch.float32
    assert list(s.parameters()) == [] and "factor" in s.state_dict()
    for norm in ("l2", "linf"):
        assert float(lipschitz_upper_bound(s, norm)) == 2.5


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_scale_rejects_non_finite(bad):
    with pytest.raises(ValueError, match="finite"):
        Scale(bad)


def test_l_constant_spreads_over_layers_and_bounds_linf():
    torch.manual_seed(0)
    net = mlp([6, 8, 8, 3], "maxmin", None, l_constant=1000.0).double()
    scales = [m for m in net if isinstance(m, Scale)]
    assert len(scales) == 3
    assert all(math.isclose(float(s.factor), 10.0, rel_tol=1e-12) for s in scales)
    assert [type(m).__name__ for m in net][:3] == ["Linear", "Scale", "MaxMin"]
    project_linf_(net)  # every ‖W‖∞ ≤ 1: the net is 1000-Lipschitz in ℓ∞
    bound = float(lipschitz_upper_bound(net, "linf"))
    assert bound <= 1000.0 * (1 + 1e-12)
    # a sampled lower bound (ℓ∞ → ℓ∞ Jacobian row sums) cannot exceed it
    x = torch.randn(64, 6, dtype=torch.float64)
    assert float(empirical_lipschitz(net, x, norm="linf")) <= bound * (1 + 1e-9)


def test_l_constant_equals_output_scaling_for_homogeneous_nets():
    """Without biases, positively homogeneous layers make K^{1/n} per layer = K at the end."""
    torch.manual_seed(1)
    a = mlp([5, 4, 4, 2], "relu", None, l_constant=8.0).double()
    b = mlp([5, 4, 4, 2], "relu", None).double()
    la = [m for m in a if isinstance(m, nn.Linear)]
    lb = [m for m in b if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for ma, mb in zip(la, lb, strict=True):
            mb.weight.copy_(ma.weight)
            ma.bias.zero_()
            mb.bias.zero_()
    x = torch.randn(10, 5, dtype=torch.float64)
    torch.testing.assert_close(a(x), 8.0 * b(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf")])
def test_l_constant_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="l_constant"):
        mlp([4, 4, 2], "relu", None, l_constant=bad)


def test_lnets_init_is_orthogonal_with_gain_one_over_sqrt_fan_in():
    torch.manual_seed(0)
    net = mlp([16, 16, 32, 4], "relu", None, init="lnets")
    for layer in (m for m in net if isinstance(m, torch.nn.Linear)):
        n = layer.in_features
        w = layer.weight.detach().double()
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        torch.testing.assert_close(gram * n, torch.eye(min(w.shape), dtype=torch.float64), atol=1e-5, rtol=0)
        assert float(layer.bias.detach().abs().max()) <= 1 / n**0.5
    torch.manual_seed(0)
    default = mlp([16, 16, 32, 4], "relu", None)
    assert not torch.allclose(default[0].weight, net[0].weight)  # PyTorch's init is another
    with pytest.raises(ValueError, match="unknown init 'xavier'"):
        mlp([4, 4], init="xavier")
