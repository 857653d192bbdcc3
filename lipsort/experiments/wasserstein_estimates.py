r"""Book glue for chapter 04 (Wasserstein distances with Lipschitz critics, Anil et al. A2–A5).

1. :func:`run_grid`: critics of every (activation, constraint) fitted by
   :func:`lipsort.wasserstein.fit_critic` on a problem, evaluated on coupled held-out pairs when
   the problem has them (exact on the atoms of an empirical problem); :func:`estimates_table`
   adds the certified held-out estimate with its confidence interval and the gap to the truth;
   :func:`plot_histories`, :func:`plot_level_sets`, :func:`plot_gradient_histograms` draw them.
2. :func:`gaussian_clouds`: the two point clouds of the estimator test against POT.
3. :func:`train_gan`, :func:`plot_samples`, :func:`gan_problem`: the WGAN of A5 and the
   generator-to-data problem of A4.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import torch

from ..wasserstein import CriticResult, EmpiricalProblem, dual_estimate, fit_critic
from .gradient_norm import LABELS

__all__ = [
    "run_grid",
    "estimates_table",
    "record",
    "ordering_margin",
    "plot_histories",
    "plot_level_sets",
    "plot_gradient_histograms",
    "gaussian_clouds",
    "train_gan",
    "plot_samples",
    "gan_problem",
]


def _label(activation: str, group_size: int | None) -> str:
    name = LABELS.get(activation, activation)
    return f"{name}({group_size})" if activation == "groupsort" and group_size else name


def run_grid(
    problem,
    widths,
    activations=("relu", "maxmin", "groupsort", "fullsort"),
    constraints=("bjorck", "spectral"),
    group_size: int = 4,
    n_eval: int = 2048,
    n_grad: int = 2048,
    seed: int = 0,
    threads: int | None = 1,
    checkpoint_dir: str | None = None,
    name: str = "critic",
    workers: int = 1,
    **fit_kwargs,
) -> list[CriticResult]:
    r"""One critic ``problem.dim → widths → 1`` per (constraint, activation), all from the same seed.

    When the problem has coupled pairs (:meth:`~lipsort.wasserstein.ConeProblem.sample_pairs`)
    the training curve and final estimate are the paired estimate on ``n_eval`` fixed pairs,
    which no 1-Lipschitz critic can push above :math:`W_1`; gradient norms are measured at
    ``n_grad`` points drawn uniformly on the transport segments :math:`x_q + t(x_p - x_q)`,
    where an optimal critic has slope 1. An empirical problem is evaluated exactly on its
    atoms. ``fit_kwargs`` go to :func:`lipsort.wasserstein.fit_critic` (steps, lr, ...).

    With ``checkpoint_dir``, every critic trains with a checkpoint
    ``<checkpoint_dir>/<name>-<activation>-<constraint>-<hash>.pt`` (the hash covers the
    problem, by its type and public attributes such as its samples, the widths and every setting
    but the step count, so a longer run continues a shorter one): an interrupted grid resumes
    where it stopped, and a changed problem never resumes another's critic.

    With ``workers > 1`` (and a ``checkpoint_dir``) that many critics train at once, each in its
    own process with ``threads`` threads (one by default: two processes use two cores where one
    process gains little from a second thread on these small matrices); the critics then come
    back through their checkpoints, measured here as a finished run is, so the results equal
    those of ``workers=1`` bit for bit (the processes start with :func:`lipsort.setup`'s
    settings).
    """
    from .._checks import check_int
    from ..training.checkpoint import run_path, state_digest

    workers = check_int(workers, "workers")
    if workers > 1 and not checkpoint_dir:
        raise ValueError("workers > 1 needs a checkpoint_dir: the worker processes hand their critics back through it")
    if workers > 1 and fit_kwargs.get("trace_weights"):
        raise ValueError("trace_weights records every step in the training process: use workers=1")

    problem_key = [type(problem).__name__, state_digest({k: v for k, v in vars(problem).items() if not k.startswith("_")})]

    ignored = {"steps", "progress", "device", "threads"}
    settings = {k: v for k, v in fit_kwargs.items() if k not in ignored}
    evaluate, grad_points = None, None
    if hasattr(problem, "sample_pairs"):
        evaluate = _PairedEstimate(*problem.sample_pairs(n_eval, torch.Generator().manual_seed(seed + 101)))
        g_p, g_q = problem.sample_pairs(n_grad, torch.Generator().manual_seed(seed + 102))
        t = torch.rand(n_grad, 1, generator=torch.Generator().manual_seed(seed + 103))
        grad_points = g_q + t * (g_p - g_q)
    jobs = [
        dict(
            problem=problem, widths=widths, activation=activation, constraint=constraint, group_size=group_size,
            evaluate=evaluate, grad_points=grad_points, seed=seed, threads=threads,
            label=_label(activation, group_size if activation == "groupsort" else None),
            checkpoint=run_path(checkpoint_dir, f"{name}-{activation}-{constraint}", problem=problem_key, widths=list(widths),
                                group_size=group_size, seed=seed, n_eval=n_eval, **settings),
            **fit_kwargs,
        )
        for constraint in constraints
        for activation in activations
    ]
    if workers > 1 and len(jobs) > 1:
        # spawn, not fork: a fork of a process whose OpenMP threads have started can hang.
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_setup) as pool:
            for done in [pool.submit(_train, job) for job in jobs]:
                done.result()  # a worker's error is raised here
    return [fit_critic(**job) for job in jobs]


class _PairedEstimate:
    """``critic -> float``: the paired estimate on the fixed pairs ``(x_p, x_q)`` (a class,
    not a closure, so that worker processes can receive it)."""

    def __init__(self, x_p: torch.Tensor, x_q: torch.Tensor):
        self.x_p, self.x_q = x_p, x_q

    def __call__(self, f) -> float:
        with torch.no_grad():
            p = next(f.parameters())
            return float(dual_estimate(f, self.x_p.to(p), self.x_q.to(p)))


def _worker_setup() -> None:
    from ..runtime import seed_everything

    seed_everything(0, threads=None)  # deterministic kernels and flushed subnormals, as lipsort.setup


def _train(job: dict) -> None:
    """Train one critic of :func:`run_grid` into its checkpoint (in a worker process)."""
    fit_critic(**job)


def estimates_table(runs: list[CriticResult], w1: float, heldout: tuple | None = None, paired: bool = True, decimals: int = 3):
    r"""One row per critic: Lipschitz bound, certified estimate, gap to ``w1``, held-out CI, slopes.

    Every estimate shown is divided by ``max(L, 1)`` (the critic's exact Lipschitz bound ``L``),
    so none claims more than the certificate supports. ``heldout = (x_p, x_q)`` are samples
    none of the critics saw; the held-out columns are :meth:`CriticResult.heldout` (95 % interval).
    """
    import pandas as pd

    rows = []
    for r in runs:
        row = {
            "activation": r.label,
            "constraint": r.constraint,
            "Lip bound": r.lipschitz,
            "certified": r.certified,
            "gap": w1 - r.certified,
        }
        if heldout is not None:
            h = r.heldout(*heldout, paired=paired)
            row.update({"held-out": h.value, "CI low": h.low, "CI high": h.high})
        if r.grad_norms.numel():
            row.update({"mean ‖∇f‖": r.grad_stats["mean"], "frac ‖∇f‖ ≥ 0.99": r.grad_stats["frac_unit"]})
        rows.append(row)
    return pd.DataFrame(rows).round(decimals)


def record(results: dict, prefix: str, runs: list[CriticResult], heldout: tuple | None = None, paired: bool = True) -> None:
    """Store ``<prefix>.<activation>.<constraint>.certified`` (and ``.heldout``, ``gradnorm...mean``) in ``results``."""
    for r in runs:
        key = f"{prefix}.{r.activation}.{r.constraint}"
        results[f"w1.{key}.certified"] = r.certified
        if heldout is not None:
            results[f"w1.{key}.heldout"] = r.heldout(*heldout, paired=paired).value
        if r.grad_norms.numel():
            results[f"gradnorm.{key}.mean"] = r.grad_stats["mean"]


def ordering_margin(runs: list[CriticResult], better, worse, constraint: str, value: str = "certified") -> float:
    """Smallest ``value`` among the ``better`` activations minus the largest among the ``worse`` ones."""
    pick = {r.activation: getattr(r, value) for r in runs if r.constraint == constraint}
    return min(pick[a] for a in better) - max(pick[a] for a in worse)


def plot_histories(runs: list[CriticResult], w1: float = 1.0):
    """Evaluation estimate during training, one panel per constraint."""
    import matplotlib.pyplot as plt

    constraints = list(dict.fromkeys(r.constraint for r in runs))
    labels = list(dict.fromkeys(r.label for r in runs))
    fig, axes = plt.subplots(1, len(constraints), figsize=(5.0 * len(constraints), 3.3), sharey=True, squeeze=False)
    for ax, constraint in zip(axes[0], constraints):
        for r in (rr for rr in runs if rr.constraint == constraint):
            ax.plot(r.history.eval_steps, r.history.eval, color=f"C{labels.index(r.label)}", label=r.label)
        ax.axhline(w1, color="k", lw=0.8)
        ax.set(xlabel="step", title=f"{constraint} weights", ylim=(0, 1.1 * w1))
        ax.legend(fontsize=8, loc="lower right")
    axes[0, 0].set_ylabel(r"$\hat{\mathbb{E}}_P f - \hat{\mathbb{E}}_Q f$")
    fig.tight_layout()
    return fig


def plot_level_sets(runs: list[CriticResult], problem, resolution: int = 121):
    """Contours of each 2-D critic over the three cones, with the circles of P and the centers of Q."""
    import matplotlib.pyplot as plt
    import numpy as np

    constraints = list(dict.fromkeys(r.constraint for r in runs))
    acts = list(dict.fromkeys(r.label for r in runs))
    lo, hi = problem.centers.min(0).values - 1.6, problem.centers.max(0).values + 1.6
    xs, ys = torch.linspace(float(lo[0]), float(hi[0]), resolution), torch.linspace(float(lo[1]), float(hi[1]), resolution)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    fig, axes = plt.subplots(len(constraints), len(acts) + 1, figsize=(2.9 * (len(acts) + 1), 1.9 * len(constraints)),
                             squeeze=False, sharex=True, sharey=True)
    theta = np.linspace(0, 2 * np.pi, 200)
    opt = problem.critic(pts.double()).reshape(gx.shape).numpy()
    for i, constraint in enumerate(constraints):
        panels = [("optimal", opt)]
        for r in (rr for rr in runs if rr.constraint == constraint):
            p = next(r.critic.parameters())
            with torch.no_grad():
                panels.append((r.label, r.critic(pts.to(p)).reshape(gx.shape).cpu().numpy()))
        for ax, (name, z) in zip(axes[i], panels):
            ax.contourf(gx.numpy(), gy.numpy(), z - z.min(), levels=12, cmap="viridis")
            ax.contour(gx.numpy(), gy.numpy(), z - z.min(), levels=12, colors="k", linewidths=0.3)
            for c in problem.centers.tolist():
                ax.plot(c[0] + np.cos(theta), c[1] + np.sin(theta), color="w", lw=0.8)
                ax.plot(*c, "w+", ms=5)
            ax.set_title(name if name == "optimal" else f"{name} / {constraint}", fontsize=8)
            ax.set_aspect("equal")
            ax.tick_params(labelsize=6)
    fig.tight_layout()
    return fig


def plot_gradient_histograms(groups: dict[str, list[CriticResult]]):
    r"""Histograms of :math:`\|\nabla f\|` on the transport segments: one row per problem, one column per constraint."""
    import matplotlib.pyplot as plt
    import numpy as np

    runs = [r for rr in groups.values() for r in rr]
    constraints = list(dict.fromkeys(r.constraint for r in runs))
    labels = list(dict.fromkeys(r.label for r in runs))
    fig, axes = plt.subplots(len(groups), len(constraints), figsize=(5.0 * len(constraints), 2.6 * len(groups)),
                             sharex=True, squeeze=False)
    bins = np.linspace(0, 1.1, 45)
    for row, (name, rr) in zip(axes, groups.items()):
        for ax, constraint in zip(row, constraints):
            for r in (r for r in rr if r.constraint == constraint):
                ax.hist(r.grad_norms.clamp(max=1.1).numpy(), bins=bins, histtype="step", lw=1.4,
                        color=f"C{labels.index(r.label)}", label=r.label, density=True)
            ax.axvline(1.0, color="k", lw=0.8, ls=":")
            ax.set_title(f"{name}, {constraint} weights", fontsize=9)
            ax.set_yticks([])
        row[0].legend(fontsize=7, loc="upper left")
    for ax in axes[-1]:
        ax.set_xlabel(r"$\|\nabla f(x)\|_2$ on the transport segments")
    fig.tight_layout()
    return fig


def gaussian_clouds(n: int, dim: int = 2, seed: int = 0):
    """Two point clouds: ``n`` standard Gaussian points and ``n`` points of a two-component mixture."""
    gen = torch.Generator().manual_seed(seed)
    x_q = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    sign = torch.randint(2, (n, 1), generator=gen).to(torch.float64) * 2 - 1
    x_p = 0.5 * torch.randn(n, dim, generator=gen, dtype=torch.float64) + sign * torch.tensor([2.0] + [0.0] * (dim - 1), dtype=torch.float64)
    return x_p, x_q


def train_gan(images, z_dim: int, gen_widths, conv_channels, critic_widths, group_size: int, bjorck_iters: int,
              steps: int, batch_size: int, n_critic: int, lr_g: float, lr_d: float, seed: int = 0, threads: int | None = 1,
              checkpoint_dir: str | None = None):
    """Build and train the LWGAN (:mod:`lipsort.wasserstein.gan`) on ``images`` in [-1, 1], with
    ``threads`` torch threads (``None``: the caller's count).

    With ``checkpoint_dir``, training writes ``<checkpoint_dir>/lwgan-<hash of the settings>.pt``
    and a rerun resumes it (a longer run continues a shorter one of the same settings)."""
    from ..runtime import num_threads
    from ..training.checkpoint import run_path
    from ..wasserstein import gan

    path = run_path(checkpoint_dir, "lwgan", n_images=len(images), z_dim=z_dim, gen_widths=gen_widths,
                    conv_channels=conv_channels, critic_widths=critic_widths, group_size=group_size,
                    bjorck_iters=bjorck_iters, batch_size=batch_size, n_critic=n_critic, lr_g=lr_g, lr_d=lr_d, seed=seed)

    with num_threads(threads):
        torch.manual_seed(seed)
        g = gan.Generator(z_dim=z_dim, widths=gen_widths, image_shape=tuple(images.shape[1:]), conv_channels=conv_channels)
        f = gan.lipschitz_critic(tuple(images.shape[1:]), widths=critic_widths, activation="groupsort",
                                 group_size=group_size, bjorck_iters=bjorck_iters)
        history = gan.train_wgan(g, f, images, steps=steps, batch_size=batch_size, n_critic=n_critic,
                                 lr_g=lr_g, lr_d=lr_d, seed=seed, checkpoint=path)
    return g, f, history


def plot_samples(images, history=None, n: int = 48):
    """A grid of ``n`` images in [-1, 1] (and, with ``history``, the critic's estimate during training)."""
    import matplotlib.pyplot as plt

    cols = 12
    rows = -(-n // cols)
    grid = torch.ones(rows * 29 + 1, cols * 29 + 1)
    for k, im in enumerate(images[:n]):
        i, j = divmod(k, cols)
        grid[1 + 29 * i : 29 * (i + 1), 1 + 29 * j : 29 * (j + 1)] = (im[0] + 1) / 2
    ncols = 1 if history is None else 2
    fig, axes = plt.subplots(1, ncols, figsize=(6.0 + 3.4 * (ncols - 1), 3.2), squeeze=False,
                             gridspec_kw={"width_ratios": [2.4, 1][:ncols]})
    axes[0, 0].imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1)
    axes[0, 0].axis("off")
    if history is not None:
        ax = axes[0, 1]
        ax.plot(history.critic_estimate, lw=0.8)
        ax.set(xlabel="generator step", ylabel="critic objective (batch)")
    fig.tight_layout()
    return fig


def gan_problem(generator, real_images, n: int, seed: int = 0) -> EmpiricalProblem:
    """``P``: ``n`` real images, ``Q``: ``n`` generated ones (noise seed ``seed``), flattened."""
    from ..wasserstein import gan

    fake = gan.generate(generator, n, seed=seed)
    return EmpiricalProblem(real_images[:n].flatten(1), fake.flatten(1), name="data vs generator")
