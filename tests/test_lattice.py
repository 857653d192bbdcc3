"""The hand-built MaxMin network equals its 1-Lipschitz PWL target exactly (chapter 02)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lipsort import MaxMin
from lipsort.certify import lipschitz_upper_bound
from lipsort.functional import operator_norm
from lipsort.lattice import LatticeForm, lattice_pieces, maxmin_network, pwl_eval
from tests.reference import random_target


def check_exact(xs, ys):
    net = maxmin_network(xs, ys)
    grid = torch.cat([torch.linspace(float(xs[0]) - 10, float(xs[-1]) + 10, 1001, dtype=torch.float64), xs])
    with torch.no_grad():
        out = net(grid[:, None]).squeeze(1)
    err = (out - pwl_eval(xs, ys, grid)).abs().max().item()
    # Round-off scales with the magnitudes the affine pieces see: the grid reaches 10 past xs.
    scale = 1 + float(ys.abs().max()) + float(grid.abs().max())
    assert err <= 1e-12 * scale
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert all(isinstance(m, (nn.Linear, MaxMin)) for m in net)
    assert all(float(operator_norm(m.weight.detach(), "inf")) <= 1.0 for m in linears)
    assert float(lipschitz_upper_bound(net, norm="linf")) <= 1.0
    # The reference max-min evaluation agrees too (the network implements the lattice form).
    form = lattice_pieces(xs, ys)
    assert (form(grid) - out).abs().max().item() <= 1e-12 * scale
    return net


def test_random_targets_exact_and_linf_bounded():
    gen = torch.Generator().manual_seed(0)
    depths = set()
    for trial in range(80):
        n = int(torch.randint(2, 16, (1,), generator=gen))
        net = check_exact(*random_target(gen, n, extreme=trial % 3 == 0))
        depths.add(sum(isinstance(m, MaxMin) for m in net))
    assert max(depths) >= 4  # the loop exercised deep min/max trees, not just trivial ones


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(0.01, 3.0), min_size=1, max_size=10),
    st.lists(st.floats(-1.0, 1.0), min_size=10, max_size=10),
    st.floats(-5, 5),
)
def test_hypothesis_targets(dxs, slopes, y0):
    dx = torch.tensor(dxs, dtype=torch.float64)
    s = torch.tensor(slopes[: len(dxs)], dtype=torch.float64)
    xs = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(dx, 0)])
    ys = y0 + torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(s * dx, 0)])
    check_exact(xs, ys)


def test_known_forms():
    # |x| = max(-x, x): two singleton sets, one MaxMin layer.
    form = lattice_pieces([-1.0, 0.0, 1.0], [1.0, 0.0, 1.0])
    assert form.sets == ((0,), (1,))
    # A tent min(x + 1, 1 - x) is one set of two pieces.
    form = lattice_pieces([-1.0, 0.0, 1.0], [0.0, 1.0, 0.0])
    assert form.sets == ((0, 1),)
    # An affine function: one piece, no MaxMin layer; collinear breakpoints merge.
    net = maxmin_network([0.0, 1.0, 2.0, 3.0], [0.0, 0.5, 1.0, 1.5])
    assert [type(m) for m in net] == [nn.Linear]
    assert net(torch.tensor([[10.0]], dtype=torch.float64)).item() == 5.0


def test_slope_one_within_rounding_is_accepted_and_clamped():
    xs = torch.tensor([0.0, 0.1, 0.3], dtype=torch.float64)
    ys = torch.tensor([0.0, 0.1, -0.1], dtype=torch.float64)  # slopes 1 and -1 up to rounding
    net = check_exact(xs, ys)
    assert float(operator_norm(net[0].weight.detach(), "inf")) == 1.0


@pytest.mark.parametrize(
    "xs, ys, match",
    [
        ([0.0, 1.0, 2.0], [0.0, 0.5, 2.0], r"not 1-Lipschitz: segment 1 .* slope 1.5"),
        ([0.0, 1.0], [0.0, -1.001], "not 1-Lipschitz"),
        ([0.0, 0.0, 1.0], [0.0, 0.0, 0.0], "strictly increasing"),
        ([0.0], [0.0], "at least two breakpoints"),
        ([0.0, 1.0], [0.0, float("nan")], "finite"),
        ([0.0, 1.0, 2.0], [0.0, 1.0], "same length"),
    ],
)
def test_bad_targets_rejected(xs, ys, match):
    with pytest.raises(ValueError, match=match):
        maxmin_network(xs, ys)


def test_argument_errors():
    form = lattice_pieces([0.0, 1.0], [0.0, 1.0])
    assert isinstance(form, LatticeForm)
    with pytest.raises(ValueError, match="not both"):
        maxmin_network(form, [0.0, 1.0])
    with pytest.raises(ValueError, match="needs the values ys"):
        maxmin_network([0.0, 1.0])
