r"""Classification losses for Lipschitz networks.

A Lipschitz network cannot make its logits large, so the loss decides how the margin — and
hence the certified radius (:mod:`lipsort.certify`) — is traded against accuracy
(Béthune et al., 2022). Five losses, all ``torch.nn`` modules with
``reduction`` in ``{"mean", "sum", "none"}``:

* :class:`MarginLoss`: the multi-class hinge of Anil et al. (2019) and Li et al. (2019),
  i.e. torch's ``multi_margin_loss``.
* :class:`KRLoss`: the Kantorovich–Rubinstein (Wasserstein dual) objective, negated.
* :class:`HingeLoss`: the one-vs-rest hinge :math:`\mathbb E\,(m - y f)_+` of Béthune et al.
* :class:`HKRLoss`: :math:`-\mathrm{KR} + \alpha\,\mathrm{hinge}`.
* :class:`TauCrossEntropyLoss`: :math:`\mathrm{CE}(\tau f)/\tau`.

Outputs are either *binary* — one score per sample, shape ``(N,)`` or ``(N, 1)``, labels in
{0, 1} or {−1, +1} (the sign of the score is the prediction) — or *multi-class*, logits of
shape ``(N, C)`` with ``C ≥ 2`` and integer class indices of shape ``(N,)``.

For the batch-level losses (KR, HKR) ``reduction="none"`` returns per-sample terms whose
*mean* is the loss (each term carries the batch weight :math:`N/N_\pm`, as in deel-lip), so
``"sum"`` is ``N`` times the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from ._checks import binary_labels

__all__ = ["HKRLoss", "HingeLoss", "KRLoss", "MarginLoss", "TauCrossEntropyLoss"]

_REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction: str) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return reduction


def _reduce(values: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


def _check_float(x, name: str = "input") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of scores, got dtype {x.dtype}")


def _check_scores(scores) -> None:
    _check_float(scores, "scores")
    if scores.dim() not in (1, 2) or scores.shape[0] == 0:
        raise ValueError(
            f"scores must have shape (N,), (N, 1) or (N, C) with N >= 1, got {tuple(scores.shape)}"
        )


def _check_class_indices(logits: Tensor, target) -> None:
    """Multi-class case: ``logits`` (N, C) with C ≥ 2, ``target`` integer (N,) in [0, C)."""
    _check_float(logits, "logits")
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (N, C) with C >= 2, got {tuple(logits.shape)}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(
            f"target must be a torch.Tensor of class indices, got {type(target).__name__}"
        )
    if target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    if target.shape != logits.shape[:1]:
        raise ValueError(
            f"target must have shape ({logits.shape[0]},) for logits of shape "
            f"{tuple(logits.shape)}, got {tuple(target.shape)}"
        )
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= logits.shape[1]):
        raise ValueError(
            f"class indices must lie in [0, {logits.shape[1]}), got values in "
            f"[{int(target.min())}, {int(target.max())}]"
        )


def _is_binary(scores: Tensor) -> bool:
    return scores.dim() == 1 or (scores.dim() == 2 and scores.shape[1] == 1)


def _binary_signs(scores: Tensor, target) -> Tensor:
    """Binary case: the labels as signs ±1 in the scores' dtype (validated by :func:`binary_labels`)."""
    pos = binary_labels(target, scores.shape[0], f"binary scores of shape {tuple(scores.shape)}")
    return torch.where(pos, 1.0, -1.0).to(scores.dtype)


def _binary_kr_terms(scores: Tensor, signs: Tensor) -> Tensor:
    r"""Per-sample terms :math:`t_i` with :math:`\frac1N\sum_i t_i = E_+ f - E_- f`.

    Along dim 0 (samples); works column-wise for a (N, C) matrix of one-vs-rest problems.
    A side with no sample contributes 0 (its expectation is undefined on this batch).
    """
    n = scores.shape[0]
    pos = signs > 0
    n_pos = pos.sum(0, keepdim=True).to(scores.dtype)
    n_neg = n - n_pos
    w_pos = torch.where(n_pos > 0, n / n_pos.clamp_min(1), torch.zeros_like(n_pos))
    w_neg = torch.where(n_neg > 0, n / n_neg.clamp_min(1), torch.zeros_like(n_neg))
    return torch.where(pos, w_pos, -w_neg) * scores


