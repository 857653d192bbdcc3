r"""Book glue for chapter 01 (Lipschitz constants, gradient-norm attenuation, the absolute value).

1. :func:`composition_table`: the product of per-layer constants against the largest
   gradient norm found on samples, for random networks with and without constraints.
2. :func:`attenuation_table`: gradient norms of deep networks with exactly orthogonal weights,
   ReLU against MaxMin; :func:`maxmin_abs` and :func:`relu_optimum` build by hand the
   networks of the chapter's constructions, :func:`relu_bound_certificate` checks the
   semidefinite certificate of the 1/√3 bound.
3. :func:`run_absolute_value`: the A1 grid (activations × constraints) trained on the dual
   objective, with exact estimates and gradient-norm statistics; :func:`plot_critics`,
   :func:`plot_gradient_norms`, :func:`plot_histories` draw it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..certify import empirical_lipschitz, lipschitz_upper_bound
from ..models import mlp
from ..wasserstein import ConeProblem, CriticResult, fit_critic, gradient_norms

__all__ = [
    "run_results",
    "composition_table",
    "orthogonal_mlp",
    "attenuation_table",
    "plot_attenuation",
    "maxmin_abs",
    "relu_optimum",
    "relu_bound_certificate",
    "run_absolute_value",
    "decayed_schedule",
    "results_table",
    "plot_critics",
    "plot_gradient_norms",
    "plot_histories",
    "LABELS",
]

F64 = torch.float64

#: Display names of the activations.
LABELS = {"relu": "ReLU", "maxmin": "MaxMin", "groupsort": "GroupSort", "fullsort": "FullSort", "abs": "Abs"}


def _label(activation: str, group_size: int | None = None) -> str:
    name = LABELS.get(activation, activation)
    return f"{name}({group_size})" if activation == "groupsort" and group_size else name


# ---------------------------------------------------------------------------------------------
# 1. Composition: the product bound against gradient norms.


def composition_table(
    depths=(2, 4, 8), width: int = 64, in_dim: int = 8, n_samples: int = 512, seed: int = 0
):
    r"""Upper bound :math:`\prod_k \|W_k\|_2` vs the largest sampled gradient norm.

    For each depth (number of linear layers) and each of four families (ReLU or MaxMin,
    unconstrained or Björck-orthonormal weights), one random float64 network
    ``in_dim → width → … → 1``; inputs are standard Gaussian. The empirical value is a lower
    bound of the true Lipschitz constant, the product an upper bound, so
    ``ratio = empirical / bound`` lies in (0, 1]; it measures how tight composition is.

    Returns:
        A ``pandas.DataFrame`` with columns depth, activation, constraint, bound, empirical,
        ratio.
    """
    import pandas as pd

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples, in_dim, generator=gen, dtype=F64)
    rows = []
    for depth in depths:
        sizes = [in_dim] + [width] * (depth - 1) + [1]
        for constraint in (None, "bjorck"):
            for activation in ("relu", "maxmin"):
                torch.manual_seed(seed + depth)
                net = mlp(sizes, activation=activation, constraint=constraint).to(F64).eval()
                bound = float(lipschitz_upper_bound(net))
                emp = float(empirical_lipschitz(net, x))
                rows.append(
                    {
                        "depth": depth,
                        "activation": _label(activation),
                        "constraint": constraint or "none",
                        "bound": bound,
                        "empirical": emp,
                        "ratio": emp / bound,
                    }
                )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# 2. Gradient-norm attenuation.


def orthogonal_mlp(depth: int, width: int, activation: str, seed: int = 0, group_size: int | None = None) -> nn.Sequential:
    r"""``width → width → … → 1`` with exactly orthogonal square weights and a unit last row.

    ``depth`` linear layers (``depth - 1`` activations), float64, plain ``nn.Linear`` layers
    initialized by ``torch.nn.init.orthogonal_`` (so :math:`W_k^\top W_k = I` to rounding);
    biases keep their default initialization. With a GroupSort activation the input gradient
    is :math:`W_1^\top P_1 W_2^\top \cdots P_{L-1} w_L` with permutations :math:`P_k`, whose norm
    is exactly :math:`\|w_L\| = 1`.
    """
    torch.manual_seed(seed)
    net = mlp([width] * depth + [1], activation=activation, constraint=None, group_size=group_size).to(F64)
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                nn.init.orthogonal_(m.weight)
    return net.eval()


def attenuation_table(depths=(1, 2, 4, 8, 16), width: int = 32, n_samples: int = 512, seed: int = 0):
    r"""Input-gradient norms of :func:`orthogonal_mlp` networks, ReLU vs MaxMin vs GroupSort(4).

    Inputs are standard Gaussian. For ReLU each layer zeroes the gradient's coordinates at
    inactive units (about half of them); for the sorting activations the Jacobian is a
    permutation and the norm stays exactly 1.

    Returns:
        ``(table, norms)``: a DataFrame with one row per (depth, activation) — mean, min and
        max gradient norm and the mean squared norm — and the long-form DataFrame of all norms.
    """
    import pandas as pd

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples, width, generator=gen, dtype=F64)
    rows, longs = [], []
    for depth in depths:
        for activation, gs in (("relu", None), ("maxmin", None), ("groupsort", 4)):
            net = orthogonal_mlp(depth, width, activation, seed=seed + depth, group_size=gs)
            g = gradient_norms(net, x)
            rows.append(
                {
                    "depth": depth,
                    "activation": _label(activation, gs),
                    "mean": float(g.mean()),
                    "min": float(g.min()),
                    "max": float(g.max()),
                    "mean_sq": float((g**2).mean()),
                }
            )
            longs.append(pd.DataFrame({"depth": depth, "activation": _label(activation, gs), "grad_norm": g.numpy()}))
    return pd.DataFrame(rows), pd.concat(longs, ignore_index=True)


def plot_attenuation(table):
    """Mean squared gradient norm against depth (log scale), with the 2^-(L-1) reference."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(6, 3.6))
    sns.lineplot(data=table, x="depth", y="mean_sq", hue="activation", style="activation", markers=True, dashes=False, ax=ax)
    d = sorted(set(table["depth"]))
    ax.plot(d, [2.0 ** -(k - 1) for k in d], color="0.5", ls=":", label=r"$2^{-(L-1)}$")
    ax.set(yscale="log", xscale="log", xlabel="number of linear layers L", ylabel=r"mean $\|\nabla f\|_2^2$")
    ax.set_xticks(d, [str(k) for k in d])
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def maxmin_abs(dtype=F64) -> nn.Sequential:
    r"""The MaxMin network ``1 → 2 → 1`` that computes :math:`|x|` exactly with unit-norm weights.

    :math:`W_1 = (1, -1)^\top/\sqrt2` gives :math:`(x, -x)/\sqrt2`; MaxMin sorts the pair into
    :math:`(|x|, -|x|)/\sqrt2`; :math:`w_2 = (1, -1)/\sqrt2` returns
    :math:`|x|/2 + |x|/2 = |x|`. Both weights have spectral norm 1.

    Example:
        >>> net = maxmin_abs()
        >>> x = torch.linspace(-3, 3, 601, dtype=torch.float64)[:, None]
        >>> bool(torch.allclose(net(x), x.abs(), rtol=0, atol=1e-15))
        True
    """
    from ..activations import MaxMin

    s = 1 / math.sqrt(2)
    l1, l2 = nn.Linear(1, 2, bias=False, dtype=dtype), nn.Linear(2, 1, bias=False, dtype=dtype)
    with torch.no_grad():
        l1.weight.copy_(torch.tensor([[s], [-s]], dtype=F64))
        l2.weight.copy_(torch.tensor([[s, -s]], dtype=F64))
    return nn.Sequential(l1, MaxMin(), l2).eval()


