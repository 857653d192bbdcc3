"""Dual Wasserstein estimation: 1-Lipschitz critics give lower bounds; training reaches W1 (chapter 01)."""

from __future__ import annotations

import math

import ot
import pytest
import torch
from torch import nn

from lipsort.certify import lipschitz_upper_bound
from lipsort.models import mlp
from lipsort.wasserstein import (
    CriticHistory,
    absolute_value,
    dual_estimate,
    exact_dual_estimate,
    fit_critic,
    gradient_norm_stats,
    gradient_norms,
    high_dim_cone,
    three_cones,
    train_critic,
)

D = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def emd_w1(x_p, x_q) -> float:
    a = torch.full((x_p.shape[0],), 1.0 / x_p.shape[0], dtype=D).numpy()
    b = torch.full((x_q.shape[0],), 1.0 / x_q.shape[0], dtype=D).numpy()
    return float(ot.emd2(a, b, torch.cdist(x_p.to(D), x_q.to(D)).numpy(), numItermax=10_000_000))


# ----------------------------------------------------------------------------- estimates


@pytest.mark.parametrize("activation", ["relu", "maxmin", "groupsort"])
def test_one_lipschitz_critic_is_a_lower_bound_of_exact_w1(activation):
    gen = torch.Generator().manual_seed(0)
    samples = {
        "A2": three_cones().sample(300, generator=gen, dtype=D),
        "gaussians": (torch.randn(300, 2, generator=gen, dtype=D) + torch.tensor([1.5, 0.0], dtype=D),
                      0.5 * torch.randn(300, 2, generator=gen, dtype=D)),
    }
    for name, (x_p, x_q) in samples.items():
        w1 = emd_w1(x_p, x_q)
        best = -math.inf
        for trial in range(4):
            torch.manual_seed(trial)
            gs = 4 if activation == "groupsort" else None
            critic = mlp([2, 16, 16, 1], activation=activation, constraint="bjorck", group_size=gs).to(D).eval()
            lip = float(lipschitz_upper_bound(critic))
            assert lip <= 1 + 1e-9
            for sign in (1.0, -1.0):  # both orientations of the critic are 1-Lipschitz
                with torch.no_grad():
                    est = float(dual_estimate(lambda x: sign * critic(x), x_p, x_q))
                assert est <= w1 + 1e-9, (name, trial, est, w1)
                best = max(best, est)
        assert best > 0  # the check is not vacuous: some critic separates the samples


def test_optimal_critic_attains_emd_and_a_steeper_one_exceeds_it():
    pb = high_dim_cone(16)
    x_p, x_q = pb.sample(200, generator=torch.Generator().manual_seed(1), dtype=D)
    w1 = emd_w1(x_p, x_q)
    assert float(dual_estimate(pb.critic, x_p, x_q)) == pytest.approx(w1, abs=1e-9)
    # A 2-Lipschitz critic is no lower bound: the Lipschitz constraint is what makes it one.
    assert float(dual_estimate(lambda x: 2 * pb.critic(x), x_p, x_q)) > w1 + 0.5


def test_weighted_and_exact_estimates():
    pb = absolute_value()
    f = lambda x: x[:, 0].abs() + 0.25 * x[:, 0]  # noqa: E731
    # Atoms: P = ½δ₋₁ + ½δ₁ -> E_P f = 1, E_Q f = 0.
    assert exact_dual_estimate(f, pb) == pytest.approx(1.0, abs=1e-15)
    x_p, w_p = pb.atoms_p()
    x_q, w_q = pb.atoms_q()
    assert float(dual_estimate(f, x_p, x_q, w_p, w_q)) == pytest.approx(1.0, abs=1e-15)
    # Samples converge to it.
    xs_p, xs_q = pb.sample(20000, generator=torch.Generator().manual_seed(2), dtype=D)
    assert float(dual_estimate(f, xs_p, xs_q)) == pytest.approx(1.0, abs=4 * 0.25 / math.sqrt(20000))
    # A module keeps its training mode after an exact evaluation.
    net = mlp([1, 8, 1], activation="maxmin", constraint="bjorck")
    net.train()
    exact_dual_estimate(net, pb)
    assert net.training
    net.eval()
    exact_dual_estimate(net, pb)
    assert not net.training