def _kr_terms(scores: Tensor, target) -> Tensor:
    """Per-sample KR terms (mean = KR estimate), binary or one-vs-rest multi-class."""
    if _is_binary(scores):
        signs = _binary_signs(scores, target)
        return _binary_kr_terms(scores.reshape(-1), signs)
    _check_class_indices(scores, target)
    signs = 2 * nnf.one_hot(target, scores.shape[1]).to(scores.dtype) - 1
    return _binary_kr_terms(scores, signs).mean(1)


def _hinge_terms(scores: Tensor, target, margin: float) -> Tensor:
    """Per-sample hinge terms, binary or one-vs-rest multi-class (see :class:`HKRLoss`)."""
    if _is_binary(scores):
        signs = _binary_signs(scores, target)
        return nnf.relu(margin - signs * scores.reshape(-1))
    _check_class_indices(scores, target)
    c = scores.shape[1]
    onehot = nnf.one_hot(target, c).to(scores.dtype)
    signs = 2 * onehot - 1
    # The true class is one positive against C-1 negatives: weight it C-1 (as deel-lip).
    weights = 1 + (c - 2) * onehot
    return (weights * nnf.relu(margin - signs * scores)).mean(1)


class MarginLoss(nn.Module):
    r"""Multi-class hinge loss with margin ``m`` (Anil et al., 2019; Li et al., 2019).

    .. math::
        \ell(f, y) = \frac{1}{C} \sum_{j \ne y} \max\bigl(0,\; m - f_y + f_j\bigr)^p

    This is exactly :func:`torch.nn.functional.multi_margin_loss`, which is what both
    reference implementations call: ``HingeLossClassificationModel`` in cemanil/LNets
    (``lnets/models/model_types/classification_model.py``, margin = ``margin × l_constant``)
    and ``multi_margin_loss_eps`` in ColinQiyangLi/LConvNet (``lconvnet/tasks/common.py``,
    margin = ``√2·ε_train`` in ℓ2, ``2·ε_train`` in ℓ∞, order ``p=1``). It is a *sum* over
    the wrong classes divided by ``C``, not the max over them. A zero loss means
    ``f_y − f_j ≥ m`` for every ``j ≠ y``, so with an L-Lipschitz network every training
    point is certified at radius ``m/(√2·L)`` in ℓ2 (:func:`lipsort.certify.certified_radius`).

    Args:
        margin: the margin ``m`` (scale it by the network's Lipschitz constant and by √2
            for an ℓ2 radius target, as LConvNet does).
        p: exponent of each hinge term, 1 or 2.
        reduction: ``"mean"`` (over samples), ``"sum"`` or ``"none"`` (shape ``(N,)``).

    Example:
        >>> logits = torch.tensor([[2.0, 1.5, -1.0]])
        >>> MarginLoss(margin=1.0)(logits, torch.tensor([0]))  # (0.5 + 0) / 3
        tensor(0.1667)
    """

    def __init__(self, margin: float = 1.0, p: int = 1, reduction: str = "mean"):
        super().__init__()
        if not margin >= 0:
            raise ValueError(f"margin must be non-negative, got {margin!r}")
        if p not in (1, 2):
            raise ValueError(f"p must be 1 or 2, got {p!r}")
        self.margin = float(margin)
        self.p = p
        self.reduction = _check_reduction(reduction)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        _check_class_indices(logits, target)
        return nnf.multi_margin_loss(
            logits, target, p=self.p, margin=self.margin, reduction=self.reduction
        )

    def extra_repr(self) -> str:
        return f"margin={self.margin}, p={self.p}, reduction={self.reduction!r}"


