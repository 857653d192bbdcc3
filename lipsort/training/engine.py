r"""The training engine every chapter uses: epochs, the papers' schedules, evaluation, checkpoints.

:func:`fit` trains a model for a number of epochs over a loader of ``(x, y)`` batches
(:func:`lipsort.data.loader`), steps a learning-rate :class:`Schedule` once per epoch,
evaluates after every epoch (loss, accuracy and, given radii, certified accuracy from
:func:`lipsort.certify.lipschitz_upper_bound`), and writes a checkpoint after every epoch
(:mod:`lipsort.training.checkpoint`: atomic, ``weights_only``-loadable). The checkpoint holds the model,
the optimizer, the scheduler, the history and the state of every random generator —
torch's, NumPy's, Python's and the loaders' — so a run interrupted at any point and started
again with the same arguments continues from its last epoch and ends with *the same weights,
bit for bit,* as an uninterrupted run (same seed and thread count, deterministic algorithms:
:func:`lipsort.runtime.setup`). A checkpoint that already holds the requested epochs is
returned as it is, without training.

Hooks cover the papers' variants: ``after_step`` runs after every optimizer update (the
projected gradient method of Anil et al. for ℓ∞ nets:
:func:`lipsort.optim.project_linf_`), ``input_transform`` replaces each batch's
inputs (adversarial training: :func:`lipsort.attacks.pgd_training_transform`), ``step_loss``
computes the loss of a whole batch (e.g. a Wasserstein critic fed two samples).

Under ``torchrun --nproc_per_node N`` the same call runs data-parallel
(``DistributedDataParallel``; gloo on CPU, nccl on CUDA): every global batch is split into
``N`` contiguous shards, one per process, each shard's mean loss weighted by its share of the
batch so that the averaged gradient is the gradient of the global batch mean; only rank 0
writes checkpoints and prints.

Example:
    >>> from lipsort.data import loader
    >>> from lipsort.models import mlp
    >>> _ = torch.manual_seed(0)
    >>> x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    >>> net = mlp([4, 8, 2], constraint=None)
    >>> result = fit(net, lambda p: torch.optim.Adam(p, lr=1e-2), torch.nn.CrossEntropyLoss(),
    ...              loader((x, y), 16), epochs=3, eval_data=loader((x, y), 64, shuffle=False),
    ...              schedule=Schedule.multistep([2], 0.1), progress=False)
    >>> result.history["lr"]
    [0.01, 0.01, 0.001]
    >>> len(result.history["eval_acc"]), result.epochs
    (3, 3)
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from . import checkpoint as ckpt
from . import parallel
from ..certify import certified_radius, lipschitz_upper_bound, margins
from .parallel import init_distributed, shard
from .schedules import ANIL_SCHEDULE, BCOP_SCHEDULE, Schedule, schedule_id

__all__ = [
    "ANIL_SCHEDULE",
    "BCOP_SCHEDULE",
    "FitResult",
    "Schedule",
    "evaluate",
    "fit",
    "init_distributed",
    "shard",
]


# --------------------------------------------------------------------------- evaluation


def _check_radii(eps) -> list[float]:
    values = [eps] if isinstance(eps, (int, float)) else list(eps)
    for e in values:
        if (
            isinstance(e, bool)
            or not isinstance(e, (int, float))
            or math.isnan(e)
            or e < 0
            or math.isinf(e)
        ):
            raise ValueError(f"certify_eps must hold finite non-negative radii, got {eps!r}")
    return [float(e) for e in values]


def _to(batch, device) -> tuple:
    return tuple(t.to(device, non_blocking=True) if isinstance(t, Tensor) else t for t in batch)


def _is_class_target(y) -> bool:
    return isinstance(y, Tensor) and not y.is_floating_point() and not y.is_complex()


def evaluate(
    model: nn.Module,
    data: Iterable,
    loss: Callable[[Tensor, Tensor], Tensor] | None = None,
    certify_eps: float | Sequence[float] | None = None,
    norm: str = "l2",
    lipschitz: Callable[[nn.Module], float | Tensor] | float | None = None,
    device: str | torch.device | None = None,
) -> dict:
    r"""Loss, accuracy and certified accuracy of ``model`` (in eval mode) over ``(x, y)`` batches.

    Accuracy counts margins :math:`f_y - \max_{j \ne y} f_j > 0` (ties are errors), for integer
    labels only. With ``certify_eps``, the certified accuracy at each radius uses
    :func:`lipsort.certify.certified_radius` with ``L = lipschitz(model)`` (default
    :func:`lipschitz_upper_bound` in ``norm``; a number is used as it is). ``loss`` must be a
    batch mean. Under ``torchrun`` every process evaluates its shard and the sums are reduced.

    Returns:
        ``{"loss", "acc", "lipschitz", "certified_acc"}`` (floats, a list per radius; ``None``
        where not computed), plus ``"n"``, the number of samples.

    Raises:
        ValueError: a negative, NaN or infinite radius.
        TypeError: a layer whose Lipschitz constant is unknown, named by
            :func:`lipschitz_upper_bound`.

    Example:
        >>> net = nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.eye(2))  # L = 1, logits = inputs
        >>> x, y = torch.tensor([[1.0, 0.0], [0.0, 3.0], [1.0, 2.0]]), torch.tensor([0, 1, 0])
        >>> ev = evaluate(net, [(x, y)], certify_eps=[0.5, 1.0])  # radii 1/√2, 3/√2, < 0
        >>> round(ev["acc"], 4), ev["lipschitz"], [round(a, 4) for a in ev["certified_acc"]]
        (0.6667, 1.0, [0.6667, 0.3333])
    """
    radii = [] if certify_eps is None else _check_radii(certify_eps)
    rank, world = parallel.world()
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    lip = None
    if radii:
        if lipschitz is None:
            lip = float(lipschitz_upper_bound(model, norm))
        else:
            lip = float(lipschitz(model) if callable(lipschitz) else lipschitz)
    sums = torch.zeros(3 + len(radii), dtype=torch.float64)  # n, loss·n, correct, certified...
    with_acc = True
    try:
        with torch.no_grad():
            for batch in data:
                x, y = _to(shard(batch, rank, world) if world > 1 else batch, device)[:2]
                n = x.shape[0]
                if n == 0:
                    continue
                out = model(x)
                sums[0] += n
                if loss is not None:
                    sums[1] += float(loss(out, y)) * n
                with_acc = with_acc and _is_class_target(y)
                if with_acc:
                    sums[2] += float((margins(out, y) > 0).sum())
                if radii:
                    r = certified_radius(out, y, lip, norm).to(torch.float64)
                    for i, e in enumerate(radii):
                        sums[3 + i] += float((r > e).sum())
    finally:
        model.train(was_training)
    sums = parallel.all_reduce(sums)
    n = float(sums[0])
    if n == 0:
        raise ValueError("evaluate got no samples")
    return {
        "n": int(n),
        "loss": float(sums[1]) / n if loss is not None else None,
        "acc": float(sums[2]) / n if with_acc else None,
        "lipschitz": lip,
        "certified_acc": [float(c) / n for c in sums[3:]] if radii else None,
    }


# --------------------------------------------------------------------------- fit


@dataclass
class FitResult:
    """What :func:`fit` returns: the trained model (not wrapped), the per-epoch history (also in
    the checkpoint and, beside it, as ``<checkpoint>.json``), the number of epochs done, the
    epoch the run resumed from (``None``: it started from scratch) and whether the checkpoint
    was already complete (nothing was trained). With ``val_data``: the first epoch of highest
    validation accuracy and the model's ``state_dict`` after it (``None`` otherwise; on the CPU
    when read back from the checkpoint, else where the model trained)."""

    model: nn.Module
    history: dict = field(default_factory=dict)
    epochs: int = 0
    resumed_from: int | None = None
    already_done: bool = False
    checkpoint: Path | None = None
    best_epoch: int | None = None
    best_state: dict | None = None


_VALIDATION_KEYS = ("val_loss", "val_acc")


def _new_history(radii, validation: bool = False) -> dict:
    keys = (
        "epoch",
        "lr",
        "train_loss",
        "train_acc",
        "eval_loss",
        "eval_acc",
        "lipschitz",
        "certified_acc",
        "seconds",
    ) + (_VALIDATION_KEYS if validation else ())
    return {"certify_eps": list(radii), **{k: [] for k in keys}}


def _check_config(path: Path, saved: dict, config: dict, resuming: bool) -> None:
    # "validation" is only in the configs of runs with val_data (older checkpoints lack it).
    for key in ("model", "optimizer", "scheduler", "certify_eps", "certify_norm", "validation"):
        if saved.get(key) != config.get(key):
            raise ckpt.CheckpointError(
                f"checkpoint {path} comes from another run: its {key} is {saved.get(key)!r}, "
                f"this run's is {config.get(key)!r}. Use another path, or delete the file."
            )
    for key, what in (("threads", "torch threads"), ("world_size", "processes")):
        if resuming:
            ckpt.warn_if_changed(path, what, saved.get(key), config[key], stacklevel=4)


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
    loss: Callable[[Tensor, Tensor], Tensor] | None,
    train_data: Iterable,
    epochs: int,
    *,
    eval_data: Iterable | None = None,
    val_data: Iterable | None = None,
    schedule: Schedule | Callable | None = None,
    checkpoint: str | os.PathLike | None = None,
    certify_eps: float | Sequence[float] | None = None,
    certify_norm: str = "l2",
    lipschitz: Callable[[nn.Module], float | Tensor] | None = None,
    after_step: Callable[[nn.Module], object] | None = None,
    input_transform: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None,
    step_loss: Callable[[nn.Module, tuple], Tensor] | None = None,
    max_grad_norm: float | None = None,
    device: str | torch.device | None = None,
    on_epoch_end: Callable[[int, dict], object] | None = None,
    metrics: Callable[[nn.Module], dict] | None = None,
    progress: bool = True,
    desc: str = "train",
) -> FitResult:
    r"""Train ``model`` for ``epochs`` epochs, resumably; see the module notes.

    Each step: ``x ← input_transform(model, x, y)`` if given; the loss
    ``loss(model(x), y)`` (a batch *mean*), or ``step_loss(model, batch)`` for other
    batches; backward; gradient-norm clipping at ``max_grad_norm`` if given;
    ``optimizer.step()``; ``after_step(model)``. After each epoch: ``schedule`` steps,
    :func:`evaluate` runs on ``eval_data`` (and on ``val_data``, whose first epoch of highest
    accuracy is kept: Anil et al. report the best-validation epoch), ``metrics(model)`` (in
    eval mode, without gradients) adds its ``{name: number}`` to the history, the checkpoint
    (with the kept weights) is written, then
    ``on_epoch_end(epoch, history)`` is called (``epoch`` counts completed epochs). Keep what
    a run measures per epoch in ``metrics``: it is saved with the checkpoint, so a resumed run
    still has every epoch's values.

    Args:
        model: the network; moved to ``device`` if given.
        optimizer: an optimizer over ``model``'s parameters, or a factory
            ``params -> optimizer`` (e.g. ``lambda p: AggMo(p, lr=3.3e-3)``).
        loss: ``(outputs, targets) -> scalar`` batch mean, e.g. ``MarginLoss(0.3)``; may be
            ``None`` with ``step_loss``.
        train_data: iterable of batches, tuples whose first two entries are inputs and
            targets; re-iterated every epoch (:class:`lipsort.data.TensorLoader`).
        epochs: total epochs wanted (more than a checkpoint holds: it continues).
        eval_data, certify_eps, certify_norm, lipschitz: what :func:`evaluate` gets.
        val_data: held-out ``(x, y)`` batches with integer labels: the history gains
            ``val_loss`` and ``val_acc``, and the result's ``best_epoch`` and ``best_state``
            are the first epoch of highest ``val_acc`` and the weights after it (the model
            itself ends at the last epoch, as without it).
        schedule: a :class:`Schedule` (stepped once per epoch, or after every optimizer step
            if :attr:`Schedule.per_step`), or a factory ``optimizer -> torch LR scheduler``
            (stepped once per epoch), or ``None`` (constant).
        checkpoint: file to resume from and write to after every epoch; ``None``: none.
        device: where to train; default: where the model's parameters are (under
            ``torchrun`` with GPUs, ``cuda:LOCAL_RANK``).
        progress: tqdm bars and a line per epoch (rank 0 only).

    Returns:
        A :class:`FitResult`.

    Raises:
        CheckpointError: the checkpoint is unreadable, foreign, from another configuration
            (optimizer, schedule, radii, model) or holds more epochs than ``epochs``.
        ValueError: bad ``epochs``, ``certify_eps`` or ``max_grad_norm``; a global batch
            smaller than the number of processes; ``val_data`` without integer class labels.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    radii = [] if certify_eps is None else _check_radii(certify_eps)
    if radii and certify_norm not in ("l2", "linf"):
        raise ValueError(f"certify_norm must be 'l2' or 'linf', got {certify_norm!r}")
    if max_grad_norm is not None and not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
        raise ValueError(f"max_grad_norm must be a positive finite number, got {max_grad_norm!r}")
    if (loss is None) == (step_loss is None):
        raise ValueError("give exactly one of loss (outputs, targets) and step_loss (model, batch)")
    if step_loss is not None and input_transform is not None:
        raise ValueError(
            "input_transform applies to (x, y) batches; with step_loss, transform inside it"
        )

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        init_distributed()
    rank, world = parallel.world()
    if device is None and world > 1 and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    if device is not None:
        model.to(device)
    device = next((p.device for p in model.parameters()), torch.device(device or "cpu"))
    if not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer(model.parameters())
    scheduler = schedule(optimizer) if schedule is not None else None
    per_step = bool(getattr(schedule, "per_step", False))
    loaders = [train_data] + [d for d in (eval_data, val_data) if d is not None]
    config = {
        "model": type(model).__qualname__,
        "optimizer": type(optimizer).__qualname__,
        "scheduler": schedule_id(schedule),
        "certify_eps": radii,
        "certify_norm": certify_norm if radii else None,
        "threads": torch.get_num_threads(),
        "world_size": world,
    }
    if val_data is not None:
        config["validation"] = True

    path = None if checkpoint is None else Path(checkpoint)
    history, start, resumed_from = _new_history(radii, val_data is not None), 0, None
    best: dict = {}  # {"epoch", "acc", "model"}: the kept weights, with val_data
    if path is not None and path.exists():
        state = ckpt.load_checkpoint(path)
        _check_config(path, state["config"], config, resuming=state["epoch"] < epochs)
        if state["epoch"] > epochs:
            raise ckpt.CheckpointError(
                f"checkpoint {path} holds {state['epoch']} epochs, more than the {epochs} asked"
            )
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise ckpt.CheckpointError(f"checkpoint {path} does not fit this model: {err}") from err
        history, start, best = state["history"], state["epoch"], state.get("best", {})
        if start == epochs:
            return FitResult(model, history, start, start, True, path,
                             best_epoch=best.get("epoch"), best_state=best.get("model"))
        rngs = state["rng"]["processes"]
        ckpt.set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        for loader, s in zip(loaders, state["rng"]["loaders"]):
            ckpt.set_loader_state(loader, s)
        resumed_from = start

    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    show = progress and rank == 0
    if show:
        from tqdm import tqdm  # text bars: tqdm.auto wants ipywidgets in notebooks

    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        lr = float(optimizer.param_groups[0]["lr"])
        model.train()
        # n, loss·n, correct: summed on the device (no synchronization per step)
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        with_acc = step_loss is None
        batches = (
            tqdm(train_data, desc=f"{desc} {epoch + 1}/{epochs}", leave=False)
            if show
            else train_data
        )
        for batch in batches:
            n_global = batch[0].shape[0]
            if world > 1:
                if n_global < world:
                    raise ValueError(
                        f"a batch of {n_global} samples cannot be split over {world} processes"
                    )
                batch = shard(batch, rank, world)
            batch = _to(batch, device)
            n = batch[0].shape[0]
            if step_loss is not None:
                value = step_loss(net, batch)
            else:
                x, y = batch[0], batch[1]
                if input_transform is not None:
                    x = input_transform(model, x, y)
                out = net(x)
                value = loss(out, y)
                with_acc = with_acc and _is_class_target(y)
                if with_acc:
                    sums[2] += (margins(out.detach(), y) > 0).sum()
            optimizer.zero_grad(set_to_none=True)
            # DDP averages the gradients of the shards' mean losses; weighting each by
            # world·n/N makes that average the gradient of the global batch mean (exactly
            # 1 for equal shards, so the single-process arithmetic is unchanged).
            (value * (world * n / n_global) if world > 1 else value).backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            if after_step is not None:
                with torch.no_grad():
                    after_step(model)
            if per_step:
                scheduler.step()
            sums[0] += n
            sums[1] += value.detach().to(torch.float64) * n
        if scheduler is not None and not per_step:
            scheduler.step()
        sums = parallel.all_reduce(sums).cpu()
        ev = {}
        if eval_data is not None:
            ev = evaluate(model, eval_data, loss, radii or None, certify_norm, lipschitz, device)
        if val_data is not None:
            val = evaluate(model, val_data, loss, device=device)
            if val["acc"] is None:
                raise ValueError("val_data must have integer class labels (the best epoch is chosen by accuracy)")
            if not best or val["acc"] > best["acc"]:  # strictly: the first epoch of the best
                weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
                best = {"epoch": epoch + 1, "acc": val["acc"], "model": weights}
        for key, value in (
            ("epoch", epoch + 1),
            ("lr", lr),
            ("train_loss", float(sums[1] / sums[0])),
            ("train_acc", float(sums[2] / sums[0]) if with_acc else None),
            ("eval_loss", ev.get("loss")),
            ("eval_acc", ev.get("acc")),
            ("lipschitz", ev.get("lipschitz")),
            ("certified_acc", ev.get("certified_acc")),
            ("seconds", time.perf_counter() - t0),
        ):
            history[key].append(value)
        if val_data is not None:
            history["val_loss"].append(val["loss"])
            history["val_acc"].append(val["acc"])
        if metrics is not None:
            for key, value in _metrics(model, metrics).items():
                history.setdefault(key, []).append(value)
        if path is not None:
            _save(
                path, epoch + 1, model, optimizer, scheduler, history, loaders, config, rank, world, best
            )
        if show:
            tqdm.write(_summary(history, epochs))
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, history)
    return FitResult(model, history, epochs, resumed_from, False, path,
                     best_epoch=best.get("epoch"), best_state=best.get("model"))


