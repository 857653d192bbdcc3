"""The training engine: schedules, exact resume after a real interruption, checkpoint safety,
the ℓ∞ projected gradient, adversarial-training hooks and two-process data parallelism."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from lipsort.training import checkpoint as ckpt
from lipsort.attacks import pgd_training_transform
from lipsort.certify import certified_accuracy, lipschitz_upper_bound
from lipsort.data import loader
from lipsort.models import mlp
from lipsort.optim import project_linf_
from lipsort.parametrizations import linf_projected
from lipsort.training import ANIL_SCHEDULE, BCOP_SCHEDULE, Schedule, evaluate, fit

D = torch.float64
HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("_training_worker", HERE / "_training_worker.py")
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}


@pytest.fixture(autouse=True)
def _one_thread():
    # Bit-for-bit comparisons with the worker processes, which run at one thread.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _reference(epochs: int) -> dict:
    net, kwargs = worker.noisy_problem()
    return fit(net, epochs=epochs, **kwargs).model.state_dict()


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize(
    ("schedule", "torch_factory"),
    [
        (ANIL_SCHEDULE, lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [60, 100, 150], 0.1)),
        (Schedule.step_every(60, 0.1), lambda o: torch.optim.lr_scheduler.StepLR(o, 60, 0.1)),
        (BCOP_SCHEDULE, lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.96235062639)),
        (Schedule.constant(), lambda o: torch.optim.lr_scheduler.ConstantLR(o, 1.0)),
    ],
)
def test_schedules_follow_their_formula_and_torch(schedule, torch_factory):
    lrs = {}
    for name, factory in (("ours", schedule), ("torch", torch_factory)):
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-3)
        sched, seq = factory(opt), []
        for _ in range(200):
            seq.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        lrs[name] = seq
    formula = [1e-3 * schedule.factor(e) for e in range(200)]
    assert lrs["ours"] == pytest.approx(lrs["torch"], rel=1e-12)
    assert lrs["ours"] == pytest.approx(formula, rel=1e-10)


def test_cosine_schedule_steps_per_optimizer_step_and_resumes(tmp_path):
    """Keras' CosineDecay(1e-2, T, alpha): per step, down to alpha·lr at T, constant after."""
    s = Schedule.cosine(10, alpha=0.01)
    assert s.per_step and not ANIL_SCHEDULE.per_step
    assert [s.factor(t) for t in (0, 5, 10, 12)] == pytest.approx([1.0, 0.505, 0.01, 0.01])
    torch_lrs = []
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-2)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10, eta_min=1e-4)
    for _ in range(10):
        torch_lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert [1e-2 * s.factor(t) for t in range(10)] == pytest.approx(torch_lrs, rel=1e-10)

    # In fit: 6 batches per epoch, so epoch e starts at step 6e and the rate moves every step.
    def run(epochs, path=None, fail_at=None):
        net, kwargs = worker.noisy_problem()
        calls = []
        jitter = kwargs["input_transform"]

        def transform(model, x, y):
            calls.append(1)
            if len(calls) == fail_at:
                raise KeyboardInterrupt
            return jitter(model, x, y)

        kwargs = {**kwargs, "schedule": Schedule.cosine(24, 0.1), "input_transform": transform}
        return fit(net, epochs=epochs, checkpoint=path, **kwargs)

    whole = run(4)
    lr0 = whole.history["lr"][0]
    assert whole.history["lr"] == pytest.approx([lr0 * Schedule.cosine(24, 0.1).factor(6 * e) for e in range(4)])
    path = tmp_path / "cos.pt"
    with pytest.raises(KeyboardInterrupt):
        run(4, path, fail_at=15)  # mid-epoch 3
    resumed = run(4, path)
    assert resumed.resumed_from == 2
    assert _same_state(resumed.model.state_dict(), whole.model.state_dict())
    # Another total is another schedule: the checkpoint is refused, by name.
    net, kwargs = worker.noisy_problem()
    with pytest.raises(ckpt.CheckpointError, match="its scheduler"):
        fit(net, epochs=4, checkpoint=path, **{**kwargs, "schedule": Schedule.cosine(30, 0.1)})


