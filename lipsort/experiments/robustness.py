r"""Book glue for chapter 05 (provable robustness on MNIST and Fashion-MNIST: A6, A8–A10).

1. :func:`tightness_table` (the certified radii :math:`M/(\sqrt2 L)` and :math:`M/(2L)` are
   attained by linear classifiers) and :func:`normalization_check` (an input normalization
   multiplies the constant by :math:`1/\sigma`; forgetting it is caught by an attack).
2. :func:`load_split`, :func:`build`, :func:`train`: the networks of A6 (standard vs
   Lipschitz MLPs), A8 (the ℓ∞ MaxMin hinge net of Anil et al., trained by projected
   gradient) and A9 (a standard and a PGD-trained ReLU net), through
   :func:`lipsort.training.fit`, one checkpoint per model.
3. :func:`a6_table` and :func:`robustness_curves`: accuracy, certified accuracy and attack
   accuracy; every model goes through
   :func:`lipsort.attacks.assert_no_attack_inside_certificate`. :func:`plot_curves` draws them.
4. :func:`undead_rates`, :func:`input_gradient_norms` and their plots (A10; in
   :mod:`lipsort.experiments.undead_units`, re-exported here).
"""

from __future__ import annotations

import functools


import torch
from torch import nn

from ..attacks import (
    A8_PGD_SEARCH,
    CertificateViolation,
    assert_no_attack_inside_certificate,
    pgd_training_transform,
    vanishing_gradients,
)
from ..book.curves import curve_key
from ..certify import certified_radius, lipschitz_upper_bound
from ..losses import MarginLoss
from ..models import mlp
from ..optim import AggMo, parseval_, plain_linears, project_linf_
from ..training import Schedule, evaluate, fit
from .undead_units import (
    A10_NETS,
    a10_results,
    input_gradient_norms,
    plot_gradient_norms,
    plot_undead,
    undead_rates,
)

__all__ = [
    "A10_NETS",
    "LABELS",
    "ROBUST_MODELS",
    "a10_results",
    "a6_results",
    "a6_table",
    "attacked_images",
    "curve_results",
    "curve_table",
    "build",
    "input_gradient_norms",
    "load_split",
    "normalization_check",
    "plot_curves",
    "plot_gradient_norms",
    "plot_training",
    "plot_undead",
    "robust_models",
    "robust_results",
    "rows_inside_ball",
    "robustness_curves",
    "tightness_table",
    "time_step",
    "train",
    "undead_rates",
]

F64 = torch.float64
LABELS = {"relu": "ReLU", "maxmin": "MaxMin", "groupsort": "GroupSort", None: "standard",
          "bjorck": "Björck", "spectral": "spectral", "linf": "ℓ∞", "parseval": "Parseval"}
#: The A8/A9 networks: name -> (activation, method).
ROBUST_MODELS = {
    "maxmin_linf": ("maxmin", "hinge"),  # A8
    "relu_linf": ("relu", "hinge"),  # A8 with ReLU
    "relu": ("relu", "standard"),  # A9
    "relu_pgd": ("relu", "pgd"),  # A9
}
ROBUST_LABELS = {"maxmin_linf": "MaxMin, ℓ∞ + hinge (A8)", "relu_linf": "ReLU, ℓ∞ + hinge",
                 "relu": "ReLU, standard (A9)", "relu_pgd": "ReLU, PGD-trained (A9)"}


# ---------------------------------------------------------------------------------------------
# 1. Theory: tight certificates and input normalization.


def _two_class_linear(a: torch.Tensor) -> nn.Linear:
    """Logits ``(a·x, −a·x)``: the margin ``2a·x`` of a linear classifier, no bias."""
    net = nn.Linear(a.numel(), 2, bias=False).to(F64)
    with torch.no_grad():
        net.weight.copy_(torch.stack([a, -a]))
    return net


