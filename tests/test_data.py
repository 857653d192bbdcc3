"""Datasets: shapes, types, published label counts and pixel statistics, read-only roots,
the decode cache, clear errors for missing data, and deterministic per-class subsets.

Tests that need the archives read the datasets root from ``LIPSORT_DATA`` (the Makefile and CI
set it) and are skipped when it is unset.
"""

import os
import shutil
from pathlib import Path

import pytest
import torch

from lipsort import data

ROOT = os.environ.get(data.ENV_VAR)
needs_data = pytest.mark.skipif(
    not ROOT,
    reason=f"{data.ENV_VAR} is not set: point it at a folder holding MNIST/raw/*.gz and "
    "FashionMNIST/raw/*.gz (torchvision's layout) to run the dataset tests",
)

# Published class frequencies of the two datasets.
MNIST_COUNTS = {
    True: [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
    False: [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
}
FASHION_COUNTS = {True: [6000] * 10, False: [1000] * 10}


@pytest.fixture(scope="module")
def mnist_sets():
    return {train: data.mnist(train=train, download=False) for train in (True, False)}


@pytest.fixture(scope="module")
def fashion_sets():
    return {train: data.fashion_mnist(train=train, download=False) for train in (True, False)}


def _check_split(x, y, counts):
    n = sum(counts)
    assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    # Pixels are bytes scaled by 1/255.
    assert torch.equal((x[:1000] * 255).round() / 255, x[:1000])
    assert torch.bincount(y, minlength=10).tolist() == counts


def _copy_mnist_archives(root: Path) -> Path:
    """Copy the MNIST archives of the data root into ``root`` (a writable, fresh root)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in sorted((Path(ROOT) / "MNIST" / "raw").glob("*.gz")):
        shutil.copyfile(f, raw / f.name)
    return raw


@needs_data
@pytest.mark.parametrize("train", [True, False])
def test_mnist_splits(mnist_sets, train):
    x, y = mnist_sets[train]
    _check_split(x, y, MNIST_COUNTS[train])


@needs_data
def test_mnist_pixel_statistics(mnist_sets):
    # The normalization constants everybody uses for MNIST: mean 0.1307, std 0.3081.
    x, _ = mnist_sets[True]
    assert abs(float(x.mean()) - 0.1307) < 1e-4
    assert abs(float(x.std()) - 0.3081) < 1e-4


@needs_data
@pytest.mark.parametrize("train", [True, False])
def test_fashion_mnist_splits(fashion_sets, train, mnist_sets):
    x, y = fashion_sets[train]
    _check_split(x, y, FASHION_COUNTS[train])
    assert abs(float(fashion_sets[True][0].mean()) - 0.2860) < 1e-4
    assert not torch.equal(x[:100], mnist_sets[train][0][:100])


@needs_data
def test_read_only_root_is_mirrored_and_left_untouched(tmp_path, monkeypatch, mnist_sets):
    src = tmp_path / "ro"
    raw = src / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in sorted((Path(ROOT) / "MNIST" / "raw").glob("*.gz")):
        shutil.copyfile(f, raw / f.name)
        (raw / f.name).chmod(0o444)
    for d in (raw, raw.parent, src):
        d.chmod(0o555)
    before = sorted(str(p.relative_to(src)) for p in src.rglob("*"))
    monkeypatch.setenv(data.CACHE_ENV_VAR, str(tmp_path / "cache"))
    try:
        x, y = data.mnist(train=False, root=src, download=False)
        after = sorted(str(p.relative_to(src)) for p in src.rglob("*"))
        assert after == before  # nothing written into the read-only root (even as root)
        mirrors = list((tmp_path / "cache" / "mirrors").iterdir())
        assert len(mirrors) == 1
        cache_file = mirrors[0] / "MNIST" / "lipsort" / "test.pt"
        assert cache_file.is_file()
        assert torch.equal(x, mnist_sets[False][0]) and torch.equal(y, mnist_sets[False][1])

        # A damaged cache file is rebuilt, never trusted.
        cache_file.write_bytes(b"not a torch file")
        x2, y2 = data.mnist(train=False, root=src, download=False)
        assert torch.equal(x2, x) and torch.equal(y2, y)
        assert torch.load(cache_file, weights_only=True)["images"].dtype == torch.uint8
    finally:
        for d in (src, raw.parent, raw):
            d.chmod(0o755)


@needs_data
def test_cache_is_rebuilt_when_the_raw_file_changes(tmp_path, mnist_sets):
    raw = _copy_mnist_archives(tmp_path)
    _, y = data.mnist(train=False, root=tmp_path)  # writable root: unpacked and cached in place
    assert (tmp_path / "MNIST" / "lipsort" / "test.pt").is_file()
    labels = raw / "t10k-labels-idx1-ubyte"
    content = bytearray(labels.read_bytes())
    content[8] = (content[8] + 1) % 10  # the first label (idx1 files have an 8-byte header)
    labels.write_bytes(bytes(content))
    _, y2 = data.mnist(train=False, root=tmp_path)
    assert int(y2[0]) == (int(y[0]) + 1) % 10 and torch.equal(y2[1:], y[1:])


def test_missing_data_raises_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.mnist(root=tmp_path, download=False)
    msg = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in msg
    assert data.ENV_VAR in msg and "download=False" in msg and "train-images-idx3-ubyte.gz" in msg
    assert list(tmp_path.iterdir()) == []  # no side effect
    assert isinstance(info.value, FileNotFoundError)

    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    with pytest.raises(data.DatasetNotFoundError, match="FashionMNIST/raw"):
        data.fashion_mnist(train=False, download=False)


def test_corrupted_archives_are_reported(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (raw / f"{name}.gz").write_bytes(b"garbage")
    with pytest.raises(data.DatasetNotFoundError, match="md5"):
        data.mnist(root=tmp_path, download=False)


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "env"))
    assert data.data_root() == tmp_path / "env"
    assert data.data_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv(data.ENV_VAR)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.data_root() == tmp_path / "home" / ".cache" / "lipsort" / "data"


@needs_data
def test_subset_per_class_on_mnist(mnist_sets):
    x, y = mnist_sets[True]
    xs, ys = data.subset_per_class(x, y, 100, seed=0)
    assert xs.shape == (1000, 1, 28, 28)
    assert torch.bincount(ys).tolist() == [100] * 10
    torch.manual_seed(123)  # the global generator plays no role
    xs2, ys2 = data.subset_per_class(x, y, 100, seed=0)
    assert torch.equal(xs, xs2) and torch.equal(ys, ys2)
    xs3, _ = data.subset_per_class(x, y, 100, seed=1)
    assert not torch.equal(xs, xs3)


def test_subset_per_class_draw():
    y = torch.arange(30) % 3
    x = torch.arange(30.0)
    xs, ys = data.subset_per_class(x, y, 4, seed=5)
    assert torch.bincount(ys).tolist() == [4, 4, 4]
    assert torch.equal(ys, y[xs.long()])  # pairs stay aligned
    assert torch.equal(xs, xs.sort().values)  # original order kept
    assert len(set(xs.tolist())) == 12  # without replacement
    draws = {tuple(data.subset_per_class(x, y, 4, seed=s)[0].tolist()) for s in range(5)}
    assert len(draws) > 1


def test_subset_per_class_errors():
    y = torch.tensor([0, 0, 1])
    with pytest.raises(ValueError, match="class 1 has only 1"):
        data.subset_per_class(torch.zeros(3), y, 2)
    with pytest.raises(ValueError, match="n_per_class"):
        data.subset_per_class(torch.zeros(3), y, 0)
    with pytest.raises(ValueError, match="integer tensor"):
        data.subset_per_class(torch.zeros(3), y.float(), 1)
    with pytest.raises(ValueError, match="3 examples but y has 2"):
        data.subset_per_class(torch.zeros(3), y[:2], 1)


def test_loader_epochs_are_permutations_and_reproducible():
    x, y = torch.arange(10.0), torch.arange(10)
    a = data.loader((x, y), batch_size=4, seed=0)
    assert len(a) == 3
    epoch1 = [b for b in a]
    epoch2 = [b for b in a]
    for epoch in (epoch1, epoch2):
        xs = torch.cat([bx for bx, _ in epoch])
        ys = torch.cat([by for _, by in epoch])
        assert sorted(xs.tolist()) == list(range(10)) and torch.equal(xs.long(), ys)
    assert not torch.equal(torch.cat([b[0] for b in epoch1]), torch.cat([b[0] for b in epoch2]))
    again = data.loader((x, y), batch_size=4, seed=0)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(epoch1, again))
    assert len(data.loader((x, y), batch_size=4, drop_last=True)) == 2
    ordered = torch.cat([b for b, _ in data.loader((x, y), batch_size=3, shuffle=False)])
    assert torch.equal(ordered, x)
    with pytest.raises(ValueError, match="same first dimension"):
        data.loader((x, y[:5]), batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        data.loader((x, y), batch_size=0)


def test_fixed_step_loader_is_consecutive_epochs_cut_at_the_step_count():
    x = torch.arange(10.0)
    # 7 batches of 4 over 10 samples: epochs of 3 batches (4, 4, 2), so 2 epochs and 1 batch.
    fixed = [b for (b,) in data.TensorLoader(x, 4, seed=1, batches=7)]
    epochs = data.TensorLoader(x, 4, seed=1)
    expected = [b for _ in range(3) for (b,) in epochs][:7]
    assert len(fixed) == 7 and all(torch.equal(a, b) for a, b in zip(fixed, expected))
    # drop_last: full batches only, and the next pass continues the same generator.
    steps = data.TensorLoader(x, 4, seed=1, drop_last=True, batches=3)
    assert len(steps) == 3 and [len(b) for (b,) in steps] == [4, 4, 4]
    with pytest.raises(ValueError, match="batches"):
        data.TensorLoader(x, 4, batches=0)
    with pytest.raises(ValueError, match="no full batch of 20"):
        data.TensorLoader(x, 20, drop_last=True, batches=3)


def test_sample_loader_draws_fresh_batches_from_its_own_generator():
    def draw(g):
        return torch.rand(3, generator=g), torch.zeros(3, dtype=torch.long)

    a = data.SampleLoader(draw, batches=4, seed=7)
    first, second = [x for x, _ in a], [x for x, _ in a]
    assert len(first) == len(a) == 4
    assert len({tuple(x.tolist()) for x in first + second}) == 8  # every batch new
    gen = torch.Generator().manual_seed(7)
    assert all(torch.equal(x, torch.rand(3, generator=gen)) for x in first)
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    list(data.SampleLoader(draw, 2, seed=7))
    assert torch.equal(torch.rand(1), before)  # the global generator is untouched
    # A checkpoint of the training engine restores it: the next pass repeats exactly.
    from lipsort.training import checkpoint as ckpt

    state = ckpt.loader_state(a)
    third = [x for x, _ in a]
    ckpt.set_loader_state(a, state)
    assert all(torch.equal(p, q) for p, q in zip(third, [x for x, _ in a]))
    with pytest.raises(TypeError, match="sample must be a callable"):
        data.SampleLoader(None, 2)
    with pytest.raises(ValueError, match="batches"):
        data.SampleLoader(draw, -1)


@needs_data
def test_concurrent_first_loads_agree(tmp_path, mnist_sets):
    # Two loaders racing on a fresh root: the lock makes one unpack and decode while the
    # other waits and then reads the finished cache.
    from concurrent.futures import ThreadPoolExecutor

    raw = _copy_mnist_archives(tmp_path)
    with ThreadPoolExecutor(2) as pool:
        results = list(
            pool.map(lambda _: data.mnist(train=False, root=tmp_path, download=False), range(2))
        )
    for x, y in results:
        assert torch.equal(x, mnist_sets[False][0]) and torch.equal(y, mnist_sets[False][1])


def test_torchvision_import_workaround(monkeypatch):
    from lipsort import _torchvision as tvmod

    tv = tvmod.import_torchvision()
    assert hasattr(tv.datasets, "MNIST") and hasattr(tv.datasets, "FashionMNIST")
    # On a build whose compiled ops load, or after the workaround, the schemas exist.
    assert hasattr(torch.ops.torchvision, "nms") and hasattr(torch.ops.torchvision, "qnms")

    def failing(message):
        def import_module(name):
            raise RuntimeError(message)

        return import_module

    # Any other error propagates unchanged.
    monkeypatch.setattr(tvmod.importlib, "import_module", failing("CUDA driver mismatch"))
    with pytest.raises(RuntimeError, match="CUDA driver mismatch"):
        tvmod.import_torchvision()
    # The operator error with the schemas already defined is not retried in a loop.
    monkeypatch.setattr(
        tvmod.importlib, "import_module", failing("operator torchvision::nms does not exist")
    )
    with pytest.raises(RuntimeError, match="torchvision::nms does not exist"):
        tvmod.import_torchvision()
    # An operator the workaround does not know about is not papered over.
    monkeypatch.setattr(
        tvmod.importlib, "import_module", failing("operator torchvision::roi_align does not exist")
    )
    with pytest.raises(RuntimeError, match="roi_align"):
        tvmod.import_torchvision()