def test_metrics_are_kept_in_the_checkpoint_across_a_resume(tmp_path):
    def norms(model):  # in eval mode (dropout off), without gradients
        assert not model.training and not torch.is_grad_enabled()
        return {"w_norm": model[0].weight.norm()}

    net, kwargs = worker.noisy_problem()
    whole = fit(net, epochs=4, metrics=norms, **kwargs).history["w_norm"]
    assert len(whole) == 4 and len(set(whole)) == 4  # one value per epoch, and it moves
    path = tmp_path / "m.pt"
    net, kwargs = worker.noisy_problem()
    fit(net, epochs=2, checkpoint=path, metrics=norms, **kwargs)
    net, kwargs = worker.noisy_problem()
    resumed = fit(net, epochs=4, checkpoint=path, metrics=norms, **kwargs)
    assert resumed.resumed_from == 2 and resumed.history["w_norm"] == whole
    assert torch.load(path, weights_only=True)["history"]["w_norm"] == whole
    net, kwargs = worker.noisy_problem()
    with pytest.raises(ValueError, match=r"\['lr'\] are the history's own"):
        fit(net, epochs=1, metrics=lambda m: {"lr": 1.0}, **kwargs)


def test_paper_schedules():
    assert [ANIL_SCHEDULE.factor(e) for e in (59, 60, 99, 100, 149, 150)] == pytest.approx(
        [1, 0.1, 0.1, 0.01, 0.01, 0.001]
    )
    # BCOP's per-epoch factor is the 60th root of 0.1.
    assert BCOP_SCHEDULE.factor(60) == pytest.approx(0.1, rel=1e-9)
    assert Schedule.step_every(60).factor(119) == pytest.approx(0.1)
    for bad, match in [
        (lambda: Schedule.multistep([100, 60]), "increasing"),
        (lambda: Schedule.step_every(0), "step_size"),
        (lambda: Schedule.exponential(float("nan")), "gamma"),
        (lambda: Schedule("linear"), "unknown schedule"),
        (lambda: Schedule.cosine(0), r"total \(optimizer steps\) must be a positive integer"),
        (lambda: Schedule.cosine(10, alpha=2.0), "alpha must be a number in"),
    ]:
        with pytest.raises(ValueError, match=match):
            bad()


# --------------------------------------------------------------------------- fit and resume


def test_history_checkpoint_and_certified_accuracy(tmp_path):
    net, kwargs = worker.ddp_problem()  # a Björck net with certify_eps=[0.05]
    path = tmp_path / "run.pt"
    result = fit(net, epochs=3, checkpoint=path, **kwargs)
    h = result.history
    assert h["epoch"] == [1, 2, 3] and h["lr"] == pytest.approx([2e-2, 2e-2, 1e-2])
    assert h["certify_eps"] == [0.05] and result.resumed_from is None
    # The last epoch's numbers are those of the trained model, recomputed independently.
    x, y = kwargs["eval_data"].tensors
    with torch.no_grad():
        logits = net.eval()(x)
    lip = lipschitz_upper_bound(net)
    assert h["lipschitz"][-1] == pytest.approx(float(lip), rel=1e-12)
    assert h["certified_acc"][-1] == [pytest.approx(certified_accuracy(logits, y, 0.05, lip))]
    assert h["eval_acc"][-1] == pytest.approx(float((logits.argmax(1) == y).double().mean()))
    assert h["eval_loss"][-1] == pytest.approx(float(nn.functional.cross_entropy(logits, y)))
    # The checkpoint holds only tensors and plain values, and its history is also JSON.
    payload = torch.load(path, weights_only=True)
    assert payload["epoch"] == 3 and payload["format"] == ckpt.FORMAT
    assert _same_state(payload["model"], net.state_dict())
    rng = payload["rng"]["processes"][0]
    assert isinstance(rng["torch"], torch.Tensor) and isinstance(rng["numpy"]["keys"], torch.Tensor)
    assert isinstance(payload["rng"]["loaders"][0]["generator"], torch.Tensor)
    assert json.loads((tmp_path / "run.pt.json").read_text())["eval_acc"] == h["eval_acc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt", "run.pt.json"]  # no tmp left


def test_resume_after_a_killed_process_is_bit_exact(tmp_path):
    path = tmp_path / "run.pt"
    cmd = [sys.executable, str(HERE / "_training_worker.py"), str(path), "5"]
    killed = subprocess.run(
        [*cmd, "--kill-after", "2"], env=ENV, capture_output=True, text=True, check=False
    )
    assert killed.returncode == -9, killed.stderr  # SIGKILL: no cleanup, no final save
    assert torch.load(path, weights_only=True)["epoch"] == 2
    # Resumed here, in another process than the one that wrote the checkpoint.
    net, kwargs = worker.noisy_problem()
    resumed = fit(net, epochs=5, checkpoint=path, **kwargs)
    assert resumed.resumed_from == 2 and resumed.history["epoch"] == [1, 2, 3, 4, 5]
    assert _same_state(torch.load(path, weights_only=True)["model"], _reference(5))