def tightness_table(dim: int = 16, n_points: int = 8, seed: int = 0):
    r"""Certified radius vs the exact distance to the decision boundary, for linear classifiers.

    For logits :math:`(a^\top x, -a^\top x)` the margin is :math:`M = 2a^\top x` and the
    boundary :math:`a^\top x = 0` lies at ℓ2 distance :math:`|a^\top x|/\|a\|_2` and ℓ∞
    distance :math:`|a^\top x|/\|a\|_1`. With :math:`L_2 = \|W\|_2 = \sqrt2\|a\|_2` and
    :math:`L_\infty = \|W\|_\infty = \|a\|_1` the certificates :math:`M/(\sqrt2 L_2)` and
    :math:`M/(2L_\infty)` equal these distances: the factors √2 and 2 cannot be improved.
    Each row also steps to ``1 ± 1e-6`` times the radius along the worst direction and
    records whether the prediction flipped (it must flip outside, never inside).
    """
    import pandas as pd

    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, generator=gen, dtype=F64)
    x = torch.randn(n_points, dim, generator=gen, dtype=F64)
    net = _two_class_linear(a)
    with torch.no_grad():
        y = net(x).argmax(1)
        rows = []
        for norm, direction, dist in (
            ("l2", a / a.norm(), (x @ a).abs() / a.norm()),
            ("linf", a.sign(), (x @ a).abs() / a.abs().sum()),
        ):
            lip = float(lipschitz_upper_bound(net, norm))
            r = certified_radius(net(x), y, lip, norm)
            towards = -torch.where(y == 0, 1.0, -1.0).to(F64)[:, None] * direction  # to the boundary
            inside = net(x + (1 - 1e-6) * r[:, None] * towards).argmax(1) != y
            outside = net(x + (1 + 1e-6) * r[:, None] * towards).argmax(1) != y
            rows.append({"norm": norm, "L": lip, "max |r - distance|": float((r - dist).abs().max()),
                         "flipped inside": int(inside.sum()), "flipped just outside": int(outside.sum()),
                         "points": n_points})
    return pd.DataFrame(rows)


class _Normalize(nn.Module):
    def __init__(self, mean: float, std: float):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x):
        return (x - self.mean) / self.std


def normalization_check(mean: float = 0.1307, std: float = 0.3081, dim: int = 16, seed: int = 0) -> dict:
    r"""An input normalization :math:`x \mapsto (x - \mu)/\sigma` multiplies ``L`` by :math:`1/\sigma`.

    A linear two-class model ``f`` behind the normalization (pixels in [0, 1], the MNIST
    statistics by default): the ℓ∞ constant of the composition is computed exactly (the
    normalization as an explicit layer with constant :math:`1/\sigma`) and compared with
    :math:`L_f/\sigma`; then :func:`assert_no_attack_inside_certificate` is run twice on the
    pixel map, once with the right constant and once with :math:`L_f` (the normalization
    forgotten): the first passes, the second must raise :class:`CertificateViolation`.
    """
    from ..certify import register_lipschitz_bound

    register_lipschitz_bound(_Normalize, lambda m, norm: 1.0 / abs(m.std))
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, generator=gen) / dim
    f = _two_class_linear(a).float()
    x = torch.rand(64, dim, generator=gen) * 0.5 + 0.25
    y = f((x - mean) / std).argmax(1)
    l_f = float(lipschitz_upper_bound(f, "linf"))
    l_composed = float(lipschitz_upper_bound(nn.Sequential(_Normalize(mean, std), f), "linf"))
    right = assert_no_attack_inside_certificate(f, x, y, norm="linf", eps=None,
                                                normalization=(mean, std), per_point_steps=50)
    try:
        assert_no_attack_inside_certificate(f, x, y, lipschitz=l_f, norm="linf", eps=None,
                                            normalization=(mean, std), per_point_steps=50)
        caught = False
    except CertificateViolation:
        caught = True
    return {"L_f": l_f, "L_composed": l_composed, "L_check": right["lipschitz"],
            "ratio": l_composed / l_f, "wrong_constant_caught": caught}


# ---------------------------------------------------------------------------------------------
# 2. Data, models, training.


