"""A small training run shared by tests/test_training.py and the processes it starts.

``python tests/_training_worker.py CHECKPOINT EPOCHS [--kill-after K]`` trains the run below,
optionally killing itself (SIGKILL, no cleanup) right after epoch K's checkpoint;
``python -m torch.distributed.run --nproc_per_node 2 tests/_training_worker.py --ddp OUT`` trains
the data-parallel problem and saves each rank's final weights to ``OUT/rank{r}.pt``.
"""

from __future__ import annotations

import os
import random
import signal
import sys

import numpy as np
import torch
from torch import nn

from lipsort import MaxMin
from lipsort.data import loader
from lipsort.models import mlp
from lipsort.training import Schedule, fit

D = torch.float64


def seed(s: int = 0) -> None:
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def noisy_problem():
    """A net with dropout trained on inputs jittered by torch's, NumPy's and Python's generators,
    so that an exact resume needs every generator's state (and the loader's, and Adam's, and
    the schedule's)."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(45, 6, generator=g, dtype=D)
    y = torch.randint(0, 3, (45,), generator=g)
    seed(0)
    net = nn.Sequential(
        nn.Linear(6, 16), MaxMin(), nn.Dropout(0.2), nn.Linear(16, 16), MaxMin(), nn.Linear(16, 3)
    ).to(D)

    def jitter(model, xb, yb):
        scale = 0.01 * (1 + np.random.rand() + random.random())
        return xb + scale * torch.randn_like(xb)

    kwargs = {
        "optimizer": lambda p: torch.optim.Adam(p, lr=1e-2),
        "loss": nn.CrossEntropyLoss(),
        "train_data": loader((x, y), 8, seed=3),
        "eval_data": loader((x, y), 16, shuffle=False),
        "schedule": Schedule.multistep([2, 4], 0.5),
        "input_transform": jitter,
        "progress": False,
    }
    return net, kwargs


def ddp_problem():
    """37 samples in global batches of 8: the last batch (5) splits 3/2 over two processes."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(37, 5, generator=g, dtype=D)
    y = torch.randint(0, 3, (37,), generator=g)
    seed(0)
    # The fixed-count Björck path: the default polar path warm-starts from a per-process buffer,
    # so its weight agrees across processes only to its certified tolerance (1e-12), not bit for bit.
    net = mlp([5, 8, 8, 3], activation="maxmin", constraint="bjorck", n_iters=20).to(D)
    kwargs = {
        "optimizer": lambda p: torch.optim.Adam(p, lr=2e-2),
        "loss": nn.CrossEntropyLoss(),
        "train_data": loader((x, y), 8, seed=5),
        "eval_data": loader((x, y), 10, shuffle=False),
        "schedule": Schedule.step_every(2, 0.5),
        "certify_eps": [0.05],
        "progress": False,
    }
    return net, kwargs


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    if argv[0] == "--ddp":
        out = argv[1]
        net, kwargs = ddp_problem()
        result = fit(net, epochs=3, checkpoint=os.path.join(out, "run.pt"), **kwargs)
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
        torch.save(
            {"world": world, "state": result.model.state_dict(), "history": result.history},
            os.path.join(out, f"rank{rank}.pt"),
        )
        dist.destroy_process_group()
        return
    path, epochs = argv[0], int(argv[1])
    kill_after = int(argv[3]) if len(argv) > 3 and argv[2] == "--kill-after" else None

    def on_epoch_end(epoch, history):
        if epoch == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    net, kwargs = noisy_problem()
    fit(net, epochs=epochs, checkpoint=path, on_epoch_end=on_epoch_end, **kwargs)


if __name__ == "__main__":
    main(sys.argv[1:])
