"""Activation modules: shapes, any dim, clear errors, state, and 1-Lipschitz behaviour."""

import pytest
import torch

import lipsort
from lipsort import functional as F


@pytest.mark.parametrize(
    "module,fn",
    [
        (lipsort.GroupSort(4), lambda x: F.group_sort(x, 4)),
        (lipsort.MaxMin(), F.max_min),
        (lipsort.FullSort(), F.full_sort),
    ],
)
def test_modules_match_functional_on_images(module, fn):
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(module(x), fn(x))
    assert module(x).shape == x.shape


def test_dim_argument_for_channels_last():
    x = torch.randn(3, 5, 5, 6)
    y = lipsort.GroupSort(3, dim=-1)(x)
    assert torch.equal(y, F.group_sort(x.movedim(-1, 1), 3).movedim(1, -1))


def test_maxmin_keeps_unit_count():
    # The paper's MaxMin is GroupSort(2): no channel doubling.
    assert lipsort.MaxMin()(torch.randn(4, 10)).shape == (4, 10)


def test_group_size_error_names_both_numbers():
    with pytest.raises(ValueError, match=r"group_size=3 does not divide the 8 units"):
        lipsort.GroupSort(3)(torch.randn(2, 8))
    with pytest.raises(ValueError, match="positive integer"):
        lipsort.GroupSort(0)


def test_activations_are_1_lipschitz_in_l2_and_linf():
    g = torch.Generator().manual_seed(0)
    for act in (lipsort.GroupSort(4), lipsort.MaxMin(), lipsort.FullSort()):
        x, y = torch.randn(256, 16, generator=g), torch.randn(256, 16, generator=g)
        for p in (2, float("inf")):
            lhs = torch.linalg.vector_norm(act(x) - act(y), p, dim=1)
            rhs = torch.linalg.vector_norm(x - y, p, dim=1)
            assert (lhs <= rhs + 1e-6).all()


def test_modules_have_no_state_and_repr():
    m = lipsort.GroupSort(4, dim=2)
    assert m.state_dict() == {} and "group_size=4, dim=2" in repr(m)