def test_resume_after_an_exception_mid_epoch_is_bit_exact(tmp_path, monkeypatch):
    expected = _reference(5)
    path = tmp_path / "run.pt"
    net, kwargs = worker.noisy_problem()
    jitter, calls = kwargs["input_transform"], []

    def failing(model, x, y):
        calls.append(1)
        if len(calls) == 14:  # the 3rd batch of epoch 3 (6 batches per epoch)
            raise KeyboardInterrupt
        return jitter(model, x, y)

    with pytest.raises(KeyboardInterrupt):
        fit(net, epochs=5, checkpoint=path, **{**kwargs, "input_transform": failing})
    assert torch.load(path, weights_only=True)["epoch"] == 2
    net, kwargs = worker.noisy_problem()  # a fresh process would rebuild everything
    result = fit(net, epochs=5, checkpoint=path, **kwargs)
    assert result.resumed_from == 2 and _same_state(result.model.state_dict(), expected)

    # Teeth: without restoring the generators, the resumed run drifts away.
    fit(worker.noisy_problem()[0], epochs=2, checkpoint=tmp_path / "b.pt", **kwargs)
    monkeypatch.setattr(ckpt, "set_rng_state", lambda state: None)
    net, kwargs = worker.noisy_problem()
    drifted = fit(net, epochs=5, checkpoint=tmp_path / "b.pt", **kwargs).model.state_dict()
    assert not _same_state(drifted, expected)


def test_finished_checkpoint_is_returned_and_can_be_extended(tmp_path):
    path = tmp_path / "run.pt"
    net, kwargs = worker.noisy_problem()
    first = fit(net, epochs=3, checkpoint=path, **kwargs)
    before = path.read_bytes()

    net, kwargs = worker.noisy_problem()
    boom = torch.optim.Adam(net.parameters(), lr=1e-2)
    boom.step = types.MethodType(lambda self, closure=None: pytest.fail("trained again"), boom)
    again = fit(net, epochs=3, checkpoint=path, **{**kwargs, "optimizer": boom})
    assert again.already_done and again.epochs == 3 and again.history == first.history
    assert _same_state(net.state_dict(), first.model.state_dict()) and path.read_bytes() == before

    # Asking for more epochs continues the run: 3 then 2 more is the 5-epoch run.
    net, kwargs = worker.noisy_problem()
    more = fit(net, epochs=5, checkpoint=path, **kwargs)
    assert more.resumed_from == 3 and _same_state(more.model.state_dict(), _reference(5))
    with pytest.raises(ckpt.CheckpointError, match="holds 5 epochs, more than the 4"):
        fit(worker.noisy_problem()[0], epochs=4, checkpoint=path, **kwargs)
    # Resuming at another thread count works, but says it is no longer bit for bit.
    torch.set_num_threads(2)
    with pytest.warns(UserWarning, match="with 2 torch threads instead of 1.*bit-for-bit"):
        fit(worker.noisy_problem()[0], epochs=6, checkpoint=path, **kwargs)


