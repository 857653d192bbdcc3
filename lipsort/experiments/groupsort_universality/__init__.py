"""Book glue for chapter 02 (GroupSort and universality): property checks, the hand-built
MaxMin network's figures, and the signed-distance fit to two Von Koch snowflakes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ... import functional as F
from ...activations import FullSort, GroupSort, MaxMin
from ...lattice import LatticeForm, pwl_eval
from .snowflake import koch_snowflake, signed_distance

__all__ = [
    "groupsort_properties",
    "demo_target",
    "random_target",
    "exactness_check",
    "random_exactness",
    "plot_lattice",
    "Scene",
    "snowflake_scene",
    "sample_training_points",
    "train_sdf",
    "evaluate_sdf",
    "plot_sdf",
]

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# 1. GroupSort's properties, checked numerically.


def _activations(width: int) -> dict[str, nn.Module]:
    return {
        "ReLU": nn.ReLU(),
        "MaxMin": MaxMin(),
        "GroupSort(3)": GroupSort(3),
        "GroupSort(4)": GroupSort(4),
        f"FullSort ({width})": FullSort(),
    }


def groupsort_properties(n: int = 500, width: int = 12, seed: int = 0):
    """Check the defining properties of GroupSort activations on random float64 inputs.

    For each activation (ReLU as a contrast) and ``n`` random inputs of ``width`` units:
    whether every group of the output is a sorted permutation of the input group, the largest
    relative change of the p-norm (p = 1, 2, ∞), whether every Jacobian is a permutation
    matrix, the largest relative change of the norm of a back-propagated gradient, and the
    largest ratio ``‖f(x) − f(y)‖₂ / ‖x − y‖₂`` over random pairs.

    Returns:
        A pandas DataFrame, one row per activation.
    """
    import pandas as pd

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=gen, dtype=F64)
    y = torch.randn(n, width, generator=gen, dtype=F64)
    g = torch.randn(n, width, generator=gen, dtype=F64)
    rows = []
    for name, act in _activations(width).items():
        out = act(x)
        gs = {"ReLU": 1, "MaxMin": 2, "GroupSort(3)": 3, "GroupSort(4)": 4}.get(name, width)
        xin, xout = x.reshape(n, -1, gs), out.reshape(n, -1, gs)
        permutes = bool(torch.equal(xin.sort(-1).values, xout.sort(-1).values))
        is_sorted = bool((xout[..., :-1] >= xout[..., 1:]).all())
        norm_err = {
            p: float(((torch.linalg.vector_norm(out, p, 1) - torch.linalg.vector_norm(x, p, 1)).abs()
                      / torch.linalg.vector_norm(x, p, 1)).max())
            for p in (1, 2, math.inf)
        }
        jac = torch.func.vmap(torch.func.jacrev(lambda v: act(v[None])[0]))(x[:64])
        is_perm = bool(
            ((jac == 0) | (jac == 1)).all() and (jac.sum(1) == 1).all() and (jac.sum(2) == 1).all()
        )
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(act(xg), xg, g)
        grad_err = float(((grad.norm(dim=1) - g.norm(dim=1)).abs() / g.norm(dim=1)).max())
        lip = float(((act(x) - act(y)).norm(dim=1) / (x - y).norm(dim=1)).max())
        rows.append(
            {
                "activation": name,
                "sorted permutation of each group": permutes and is_sorted,
                "max rel. change of ‖·‖₁": norm_err[1],
                "‖·‖₂": norm_err[2],
                "‖·‖∞": norm_err[math.inf],
                "Jacobian is a permutation": is_perm,
                "max rel. change of ‖grad‖₂": grad_err,
                "max ‖f(x)−f(y)‖/‖x−y‖": lip,
            }
        )
    return pd.DataFrame(rows).set_index("activation")


# ---------------------------------------------------------------------------------------------
# 2. The lattice construction.


def demo_target() -> tuple[Tensor, Tensor]:
    """Breakpoints of the chapter's 1-Lipschitz piecewise-linear target (neither convex nor
    concave, slopes ±1 included, so that both the min and the max trees are needed)."""
    xs = torch.tensor([-4.0, -3.0, -2.0, -1.0, -0.5, 0.5, 1.5, 2.0, 3.5, 4.0], dtype=F64)
    slopes = torch.tensor([0.5, -1.0, 0.25, 1.0, -0.5, 0.75, -1.0, 0.2, -0.6], dtype=F64)
    ys = torch.cat([torch.zeros(1, dtype=F64), torch.cumsum(slopes * (xs[1:] - xs[:-1]), 0)])
    return xs, ys


def random_target(gen: torch.Generator, n: int) -> tuple[Tensor, Tensor]:
    """Random 1-Lipschitz breakpoints: ``n`` increasing ``xs`` and slopes uniform in [−1, 1]."""
    xs = torch.cumsum(torch.rand(n, generator=gen, dtype=F64) * 2 + 1e-3, 0) - n
    s = torch.rand(n - 1, generator=gen, dtype=F64) * 2 - 1
    ys = torch.cat([torch.zeros(1, dtype=F64), torch.cumsum(s * (xs[1:] - xs[:-1]), 0)])
    return xs, ys + torch.randn(1, generator=gen, dtype=F64)


def exactness_check(xs: Tensor, ys: Tensor, net: nn.Sequential, n_grid: int = 20001, margin: float = 5.0):
    """Max |network − target| on a dense grid covering the breakpoints plus ``margin`` on each
    side (the breakpoints themselves included), and the largest ``‖W‖∞`` of the layers."""
    grid = torch.cat([torch.linspace(float(xs[0]) - margin, float(xs[-1]) + margin, n_grid, dtype=F64), xs])
    with torch.no_grad():
        err = (net(grid[:, None]).squeeze(1) - pwl_eval(xs, ys, grid)).abs().max()
    w_inf = max(float(F.operator_norm(m.weight.detach(), "inf")) for m in net if isinstance(m, nn.Linear))
    return float(err), w_inf


def random_exactness(n_targets: int, seed: int = 0, max_breakpoints: int = 20) -> dict[str, float]:
    """Build the MaxMin network of ``n_targets`` random 1-Lipschitz targets (2 to
    ``max_breakpoints`` breakpoints, every third one with slopes ±1 only) and return the worst
    max |network − target|, the worst ``‖W‖∞`` over all layers, the worst certified ∞-norm
    Lipschitz bound and the deepest network (number of MaxMin layers)."""
    from ...certify import lipschitz_upper_bound
    from ...lattice import maxmin_network

    gen = torch.Generator().manual_seed(seed)
    worst = {"max_abs_error": 0.0, "max_w_inf": 0.0, "max_linf_bound": 0.0, "max_maxmin_layers": 0}
    for k in range(n_targets):
        xs, ys = random_target(gen, int(torch.randint(2, max_breakpoints + 1, (1,), generator=gen)))
        if k % 3 == 0:  # slopes exactly on the boundary of the constraint
            s = torch.sign(ys[1:] - ys[:-1])
            ys = ys[0] + torch.cat([torch.zeros(1, dtype=F64), torch.cumsum(s * (xs[1:] - xs[:-1]), 0)])
        net = maxmin_network(xs, ys)
        err, w_inf = exactness_check(xs, ys, net, n_grid=2001)
        worst["max_abs_error"] = max(worst["max_abs_error"], err)
        worst["max_w_inf"] = max(worst["max_w_inf"], w_inf)
        worst["max_linf_bound"] = max(worst["max_linf_bound"], float(lipschitz_upper_bound(net, norm="linf")))
        worst["max_maxmin_layers"] = max(worst["max_maxmin_layers"], sum(isinstance(m, MaxMin) for m in net))
    return worst


def plot_lattice(xs: Tensor, ys: Tensor, form: LatticeForm, net: nn.Sequential, margin: float = 1.0):
    """Two panels: the target with its affine pieces and the network's output; the inner minima
    ``min_{j∈S_i} ℓ_j`` whose maximum is the target."""
    import matplotlib.pyplot as plt

    lo, hi = float(xs[0]) - margin, float(xs[-1]) + margin
    grid = torch.linspace(lo, hi, 2001, dtype=F64)
    with torch.no_grad():
        out = net(grid[:, None]).squeeze(1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    pieces = form.pieces(grid)
    target = pwl_eval(xs, ys, grid)
    span = float(target.max() - target.min())
    ylim = (float(target.min()) - 0.4 * span, float(target.max()) + 0.4 * span)
    ax = axes[0]
    for j in range(pieces.shape[1]):
        ax.plot(grid, pieces[:, j], color="0.75", lw=0.8, label="affine pieces ℓⱼ" if j == 0 else None)
    ax.plot(grid, target, color="C0", lw=3, alpha=0.6, label="target f")
    ax.plot(grid, out, color="k", lw=1.2, ls="--", label="MaxMin network")
    ax.plot(xs, ys, "o", color="C0", ms=4)
    ax.set(xlabel="x", ylim=ylim, title="target, pieces and the hand-built network")
    ax.legend(loc="lower left", fontsize=8)
    ax = axes[1]
    minima = form.group_minima(grid)
    ax.plot(grid, target, color="k", lw=5, alpha=0.2, label="max of the minima = f")
    for i in range(minima.shape[1]):
        ax.plot(grid, minima[:, i], lw=1.1, label=f"min over S{i + 1}" if minima.shape[1] <= 8 else None)
    ax.set(xlabel="x", ylim=ylim, title=r"inner minima $\min_{j\in S_i}\ell_j$")
    ax.legend(loc="lower left", fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# 3. Fitting the signed distance to two snowflakes.


@dataclass(frozen=True)
class Scene:
    """Snowflakes in a box ``[x0, x1] × [y0, y1]``; ``radii`` are their circumradii and
    ``band`` the distance to the boundary within which a point counts as "near" it."""

    polygons: tuple[Tensor, ...]
    box: tuple[float, float, float, float]
    radii: tuple[float, ...] = ()
    band: float = 0.05

    def uniform(self, n: int, gen: torch.Generator) -> Tensor:
        x0, x1, y0, y1 = self.box
        u = torch.rand(n, 2, generator=gen, dtype=F64)
        return torch.stack([x0 + (x1 - x0) * u[:, 0], y0 + (y1 - y0) * u[:, 1]], 1)

    def sdf(self, x: Tensor) -> Tensor:
        return signed_distance(x.to(F64), list(self.polygons), check=False)


#: Scene layouts: ``book``, two disjoint snowflakes side by side; ``paper``, Béthune et al.'s
#: (fig. 1a): two concentric snowflakes whose initial triangles have sides 0.87 and 0.45 of the
#: box [−200, 200]², the region between them inside (even-odd rule).
LAYOUTS = ("book", "paper")


def snowflake_scene(level: int = 4, layout: str = "book") -> Scene:
    """The chapter's scene.

    ``book``: a snowflake of radius 1 and one of radius 0.8, disjoint, in the box
    [−2.5, 2.5] × [−1.5, 1.5] (near band 0.05). ``paper``: Béthune et al.'s concentric pair in
    [−200, 200]² (circumradius = side/√3; near band 0.5, their level-set tolerance).
    """
    from .snowflake import check_disjoint

    if layout == "book":
        radii, centers, box, band = (1.0, 0.8), ((-1.15, -0.1), (1.2, 0.25)), (-2.5, 2.5, -1.5, 1.5), 0.05
    elif layout == "paper":
        radii = tuple(f * 400 / math.sqrt(3) for f in (0.87, 0.45))
        centers, box, band = ((0.0, 0.0), (0.0, 0.0)), (-200.0, 200.0, -200.0, 200.0), 0.5
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    polys = tuple(koch_snowflake(level, c, r) for c, r in zip(centers, radii))
    check_disjoint(list(polys), allow_nested=layout == "paper")
    return Scene(polygons=polys, box=box, radii=radii, band=band)


def sample_training_points(scene: Scene, n: int, near_boundary: float, sigma: float, gen: torch.Generator) -> Tensor:
    """``n`` points: a fraction ``near_boundary`` drawn uniformly along the edges and moved by
    Gaussian noise of std ``sigma`` (where the sign is hard to get right), the rest uniform in
    the box."""
    if not 0 <= near_boundary <= 1:
        raise ValueError(f"near_boundary must be a fraction in [0, 1], got {near_boundary!r}")
    n_near = int(round(n * near_boundary))
    a = torch.cat(list(scene.polygons))
    b = torch.cat([torch.roll(p, -1, 0) for p in scene.polygons])
    lengths = (b - a).norm(dim=1)
    edge = torch.multinomial(lengths, n_near, replacement=True, generator=gen)
    t = torch.rand(n_near, 1, generator=gen, dtype=F64)
    near = a[edge] + t * (b[edge] - a[edge]) + sigma * torch.randn(n_near, 2, generator=gen, dtype=F64)
    return torch.cat([near, scene.uniform(n - n_near, gen)])


def train_sdf(
    net: nn.Module,
    scene: Scene,
    steps: int,
    batch_size: int,
    lr: float,
    n_train: int | None,
    near_boundary: float = 0.5,
    sigma: float = 0.05,
    schedule: str = "cosine",
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> list[float]:
    """Fit ``net`` to the exact signed distance by mean squared error.

    With ``n_train`` a number, a fixed pool of that many points (:func:`sample_training_points`)
    and their exact SDF is drawn once and each step takes a random minibatch; with
    ``n_train=None`` every step draws a fresh batch uniformly in the box and computes its SDF,
    as Béthune et al.'s generator does. Adam at ``lr``, with a cosine decay to zero
    (``schedule="cosine"``) or constant (``"constant"``, their Keras default). Returns the
    training loss of every step.
    """
    # The plain console bar: tqdm.auto needs ipywidgets in a notebook and warns without them.
    from tqdm import tqdm

    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    gen = torch.Generator().manual_seed(seed)
    dtype = next(net.parameters()).dtype
    if n_train is not None:
        x = sample_training_points(scene, n_train, near_boundary, sigma, gen)
        y = scene.sdf(x)
        x, y = x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)[:, None]
    net.to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps) if schedule == "cosine" else None
    losses = []
    for _ in tqdm(range(steps), desc="SDF fit", disable=not progress, mininterval=5.0):
        if n_train is None:
            xb = scene.uniform(batch_size, gen)
            xb, yb = xb.to(device=device, dtype=dtype), scene.sdf(xb).to(device=device, dtype=dtype)[:, None]
        else:
            idx = torch.randint(0, n_train, (batch_size,), generator=gen).to(device)
            xb, yb = x[idx], y[idx]
        loss = nn.functional.mse_loss(net(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(float(loss.detach()))
    net.eval()
    return losses


@torch.no_grad()
def _predict(net: nn.Module, x: Tensor, chunk: int = 16384) -> Tensor:
    p = next(net.parameters())
    return torch.cat([net(x[i : i + chunk].to(p.device, p.dtype)).reshape(-1).cpu().to(F64) for i in range(0, len(x), chunk)])


def evaluate_sdf(net: nn.Module, scene: Scene, n_test: int, seed: int) -> dict[str, float]:
    """Held-out metrics on ``n_test`` points uniform in the box (a generator independent of
    the training pool's): sign accuracy (inside vs outside), the accuracy of the majority
    class, the mean absolute and root mean squared SDF errors, and the same accuracy on the
    points within ``scene.band`` of the boundary."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    x = scene.uniform(n_test, gen)
    s = scene.sdf(x)
    f = _predict(net, x)
    correct = (f < 0) == (s < 0)
    inside = float((s < 0).double().mean())
    near = s.abs() < scene.band
    return {
        "accuracy": float(correct.double().mean()),
        "majority_accuracy": max(inside, 1 - inside),
        "accuracy_near_boundary": float(correct[near].double().mean()),
        "mae": float((f - s).abs().mean()),
        "rmse": float((f - s).pow(2).mean().sqrt()),
    }


def plot_sdf(net: nn.Module, scene: Scene, losses: list[float] | None = None, resolution: int = 300):
    """The network's zero level set and values against the snowflakes, the error map
    ``|f − SDF|``, and (if given) the training loss."""
    import matplotlib.pyplot as plt

    x0, x1, y0, y1 = scene.box
    gx = torch.linspace(x0, x1, resolution, dtype=F64)
    gy = torch.linspace(y0, y1, int(resolution * (y1 - y0) / (x1 - x0)), dtype=F64)
    xx, yy = torch.meshgrid(gx, gy, indexing="xy")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    f = _predict(net, pts).reshape(xx.shape)
    s = scene.sdf(pts).reshape(xx.shape)
    ncols = 3 if losses is not None else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 3.6))
    lim = float(s.abs().max())
    ax = axes[0]
    im = ax.contourf(xx, yy, f, levels=21, cmap="RdBu_r", vmin=-lim, vmax=lim)
    fig.colorbar(im, ax=ax, shrink=0.85)
    ax.contour(xx, yy, f, levels=[0.0], colors="k", linewidths=1.4)
    for k, p in enumerate(scene.polygons):
        q = torch.cat([p, p[:1]])
        ax.plot(q[:, 0], q[:, 1], color="gold", lw=0.9, ls="--", label="snowflakes" if k == 0 else None)
    ax.plot([], [], color="k", label="network = 0")
    ax.legend(loc="lower right", fontsize=7)
    ax.set(aspect="equal", title="network f and its zero level set")
    ax = axes[1]
    im = ax.imshow((f - s).abs(), origin="lower", extent=scene.box, cmap="magma")
    fig.colorbar(im, ax=ax, shrink=0.85)
    for p in scene.polygons:
        q = torch.cat([p, p[:1]])
        ax.plot(q[:, 0], q[:, 1], color="cyan", lw=0.6)
    ax.set(aspect="equal", title="|f − SDF|")
    if losses is not None:
        ax = axes[2]
        ax.semilogy(losses, lw=0.8)
        ax.set(xlabel="step", ylabel="MSE (minibatch)", title="training loss")
    fig.tight_layout()
    return fig
