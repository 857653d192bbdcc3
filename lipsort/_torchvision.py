"""Import torchvision, working around a broken operator registration on CPU-only torch.

A torchvision 0.28 wheel built against CUDA torch cannot load its compiled ops (``_C.so``
links ``libc10_cuda.so``) next to a CPU-only torch build. torchvision then skips most of its
operator registrations, but ``torchvision/_meta_registrations.py`` still registers fake
kernels for ``torchvision::nms`` and ``torchvision::qnms`` unconditionally, and
``import torchvision`` fails with
``RuntimeError: operator torchvision::nms does not exist`` (pytorch/vision#9085).

Defining the schemas of those two operators (exactly as torchvision's C++ code declares them)
lets the import finish. Nothing that the book uses calls them: datasets, transforms and the
pure-Python box utilities work, while calling ``torchvision.ops.nms`` still fails clearly,
as it would on any build without compiled ops. The workaround runs only when the import
fails with that exact error; every other import error propagates unchanged.
"""

from __future__ import annotations

import importlib
import re
import sys

import torch

__all__ = ["MISSING_OPERATOR_SCHEMAS", "import_torchvision"]

#: Schemas of the operators that ``_meta_registrations`` needs to exist, as torchvision's compiled
#: library declares them (``torchvision::nms(...)`` and ``torchvision::qnms(...)`` in ``_C.so``).
MISSING_OPERATOR_SCHEMAS = {
    "torchvision::nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "torchvision::qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

_MISSING_OP = re.compile(r"^operator (torchvision::\w+) does not exist$")


def _define_missing_schemas() -> list[str]:
    """Define the schemas in :data:`MISSING_OPERATOR_SCHEMAS` that torch does not know yet."""
    defined = []
    for qualname, schema in MISSING_OPERATOR_SCHEMAS.items():
        if not hasattr(torch.ops.torchvision, qualname.split("::")[1]):
            torch.library.define(qualname, schema)
            defined.append(qualname)
    return defined


def import_torchvision():
    """Return the ``torchvision`` module, defining missing operator schemas only if needed.

    The import is tried first. Only when it fails with
    ``RuntimeError: operator torchvision::<op> does not exist`` for one of the operators in
    :data:`MISSING_OPERATOR_SCHEMAS` are those schemas defined (once per process) and the
    import retried; any other error is raised as is.

    Example:
        >>> tv = import_torchvision()
        >>> tv.transforms.ToTensor()(__import__("PIL.Image").Image.new("L", (2, 3))).shape
        torch.Size([1, 3, 2])
    """
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as err:
        match = _MISSING_OP.match(str(err))
        if match is None or match.group(1) not in MISSING_OPERATOR_SCHEMAS:
            raise
        if not _define_missing_schemas():
            # The schemas exist already, so this failure has another cause: do not loop.
            raise
    # A failed import leaves no "torchvision" entry behind (its submodules loaded so far stay
    # cached, which is harmless), so the retry runs the package's __init__ again.
    sys.modules.pop("torchvision", None)
    return importlib.import_module("torchvision")
