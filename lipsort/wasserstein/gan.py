r"""A Wasserstein GAN whose critic is 1-Lipschitz by construction (the LWGAN of Anil et al., chapter 04).

The generator :math:`G` maps noise :math:`z \sim \mathrm{Unif}[0, 1]^{d_z}` to images; the
critic :math:`f` is a Björck-orthonormal GroupSort network, so :math:`\mathrm{Lip}(f) \le 1`
holds at every step without weight clipping or gradient penalty, and the critic's objective
is the Kantorovich–Rubinstein dual of :math:`W_1(P_{\mathrm{data}}, G_\# \mathrm{Unif})`:

.. math::
    \max_f\ \mathbb E_{x \sim P_{\mathrm{data}}} f(x) - \mathbb E_z f(G(z)), \qquad
    \min_G\ -\mathbb E_z f(G(z)),

with ``n_critic`` critic steps per generator step (Arjovsky et al., 2017). Images live in
:math:`[-1, 1]` (the generator ends with tanh).

* :class:`Generator`: fully connected, optionally with the two transposed convolutions of
  the infoGAN generator the authors use.
* :func:`lipschitz_critic`: ``Flatten`` then :func:`lipsort.models.mlp` with Björck weights.
* :func:`train_wgan`: the training loop (Adam, the authors' learning rates); returns a
  :class:`GanHistory`; with ``checkpoint``, it writes its state atomically and resumes an
  interrupted run to the same weights.
* :func:`generate`: samples of a trained generator, in eval mode.

Example:
    >>> _ = torch.manual_seed(0)
    >>> g = Generator(z_dim=8, widths=(16,), image_shape=(1, 4, 4))
    >>> f = lipschitz_critic((1, 4, 4), widths=(8,), group_size=4)
    >>> h = train_wgan(g, f, torch.rand(32, 1, 4, 4) * 2 - 1, steps=2, batch_size=8, progress=False)
    >>> len(h.critic_estimate), tuple(generate(g, 3).shape)
    (2, (3, 1, 4, 4))
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .._checks import check_int, check_positive
from ..training import checkpoint as ckpt

__all__ = ["Generator", "lipschitz_critic", "GanHistory", "train_wgan", "generate"]


class Generator(nn.Module):
    r"""Noise ``(N, z_dim)`` to images ``(N, C, H, W)`` in :math:`[-1, 1]`.

    ``Linear → BatchNorm → ReLU`` for each width, then either a linear layer to ``C·H·W``
    (``conv_channels=None``) or, as in the infoGAN generator of the authors' LWGAN, a linear
    layer to ``c₁·(H/4)·(W/4)`` followed by two stride-2 transposed 4×4 convolutions
    ``c₁ → c₂ → C`` (with batch norm and ReLU between them); tanh at the end.

    Args:
        z_dim: noise dimension (the authors: 62).
        widths: hidden widths of the fully connected part (the authors: ``(1024,)``).
        image_shape: ``(C, H, W)``; with convolutions ``H`` and ``W`` must be multiples of 4.
        conv_channels: ``(c₁, c₂)`` (the authors: ``(128, 64)``) or ``None``.

    Example:
        >>> g = Generator(z_dim=62, widths=(32,), image_shape=(1, 28, 28), conv_channels=(8, 4))
        >>> tuple(g(torch.rand(5, 62)).shape)
        (5, 1, 28, 28)
    """

    def __init__(self, z_dim: int = 62, widths: Sequence[int] = (1024,), image_shape=(1, 28, 28), conv_channels=None):
        super().__init__()
        self.z_dim = check_int(z_dim, "z_dim")
        self.image_shape = tuple(check_int(s, "each image dimension") for s in image_shape)
        if len(self.image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape}")
        c, h, w = self.image_shape
        layers: list[nn.Module] = []
        n_in = self.z_dim
        for width in widths:
            width = check_int(width, "each width")
            layers += [nn.Linear(n_in, width), nn.BatchNorm1d(width), nn.ReLU()]
            n_in = width
        if conv_channels is None:
            layers += [nn.Linear(n_in, c * h * w), nn.Tanh(), nn.Unflatten(1, self.image_shape)]
        else:
            c1, c2 = (check_int(k, "each conv channel count") for k in conv_channels)
            if h % 4 or w % 4:
                raise ValueError(f"with conv_channels the image height and width must be multiples of 4, got {h}x{w}")
            layers += [
                nn.Linear(n_in, c1 * (h // 4) * (w // 4)), nn.BatchNorm1d(c1 * (h // 4) * (w // 4)), nn.ReLU(),
                nn.Unflatten(1, (c1, h // 4, w // 4)),
                nn.ConvTranspose2d(c1, c2, 4, 2, 1), nn.BatchNorm2d(c2), nn.ReLU(),
                nn.ConvTranspose2d(c2, c, 4, 2, 1), nn.Tanh(),
            ]  # fmt: skip
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"noise must have shape (N, {self.z_dim}), got {tuple(z.shape)}")
        return self.net(z)

    def noise(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` noise vectors, uniform on :math:`[0, 1]^{z\\_dim}` (as the authors), on the CPU generator."""
        return torch.rand(check_int(n, "n"), self.z_dim, generator=generator)


