"""Training checkpoints: atomic writes, validated reads, and the state of every random generator.

A checkpoint is a plain dictionary of tensors and Python scalars, lists, tuples and dicts, so it
loads with ``torch.load(path, weights_only=True)`` (no pickled code runs). It is written to a
temporary file in the same folder, flushed to disk and renamed over the old one
(``os.replace`` is atomic), so an interruption at any moment leaves either the previous
checkpoint or the new one, never a partial file.

:func:`load_checkpoint` refuses anything that is not a complete checkpoint of this format —
a truncated or damaged file, another program's file, a newer version — with a
:class:`CheckpointError` naming the file, so a run never silently restarts from scratch.

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.pt"
    >>> save_atomic(new_checkpoint(epoch=3, model={"w": torch.ones(2)}), path)
    >>> load_checkpoint(path)["epoch"]
    3
    >>> _ = path.write_bytes(path.read_bytes()[:100])  # truncate it
    >>> load_checkpoint(path)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lipsort.training.checkpoint.CheckpointError: cannot read checkpoint .../run.pt: ...
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "FORMAT",
    "VERSION",
    "CheckpointError",
    "get_rng_state",
    "load_checkpoint",
    "loader_state",
    "load_run",
    "state_digest",
    "new_checkpoint",
    "run_path",
    "save_atomic",
    "save_json_atomic",
    "set_loader_state",
    "set_rng_state",
]

#: Value of the ``"format"`` key that marks a lipsort training checkpoint.
FORMAT = "lipsort.training.checkpoint"
#: Layout version; a checkpoint of another version is refused rather than misread.
VERSION = 1
_REQUIRED = ("epoch", "model", "optimizer", "scheduler", "history", "rng", "config")


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used: unreadable, foreign, or from another run."""


def run_path(directory: str | os.PathLike | None, name: str, **settings) -> Path | None:
    """``<directory>/<name>-<key>.pt``, ``key`` a hash of ``settings`` (the run's data, sizes,
    epochs, seed, ...), so a run changed in any of them writes another checkpoint instead of
    resuming a foreign one; ``None`` (no checkpoint) when ``directory`` is empty or ``None``.

    Example:
        >>> a = run_path("/tmp/ck", "b4-mnist-tau4", epochs=20, widths=[1024, 512])
        >>> a == run_path("/tmp/ck", "b4-mnist-tau4", widths=[1024, 512], epochs=20), a.suffix
        (True, '.pt')
        >>> a == run_path("/tmp/ck", "b4-mnist-tau4", epochs=2, widths=[1024, 512])
        False
        >>> run_path("", "b4") is None
        True
    """
    if not directory:
        return None
    key = json.dumps(settings, sort_keys=True, default=repr)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(directory).expanduser() / f"{name}-{digest}.pt"


def load_run(path: str | os.PathLike | None, config: dict, what: str, steps: int | None = None) -> dict | None:
    """The checkpoint at ``path`` to resume a run with settings ``config``, or ``None`` when there
    is none yet (or ``path`` is ``None``): for training loops that keep their own state.

    Raises :class:`CheckpointError` (naming the file) when it is unreadable, holds a run with other
    settings (``what`` names the kind of run in the message), or is further than ``steps``.
    """
    if path is None or not Path(path).is_file():
        return None
    state = load_checkpoint(path)
    if state["config"] != config:
        raise CheckpointError(f"{path} is a checkpoint of another {what} run ({state['config']}, not {config})")
    if steps is not None and state["epoch"] > steps:
        raise CheckpointError(f"{path} holds {state['epoch']} steps, more than the {steps} asked for")
    return state


def warn_if_changed(path, what: str, saved, now, stacklevel: int = 3) -> None:
    """Warn that resuming ``path`` with ``now`` ``what`` (e.g. torch threads) instead of the
    ``saved`` count goes on, but no longer bit for bit as the uninterrupted run: such counts do not
    name a run, yet the bits of every reduction depend on them. ``saved`` is ``None`` for a
    checkpoint that did not record it.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as w:
        ...     warnings.simplefilter("always")
        ...     warn_if_changed("run.pt", "torch threads", 1, 1)
        ...     warn_if_changed("run.pt", "torch threads", None, 2)
        >>> [str(x.message)[:60] for x in w]
        ['resuming run.pt with 2 torch threads instead of an unrecorde']
    """
    if saved != now:
        warnings.warn(
            f"resuming {path} with {now} {what} instead of "
            f"{saved if saved is not None else 'an unrecorded count'}: the run continues, but is no "
            "longer bit-for-bit the uninterrupted one",
            stacklevel=stacklevel,
        )


