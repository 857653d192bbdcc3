r"""Experiments B2 and B3 of chapter 07: the temperature of cross-entropy in 1-D, and the
accuracy–robustness trade-off on two moons.

* :func:`mixture_sample` draws B2's classes (:data:`.theory.MIXTURES`);
  :func:`temperature_sweep` trains one 1-Lipschitz network per τ on BCE(τ g).
* :func:`two_moons` draws the two-moons data set (as scikit-learn's ``make_moons``);
  :func:`moons_sweep` trains one network per loss and measures certified radii.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm import tqdm

from ...certify import lipschitz_upper_bound
from ...data import SampleLoader, TensorLoader
from ...losses import HKRLoss, KRLoss, TauCrossEntropyLoss
from ...models import mlp
from ...training import FitResult, fit
from .theory import MIXTURES, optimal_1d_loss

__all__ = ["lipschitz_net", "train", "mixture_sample", "temperature_sweep", "plot_temperature",
           "two_moons", "make_loss", "loss_label", "moons_sweep", "plot_moons"]


def lipschitz_net(in_dim: int, widths, out_dim: int = 1, n_iters: int = 15):
    """The paper's dense Lipschitz network: Björck-orthonormal layers ``widths`` with GroupSort(2),
    then a 1-Lipschitz output layer (deel-lip's SpectralDense stack and FrobeniusDense head; a
    Björck row of one output is the Frobenius-normalized row)."""
    return mlp([in_dim, *widths, out_dim], activation="groupsort", group_size=2,
               constraint="bjorck", n_iters=n_iters)


def train(net, loss_fn, data, epochs: int = 1, lr: float = 1e-3, schedule=None, checkpoint=None,
          metrics=None, desc: str | None = None) -> FitResult:
    """Adam at ``lr`` on ``loss_fn`` over ``data`` through :func:`lipsort.training.fit` (resumable
    from ``checkpoint``, per-epoch ``metrics`` kept in its history); the net is left in eval
    mode. ``desc`` shows a bar over the epochs (the sweeps show their own progress otherwise)."""
    bar = tqdm(total=epochs, desc=desc, leave=False, disable=desc is None, mininterval=1.0)

    def tick(epoch, _history):
        bar.update(epoch - bar.n)  # redrawn at most once a second

    try:
        result = fit(net, lambda p: torch.optim.Adam(p, lr=lr), loss_fn, data, epochs,
                     schedule=schedule, checkpoint=checkpoint, metrics=metrics, on_epoch_end=tick,
                     progress=False)
    finally:
        bar.close()
    net.eval()
    return result


def mixture_sample(n: int, label: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` points of class ``label`` of B2, shape ``(n, 1)``."""
    comps = MIXTURES[label]
    which = torch.multinomial(torch.tensor([w for w, _, _ in comps]), n, replacement=True, generator=gen)
    mean = torch.tensor([m for _, m, _ in comps])[which]
    std = torch.tensor([s for _, _, s in comps])[which]
    return (mean + std * torch.randn(n, generator=gen))[:, None]


def _bce_tau(tau):
    """The loss ``(g, y) ->`` class-balanced sigmoid BCE on the logit τ·g (the paper's
    FrobeniusDense(1, k_coef_lip=τ) head)."""
    ce = TauCrossEntropyLoss(tau)
    return lambda out, y: tau * ce(out, y)


