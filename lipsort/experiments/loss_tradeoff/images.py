r"""Experiments B4–B7 of chapter 07 on MNIST and Fashion-MNIST (the paper's B4–B6 use CIFAR).

* Every network trains through :func:`lipsort.training.fit` (:func:`.toys.train`): Adam with
  the paper's per-step cosine decay to 1 %, and with ``checkpoint_dir`` one checkpoint per
  network (its name keyed on the run's settings), so an interrupted sweep resumes.
* :func:`evaluate`: clean accuracy, certified accuracy at ε and mean certifiable robustness.
* :func:`pareto_sweep` (B4): one network per loss hyper-parameter; :data:`PAPER_CIFAR10_FRONT`
  and :func:`plot_pareto` draw the measured fronts beside the paper's.
* :func:`gap_vs_size` (B5), :func:`random_labels` (B6), :func:`weight_norm_growth` (B7).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm import tqdm

from ...certify import certified_radius, lipschitz_upper_bound
from ...data import TensorLoader
from ...models import mlp
from ...training import Schedule
from ...training.checkpoint import run_path
from .toys import lipschitz_net, loss_label, make_loss, train

__all__ = ["PAPER_CIFAR10_FRONT", "load", "cosine", "evaluate", "pareto_sweep", "plot_pareto",
           "gap_vs_size", "random_labels", "flax_cnn", "max_layer_norms", "weight_norm_growth",
           "plot_norms"]

#: The paper's CIFAR-10 front (validation accuracy, certified accuracy at ε = 36/255), read off
#: ``plot_fig_3_0.png`` of the authors' repository (±0.01); HKR points use m = 20 (0–255 pixels).
PAPER_CIFAR10_FRONT = {
    "HKR": [(5, 0.575, 0.437), (10, 0.668, 0.420), (30, 0.776, 0.305), (50, 0.791, 0.245),
            (100, 0.799, 0.211), (300, 0.805, 0.167)],
    "hinge": [(100, 0.698, 0.437), (50, 0.749, 0.362), (36, 0.768, 0.292), (20, 0.802, 0.144),
              (10, 0.833, 0.011)],
    "τ-CE": [(0.05, 0.794, 0.256), (0.1, 0.831, 0.071)],
}


def load(name: str, n_train: int, n_test: int, seed: int = 0):
    """``n_train`` training and ``n_test`` test images of ``name`` (mnist, fashion_mnist or
    cifar10), flattened, drawn at random with a private generator."""
    from ... import data

    loaders = {"mnist": data.mnist, "fashion_mnist": data.fashion_mnist, "cifar10": data.cifar10}
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(loaders)}")
    out = []
    for is_train, n in ((True, n_train), (False, n_test)):
        x, y = loaders[name](train=is_train, download=False)
        idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + is_train))[:n]
        out += [x[idx].flatten(1), y[idx]]
    return tuple(out)


def cosine(steps: int) -> Schedule:
    """The paper's ``CosineDecay(alpha=1e-2)``: per step, from the initial rate to 1 % of it."""
    return Schedule.cosine(steps, alpha=0.01)


@torch.no_grad()
def evaluate(net: nn.Module, x, y, eps: float) -> dict:
    """Accuracy, certified accuracy at ℓ2 radius ``eps`` and mean signed certified radius (MCR),
    all with the exact product bound ``L`` of the network."""
    lip = float(lipschitz_upper_bound(net))
    radius = certified_radius(net(x), y, lip)
    return {"accuracy": float((radius > 0).float().mean()), "certified": float((radius > eps).float().mean()),
            "mcr": float(radius.mean()), "lipschitz": lip}


def pareto_sweep(dataset: str, specs, n_train: int, n_test: int, eps: float, widths=(64, 32),
                 epochs: int = 2, batch_size: int = 128, lr: float = 1e-3, n_iters: int = 15, seed: int = 0,
                 checkpoint_dir: str = ""):
    """B4: one 1-Lipschitz classifier per loss spec; clean and certified accuracy on the test images."""
    import pandas as pd

    x, y, xt, yt = load(dataset, n_train, n_test, seed)
    rows = []
    for spec in tqdm(list(specs), desc=f"B4 {dataset}"):
        torch.manual_seed(seed)
        net = lipschitz_net(x.shape[1], widths, 10, n_iters)
        data = TensorLoader((x, y), batch_size, seed=seed)
        path = run_path(checkpoint_dir, f"b4-{dataset}-{loss_label(spec)}", n_train=n_train, widths=widths,
                        epochs=epochs, batch_size=batch_size, lr=lr, n_iters=n_iters, seed=seed)
        train(net, make_loss(spec), data, epochs, lr, cosine(epochs * len(data)), path)
        rows.append({"dataset": dataset, "loss": loss_label(spec), "family": spec[0],
                     "param": float(spec[1]) if len(spec) > 1 else float("nan"),
                     **evaluate(net, xt, yt, eps)})
    return pd.DataFrame(rows)


