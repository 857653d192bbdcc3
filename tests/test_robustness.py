"""Chapter 05 glue: the A8/A9 training recipes resume exactly from their checkpoints, the A8
net stays inside its ℓ∞ constraint, and the A10 statistics follow their definitions."""

from __future__ import annotations

import pytest
import torch

from lipsort.certify import lipschitz_upper_bound
from lipsort.experiments import robustness as xr
from lipsort.runtime import num_threads
from lipsort.training import evaluate


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def _run(method, epochs, ckpt_dir, **kw):
    torch.manual_seed(0)
    net = xr.build("maxmin" if method == "hinge" else "relu", None, 8, depth=2,
                   l_constant=1000.0 if method == "hinge" else None)
    data = _data()
    return xr.train(f"t.{method}", net, method, data, data, epochs=epochs, batch_size=16,
                    lr=3.3e-3 if method == "hinge" else 1e-3, milestones=[2],
                    pgd_steps=2, checkpoint_dir=ckpt_dir, **kw)


@pytest.mark.parametrize("method", ["hinge", "pgd"])
def test_interrupted_run_resumes_to_the_same_weights(tmp_path, method):
    with num_threads(1):
        whole = _run(method, 3, str(tmp_path / "a"))
        first = _run(method, 2, str(tmp_path / "b"))
        resumed = _run(method, 3, str(tmp_path / "b"))
    assert first.resumed_from is None and resumed.resumed_from == 2
    (path,) = (tmp_path / "b").glob(f"t.{method}-*.pt")  # named by the run's settings
    with num_threads(1):
        _run(method, 1, str(tmp_path / "b"), margin=0.5)  # another recipe: another checkpoint
    assert len(list((tmp_path / "b").glob(f"t.{method}-*.pt"))) == 2 and path.is_file()
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert whole.history["lr"] == [1e-3 if method == "pgd" else 3.3e-3] * 2 + [pytest.approx(
        (1e-3 if method == "pgd" else 3.3e-3) * 0.1)]


def test_the_init_names_the_checkpoint(tmp_path):
    data = _data()
    for init in ("torch", "lnets", "torch"):  # the default again: its first checkpoint resumes
        torch.manual_seed(0)
        net = xr.build("relu", None, 8, depth=2, init=init)
        result = xr.train("t.init", net, "standard", data, data, epochs=1, batch_size=16, lr=1e-3,
                          milestones=[], checkpoint_dir=str(tmp_path))
    assert len(list(tmp_path.glob("t.init-*.pt"))) == 2 and result.resumed_from == 1
    assert net.init == "torch" and xr.build("relu", None, 8, init="lnets").init == "lnets"


def test_hinge_net_is_l_constant_lipschitz_in_linf():
    result = _run("hinge", 1, "")
    bound = float(lipschitz_upper_bound(result.model, "linf"))
    assert bound <= 1000.0 * (1 + 1e-6)
    for m in result.model:
        if isinstance(m, torch.nn.Linear):  # projected after every step: rows in the ℓ1 ball
            assert float(m.weight.detach().double().abs().sum(1).max()) <= 1.0


def test_the_authors_sphere_projection_keeps_every_row_on_the_sphere(tmp_path):
    with num_threads(1):
        ball = _run("hinge", 1, str(tmp_path))
        sphere = _run("hinge", 1, str(tmp_path), linf_projection="sphere")
    assert len(list(tmp_path.glob("t.hinge-*.pt"))) == 2  # another projection, another checkpoint
    sums = torch.cat([m.weight.detach().abs().sum(1, dtype=torch.float64) for m in sphere.model
                      if isinstance(m, torch.nn.Linear)])
    assert float(sums.max()) <= 1.0 and float(sums.min()) > 1 - 1e-5
    assert xr.rows_inside_ball(sphere.model) == 0.0 < xr.rows_inside_ball(ball.model)
    assert float(lipschitz_upper_bound(sphere.model, "linf")) <= 1000.0 * (1 + 1e-6)
    with pytest.raises(ValueError, match="linf_projection must be 'ball' or 'sphere', got 'box'"):
        xr.train("x", xr.build("relu", None, 8), "hinge", _data(), _data(), epochs=1, batch_size=8,
                 lr=1e-3, milestones=[], linf_projection="box")


