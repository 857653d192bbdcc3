"""The networks of Li et al.'s Table 1 and Anil et al.'s LeNet (lipsort.conv.networks)."""

import pytest
import torch

from lipsort import conv as C
from lipsort.certify import lipschitz_upper_bound
from lipsort.conv import BCOP


def _count(net, cls):
    return sum(isinstance(m, cls) for m in net.modules())


def test_small_network_shape_and_layers():
    net = C.bcop_small("bcop")
    assert _count(net, BCOP) == 2
    convs = [m for m in net.modules() if isinstance(m, BCOP)]
    # conv16 4x4/2 and conv32 4x4/2 become 2x2 convolutions on 4x the channels.
    assert [(m.in_channels, m.out_channels, m.kernel_size) for m in convs] == [
        (4, 16, (2, 2)), (64, 32, (2, 2))]
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32 * 7 * 7, 100), (100, 10)]


def test_large_network_shape_and_layers():
    net = C.bcop_large("rko")
    convs = [m for m in net.modules() if isinstance(m, C.RKO)]
    assert [(m.in_channels, m.out_channels, m.kernel_size[0]) for m in convs] == [
        (1, 32, 3), (128, 32, 2), (32, 64, 3), (256, 64, 2)]
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3136, 512), (512, 512), (512, 10)]
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_cifar_geometry():
    net = C.bcop_small("ossn", in_channels=3, input_size=32)
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("conv", C.CONVS)
def test_small_networks_are_certified_1_lipschitz(conv):
    torch.manual_seed(0)
    net = C.bcop_small(conv)
    net.train()(torch.rand(4, 1, 28, 28))  # OSSN's power iterations
    bound = float(lipschitz_upper_bound(net.eval()))
    if conv == "ossn":
        assert bound < 1.1  # power iteration underestimates each norm slightly
    else:
        assert bound <= 1 + 1e-4
    if conv == "bcop":
        assert bound >= 1 - 1e-4  # every layer is exactly norm 1


def test_fc3_is_the_anil_mlp():
    net = C.fc3()
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.weight.shape for m in linears] == [(1024, 784), (1024, 1024), (1024, 1024), (10, 1024)]


def test_lenet_variants_and_bounds():
    torch.manual_seed(0)
    for conv in ("standard", "bjorck", "rko"):
        assert C.lenet(conv)(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    rko = [m for m in C.lenet("rko").modules() if isinstance(m, C.RKO)]
    bjorck = C.lenet("bjorck")
    scales = [m.factor for m in bjorck.modules() if isinstance(m, C.Scale)]
    assert len(rko) == 2 and scales == [5.0, 5.0]
    # Without the 1/k correction the reshaped-Björck convolution can exceed norm 1.
    layer = [m for m in bjorck.modules() if isinstance(m, torch.nn.Sequential) and len(m) == 2][0]
    x = torch.randn(1, 1, 28, 28)
    layer(x)
    assert float(lipschitz_upper_bound(layer)) > 1.0


def test_freeze_projectors_keeps_them_during_training():
    torch.manual_seed(0)
    net = C.bcop_small("bcop")
    n = C.freeze_projectors(net)
    before = [m.proj_orig.clone() for m in net.modules() if isinstance(m, BCOP)]
    assert n == sum(p.numel() for p in before)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    after = [m.proj_orig for m in net.modules() if isinstance(m, BCOP)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    h = [m.ortho_orig for m in net.modules() if isinstance(m, BCOP)]
    assert all(p.requires_grad for p in h)


def test_freeze_bcop_fixes_every_convolution_parameter_and_trains_the_rest():
    torch.manual_seed(0)
    net = C.bcop_small("bcop")
    n = C.freeze_bcop(net)
    frozen = [p for m in net.modules() if isinstance(m, BCOP) for p in m.parameters()]
    before = [p.clone() for p in frozen]
    free = [p for p in net.parameters() if p.requires_grad]
    assert n == sum(p.numel() for p in frozen) and free  # the dense layers still train
    free0 = [p.clone() for p in free]
    opt = torch.optim.Adam(free, lr=0.1)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, frozen))
    assert any(not torch.equal(a, b) for a, b in zip(free0, free))
    with pytest.raises(ValueError, match="no BCOP"):
        C.freeze_bcop(C.bcop_small("rko"))


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="unknown conv 'svcm'"):
        C.bcop_small("svcm")
    with pytest.raises(ValueError, match="not divisible by the network's strides"):
        C.bcop_small("bcop", input_size=30)
    with pytest.raises(ValueError, match="no BCOP"):
        C.freeze_projectors(C.bcop_small("rko"))
    with pytest.raises(ValueError, match="unknown conv"):
        C.lenet("bcop")
    with pytest.raises(ValueError, match="divisible by 4"):
        C.lenet("standard", input_size=30)


def test_summary_and_guarantee_results_of_table_1_runs():
    from lipsort.experiments import orthogonal_convolutions as xo

    def run(conv, seed, clean, pgd, pgd_cert, lip):
        return xo.Run("mnist", "small", conv, seed, clean, {1.58: pgd_cert, 0.3: 0.9}, pgd, lip,
                      history={}, pgd_certified=pgd_cert)

    runs = [run("bcop", 0, 0.97, 0.80, 0.45, 1.0), run("bcop", 1, 0.99, 0.82, 0.47, 1.00001),
            run("ossn", 0, 0.96, 0.70, 0.44, 1.02)]
    s = xo.summarize(runs, [1.58, 0.3])
    assert s["mnist.small.bcop.clean"] == pytest.approx(98.0)
    assert s["mnist.small.bcop.clean.std"] == pytest.approx(1.0)
    assert s["mnist.small.bcop.cert158"] == pytest.approx(46.0)
    assert "mnist.small.ossn.clean.std" not in s  # one seed: no spread
    g = xo.guarantee_results(runs, "mnist")
    assert g["mnist.pgd_minus_cert_min"] == pytest.approx(26.0)  # OSSN: 70 - 44
    assert g["mnist.max_lipschitz"] == 1.00001  # OSSN's 1.02 is not a by-construction bound
    assert "mnist.max_lipschitz" not in xo.guarantee_results(runs[2:], "mnist")
    with pytest.raises(ValueError, match="no mnist runs"):
        xo.guarantee_results([], "mnist")


def test_curve_results_average_seeds_epoch_by_epoch():
    from lipsort.experiments import orthogonal_convolutions as xo

    def run(seed, accs, certs):
        h = {"epoch": list(range(1, len(accs) + 1)), "eval_acc": accs, "certify_eps": [1.58, 0.3],
             "certified_acc": [[c, 0.9] for c in certs]}
        return xo.Run("mnist", "large", "bcop", seed, accs[-1], {}, None, 1.0, history=h)

    # seed 1 stopped after one epoch: only epoch 1 has both seeds, so only it is kept
    c = xo.curve_results([run(0, [0.9, 0.95], [0.4, 0.5]), run(1, [0.8], [0.2])], [1.58, 0.3])
    assert c == pytest.approx({"mnist.large.bcop.test_acc.e001": 0.85, "mnist.large.bcop.cert158.e001": 0.3,
                               "mnist.large.bcop.cert030.e001": 0.9})
    assert xo.curve_results([], [1.58]) == {}