def lipschitz_critic(
    image_shape, widths: Sequence[int] = (720, 720), activation: str = "groupsort", group_size: int | None = 9,
    bjorck_iters: int = 20,
) -> nn.Sequential:
    r"""``Flatten`` then ``C·H·W → widths → 1`` with Björck-orthonormal weights: :math:`\mathrm{Lip} \le 1`.

    The same network as :func:`lipsort.wasserstein.fit_critic` builds on flattened images
    (:func:`lipsort.models.mlp`); the defaults are the authors' A4 critic
    (``[720, 720, 1]``, GroupSort(9)).

    Example:
        >>> from lipsort.certify import lipschitz_upper_bound
        >>> f = lipschitz_critic((1, 6, 6), widths=(18,), group_size=9)
        >>> float(lipschitz_upper_bound(f)) <= 1 + 1e-5
        True
    """
    from ..models import mlp

    size = math.prod(check_int(s, "each image dimension") for s in image_shape)
    gs = group_size if activation == "groupsort" else None
    return nn.Sequential(
        nn.Flatten(), *mlp([size, *widths, 1], activation=activation, constraint="bjorck", group_size=gs, n_iters=bjorck_iters)
    )


@dataclass
class GanHistory:
    """What :func:`train_wgan` records, one entry per generator step.

    Attributes:
        critic_estimate: the critic's last mini-batch objective
            :math:`\\hat{\\mathbb E}_{\\mathrm{data}} f - \\hat{\\mathbb E}_z f(G(z))` before the
            generator step: a noisy lower bound of the current :math:`W_1` (the critic is 1-Lipschitz).
        generator_loss: :math:`-\\hat{\\mathbb E}_z f(G(z))` at the generator step.
    """

    critic_estimate: list[float] = field(default_factory=list)
    generator_loss: list[float] = field(default_factory=list)


