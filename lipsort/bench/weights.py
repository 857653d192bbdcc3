"""Benchmarks of the weight constraints: Björck functions, constrained layers, eval cache."""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from .. import _polar
from .. import functional as F
from .. import parametrizations as P
from ..activations import MaxMin
from ._measure import Config, Row, measure_case
from .peers import reference_bjorck


def sigma_error(w: torch.Tensor) -> float:
    """max |σᵢ - 1| from the eigenvalues of the smaller Gram matrix, in float64."""
    w = w.detach().to(torch.float64)
    g = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    s = torch.linalg.eigvalsh(g).clamp_min(0).sqrt()
    return float((s - 1).abs().max())


def polar_reference_grad(v: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """Gradient of ``⟨grad_out, UVᵀ⟩`` with respect to ``v = UΣVᵀ``, through an fp64 SVD."""
    v64 = v.detach().to(torch.float64).requires_grad_()
    u, _, vh = torch.linalg.svd(v64, full_matrices=False)
    (g,) = torch.autograd.grad(u @ vh, v64, grad_out.to(torch.float64))
    return g


def rel_error(g: torch.Tensor, ref: torch.Tensor) -> float:
    return float((g.to(ref.dtype) - ref).norm() / ref.norm().clamp_min(1e-300))


def polar_note(fn) -> str:
    """What :func:`lipsort.functional.polar` did in ``fn()`` (forward and backward): its step
    count, the steps autograd recorded, and the backward's Lyapunov solver."""
    _polar.last.clear()
    fn()
    info = dict(_polar.last)
    if not info:
        return "polar not called"
    if "fallback" in info:
        return f"not certified: {info['fallback']}"
    steps = info["steps"]
    text = f"{steps} step{'' if steps == 1 else 's'}"
    if info.get("tracked"):
        text += f", {info['tracked']} back-propagated"
    return text + (f", backward: {info['backward']}" if "backward" in info else "")


def _bjorck_case(cfg: Config, deel, notes: list[str], m: int, k: int, kind: str) -> list[Row]:
    n = cfg.iters
    torch.manual_seed(0)
    # nn.Linear's default initialization: the raw weight a Björck function is applied to.
    w0 = nn.Linear(k, m).weight.detach().to(cfg.device)
    grad_out = torch.randn(m, k, device=cfg.device)
    ref = polar_reference_grad(w0, grad_out)
    fns = {
        "lipsort": (F.polar, "certified polar factor, implicit or tracked gradient"),
        f"lipsort bjorck({n})": (lambda w: F.bjorck(w, n), "rigorous pre-scale, fixed count"),
        "reference": (lambda w: reference_bjorck(w, n), "Frobenius pre-scale, WᵀW Gram"),
    }
    if deel is not None:
        normalizers = deel[1]

        def deel_bjorck(w, iters=n):
            w = normalizers.spectral_normalization(w)[0]
            return normalizers.bjorck_normalization(w, eps=0.0, maxiter=iters)

        fns["deel-torchlip"] = (deel_bjorck, "power-iteration pre-scale; grad through 4 iterations")
        # Like for like: where n iterations leave deel-torchlip short of lipsort's certified
        # tolerance, also time it at the fewest iterations that reach it.
        target = _polar.default_tol(w0.dtype)
        reach = _iterations_to(lambda k: sigma_error(deel_bjorck(w0, k)), target, n, 8 * n)
        if reach is not None and reach > n:
            fns[f"deel-torchlip, {reach} it"] = (
                lambda w: deel_bjorck(w, reach),
                f"fewest iterations with max|σ-1| ≤ {target:g}, lipsort's certified tolerance",
            )
    impls, grads = [], {}
    for name, (fn, note) in fns.items():
        leaf = w0.clone().requires_grad_()

        def forward(fn=fn, leaf=leaf):
            return fn(leaf)

        def backward(out, leaf=leaf):
            return torch.autograd.grad(out, leaf, grad_out)

        grads[name] = (forward, backward)
        impls.append((name, forward, backward, note))

    def check(name, out):
        forward, backward = grads[name]
        return sigma_error(out), rel_error(backward(forward())[0], ref)

    case = f"{m}x{k} {kind} (nn.Linear init)"
    notes.append(f"lipsort polar, {case}: " + polar_note(lambda: grads["lipsort"][1](grads["lipsort"][0]())))
    return measure_case("bjorck", case, impls, cfg, "max|σ-1|", check)


def _iterations_to(error, target: float, lo: int, hi: int) -> int | None:
    """The fewest iterations ``k`` in ``[lo, hi]`` with ``error(k) ≤ target`` (bisection: the
    error of Björck's iterations decreases with their number), or None if ``hi`` misses it."""
    if error(lo) <= target:
        return lo
    if error(hi) > target:
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if error(mid) <= target else (mid, hi)
    return hi


def bench_bjorck(cfg: Config, deel, notes: list[str]) -> list[Row]:
    shapes = (
        [(32, 24, "tall"), (32, 32, "square"), (4, 32, "wide")]
        if cfg.tiny
        else [(1024, 784, "tall"), (1024, 1024, "square"), (10, 1024, "wide")]
    )
    return [row for m, k, kind in shapes for row in _bjorck_case(cfg, deel, notes, m, k, kind)]


def _train(model: nn.Module, x, y, steps: int, lr: float = 1e-3) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()


def _free(model: nn.Module):
    """The free parameter of a constrained layer (the one the optimizer updates)."""
    return model.parametrizations.weight.original if hasattr(model, "parametrizations") else model.weight


def layer_contenders(width: int, deel, device, default_only: bool = False) -> dict:
    torch.manual_seed(0)
    out = {"lipsort": P.bjorck_orthonormal(nn.Linear(width, width))}
    if not default_only:
        out["lipsort bjorck(20)"] = P.bjorck_orthonormal(nn.Linear(width, width), n_iters=20)
    if deel is not None:
        out["deel-torchlip"] = deel[2](width, width)
    out["nn.Linear"] = nn.Linear(width, width)
    return {k: m.to(device) for k, m in out.items()}


def layer_rows(cfg: Config, deel, notes: list[str], width: int, adam_steps: int, bench: str,
               default_only=False):
    """Training step (forward + backward, batch 128) of one square constrained layer."""
    batch = 8 if cfg.tiny else 128
    models = layer_contenders(width, deel, cfg.device, default_only)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, width, generator=gen).to(cfg.device)
    y = torch.randn(batch, width, generator=gen).to(cfg.device)
    for m in models.values():
        _train(m, x, y, adam_steps)
    impls = []
    for name, m in models.items():

        def forward(m=m):
            m.zero_grad(set_to_none=True)
            return (m(x) - y).square().mean()

        impls.append((name, forward, lambda loss: loss.backward(), ""))

    def check(name, loss):
        m = models[name]
        if name == "nn.Linear":
            return None, None
        v = _free(m)
        (g,) = torch.autograd.grad(loss, v)
        with torch.no_grad():  # the loss's gradient with respect to the effective weight
            w = m.weight.detach().requires_grad_()
        dw = torch.func.grad(lambda w: (nn.functional.linear(x, w, m.bias) - y).square().mean())(w)
        return sigma_error(m.weight), rel_error(g, polar_reference_grad(v, dw))

    state = "at init" if adam_steps == 0 else f"after {adam_steps} Adam steps"
    case = f"{width}x{width} layer, batch {batch}, {state}"
    rows = measure_case(bench, case, impls, cfg, "max|σ-1|", check, x=width)
    _, forward, backward, _ = impls[0]  # lipsort's default layer, as trained by the bench
    notes.append(f"lipsort, {case}: " + polar_note(lambda: backward(forward())))
    return rows


