"""Glue of chapter 06 (orthogonal convolutions, Li et al. 2019): theory checks, Table 1 runs,
Anil et al.'s small-data LeNet, tables and plots. The layers and networks live in
:mod:`lipsort.conv`; training in :mod:`lipsort.training`."""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import conv as C
from ..attacks import pgd_l2
from ..book.curves import curve_key
from ..certify import certified_accuracy, lipschitz_upper_bound
from ..data import loader, subset_per_class
from ..losses import MarginLoss
from ..training import Schedule, evaluate, fit

__all__ = [
    "attenuation_table",
    "show_table",
    "PUBLISHED",
    "one_d_block",
    "bcop_checks",
    "components_table",
    "straight_path",
    "Run",
    "train_classifier",
    "run_table",
    "run_lenet",
    "table",
    "plot_curves",
    "curve_results",
    "checkpoint_dir",
    "time_epoch",
]


# --------------------------------------------------------------------------- theory


def _random_layer(kind: str, n: int, k: int, size: int) -> nn.Module:
    if kind == "BCOP":
        return C.BCOP(n, n, k, bias=False, dtype=torch.float64, input_size=size)
    if kind == "RKO":
        return C.RKO(n, n, k, bias=False, dtype=torch.float64, input_size=size)
    layer = C.OSSN(n, n, k, bias=False, dtype=torch.float64, input_size=size)
    return layer


def attenuation_table(depth=8, channels=8, kernel=3, size=8, n_vectors=16, seed=0):
    """Linear stacks of ``depth`` random circular convolutions (float64, no activations):
    per layer type, the spread of the singular values of one layer (exact, FFT) and the norm
    ``‖Jᵀu‖`` of back-propagated unit vectors ``u`` through the stack (autograd)."""
    import pandas as pd

    rows = []
    for kind in ("BCOP", "RKO", "OSSN"):
        torch.manual_seed(seed)
        net = nn.Sequential(*[_random_layer(kind, channels, kernel, size) for _ in range(depth)])
        x = torch.randn(n_vectors, channels, size, size, dtype=torch.float64, requires_grad=True)
        net.train()
        net(x)  # OSSN runs its power iterations on the first training-mode pass
        net.eval()
        y = net(x)
        u = torch.randn_like(y)
        u = u / u.flatten(1).norm(dim=1)[:, None, None, None]
        (g,) = torch.autograd.grad(y, x, u)
        norms = g.flatten(1).norm(dim=1)
        s = C.singular_values(net[0], size)
        rows.append({"layer": kind, "sigma_min": float(s.min()), "sigma_max": float(s.max()),
                     "grad_min": float(norms.min()), "grad_max": float(norms.max()),
                     "bound": float(lipschitz_upper_bound(net))})  # fmt: skip
    return pd.DataFrame(rows)


def show_table(df, sci=(), fixed=(), digits=4):
    """``df`` with float columns as strings: ``sci`` in 3-digit scientific notation, others
    (or ``fixed``) with ``digits`` decimals; deterministic text for the book."""
    out = df.copy()
    for col in out.columns:
        if out[col].dtype.kind == "f":
            fmt = "{:.2e}" if col in sci else f"{{:.{digits}f}}"
            out[col] = out[col].map(fmt.format)
    return out


def _circulant_1d(kernel_taps: list[torch.Tensor], length: int) -> torch.Tensor:
    """Matrix of the 1-D circular convolution ``y[t] = Σ_a K_a x[t + a]`` on ``R^{n×length}``."""
    n = kernel_taps[0].shape[0]
    m = torch.zeros(n * length, n * length, dtype=torch.float64)
    for t in range(length):
        for a, tap in enumerate(kernel_taps):
            s = (t + a) % length
            m[t * n : (t + 1) * n, s * n : (s + 1) * n] += tap
    return m


def one_d_block(n=6, rank=2, length=7, seed=0) -> dict:
    """Orthogonality of the 1-D two-tap kernel ``[P, I − P]``: max ``|MᵀM − I|`` of its
    circulant matrix for the paper's figure (``n = 2``, ``P`` onto the x-axis, length 3), for
    a random rank-``rank`` projector, and for the non-projector ``A = P/2`` (which fails)."""
    gen = torch.Generator().manual_seed(seed)
    eye2 = torch.eye(2, dtype=torch.float64)
    p_fig = torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64))
    v = torch.linalg.qr(torch.randn(n, rank, generator=gen, dtype=torch.float64))[0]
    p = v @ v.T
    eye = torch.eye(n, dtype=torch.float64)

    def err(taps, ln):
        m = _circulant_1d(taps, ln)
        return float((m.T @ m - torch.eye(m.shape[0], dtype=torch.float64)).abs().max())

    return {
        "figure": err([p_fig, eye2 - p_fig], 3),
        "random": err([p, eye - p], length),
        "not_projector": err([p / 2, eye - p / 2], length),
        "projector_error": float((p @ p - p).abs().max()),
    }


