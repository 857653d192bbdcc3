r"""MaxMin and GroupSort(4) as one C++ autograd operator around the loops of
:mod:`lipsort._native`: ``torch.ops.lipsort_native.group_sort(x, dim, group)``.

Through a Python :class:`torch.autograd.Function` most of a small call was not the loops: the
Function's forward and backward in Python (the autograd engine calling back into the
interpreter), two ``ctypes`` calls and the mask's allocation by shape. The same steps in C++
(output, mask, the loop; the saved mask, the routing loop) cost 16 µs less per forward +
backward of a (2, 4) batch (37 against 53 µs; ReLU 22 µs) and 38 µs less of a (128, 1024)
one (116 against 154 µs; ReLU 89 µs), on 2 threads of an AMD EPYC. The loops are those of the
``ctypes`` path: their addresses are handed to the library once, after loading.

The backward takes the loop for a dense CPU gradient outside double backward; anything else (a
batched, zero or lazily negated gradient, a gradient with ``create_graph``) goes through
``where`` (pairs) or ``scatter`` (groups of four) on the saved mask, ops that autograd
differentiates and torch.func batches, as the Python Function does.

The C++ source is compiled once per machine with ``$CXX`` (else ``c++``) against the installed
torch's headers (about 20 s) into the kernel cache of :mod:`lipsort._build`. Without a compiler or
headers the Python Function runs instead (a warning says why, once).
"""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import torch

from . import _native
from ._build import Native, compiler, load_cached

__all__ = ["OPERATOR", "disabled", "group_sort", "operator"]

_SOURCE = f"#define SHORT {_native.SHORT}\n" + r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Loop = void (*)(const void *, const void *, void *, int64_t, int64_t, int);

/* The loops of lipsort._native, by index: (pairs, quads) x (forward, backward), float then
   double. Set once by lipsort_op_loops before the operator is first called. */
static Loop loops[8];
extern "C" void lipsort_op_loops(void **fns) {
    for (int k = 0; k < 8; ++k) loops[k] = reinterpret_cast<Loop>(fns[k]);
}

namespace {

/* lipsort._native's layout: pairs (or quads) along dim are rows (outer, group, inner); pairs
   with 1 < inner < SHORT keep a mask byte per entry, the others one per pair or quad. */
struct Layout {
    int64_t outer, inner;
    bool entrywise;
    std::vector<int64_t> mask, grouped;
};

Layout layout(at::IntArrayRef s, int64_t dim, int64_t group) {
    Layout l;
    l.inner = 1;
    for (size_t k = dim + 1; k < s.size(); ++k) l.inner *= s[k];
    l.outer = l.inner ? c10::multiply_integers(s) / (group * l.inner) : 0;
    l.entrywise = group == 2 && 1 < l.inner && l.inner < SHORT;
    l.mask = s.vec();
    if (!l.entrywise) l.mask[dim] /= group;
    l.grouped = s.vec();
    l.grouped[dim] /= group;
    l.grouped.insert(l.grouped.begin() + dim + 1, group);
    return l;
}

Loop loop(const at::Tensor &t, int64_t group, bool backward) {
    return loops[(t.scalar_type() == at::kDouble ? 4 : 0) + (group == 4 ? 2 : 0) + backward];
}

/* A dense CPU tensor whose memory holds its values: no batched, functorch, Python, zero or
   negated tensor (each adds a key beyond those of a plain CPU tensor). */
bool plain(const at::Tensor &t) {
    using c10::DispatchKey;
    static const c10::DispatchKeySet keys({DispatchKey::CPU, DispatchKey::AutogradCPU,
                                            DispatchKey::AutocastCPU, DispatchKey::ADInplaceOrView});
    return t.layout() == at::kStrided && keys.isSupersetOf(t.key_set());
}

struct GroupSort : public torch::autograd::Function<GroupSort> {
    static at::Tensor forward(AutogradContext *ctx, const at::Tensor &x, int64_t dim, int64_t group) {
        Layout l = layout(x.sizes(), dim, group);
        at::Tensor y = at::empty(x.sizes(), x.options());
        at::Tensor mask = at::empty(l.mask, x.options().dtype(group == 2 ? at::kBool : at::kByte));
        if (l.outer)
            loop(x, group, false)(x.const_data_ptr(), y.mutable_data_ptr(), mask.mutable_data_ptr(),
                                  l.outer, l.inner, at::get_num_threads());
        ctx->save_for_backward({mask});
        ctx->saved_data["dim"] = dim;
        ctx->saved_data["group"] = group;
        return y;
    }

