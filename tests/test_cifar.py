"""lipsort.data.cifar10 on a synthetic stand-in of torchvision's cifar-10-batches-py folder
(CIFAR-10 itself cannot be downloaded where the book is built)."""

import pickle

import numpy as np
import pytest
import torch

from lipsort._torchvision import import_torchvision
from lipsort.data import DatasetNotFoundError, cifar10


def _stand_in(root, per_batch=3):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        batches[name] = (data, labels)
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": data, "labels": labels}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, fh)
    return batches


@pytest.fixture
def no_md5(monkeypatch):
    # The stand-in has the real format but not the real md5 sums.
    import_torchvision()
    import torchvision.datasets.cifar as cifar_module

    monkeypatch.setattr(cifar_module, "check_integrity", lambda *args, **kwargs: True)


def test_cifar10_reads_the_batches_channels_first(tmp_path, no_md5):
    batches = _stand_in(tmp_path)
    x, y = cifar10(train=True, root=tmp_path)
    assert x.shape == (15, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    first, labels = batches["data_batch_1"]
    # torchvision's rows are 1024 red, 1024 green, 1024 blue values, row-major per channel.
    expected = torch.from_numpy(first[0].reshape(3, 32, 32).astype(np.float32) / 255)
    assert torch.equal(x[0], expected)
    assert y[:3].tolist() == labels
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    xt, yt = cifar10(train=False, root=tmp_path)
    assert xt.shape == (3, 3, 32, 32) and yt.tolist() == batches["test_batch"][1]


def test_cifar10_missing_names_the_folder_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("LIPSORT_DATA", raising=False)
    with pytest.raises(DatasetNotFoundError) as info:
        cifar10(train=False, root=tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg
    assert "cifar-10-python.tar.gz" in msg and "LIPSORT_DATA" in msg


def test_cifar10_corrupted_stand_in_is_rejected_by_the_md5_check(tmp_path):
    _stand_in(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="corrupted"):
        cifar10(root=tmp_path)
