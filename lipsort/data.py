"""Datasets as in-memory tensors: MNIST, Fashion-MNIST and CIFAR-10 through torchvision.

Where the data lives (:func:`data_root`): an explicit ``root`` argument, else the environment
variable ``LIPSORT_DATA``, else ``~/.cache/lipsort/data``. The root uses torchvision's layout
(``<root>/MNIST/raw/*.gz``, ``<root>/FashionMNIST/raw/*.gz``); torchvision checks the archives'
md5 sums, downloads what is missing (when allowed) and unpacks them.

A root may be read-only (a shared data folder): then its files are linked into a writable
mirror under :func:`cache_root` (``LIPSORT_CACHE``, else ``~/.cache/lipsort``) and unpacked
there, and the original folder is never written. A directory whose mode grants no write
permission counts as read-only even for a user (root) who could write there anyway.

Decoded images and labels are saved once as a ``.pt`` file next to the unpacked data
(``<root>/MNIST/lipsort/train.pt``, uint8), so a reload neither decodes nor imports
torchvision. The cache is rebuilt when the raw files it came from change, and a lock keeps
concurrent processes from unpacking or decoding the same files at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ._checks import check_int

__all__ = [
    "CACHE_ENV_VAR",
    "ENV_VAR",
    "DatasetNotFoundError",
    "SampleLoader",
    "TensorLoader",
    "cache_root",
    "cifar10",
    "data_root",
    "fashion_mnist",
    "loader",
    "mnist",
    "subset_per_class",
]

#: Environment variable naming the datasets root.
ENV_VAR = "LIPSORT_DATA"
#: Environment variable naming the writable cache (mirrors of read-only roots).
CACHE_ENV_VAR = "LIPSORT_CACHE"

_CACHE_VERSION = 1


class DatasetNotFoundError(FileNotFoundError):
    """The dataset files are missing (or corrupted) and could not be downloaded."""


@dataclass(frozen=True)
class _Spec:
    name: str  # as printed
    folder: str  # torchvision's class name, which is also its folder name
    n_train: int
    n_test: int

    def raw_names(self, train: bool) -> tuple[str, str]:
        prefix = "train" if train else "t10k"
        return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"

    def all_raw_names(self) -> tuple[str, ...]:
        return self.raw_names(True) + self.raw_names(False)


_MNIST = _Spec("MNIST", "MNIST", 60000, 10000)
_FASHION = _Spec("Fashion-MNIST", "FashionMNIST", 60000, 10000)


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The datasets root: ``root`` if given, else ``$LIPSORT_DATA``, else ``~/.cache/lipsort/data``.

    ``~`` is expanded; the folder need not exist yet.

    Example:
        >>> data_root("/tmp/somewhere")
        PosixPath('/tmp/somewhere')
    """
    if root is None:
        root = os.environ.get(ENV_VAR) or "~/.cache/lipsort/data"
    return Path(root).expanduser()


def cache_root() -> Path:
    """Writable cache for mirrors of read-only roots: ``$LIPSORT_CACHE``, else ``~/.cache/lipsort``.

    Example:
        >>> isinstance(cache_root(), Path)
        True
    """
    return Path(os.environ.get(CACHE_ENV_VAR) or "~/.cache/lipsort").expanduser()


def _writable(path: Path) -> bool:
    """Whether files can be created in ``path`` (or in its nearest existing ancestor).

    Root may write anywhere on a writable file system, so the mode bits are checked too: a
    folder marked read-only is treated as such.
    """
    path = path.absolute()
    while not path.exists():
        if path.parent == path:
            return False
        path = path.parent
    if not path.is_dir():
        return False
    return os.access(path, os.W_OK | os.X_OK) and bool(path.stat().st_mode & 0o222)


def _working_root(src: Path, folder: str) -> Path:
    """``src`` when its dataset folder is writable, else a mirror of it in :func:`cache_root`."""
    if _writable(src / folder) and _writable(src / folder / "raw"):
        return src
    resolved = src.resolve()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", str(resolved)).strip("-")[-40:] or "root"
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    return cache_root() / "mirrors" / f"{slug}-{digest}"