def load_split(dataset: str = "mnist", n_train_per_class: int | None = None, n_test: int | None = None,
               train_fraction: float = 0.9, seed: int = 0, n_val: int | None = 0):
    """(train, val, test) tensors: ``n_train_per_class`` images per class (stratified, seeded),
    or with ``None`` a random ``train_fraction`` of the training set (the authors: its first
    90%); ``val`` the first ``n_val`` (all if ``None``; with 0, ``val`` is None) of the training
    images left out of ``train``, in their order (the authors validate on their last 10%); the
    first ``n_test`` test images (all if ``None``)."""
    from .. import data

    if dataset not in ("mnist", "fashion_mnist"):
        raise ValueError(f"dataset must be 'mnist' or 'fashion_mnist', got {dataset!r}")
    if n_val is not None and (isinstance(n_val, bool) or not isinstance(n_val, int) or n_val < 0):
        raise ValueError(f"n_val must be a non-negative integer or None (all held-out images), got {n_val!r}")
    load = getattr(data, dataset)
    x, y = load(train=True)
    if n_train_per_class is None:
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        keep = keep[: round(train_fraction * len(y))].sort().values
    else:  # the draw depends on the labels and the seed only: drawn on indices, it is the same
        keep, _ = data.subset_per_class(torch.arange(len(y)), y, n_train_per_class, seed=seed)
    xt, yt = load(train=False)
    if n_test is not None:
        xt, yt = xt[:n_test], yt[:n_test]
    if n_val == 0:
        return (x[keep], y[keep]), None, (xt, yt)
    left_out = torch.ones(len(y), dtype=torch.bool)
    left_out[keep] = False
    held = left_out.nonzero().squeeze(1)[:n_val]
    if len(held) == 0:
        raise ValueError(f"no training image is left out of the split for validation (n_val={n_val})")
    if n_val is not None and len(held) < n_val:
        raise ValueError(f"n_val={n_val} asks for more than the {len(held)} training images left out of the split")
    return (x[keep], y[keep]), (x[held], y[held]), (xt, yt)


def build(activation: str, constraint: str | None, width: int, depth: int = 3, group_size: int = 4,
          l_constant: float | None = None, bjorck_iters: int = 20, linf_onto: str = "ball",
          init: str = "torch") -> nn.Sequential:
    """``Flatten → 784 → width ×depth → 10`` (:func:`lipsort.models.mlp`); ``linf_onto`` is the
    ``onto`` of the ℓ∞ layers (:func:`lipsort.parametrizations.linf_projected`), ``init`` the
    layers' initialization, kept as the network's ``init`` attribute, and ``"parseval"`` a
    standard network whose ``parseval`` attribute makes :func:`train` retract its weights after
    every update (:func:`lipsort.optim.parseval_`); :func:`train` names its checkpoint by both
    (the architecture's repr shows neither)."""
    parseval = constraint == "parseval"
    constraint = None if parseval else constraint
    kwargs = {"n_iters": bjorck_iters} if constraint == "bjorck" else {"onto": linf_onto} if constraint == "linf" else {}
    body = mlp([784] + [width] * depth + [10], activation, constraint,
               group_size=group_size if activation == "groupsort" else None, l_constant=l_constant, init=init,
               **kwargs)
    net = nn.Sequential(nn.Flatten(), *body)
    net.init, net.parseval = init, parseval
    return net


def _milestones(milestones) -> Schedule:
    return Schedule.multistep(list(milestones), 0.1) if milestones else Schedule.constant()