def bcop_checks(seed=0, size=8) -> dict:
    """Exact spectra of float64 BCOPs (square, widening, narrowing), and the batched kernel
    against the per-tap construction."""
    from ..conv.reference import bcop_kernel_per_tap

    torch.manual_seed(seed)
    out = {}
    for name, (cin, cout) in {"square": (8, 8), "widening": (4, 8), "narrowing": (8, 4)}.items():
        layer = C.BCOP(cin, cout, 3, dtype=torch.float64, input_size=size).eval()
        s = C.singular_values(layer, size)
        out[f"{name}.sigma_min"], out[f"{name}.sigma_max"] = float(s.min()), float(s.max())
        out[f"{name}.count"] = int(s.numel())
    layer = C.BCOP(8, 8, 5, dtype=torch.float64).eval()
    with torch.no_grad():
        out["per_tap_error"] = float((layer.weight - bcop_kernel_per_tap(layer)).abs().max())
    return out


def components_table(n=4, kernel=3, seed=0):
    """BCOPs over ``n`` channels with various projector ranks and ``det H`` signs: their
    invariants (:func:`lipsort.conv.component_invariants`), and those of their ``2n``-channel
    embeddings (:func:`lipsort.conv.embed_bcop`) with the largest output difference."""
    import pandas as pd

    torch.manual_seed(seed)
    count = 2 * (kernel - 1)
    choices = [(n // 2,) * count, (0,) * count, (n,) * count, tuple((i % (n + 1)) for i in range(count)),
               (1,) * count]  # fmt: skip
    rows = []
    x = torch.randn(2, n, 7, 7, dtype=torch.float64)
    for ranks in choices:
        for sign in (1, -1):
            small = C.BCOP(n, n, kernel, projector_ranks=ranks, dtype=torch.float64).eval()
            if small.component()[0] != sign:  # a reflection of the 1×1 part flips det H
                with torch.no_grad():
                    small.ortho_orig[0].neg_()
            big = C.embed_bcop(small).eval()
            with torch.no_grad():
                y = big(torch.cat([x, torch.zeros_like(x)], 1))
                err = float(max((y[:, :n] - small(x)).abs().max(), y[:, n:].abs().max()))
            rows.append({"ranks": str(ranks), "invariants": str(C.component_invariants(small)),
                         "embedded ranks": str(sorted(set(big.projector_ranks))),
                         "embedded invariants": str(C.component_invariants(big)),
                         "output error": err})  # fmt: skip
    return pd.DataFrame(rows)


def straight_path(n=4, kernel=3, size=8, steps=41, seed=0):
    """Smallest singular value along the straight line between the kernels of two BCOPs in
    different components (ranks ``n/2`` and ``n/2 − 1``): it must leave the orthogonal set."""
    torch.manual_seed(seed)
    a = C.BCOP(n, n, kernel, dtype=torch.float64).eval().weight.detach()
    b = C.BCOP(n, n, kernel, projector_ranks=n // 2 - 1, dtype=torch.float64).eval()
    b = b.weight.detach()
    ts = torch.linspace(0, 1, steps, dtype=torch.float64)
    s_min = [float(C.singular_values((1 - t) * a + t * b, size).min()) for t in ts]
    return ts.numpy(), np.array(s_min)


# --------------------------------------------------------------------------- training

#: Li et al.'s Table 1 (and Table 7 for the frozen ablation), MNIST, clean / certified at 1.58,
#: mean over 5 seeds (LConvNet runs/table.tex, commit 14643bf).
PUBLISHED = {
    ("small", "ossn"): "96.86 / 42.95", ("small", "rko"): "97.28 / 43.58",
    ("small", "bcop"): "97.54 / 45.84", ("large", "ossn"): "98.31 / 53.77",
    ("large", "rko"): "98.44 / 55.18", ("large", "bcop"): "98.77 / 56.66",
    ("fc3", "none"): "98.71 / 54.46", ("small", "bcop_frozen"): "93.57 / 7.51",
    ("large", "bcop_frozen"): "65.20 / 0.00",
}  # fmt: skip


@dataclass
class Run:
    """One trained classifier and its test metrics (fractions in [0, 1])."""

    data: str
    net: str
    conv: str
    seed: int
    clean: float
    certified: dict  # radius -> certified accuracy
    pgd: float | None
    lipschitz: float
    history: dict = field(repr=False)
    seconds_per_epoch: float = math.nan
    frozen_change: float | None = None  # max change of frozen projector parameters
    pgd_certified: float | None = None  # certified accuracy on the attacked images


def checkpoint_dir(path: str = "") -> Path:
    """``path`` (``~`` expanded) or a fresh temporary directory when empty."""
    if path:
        p = Path(path).expanduser()
        p.mkdir(parents=True, exist_ok=True)
        return p
    return Path(tempfile.mkdtemp(prefix="lipsort-06-"))


def _ckpt_name(config: dict) -> str:
    digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    return f"{config['data']}-{config['net']}-{config['conv']}-s{config['seed']}-{digest}.pt"


def build(net: str, conv: str, *, n_iters=20, fc3_width=1024, large_fc_width=512, in_channels=1,
          input_size=28):
    """The network ``net`` ∈ {small, large, fc3} with convolutions ``conv`` (``"bcop_frozen"``:
    BCOP with every convolution parameter frozen, the paper's ablation BCOP-Fixed)."""
    kind = "bcop" if conv == "bcop_frozen" else conv
    kw = dict(in_channels=in_channels, input_size=input_size, n_iters=n_iters)
    if net == "small":
        model = C.bcop_small(kind, **kw)
    elif net == "large":
        model = C.bcop_large(kind, fc_width=large_fc_width, **kw)
    elif net == "fc3":
        model = C.fc3(in_channels * input_size**2, width=fc3_width, n_iters=n_iters)
    else:
        raise ValueError(f"unknown net {net!r}; choose small, large or fc3")
    if conv == "bcop_frozen":
        C.freeze_bcop(model)
    return model


def _schedule(name: str, step: int) -> Schedule:
    if name == "step":
        return Schedule.step_every(step, 0.1)
    if name == "exponential":
        return Schedule.exponential(0.1 ** (1 / step))
    raise ValueError(f"schedule must be 'step' or 'exponential', got {name!r}")


def train_classifier(data_name, net, conv, train, test, *, seed, epochs, batch_size, lr,
                     schedule, lr_step, margin, radii, n_iters, fc3_width, large_fc_width, ckpt_dir, pgd_n,
                     pgd_steps, pgd_step_size, pgd_eps, device, progress=True) -> Run:
    """Train ``net``/``conv`` with the margin loss through :func:`lipsort.training.fit` (with a
    checkpoint), then evaluate: clean and certified accuracy at ``radii`` on ``test``, and
    ℓ2 PGD accuracy at ``pgd_eps`` on its first ``pgd_n`` images."""
    torch.manual_seed(seed)
    model = build(net, conv, n_iters=n_iters, fc3_width=fc3_width,
                  large_fc_width=large_fc_width).to(device)
    frozen0 = [p.detach().clone() for m in model.modules() if isinstance(m, C.BCOP) for p in m.parameters()]
    config = dict(data=data_name, net=net, conv=conv, seed=seed, epochs=epochs,
                  batch=batch_size, lr=lr, schedule=schedule, lr_step=lr_step, margin=margin,
                  n_iters=n_iters, fc3_width=fc3_width if net == "fc3" else None,
                  large_fc_width=large_fc_width if net == "large" else None,
                  n_train=int(train[1].shape[0]))  # fmt: skip
    config.pop("epochs")  # a longer run continues the same checkpoint
    if conv == "bcop_frozen":
        config["frozen"] = "every BCOP parameter"  # not the projector-only freezing of earlier versions
    params = [p for p in model.parameters() if p.requires_grad]
    result = fit(model, torch.optim.Adam(params, lr=lr), MarginLoss(margin),
                 loader(train, batch_size, seed=seed), epochs,
                 eval_data=loader(test, 500, shuffle=False), schedule=_schedule(schedule, lr_step),
                 checkpoint=Path(ckpt_dir) / _ckpt_name(config), certify_eps=list(radii),
                 device=device, progress=progress, desc=f"{data_name} {net} {conv} s{seed}")  # fmt: skip
    model = result.model.eval()
    ev = evaluate(model, loader(test, 500, shuffle=False), certify_eps=list(radii), device=device)
    pgd = pgd_cert = None
    if pgd_n:
        x, y = test[0][:pgd_n].to(device), test[1][:pgd_n].to(device)
        torch.manual_seed(seed)
        correct = certified = 0
        for i in range(0, pgd_n, 250):
            xb, yb = x[i : i + 250], y[i : i + 250]
            xa = pgd_l2(model, xb, yb, eps=pgd_eps, steps=pgd_steps, step_size=pgd_step_size)
            with torch.no_grad():
                correct += int((model(xa).argmax(1) == yb).sum())
                certified += len(yb) * float(
                    certified_accuracy(model(xb), yb, pgd_eps, ev["lipschitz"]))
        pgd, pgd_cert = correct / pgd_n, certified / pgd_n
        model.eval()  # torchattacks leaves the model in training mode
    change = None
    if conv == "bcop_frozen":
        now = [p.detach() for m in model.modules() if isinstance(m, C.BCOP) for p in m.parameters()]
        change = float(max((a.cpu() - b.cpu()).abs().max() for a, b in zip(frozen0, now)))
    secs = result.history.get("seconds") or [math.nan]
    return Run(data_name, net, conv, seed, ev["acc"], dict(zip(radii, ev["certified_acc"])),
               pgd, float(ev["lipschitz"]), result.history, float(np.mean(secs)), change,
               pgd_cert)  # fmt: skip


def run_table(data_name, train, test, nets, convs, seeds, **kw) -> list[Run]:
    """Every ``(net, conv, seed)`` of ``nets × convs × seeds`` (``net = "fc3"`` ignores
    ``convs``: one FC-3 per seed)."""
    from tqdm import tqdm

    jobs = [(net, conv, s) for net in nets for conv in (["none"] if net == "fc3" else convs)
            for s in seeds]  # fmt: skip
    return [train_classifier(data_name, net, conv, train, test, seed=s, progress=False, **kw)
            for net, conv, s in tqdm(jobs, desc=f"{data_name} models")]  # fmt: skip


def run_lenet(train, test, *, convs, per_class, seeds, epochs, batch_size, lr, milestones,
              n_iters, ckpt_dir, device, progress=False) -> dict:
    """Anil et al.'s small-data MNIST: LeNets on ``per_class`` images per class, cross-entropy,
    Adam, ×0.1 at ``milestones``; test accuracy per conv type, averaged over ``seeds``."""
    out = {}
    for conv in convs:
        accs = []
        for s in seeds:
            xs, ys = subset_per_class(*train, per_class, seed=s)
            torch.manual_seed(s)
            model = C.lenet(conv, n_iters=n_iters).to(device)
            config = dict(data="a7", net="lenet", conv=conv, seed=s, per_class=per_class,
                          lr=lr, milestones=list(milestones), n_iters=n_iters, batch=batch_size)  # fmt: skip
            result = fit(model, torch.optim.Adam(model.parameters(), lr=lr),
                         nn.CrossEntropyLoss(), loader((xs, ys), batch_size, seed=s), epochs,
                         schedule=Schedule.multistep(milestones, 0.1), device=device,
                         checkpoint=Path(ckpt_dir) / _ckpt_name(config), progress=progress,
                         desc=f"a7 lenet {conv} s{s}")  # fmt: skip
            accs.append(evaluate(result.model.eval(), loader(test, 500, shuffle=False),
                                 device=device)["acc"])  # fmt: skip
        out[conv] = float(np.mean(accs))
    return out


def cert_key(radius: float) -> str:
    """``cert158`` for radius 1.58, ``cert030`` for 0.3: no dot inside a result key."""
    return f"cert{round(radius * 100):03d}"


def summarize(runs: list[Run], radii) -> dict:
    """Mean (and population std over seeds) of each metric per ``data.net.conv``, in %."""
    groups: dict = {}
    for r in runs:
        groups.setdefault(f"{r.data}.{r.net}.{r.conv}", []).append(r)
    out = {}
    for key, rs in groups.items():
        metrics = {"clean": [r.clean for r in rs], "lipschitz": [r.lipschitz for r in rs]}
        for e in radii:
            metrics[cert_key(e)] = [r.certified[e] for r in rs]
        if rs[0].pgd is not None:
            metrics["pgd"] = [r.pgd for r in rs]
        for m, v in metrics.items():
            scale = 1.0 if m == "lipschitz" else 100.0
            out[f"{key}.{m}"] = float(np.mean(v) * scale)
            if len(v) > 1 and m != "lipschitz":
                out[f"{key}.{m}.std"] = float(np.std(v) * scale)
    return out


def curve_results(runs: list[Run], radii) -> dict:
    """Test and certified accuracy (fractions, as :mod:`lipsort.book.curves` reads them) after
    every epoch, the mean over the seeds of each ``data.net.conv``: keys
    ``<data>.<net>.<conv>.test_acc.eNNN`` and ``….<cert key>.eNNN`` (e.g.
    ``mnist.large.bcop.cert158.e002``), the accuracy-against-epoch curves a results file keeps
    (checkpoints may not be kept). Epochs that not every seed reached are left out."""
    groups: dict = {}
    for r in runs:
        groups.setdefault(f"{r.data}.{r.net}.{r.conv}", []).append(r.history)
    out = {}
    for key, hs in groups.items():
        n = min(len(h["epoch"]) for h in hs)
        for j in range(n):
            e = hs[0]["epoch"][j]
            out[curve_key(key, "test_acc", e)] = float(np.mean([h["eval_acc"][j] for h in hs]))
            for radius in radii:
                vals = [h["certified_acc"][j][h["certify_eps"].index(radius)] for h in hs]
                out[curve_key(key, cert_key(radius), e)] = float(np.mean(vals))
    return out


def guarantee_results(runs: list[Run], data_name: str) -> dict:
    """What the certificates promise, checked on ``runs``: ``<data>.pgd_minus_cert_min``, the
    smallest PGD minus certified accuracy (in points; a certificate holds, so never negative), and
    ``<data>.max_lipschitz``, the largest certified bound of the networks that are 1-Lipschitz by
    construction (BCOP, RKO, Björck; OSSN's power iteration only estimates its norm), absent when
    the runs hold OSSN networks only."""
    if not runs:
        raise ValueError(f"no {data_name} runs to check (the run trained no network)")
    out = {f"{data_name}.pgd_minus_cert_min": min(100 * (r.pgd - r.pgd_certified) for r in runs)}
    exact = [r.lipschitz for r in runs if r.conv != "ossn"]
    if exact:
        out[f"{data_name}.max_lipschitz"] = max(exact)
    return out


def table(summary: dict, data_name: str, radii, published: dict | None = None):
    """Rows ``net, conv``; columns clean / certified / PGD (%), with the paper's numbers."""
    import pandas as pd

    rows = []
    for key in summary:
        parts = key.split(".")
        if parts[0] != data_name or parts[-1] != "clean":
            continue
        base = ".".join(parts[:3])
        row = {"net": parts[1], "conv": parts[2], "clean": summary[key]}
        for e in radii:
            row[f"certified@{e:g}"] = summary[f"{base}.{cert_key(e)}"]
        row["PGD"] = summary.get(f"{base}.pgd", math.nan)
        row["Lipschitz bound"] = summary[f"{base}.lipschitz"]
        if published is not None:
            row["paper clean / cert"] = published.get((parts[1], parts[2]), "")
        rows.append(row)
    df = pd.DataFrame(rows)
    for col in df.columns:
        if df[col].dtype.kind == "f":
            digits = 4 if col == "Lipschitz bound" else 2
            df[col] = df[col].map(lambda v, d=digits: "" if math.isnan(v) else f"{v:.{d}f}")
    return df


def plot_curves(runs: list[Run], radius: float):
    """Clean (solid) and certified (dashed) test accuracy per epoch of every run."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for r in runs:
        h = r.history
        i = h["certify_eps"].index(radius)
        line, = ax.plot(h["epoch"], [100 * a for a in h["eval_acc"]], label=f"{r.data} {r.net} {r.conv}")
        ax.plot(h["epoch"], [100 * c[i] for c in h["certified_acc"]], "--", color=line.get_color())
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def time_epoch(net: str, conv: str, *, batches=3, batch_size=128, n_batches=469, threads=2,
               n_iters=20, fc3_width=1024) -> float:
    """Seconds of one MNIST epoch (``n_batches`` steps) of ``net``/``conv``, from the mean of
    ``batches`` timed training steps after one warm-up step, at ``threads`` threads."""
    from ..runtime import num_threads

    with num_threads(threads):
        torch.manual_seed(0)
        model = build(net, conv, n_iters=n_iters, fc3_width=fc3_width)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-3)
        x, y = torch.rand(batch_size, 1, 28, 28), torch.randint(0, 10, (batch_size,))
        loss = MarginLoss(1.0)
        for i in range(batches + 1):
            if i == 1:
                t0 = time.perf_counter()
            opt.zero_grad()
            loss(model(x), y).backward()
            opt.step()
        return (time.perf_counter() - t0) / batches * n_batches