def plot_pareto(fronts, eps: float):
    """Measured fronts (one panel per data set) and the paper's CIFAR-10 front, drawn apart."""
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(fronts.dataset))
    fig, axes = plt.subplots(1, len(datasets) + 1, figsize=(4 * (len(datasets) + 1), 3.6))
    markers = {"tau": "o", "hkr": "s", "hinge": "^", "kr": "x"}
    for ax, ds in zip(axes, datasets):
        sub = fronts[fronts.dataset == ds]
        for fam, g in sub.groupby("family", sort=False):
            ax.plot(g.accuracy, g.certified, marker=markers.get(fam, "o"), ls="-", lw=0.8, label=fam)
            for _, r in g.iterrows():
                ax.annotate(f"{r.param:g}", (r.accuracy, r.certified), fontsize=6, xytext=(2, 2),
                            textcoords="offset points")
        ax.set(title=f"{ds} (measured, ε = {eps:g})", xlabel="accuracy", ylabel="certified accuracy")
        ax.legend(fontsize=7)
    ax = axes[-1]
    for fam, pts in PAPER_CIFAR10_FRONT.items():
        ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o", lw=0.8, label=fam)
        for p in pts:
            ax.annotate(f"{p[0]:g}", (p[1], p[2]), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set(title="CIFAR-10, the paper (read off its figure)", xlabel="validation accuracy",
           ylabel="certified accuracy at 36/255")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def gap_vs_size(sizes, n_test: int, spec, widths=(64, 32), steps: int = 200, batch_size: int = 100,
                lr: float = 1e-3, n_iters: int = 15, seed: int = 0, checkpoint_dir: str = ""):
    """B5: train/test accuracy of a 1-Lipschitz and an unconstrained ReLU network (same widths)
    trained for the same number of ``steps`` on MNIST subsets of each size."""
    import pandas as pd

    x, y, xt, yt = load("mnist", max(sizes), n_test, seed)
    rows = []
    for n in tqdm(list(sizes), desc="B5 sizes"):
        for kind in ("lipschitz", "unconstrained"):
            torch.manual_seed(seed)
            if kind == "lipschitz":
                net, loss_fn = lipschitz_net(x.shape[1], widths, 10, n_iters), make_loss(spec)
            else:
                net, loss_fn = mlp([x.shape[1], *widths, 10], "relu", constraint=None), nn.CrossEntropyLoss()
            data = TensorLoader((x[:n], y[:n]), min(batch_size, n), seed=seed, batches=steps)
            path = run_path(checkpoint_dir, f"b5-{kind}-n{n}", spec=spec, widths=widths, steps=steps,
                            batch_size=batch_size, lr=lr, n_iters=n_iters, seed=seed)
            train(net, loss_fn, data, 1, lr, cosine(steps), path)
            with torch.no_grad():
                tr = float((net(x[:n]).argmax(1) == y[:n]).float().mean())
                te = float((net(xt).argmax(1) == yt).float().mean())
            rows.append({"n": n, "net": kind, "train": tr, "test": te, "gap": tr - te})
    return pd.DataFrame(rows)


def random_labels(n: int, widths=(256, 256), spec=("hkr", 256.0, 36 / 255), epochs: int = 100,
                  batch_size: int = 1000, lr: float = 1e-3, n_iters: int = 15, seed: int = 0,
                  checkpoint_dir: str = ""):
    """B6: a 1-Lipschitz network fitting ``n`` MNIST images with labels drawn uniformly at random
    (the paper: CIFAR-100, 2 × 1024, HKR α = 256, m = 36/255). Returns the train-accuracy history
    (before training, then after every epoch), the Lipschitz bound and the per-epoch loss."""
    x, _, _, _ = load("mnist", n, 1, seed)
    y = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(612))
    torch.manual_seed(seed)
    net = lipschitz_net(x.shape[1], widths, 10, n_iters)

    def accuracy(model):
        return {"train_accuracy": (model(x).argmax(1) == y).float().mean()}

    with torch.no_grad():
        start = float(accuracy(net.eval())["train_accuracy"])
    data = TensorLoader((x, y), min(batch_size, n), seed=seed)
    path = run_path(checkpoint_dir, "b6-random-labels", n=n, widths=widths, spec=spec, epochs=epochs,
                    batch_size=batch_size, lr=lr, n_iters=n_iters, seed=seed)
    history = train(net, make_loss(spec), data, epochs, lr, cosine(epochs * len(data)), path,
                    metrics=accuracy, desc="B6 random labels").history
    return {"accuracy": [start, *history["train_accuracy"]], "lipschitz": float(lipschitz_upper_bound(net)),
            "losses": history["train_loss"]}