def train(name: str, model: nn.Module, method: str, train_data, test_data, *, epochs: int, batch_size: int,
          lr: float, milestones, margin: float = 0.3, l_constant: float = 1000.0, pgd_steps: int = 40,
          pgd_eps: float = 0.3, pgd_step_size: float = 0.01, linf_projection: str = "ball",
          val_data=None, checkpoint_dir: str = "", seed: int = 0, device=None, progress: bool = False):
    """Train one network with the authors' recipe for ``method``; returns the :class:`FitResult`.

    * ``"standard"``: Adam, cross-entropy (A6, and A9's standard net; a net built as
      ``"parseval"`` takes :func:`parseval_` after every update);
    * ``"hinge"``: A8, weights projected onto ‖W‖∞ ≤ 1 after every AggMo update
      (:func:`project_linf_`, also once at the start; ``linf_projection="sphere"``: every row
      onto ‖w‖₁ = 1, as the authors' code does), multi-class hinge with margin
      ``margin·l_constant`` on a net whose layers are scaled to constant ``l_constant``;
    * ``"pgd"``: A9's adversarial training, Adam on the cross-entropy of ℓ∞ PGD inputs
      (:func:`pgd_training_transform`: ε, steps, step size, margin ascent, clamp to [0, 1]).

    The learning rate is multiplied by 0.1 at each of ``milestones`` (epochs). With ``val_data``
    (held-out ``(x, y)``) the returned model holds the weights of the first epoch of best
    validation accuracy (``result.best_epoch``), as the authors report, not the last epoch's.
    With ``checkpoint_dir`` the run writes ``<dir>/<name>-<hash of the settings>.pt`` every epoch
    and resumes from it;
    ``progress`` shows fit's bars and a line per epoch (with timings: off for the goldens).
    """
    from ..data import loader
    from ..training.checkpoint import run_path

    if method not in ("standard", "hinge", "pgd"):
        raise ValueError(f"method must be 'standard', 'hinge' or 'pgd', got {method!r}")
    if linf_projection not in ("ball", "sphere"):
        raise ValueError(f"linf_projection must be 'ball' or 'sphere', got {linf_projection!r}")
    parseval = getattr(model, "parseval", False)
    if method == "hinge" and parseval:
        raise ValueError("a Parseval network trains with method 'standard' or 'pgd'; 'hinge' projects "
                         "the layers onto the ℓ∞ ball after every update instead")
    kwargs = {}
    if method == "hinge":
        project = functools.partial(project_linf_, onto=linf_projection)
        project(model)
        opt = lambda p: AggMo(p, lr=lr, betas=(0.0, 0.9, 0.99))
        loss = MarginLoss(margin * l_constant)
        kwargs["after_step"] = project
    else:
        opt = lambda p: torch.optim.Adam(p, lr=lr)
        loss = nn.CrossEntropyLoss()
        if parseval:  # after every update, not before the first (LNets)
            kwargs["after_step"] = parseval_
        if method == "pgd":
            kwargs["input_transform"] = pgd_training_transform(pgd_eps, pgd_steps, pgd_step_size)
    # Named by every setting but the epoch count (a longer run continues a shorter one), so a
    # run with another architecture, data size or recipe never resumes a foreign checkpoint.
    path = run_path(checkpoint_dir, name, method=method, architecture=repr(model), n_train=int(len(train_data[1])),
                    batch_size=batch_size, lr=lr, milestones=list(milestones), margin=margin, l_constant=l_constant,
                    pgd=[pgd_steps, pgd_eps, pgd_step_size] if method == "pgd" else None, seed=seed,
                    projection=linf_projection if method == "hinge" else None,
                    # Only a non-default init, Parseval steps or a validation set name the file:
                    # the names of earlier runs stay.
                    **({"init": model.init} if getattr(model, "init", "torch") != "torch" else {}),
                    **({"parseval": True} if parseval else {}),
                    **({"n_val": int(len(val_data[1]))} if val_data is not None else {}))  # fmt: skip
    if val_data is not None:
        kwargs["val_data"] = loader(val_data, 1000, shuffle=False)
    result = fit(model, opt, loss, loader(train_data, batch_size, seed=seed), epochs,
                 eval_data=loader(test_data, 1000, shuffle=False), schedule=_milestones(milestones),
                 checkpoint=path, device=device, desc=name, progress=progress, **kwargs)
    if result.best_state is not None:
        result.model.load_state_dict(result.best_state)
    return result


def rows_inside_ball(model: nn.Module, radius: float = 1.0, rtol: float = 1e-4) -> float:
    r"""Fraction of the rows of ``model``'s plain ``nn.Linear`` weights (those
    :func:`~lipsort.optim.project_linf_` projects) inside the ℓ1 ball by more than rounding,
    :math:`\|w_i\|_1 < (1 - \text{rtol})\,r` (float64 sums; the projection's float32
    rounding guard shrinks a row by far less than the default 1e-4).

    After :func:`lipsort.optim.project_linf_` these rows are the weights of the last update
    itself: the exact projection leaves them alone, while the authors' projection (LNets
    ``project_on_linf_ball``) applies Condat's threshold to every row, a negative one, :math:`(s -
    r)/n`, for a row of norm :math:`s < r`, which moves it out onto the sphere :math:`\|w\|_1 = r`.
    """
    sums = [m.weight.detach().abs().sum(-1, dtype=torch.float64) for m in plain_linears(model)]
    if not sums:
        raise ValueError("rows_inside_ball: the model has no plain nn.Linear layer")
    rows = torch.cat(sums)
    return float((rows < (1 - rtol) * radius).to(F64).mean())


# ---------------------------------------------------------------------------------------------
# 3. Accuracy, certificates, attacks.