def temperature_sweep(taus, steps: int = 300, batch_per_class: int = 100, widths=(256, 128, 64),
                      n_iters: int = 15, lr: float = 1e-3, n_eval: int = 20000, seed: int = 0):
    """B2: for each τ train ``g`` (1-Lipschitz) with Adam on BCE(τ g), fresh batches of
    ``batch_per_class`` points per class each step; the final loss is measured on a fixed sample
    of ``n_eval`` points per class and set beside the exact 1-Lipschitz optimum
    (:func:`~.theory.optimal_1d_loss`).

    Returns ``(table, curves)``: a DataFrame (tau, final_loss, optimum, gap) and a dict
    ``tau -> (grid, σ(τ g(grid)))``.
    """
    import pandas as pd

    gen_eval = torch.Generator().manual_seed(seed + 10_000)
    xe = torch.cat([mixture_sample(n_eval, 1, gen_eval), mixture_sample(n_eval, 0, gen_eval)])
    ye = torch.cat([torch.ones(n_eval, dtype=torch.long), torch.zeros(n_eval, dtype=torch.long)])
    grid = torch.linspace(-4, 4, 801)[:, None]
    rows, curves = [], {}
    yb = torch.cat([torch.ones(batch_per_class, dtype=torch.long),
                    torch.zeros(batch_per_class, dtype=torch.long)])

    def draw(gen):  # fresh points of both classes every step
        return torch.cat([mixture_sample(batch_per_class, 1, gen), mixture_sample(batch_per_class, 0, gen)]), yb

    for tau in tqdm(list(taus), desc="B2 temperatures"):
        torch.manual_seed(seed)
        net = lipschitz_net(1, widths, 1, n_iters)
        train(net, _bce_tau(tau), SampleLoader(draw, steps, seed=seed), lr=lr)
        with torch.no_grad():
            final = float(_bce_tau(tau)(net(xe), ye))
            curves[tau] = (grid[:, 0].numpy(), torch.sigmoid(tau * net(grid))[:, 0].numpy())
        optimum = optimal_1d_loss(tau)[0]
        rows.append({"tau": tau, "final_loss": final, "optimum": optimum, "gap": final - optimum})
    return pd.DataFrame(rows), curves


def plot_temperature(curves, table):
    """σ(τ g(x)) per τ over the two class densities (B2's figure)."""
    import matplotlib.pyplot as plt

    from .theory import mixture_density

    fig, ax = plt.subplots(figsize=(7, 3.4))
    x = np.linspace(-4, 4, 801)
    for label, color in ((1, "tab:blue"), (0, "tab:red")):
        d = mixture_density(x, label)
        ax.fill_between(x, 0, d / d.max(), color=color, alpha=0.12, lw=0)
    final = dict(zip(table.tau, table.final_loss))
    for tau, (gx, s) in curves.items():
        ax.plot(gx, s, lw=1.2, label=f"τ = {tau:g} (loss {final[tau]:.3f})")
    ax.set(xlabel="x", ylabel="σ(τ g(x)) = P(class 1)", ylim=(-0.02, 1.02))
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def two_moons(n: int = 5000, noise: float = 0.05, seed: int = 0):
    """Two interleaved half circles, ``n // 2`` of each (scikit-learn's ``make_moons``: evenly spaced
    angles, Gaussian noise of standard deviation ``noise``), shuffled. Labels: 0 outer, 1 inner."""
    gen = torch.Generator().manual_seed(seed)
    n_out, n_in = n // 2, n - n // 2
    t_out = torch.linspace(0, math.pi, n_out, dtype=torch.float64)
    t_in = torch.linspace(0, math.pi, n_in, dtype=torch.float64)
    x = torch.cat([torch.stack([t_out.cos(), t_out.sin()], 1),
                   torch.stack([1 - t_in.cos(), 0.5 - t_in.sin()], 1)])
    y = torch.cat([torch.zeros(n_out, dtype=torch.long), torch.ones(n_in, dtype=torch.long)])
    x = x + noise * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    perm = torch.randperm(n, generator=gen)
    return x[perm].float(), y[perm]


