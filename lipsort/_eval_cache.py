"""The eval-mode cache of the weight constraints (:class:`EvalCachedConstraint`).

In training a constrained layer recomputes its weight from the free parameter at every forward
pass; in eval mode the weight is computed once and reused while the free parameter and the
settings stay the same. Layers look the weight up before every product, so the lookup is kept
to a few tensor-free checks and one small comparison (``python -m lipsort.bench cache``).
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["EvalCachedConstraint", "register"]


def _cache_key(tensors: tuple[Tensor, ...]):
    """Cheap fingerprint of the tensors a constrained weight depends on, or None if unavailable.

    Identity (as a weak reference, so a new tensor at a recycled address cannot match),
    ``_version`` (bumped by every in-place op outside ``.data``: optimizer steps,
    ``load_state_dict``'s ``copy_``, parametrize's ``set_`` on assignment), ``data_ptr``,
    dtype, device and shape (changed by ``.to()``/``.double()``, which swap ``.data``).
    """
    try:
        return tuple(
            (weakref.ref(t), t._version, t.data_ptr(), t.dtype, t.device, t.shape, t.stride())
            for t in tensors
        )
    except (RuntimeError, TypeError, NotImplementedError):
        # Inference tensors have no version counter; functorch wrappers have no storage.
        return None


_RUN, _RUNS = 16, 16  # 16 runs of 16 consecutive entries: 64 bytes each in float32


def _sample(t: Tensor) -> Tensor:
    """A view of 256 entries of ``t`` (every entry if it has fewer): 16 runs of 16 consecutive
    entries, their starts spread evenly over the flat tensor, so across the rows and, by the
    remainder of the stride, the columns of a weight. Scattered single entries cost each a
    cache line read just before the layer's product (256 of them slowed the evaluation of a
    784-1024-1024-10 MLP by 2–3%); a write to the whole weight, as optimizers make, changes
    any run."""
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n <= _RUN * _RUNS:
        return flat
    return flat.as_strided((_RUNS, _RUN), ((n - _RUN) // (_RUNS - 1), 1))


def _unchanged(entry, t: Tensor) -> bool:
    """Whether ``t`` is the tensor fingerprinted by ``entry`` (of :func:`_cache_key`), unchanged."""
    ref, version, ptr, dtype, device, shape, stride = entry
    return (
        ref() is t
        and t._version == version
        and t.data_ptr() == ptr
        and t.dtype == dtype
        and t.device == device
        and t.shape == shape
        and t.stride() == stride
    )


class EvalCachedConstraint(nn.Module):
    r"""Base class of the parametrizations: :meth:`constrain` in training, a cache in eval.

    In training mode ``forward(V)`` returns ``constrain(V)`` with its autograd graph. In eval
    mode the constrained weight is computed once, without gradient, and reused until the
    tensors it depends on (:meth:`cache_inputs`) or the settings (:meth:`cache_config`) change.

    The cache is keyed on each input's identity, ``_version`` counter, ``data_ptr``, dtype,
    device and shape (an optimizer step, ``load_state_dict``, ``.to()`` and
    ``module.weight = X`` each change one of them), and, because in-place writes through
    ``.data`` (e.g. ``p.data.add_(...)``, used by some optimizers) bypass the version counter,
    it also compares a fixed sample of up to 256 entries of each input (16 runs of 16
    consecutive entries spread over it) with a copy. A full
    comparison would be exact but reads the whole weight at every forward pass, which costs a
    third of the layer itself at batch 256 (``python -m lipsort.bench cache``); a ``.data``
    write that changes only unsampled entries is therefore missed until the next
    ``train()``/``eval()`` switch. It is dropped on every
    ``train()``/``eval()`` switch and is not part of the ``state_dict``, a deep copy or a pickle.

    The cached weight is *detached*: gradients with respect to the weights need train mode,
    while gradients with respect to the *inputs* (e.g. for adversarial attacks or gradient-norm
    measurements) still flow in eval mode.

    Example:
        >>> from lipsort import bjorck_orthonormal
        >>> layer = bjorck_orthonormal(nn.Linear(3, 3)).eval()
        >>> layer.weight is layer.weight  # computed once, then reused
        True
        >>> layer.weight.requires_grad
        False
        >>> layer.train().weight.requires_grad
        True
    """

    def __init__(self):
        super().__init__()
        self._eval_cache = None  # (key, config, ((sample view or None, sample copy), ...), value)

    def constrain(self, original: Tensor) -> Tensor:
        """The constrained weight as a function of the free parameter (differentiable)."""
        raise NotImplementedError

    def cache_inputs(self, original: Tensor) -> tuple[Tensor, ...]:
        """Every tensor the eval-mode weight depends on."""
        return (original,)

    def cache_config(self) -> tuple:
        """Every setting the eval-mode weight depends on."""
        return ()

    def cached_value(self, inputs: tuple[Tensor, ...]) -> Tensor | None:
        """The cached eval-mode weight if ``inputs`` (:meth:`cache_inputs`) and the settings
        are those it was computed from, else None."""
        cached = self._eval_cache
        if cached is None:
            return None
        key, config, snapshots, value = cached
        if len(key) != len(inputs) or config != self.cache_config():
            return None
        for entry, t, (view, copied) in zip(key, inputs, snapshots):
            if not (_unchanged(entry, t) and torch.equal(copied, _sample(t) if view is None else view)):
                return None
        return value

    def lookup(self, original) -> Tensor:
        """``self(original)``; an eval-mode cache hit is returned without the module call (the
        layers look their weight up before every forward pass)."""
        if not (self.training or self._forward_pre_hooks or self._forward_hooks):
            value = self.cached_value(self.cache_inputs(original))
            if value is not None:
                return value
        return self(original)

    def forward(self, original: Tensor) -> Tensor:
        if self.training:
            return self.constrain(original)
        inputs = self.cache_inputs(original)
        value = self.cached_value(inputs)
        if value is not None:
            return value
        key = _cache_key(inputs)
        config = self.cache_config()
        # Out of inference mode so that the cached tensor can be used later by autograd
        # (an inference tensor cannot be saved for a backward pass, e.g. of an attack).
        with torch.inference_mode(False), torch.no_grad():
            value = self.constrain(original)
            if key is not None:
                # The sample of a contiguous input is a view of its storage, kept to save
                # making it at every call (an unchanged data_ptr means the same storage).
                snapshots = tuple(
                    (_sample(t) if t.is_contiguous() else None, _sample(t).clone()) for t in inputs
                )
                self._eval_cache = (key, config, snapshots, value)
        return value

    def train(self, mode: bool = True):
        self._eval_cache = None
        return super().train(mode)

    def __getstate__(self):
        # Weak references cannot be pickled, and a copy must not share the cached tensor.
        state = super().__getstate__()
        state["_eval_cache"] = None
        return state


def _cached_weight(module: nn.Module, torch_getter) -> Tensor:
    """``module.weight`` of a layer with one :class:`EvalCachedConstraint`: the cached value
    itself on an eval-mode hit, else torch's getter. Torch's getter reaches the cache through
    ``ParametrizationList.forward`` (two module calls, and a ``hasattr`` probe for a second
    parametrization that raises and catches an ``AttributeError``): some µs before every
    product of an evaluation."""
    plist = module._modules["parametrizations"]._modules["weight"]
    original = plist._parameters.get("original")
    if len(plist._modules) == 1 and original is not None and not parametrize._cache_enabled:
        return plist._modules["0"].lookup(original)
    return torch_getter(module)


def register(module: nn.Linear, constraint: EvalCachedConstraint) -> nn.Linear:
    """``register_parametrization(module, "weight", constraint)``, with :func:`_cached_weight`
    as the getter of ``weight`` (the setter, and everything else, stays torch's)."""
    parametrize.register_parametrization(module, "weight", constraint)
    cls = type(module)  # the class torch generated for this module (shared by its deep copies)
    torch_property = cls.__dict__["weight"]
    if not isinstance(torch_property.fget, functools.partial):  # not already ours
        getter = functools.partial(_cached_weight, torch_getter=torch_property.fget)
        cls.weight = property(getter, torch_property.fset)
    return module