def relu_optimum(width: int = 128, dtype=F64) -> nn.Sequential:
    r"""A ReLU network ``1 → width → width → 1`` with all :math:`\|W_k\|_2 \le 1` that equals
    :math:`|x|/\sqrt3` on :math:`[-1, 1]` (shifted by a constant): it attains the chapter's
    bound :math:`W_1` estimate :math:`= 1/\sqrt3` on A1.

    Hidden layer 1 (three live units): :math:`x/\sqrt3 + 2` (active on both sides),
    :math:`\mathrm{relu}(x)/\sqrt3`, :math:`\mathrm{relu}(-x)/\sqrt3`; so the backpropagated
    vectors are :math:`a = (1, 1, 0)/\sqrt3` for :math:`x > 0` and :math:`b = (1, 0, -1)/\sqrt3`
    for :math:`x < 0`. Layer 2 is the 3×3 rotation that maps them to
    :math:`A = (2, -1, 1)/3` and :math:`B = (1, -2, -1)/3` (same Gram matrix), with biases
    that make unit 1 active only for :math:`x > 0`, unit 2 only for :math:`x < 0`, unit 3 on
    both sides; the output row is :math:`(1, 1, 1)/\sqrt3`. Other units are zero.

    Example:
        >>> net = relu_optimum(8)
        >>> x = torch.tensor([[-1.0], [0.0], [1.0]], dtype=torch.float64)
        >>> f = net(x).detach().flatten()
        >>> round(float((f[0] + f[2]) / 2 - f[1]) * 3 ** 0.5, 12)
        1.0
    """
    if width < 3:
        raise ValueError(f"relu_optimum needs width >= 3, got {width}")
    r3 = math.sqrt(3.0)
    a = torch.tensor([1.0, 1.0, 0.0], dtype=F64) / r3
    b = torch.tensor([1.0, 0.0, -1.0], dtype=F64) / r3
    A = torch.tensor([2.0, -1.0, 1.0], dtype=F64) / 3
    B = torch.tensor([1.0, -2.0, -1.0], dtype=F64) / 3
    # Orthogonal R with R a = A, R b = B: both pairs have Gram [[2/3, 1/3], [1/3, 2/3]]; map
    # the orthonormal frames (Gram–Schmidt of (a, b, a×b)) onto each other.
    def frame(u, v):
        e1 = u / u.norm()
        e2 = v - (v @ e1) * e1
        e2 = e2 / e2.norm()
        return torch.stack([e1, e2, torch.linalg.cross(e1, e2)], 1)

    R = frame(A, B) @ frame(a, b).T
    l1, l2, l3 = (nn.Linear(i, o, dtype=dtype) for i, o in ((1, width), (width, width), (width, 1)))
    with torch.no_grad():
        for m in (l1, l2, l3):
            m.weight.zero_()
            m.bias.zero_()
        l1.weight[:3, 0] = torch.tensor([1.0, 1.0, -1.0], dtype=F64) / r3
        l1.bias[0] = 2.0
        l2.weight[:3, :3] = R
        h0 = torch.tensor([2.0, 0.0, 0.0], dtype=F64)  # hidden layer 1 at x = 0
        l2.bias[:3] = -(R @ h0) + torch.tensor([0.0, 0.0, 2.0], dtype=F64)
        l3.weight[0, :3] = torch.ones(3, dtype=F64) / r3
    return nn.Sequential(l1, nn.ReLU(), l2, nn.ReLU(), l3).eval()


