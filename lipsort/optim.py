r"""Aggregated momentum (AggMo; Lucas, Sun, Zemel, Grosse, ICLR 2019), the optimizer of
Anil et al. (2019) for their Wasserstein and robustness experiments.

AggMo keeps ``K`` heavy-ball velocities with different damping factors
:math:`\beta_1, \dots, \beta_K` and steps along their average:

.. math::
    v_i \leftarrow \beta_i v_i + g \quad (i = 1..K), \qquad
    \theta \leftarrow \theta - \frac{\eta}{K} \sum_{i=1}^K v_i ,

with :math:`g` the gradient (plus ``weight_decay·θ`` if set) and velocities starting at 0.
Large :math:`\beta` give speed along low-curvature directions, small ones damp the
oscillations that large momentum causes; the paper's default is
:math:`\beta = (0, 0.9, 0.99)`, the setting of the authors' configs (cemanil/LNets).

:class:`AggMo` is the maintained implementation of ``pytorch-optimizer``
(``pytorch_optimizer.AggMo``), re-exported here; ``tests/test_optim.py`` checks it against the
update rule above written out by hand. Give it at least two *distinct* betas: its velocities are
keyed by the value of β (a repeated β shares one velocity, updated twice per step) and its
argument check reads ``betas[1]``.

Example:
    >>> w = torch.nn.Parameter(torch.tensor([1.0]))
    >>> opt = AggMo([w], lr=0.1, betas=(0.0, 0.9, 0.99))
    >>> for _ in range(2):
    ...     opt.zero_grad()
    ...     (w ** 2 / 2).sum().backward()  # g = w
    ...     opt.step()
    >>> # step 1: v = (1, 1, 1), w = 1 - 0.1·1 = 0.9
    >>> # step 2: g = 0.9, v = (0.9, 1.8, 1.89), w = 0.9 - 0.1·4.59/3 = 0.747
    >>> round(w.item(), 6)
    0.747
"""

from __future__ import annotations

import torch  # noqa: F401  (used by the doctest)
from pytorch_optimizer import AggMo

__all__ = ["AggMo"]