def _check_norm(constraint: str | None) -> str:
    return "linf" if constraint == "linf" else "l2"


def a6_table(runs: dict, test_data, n_check: int, check_steps: int = 50):
    r"""One row per A6 network: test accuracy, Lipschitz bound and median certified radius (ℓ2,
    or ℓ∞ for the ℓ∞ nets) on the first ``n_check`` test images, each checked by an attack at
    every certified point's own radius (:func:`assert_no_attack_inside_certificate`)."""
    import pandas as pd

    x, y = test_data
    rows = []
    for (activation, constraint), result in runs.items():
        net = result.model
        acc = evaluate(net, [(x, y)])["acc"]
        norm = _check_norm(constraint)
        rep = assert_no_attack_inside_certificate(net, x[:n_check], y[:n_check], norm=norm, eps=None,
                                                  per_point_steps=check_steps)
        rows.append({"linear": LABELS[constraint], "activation": LABELS[activation], "norm": norm,
                     "test acc": acc, "L bound": rep["lipschitz"],
                     "median radius": float(rep["radius"].clamp_min(0).median()),
                     "seconds/epoch": sum(result.history["seconds"]) / max(len(result.history["seconds"]), 1)})
    columns = ["linear", "activation", "norm", "test acc", "L bound", "median radius", "seconds/epoch"]
    return pd.DataFrame(rows, columns=columns)  # the columns even when a run trained no A6 network


def a6_results(runs: dict, table) -> dict:
    """The ledger's A6 numbers from :func:`a6_table`: each network's test accuracy, the gap of
    the Björck MaxMin (GroupSort) network to the standard ReLU one when both were trained, the
    largest exact bound of the Parseval networks, and
    each network's accuracy-against-epoch curve (:func:`curve_results`, ``a6.<act>.<linear>``)."""
    out = {f"a6.{act}.{con or 'standard'}.acc": float(acc)
           for acc, (act, con) in zip(table["test acc"], runs, strict=True)}
    out.update(curve_results("a6", {f"{act}.{con or 'standard'}": run for (act, con), run in runs.items()}))
    parseval = [bound for bound, (_, con) in zip(table["L bound"], runs, strict=True) if con == "parseval"]
    if parseval:  # one Björck step after each update keeps every σ ≤ 1 (lipsort.optim.parseval_)
        out["a6.parseval.max_lipschitz"] = float(max(parseval))
    ref = out.get("a6.relu.standard.acc")
    for act in ("maxmin", "groupsort"):
        if ref is not None and f"a6.{act}.bjorck.acc" in out:
            out[f"a6.gap.{act}_bjorck"] = ref - out[f"a6.{act}.bjorck.acc"]
    return out


def robust_models(names) -> dict:
    """The A8/A9 networks named by ``names`` (keys of :data:`ROBUST_MODELS`), in that order."""
    if not list(names):
        raise ValueError(f"no robust network named: the A8/A9 section needs at least one of {list(ROBUST_MODELS)}")
    unknown = [n for n in names if n not in ROBUST_MODELS]
    if unknown:
        raise ValueError(f"unknown robust network(s) {unknown}; choose from {list(ROBUST_MODELS)}")
    return {n: ROBUST_MODELS[n] for n in names}


def attacked_images(split: str, val_data, test_data):
    """The images the A8/A9 curves certify and attack: ``"test"``, or ``"validation"`` (the
    authors' choice: the images :func:`load_split` held out, which ``n_val = 0`` leaves none of)."""
    if split == "test":
        return test_data
    if split != "validation":
        raise ValueError(f"attack_split must be 'test' or 'validation', got {split!r}")
    if val_data is None:
        raise ValueError("attack_split = 'validation' needs held-out training images: set n_val to a "
                         "positive number, or to None for all of them")
    return val_data


