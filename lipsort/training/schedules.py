r"""Learning-rate schedules of the papers, as pure functions of the epoch (or of the step).

A :class:`Schedule` is a frozen description (so a checkpoint can tell whether it was written
under the same one); calling it on an optimizer builds the torch scheduler that implements
it, which :func:`lipsort.training.fit` steps once per epoch (once per optimizer step for the
per-step kinds, :attr:`Schedule.per_step`) and saves in its checkpoints.

Example:
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    >>> sched = ANIL_SCHEDULE(opt)
    >>> lrs = []
    >>> for _ in range(101):
    ...     lrs.append(opt.param_groups[0]["lr"]); opt.step(); sched.step()
    >>> lrs[59], lrs[60], round(lrs[100], 12)
    (1.0, 0.1, 0.01)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .._checks import check_int

__all__ = ["ANIL_SCHEDULE", "BCOP_SCHEDULE", "Schedule", "schedule_id"]


@dataclass(frozen=True)
class Schedule:
    r"""A learning rate that depends only on the epoch: :math:`\eta_e = \eta_0 \cdot f(e)`.

    With epochs counted from 0 and ``γ`` the decay factor:

    * ``constant``: :math:`f(e) = 1`;
    * ``multistep``: :math:`f(e) = \gamma^{\#\{m \in \text{milestones} : m \le e\}}`;
    * ``step``: :math:`f(e) = \gamma^{\lfloor e / n \rfloor}`;
    * ``exponential``: :math:`f(e) = \gamma^e`;
    * ``cosine`` (per *step* ``t``, Keras' ``CosineDecay`` as Béthune et al. use it):
      :math:`f(t) = \alpha + (1 - \alpha)\,\tfrac12\bigl(1 + \cos(\pi \min(t, T) / T)\bigr)`,
      from 1 down to ``α`` at step ``T = total`` and constant after.

    Calling it on an optimizer returns the torch scheduler that implements it
    (``MultiStepLR``, ``StepLR``, ``ExponentialLR``, ``LambdaLR``), stepped once per epoch by
    :func:`lipsort.training.fit`, or once per optimizer step if :attr:`per_step`.

    Example:
        >>> s = Schedule.multistep([60, 100, 150], 0.1)  # Anil et al. (2019)
        >>> [s.factor(e) for e in (0, 59, 60, 100, 199)]  # doctest: +ELLIPSIS
        [1.0, 1.0, 0.1, 0.01..., 0.001...]
    """

    kind: str = "constant"
    gamma: float = 1.0
    milestones: tuple[int, ...] = ()
    step_size: int = 0
    total: int = 0
    alpha: float = 0.0

    def __post_init__(self):
        if self.kind not in ("constant", "multistep", "step", "exponential", "cosine"):
            raise ValueError(f"unknown schedule kind {self.kind!r}")
        if self.kind == "cosine":
            object.__setattr__(self, "total", check_int(self.total, "total (optimizer steps)"))
            if not (isinstance(self.alpha, (int, float)) and 0 <= self.alpha <= 1):
                raise ValueError(f"alpha must be a number in [0, 1], got {self.alpha!r}")
        if not (
            isinstance(self.gamma, (int, float)) and 0 < self.gamma and math.isfinite(self.gamma)
        ):
            raise ValueError(f"gamma must be a positive finite number, got {self.gamma!r}")
        ms = tuple(self.milestones)
        if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in ms) or list(
            ms
        ) != sorted(set(ms)):
            raise ValueError(
                f"milestones must be increasing positive integers, got {self.milestones!r}"
            )
        object.__setattr__(self, "milestones", ms)
        if self.kind == "step" and (
            isinstance(self.step_size, bool)
            or not isinstance(self.step_size, int)
            or self.step_size < 1
        ):
            raise ValueError(f"step_size must be a positive integer, got {self.step_size!r}")

    @classmethod
    def constant(cls) -> Schedule:
        return cls("constant")

    @classmethod
    def multistep(cls, milestones: Sequence[int], gamma: float = 0.1) -> Schedule:
        """×``gamma`` at each milestone epoch (torch's ``MultiStepLR``)."""
        return cls("multistep", float(gamma), tuple(milestones))

    @classmethod
    def step_every(cls, n: int, gamma: float = 0.1) -> Schedule:
        """×``gamma`` every ``n`` epochs (torch's ``StepLR``)."""
        return cls("step", float(gamma), (), n)

    @classmethod
    def exponential(cls, gamma: float) -> Schedule:
        """×``gamma`` after every epoch (torch's ``ExponentialLR``)."""
        return cls("exponential", float(gamma))

    @classmethod
    def cosine(cls, total: int, alpha: float = 0.0) -> Schedule:
        """Cosine decay over ``total`` optimizer steps down to ``alpha`` times the initial rate
        (Keras' ``CosineDecay(initial, total, alpha)``); a per-step schedule."""
        return cls("cosine", total=total, alpha=float(alpha))

    @property
    def per_step(self) -> bool:
        """Whether the schedule counts optimizer steps rather than epochs."""
        return self.kind == "cosine"

    def factor(self, epoch: int) -> float:
        """The multiplier of the initial learning rate during ``epoch`` (0-based; the step for
        a per-step schedule)."""
        if self.kind == "cosine":
            t = min(epoch, self.total)
            return self.alpha + (1 - self.alpha) * 0.5 * (1 + math.cos(math.pi * t / self.total))
        if self.kind == "multistep":
            return self.gamma ** sum(m <= epoch for m in self.milestones)
        if self.kind == "step":
            return self.gamma ** (epoch // self.step_size)
        if self.kind == "exponential":
            return self.gamma**epoch
        return 1.0

    def __call__(self, optimizer: torch.optim.Optimizer):
        sched = torch.optim.lr_scheduler
        if self.kind == "step":
            return sched.StepLR(optimizer, self.step_size, self.gamma)
        if self.kind == "exponential":
            return sched.ExponentialLR(optimizer, self.gamma)
        if self.kind == "cosine":
            return sched.LambdaLR(optimizer, self.factor)
        return sched.MultiStepLR(optimizer, list(self.milestones), self.gamma)


#: Anil et al. (2019), A6–A9: ×0.1 at epochs 60, 100 and 150 (200 epochs).
ANIL_SCHEDULE = Schedule.multistep((60, 100, 150), 0.1)
#: Li et al. (2019, BCOP) as their code does it: ×0.96235062639 every epoch, i.e. ×0.1 per 60
#: epochs, smoothly. ``Schedule.step_every(60, 0.1)`` is the staircase reading.
BCOP_SCHEDULE = Schedule.exponential(0.96235062639)


def schedule_id(schedule) -> object:
    """A plain description of a schedule (or factory) that checkpoints store and compare."""
    if schedule is None:
        return None
    if isinstance(schedule, Schedule):
        desc = {
            "kind": schedule.kind,
            "gamma": schedule.gamma,
            "milestones": list(schedule.milestones),
            "step_size": schedule.step_size,
        }
        if schedule.kind == "cosine":  # only then, so older checkpoints still match
            desc.update(total=schedule.total, alpha=schedule.alpha)
        return desc
    return getattr(schedule, "__qualname__", type(schedule).__qualname__)
