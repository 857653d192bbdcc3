r"""Projected gradient attacks: empirical upper bounds on robust accuracy.

A certificate (:mod:`lipsort.certify`) says no perturbation within the radius can change a
prediction; an attack searches for one that does. On a certified point the attack must
fail — the test suite checks exactly that — and where it succeeds it proves the point is not
robust at that radius. Between the two lies the gap a tighter Lipschitz bound could close.

* :mod:`lipsort.attacks.pgd`: :func:`pgd`, lipsort's projected gradient ascent, and
  :func:`pgd_training_transform` for adversarial training;
* :mod:`lipsort.attacks.wrappers`: ``torchattacks``' PGD and FGSM (:func:`pgd_linf`,
  :func:`pgd_l2`, :func:`fgsm`) at the papers' settings;
* :mod:`lipsort.attacks.search`: the authors' A8 attack with its ε search
  (:func:`pgd_linf_search`) and :func:`vanishing_gradients`;
* :mod:`lipsort.attacks.certificate`: :func:`assert_no_attack_inside_certificate`.
"""

from __future__ import annotations

from .certificate import CertificateViolation, assert_no_attack_inside_certificate
from .pgd import pgd, pgd_training_transform
from .search import A8_PGD_SEARCH, pgd_linf_search, vanishing_gradients
from .wrappers import A9_PGD, BCOP_PGD_MNIST, fgsm, pgd_l2, pgd_linf

__all__ = [
    "A8_PGD_SEARCH",
    "A9_PGD",
    "BCOP_PGD_MNIST",
    "CertificateViolation",
    "assert_no_attack_inside_certificate",
    "fgsm",
    "pgd",
    "pgd_l2",
    "pgd_linf",
    "pgd_linf_search",
    "pgd_training_transform",
    "vanishing_gradients",
]