def relu_bound_certificate() -> dict[str, float]:
    r"""Check the semidefinite certificate behind the bound :math:`f'(x) - f'(-x) \le 2/\sqrt3`.

    :math:`Y = \tfrac13\begin{pmatrix}4 & -2\\ -2 & 4\end{pmatrix}` must dominate the
    quadratic forms of the four mask patterns of one unit — both sides active
    :math:`(A - B)^2`, only ``x > 0`` active :math:`A^2`, only ``x < 0`` :math:`B^2`, neither
    :math:`0` — and its value on the Gram matrices left by the first layer is at most 4/3.

    Returns:
        ``min_eig``: the smallest eigenvalue of the four matrices :math:`Y - Q` (≥ 0 up to
        rounding); ``bound_sq``: :math:`\max` of :math:`\operatorname{tr}(YG)` over the
        extreme first-layer Gram matrices (= 4/3); ``bound``: the resulting bound on the A1
        estimate, :math:`\tfrac12\sqrt{4/3} = 1/\sqrt3`.
    """
    Y = torch.tensor([[4.0, -2.0], [-2.0, 4.0]], dtype=F64) / 3
    Qs = [
        torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=F64),  # both active: (A - B)^2
        torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=F64),  # only x > 0: A^2
        torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=F64),  # only x < 0: B^2
        torch.zeros(2, 2, dtype=F64),  # neither
    ]
    min_eig = min(float(torch.linalg.eigvalsh(Y - Q).min()) for Q in Qs)
    # First-layer Gram matrices G = [[s+p, s], [s, s+q]] with s, p, q >= 0, s + p + q <= 1:
    # tr(YG) is linear, so its maximum is at a vertex (s, p, q) = e_1, e_2, e_3 or 0.
    vertices = [
        torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=F64),
        torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=F64),
        torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=F64),
    ]
    bound_sq = max(float(torch.trace(Y @ G)) for G in vertices)
    return {"min_eig": min_eig, "bound_sq": bound_sq, "bound": 0.5 * math.sqrt(bound_sq)}


# ---------------------------------------------------------------------------------------------
# 3. The absolute-value experiment (A1).


