"""The Lipschitz WGAN (chapter 04): shapes, a critic that stays 1-Lipschitz, determinism, bad inputs."""

from __future__ import annotations

import warnings

import pytest
import torch

from lipsort.certify import lipschitz_upper_bound
from lipsort.runtime import num_threads
from lipsort.training import checkpoint as ckpt
from lipsort.wasserstein import gan

pytestmark = pytest.mark.usefixtures("one_thread")


def small(seed: int = 0):
    torch.manual_seed(seed)
    g = gan.Generator(z_dim=8, widths=(16,), image_shape=(1, 8, 8), conv_channels=(4, 2))
    f = gan.lipschitz_critic((1, 8, 8), widths=(16, 16), group_size=4, bjorck_iters=10)
    data = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return g, f, data


def test_generator_shapes_and_range():
    for conv in (None, (8, 4)):
        g = gan.Generator(z_dim=10, widths=(32, 16), image_shape=(1, 12, 8), conv_channels=conv).eval()
        out = g(g.noise(7, torch.Generator().manual_seed(0)))
        assert out.shape == (7, 1, 12, 8)
        assert float(out.abs().max()) <= 1.0


def test_critic_is_certified_before_and_after_training():
    g, f, data = small()
    assert float(lipschitz_upper_bound(f)) <= 1 + 1e-5
    h = gan.train_wgan(g, f, data, steps=3, batch_size=16, n_critic=2, progress=False)
    assert len(h.critic_estimate) == len(h.generator_loss) == 3
    assert float(lipschitz_upper_bound(f)) <= 1 + 1e-5  # the constraint needs no clipping
    assert not g.training and not f.training


def test_training_is_deterministic():
    runs = []
    for _ in range(2):
        g, f, data = small()
        h = gan.train_wgan(g, f, data, steps=3, batch_size=16, n_critic=2, seed=5, progress=False)
        runs.append((h.critic_estimate, gan.generate(g, 4, seed=2)))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


def test_critic_objective_rises_against_a_fixed_generator():
    # With the generator's learning rate ~0, the critic alone ascends E f(data) - E f(G(z)).
    g, f, data = small()
    h = gan.train_wgan(g, f, data + 1.0, steps=30, batch_size=32, n_critic=2, lr_g=1e-12, progress=False)
    assert sum(h.critic_estimate[-5:]) > sum(h.critic_estimate[:5])


def test_generate_is_reproducible_and_restores_mode():
    g, _, _ = small()
    g.train()
    a, b = gan.generate(g, 5, seed=3, batch_size=2), gan.generate(g, 5, seed=3)
    assert a.shape == (5, 1, 8, 8) and torch.allclose(a, b)
    assert g.training


def test_bad_inputs_raise():
    g, f, data = small()
    with pytest.raises(ValueError, match="multiples of 4"):
        gan.Generator(image_shape=(1, 10, 10), conv_channels=(4, 2))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        gan.Generator(image_shape=(28, 28))
    with pytest.raises(ValueError, match="images must have shape"):
        gan.train_wgan(g, f, data[:, :, :4], steps=1, batch_size=8, progress=False)
    with pytest.raises(ValueError, match="at least batch_size"):
        gan.train_wgan(g, f, data[:4], steps=1, batch_size=8, progress=False)
    with pytest.raises(TypeError, match="Generator"):
        gan.train_wgan(f, f, data, steps=1, progress=False)
    with pytest.raises(ValueError, match="noise must have shape"):
        g(torch.zeros(2, 3))


def test_interrupted_wgan_resumes_to_the_same_weights(tmp_path):
    def fresh():
        torch.manual_seed(0)
        return gan.Generator(z_dim=4, widths=(16,), image_shape=(1, 4, 4)), gan.lipschitz_critic((1, 4, 4), (16,), group_size=4, bjorck_iters=5)

    data = torch.rand(64, 1, 4, 4) * 2 - 1
    g, f = fresh()
    straight = gan.train_wgan(g, f, data, steps=6, batch_size=16, n_critic=2, progress=False)
    path = tmp_path / "gan.pt"
    g1, f1 = fresh()
    gan.train_wgan(g1, f1, data, steps=3, batch_size=16, n_critic=2, progress=False, checkpoint=path, checkpoint_every=2)
    g2, f2 = fresh()  # a new process would start from fresh networks: the checkpoint restores everything
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same thread count: no warning
        resumed = gan.train_wgan(g2, f2, data, steps=6, batch_size=16, n_critic=2, progress=False, checkpoint=path)
    assert resumed.critic_estimate == straight.critic_estimate
    for a, b in zip([*g.state_dict().values(), *f.state_dict().values()], [*g2.state_dict().values(), *f2.state_dict().values()]):
        assert torch.equal(a, b)
    with num_threads(torch.get_num_threads() + 1):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a finished run trains no further: nothing to warn about
            gan.train_wgan(*fresh(), data, steps=6, batch_size=16, n_critic=2, progress=False, checkpoint=path)
        with pytest.warns(UserWarning, match="torch threads instead of"):
            gan.train_wgan(*fresh(), data, steps=7, batch_size=16, n_critic=2, progress=False, checkpoint=path)
    with pytest.raises(ckpt.CheckpointError, match="another WGAN run"):
        gan.train_wgan(*fresh(), data, steps=7, batch_size=8, n_critic=2, progress=False, checkpoint=path)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ckpt.CheckpointError, match=str(path)):
        gan.train_wgan(*fresh(), data, steps=7, batch_size=16, n_critic=2, progress=False, checkpoint=path)
