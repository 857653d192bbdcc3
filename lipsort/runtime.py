"""Reproducibility: one call seeds every generator, makes algorithms deterministic and fixes
the thread count (CPU results are bit-for-bit reproducible only at a fixed thread count)."""

from __future__ import annotations

import contextlib
import os
import platform
import random
from pathlib import Path

import numpy as np
import torch

from ._checks import check_int

__all__ = ["seed_everything", "setup", "num_threads", "default_threads", "cpu_name", "DEFAULT_THREADS"]

#: Torch CPU threads of a run when ``OMP_NUM_THREADS`` is not set (the count the goldens use).
DEFAULT_THREADS = 2


def default_threads() -> int:
    """``OMP_NUM_THREADS`` when it is set (the user's choice wins), else :data:`DEFAULT_THREADS`.

    Example:
        >>> saved = os.environ.pop("OMP_NUM_THREADS", None)
        >>> default_threads()
        2
        >>> os.environ["OMP_NUM_THREADS"] = "1"; default_threads()
        1
        >>> _ = os.environ.pop("OMP_NUM_THREADS") if saved is None else os.environ.update(OMP_NUM_THREADS=saved)
    """
    raw = os.environ.get("OMP_NUM_THREADS", "").strip()
    if not raw:
        return DEFAULT_THREADS
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"OMP_NUM_THREADS must be a positive integer, got {raw!r}")
    return int(raw)


def seed_everything(
    seed: int = 0, threads: int | None | str = "env", flush_denormal: bool = True
) -> None:
    """Seed Python, NumPy and torch, enable deterministic algorithms, flush subnormal floats to
    zero on the CPU (``flush_denormal``), fix the thread count (``threads="env"``:
    :func:`default_threads`; ``None``: leave it as is).

    The flush is a per-thread flag: it reaches the calling thread and the worker threads torch
    starts afterwards, so call this before any parallel torch work.

    Example:
        >>> seed_everything(3); a = torch.rand(2)
        >>> seed_everything(3); bool((a == torch.rand(2)).all())
        True
    """
    seed = check_int(seed, "seed", 0)
    # cuBLAS needs this before its first use to be deterministic.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    # Adam's moments of units that stopped receiving gradient decay geometrically into the
    # subnormal range (below 1.2e-38), where x86 arithmetic is many times slower: with 30% of
    # them subnormal after 200 epochs, an Adam step of a 784-1024³-10 ReLU net took 34 ms
    # instead of 13 (2 threads) and its epochs grew from 7 s to 24 s. The flush changes the
    # arithmetic only there: a run stays reproducible, not bit-identical to one without it.
    torch.set_flush_denormal(flush_denormal)
    if threads == "env":
        threads = default_threads()
    if threads is not None:
        torch.set_num_threads(check_int(threads, "threads"))


def setup(seed: int = 0, device: str | torch.device = "cpu", threads: int | None | str = "env",
          flush_denormal: bool = True) -> torch.device:
    """Prepare a reproducible run and return the torch device to use.

    ``device`` is ``"cpu"``, ``"cuda"`` (an error if no GPU is visible) or ``"auto"``;
    ``threads`` and ``flush_denormal`` as in :func:`seed_everything` (threads:
    ``OMP_NUM_THREADS`` if set, else 2).

    Example:
        >>> setup(0, "cpu")
        device(type='cpu')
    """
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was requested but torch sees no GPU; use device='cpu' or 'auto'")
    seed_everything(seed, threads, flush_denormal)
    return device


@contextlib.contextmanager
def num_threads(n: int | None):
    """Run the block with ``n`` torch CPU threads (``None``: leave the setting as is), then restore it.

    Small matrices gain nothing from a second thread, and a fixed count keeps a CPU run
    bit-for-bit reproducible whatever the caller's setting.

    Example:
        >>> with num_threads(1):
        ...     torch.get_num_threads()
        1
    """
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(check_int(n, "threads"))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`): results are
    bit-for-bit reproducible only on one model (and thread count), so runs record it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