def bench_layer(cfg: Config, deel, notes: list[str]) -> list[Row]:
    width = 32 if cfg.tiny else 1024
    return layer_rows(cfg, deel, notes, width, 0, "layer") + layer_rows(
        cfg, deel, notes, width, 2 if cfg.tiny else 20, "layer"
    )


def bench_widths(cfg: Config, deel, notes: list[str]) -> list[Row]:
    widths = [16, 32] if cfg.tiny else [128, 256, 512, 1024, 2048]
    return [
        row
        for w in widths
        for row in layer_rows(cfg, deel, notes, w, 2 if cfg.tiny else 20, "widths", default_only=True)
    ]


def bench_cache(cfg: Config, deel, notes: list[str]) -> list[Row]:
    """Eval of a Björck MLP (weights cached) against the plain MLP and against recomputing."""
    sizes = [24, 32, 32, 4] if cfg.tiny else [784, 1024, 1024, 10]
    batch = 8 if cfg.tiny else 256
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        if i:
            layers.append(MaxMin())
        layers.append(P.bjorck_orthonormal(nn.Linear(a, b)))
    recompute = nn.Sequential(*layers).to(cfg.device).train()
    x = torch.rand(batch, sizes[0], device=cfg.device)
    rows = _network_cache_rows(cfg, f"eval MLP {'-'.join(map(str, sizes))} batch {batch}", recompute, x)
    # Every constraint of the library on one layer, cached in eval mode, beside nn.Linear.
    width = sizes[1]
    torch.manual_seed(0)
    layers = {
        "lipsort": P.bjorck_orthonormal(nn.Linear(width, width)),
        "spectral": P.spectral_normalized(nn.Linear(width, width)),
        "linf": P.linf_projected(nn.Linear(width, width)),
    }
    layers = {k: m.to(cfg.device).eval() for k, m in layers.items()}
    layers["nn.Linear"] = nn.Linear(width, width).to(cfg.device).eval()
    x = torch.rand(batch, width, device=cfg.device)

    def forward(model):
        with torch.no_grad():
            return model(x)

    impls = [(k, (lambda m=m: forward(m)), None, "eval mode") for k, m in layers.items()]
    rows += measure_case(
        "cache", f"eval {width}x{width} layer batch {batch}", impls, cfg, "‖W‖₂ or ‖W‖∞",
        lambda name, out: float(F.operator_norm(layers[name].weight.detach(), "inf" if name == "linf" else 2)),
    )
    return rows + _conv_cache_rows(cfg, batch)


