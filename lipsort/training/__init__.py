"""The one training engine of the book: :func:`fit` (epochs, the papers' schedules, evaluation,
atomic checkpoints, exact resume, data parallelism under ``torchrun``).

* :mod:`~lipsort.training.engine`: :func:`fit`, :func:`evaluate`, :class:`FitResult`.
* :mod:`~lipsort.training.schedules`: :class:`Schedule` and the papers' schedules.
* :mod:`~lipsort.training.checkpoint`: checkpoints that load with ``weights_only=True`` and
  carry every random generator's state; :class:`CheckpointError` names the file on failure.
* :mod:`~lipsort.training.parallel`: process groups and batch sharding for ``torchrun``.

Example:
    >>> from lipsort.training import ANIL_SCHEDULE
    >>> [ANIL_SCHEDULE.factor(e) for e in (0, 60, 100, 150)]
    [1.0, 0.1, 0.010000000000000002, 0.0010000000000000002]
"""

from .checkpoint import CheckpointError, load_checkpoint
from .engine import FitResult, evaluate, fit
from .parallel import init_distributed, shard
from .schedules import ANIL_SCHEDULE, BCOP_SCHEDULE, Schedule

__all__ = [
    "fit",
    "evaluate",
    "FitResult",
    "Schedule",
    "ANIL_SCHEDULE",
    "BCOP_SCHEDULE",
    "CheckpointError",
    "load_checkpoint",
    "init_distributed",
    "shard",
]