def test_validation_split_is_the_held_out_part(monkeypatch):
    from lipsort import data

    ids, labels = torch.arange(200.0), torch.arange(200) % 10  # image i is the number i
    test = (torch.arange(1000.0, 1030.0), torch.arange(30) % 10)
    monkeypatch.setattr(data, "mnist", lambda train=True: (ids, labels) if train else test)
    for per_class in (None, 5):
        (x, y), none, (xt, yt) = xr.load_split("mnist", per_class, 20)
        (x2, y2), (xv, yv), (xt2, _) = xr.load_split("mnist", per_class, 20, n_val=None)
        assert none is None and torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(xt, xt2)
        assert len(xt) == 20
        assert len(x) == (180 if per_class is None else 50)
        # Every training image is in exactly one of the two parts; the held-out ones in order.
        assert sorted(torch.cat([x, xv]).tolist()) == ids.tolist() and xv.tolist() == sorted(xv.tolist())
        assert torch.equal(yv, labels[xv.long()])
        (_, _), (xv5, _), _ = xr.load_split("mnist", per_class, 20, n_val=5)
        assert torch.equal(xv5, xv[:5])
    with pytest.raises(ValueError, match="n_val=21 asks for more than the 20 training images left out"):
        xr.load_split("mnist", None, 20, n_val=21)
    with pytest.raises(ValueError, match="n_val must be a non-negative integer or None"):
        xr.load_split("mnist", None, 20, n_val=-1)
    with pytest.raises(ValueError, match=r"no training image is left out of the split for validation \(n_val=None\)"):
        xr.load_split("mnist", None, 20, train_fraction=1.0, n_val=None)


def test_validation_returns_the_best_epoch_under_its_own_name(tmp_path):
    val = _data(40, seed=1)
    with num_threads(1):
        final = _run("pgd", 3, str(tmp_path))
        best = _run("pgd", 3, str(tmp_path), val_data=val)
    assert len(list(tmp_path.glob("t.pgd-*.pt"))) == 2  # a validated run has its own checkpoint
    acc = best.history["val_acc"]
    assert best.best_epoch == acc.index(max(acc)) + 1 and final.best_epoch is None
    assert best.history["eval_acc"] == final.history["eval_acc"]  # the same training
    # The model holds the kept weights (here epoch 1's: random labels, a tie), not the last.
    weights, last = best.model.state_dict(), final.model.state_dict()
    assert best.best_epoch < 3 and all(torch.equal(weights[k], best.best_state[k]) for k in weights)
    assert not all(torch.equal(weights[k], last[k]) for k in weights)
    assert evaluate(best.model, [val])["acc"] == max(acc)
    with num_threads(1):  # a finished run read back: the kept weights again
        again = _run("pgd", 3, str(tmp_path), val_data=val)
    assert again.already_done and all(torch.equal(v, weights[k]) for k, v in again.model.state_dict().items())


def test_bad_method_and_dataset_are_named():
    with pytest.raises(ValueError, match="method"):
        xr.train("x", xr.build("relu", None, 8), "adversarial", _data(), _data(), epochs=1,
                 batch_size=8, lr=1e-3, milestones=[])
    with pytest.raises(ValueError, match="dataset"):
        xr.load_split("cifar10")


def test_undead_rates_by_hand():
    net = xr.build("relu", None, 4, depth=1)
    with torch.no_grad():  # unit i is on for inputs whose first pixel exceeds i/4
        net[1].weight.zero_()
        net[1].weight[:, 0] = 1.0
        net[1].bias.copy_(-torch.arange(4) / 4)
    x = torch.zeros(100, 1, 28, 28)
    x[:, 0, 0, 0] = (torch.arange(100) + 0.5) / 100
    rates = xr.undead_rates(net.train(), x, [0.0, 0.5, 0.76, 1.0])
    # units are active on fractions 1, 0.75, 0.5, 0.25 of the inputs
    assert rates[:, 0].tolist() == [1.0, 0.75, 0.25, 0.25]
    assert all(m.training for m in net.modules())  # the caller's mode, back


def test_input_gradient_norm_of_a_linear_net():
    net = xr.build("relu", None, 4, depth=0)  # Flatten then one Linear: the gradient is a row
    x, y = _data(5)
    expected = net[1].weight[y].norm(dim=1)
    torch.testing.assert_close(xr.input_gradient_norms(net.train(), x, y), expected.detach())
    assert all(m.training for m in net.modules())


def test_robust_models_keeps_the_order_asked_and_names_unknown_ones():
    assert list(xr.robust_models(["relu", "maxmin_linf"])) == ["relu", "maxmin_linf"]
    with pytest.raises(ValueError, match=r"unknown robust network\(s\) \['maxmin'\]; choose from"):
        xr.robust_models(["maxmin"])
    with pytest.raises(ValueError, match="needs at least one"):
        xr.robust_models([])


