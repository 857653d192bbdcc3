"""Chapter 07's training goes through the engine: the plain Adam loop it replaced, per-step
cosine decay, and sweeps that resume from their checkpoints instead of training again."""

import itertools
import os

import pytest
import torch

from lipsort.data import SampleLoader, TensorLoader
from lipsort.experiments.loss_tradeoff import images, toys
from lipsort.training import fit

needs_data = pytest.mark.skipif(not os.environ.get("LIPSORT_DATA"), reason="LIPSORT_DATA is not set")


def _hand_loop(net, loss_fn, batches, lr, schedule=None):
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = None if schedule is None else schedule(opt)
    for xb, yb in batches:
        loss = loss_fn(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    return net


@pytest.mark.parametrize("cosine", [False, True])
def test_train_is_the_plain_adam_loop(cosine):
    def draw(g):
        x = torch.randn(16, 2, generator=g)
        return x, (x[:, 0] > 0).long()

    nets = []
    for how in ("engine", "hand"):
        torch.manual_seed(0)
        net = toys.lipschitz_net(2, (8, 8), 1, n_iters=3)
        data = SampleLoader(draw, 12, seed=3)
        schedule = images.cosine(12) if cosine else None
        if how == "engine":
            toys.train(net, toys.make_loss(("tau", 4.0)), data, lr=1e-2, schedule=schedule)
        else:
            _hand_loop(net, toys.make_loss(("tau", 4.0)), data, 1e-2, schedule)
        nets.append(net.state_dict())
    assert all(torch.equal(nets[0][k], nets[1][k]) for k in nets[0])
    torch.manual_seed(0)
    untrained = toys.lipschitz_net(2, (8, 8), 1, n_iters=3).state_dict()
    assert any(not torch.equal(nets[0][k], untrained[k]) for k in untrained)  # it did train


def test_cosine_reaches_one_percent_at_the_last_step():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched, lrs = images.cosine(5)(opt), []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 1.0 and lrs[5] == pytest.approx(0.01) and lrs[6] == pytest.approx(0.01)
    assert all(a > b for a, b in itertools.pairwise(lrs[:6]))


@needs_data
def test_sweeps_resume_from_their_checkpoints(tmp_path, monkeypatch):
    kw = {"widths": (16, 16), "epochs": 3, "batch_size": 20, "n_iters": 3, "checkpoint_dir": str(tmp_path)}
    first = images.random_labels(40, **kw)
    assert len(first["accuracy"]) == 4 and len(list(tmp_path.glob("b6-random-labels-*.pt"))) == 1
    # Asked again, the finished checkpoint is returned: no optimizer step is taken.
    monkeypatch.setattr(torch.optim.Adam, "step", lambda *a, **k: pytest.fail("trained again"))
    again = images.random_labels(40, **kw)
    assert again == first
    # Another setting is another checkpoint, never the old one resumed.
    monkeypatch.undo()
    images.random_labels(40, **{**kw, "epochs": 2})
    assert len(list(tmp_path.glob("b6-random-labels-*.pt"))) == 2


def test_fixed_step_data_through_fit_takes_exactly_that_many_steps():
    x, y = torch.randn(10, 2), torch.randint(0, 2, (10,))
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    calls = []
    step = opt.step
    opt.step = lambda *a, **k: (calls.append(1), step(*a, **k))[1]
    fit(net, opt, torch.nn.CrossEntropyLoss(), TensorLoader((x, y), 4, batches=7), 1, progress=False)
    assert len(calls) == 7