def test_gradient_norms_and_stats():
    x = torch.randn(50, 3, dtype=D)
    g = gradient_norms(lambda z: z @ torch.tensor([1.0, -2.0, 2.0], dtype=D), x)
    assert torch.allclose(g, torch.full((50,), 3.0, dtype=D))
    # Matches the definition on a network, sample by sample.
    torch.manual_seed(0)
    net = mlp([3, 16, 1], activation="relu", constraint=None).to(D)
    g = gradient_norms(net, x)
    for i in (0, 17, 49):
        xi = x[i : i + 1].clone().requires_grad_(True)
        (gi,) = torch.autograd.grad(net(xi).sum(), xi)
        assert float(gi.norm()) == pytest.approx(float(g[i]), rel=1e-12)
    assert torch.equal(gradient_norms(lambda z: torch.zeros(z.shape[0], dtype=D), x), torch.zeros(50, dtype=D))
    stats = gradient_norm_stats(torch.tensor([0.2, 0.995, 1.0, 0.5], dtype=D))
    assert stats == pytest.approx({"mean": 0.67375, "median": 0.5, "min": 0.2, "max": 1.0, "frac_unit": 0.5})


# ----------------------------------------------------------------------------- training


def test_train_maxmin_bjorck_critic_reaches_w1_on_a1():
    pb = absolute_value()
    torch.manual_seed(0)
    critic = mlp([1, 64, 64, 1], activation="maxmin", constraint="bjorck")
    hist = train_critic(
        critic, pb, steps=300, evaluate=lambda f: exact_dual_estimate(f, pb), eval_every=100, progress=False
    )
    assert isinstance(hist, CriticHistory)
    assert hist.eval_steps == [100, 200, 300] and len(hist.train) == 300
    assert hist.final > 0.95
    assert hist.final <= 1 + 1e-5  # a 1-Lipschitz critic never exceeds the exact W1
    assert critic.training


def test_train_relu_bjorck_critic_stays_below_one_over_sqrt3():
    # The chapter's bound: a [1, n, n, 1] ReLU critic with ‖W‖₂ ≤ 1 has estimate ≤ 1/√3 on A1.
    pb = absolute_value()
    torch.manual_seed(0)
    critic = mlp([1, 32, 32, 1], activation="relu", constraint="bjorck")
    hist = train_critic(critic, pb, steps=150, optimizer="adam", lr=0.01, evaluate=lambda f: exact_dual_estimate(f, pb), progress=False)
    assert 0.3 < hist.final <= 1 / math.sqrt(3) + 1e-5


def test_training_is_deterministic_and_default_eval_is_sampled():
    pb = three_cones()
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        critic = mlp([2, 16, 16, 1], activation="maxmin", constraint="spectral")
        runs.append(train_critic(critic, pb, steps=20, eval_every=10, eval_samples=256, seed=7, progress=False))
    assert runs[0].train == runs[1].train and runs[0].eval == runs[1].eval
    assert runs[0].eval_steps == [10, 20]