def _metrics(model: nn.Module, metrics) -> dict:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            values = metrics(model)
    finally:
        model.train(was_training)
    if not isinstance(values, dict):
        raise TypeError(f"metrics must return a dict of numbers, got {type(values).__name__}")
    reserved = set(_new_history([], validation=True))
    clash = sorted(reserved & set(values))
    if clash:
        raise ValueError(f"metrics names {clash} are the history's own; choose other names")
    return {k: float(v) for k, v in values.items()}


def _save(path, epoch, model, optimizer, scheduler, history, loaders, config, rank, world, best) -> None:
    rng = ckpt.get_rng_state()
    if world > 1:
        import torch.distributed as dist

        gathered = [None] * world
        dist.all_gather_object(gathered, rng)  # every process's generators, for its own resume
    else:
        gathered = [rng]
    if rank == 0:
        payload = ckpt.new_checkpoint(
            epoch=epoch,
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict() if scheduler is not None else {},
            history=history,
            rng={"processes": gathered, "loaders": [ckpt.loader_state(ld) for ld in loaders]},
            config=config,
            **({"best": best} if best else {}),
        )
        ckpt.save_atomic(payload, path)
        ckpt.save_json_atomic(history, path.with_name(path.name + ".json"))
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # nobody runs ahead of a checkpoint still being written


def _summary(history: dict, epochs: int) -> str:
    parts = [
        f"epoch {history['epoch'][-1]}/{epochs}",
        f"lr {history['lr'][-1]:.3g}",
        f"train loss {history['train_loss'][-1]:.4f}",
    ]
    for key, name in (
        ("train_acc", "train acc"),
        ("eval_loss", "eval loss"),
        ("eval_acc", "eval acc"),
        ("val_acc", "val acc"),
    ):
        if history.get(key, [None])[-1] is not None:
            parts.append(f"{name} {history[key][-1]:.4f}")
    if history["certified_acc"][-1] is not None:
        certs = ", ".join(
            f"{e:g}: {a:.4f}" for e, a in zip(history["certify_eps"], history["certified_acc"][-1])
        )
        parts.append(f"certified {{{certs}}}")
    return " | ".join(parts) + f" | {history['seconds'][-1]:.1f} s"