def test_a6_and_a10_results_leave_out_what_a_run_did_not_train():
    import pandas as pd

    from types import SimpleNamespace

    def run(*accs):
        return SimpleNamespace(history={"epoch": list(range(1, len(accs) + 1)), "eval_acc": list(accs)})

    runs = {("relu", None): run(0.8, 0.9), ("maxmin", "bjorck"): run(0.85)}
    out = xr.a6_results(runs, pd.DataFrame({"test acc": [0.9, 0.85], "L bound": [40.0, 1.0]}))
    assert out == pytest.approx({"a6.relu.standard.acc": 0.9, "a6.maxmin.bjorck.acc": 0.85,
                                 "a6.gap.maxmin_bjorck": 0.05, "a6.relu.standard.test_acc.e001": 0.8,
                                 "a6.relu.standard.test_acc.e002": 0.9, "a6.maxmin.bjorck.test_acc.e001": 0.85})
    runs = {("relu", "parseval"): run(0.7), ("relu", None): run(0.9), ("maxmin", "parseval"): run(0.8)}
    out = xr.a6_results(runs, pd.DataFrame({"test acc": [0.7, 0.9, 0.8], "L bound": [0.98, 40.0, 0.99]}))
    assert out["a6.parseval.max_lipschitz"] == 0.99 and out["a6.relu.parseval.acc"] == 0.7
    empty = xr.a6_table({}, (torch.zeros(0, 784), torch.zeros(0, dtype=torch.long)), n_check=1)
    assert xr.a6_results({}, empty) == {} and "seconds/epoch" in empty.columns
    t = torch.linspace(0, 1, 50, dtype=torch.float64)
    undead = {"ReLU, standard": torch.full((50, 3), 0.2, dtype=torch.float64),
              "ReLU, Björck": torch.full((50, 3), 0.5, dtype=torch.float64)}
    grads = {"ReLU, standard": torch.tensor([2.0]), "ReLU, Björck": torch.tensor([0.5])}
    out = xr.a10_results(undead, grads, t)
    assert out == pytest.approx({"a10.undead_t0.9.relu.standard": 0.2, "a10.gradnorm_mean.relu.standard": 2.0,
                                 "a10.undead_t0.9.relu.bjorck": 0.5, "a10.gradnorm_mean.relu.bjorck": 0.5,
                                 "a10.undead_t0.9.bjorck_minus_standard.relu": 0.3})
    assert xr.a10_results({}, {}, t) == {}


def test_curve_results_keep_every_epochs_test_accuracy():
    from types import SimpleNamespace

    runs = {"relu": SimpleNamespace(history={"epoch": [1, 2], "eval_acc": [0.5, 0.75]})}
    assert xr.curve_results("mnist", runs) == {"mnist.relu.test_acc.e001": 0.5, "mnist.relu.test_acc.e002": 0.75}