def state_digest(state: dict) -> str:
    """12 hex digits of a hash of ``state``'s keys and values (tensors by name, shape, dtype and
    bytes; anything else by ``repr``), to name checkpoints of runs that depend on data or on a
    trained network (a critic of a given generator's samples).

    Example:
        >>> a = {"x": torch.ones(2), "name": "cones"}
        >>> state_digest(a) == state_digest(dict(a)), state_digest(a) == state_digest({**a, "x": torch.zeros(2)})
        (True, False)
    """
    h = hashlib.sha256()
    for name, value in sorted(state.items()):
        if isinstance(value, torch.Tensor):
            h.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
            flat = value.detach().cpu().reshape(-1).contiguous()  # 1-D: a 0-d tensor cannot be viewed as bytes
            h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
        else:
            h.update(f"{name}={value!r}".encode())
    return h.hexdigest()[:12]


def _write_atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())  # on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_atomic(payload: dict, path: str | os.PathLike) -> None:
    """``torch.save(payload, path)`` through a temporary file and ``os.replace``."""
    _write_atomic(Path(path), lambda fh: torch.save(payload, fh))


def save_json_atomic(payload, path: str | os.PathLike) -> None:
    """Write ``payload`` as indented JSON, atomically (for histories read by people and plots)."""
    text = json.dumps(payload, indent=1, allow_nan=True) + "\n"
    _write_atomic(Path(path), lambda fh: fh.write(text.encode()))


def new_checkpoint(**fields) -> dict:
    """A checkpoint dictionary: the format marker, the version, and ``fields``.

    Missing required fields (``epoch, model, optimizer, scheduler, history, rng, config``)
    default to empty values, so tests and tools can build minimal valid checkpoints.
    """
    payload = {"format": FORMAT, "version": VERSION}
    payload.update({k: {} for k in _REQUIRED if k != "epoch"})
    payload["epoch"] = 0
    payload.update(fields)
    return payload


def _describe(obj) -> str:
    if isinstance(obj, dict):
        keys = sorted(map(str, obj))
        return f"a dict with keys {keys[:8]}{' ...' if len(keys) > 8 else ''}"
    return f"a {type(obj).__name__}"


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read and validate a checkpoint written by :func:`save_atomic` (CPU tensors).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file cannot be read with ``weights_only=True`` (truncated,
            damaged, not a torch file, or holding pickled objects), is not a lipsort training
            checkpoint, has another version, or lacks a required field. The message names
            the file and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # every failure is reported with the file name
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(err).__name__}: {err}. The file is "
            "truncated, damaged, not a torch file, or holds objects other than tensors and "
            "plain Python values. Delete it to train from scratch, or pass another path."
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a lipsort training checkpoint: it holds {_describe(payload)}, "
            f"without the marker format={FORMAT!r}. Pass another path or delete the file."
        )
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path} has version {payload.get('version')!r}; this lipsort reads "
            f"version {VERSION}"
        )
    missing = [k for k in _REQUIRED if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks the fields {missing}")
    if isinstance(payload["epoch"], bool) or not isinstance(payload["epoch"], int):
        raise CheckpointError(f"checkpoint {path} has a non-integer epoch {payload['epoch']!r}")
    return payload


# --------------------------------------------------------------------------- generators


def get_rng_state() -> dict:
    """The states of torch's CPU (and, if initialized, CUDA) generators, NumPy's and Python's.

    Stored as tensors and plain values (``weights_only``-loadable); :func:`set_rng_state`
    restores them so the rest of a run draws the same numbers.
    """
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "internal": torch.tensor(internal), "gauss": gauss},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the generators saved by :func:`get_rng_state`."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["name"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            raise CheckpointError(
                f"the checkpoint holds the generators of {len(state['cuda'])} GPUs but "
                f"{torch.cuda.device_count()} are visible"
            )
        torch.cuda.set_rng_state_all(state["cuda"])


def _generator(loader) -> torch.Generator | None:
    # lipsort.data.TensorLoader keeps its shuffling generator private; torch's DataLoader
    # exposes the one it was given (None: it draws from the global generator, saved anyway).
    for name in ("_gen", "generator"):
        gen = getattr(loader, name, None)
        if isinstance(gen, torch.Generator):
            return gen
    return None


def loader_state(loader):
    """The shuffling state of a data loader: its ``state_dict()`` if it has one, else the state
    of its ``torch.Generator`` (TensorLoader, DataLoader(generator=...)), else ``None`` (it
    uses the global generator, which :func:`get_rng_state` covers)."""
    if callable(getattr(loader, "state_dict", None)):
        return loader.state_dict()
    gen = _generator(loader)
    return None if gen is None else {"generator": gen.get_state()}


def set_loader_state(loader, state) -> None:
    """Restore what :func:`loader_state` returned."""
    if state is None:
        return
    if callable(getattr(loader, "load_state_dict", None)):
        loader.load_state_dict(state)
        return
    gen = _generator(loader)
    if gen is None or "generator" not in state:
        raise CheckpointError(
            f"the checkpoint holds a shuffling state, but the loader {type(loader).__name__} "
            "has no generator to restore it into"
        )
    gen.set_state(state["generator"])
