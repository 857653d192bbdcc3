"""Benchmarks of activations and of whole training steps of the papers' networks."""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import replace

import torch
from torch import nn

from .. import _bjorck, _l1ball, _native, _native_op
from .. import functional as F
from .. import models
from ._measure import Config, Row, measure_case
from .peers import naive_group_sort


def _fwd_bwd(fn, x0: torch.Tensor, grad_out: torch.Tensor):
    """``forward()`` applying ``fn`` to a fresh leaf copy of ``x0``, and its ``backward(out)``."""
    x = x0.clone().requires_grad_()
    return (lambda: fn(x)), (lambda out: torch.autograd.grad(out, x, grad_out))


def _switched_off(fn, switch):
    """``fn`` run inside ``switch()``: :func:`lipsort._native.disabled` (the PyTorch ops, as
    ``LIPSORT_NATIVE=0``) or :func:`lipsort._native_op.disabled` (the same loops called from a
    Python autograd Function instead of the C++ operator)."""

    def run(x):
        with switch():
            return fn(x)

    return run


def _groupsort_case(cfg: Config, deel, shape: tuple[int, ...], g: int) -> list[Row]:
    torch.manual_seed(0)
    x0 = torch.randn(shape, device=cfg.device)
    grad_out = torch.randn(shape, device=cfg.device)
    expected = naive_group_sort(x0, g)
    ours, what = (F.max_min, "max_min") if g == 2 else ((lambda x: F.group_sort(x, g)), "group_sort")
    impls = [
        ("lipsort", *_fwd_bwd(ours, x0, grad_out), f"{what}: compare-exchange, bool per comparison"),
        ("naive", *_fwd_bwd(lambda x: naive_group_sort(x, g), x0, grad_out), "reshape + sort"),
    ]
    if deel is not None:
        functional = deel[0]
        impls.append(
            ("deel-torchlip", *_fwd_bwd(lambda x: functional.group_sort(x, g), x0, grad_out),
             "group_sort, ascending order")
        )
    if _native_op.operator() is not None and cfg.device.type == "cpu":
        impls.insert(1, ("python-function", *_fwd_bwd(_switched_off(ours, _native_op.disabled), x0, grad_out),
                         f"{what}: the same loops called from a Python autograd Function"))
    if g == 2:
        impls.insert(1, ("pytorch-ops", *_fwd_bwd(_switched_off(ours, _native.disabled), x0, grad_out),
                         "max_min without its C kernel: the compare-exchange in PyTorch ops"))
        impls.append(("relu", *_fwd_bwd(torch.relu, x0, grad_out), "torch.relu (not a permutation)"))

    def check(name, out):
        out = out.detach()
        if name == "relu":
            return None
        if name == "deel-torchlip":  # sorts ascending: flip each group to compare
            grouped = list(shape)
            grouped[1:2] = [shape[1] // g, g]
            out = out.reshape(grouped).flip(2).reshape(shape)
        return float((out - expected).abs().max())

    op = "max_min" if g == 2 else f"group_sort g={g}"
    return measure_case("groupsort", f"{op} {tuple(shape)}", impls, cfg, "max|Δ| vs naive", check)


def bench_groupsort(cfg: Config, deel, notes: list[str]) -> list[Row]:
    cases = (
        [((8, 32), 2), ((8, 32), 4), ((2, 8, 4, 4), 2)]
        if cfg.tiny
        else [((256, 1024), 2), ((256, 1024), 4), ((64, 128, 16, 16), 2), ((128, 64, 7, 7), 2),
              ((128, 32, 28, 28), 2)]  # the last two: Li et al.'s MNIST feature maps
    )
    return [row for shape, g in cases for row in _groupsort_case(cfg, deel, shape, g)]


def _deel_mlp(deel, sizes, group_size=2):
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(deel[2](a, b))
        if i < len(sizes) - 2:
            layers.append(_DeelGroupSort(deel, group_size or b))
    return nn.Sequential(*layers)


class _DeelGroupSort(nn.Module):
    def __init__(self, deel, group_size):
        super().__init__()
        self.fn, self.group_size = deel[0].group_sort, group_size

    def forward(self, x):
        return self.fn(x, self.group_size)


def _train_step_impls(nets: dict, x, y, warmup: int, make_opt=None, after_step=None, contexts=None):
    """A training step of each net (Adam at 1e-3 unless ``make_opt``), after ``warmup`` steps;
    ``after_step[name](net)`` runs after the update and ``contexts[name]()`` holds the step."""
    impls = []
    for name, net in nets.items():
        opt = make_opt(net) if make_opt else torch.optim.Adam(net.parameters(), lr=1e-3)
        after = (after_step or {}).get(name)
        context = (contexts or {}).get(name, contextlib.nullcontext)

        def step(net=net, opt=opt, after=after, context=context):
            with context():
                opt.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(net(x), y) if y.dtype == torch.long else (
                    net(x).mean() - y.mean()
                )
                loss.backward()
                opt.step()
                if after is not None:
                    after(net)
            return loss

        for _ in range(warmup):
            step()
        impls.append((name, step, None, ""))
    return impls


def bench_mlp(cfg: Config, deel, notes: list[str]) -> list[Row]:
    """Training step (Adam, batch 128) of the paper's MNIST MLP 784-1024-1024-1024-10, MaxMin."""
    sizes = [24, 32, 32, 32, 10] if cfg.tiny else [784, 1024, 1024, 1024, 10]
    batch = 8 if cfg.tiny else 128
    torch.manual_seed(0)
    nets = {
        "lipsort": models.mlp(sizes, "maxmin", "bjorck"),
        "lipsort bjorck(20)": models.mlp(sizes, "maxmin", "bjorck", n_iters=20),
        "unconstrained": models.mlp(sizes, "maxmin", None),
    }
    if deel is not None:
        nets["deel-torchlip"] = _deel_mlp(deel, sizes)
    nets = {k: v.to(cfg.device) for k, v in nets.items()}
    x = torch.rand(batch, sizes[0], device=cfg.device)
    y = torch.randint(0, sizes[-1], (batch,), device=cfg.device)
    impls = _train_step_impls(nets, x, y, warmup=2 if cfg.tiny else 5)

    def check(name, loss):
        net = nets[name]
        return max((F.operator_norm(m.weight.detach(), 2).item() for m in net if isinstance(m, nn.Linear)), default=0.0)

    case = f"MLP {'-'.join(map(str, sizes))} MaxMin, batch {batch}, train step"
    rows = measure_case("mlp", case, impls, cfg, "max ‖W‖₂", check)
    rows += _critic_rows(cfg, notes)
    return rows


def bench_linf(cfg: Config, deel, notes: list[str]) -> list[Row]:
    """Training step (Adam, batch 128) of the paper's MNIST MLP with ‖W‖∞ ≤ 1 layers, MaxMin:
    the projection in the forward pass (``linf_projected``, A6) differentiated in closed form or
    by autograd through its operations, and the authors' A8 method, plain layers projected
    after every update (``project_linf_``)."""
    from ..optim import project_linf_

    sizes = [24, 32, 32, 32, 10] if cfg.tiny else [784, 1024, 1024, 1024, 10]
    batch = 8 if cfg.tiny else 128
    nets = {}
    for name, constraint in (("lipsort", "linf"), ("autograd through the projection", "linf"),
                             ("projected gradient", None), ("unconstrained", None)):
        torch.manual_seed(0)
        nets[name] = models.mlp(sizes, "maxmin", constraint).to(cfg.device)
    project_linf_(nets["projected gradient"])
    x = torch.rand(batch, sizes[0], device=cfg.device)
    y = torch.randint(0, sizes[-1], (batch,), device=cfg.device)
    impls = _train_step_impls(
        nets, x, y, warmup=2 if cfg.tiny else 5,
        after_step={"projected gradient": project_linf_},
        contexts={"autograd through the projection": _l1ball.through_operations},
    )
    notes_by_name = {
        "lipsort": "linf_projected: the projection in every forward pass, its Jacobian in closed form",
        "autograd through the projection": "the same, differentiated by autograd through the projection's operations",
        "projected gradient": "plain layers, project_linf_ after every update (the authors' A8 method)",
        "unconstrained": "plain layers",
    }
    impls = [(name, fwd, bwd, notes_by_name[name]) for name, fwd, bwd, _ in impls]

    def check(name, loss):
        return max(float(F.operator_norm(m.weight.detach(), "inf")) for m in nets[name] if isinstance(m, nn.Linear))

    case = f"MLP {'-'.join(map(str, sizes))} MaxMin, ‖W‖∞ ≤ 1, batch {batch}, train step"
    return measure_case("linf", case, impls, cfg, "max ‖W‖∞", check)


def _critic_rows(cfg: Config, notes: list[str]) -> list[Row]:
    """A3's critic, [256]×6 + 1 FullSort Björck on 128-D inputs: one step after 300 AggMo steps,
    extrapolated to the run."""
    dims = [8, 16, 16, 1] if cfg.tiny else [128] + [256] * 6 + [1]
    batch, steps = (8, 100) if cfg.tiny else (128, 19_200)
    torch.manual_seed(0)
    nets = {
        "lipsort": models.mlp(dims, "fullsort", "bjorck"),
        "lipsort bjorck(20)": models.mlp(dims, "fullsort", "bjorck", n_iters=20),
    }
    nets = {k: v.to(cfg.device) for k, v in nets.items()}
    x = torch.randn(batch, dims[0], device=cfg.device)
    y = torch.randn(batch, 1, device=cfg.device)
    from ..optim import AggMo

    # A3's optimizer (AggMo, lr 0.005), and enough steps for the weights to leave the manifold
    # as far as training takes them (the cost of a step grows with that distance, then settles).
    impls = _train_step_impls(
        nets, x, y, warmup=3 if cfg.tiny else 300,
        make_opt=lambda net: AggMo(net.parameters(), lr=5e-3, betas=(0.0, 0.9, 0.99)),
    )
    rows = measure_case(
        "mlp", f"A3 critic {'-'.join(map(str, dims))} FullSort, batch {batch}, train step",
        impls, cfg, "minutes for the run", lambda name, loss: None,
    )
    for r in rows:
        r.value = r.time_ms * steps / 6e4
        r.note = f"{steps} steps extrapolated from the median step"
    notes.append(f"A3 critic: {steps} steps at batch {batch} (batch assumed; the paper's config gives 150 × 128 iterations)")
    return rows



def _subnormal_fraction(opt: torch.optim.Optimizer) -> float:
    """Fraction of Adam's moment entries that are subnormal, read from their bits (a comparison
    would see zeros while subnormals are flushed)."""
    count = total = 0
    for state in opt.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            bits = state[key].view(torch.int32)
            count += int(((bits & 0x7F800000) == 0).logical_and_((bits & 0x007FFFFF) != 0).sum())
            total += bits.numel()
    return count / total


def _flushing() -> bool:
    """Whether the calling thread flushes subnormal floats (a float32 subnormal made by a
    conversion is then zero)."""
    return torch.tensor(1e-39, dtype=torch.float64).float().item() == 0.0


def bench_subnormal(cfg: Config, deel, notes: list[str]) -> list[Row]:
    """An Adam step of the paper's standard ReLU MLP late in training, with and without
    subnormal floats flushed to zero.

    Units that stop receiving gradient decay their moments by β₁, β₂ per step into the subnormal
    range (below 1.2e-38), where x86 arithmetic takes microcode assists: after 200 epochs 30% of
    the moments of A9's standard network were subnormal. :func:`lipsort.setup` flushes them; torch
    keeps them by default. One thread: the flag is per thread, and OpenMP workers take it only
    when they are created.
    """
    if cfg.device.type != "cpu" or not torch.set_flush_denormal(_flushing()):
        notes.append("subnormal: skipped (the flush is a CPU flag, and this CPU has none)")
        return []
    sizes = [24, 32, 32, 32, 10] if cfg.tiny else [784, 1024, 1024, 1024, 10]
    fraction = 0.3
    was_flushing = _flushing()
    contenders = (("lipsort", True, True, "subnormals flushed to zero, as after lipsort.setup"),
                  ("not flushed", False, True, "torch's default"),
                  ("no subnormal moments", False, False, "the same moments above the subnormal range"))  # fmt: skip
    impls, optimizers = [], {}
    try:
        torch.set_flush_denormal(False)  # to write the subnormals
        for name, flush, subnormal, note in contenders:
            torch.manual_seed(0)
            net = models.mlp(sizes, "relu", None).to(cfg.device)
            opt = torch.optim.Adam(net.parameters(), lr=1e-6)
            gen = torch.Generator().manual_seed(1)
            for p in net.parameters():
                p.grad = torch.randn(p.shape, generator=gen).to(cfg.device)
            opt.step()  # creates the moments
            for p in net.parameters():
                dead = (torch.rand(p.shape, generator=gen) < fraction).to(cfg.device)
                p.grad[dead] = 0.0  # dead units receive no gradient
                state = opt.state[p]
                scale = 1e-39 if subnormal else 1e-6  # 1e-6: hundreds of steps above the range
                state["exp_avg"][dead] = scale * torch.rand(int(dead.sum()), generator=gen).to(cfg.device)
                state["exp_avg_sq"][dead] = scale * torch.rand(int(dead.sum()), generator=gen).to(cfg.device)

            def step(opt=opt, flush=flush):
                torch.set_flush_denormal(flush)
                opt.step()

            optimizers[name] = opt
            impls.append((name, step, None, note))
        case = f"Adam step, MLP {'-'.join(map(str, sizes))} ReLU, {fraction:.0%} of moments decayed"
        rows = measure_case("subnormal", case, impls, replace(cfg, threads=1),
                            "subnormal fraction after timing", lambda name, out: None)  # fmt: skip
        for r in rows:  # after every timed step (a first moment leaves the range in ~130)
            r.value = _subnormal_fraction(optimizers[r.impl])
    finally:
        torch.set_flush_denormal(was_flushing)
    return rows


def _every_step(step):
    """``step`` run with the whole count of every Björck loop (:func:`lipsort._bjorck.every_step`)."""

    def run():
        with _bjorck.every_step():
            return step()

    return run


def bench_stop(cfg: Config, deel, notes: list[str]) -> list[Row]:
    """Training steps (Adam, batch 128, after 5 steps) of the papers' networks at the authors'
    fixed 20 Björck iterations, with the loop's early stop at the rounding floor (Note [early
    stop] in :mod:`lipsort._bjorck`) and with every step run."""
    from ..conv import networks

    if cfg.device.type != "cpu":
        notes.append("stop: skipped (the early stop runs on CPU only)")
        return []
    batch = 8 if cfg.tiny else 128
    sizes = [24, 32, 32, 32, 10] if cfg.tiny else [784, 1024, 1024, 1024, 10]
    # name -> (network builder, input shape of one example)
    cases = {f"MLP {'-'.join(map(str, sizes))} Björck(20) MaxMin (A6, FC-3)": (
        lambda: models.mlp(sizes, "maxmin", "bjorck", n_iters=20), (sizes[0],))}
    cases["BCOP Small" if cfg.tiny else "BCOP Large (Li et al.)"] = (
        networks.bcop_small if cfg.tiny else networks.bcop_large, (1, 28, 28))
    rows = []
    for name, (make, shape) in cases.items():
        torch.manual_seed(0)
        nets = {"lipsort": make(), "every step": make()}
        nets["every step"].load_state_dict(nets["lipsort"].state_dict())
        x = torch.rand(batch, *shape)
        y = torch.randint(0, 10, (batch,))
        impls = _train_step_impls(nets, x, y, warmup=2 if cfg.tiny else 5)
        impls = [(n, f if n == "lipsort" else _every_step(f), b, note) for n, f, b, note in impls]

        def check(impl, loss, nets=nets):
            dense = [m.weight.detach() for m in nets[impl].modules() if isinstance(m, nn.Linear)]
            return max(float((F.operator_norm(w, 2) - 1).abs()) for w in dense)

        rows += measure_case("stop", f"{name}, batch {batch}, train step", impls, cfg, "max |‖W‖₂ − 1| (dense)", check)
    return rows