def flax_cnn() -> nn.Sequential:
    """The paper's B7 network (a Flax CNN): conv 32 – ReLU – avg-pool – conv 64 – ReLU – avg-pool –
    dense 256 – ReLU – dense 10, 'SAME' 3×3 convolutions, LeCun-normal weights and zero biases as
    Flax initializes them (so the 3136 × 256 dense layer starts at Frobenius norm ≈ √256 = 16)."""
    net = nn.Sequential(nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                        nn.Linear(3136, 256), nn.ReLU(), nn.Linear(256, 10))
    for m in net:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            # Flax's lecun_normal: a normal truncated at ±2σ, rescaled to variance 1/fan_in.
            nn.init.trunc_normal_(m.weight, std=1.0 / math.sqrt(fan_in) / 0.87962566103423978, a=-2 / math.sqrt(fan_in) / 0.87962566103423978, b=2 / math.sqrt(fan_in) / 0.87962566103423978)
            nn.init.zeros_(m.bias)
    return net


def max_layer_norms(net: nn.Module) -> tuple[float, float]:
    """Largest Frobenius norm (what the paper's code computes) and largest spectral norm of the
    (effective) kernels, a convolution's kernel reshaped to (out, in·k·k) as in that code."""
    fro, spec = 0.0, 0.0
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = m.weight.reshape(m.weight.shape[0], -1).double()
                fro = max(fro, float(torch.linalg.matrix_norm(w)))
                spec = max(spec, float(torch.linalg.matrix_norm(w, 2)))
    return fro, spec


def weight_norm_growth(n_train: int, epochs: int = 1, batch_size: int = 32, lr: float = 1e-3,
                       widths=(64, 32), n_iters: int = 15, seed: int = 0, checkpoint_dir: str = ""):
    """B7: the largest layer norm of the unconstrained CNN under Adam and cross-entropy, epoch by
    epoch, beside a 1-Lipschitz network trained the same way (τ-CE, τ = 1)."""
    import pandas as pd

    x, y, _, _ = load("mnist", n_train, 1, seed)
    rows = []

    def norms(model):
        return dict(zip(("max_frobenius", "max_spectral"), max_layer_norms(model)))

    for kind in ("unconstrained CNN", "1-Lipschitz"):
        torch.manual_seed(seed)
        if kind == "1-Lipschitz":
            net, loss_fn = lipschitz_net(x.shape[1], widths, 10, n_iters), make_loss(("tau", 1.0))
        else:
            net, loss_fn = flax_cnn(), nn.CrossEntropyLoss()
        start = norms(net.eval())
        path = run_path(checkpoint_dir, f"b7-{kind.replace(' ', '-')}", n_train=n_train, epochs=epochs,
                        batch_size=batch_size, lr=lr, widths=widths, n_iters=n_iters, seed=seed)
        history = train(net, loss_fn, TensorLoader((x, y), batch_size, seed=seed), epochs, lr,
                        checkpoint=path, metrics=norms, desc=f"B7 {kind}").history
        rows.append({"net": kind, "epoch": 0, **start})
        rows += [{"net": kind, "epoch": e, "max_frobenius": f, "max_spectral": s}
                 for e, f, s in zip(history["epoch"], history["max_frobenius"], history["max_spectral"])]
    return pd.DataFrame(rows)


def plot_norms(norms):
    """Largest layer norm against epochs (B7)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    for kind, g in norms.groupby("net", sort=False):
        ax.plot(g.epoch, g.max_frobenius, marker="o", label=f"{kind}: Frobenius")
        ax.plot(g.epoch, g.max_spectral, marker=".", ls="--", label=f"{kind}: spectral")
    ax.set(xlabel="epoch", ylabel="largest layer norm", yscale="log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
