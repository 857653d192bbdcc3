r"""Book glue for chapter 05's A10: undead units and input-gradient norms of trained networks.

A unit is *undead* at level :math:`t` when it is active (positive) on at least a fraction
:math:`t` of the inputs (Anil et al., ``check_undead.py``); :func:`undead_rates` sweeps
:math:`t`, :func:`input_gradient_norms` measures :math:`\|\nabla_x f_y\|_2`. The networks are
:data:`A10_NETS`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..attacks._common import _eval_mode

F64 = torch.float64
#: The A10 networks, a subset of the A6 ones: label -> (activation, linear constraint).
A10_NETS = {"ReLU, standard": ("relu", None), "ReLU, Björck": ("relu", "bjorck"),
            "GroupSort, Björck": ("groupsort", "bjorck")}

__all__ = ["A10_NETS", "a10_results", "input_gradient_norms", "plot_gradient_norms", "plot_undead",
           "undead_rates"]


def _hidden_activations(model: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of every activation module (ReLU, MaxMin, GroupSort), as LNets' get_activations."""
    outs, h = [], x
    with torch.no_grad():
        for m in model:
            h = m(h)
            if not isinstance(m, (nn.Linear, nn.Flatten)) and type(m).__name__ != "Scale":
                outs.append(h)
    return outs


def undead_rates(model: nn.Module, x: torch.Tensor, thresholds) -> torch.Tensor:
    r"""Per layer and threshold ``t``: the fraction of units whose output is > 0 on at least a
    fraction ``t`` of the inputs ``x`` (LNets ``check_undead.py``), in eval mode (each module's
    mode restored after). Shape ``(len(t), layers)``."""
    with _eval_mode(model):
        rates = [(a > 0).to(F64).mean(0) for a in _hidden_activations(model, x)]
    t = torch.as_tensor(thresholds, dtype=F64)
    return torch.stack([(r[None, :] >= t[:, None]).to(F64).mean(1) for r in rates], dim=1)


def a10_results(undead: dict, grads: dict, thresholds) -> dict:
    """The ledger's A10 numbers for the :data:`A10_NETS` trained: the mean fraction of units on for
    at least 90% of the inputs, the mean gradient norm, and their differences between networks."""
    keys = {name: f"{act}.{con or 'standard'}" for name, (act, con) in A10_NETS.items()}
    i90 = int((thresholds >= 0.9).nonzero()[0])
    out = {}
    for name, key in keys.items():
        if name in undead:
            out[f"a10.undead_t0.9.{key}"] = float(undead[name][i90].mean())
            out[f"a10.gradnorm_mean.{key}"] = float(grads[name].mean())
    if {"GroupSort, Björck", "ReLU, Björck"} <= undead.keys():
        out["a10.gradnorm.groupsort_minus_relu.bjorck"] = (
            out["a10.gradnorm_mean.groupsort.bjorck"] - out["a10.gradnorm_mean.relu.bjorck"])
    if {"ReLU, Björck", "ReLU, standard"} <= undead.keys():
        out["a10.undead_t0.9.bjorck_minus_standard.relu"] = (
            out["a10.undead_t0.9.relu.bjorck"] - out["a10.undead_t0.9.relu.standard"])
    return out


def plot_undead(rates: dict, thresholds):
    """Mean over layers of :func:`undead_rates` against ``t``, one line per network."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for name, r in rates.items():
        ax.plot(thresholds, r.mean(1).numpy(), label=name)
    ax.set(xlabel="t (fraction of test inputs)", ylabel="fraction of units active on ≥ t", ylim=(-0.02, 1.02))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def input_gradient_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r""":math:`\|\nabla_x f_y(x)\|_2` per input: the gradient of the true class's logit, in
    eval mode (each module's mode restored after)."""
    x = x.detach().clone().requires_grad_(True)
    with _eval_mode(model), torch.enable_grad():
        (g,) = torch.autograd.grad(model(x).gather(1, y[:, None]).sum(), x)
    return g.flatten(1).norm(dim=1).detach()


def plot_gradient_norms(norms: dict):
    """Histograms of :func:`input_gradient_norms`, one per network."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    hi = max(float(v.max()) for v in norms.values())
    bins = torch.linspace(0, hi * 1.02, 60).numpy()
    for name, v in norms.items():
        ax.hist(v.numpy(), bins=bins, alpha=0.6, label=name)
    ax.set(xlabel="‖∇ₓ f_y(x)‖₂", ylabel="test inputs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