def test_bad_inputs_raise():
    pb = absolute_value()
    f = lambda x: x[:, 0]  # noqa: E731
    with pytest.raises(ValueError, match="same shape"):
        dual_estimate(f, torch.zeros(3, 1), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="non-empty"):
        dual_estimate(f, torch.zeros(0, 1), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="non-empty"):
        dual_estimate(f, torch.zeros(3), torch.zeros(3))
    with pytest.raises(TypeError, match="floating-point"):
        dual_estimate(f, torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="one score per sample"):
        dual_estimate(lambda x: x.repeat(1, 2), torch.zeros(3, 1), torch.zeros(3, 1))
    with pytest.raises(TypeError, match="must return a tensor"):
        dual_estimate(lambda x: 1.0, torch.zeros(3, 1), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="sum to 1"):
        dual_estimate(f, torch.zeros(2, 1), torch.zeros(1, 1), torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError, match="shape \\(2,\\)"):
        dual_estimate(f, torch.zeros(2, 1), torch.zeros(1, 1), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="no finite list of atoms"):
        exact_dual_estimate(f, three_cones())
    with pytest.raises(TypeError, match="atoms_p"):
        exact_dual_estimate(f, object())
    net = mlp([1, 8, 1], activation="maxmin", constraint=None)
    for kwargs, match in [
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"steps": 5, "batch_size": 0}, "batch_size"),
        ({"steps": 5, "lr": -1.0}, "lr"),
        ({"steps": 5, "optimizer": "sgd"}, "optimizer"),
        ({"steps": 5, "eval_every": 0}, "eval_every"),
        ({"steps": 5, "max_grad_norm": 0.0}, "max_grad_norm"),
    ]:
        with pytest.raises(ValueError, match=match):
            train_critic(net, pb, progress=False, **kwargs)
    with pytest.raises(TypeError, match="sample_p"):
        train_critic(net, object(), steps=5, progress=False)
    with pytest.raises(TypeError, match="nn.Module"):
        train_critic(f, pb, steps=5, progress=False)
    frozen = nn.Linear(1, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train_critic(frozen, pb, steps=5, progress=False)
    with pytest.raises(ValueError, match="no evaluation"):
        CriticHistory().final
    with pytest.raises(ValueError, match="non-empty 1-D"):
        gradient_norm_stats(torch.zeros(2, 2))


def test_fit_critic_certified_estimate_never_exceeds_w1():
    # Spectral normalization with one power iteration can overshoot ‖W‖₂ = 1: the raw estimate
    # may exceed W1, the certified one (divided by the exact bound) never does.
    pb = absolute_value()
    for constraint in ("bjorck", "spectral"):
        r = fit_critic(pb, (16, 16), "maxmin", constraint, steps=60, lr=0.05, progress=False)
        assert r.certified <= pb.w1 + 1e-6
        # The bound it divides by is a real ℓ2 bound: no sampled slope exceeds it.
        x = torch.linspace(-2, 2, 401)[:, None]
        with torch.no_grad():
            f = r.critic(x)[:, 0]
        assert float(((f[1:] - f[:-1]).abs() / (x[1, 0] - x[0, 0])).max()) <= r.lipschitz + 1e-5
        assert not r.critic.training and r.history.final == r.estimate


def test_fit_critic_traces_the_weights_used_in_training():
    r = fit_critic(high_dim_cone(2), (8, 8), "maxmin", "bjorck", steps=7, batch_size=16, trace_weights=True,
                   grad_points=torch.randn(5, 2), dtype=D, progress=False)
    assert r.weight_trace["per_layer"].shape == (3, 7)
    assert float(r.weight_trace["bjorck"].max()) < 1e-4  # the default iterations reach the manifold
    assert r.grad_norms.shape == (5,) and float(r.grad_norms.max()) <= 1 + 1e-9
    assert set(r.grad_stats) == {"mean", "median", "min", "max", "frac_unit"}


def test_interrupted_critic_training_resumes_to_the_same_weights(tmp_path):
    from lipsort.training import checkpoint as ckpt
    from lipsort.wasserstein import three_cones, train_critic

    problem = three_cones()
    kw = dict(steps=12, batch_size=8, lr=0.01, milestones=(4, 8), gamma=0.5, eval_every=3, progress=False)

    def fresh():
        torch.manual_seed(0)
        return mlp([2, 16, 16, 1], activation="maxmin", constraint="bjorck", n_iters=5)

    f = fresh()
    straight = train_critic(f, problem, **kw)
    calls = []

    def interrupt_at_step_6(critic):  # the second evaluation (step 6) is a Ctrl-C
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return 0.0

    path = tmp_path / "critic.pt"
    with pytest.raises(KeyboardInterrupt):
        train_critic(fresh(), problem, **{**kw, "evaluate": interrupt_at_step_6}, checkpoint=path, checkpoint_every=4)
    assert ckpt.load_checkpoint(path)["epoch"] == 4  # the last checkpoint before the interruption
    f2 = fresh()  # a new process starts from a fresh network: the checkpoint restores everything
    resumed = train_critic(f2, problem, **kw, checkpoint=path)
    assert resumed.train == straight.train
    assert resumed.eval[1:] == straight.eval[1:]  # the first evaluation ran in the interrupted run
    for a, b in zip(f.state_dict().values(), f2.state_dict().values()):
        assert torch.equal(a, b)
    again = train_critic(fresh(), problem, **kw, checkpoint=path)  # finished: nothing is retrained
    assert again.train == resumed.train
    with pytest.raises(ckpt.CheckpointError, match="another critic run"):
        train_critic(fresh(), problem, **{**kw, "lr": 0.02}, checkpoint=path)
    with pytest.raises(ckpt.CheckpointError, match="more than the 6"):
        train_critic(fresh(), problem, **{**kw, "steps": 6}, checkpoint=path)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ckpt.CheckpointError, match=str(path)):
        train_critic(fresh(), problem, **kw, checkpoint=path)


