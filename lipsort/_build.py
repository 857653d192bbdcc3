"""Compile native code once per machine and cache the library (:mod:`lipsort._native`,
:mod:`lipsort._native_op`).

A library lives in ``$LIPSORT_CACHE/native`` (default ``~/.cache/lipsort/native``), named by a
hash of its source and of everything that changes the binary (compiler, flags, CPU, torch), so
an upgrade builds a new file beside the old one and concurrent processes never see half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

from .data import cache_root
from .runtime import cpu_name

__all__ = ["Native", "compiler", "cpu_key", "load_cached", "torch_gomp"]


def compiler(env: str, default: str, what: str) -> tuple[list[str], str]:
    """The command of ``$env`` (else ``default``) with the program's full path, and its
    ``--version`` text; raises OSError naming ``what`` was looked for when there is none."""
    cmd = shlex.split(os.environ.get(env) or default)
    exe = shutil.which(cmd[0]) if cmd else None
    if exe is None:
        raise OSError(f"no {what} found (tried {os.environ.get(env) or default!r}; set ${env})")
    version = subprocess.run([exe, *cmd[1:], "--version"], capture_output=True, text=True).stdout
    return [exe, *cmd[1:]], version


def cpu_key() -> str:
    """The CPU model and its feature flags (``-march=native`` code runs only where both match)."""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{cpu_name()}\n{flags}"


def torch_gomp() -> bool:
    """Whether this process runs GNU OpenMP under the soname ``libgomp.so.1`` (torch's Linux
    wheels), which a gcc-built ``-fopenmp`` library then shares instead of loading a second
    OpenMP runtime beside torch's (two runtimes can abort or oversubscribe the cores)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return any(line.endswith("/libgomp.so.1") for line in maps.splitlines())


def load_cached(filename: str, key: list[str], source: str, compile: Callable, load: Callable):
    """``load(path)`` of the library that ``compile(src, out)`` builds from ``source`` (written
    to ``filename``), cached as ``<stem>-<hash of source and key>.so``; a cached file that fails
    to load (truncated, foreign) is built again, once. Raises OSError with the reason."""
    digest = hashlib.sha256("\0".join([source, *key]).encode()).hexdigest()[:16]
    target = cache_root() / "native" / f"{Path(filename).stem}-{digest}.so"
    for attempt in range(2):
        if not target.exists():
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                src, out = Path(tmp) / filename, Path(tmp) / target.name
                src.write_text(source)
                compile(src, out)
                os.replace(out, target)  # atomic: a concurrent process loads a whole file or builds its own
        try:
            return load(target)
        except (OSError, AttributeError) as err:
            if attempt:
                raise OSError(f"cannot load {target}: {err}") from err
            target.unlink(missing_ok=True)
    raise AssertionError("unreachable")


class Native:
    """A natively built library: ``get()`` is ``build()``'s result, computed on first use (once
    per process, under a lock), or None where it is switched off (``enabled``, :meth:`disabled`)
    or where ``build`` raised (said once, as a warning starting with ``fallback``)."""

    def __init__(self, build: Callable, fallback: str, enabled: bool = True):
        self.build, self.fallback, self.enabled = build, fallback, enabled
        self._value, self._lock = self, threading.Lock()

    def get(self):
        if not self.enabled:
            return None
        if self._value is self:
            with self._lock:
                if self._value is self:
                    try:
                        value = self.build()
                    except Exception as err:  # noqa: BLE001 -- any failure means the fallback, said once
                        self._value = None  # before warning: under -W error the warning raises
                        warnings.warn(f"{self.fallback}: {err}", RuntimeWarning, stacklevel=4)
                        return None
                    self._value = value
        return self._value

    @contextlib.contextmanager
    def disabled(self):
        """Switched off inside the block."""
        enabled, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = enabled