def make_loss(spec):
    """``("tau", τ)`` → τ-CE, ``("hkr", α, m)`` → HKR, ``("kr",)`` → KR (the WGAN critic)."""
    kind = spec[0]
    if kind == "tau":
        return TauCrossEntropyLoss(spec[1])
    if kind == "hkr":
        return HKRLoss(alpha=spec[1], margin=spec[2])
    if kind == "kr":
        return KRLoss()
    from ...losses import HingeLoss

    if kind == "hinge":
        return HingeLoss(margin=spec[1])
    raise ValueError(f"unknown loss spec {spec!r}: use ('tau', t), ('hkr', a, m), ('hinge', m) or ('kr',)")


def loss_label(spec) -> str:
    """Short display name of a loss spec (also the results key part)."""
    if spec[0] == "tau":
        return f"tau{spec[1]:g}"
    if spec[0] == "hkr":
        return f"hkr_a{spec[1]:g}_m{spec[2]:g}"
    if spec[0] == "hinge":
        return f"hinge_m{spec[1]:g}"
    return "kr"


def moons_sweep(specs, n_train: int = 5000, n_test: int = 5000, noise: float = 0.05, steps: int = 780,
                batch_size: int = 128, widths=(256, 128, 64), n_iters: int = 15, lr: float = 1e-3,
                eps_grid=None, seed: int = 0):
    r"""B3: one 1-Lipschitz binary classifier ``g`` per loss spec on two moons; on a test set,
    the certified radius :math:`y\,g(x)/L` (``L`` the exact product bound) and its curve
    "fraction with radius > ε" (at ε = 0 the clean accuracy), and the mean certifiable robustness
    on the *training* set, :math:`\mathbb E[y g]/L`, to compare with :math:`W_1/2`.

    Returns ``(table, curves, nets)``.
    """
    import pandas as pd

    x, y = two_moons(n_train, noise, seed)
    xt, yt = two_moons(n_test, noise, seed + 1)
    eps = torch.linspace(0, 1.5, 151) if eps_grid is None else torch.as_tensor(eps_grid)
    rows, curves, nets = [], {}, {}
    for spec in tqdm(list(specs), desc="B3 losses"):
        torch.manual_seed(seed)
        net = lipschitz_net(2, widths, 1, n_iters)
        train(net, make_loss(spec), TensorLoader((x, y), batch_size, seed=seed, batches=steps), lr=lr)
        lip = float(lipschitz_upper_bound(net))
        with torch.no_grad():
            s_test = (2.0 * yt - 1) * net(xt)[:, 0] / lip
            s_train = (2.0 * y - 1) * net(x)[:, 0] / lip
        curve = (s_test[None, :] > eps[:, None]).float().mean(1)
        name = loss_label(spec)
        curves[name], nets[name] = (eps.numpy(), curve.numpy()), net
        rows.append({"loss": name, "accuracy": float(curve[0]), "median_radius": float(s_test.median()),
                     "mcr_train": float(s_train.mean()), "lipschitz": lip})
    return pd.DataFrame(rows), curves, nets


def plot_moons(curves, nets, x, y, published=None):
    """Left: certified accuracy against ε per loss; right: the zero level sets of the classifiers."""
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, (e, c) in curves.items():
        a.plot(e, c, lw=1.3, label=name)
    if published:
        for name, acc in published.items():
            a.plot([0], [acc], "k+", ms=9)
    a.set(xlabel="ε (ℓ2 radius)", ylabel="certified accuracy at ε", ylim=(0, 1.02))
    a.legend(fontsize=7)
    b.scatter(x[:, 0], x[:, 1], c=y, s=2, cmap="coolwarm", alpha=0.4)
    gx, gy = torch.meshgrid(torch.linspace(-1.5, 2.5, 200), torch.linspace(-1.0, 1.5, 150), indexing="xy")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    for i, (name, net) in enumerate(nets.items()):
        with torch.no_grad():
            z = net(grid)[:, 0].reshape(gx.shape)
        b.contour(gx, gy, z, levels=[0], colors=[f"C{i}"], linewidths=1.2)
    b.set(xlabel="x₁", ylabel="x₂", title="decision boundaries g = 0")
    fig.tight_layout()
    return fig