def _network_cache_rows(cfg: Config, case: str, recompute: nn.Module, x) -> list[Row]:
    """Eval of a constrained network with cached weights, against its ``frozen`` export and
    against recomputing the weights at every forward pass (``recompute``, in training mode)."""
    cached = copy.deepcopy(recompute).eval()
    plain = P.frozen(cached).eval()

    def forward(model):
        with torch.no_grad():
            return model(x)

    reference = forward(plain)
    impls = [
        ("lipsort", lambda: forward(cached), None, "eval mode, weights cached"),
        ("plain", lambda: forward(plain), None, "frozen(): stock layers"),
        ("recompute", lambda: forward(recompute), None, "constraints at every forward"),
    ]
    return measure_case(
        "cache", case, impls, cfg, "max|Δ logits|",
        lambda name, out: float((out - reference).abs().max()),
    )


def _conv_cache_rows(cfg: Config, batch: int) -> list[Row]:
    """Li et al.'s Small MNIST network with each orthogonal convolution (Björck dense layers,
    MaxMin), as :func:`_network_cache_rows`."""
    from ..conv import CONVS, bcop_small

    x = torch.rand(batch, 1, 28, 28, device=cfg.device)
    rows = []
    for conv in CONVS:
        torch.manual_seed(0)
        recompute = bcop_small(conv, n_iters=5 if cfg.tiny else 20).to(cfg.device).train()
        rows += _network_cache_rows(cfg, f"eval Small network {conv.upper()} batch {batch}", recompute, x)
    return rows