def run_absolute_value(
    problem: ConeProblem,
    activations=("relu", "maxmin", "groupsort"),
    constraints=("bjorck", "spectral"),
    width: int = 128,
    group_size: int = 4,
    steps: int = 600,
    batch_size: int = 32,
    lr: float = 0.01,
    milestones=(512, 1024),
    gamma=0.9,
    bjorck_iters: int = 20,
    eval_every: int = 50,
    n_grid: int = 2001,
    seed: int = 0,
    device="cpu",
    progress: bool = True,
    threads: int | None = 1,
) -> list[CriticResult]:
    r"""Fit one critic ``[1, width, width, 1]`` per (activation, constraint) on a 1-D problem.

    Every critic starts from the same seed; :func:`lipsort.wasserstein.fit_critic` trains it
    (AggMo, the authors' settings), the estimate is exact (the critic evaluated at the atoms),
    and input-gradient norms are measured on ``n_grid`` evenly spaced points of the convex
    hull of the supports (where an optimal critic has slope ±1). On CPU the training runs with
    ``threads`` torch threads (default 1: the matrices are at most 128 × 128, a second thread
    saves little and on a busy machine its synchronization costs more; ``None`` keeps the
    current setting).
    """
    if not problem.is_discrete:
        raise ValueError(f"run_absolute_value needs a 1-D (discrete) problem, got {problem!r}")
    lo = float(problem.centers.min()) - problem.radius
    hi = float(problem.centers.max()) + problem.radius
    grid = torch.linspace(lo, hi, n_grid, dtype=torch.float32)[:, None]
    return [
        fit_critic(
            problem, (width, width), activation, constraint, steps=steps, group_size=group_size,
            bjorck_iters=bjorck_iters, batch_size=batch_size, lr=lr, milestones=milestones, gamma=gamma,
            eval_every=eval_every, grad_points=grid, seed=seed, device=device, threads=threads,
            progress=progress, label=_label(activation, group_size if activation == "groupsort" else None),
        )
        for constraint in constraints
        for activation in activations
    ]


def decayed_schedule(milestones, gamma, decayed_from: int, factor: float = 0.1) -> dict:
    r"""The book's decayed variant of a step schedule: an extra ×``factor`` from ``decayed_from``.

    Returns ``{"milestones": [...], "gamma": [...]}`` (strictly increasing milestones, one
    factor each) for :func:`run_absolute_value`; the learning rate at step :math:`t` is
    :math:`\mathrm{lr}\cdot\prod_{m_i \le t} \gamma_i`.

    Example:
        >>> decayed_schedule([512, 1024], [0.9, 0.9], 2700)
        {'milestones': [512, 1024, 2700], 'gamma': [0.9, 0.9, 0.1]}
        >>> decayed_schedule([512, 1024], 0.9, 400)
        {'milestones': [400, 512, 1024], 'gamma': [0.1, 0.9, 0.9]}
    """
    gammas = [gamma] * len(milestones) if isinstance(gamma, (int, float)) else list(gamma)
    if len(gammas) != len(milestones):
        raise ValueError(f"gamma needs one factor per milestone ({len(milestones)}), got {gamma!r}")
    if decayed_from in milestones:
        raise ValueError(f"decayed_from={decayed_from} is already a milestone of {list(milestones)}")
    pairs = sorted([*zip(milestones, gammas), (decayed_from, factor)])
    return {"milestones": [m for m, _ in pairs], "gamma": [g for _, g in pairs]}


def run_results(runs: list[CriticResult], suffix: str = "") -> dict[str, float]:
    """The ledger keys of the A1 critics: ``w1.<act>.<constraint><suffix>`` and its certified value
    (only for approximate constraints: a Björck critic's certified value is its estimate),
    ``lipschitz.*`` and ``gradnorm.*.{mean, frac_unit}``."""
    out: dict[str, float] = {}
    for r in runs:
        key = f"{r.activation}.{r.constraint}{suffix}"
        out[f"w1.{key}"] = r.estimate
        if r.constraint != "bjorck":
            out[f"w1.{key}.certified"] = r.certified
        out[f"lipschitz.{key}"] = r.lipschitz
        out[f"gradnorm.{key}.mean"] = r.grad_stats["mean"]
        out[f"gradnorm.{key}.frac_unit"] = r.grad_stats["frac_unit"]
    return out


