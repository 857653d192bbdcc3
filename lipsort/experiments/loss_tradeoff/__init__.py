"""Book glue for chapter 07 (Béthune et al. 2022: the loss decides the accuracy–robustness trade-off).

* :mod:`.theory`: the 1-Lipschitz optimum of B2, τ-CE limits, the W1 ceiling of mean certifiable
  robustness, the logistic two-point example.
* :mod:`.toys`: B2 (1-D temperature sweep) and B3 (two moons).
* :mod:`.images`: B4–B7 on MNIST and Fashion-MNIST (training loop, Pareto sweep, generalization
  gap, random labels, weight-norm growth) and the paper's CIFAR-10 front.
"""

from . import images, theory, toys

__all__ = ["theory", "toys", "images"]
