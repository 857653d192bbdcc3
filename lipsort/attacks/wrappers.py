r"""The attacks of ``torchattacks`` on pixel inputs (PGD ℓ∞ and ℓ2 with random starts, FGSM),
at the papers' settings."""

from __future__ import annotations

from torch import Tensor

from ._common import _check_eps, _check_pixels, _check_steps, _eval_mode, _PixelModel

__all__ = ["A9_PGD", "BCOP_PGD_MNIST", "fgsm", "pgd_l2", "pgd_linf"]

#: Anil et al. (2019), A9 (LNets ``train_pgd.py``, ``manual_pgd``): ℓ∞, ε 0.3, 40 steps of 0.01.
A9_PGD = {"eps": 0.3, "steps": 40, "step_size": 0.01}
#: Li et al. (2019), BCOP MNIST evaluation: ℓ2, ε 1.58, 200 steps of 0.01, random start.
BCOP_PGD_MNIST = {"eps": 1.58, "steps": 200, "step_size": 0.01}


def _torchattack(cls_name: str, model, x, y, normalization, **kwargs) -> Tensor:
    import torchattacks  # lazily: the library core imports only torch and numpy

    _check_pixels(x, y)
    wrapped = _PixelModel(model, x.shape[1:], normalization, x)
    attack = getattr(torchattacks, cls_name)(wrapped, **kwargs)
    attack.set_device(x.device)
    # torchattacks' ℓ2 steps view perturbations as (N, 1, 1, 1)-scaled images: flatten each
    # input to (1, 1, D) (norms are unchanged), and reshape back inside the wrapped model.
    flat = x.detach().reshape(x.shape[0], 1, 1, -1)
    # torchattacks puts the model in eval mode and leaves it there or in training mode
    # depending on its version: restore every module's own flag.
    with _eval_mode(model):
        return attack(flat, y).reshape(x.shape).detach()


def pgd_linf(model, x, y, eps: float = 0.3, steps: int = 40, step_size: float = 0.01,
             random_start: bool = True, normalization=None) -> Tensor:
    r"""ℓ∞ PGD of ``torchattacks`` (Madry et al., 2018): ascent on the cross-entropy,
    :math:`x \leftarrow \Pi(x + \alpha\,\mathrm{sign}\,\nabla_x)` in
    :math:`\{\|x - x_0\|_\infty \le \varepsilon\} \cap [0, 1]^D`; defaults are :data:`A9_PGD`.

    ``x`` holds pixels in [0, 1] of any shape ``(N, ...)`` (ε is in pixel units); a model that
    expects ``(x − μ)/σ`` gets ``normalization=(μ, σ)`` (floats or tensors broadcastable to one
    input). Random starts draw from torch's global generator. Returns the adversarial pixels.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(4, 3)
        >>> x, y = torch.rand(5, 4), torch.randint(0, 3, (5,))
        >>> bool(((pgd_linf(net, x, y, eps=0.1) - x).abs().max() <= 0.1 + 1e-6))
        True
    """
    return _torchattack("PGD", model, x, y, normalization, eps=_check_eps(eps),
                        alpha=_check_eps(step_size, "step_size"), steps=_check_steps(steps),
                        random_start=random_start)


def pgd_l2(model, x, y, eps: float = 1.58, steps: int = 200, step_size: float = 0.01,
           random_start: bool = True, normalization=None) -> Tensor:
    r"""ℓ2 PGD of ``torchattacks``: normalized-gradient steps projected onto
    :math:`\{\|x - x_0\|_2 \le \varepsilon\} \cap [0, 1]^D`; defaults are :data:`BCOP_PGD_MNIST`.
    Inputs as in :func:`pgd_linf`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(4, 3)
        >>> x, y = torch.rand(5, 4), torch.randint(0, 3, (5,))
        >>> bool(((pgd_l2(net, x, y, eps=0.1, steps=5) - x).norm(dim=1).max() <= 0.1 + 1e-6))
        True
    """
    return _torchattack("PGDL2", model, x, y, normalization, eps=_check_eps(eps),
                        alpha=_check_eps(step_size, "step_size"), steps=_check_steps(steps),
                        random_start=random_start)


def fgsm(model, x, y, eps: float = 0.3, normalization=None) -> Tensor:
    r"""FGSM of ``torchattacks`` (Goodfellow et al., 2015): one step
    :math:`x_0 + \varepsilon\,\mathrm{sign}\,\nabla_x \mathrm{CE}`, clipped to [0, 1].
    Inputs as in :func:`pgd_linf`."""
    return _torchattack("FGSM", model, x, y, normalization, eps=_check_eps(eps))