def test_a_critic_grid_resumes_from_its_checkpoints_and_a_longer_run_continues_a_shorter_one(tmp_path):
    from lipsort.experiments import wasserstein_estimates as xw
    from lipsort.wasserstein import three_cones

    kw = dict(activations=["maxmin"], constraints=["bjorck"], n_eval=64, n_grad=64, batch_size=8, lr=0.01,
              eval_every=3, bjorck_iters=5, progress=False)
    straight = xw.run_grid(three_cones(), [8], steps=12, **kw)[0]
    xw.run_grid(three_cones(), [8], steps=6, checkpoint_dir=tmp_path, name="a2", **kw)
    (path,) = tmp_path.glob("a2-maxmin-bjorck-*.pt")
    continued = xw.run_grid(three_cones(), [8], steps=12, checkpoint_dir=tmp_path, name="a2", **kw)[0]
    assert continued.history.train == straight.history.train
    assert continued.estimate == straight.estimate
    xw.run_grid(three_cones(), [16], steps=6, checkpoint_dir=tmp_path, name="a2", **kw)  # other widths: another file
    assert len(list(tmp_path.glob("a2-maxmin-bjorck-*.pt"))) == 2 and path.is_file()
    from lipsort.wasserstein import EmpiricalProblem

    clouds = [EmpiricalProblem(torch.randn(16, 2) + s, torch.randn(16, 2)) for s in (0.0, 1.0)]
    for problem in clouds:  # other samples under the same name: another file, never a resume
        xw.run_grid(problem, [8], steps=3, checkpoint_dir=tmp_path, name="clouds", **kw)
    assert len(list(tmp_path.glob("clouds-maxmin-bjorck-*.pt"))) == 2


def test_a_critic_grid_trained_by_worker_processes_equals_the_grid_trained_in_process(tmp_path, monkeypatch):
    from lipsort.experiments import wasserstein_estimates as xw
    from lipsort.wasserstein import critics, three_cones

    def no_training_here(*args, **kwargs):
        raise AssertionError("a critic was trained in the calling process, not by a worker")

    kw = dict(activations=["relu", "maxmin"], constraints=["bjorck", "spectral"], n_eval=64, n_grad=64, batch_size=8,
              lr=0.01, eval_every=3, steps=9, progress=False, seed=1)
    for iters in (5, None):  # the authors' fixed count, and the certified polar factor with its warm estimates
        alone = xw.run_grid(three_cones(), [8, 8], bjorck_iters=iters, **kw)
        with monkeypatch.context() as m:  # a training step here fails; the spawned workers import the real one
            m.setattr(critics, "dual_estimate", no_training_here)
            spread = xw.run_grid(three_cones(), [8, 8], bjorck_iters=iters, checkpoint_dir=tmp_path / str(iters),
                                 workers=2, **kw)
        assert len(list((tmp_path / str(iters)).glob("critic-*.pt"))) == 4
        for a, b in zip(alone, spread, strict=True):
            assert (a.label, a.constraint) == (b.label, b.constraint)
            assert a.history.train == b.history.train and a.history.eval == b.history.eval
            assert a.estimate == b.estimate and a.lipschitz_l2 == b.lipschitz_l2
            assert torch.equal(a.grad_norms, b.grad_norms)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        xw.run_grid(three_cones(), [8], workers=2, **kw)
    with pytest.raises(ValueError, match="workers"):
        xw.run_grid(three_cones(), [8], workers=0, checkpoint_dir=tmp_path, **kw)