def results_table(runs: list[CriticResult], decimals: int = 3, variant: list[CriticResult] = ()):
    """One row per critic: estimate, Lipschitz bound, certified estimate, gradient-norm stats;
    the critics of ``variant`` (the decayed schedule) follow, their constraint marked "decayed"."""
    import pandas as pd

    rows = [
        {
            "activation": r.label,
            "constraint": r.constraint + (" (decayed)" if i >= len(runs) else ""),
            "estimate": r.estimate,
            "Lip bound": r.lipschitz,
            "certified": r.certified,
            "mean |f'|": r.grad_stats["mean"],
            "frac |f'| ≥ 0.99": r.grad_stats["frac_unit"],
        }
        for i, r in enumerate([*runs, *variant])
    ]
    return pd.DataFrame(rows).round(decimals)


def plot_critics(runs: list[CriticResult], problem: ConeProblem, margin: float = 0.5):
    r"""Learned critics :math:`f(x) - f(0)` against the optimal :math:`|x|`, one panel per constraint."""
    import matplotlib.pyplot as plt

    constraints = list(dict.fromkeys(r.constraint for r in runs))
    lo = float(problem.centers.min()) - problem.radius - margin
    hi = float(problem.centers.max()) + problem.radius + margin
    x = torch.linspace(lo, hi, 801, dtype=torch.float32)[:, None]
    opt = problem.critic(x.to(F64))
    fig, axes = plt.subplots(1, len(constraints), figsize=(5.2 * len(constraints), 3.6), sharey=True, squeeze=False)
    for ax, constraint in zip(axes[0], constraints):
        ax.plot(x[:, 0], opt, color="k", lw=3, alpha=0.25, label=r"optimal $|x|$")
        for i, r in enumerate(rr for rr in runs if rr.constraint == constraint):
            dev = next(r.critic.parameters()).device
            with torch.no_grad():
                f = r.critic(x.to(dev)).cpu()[:, 0]
                f0 = r.critic(torch.zeros(1, 1, device=dev)).cpu()[0, 0]
            ax.plot(x[:, 0], f - f0, color=f"C{i}", lw=1.5, label=f"{r.label} ({r.estimate:.3f})")
        for a in problem.atoms_p(F64)[0][:, 0].tolist():
            ax.axvline(a, color="0.8", lw=0.8, zorder=0)
        ax.set(xlabel="x", title=f"{constraint} weights", ylabel=r"$f(x) - f(0)$")
        ax.legend(fontsize=8, loc="upper center")
    fig.tight_layout()
    return fig


def plot_gradient_norms(runs: list[CriticResult]):
    r"""Empirical CDF of :math:`|f'(x)|` on the hull of the supports, per activation and constraint."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    df = pd.concat(
        [pd.DataFrame({"activation": r.label, "constraint": r.constraint, "grad_norm": r.grad_norms.numpy()}) for r in runs],
        ignore_index=True,
    )
    constraints = list(dict.fromkeys(r.constraint for r in runs))
    fig, axes = plt.subplots(1, len(constraints), figsize=(5.2 * len(constraints), 3.4), sharey=True, squeeze=False)
    for ax, constraint in zip(axes[0], constraints):
        sns.ecdfplot(data=df[df.constraint == constraint], x="grad_norm", hue="activation", ax=ax)
        ax.axvline(1.0, color="k", lw=0.8, ls=":")
        ax.set(xlabel=r"$|f'(x)|$ on $[-1, 1]$", title=f"{constraint} weights", xlim=(0, 1.05))
    fig.tight_layout()
    return fig


def plot_histories(runs: list[CriticResult], w1: float = 1.0):
    """Exact estimate during training, one line per critic."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    styles = {c: s for c, s in zip(dict.fromkeys(r.constraint for r in runs), ("-", "--", ":", "-."))}
    labels = list(dict.fromkeys(r.label for r in runs))
    for r in runs:
        ax.plot(r.history.eval_steps, r.history.eval, ls=styles[r.constraint], color=f"C{labels.index(r.label)}",
                label=f"{r.label} / {r.constraint}")
    ax.axhline(w1, color="k", lw=0.8)
    ax.axhline(1 / math.sqrt(3), color="0.5", lw=0.8, ls=":")
    ax.text(ax.get_xlim()[0], 1 / math.sqrt(3), r" $1/\sqrt{3}$", va="bottom", fontsize=8, color="0.4")
    ax.set(xlabel="step", ylabel=r"$\mathbb{E}_P f - \mathbb{E}_Q f$", ylim=(0, 1.1 * w1))
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    return fig