def robustness_curves(models: dict, test_data, eps_grid, n_eval: int, steps: int = 40, per_point_steps: int = 100,
                      search: dict | None = A8_PGD_SEARCH):
    r"""Clean, certified and attack accuracy over ``eps_grid`` (ℓ∞, pixels in [0, 1]).

    Clean accuracy is over the whole ``test_data``; certified accuracy (margin
    :math:`> 2L\varepsilon`, ``L`` the exact ℓ∞ bound), attack accuracy (correct and not
    flipped by torchattacks PGD, FGSM nor :func:`lipsort.attacks.pgd`, ``steps`` steps) and
    the accuracy under the authors' attack (:func:`lipsort.attacks.pgd_linf_search` with
    ``search``: no error found within ε) over its first ``n_eval`` images, by
    :func:`assert_no_attack_inside_certificate`, which raises if an attack flips a certified
    point. Returns a long ``DataFrame`` (model, eps, clean, certified, attack, search, and
    ``vanishing``: the fraction of those images whose cross-entropy gradient is exactly zero,
    :func:`lipsort.attacks.vanishing_gradients`, which the search cannot move).
    """
    import pandas as pd

    x, y = test_data
    rows = []
    for name, net in models.items():
        clean = evaluate(net, [(x, y)])["acc"]
        rep = assert_no_attack_inside_certificate(net, x[:n_eval], y[:n_eval], norm="linf",
                                                  eps=list(eps_grid), steps=steps,
                                                  per_point_steps=per_point_steps, search=search)
        found = rep.get("search_acc", [float("nan")] * len(rep["eps"]))
        vanishing = float(vanishing_gradients(net, x[:n_eval], y[:n_eval]).to(F64).mean())
        for e, c, a, f in zip(rep["eps"], rep["certified_acc"], rep["attack_acc"], found):
            rows.append({"model": name, "eps": e, "clean": clean, "certified": c, "attack": a,
                         "search": f, "vanishing": vanishing, "L": rep["lipschitz"]})
    return pd.DataFrame(rows)


def curve_results(prefix: str, runs: dict) -> dict:
    """Each run's test accuracy after every epoch, as ``{prefix}.{name}.test_acc.e{epoch:03d}``:
    the accuracy-against-epoch curves that a results file keeps (checkpoints may not be kept)."""
    return {curve_key(f"{prefix}.{name}", "test_acc", e): float(acc)
            for name, run in runs.items() for e, acc in zip(run.history["epoch"], run.history["eval_acc"])}


MEASURES = ("certified", "attack", "search")


def curve_table(curves_by_dataset: dict):
    """:func:`robustness_curves` of each data set as one table: a row per (data set, network in
    the order of the curves, measure: certified, attack or the authors' search, lower bound
    first; a measure that did not run is left out), a column per ε."""
    import pandas as pd

    def table(df):
        long = df.melt(id_vars=["model", "eps"], value_vars=list(MEASURES), var_name="measure")
        wide = long.pivot(index=["model", "measure"], columns="eps", values="value").dropna(how="all")
        order = {"model": dict.fromkeys(df.model), "measure": dict.fromkeys(MEASURES)}
        return wide.sort_index(key=lambda level: level.map(list(order[level.name]).index))

    return pd.concat({title: table(df) for title, df in curves_by_dataset.items()}, names=["data set"])


def robust_results(prefix: str, runs: dict, curves) -> dict:
    """The result keys of one data set's A8/A9 networks: their curves (:func:`curve_results`),
    clean accuracy and exact ℓ∞ bound, certified, attack and search accuracy at ε = 0.1 and 0.3, the
    fraction of rows strictly inside the ℓ1 ball of each hinge net, MaxMin's attack advantage
    over ReLU at ε = 0.3 when both hinge nets ran, the smallest gap between either attack's
    accuracy and the certified one (never negative: :func:`robustness_curves` raises first),
    each net's fraction of vanishing cross-entropy gradients and the smallest gap between the
    search's accuracy and that fraction (never negative either). ``curves`` is
    :func:`robustness_curves` of ``runs``' models."""
    out = curve_results(prefix, runs)
    for name, run in runs.items():
        if ROBUST_MODELS[name][1] == "hinge":
            out[f"{prefix}.{name}.rows_inside_ball"] = rows_inside_ball(run.model)
    for r in curves[curves.eps.isin([0.1, 0.3])].itertuples():
        key = f"{prefix}.{r.model}.eps{r.eps:g}"
        out[f"{key}.certified"], out[f"{key}.attack"] = float(r.certified), float(r.attack)
        if r.search == r.search:  # not NaN: the search ran
            out[f"{key}.search"] = float(r.search)
    if {"maxmin_linf", "relu_linf"} <= set(runs) and (curves.eps == 0.3).any():
        out[f"{prefix}.attack0.3.maxmin_minus_relu_linf"] = (
            out[f"{prefix}.maxmin_linf.eps0.3.attack"] - out[f"{prefix}.relu_linf.eps0.3.attack"])
    for name, part in curves.groupby("model"):
        out[f"{prefix}.{name}.clean"] = float(part.clean.iloc[0])
        out[f"{prefix}.{name}.vanishing_gradient"] = float(part.vanishing.iloc[0])
        out[f"{prefix}.{name}.lipschitz"] = float(part.L.iloc[0])
    searched = curves.search.notna().all()
    upper = curves[["attack", "search"]].min(axis=1) if searched else curves.attack
    out[f"{prefix}.min_attack_minus_certified"] = float((upper - curves.certified).min())
    if searched:
        out[f"{prefix}.min_search_minus_vanishing"] = float((curves.search - curves.vanishing).min())
    return out