def _val_problem(seed=4, n_val=60):
    """A learnable problem (points inside a circle) with held-out points, trained at a learning
    rate high enough that the held-out accuracy goes down as well as up."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(80 + n_val, 2, generator=g, dtype=D)
    y = ((x - 0.5).square().sum(1) < 0.1).long()
    torch.manual_seed(0)
    net = mlp([2, 16, 16, 2], "maxmin", None).to(D)
    kwargs = {"optimizer": lambda p: torch.optim.Adam(p, lr=0.1), "loss": nn.CrossEntropyLoss(),
              "train_data": loader((x[:80], y[:80]), 10, seed=3), "progress": False}
    return net, kwargs, loader((x[80:], y[80:]), 30, shuffle=False)


def test_best_validation_epoch_is_kept_and_resumes(tmp_path):
    def run(epochs, validation=True, problem=(), **more):
        net, kwargs, val = _val_problem(*problem)  # fresh: the loaders carry their generators' state
        return fit(net, epochs=epochs, **({"val_data": val} if validation else {}), **kwargs, **more)

    whole = run(8)
    acc = whole.history["val_acc"]
    assert len(acc) == len(whole.history["val_loss"]) == 8
    best = acc.index(max(acc)) + 1  # the first epoch of the highest accuracy
    assert whole.best_epoch == best and best < 8 and acc[-1] < max(acc)
    # Its weights are those of the same run stopped there (evaluating changes no training),
    # the model ends at the last epoch, and the kept weights score the recorded accuracy.
    assert _same_state(whole.best_state, run(best, validation=False).model.state_dict())
    assert _same_state(whole.model.state_dict(), run(8, validation=False).model.state_dict())
    whole.model.load_state_dict(whole.best_state)
    assert evaluate(whole.model, _val_problem()[2])["acc"] == max(acc)
    # On a tie the first of the best epochs is kept, as the authors' strict comparison does.
    tied = run(8, problem=(7, 30))
    acc = tied.history["val_acc"]
    assert acc.count(max(acc)) > 1 and tied.best_epoch == acc.index(max(acc)) + 1
    assert _same_state(tied.best_state, run(tied.best_epoch, validation=False, problem=(7, 30)).model.state_dict())

    # Interrupted after 4 epochs and resumed: the same history, best epoch and weights.
    path = tmp_path / "val.pt"
    run(4, checkpoint=path)
    resumed = run(8, checkpoint=path)
    timed = lambda h: {k: v for k, v in h.items() if k != "seconds"}  # noqa: E731
    assert resumed.resumed_from == 4 and timed(resumed.history) == timed(whole.history)
    assert resumed.best_epoch == best and _same_state(resumed.best_state, whole.best_state)
    done = run(8, checkpoint=path)
    assert done.already_done and done.best_epoch == best and _same_state(done.best_state, whole.best_state)

    # A run with validation and one without are different runs.
    with pytest.raises(ckpt.CheckpointError, match="its validation is True, this run's is None"):
        run(8, validation=False, checkpoint=path)
    plain = tmp_path / "plain.pt"
    run(1, validation=False, checkpoint=plain)
    with pytest.raises(ckpt.CheckpointError, match="its validation is None, this run's is True"):
        run(2, checkpoint=plain)
    assert run(1, validation=False).best_state is None
    soft = [(torch.rand(4, 2, dtype=D), torch.rand(4, 2, dtype=D))]
    with pytest.raises(ValueError, match="val_data must have integer class labels"):
        fit(nn.Linear(2, 2).to(D), lambda p: torch.optim.SGD(p, lr=0.1), nn.MSELoss(), soft, 1,
            val_data=soft, progress=False)


class _Opaque:  # a pickled object: weights_only refuses it
    pass


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (lambda good: good[: len(good) // 2], "cannot read checkpoint .*truncated"),
        (lambda good: b"not a checkpoint at all", "cannot read checkpoint"),
        (lambda good: _saved({"weights": torch.ones(3)}), "not a lipsort training checkpoint"),
        (lambda good: _saved({**ckpt.new_checkpoint(), "version": 99}), "version 99"),
        (lambda good: pickle.dumps(_Opaque()), "cannot read checkpoint"),
        (lambda good: _saved(ckpt.new_checkpoint(epoch=1)), "another run"),
    ],
)
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_bad_checkpoints_are_refused_by_name(tmp_path, content, match):
    good = tmp_path / "good.pt"
    fit(*_tiny(), epochs=1, checkpoint=good, progress=False)
    path = tmp_path / "run.pt"
    path.write_bytes(content(good.read_bytes()))
    before = path.read_bytes()
    with pytest.raises(ckpt.CheckpointError, match=match) as info:
        fit(*_tiny(), epochs=2, checkpoint=path, progress=False)
    assert str(path) in str(info.value)
    assert path.read_bytes() == before  # never overwritten by a fresh start


def test_checkpoint_of_another_model_or_optimizer(tmp_path):
    path = tmp_path / "run.pt"
    fit(*_tiny(), epochs=1, checkpoint=path, progress=False)
    net, opt, loss, data = _tiny()
    with pytest.raises(ckpt.CheckpointError, match=f"{path}.*does not fit this model"):
        fit(mlp([4, 6, 2], constraint=None), opt, loss, data, 2, checkpoint=path)
    with pytest.raises(ckpt.CheckpointError, match="its optimizer is 'Adam'.*'SGD'"):
        fit(net, lambda p: torch.optim.SGD(p, lr=0.1), loss, data, 2, checkpoint=path)


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _tiny():
    torch.manual_seed(0)
    x, y = torch.rand(20, 4), torch.randint(0, 2, (20,))
    net = mlp([4, 8, 2], constraint=None)
    return net, (lambda p: torch.optim.Adam(p, lr=1e-2)), nn.CrossEntropyLoss(), loader((x, y), 5)


def test_atomic_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "run.pt"
    ckpt.save_atomic(ckpt.new_checkpoint(epoch=1), path)
    before = path.read_bytes()

    def crash(obj, fh):
        fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_atomic(ckpt.new_checkpoint(epoch=2), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["run.pt"]


def test_bad_arguments_name_the_problem():
    net, opt, loss, data = _tiny()
    for eps in (-0.1, float("nan"), float("inf"), [0.1, -1.0]):
        with pytest.raises(ValueError, match="certify_eps must hold finite non-negative radii"):
            fit(net, opt, loss, data, 1, eval_data=data, certify_eps=eps)
    with pytest.raises(ValueError, match="epochs must be a non-negative integer"):
        fit(net, opt, loss, data, -1)
    with pytest.raises(ValueError, match="exactly one of loss"):
        fit(net, opt, None, data, 1)
    with pytest.raises(ValueError, match="certify_norm must be 'l2' or 'linf'"):
        fit(net, opt, loss, data, 1, eval_data=data, certify_eps=0.1, certify_norm="l1")
    with pytest.raises(ValueError, match="max_grad_norm"):
        fit(net, opt, loss, data, 1, max_grad_norm=0.0)
    # A layer without a known Lipschitz constant: the error names it, where it sits.
    odd = nn.Sequential(nn.Linear(4, 4), nn.Softplus(), nn.Linear(4, 2))
    with pytest.raises(TypeError, match=r"layer Sequential\.1 of type .*Softplus"):
        evaluate(odd, data, certify_eps=0.1)


# --------------------------------------------------------------------------- hooks


@pytest.mark.parametrize("dtype", [torch.float32, D])
def test_projected_gradient_keeps_every_linf_norm_at_most_one(dtype):
    torch.manual_seed(0)
    x, y = torch.rand(64, 10, dtype=dtype), torch.randint(0, 4, (64,))
    net = mlp([10, 32, 32, 4], activation="maxmin", constraint=None).to(dtype)
    project_linf_(net)
    seen = []

    def project_and_check(model):
        assert project_linf_(model) == 3
        rows = [m.weight.to(D).abs().sum(1).max() for m in model if isinstance(m, nn.Linear)]
        seen.append(max(rows))
        assert all(r <= 1 for r in rows)  # exactly, in float64: as the bound measures them
        assert float(lipschitz_upper_bound(model, norm="linf")) <= 1

    opt = lambda p: torch.optim.Adam(p, lr=5e-2)
    fit(
        net,
        opt,
        nn.CrossEntropyLoss(),
        loader((x, y), 16),
        3,
        after_step=project_and_check,
        progress=False,
    )
    assert len(seen) == 12 and min(seen) > 0.99  # the constraint is active, not slack
    # Without the projection the same training leaves the ball.
    free = mlp([10, 32, 32, 4], activation="maxmin", constraint=None).to(dtype)
    project_linf_(free)
    fit(free, opt, nn.CrossEntropyLoss(), loader((x, y), 16), 3, progress=False)
    assert float(lipschitz_upper_bound(free, norm="linf")) > 1


def test_project_linf_arguments():
    with pytest.raises(ValueError, match="no unparametrized nn.Linear"):
        project_linf_(nn.Sequential(linf_projected(nn.Linear(3, 3)), nn.ReLU()))
    with pytest.raises(ValueError, match="radius must be a positive finite number"):
        project_linf_(nn.Linear(3, 3), radius=float("nan"))
    layer = nn.Linear(5, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, -0.2, 0.0, 0.1, 0.05], [3.0, -1.0, 0.5, 0.0, 0.0]]))
    inside = layer.weight[0].clone()
    project_linf_(layer, radius=0.5)
    assert torch.equal(layer.weight[0], inside)  # rows inside the ball are left as they are
    assert float(layer.weight[1].detach().abs().sum()) == pytest.approx(0.5)


def test_pgd_training_transform_feeds_attacked_inputs():
    net, opt, loss, data = _tiny()
    clean = {tuple(v.tolist()) for v in data.tensors[0]}
    seen = []

    def record(model, x, y):
        x_adv = pgd_training_transform(eps=0.1, steps=3)(model, x, y)
        seen.append((x, x_adv))
        return x_adv

    fit(net, opt, loss, data, 1, input_transform=record, progress=False)
    assert len(seen) == 4 and net.training
    for x, x_adv in seen:
        assert all(tuple(v.tolist()) in clean for v in x)
        assert (x_adv - x).abs().max() <= torch.tensor(0.1) and not torch.equal(x_adv, x)
        assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1


# --------------------------------------------------------------------------- data


def test_mnist_data_path(tmp_path):
    from lipsort import data

    if not os.environ.get(data.ENV_VAR):
        pytest.skip(f"{data.ENV_VAR} is not set")
    xtr, ytr = data.mnist(train=True, download=False)
    xte, yte = data.mnist(train=False, download=False)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), *mlp([784, 64, 10], activation="maxmin", constraint="bjorck"))
    result = fit(
        net,
        lambda p: torch.optim.Adam(p, lr=1e-2),
        nn.CrossEntropyLoss(),
        loader((xtr[:512], ytr[:512]), 64),
        3,
        eval_data=loader((xte[:512], yte[:512]), 256),
        certify_eps=[0.0, 0.1],
        checkpoint=tmp_path / "mnist.pt",
        progress=False,
    )
    h = result.history
    assert h["eval_acc"][-1] > 0.6  # 10 classes: chance is 0.1
    assert h["certified_acc"][-1][0] == pytest.approx(h["eval_acc"][-1])  # ε = 0: clean accuracy
    assert h["certified_acc"][-1][1] <= h["certified_acc"][-1][0]
    assert h["lipschitz"][-1] <= 1 + 1e-4  # a Björck net


# --------------------------------------------------------------------------- distributed


def test_two_gloo_processes_match_one_process(tmp_path):
    """float64 and a mean loss: the two runs differ only by the order of floating-point sums
    (two half-batch gradients averaged vs one batch's), so they agree to ~1e-16 (measured
    2e-16 after 15 steps); float32 would blur that to ~1e-7 per step. Without the weighting of
    the last batch's unequal shards (3 and 2 samples) the weights differ by 1e-2."""
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(HERE / "_training_worker.py"),
            "--ddp",
            str(tmp_path),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert _same_state(ranks[0]["state"], ranks[1]["state"])  # replicas never diverge
    # Only rank 0 wrote the checkpoint, once, atomically.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "rank0.pt",
        "rank1.pt",
        "run.pt",
        "run.pt.json",
    ]
    assert torch.load(tmp_path / "run.pt", weights_only=True)["config"]["world_size"] == 2

    net, kwargs = worker.ddp_problem()
    init = {k: v.clone() for k, v in net.state_dict().items()}
    single = fit(net, epochs=3, **kwargs)
    trained = dict(single.model.named_parameters())
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-10, atol=1e-12)
        if key in trained:  # buffers (e.g. a parametrization's warm start) need not move
            assert not torch.allclose(value, init[key], atol=1e-3)  # it trained
    h1, h2 = single.history, ranks[0]["history"]
    for key in ("train_loss", "train_acc", "eval_loss", "eval_acc", "lipschitz"):
        assert h2[key] == pytest.approx(h1[key], rel=1e-10)
    assert not math.isnan(h1["train_loss"][-1])