def _mirror(src_raw: Path, dst_raw: Path) -> None:
    """Link (or, where links are impossible, copy) the files of ``src_raw`` into ``dst_raw``."""
    if not src_raw.is_dir():
        return
    dst_raw.mkdir(parents=True, exist_ok=True)
    for f in sorted(src_raw.iterdir()):
        target = dst_raw / f.name
        if not f.is_file() or target.exists():
            continue
        if target.is_symlink():  # a dangling link left by a moved source
            target.unlink()
        try:
            target.symlink_to(f.resolve())
        except OSError:
            shutil.copy2(f, target)


def _fingerprint(files: list[Path]) -> list[list] | None:
    """Names, sizes and modification times of ``files``; ``None`` if one is missing."""
    out = []
    for f in files:
        try:
            st = f.stat()
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        out.append([f.name, st.st_size, st.st_mtime_ns])
    return out


def _not_found(
    spec: _Spec, train: bool, src: Path, work: Path, detail: str
) -> DatasetNotFoundError:
    env = os.environ.get(ENV_VAR)
    split = "train" if train else "test"
    where = f"{src / spec.folder / 'raw'}"
    if work != src:
        where += f" (read-only; mirrored into {work / spec.folder / 'raw'})"
    return DatasetNotFoundError(
        f"{spec.name} ({split} split) is not available: tried {where}. {detail}\n"
        f"To get it: run once with network access and download=True, or set the environment "
        f"variable {ENV_VAR} to a folder holding {spec.folder}/raw/*.gz in torchvision's "
        f"layout ({ENV_VAR} is currently {'unset' if env is None else repr(env)})."
    )


def _missing_archives(spec: _Spec, raw: Path) -> list[str]:
    """Archives still needed in ``raw``: none once every file is unpacked."""
    if all((raw / n).is_file() for n in spec.all_raw_names()):
        return []
    return [f"{n}.gz" for n in spec.all_raw_names() if not (raw / f"{n}.gz").is_file()]


def _decode(spec: _Spec, train: bool, src: Path, work: Path, download: bool):
    """The torchvision dataset read from ``work``, after verifying, downloading and unpacking
    whatever is missing there."""
    from ._torchvision import import_torchvision

    raw = work / spec.folder / "raw"
    missing = _missing_archives(spec, raw)
    if missing and not download:
        detail = f"Files missing: {', '.join(missing)}; downloading is disabled (download=False)."
        raise _not_found(spec, train, src, work, detail)
    datasets = import_torchvision().datasets
    cls = getattr(datasets, spec.folder)
    if all((raw / n).is_file() for n in spec.all_raw_names()):
        return cls(str(work), train=train, download=False)
    md5 = dict(cls.resources)
    corrupted = [
        f"{n}.gz"
        for n in spec.all_raw_names()
        if f"{n}.gz" not in missing
        and not datasets.utils.check_integrity(str(raw / f"{n}.gz"), md5[f"{n}.gz"])
    ]
    if corrupted and not download:
        bad = ", ".join(corrupted)
        detail = f"Files with a wrong md5 sum: {bad}; downloading is disabled (download=False)."
        raise _not_found(spec, train, src, work, detail)
    try:
        # With every archive present and verified, this only unpacks (no network).
        return cls(str(work), train=train, download=True)
    except Exception as err:
        if missing or corrupted:
            raise _not_found(spec, train, src, work, f"Downloading failed: {err}") from err
        raise