def test_robust_results_of_one_data_set_and_the_stacked_table():
    import pandas as pd

    from types import SimpleNamespace

    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[0.5, 0.5], [0.2, -0.1]]))  # second row inside the ball
    runs = {name: SimpleNamespace(model=net, history={"epoch": [1], "eval_acc": [0.7]})
            for name in ("maxmin_linf", "relu_linf", "relu")}
    # (certified, attack, search) at ε = 0.1 and 0.3; the attacks' smallest gap is 0.1, the
    # search's 0.03 (MaxMin at 0.3).
    rows = [{"model": m, "eps": e, "clean": 0.9, "certified": c, "attack": a, "search": f,
             "vanishing": 0.2 if m == "maxmin_linf" else 0.0, "L": 2.0}
            for m, pts in {"maxmin_linf": [(0.6, 0.8, 0.9), (0.2, 0.5, 0.23)],
                           "relu_linf": [(0.5, 0.6, 0.7), (0.1, 0.3, 0.4)],
                           "relu": [(0.0, 0.4, 0.5), (0.0, 0.1, 0.2)]}.items()
            for e, (c, a, f) in zip((0.1, 0.3), pts)]
    curves = pd.DataFrame(rows)
    out = xr.robust_results("fashion", runs, curves)
    assert out["fashion.attack0.3.maxmin_minus_relu_linf"] == pytest.approx(0.2)
    assert out["fashion.min_attack_minus_certified"] == pytest.approx(0.03)
    assert out["fashion.maxmin_linf.eps0.3.search"] == 0.23
    assert out["fashion.maxmin_linf.vanishing_gradient"] == 0.2
    assert out["fashion.min_search_minus_vanishing"] == pytest.approx(0.03)  # MaxMin at 0.3
    assert out["fashion.relu.eps0.1.attack"] == 0.4 and out["fashion.relu_linf.lipschitz"] == 2.0
    # Without the search (its column NaN) neither its keys nor its gap.
    no_search = xr.robust_results("fashion", runs, curves.assign(search=float("nan")))
    assert no_search["fashion.min_attack_minus_certified"] == pytest.approx(0.1)
    assert not any(k.endswith(".search") for k in no_search)
    assert "fashion.min_search_minus_vanishing" not in no_search
    assert out["fashion.maxmin_linf.rows_inside_ball"] == pytest.approx(0.5)
    assert "fashion.relu.rows_inside_ball" not in out and out["fashion.relu.test_acc.e001"] == 0.7
    # Without both hinge nets there is no MaxMin-minus-ReLU difference.
    assert "fashion.attack0.3.maxmin_minus_relu_linf" not in xr.robust_results(
        "fashion", {"relu": runs["relu"]}, curves[curves.model == "relu"])
    table = xr.curve_table({"MNIST": curves, "Fashion-MNIST": curves[curves.model == "relu"]})
    assert list(table.index.names) == ["data set", "model", "measure"]
    assert table.loc[("MNIST", "maxmin_linf", "attack"), 0.3] == 0.5
    assert table.loc[("MNIST", "maxmin_linf", "search"), 0.3] == 0.23
    assert list(table.loc["MNIST"].loc["maxmin_linf"].index) == ["certified", "attack", "search"]
    assert list(dict.fromkeys(table.loc["MNIST"].index.get_level_values("model"))) == list(
        dict.fromkeys(curves.model))  # the curves' order, not the alphabet's
    assert list(table.columns) == sorted(set(curves.eps))
    no_search = xr.curve_table({"MNIST": curves.assign(search=float("nan"))})
    assert "search" not in no_search.index.get_level_values("measure")


def test_rows_inside_ball_counts_rows_strictly_inside_after_the_projection():
    from lipsort.optim import project_linf_

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with torch.no_grad():
        for m in (net[0], net[2]):
            m.weight.mul_(10)
    project_linf_(net)  # every row is outside: all land on the sphere
    assert xr.rows_inside_ball(net) == 0.0
    with torch.no_grad():
        net[0].weight[:2] *= 0.5
    assert xr.rows_inside_ball(net) == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match="no plain nn.Linear"):
        xr.rows_inside_ball(torch.nn.ReLU())


def test_parseval_net_is_retracted_after_every_update(tmp_path):
    data = _data()
    with num_threads(1):
        torch.manual_seed(0)
        standard = xr.train("t.p", xr.build("relu", None, 8, depth=2), "standard", data, data, epochs=2,
                            batch_size=16, lr=1e-2, milestones=[], checkpoint_dir=str(tmp_path))
        torch.manual_seed(0)
        net = xr.build("relu", "parseval", 8, depth=2)
        assert net.parseval and str(net) == str(standard.model)  # the same layers
        parseval = xr.train("t.p", net, "standard", data, data, epochs=2, batch_size=16, lr=1e-2,
                            milestones=[], checkpoint_dir=str(tmp_path))
    assert len(list(tmp_path.glob("t.p-*.pt"))) == 2  # its own checkpoint
    linears = [m for m in parseval.model if isinstance(m, torch.nn.Linear)]
    norms = [float(torch.linalg.matrix_norm(m.weight.detach().double(), 2)) for m in linears]
    assert max(norms) <= 1 + 1e-5 and float(lipschitz_upper_bound(parseval.model)) <= 1 + 1e-5
    assert float(lipschitz_upper_bound(standard.model)) > 1.5  # the same run without the steps
    with pytest.raises(ValueError, match="a Parseval network trains with method 'standard' or 'pgd'"):
        xr.train("x", xr.build("relu", "parseval", 8), "hinge", data, data, epochs=1, batch_size=8,
                 lr=1e-3, milestones=[])


def test_attacked_images_are_the_test_or_the_held_out_ones():
    val, test = ("val",), ("test",)
    assert xr.attacked_images("test", val, test) is test and xr.attacked_images("test", None, test) is test
    assert xr.attacked_images("validation", val, test) is val
    with pytest.raises(ValueError, match="needs held-out training images: set n_val"):
        xr.attacked_images("validation", None, test)
    with pytest.raises(ValueError, match="attack_split must be 'test' or 'validation', got 'train'"):
        xr.attacked_images("train", val, test)
