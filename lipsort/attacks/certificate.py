r"""The check that no attack changes a prediction inside its certified radius."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..certify import margins
from ._common import _check_eps, _check_pixels, _flat_norm, _PixelModel
from .pgd import pgd
from .search import pgd_linf_search
from .wrappers import fgsm, pgd_l2, pgd_linf

__all__ = ["CertificateViolation", "assert_no_attack_inside_certificate"]


class CertificateViolation(AssertionError):
    """An attack changed a prediction inside its certified radius: the Lipschitz bound is wrong."""


def _attacks_at(model, g, x, y, eps: float, norm: str, steps: int, normalization):
    """(name, adversarial inputs) of every attack of the ε-grid check, one after the other."""
    alpha = 2.5 * eps / steps
    attack = pgd_linf if norm == "linf" else pgd_l2
    yield (
        f"torchattacks PGD {norm} at eps={eps}",
        attack(model, x, y, eps, steps, alpha, True, normalization),
    )
    if norm == "linf":
        yield f"torchattacks FGSM at eps={eps}", fgsm(model, x, y, eps, normalization)
    yield (
        f"lipsort pgd {norm} at eps={eps}",
        pgd(g, x, y, eps, norm=norm, steps=steps, clamp=(0.0, 1.0)),
    )


def assert_no_attack_inside_certificate(
    model: nn.Module, x: Tensor, y: Tensor, lipschitz: float | Tensor | None = None,
    norm: str = "linf", eps=None, steps: int = 40, per_point_steps: int = 100,
    normalization=None, slack: float = 1e-3, batch_size: int = 500, search: dict | None = None,
) -> dict:
    r"""Attack every certified point inside its certificate and raise if one is flipped.

    The map attacked is :math:`g(x) = f((x - \mu)/\sigma)` on pixels ``x`` in [0, 1] (``f`` =
    ``model``; :math:`\mu, \sigma` = ``normalization`` if given), whose constant ``L`` is
    ``lipschitz`` if given, else ``lipschitz_upper_bound(model, norm) / min σ`` (a
    normalization multiplies the constant by :math:`1/\sigma`). Certified radii
    :math:`r_i` come from :func:`lipsort.certify.certified_radius`. Two checks:

    * per point (``per_point_steps > 0``): :func:`pgd` (margin loss) at each certified
      point's own radius :math:`(1 - \text{slack})\,r_i`;
    * for each ``eps`` (a float or a grid): ``torchattacks`` PGD in ``norm`` (``steps``
      steps of :math:`2.5\varepsilon/\text{steps}`, random start), FGSM (ℓ∞) and :func:`pgd` at
      ε, on every correctly classified point; those with :math:`(1-\text{slack})\,r_i > \varepsilon`
      must all resist;
    * with ``search`` (ℓ∞ only; keyword arguments of :func:`pgd_linf_search`, e.g.
      :data:`A8_PGD_SEARCH`): the closest error that search finds for every point, which must
      lie at or beyond :math:`(1-\text{slack})\,r_i`.

    ``slack`` keeps float32 rounding of the margins from counting as a violation; any real
    error of the bound (a missing √2 or σ) is far larger.

    Returns:
        ``{"n", "lipschitz", "radius"`` (float64, per point), ``"eps"``, ``"certified_acc"``
        (radius > ε), ``"attack_acc"`` (correct and no attack succeeded)``}``: the lower and
        upper bounds of robust accuracy at each ε; with ``search`` also ``"search_dist"`` (per
        point, float64) and ``"search_acc"`` (distance > ε), another upper bound.

    Raises:
        CertificateViolation: an attack flipped a certified point; the message names the
            attack, the sample, its radius and the perturbation's norm.
        ValueError: bad ``eps``, ``slack`` or pixels outside [0, 1].

    Example:
        >>> net = nn.Linear(2, 2)  # logits (x₁ − ½, ½ − x₁): ‖W‖∞ = 1, margins 2|x₁ − ½|
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        ...     _ = net.bias.copy_(torch.tensor([-0.5, 0.5]))
        >>> x, y = torch.tensor([[0.9, 0.5], [0.2, 0.5]]), torch.tensor([0, 1])
        >>> report = assert_no_attack_inside_certificate(net, x, y, eps=[0.1, 0.35, 0.5], steps=10)
        >>> [round(r, 6) for r in report["radius"].tolist()]  # the distances to x₁ = ½: tight
        [0.4, 0.3]
        >>> report["certified_acc"], report["attack_acc"]
        ([1.0, 0.5, 0.0], [1.0, 0.5, 0.0])
    """
    from ..certify import certified_radius, lipschitz_upper_bound

    _check_pixels(x, y)
    grid = [] if eps is None else [eps] if isinstance(eps, (int, float)) else list(eps)
    grid = [_check_eps(e) for e in grid]
    if not 0 <= slack < 1:
        raise ValueError(f"slack must lie in [0, 1), got {slack!r}")
    if search is not None and norm != "linf":
        raise ValueError(f"search is an ℓ∞ attack, got norm={norm!r}")
    g = _PixelModel(model, x.shape[1:], normalization, x)
    if lipschitz is None:
        lipschitz = float(lipschitz_upper_bound(model, norm))
        if g.std is not None:
            lipschitz /= float(g.std.min())
    was_training = model.training
    model.eval()
    order = float("inf") if norm == "linf" else 2.0
    try:
        with torch.no_grad():
            parts = zip(x.split(batch_size), y.split(batch_size))
            radius = torch.cat([certified_radius(g(a), b, lipschitz, norm) for a, b in parts])
            radius = radius.to(torch.float64)
        safe = radius * (1 - slack)

        def flipped(x_adv: Tensor, idx: Tensor) -> Tensor:
            with torch.no_grad():
                return margins(g(x_adv), y[idx]) <= 0

        def check(name: str, x_adv: Tensor, idx: Tensor, at: Tensor, bad: Tensor | None = None) -> Tensor:
            bad = flipped(x_adv, idx) if bad is None else bad
            dist = _flat_norm((x_adv - x[idx]).to(torch.float64), order)
            inside = bad & (dist < safe[idx]) & (at < safe[idx])
            if bool(inside.any()):
                k = int(inside.nonzero()[0])
                raise CertificateViolation(
                    f"{name} flipped {int(inside.sum())} certified point(s); e.g. sample "
                    f"{int(idx[k])}: certified radius {float(radius[idx[k]]):.6g} ({norm}, L = "
                    f"{lipschitz:.6g}) but the input at distance {float(dist[k]):.6g} is "
                    f"misclassified. The Lipschitz bound does not hold for this model (an "
                    f"unbounded layer, an input normalization not divided out?)"
                )
            return bad

        if per_point_steps:
            idx = (radius > 0).nonzero().flatten()
            for part in idx.split(batch_size):
                x_adv = pgd(g, x[part], y[part], safe[part].to(x.dtype), norm=norm,
                            steps=per_point_steps, clamp=(0.0, 1.0))
                check("PGD at each point's radius", x_adv, part, torch.zeros_like(safe[part]))
        certified, robust = [], []
        for e in grid:
            idx = (radius > 0).nonzero().flatten()
            survived = torch.zeros(len(x), dtype=torch.bool)
            for part in idx.split(batch_size):
                at = torch.full((len(part),), e, dtype=torch.float64, device=radius.device)
                ok = torch.ones(len(part), dtype=torch.bool)
                xs, ys = x[part], y[part]
                if e > 0:
                    for name, x_adv in _attacks_at(model, g, xs, ys, e, norm, steps, normalization):
                        ok &= ~check(name, x_adv, part, at).cpu()
                survived[part.cpu()] = ok
            certified.append(float((radius > e).to(torch.float64).mean()))
            robust.append(float(survived.to(torch.float64).mean()))
        report = {"n": len(x), "lipschitz": float(lipschitz), "radius": radius, "eps": grid,
                  "certified_acc": certified, "attack_acc": robust}
        if search is not None:
            dist = []
            for part in torch.arange(len(x), device=x.device).split(batch_size):
                x_adv, d = pgd_linf_search(model, x[part], y[part], normalization=normalization, **search)
                # Judged by the search's own criterion (argmax ≠ label), at its distance.
                check("PGD with the ε search", x_adv, part, torch.zeros_like(d), torch.isfinite(d))
                dist.append(d)
            report["search_dist"] = dist = torch.cat(dist)
            report["search_acc"] = [float((dist > e).to(torch.float64).mean()) for e in grid]
    finally:
        model.train(was_training)
    return report