class KRLoss(nn.Module):
    r"""Negative Kantorovich–Rubinstein objective, to be minimized (Béthune et al., 2022).

    Binary scores ``f`` with labels splitting the batch into positives and negatives:

    .. math::
        \mathcal L_{KR}(f) = -\bigl(\mathbb E_{x \sim P_+} f(x) - \mathbb E_{x \sim P_-} f(x)\bigr),

    whose minimum over 1-Lipschitz ``f`` is :math:`-W_1(P_+, P_-)` (chapter 01). For
    ``(N, C)`` logits and class indices, the one-vs-rest form averages the binary objective
    of each logit ``f_k`` (class ``k`` against the rest) over the ``C`` classes:

    .. math::
        \mathcal L_{KR}(f) = -\frac1C \sum_{k=1}^C
            \bigl(\mathbb E_{y = k} f_k(x) - \mathbb E_{y \ne k} f_k(x)\bigr).

    These are the definitions of deel-lip (``deel/lip/losses.py``: ``KR``, ``MulticlassKR``)
    and deel-torchlip (``deel/torchlip/functional.py``: ``kr_loss``), who return the
    *positive* KR value from ``KRLoss`` and this negated one from ``NegKRLoss``. As there, the
    expectation over a side with no sample in the batch is taken as 0.

    Args:
        reduction: ``"mean"`` gives the loss above; ``"none"`` gives per-sample terms
            (:math:`\mp N/N_\pm \cdot f_i`, averaged over classes) whose mean is the loss.

    Example:
        >>> f = torch.tensor([2.0, 1.0, -1.0, 0.0])
        >>> KRLoss()(f, torch.tensor([1, 1, 0, 0]))  # -(1.5 - (-0.5))
        tensor(-2.)
    """

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = _check_reduction(reduction)

    def forward(self, scores: Tensor, target: Tensor) -> Tensor:
        _check_scores(scores)
        return _reduce(-_kr_terms(scores, target), self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class HingeLoss(nn.Module):
    r"""One-vs-rest hinge with margin ``m``: the hinge term of :class:`HKRLoss` alone (α = ∞).

    Binary scores with signs :math:`y \in \{-1, +1\}`:
    :math:`\mathcal L(f) = \mathbb E\,(m - y f(x))_+`. Multi-class, every logit against its
    one-vs-rest label, the true class weighted ``C−1``:

    .. math::
        \ell(f, y) = \frac1C \Bigl[(C-1)\,(m - f_y)_+ + \sum_{k \ne y} (m + f_k)_+\Bigr].

    Zero iff every true logit is ``≥ m`` and every other ``≤ −m``, so the margin
    :math:`f_y - \max_{k \ne y} f_k` is then at least ``2m``. This is deel-lip's
    ``MulticlassHinge`` with the paper's (uncentred) margin; unlike :class:`MarginLoss` it
    constrains each logit's sign, not only the differences.

    Args:
        margin: the margin ``m ≥ 0``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Example:
        >>> logits = torch.tensor([[2.0, -0.5, 0.3]])
        >>> HingeLoss(margin=1.0)(logits, torch.tensor([0]))  # (2·0 + 0.5 + 1.3) / 3
        tensor(0.6000)
    """

    def __init__(self, margin: float = 1.0, reduction: str = "mean"):
        super().__init__()
        if not margin >= 0:
            raise ValueError(f"margin must be non-negative, got {margin!r}")
        self.margin = float(margin)
        self.reduction = _check_reduction(reduction)

    def forward(self, scores: Tensor, target: Tensor) -> Tensor:
        _check_scores(scores)
        return _reduce(_hinge_terms(scores, target, self.margin), self.reduction)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, reduction={self.reduction!r}"


class HKRLoss(nn.Module):
    r"""Hinge-regularized KR loss :math:`-\mathrm{KR} + \alpha\,\mathrm{hinge}` (Béthune et al.).

    Binary scores, labels mapped to signs :math:`y \in \{-1, +1\}`:

    .. math::
        \mathcal L(f) = -\bigl(\mathbb E_+ f - \mathbb E_- f\bigr)
            + \alpha\, \mathbb E\, \bigl(m - y f(x)\bigr)_+ .

    Multi-class, one-vs-rest: the KR term of :class:`KRLoss` and, per sample with true class
    ``y``, the hinge of every logit against its binary label, the true class weighted ``C−1``
    (it is one positive against ``C−1`` negatives):

    .. math::
        \mathrm{hinge}(f, y) = \frac1C \Bigl[(C-1)\,(m - f_y)_+ + \sum_{k \ne y} (m + f_k)_+\Bigr].

    Sources: deel-lip ``deel/lip/losses.py`` (``HKR`` = ``-KR + alpha * HingeMargin``,
    ``MulticlassHKR`` with ``MulticlassHinge``) and deel-torchlip
    ``deel/torchlip/functional.py`` (``hinge_multiclass_loss``: the ``C−1`` weight and the
    mean over classes). Two conventions differ between their versions: recent deel-lip /
    deel-torchlip put ``m/2`` inside the hinge ("centered" margin), and recent deel-torchlip
    takes :math:`\alpha \in [0, 1]` and returns
    :math:`\alpha\,\mathrm{hinge} - (1-\alpha)\mathrm{KR}`.
    Here, as in the paper and the earlier deel-torchlip ``hkr_loss``, the hinge uses ``m``
    and α is unbounded: ours with ``(α, m)`` equals recent deel-torchlip's with
    ``(α/(1+α), 2m)`` times ``1+α``.

    Args:
        alpha: weight of the hinge term (α ≥ 0; the paper sweeps 5…300).
        margin: the hinge margin ``m ≥ 0`` (``m = 0`` leaves a perceptron term ``(−y f)_+``,
            one of the two-moons settings of the paper's code).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-sample terms whose mean is the loss).

    Example:
        >>> f = torch.tensor([2.0, 0.5, -1.0, 0.0])
        >>> y = torch.tensor([1, 1, 0, 0])
        >>> hkr = HKRLoss(alpha=10.0, margin=1.0)(f, y)
        >>> hinge = torch.tensor([0.0, 0.5, 0.0, 1.0]).mean()
        >>> bool(torch.isclose(hkr, KRLoss()(f, y) + 10.0 * hinge))
        True
    """

    def __init__(self, alpha: float = 10.0, margin: float = 1.0, reduction: str = "mean"):
        super().__init__()
        if not alpha >= 0:
            raise ValueError(f"alpha must be non-negative, got {alpha!r}")
        if not margin >= 0:
            raise ValueError(f"margin must be non-negative, got {margin!r}")
        self.alpha = float(alpha)
        self.margin = float(margin)
        self.reduction = _check_reduction(reduction)

    def forward(self, scores: Tensor, target: Tensor) -> Tensor:
        _check_scores(scores)
        terms = -_kr_terms(scores, target) + self.alpha * _hinge_terms(scores, target, self.margin)
        return _reduce(terms, self.reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, margin={self.margin}, reduction={self.reduction!r}"


class TauCrossEntropyLoss(nn.Module):
    r"""Cross-entropy with temperature :math:`\mathrm{CE}(\tau f, y) / \tau` (Béthune et al.).

    A 1-Lipschitz network cannot scale its logits up to sharpen the softmax; ``τ`` does it
    for it. Large ``τ`` approaches the hinge-like regime (small margins, high accuracy); small
    ``τ`` pushes for large margins (robustness). Dividing by ``τ`` keeps gradients of
    comparable size across temperatures (deel-lip ``TauCategoricalCrossentropy``). Binary
    scores use the logistic loss :math:`\log(1 + e^{-\tau y f})/\tau`.

    Args:
        tau: the temperature ``τ > 0``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Example:
        >>> logits, y = torch.tensor([[1.0, -1.0]]), torch.tensor([0])
        >>> ce = torch.nn.functional.cross_entropy(logits, y)
        >>> bool(torch.isclose(TauCrossEntropyLoss(1.0)(logits, y), ce))
        True
    """

    def __init__(self, tau: float = 1.0, reduction: str = "mean"):
        super().__init__()
        if not tau > 0:
            raise ValueError(f"tau must be positive, got {tau!r}")
        self.tau = float(tau)
        self.reduction = _check_reduction(reduction)

    def forward(self, scores: Tensor, target: Tensor) -> Tensor:
        _check_scores(scores)
        if _is_binary(scores):
            signs = _binary_signs(scores, target)
            # softplus(-τ y f) = log(1 + exp(-τ y f)) = BCE-with-logits for label (y+1)/2.
            terms = nnf.softplus(-self.tau * signs * scores.reshape(-1)) / self.tau
        else:
            _check_class_indices(scores, target)
            terms = nnf.cross_entropy(self.tau * scores, target, reduction="none") / self.tau
        return _reduce(terms, self.reduction)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, reduction={self.reduction!r}"