    static variable_list backward(AutogradContext *ctx, variable_list grads) {
        at::Tensor mask = ctx->get_saved_variables()[0], g = grads[0];
        int64_t dim = ctx->saved_data["dim"].toInt(), group = ctx->saved_data["group"].toInt();
        Layout l = layout(g.sizes(), dim, group);
        at::Tensor out;
        if (!at::GradMode::is_enabled() && plain(g)) {
            g = g.contiguous();
            out = at::empty(g.sizes(), g.options());
            if (l.outer)
                loop(g, group, true)(g.const_data_ptr(), mask.const_data_ptr(), out.mutable_data_ptr(),
                                     l.outer, l.inner, at::get_num_threads());
        } else if (group == 2) {  // slot 0 takes where(keep, g0, g1), slot 1 the other one
            at::Tensor gg = g.reshape(l.grouped), a = gg.select(dim + 1, 0), b = gg.select(dim + 1, 1);
            at::Tensor keep = l.entrywise ? mask.reshape(l.grouped).select(dim + 1, 0) : mask;
            out = at::stack({at::where(keep, a, b), at::where(keep, b, a)}, dim + 1).reshape(g.sizes());
        } else {  // two bits per output slot: the input slot its value came from
            std::vector<int64_t> view(mask.dim() - dim, 1);
            view[0] = 4;
            at::Tensor shifts = at::arange(0, 8, 2, mask.options()).view(view);
            at::Tensor gg = g.reshape(l.grouped);
            at::Tensor src = mask.unsqueeze(dim + 1).bitwise_right_shift(shifts).bitwise_and(3);
            out = at::zeros_like(gg).scatter(dim + 1, src.to(at::kLong).expand_as(gg), gg).reshape(g.sizes());
        }
        return {out, at::Tensor(), at::Tensor()};
    }
};

at::Tensor group_sort(const at::Tensor &x, int64_t dim, int64_t group) {
    return GroupSort::apply(x, dim, group);
}

}  // namespace

TORCH_LIBRARY(lipsort_native, m) {
    m.def("group_sort(Tensor x, int dim, int group) -> Tensor");
    m.impl("group_sort", c10::DispatchKey::CompositeImplicitAutograd, TORCH_FN(group_sort));
}
"""

def _compile(cxx: list[str], src: Path, out: Path) -> None:
    root = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = ["-O2", "-shared", "-fPIC", "-std=c++17", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-w",
             f"-I{root / 'include'}", f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}"]
    libs = [f"-L{root / 'lib'}", f"-Wl,-rpath,{root / 'lib'}", "-lc10", "-ltorch_cpu", "-ltorch"]  # after the source
    done = subprocess.run([*cxx, *flags, str(src), "-o", str(out), *libs], capture_output=True, text=True)
    if done.returncode:
        raise OSError(f"{' '.join(cxx)} failed to compile the autograd operator:\n{done.stderr.strip()[-2000:]}")


def _load(path: Path, fns: dict) -> object:
    torch.ops.load_library(str(path))
    table = (ctypes.c_void_p * 8)(*(
        ctypes.cast(fns[dtype][k], ctypes.c_void_p).value
        for dtype in (torch.float32, torch.float64) for k in (0, 1, 3, 4)
    ))
    ctypes.CDLL(str(path)).lipsort_op_loops(table)
    return torch.ops.lipsort_native.group_sort.default


def _build() -> object:
    """Compile (once per machine), load and wire the operator; raises OSError with the reason."""
    fns = {dtype: _native.kernels(dtype) for dtype in (torch.float32, torch.float64)}
    if None in fns.values():
        raise OSError("the C loops of lipsort._native are not available")
    cxx, version = compiler("CXX", "c++", "C++ compiler")
    key = [*cxx, version, torch.__version__, str(Path(torch.__file__).parent)]
    return load_cached("group_sort_op.cpp", key, _SOURCE, lambda src, out: _compile(cxx, src, out),
                       lambda path: _load(path, fns))


OPERATOR = Native(_build, "lipsort: MaxMin and GroupSort(4) run their loops from Python")
"""The operator, built on first use; ``OPERATOR.enabled = False`` (or :func:`disabled`) runs the
Python Function instead."""


def operator() -> object | None:
    """``torch.ops.lipsort_native.group_sort.default``, or None where it is disabled or cannot be
    built (the reason is warned once)."""
    return OPERATOR.get()


def disabled():
    """Run the loops through the Python Function inside the block, not the operator."""
    return OPERATOR.disabled()


def group_sort(x: torch.Tensor, dim: int, group: int) -> torch.Tensor | None:
    """MaxMin (``group=2``) or GroupSort(4) of a contiguous CPU float tensor that
    :func:`lipsort._native.plan` accepts, through the operator, or None without it."""
    op = operator()
    return None if op is None else op(x, dim % x.dim(), group)