def plot_training(runs_by_dataset: dict):
    """Test accuracy against epoch of each A8/A9 network (:func:`train` results), a panel per
    dataset (keys ``"mnist"``, ``"fashion_mnist"``)."""
    import matplotlib.pyplot as plt

    titles = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}
    fig, axes = plt.subplots(1, len(runs_by_dataset), figsize=(5.2 * len(runs_by_dataset), 3.4), squeeze=False)
    colors = dict(zip(ROBUST_MODELS, ("C0", "C1", "C2", "C3")))
    for ax, (dataset, runs) in zip(axes[0], runs_by_dataset.items()):
        for name, run in runs.items():
            ax.plot(run.history["epoch"], run.history["eval_acc"], "-o", ms=2, color=colors.get(name, "k"),
                    label=ROBUST_LABELS.get(name, name))
        ax.set(title=titles.get(dataset, dataset), xlabel="epoch", ylabel="test accuracy")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def plot_curves(curves_by_dataset: dict):
    """One panel per dataset: certified (solid; only for nets that certify something at ε > 0),
    attack (dashed) and, where it ran, the authors' search attack (dotted) accuracy against ε;
    a colour per network."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, len(curves_by_dataset), figsize=(5.2 * len(curves_by_dataset), 3.8),
                             squeeze=False)
    colors = dict(zip(ROBUST_MODELS, ("C0", "C1", "C2", "C3")))
    drawn = {}
    for ax, (title, df) in zip(axes[0], curves_by_dataset.items()):
        for name, part in df.groupby("model", sort=False):
            c = drawn[name] = colors.get(name, "k")
            ax.plot(part.eps, part.attack, "--o", ms=3, color=c)
            if part.search.notna().any():
                ax.plot(part.eps, part.search, ":^", ms=3, color=c)
            if part[part.eps > 0].certified.max() > 0:  # else only the clean point
                ax.plot(part.eps, part.certified, "-", color=c)
        ax.axvline(0.3, color="grey", lw=0.6)
        ax.set(title=title, xlabel="ε (ℓ∞, pixels in [0, 1])", ylabel="accuracy", ylim=(-0.02, 1.02))
    nets = [Line2D([], [], color=c, lw=2, label=ROBUST_LABELS.get(n, n)) for n, c in drawn.items()]
    styles = [Line2D([], [], color="k", ls=ls, marker=m, ms=3, label=label) for ls, m, label in
              (("-", "", "certified"), ("--", "o", "attack"), (":", "^", "authors' attack"))]
    axes[0][-1].legend(handles=nets + styles, fontsize=7, loc="upper right", handlelength=3)
    fig.tight_layout()
    return fig


def time_step(model: nn.Module, method: str, batch_size: int = 128, n_batches: int = 4, **kwargs) -> float:
    """Seconds per training step of ``model`` under ``method`` (:func:`train` on random
    MNIST-shaped batches): the second of two epochs of ``n_batches`` steps, divided by
    ``n_batches``. Multiply by the steps per epoch for the cost of an epoch."""
    x = torch.rand(batch_size * n_batches, 1, 28, 28)
    y = torch.randint(0, 10, (len(x),))
    kwargs.setdefault("lr", 1e-3)
    result = train("timing", model, method, (x, y), (x[:2], y[:2]), epochs=2, batch_size=batch_size,
                   milestones=[], **kwargs)
    return result.history["seconds"][1] / n_batches