def test_setup_takes_the_thread_count_from_omp_num_threads(monkeypatch):
    import lipsort
    from lipsort.runtime import default_threads, num_threads

    with num_threads(torch.get_num_threads()):  # restore the suite's count afterwards
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        lipsort.setup(0)
        assert torch.get_num_threads() == 1
        lipsort.setup(0, threads=2)  # an explicit count wins
        assert torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert default_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "two")
        with pytest.raises(ValueError, match="OMP_NUM_THREADS must be a positive integer, got 'two'"):
            lipsort.setup(0)


def test_setup_flushes_subnormal_floats_to_zero():
    import lipsort

    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormal floats")
    torch.set_flush_denormal(False)  # on again only if setup turns it on
    tiny = torch.tensor([1e-39], dtype=torch.float64).float()  # a float32 subnormal
    assert 0 < tiny.item() < torch.finfo(torch.float32).tiny
    assert (tiny * 1.0).item() > 0
    lipsort.setup(0)
    # a product that would be subnormal (a decaying Adam moment) is zero, and so is a subnormal input
    assert (torch.full((4,), 2e-38) * 0.5).eq(0).all() and (tiny * 1.0).item() == 0.0
    lipsort.setup(0, flush_denormal=False)
    assert (tiny * 1.0).item() > 0
    lipsort.setup(0)