@contextlib.contextmanager
def _locked(folder: Path):
    """Hold an exclusive lock on ``folder`` so that concurrent processes (two notebooks, a
    notebook and the tests) never unpack or decode the same files at the same time."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no locking
        yield
        return
    with open(folder / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _save_atomic(payload: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)  # atomic: concurrent readers never see a partial file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read_cache(cache: Path, files: list[Path]) -> dict | None:
    """The cached tensors, if the cache exists and was built from ``files`` as they are now."""
    fingerprint = _fingerprint(files)
    if fingerprint is None or not cache.is_file():
        return None
    try:
        payload = torch.load(cache, weights_only=True)
    except Exception:  # noqa: BLE001 -- any damage (truncated, not a torch file...) means rebuild
        return None
    if (
        isinstance(payload, dict)
        and payload.get("version") == _CACHE_VERSION
        and payload.get("fingerprint") == fingerprint
    ):
        return payload
    return None


def _load(spec: _Spec, train: bool, root, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    src = data_root(root)
    work = _working_root(src, spec.folder)
    raw = work / spec.folder / "raw"
    cache = work / spec.folder / "lipsort" / f"{'train' if train else 'test'}.pt"
    files = [raw / n for n in spec.raw_names(train)]

    payload = _read_cache(cache, files)
    if payload is None:
        if work != src:
            _mirror(src / spec.folder / "raw", raw)
        missing = _missing_archives(spec, raw)
        if missing and not download:  # fail fast: no lock file, no torchvision import
            detail = (
                f"Files missing: {', '.join(missing)}; downloading is disabled (download=False)."
            )
            raise _not_found(spec, train, src, work, detail)
        with _locked(work / spec.folder):
            payload = _read_cache(cache, files)  # another process may have built it meanwhile
            if payload is None:
                ds = _decode(spec, train, src, work, download)
                payload = {
                    "version": _CACHE_VERSION,
                    "fingerprint": _fingerprint(files),
                    "images": ds.data.contiguous(),
                    "labels": ds.targets.to(torch.int64).contiguous(),
                }
                _save_atomic(payload, cache)
    images, labels = payload["images"], payload["labels"]
    expected = spec.n_train if train else spec.n_test
    if (
        images.shape != (expected, 28, 28)
        or labels.shape != (expected,)
        or images.dtype != torch.uint8
    ):
        raise RuntimeError(
            f"{spec.name} files under {raw} decode to images {tuple(images.shape)} "
            f"({images.dtype}) and labels {tuple(labels.shape)}; expected ({expected}, 28, 28) "
            f"uint8 and ({expected},)"
        )
    # Stored as uint8 (4x smaller on disk); scaled to [0, 1] floats here.
    return images.unsqueeze(1).to(torch.float32).div_(255.0), labels


def mnist(
    train: bool = True, root=None, download: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST as tensors: images ``(N, 1, 28, 28)`` float32 in [0, 1], labels ``(N,)`` int64.

    ``N`` is 60000 for ``train=True`` and 10000 for the test split. ``root`` defaults to
    :func:`data_root` (``$LIPSORT_DATA`` or ``~/.cache/lipsort/data``); with ``download=True``
    torchvision fetches missing files into it.

    Raises:
        DatasetNotFoundError: files missing or corrupted, and downloading disabled or failed.
            The message names the path tried and the ``LIPSORT_DATA`` variable.

    Example:
        >>> x, y = mnist(train=False)  # doctest: +SKIP
        >>> x.shape, x.dtype, y.dtype  # doctest: +SKIP
        (torch.Size([10000, 1, 28, 28]), torch.float32, torch.int64)
    """
    return _load(_MNIST, train, root, download)


