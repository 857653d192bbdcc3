"""Benchmarks of activations and of whole training steps of the papers' networks."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from .. import _native
from .. import functional as F
from .. import models
from ._measure import Config, Row, measure_case
from .peers import naive_group_sort


def _fwd_bwd(fn, x0: torch.Tensor, grad_out: torch.Tensor):
    """``forward()`` applying ``fn`` to a fresh leaf copy of ``x0``, and its ``backward(out)``."""
    x = x0.clone().requires_grad_()
    return (lambda: fn(x)), (lambda out: torch.autograd.grad(out, x, grad_out))


def _without_kernels(fn):
    """``fn`` run with lipsort's fused CPU kernels switched off (as ``LIPSORT_NATIVE=0``)."""

    def run(x):
        with _native.disabled():
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
    if g == 2:
        impls.insert(1, ("pytorch-ops", *_fwd_bwd(_without_kernels(ours), x0, grad_out),
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
        else [((256, 1024), 2), ((256, 1024), 4), ((64, 128, 16, 16), 2)]
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


def _train_step_impls(nets: dict, x, y, warmup: int, make_opt=None):
    impls = []
    for name, net in nets.items():
        opt = make_opt(net) if make_opt else torch.optim.Adam(net.parameters(), lr=1e-3)

        def step(net=net, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(net(x), y) if y.dtype == torch.long else (
                net(x).mean() - y.mean()
            )
            loss.backward()
            opt.step()
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