def train_wgan(
    generator: Generator,
    critic: nn.Module,
    images: Tensor,
    steps: int,
    batch_size: int = 64,
    n_critic: int = 5,
    lr_g: float = 2e-4,
    lr_d: float = 2e-3,
    betas: tuple[float, float] = (0.5, 0.999),
    seed: int = 0,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
) -> GanHistory:
    r"""Train a WGAN for ``steps`` generator steps, ``n_critic`` critic steps before each.

    Every critic step takes the next mini-batch of ``images`` (reshuffled each epoch by a
    seeded generator) and ``batch_size`` generated images, and ascends
    :math:`\hat{\mathbb E} f(x) - \hat{\mathbb E} f(G(z))`; every generator step descends
    :math:`-\hat{\mathbb E} f(G(z))`. Adam for both with the authors' LWGAN settings (learning
    rates :math:`2 \cdot 10^{-4}` for the generator, :math:`2 \cdot 10^{-3}` for the critic,
    :math:`\beta = (0.5, 0.999)`). The critic's own constraint keeps it 1-Lipschitz: no clipping.
    The networks are trained in place on the device of the generator's parameters; the data and
    noise come from CPU generators seeded by ``seed``, so a run is reproducible.

    Args:
        generator, critic: the networks (initialized by the caller).
        images: ``(N, C, H, W)`` training images in :math:`[-1, 1]`, ``N >= batch_size``.
        steps: generator steps (one epoch of ``N`` images is ``N / (batch_size · n_critic)`` of them).
        batch_size, n_critic, lr_g, lr_d, betas: as above.
        seed: seed of the data order and the noise.
        progress: show a tqdm progress bar.
        checkpoint: a file (:mod:`lipsort.training.checkpoint` format) written atomically every
            ``checkpoint_every`` generator steps and at the end. If it exists, training resumes
            from it — networks, optimizers, history, data order and noise generator — and ends
            with the same weights as an uninterrupted run at the same torch thread count (a
            resume that trains on with another count, or from a checkpoint that did not record
            it, warns: the run goes on, but not bit for bit); a checkpoint of a run with other
            settings, or an unreadable file, raises an error naming the file.
        checkpoint_every: generator steps between checkpoints.

    Returns:
        A :class:`GanHistory`.
    """
    from tqdm import tqdm

    if not isinstance(generator, Generator) or not isinstance(critic, nn.Module):
        raise TypeError("generator must be a lipsort.wasserstein.gan.Generator and critic an nn.Module")
    steps, batch_size, n_critic = check_int(steps, "steps"), check_int(batch_size, "batch_size"), check_int(n_critic, "n_critic")
    lr_g, lr_d = check_positive(lr_g, "lr_g"), check_positive(lr_d, "lr_d")
    checkpoint_every = check_int(checkpoint_every, "checkpoint_every")
    if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != generator.image_shape:
        raise ValueError(f"images must have shape (N, {', '.join(map(str, generator.image_shape))}), got {tuple(getattr(images, 'shape', ()))}")
    if images.shape[0] < batch_size:
        raise ValueError(f"need at least batch_size = {batch_size} images, got {images.shape[0]}")
    p = next(generator.parameters())
    device, dtype = p.device, p.dtype
    gen = torch.Generator().manual_seed(seed)
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr_g, betas=tuple(betas))
    opt_d = torch.optim.Adam(critic.parameters(), lr=lr_d, betas=tuple(betas))
    n_batches = images.shape[0] // batch_size
    order, cursor = torch.randperm(images.shape[0], generator=gen), 0
    history, start = GanHistory(), 0
    config = {"batch_size": batch_size, "n_critic": n_critic, "lr_g": lr_g, "lr_d": lr_d, "betas": list(map(float, betas)),
              "seed": seed, "n_images": int(images.shape[0])}
    state = ckpt.load_run(checkpoint, config, "WGAN", steps)
    if state is not None:
        generator.load_state_dict(state["model"]["generator"])
        critic.load_state_dict(state["model"]["critic"])
        opt_g.load_state_dict(state["optimizer"]["generator"])
        opt_d.load_state_dict(state["optimizer"]["critic"])
        gen.set_state(state["rng"]["data"])
        order, cursor = state["rng"]["order"], int(state["rng"]["cursor"])
        history = GanHistory(**{k: list(v) for k, v in state["history"].items()})
        start = int(state["epoch"])
        if start < steps:  # a finished run that is only loaded computes nothing more
            ckpt.warn_if_changed(checkpoint, "torch threads", state.get("threads"), torch.get_num_threads())

    def save(step: int) -> None:
        ckpt.save_atomic(ckpt.new_checkpoint(
            epoch=step, config=config, history={"critic_estimate": history.critic_estimate, "generator_loss": history.generator_loss},
            model={"generator": generator.state_dict(), "critic": critic.state_dict()},
            optimizer={"generator": opt_g.state_dict(), "critic": opt_d.state_dict()},
            rng={"data": gen.get_state(), "order": order, "cursor": cursor},
            threads=torch.get_num_threads()), checkpoint)

    def real_batch() -> Tensor:
        nonlocal order, cursor
        if cursor == n_batches:  # a new epoch: reshuffle
            order, cursor = torch.randperm(images.shape[0], generator=gen), 0
        idx = order[cursor * batch_size : (cursor + 1) * batch_size]
        cursor += 1
        return images[idx].to(device=device, dtype=dtype)

    generator.train()
    critic.train()
    bar = tqdm(range(start, steps), desc="WGAN", disable=not progress, mininterval=5.0, initial=start, total=steps)
    for step in bar:
        for _ in range(n_critic):
            x = real_batch()
            with torch.no_grad():
                fake = generator(generator.noise(batch_size, gen).to(device=device, dtype=dtype))
            # One critic call on both batches: the Björck weights are computed once per step.
            scores = critic(torch.cat([x, fake])).reshape(-1)
            estimate = scores[:batch_size].mean() - scores[batch_size:].mean()
            opt_d.zero_grad(set_to_none=True)
            (-estimate).backward()
            opt_d.step()
        fake = generator(generator.noise(batch_size, gen).to(device=device, dtype=dtype))
        loss = -critic(fake).mean()
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        est, gl = float(estimate.detach()), float(loss.detach())
        if not (math.isfinite(est) and math.isfinite(gl)):
            raise FloatingPointError("the WGAN objective became non-finite; lower the learning rates")
        history.critic_estimate.append(est)
        history.generator_loss.append(gl)
        bar.set_postfix(critic=f"{history.critic_estimate[-1]:.3f}", refresh=False)
        if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            save(step + 1)
    bar.close()
    generator.eval()
    critic.eval()
    return history


def generate(generator: Generator, n: int, seed: int = 0, batch_size: int = 1024) -> Tensor:
    """``n`` images of the generator in eval mode (batch-norm running statistics), on the CPU.

    The noise comes from ``torch.Generator().manual_seed(seed)``; the training mode is restored.
    """
    n = check_int(n, "n")
    gen = torch.Generator().manual_seed(seed)
    p = next(generator.parameters())
    was_training = generator.training
    generator.eval()
    try:
        with torch.no_grad():
            out = [
                generator(generator.noise(min(batch_size, n - i), gen).to(device=p.device, dtype=p.dtype)).cpu()
                for i in range(0, n, batch_size)
            ]
    finally:
        generator.train(was_training)
    return torch.cat(out)