def fashion_mnist(
    train: bool = True, root=None, download: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST as tensors, with the same shapes, types and root rules as :func:`mnist`.

    Example:
        >>> x, y = fashion_mnist(train=False)  # doctest: +SKIP
        >>> int(y.max()) + 1  # doctest: +SKIP
        10
    """
    return _load(_FASHION, train, root, download)


#: Where CIFAR-10 comes from (torchvision's ``cifar-10-batches-py`` unpacks from it).
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def cifar10(
    train: bool = True, root=None, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 as tensors: images ``(N, 3, 32, 32)`` float32 in [0, 1], labels ``(N,)`` int64.

    ``N`` is 50000 (``train=True``) or 10000. Read by torchvision (which checks the md5 sums)
    from ``<root>/cifar-10-batches-py/`` (``root`` as in :func:`mnist`). Not cached: the
    batches are already arrays.

    Raises:
        DatasetNotFoundError: torchvision is missing, or the folder is missing or corrupted
            and downloading is disabled or failed; the message names the folder tried and
            how to get the data.

    Example:
        >>> x, y = cifar10(train=False)  # doctest: +SKIP
        >>> x.shape, int(y.max()) + 1  # doctest: +SKIP
        (torch.Size([10000, 3, 32, 32]), 10)
    """
    src = data_root(root)
    folder = src / "cifar-10-batches-py"
    split = "train" if train else "test"
    env = os.environ.get(ENV_VAR)
    how = (
        f"To get it: download {CIFAR10_URL} and unpack it into {src} (which creates {folder}), "
        f"or run once with network access and download=True, or set {ENV_VAR} to a folder "
        f"holding cifar-10-batches-py ({ENV_VAR} is currently {'unset' if env is None else repr(env)})."
    )
    try:
        from ._torchvision import import_torchvision

        datasets = import_torchvision().datasets
    except ImportError as err:
        raise DatasetNotFoundError(f"CIFAR-10 needs torchvision, which is missing ({err}). {how}")
    try:
        ds = datasets.CIFAR10(str(src), train=train, download=download)
    except Exception as err:  # torchvision: RuntimeError (missing/corrupted), URLError, ...
        raise DatasetNotFoundError(
            f"CIFAR-10 ({split} split) is not available: tried {folder}. {err}\n{how}"
        ) from err
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    if images.dtype != torch.uint8 or images.shape[1:] != (3, 32, 32):
        raise RuntimeError(f"CIFAR-10 under {folder} decodes to {tuple(images.shape)} {images.dtype}")
    return images.to(torch.float32).div_(255.0), labels


def subset_per_class(
    x: torch.Tensor, y: torch.Tensor, n_per_class: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep ``n_per_class`` examples of every class, drawn at random without replacement.

    The draw depends only on ``y`` and ``seed`` (a private generator, not the global one), so
    the same call always returns the same examples; they come back in their original order.
    Chapter 05 (small-data generalization) trains on 100 MNIST images per class this way.

    Raises:
        ValueError: ``y`` not a 1-D integer tensor matching ``x``, or a class with fewer than
            ``n_per_class`` examples.

    Example:
        >>> y = torch.tensor([0, 1, 0, 1, 0, 2, 2, 1])
        >>> xs, ys = subset_per_class(torch.arange(8.0), y, 2, seed=0)
        >>> torch.bincount(ys).tolist()
        [2, 2, 2]
    """
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("x and y must be tensors")
    if y.dim() != 1 or y.is_floating_point() or y.is_complex():
        raise ValueError(
            "y must be a 1-D integer tensor of labels, "
            f"got shape {tuple(y.shape)} and dtype {y.dtype}"
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]} labels")
    n_per_class = check_int(n_per_class, "n_per_class")
    labels = y.detach().cpu()
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for c in torch.unique(labels).tolist():  # sorted, so the draw order is fixed
        idx = (labels == c).nonzero().flatten()
        if idx.numel() < n_per_class:
            raise ValueError(
                f"class {c} has only {idx.numel()} examples, fewer than n_per_class={n_per_class}"
            )
        chosen.append(idx[torch.randperm(idx.numel(), generator=gen)[:n_per_class]])
    keep = torch.cat(chosen).sort().values
    return x[keep.to(x.device)], y[keep.to(y.device)]


class TensorLoader:
    """Mini-batches of in-memory tensors, reshuffled every epoch by a private seeded generator.

    Faster than ``DataLoader(TensorDataset(...))`` (one indexing op per batch instead of one
    per example) and reproducible: the sequence of epochs depends only on ``seed``. With
    ``batches``, one pass yields exactly that many batches, running through as many reshuffled
    epochs as it takes and dropping the rest of the last one: a fixed number of optimizer steps
    as one :func:`lipsort.training.fit` epoch, whatever the data size.

    Example:
        >>> batches = TensorLoader((torch.arange(5), torch.arange(5) * 10), batch_size=2, seed=0)
        >>> len(batches), [tuple(b.shape) for b, _ in batches]
        (3, [(2,), (2,), (1,)])
        >>> steps = TensorLoader(torch.arange(5), batch_size=2, shuffle=False, batches=4)
        >>> len(steps), [b.tolist() for (b,) in steps]
        (4, [[0, 1], [2, 3], [4], [0, 1]])
    """

    def __init__(
        self,
        tensors,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        batches: int | None = None,
    ):
        tensors = tuple(tensors) if isinstance(tensors, (tuple, list)) else (tensors,)
        if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
            raise TypeError("tensors must be a tensor or a non-empty tuple of tensors")
        n = tensors[0].shape[0]
        if any(t.shape[0] != n for t in tensors):
            raise ValueError(
                f"all tensors need the same first dimension, got {[t.shape[0] for t in tensors]}"
            )
        batch_size = check_int(batch_size, "batch_size")
        self.tensors, self.n, self.batch_size = tensors, n, batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.batches = None if batches is None else check_int(batches, "batches")
        if self.batches is not None and self._per_epoch() == 0:
            raise ValueError(
                f"batches={batches} needs at least one batch per epoch, but {n} samples make "
                f"no full batch of {batch_size} with drop_last"
            )
        self._gen = torch.Generator().manual_seed(seed)

    def _per_epoch(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __len__(self) -> int:
        return self._per_epoch() if self.batches is None else self.batches

    def _epoch(self):
        order = (
            torch.randperm(self.n, generator=self._gen) if self.shuffle else torch.arange(self.n)
        )
        for b in range(self._per_epoch()):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield tuple(t[idx.to(t.device)] for t in self.tensors)

    def __iter__(self):
        if self.batches is None:
            yield from self._epoch()
            return
        left = self.batches
        while left:
            for batch in self._epoch():
                yield batch
                left -= 1
                if not left:
                    return


class SampleLoader:
    r"""``batches`` fresh batches per pass, each ``sample(generator)`` with a private seeded
    generator: training on a distribution rather than a fixed data set (new points every
    step), resumable like :class:`TensorLoader` (the generator is the whole state).

    Example:
        >>> draw = lambda g: (torch.randn(4, 2, generator=g), torch.zeros(4, dtype=torch.long))
        >>> steps = SampleLoader(draw, batches=3, seed=0)
        >>> len(steps), [tuple(x.shape) for x, _ in steps]
        (3, [(4, 2), (4, 2), (4, 2)])
        >>> first = next(iter(SampleLoader(draw, 3, seed=0)))[0]
        >>> bool(torch.equal(first, next(iter(SampleLoader(draw, 3, seed=0)))[0]))  # same seed
        True
        >>> bool(torch.equal(first, next(iter(steps))[0]))  # a later pass: new points
        False
    """

    def __init__(self, sample, batches: int, seed: int = 0):
        if not callable(sample):
            raise TypeError(f"sample must be a callable generator -> batch, got {type(sample).__name__}")
        self.sample, self.batches = sample, check_int(batches, "batches")
        self._gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        for _ in range(self.batches):
            batch = self.sample(self._gen)
            yield batch if isinstance(batch, tuple) else tuple(batch)


def loader(
    tensors, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False
) -> TensorLoader:
    """Shorthand for :class:`TensorLoader`: ``loader(mnist(), 128)`` yields ``(x, y)`` batches.

    Example:
        >>> x, y = torch.zeros(10, 1, 28, 28), torch.arange(10)
        >>> [len(b) for _, b in loader((x, y), batch_size=4, shuffle=False)]
        [4, 4, 2]
    """
    return TensorLoader(tensors, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
