"""The fused CPU kernels (lipsort._native) against the PyTorch expressions they replace: MaxMin's
compare-exchange and the tiled ``a ± aᵀ``; MaxMin and GroupSort(4) both through the C++ autograd
operator (lipsort._native_op) and through the Python Function around the same loops."""

import ctypes
import subprocess
import sys

import pytest
import torch

from lipsort import _native, _native_op
from lipsort import functional as F

pytestmark = pytest.mark.skipif(_native.kernels(torch.float32) is None, reason="no C compiler")


@pytest.fixture
def torch_path():
    """Call ``fn`` with the fused kernels switched off (the PyTorch compare-exchange path)."""

    def run(fn):
        with _native.disabled():
            return fn()

    return run


@pytest.fixture(params=["operator", "function"])
def fused(request):
    """Each test through the C++ operator and through the Python Function (the same loops)."""
    if request.param == "function":
        with _native_op.disabled():
            yield request.param
        return
    if _native_op.operator() is None:
        pytest.skip("no C++ compiler or torch headers for the operator")
    yield request.param


def _both(x, dim, grad, torch_path):
    """(output, input gradient) of max_min on the fused and on the PyTorch path."""

    def run():
        leaf = x.clone().requires_grad_()
        out = F.max_min(leaf, dim)
        (g,) = torch.autograd.grad(out, leaf, grad)
        return out.detach(), g

    return run(), torch_path(run)


def _spy(monkeypatch, group=2):
    """The dtypes of the MaxMin (or GroupSort(4)) calls that take the loops, through the operator
    or the Python Function."""
    calls = []
    name = "compare_exchange" if group == 2 else "sort4"
    forward, op = getattr(_native, name), _native_op.group_sort

    def spied(x, dim, size):
        y = op(x, dim, size)
        if y is not None and size == group:
            calls.append(x.dtype)
        return y

    monkeypatch.setattr(_native, name, lambda *a: calls.append(a[0].dtype) or forward(*a))
    monkeypatch.setattr(_native_op, "group_sort", spied)
    return calls


def _ops(fn) -> set[str]:
    """The names of the aten operators that ``fn()`` runs (the backward's routing by ``where``
    shows up; the loops do not)."""
    with torch.autograd.profiler.profile() as prof:
        fn()
    return {event.name for event in prof.function_events}


CASES = [
    ((256, 1024), 1),  # an MLP batch: adjacent pairs, split over threads
    ((7, 6), 1),
    ((3, 10), -1),
    ((64, 8, 5, 5), 1),  # images: pairs of channels, rows of 25 pixels (entry-wise loops)
    ((40, 6, 7, 7), 1),  # rows of 49 pixels, several blocks of rows per call
    ((3, 2, 2, 1), 1),  # one row of 2 pixels: only the first and last rows' loop
    ((5, 4, 8, 8), 1),  # rows of 64 pixels: the row loop
    ((6, 4, 9, 10), 1),  # rows of 90: a last vector that overlaps the one before
    ((3, 4, 13, 5), 1),  # rows of 65: the last vector redoes all but one entry
    ((33, 4, 4, 4), 1),  # rows of 16: whole blocks of rows, then a shorter one
    ((2, 4, 3, 6), 3),
    ((2, 4, 3, 6), 0),
    ((0, 6), 1),
    ((6,), 0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,dim", CASES)
def test_fused_max_min_equals_the_pytorch_path(shape, dim, dtype, torch_path, monkeypatch, fused):
    g = torch.Generator().manual_seed(sum(shape) + dim)
    x = torch.randn(shape, generator=g, dtype=dtype).round(decimals=1)  # many exact ties
    grad = torch.randn(shape, generator=g, dtype=dtype)
    calls = _spy(monkeypatch)
    (out, gx), (ref_out, ref_gx) = _both(x, dim, grad, torch_path)
    assert len(calls) == 1  # the fused run took the kernels, the reference did not
    assert torch.equal(out, ref_out) and torch.equal(gx, ref_gx)
    assert out.dtype == dtype and out.shape == x.shape


def test_fused_max_min_is_a_permutation_of_each_pair_at_ties_and_propagates_nan(torch_path, fused):
    x = torch.tensor([[2.0, 2.0, -1.0, 3.0, float("nan"), 1.0, 4.0, float("nan"), float("inf"), -float("inf")]])
    grad = torch.arange(1.0, 11.0).reshape(1, 10)
    (out, gx), (ref_out, ref_gx) = _both(x, 1, grad, torch_path)
    nan = float("nan")
    expected = torch.tensor([[2.0, 2.0, 3.0, -1.0, nan, nan, nan, nan, float("inf"), -float("inf")]])
    assert torch.equal(out.nan_to_num(), expected.nan_to_num()) and out.isnan().equal(expected.isnan())
    assert torch.equal(out.nan_to_num(), ref_out.nan_to_num())
    # a tie keeps its order: each gradient entry goes back to exactly one input
    assert gx.tolist() == [[1.0, 2.0, 4.0, 3.0, 6.0, 5.0, 8.0, 7.0, 9.0, 10.0]] == ref_gx.tolist()


@pytest.mark.parametrize("shape", [(4, 6, 9, 10), (40, 6, 7, 7), (9, 8)])  # rows, blocks, pairs
def test_fused_max_min_propagates_nan_in_every_loop(shape, torch_path, fused):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g).round(decimals=1)
    x[torch.rand(shape, generator=g) < 0.05] = float("nan")
    grad = torch.randn(shape, generator=g)
    (out, gx), (ref_out, ref_gx) = _both(x, 1, grad, torch_path)
    assert out.isnan().any() and torch.equal(out.isnan(), ref_out.isnan())
    assert torch.equal(out.nan_to_num(), ref_out.nan_to_num()) and torch.equal(gx, ref_gx)


@pytest.mark.parametrize("shape", [(64, 4096), (128, 64, 7, 7), (32, 64, 16, 16), (16, 64, 9, 10)])
def test_fused_max_min_does_not_depend_on_the_thread_count(shape, fused):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)).round(decimals=1)
    grad = torch.randn_like(x)
    outs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            leaf = x.clone().requires_grad_()
            out = F.max_min(leaf)
            outs.append((out.detach(), torch.autograd.grad(out, leaf, grad)[0]))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for o in outs[1:] for a, b in zip(o, outs[0]))


@pytest.mark.parametrize("shape", [(3, 8), (3, 4, 2, 3)])  # adjacent pairs, short rows
def test_fused_path_gradchecks_and_double_backward(shape, fused):
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert torch.autograd.gradcheck(F.max_min, (x.requires_grad_(),), check_batched_grad=True)
    assert torch.autograd.gradgradcheck(F.max_min, (x,))
    with torch.autograd.forward_ad.dual_level():
        tangent = torch.randn_like(x)
        dual = torch.autograd.forward_ad.make_dual(x.detach(), tangent)
        jvp = torch.autograd.forward_ad.unpack_dual(F.max_min(dual)).tangent
    assert torch.equal(jvp, torch.func.jvp(F.max_min, (x.detach(),), (tangent,))[1])


def test_other_inputs_keep_the_pytorch_path(monkeypatch, fused):
    calls = _spy(monkeypatch)
    x = torch.randn(4, 8, 3)
    assert torch.equal(F.max_min(x.transpose(0, 2), 1), F.max_min(x.transpose(0, 2).contiguous(), 1))
    F.max_min(torch.randn(4, 8, dtype=torch.float16))
    F.max_min(torch.randn(4, 8, dtype=torch.bfloat16))
    assert len(calls) == 1  # only the contiguous float32 call
    with pytest.raises(ValueError, match="group_size=2 does not divide the 5 units"):
        F.max_min(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="out of range"):
        F.max_min(torch.zeros(2, 4), dim=3)


def test_a_failed_build_falls_back_with_a_warning_that_names_the_compiler(tmp_path):
    code = (
        "import torch, warnings\n"
        "warnings.simplefilter('always')\n"
        "from lipsort import functional as F\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    y = F.max_min(torch.tensor([[1., 3.]]))\n"
        "print(y.tolist(), [str(x.message) for x in w])\n"
    )
    env = {"CC": "no-such-compiler", "LIPSORT_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "[[3.0, 1.0]]" in done.stdout
    assert "no C compiler found (tried 'no-such-compiler'; set $CC)" in done.stdout


def test_the_build_is_cached_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("LIPSORT_CACHE", str(tmp_path))
    first = _native._build()
    built = list((tmp_path / "native").glob("compare_exchange-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    second = _native._build()
    address = lambda fns: ctypes.cast(fns[torch.float32][0], ctypes.c_void_p).value  # noqa: E731
    assert built[0].stat().st_mtime_ns == mtime and address(first) == address(second)  # one library


def test_unusual_tensors_never_reach_the_raw_pointers(monkeypatch, fused):
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(7))
    with torch.device("meta"):  # a default device must not move the mask off the CPU
        y = F.max_min(x)
    assert y.device.type == "cpu" and torch.equal(y, F.max_min(x.clone()))
    assert torch.equal(F.max_min(torch._neg_view(x)), F.max_min(-x))  # a lazily negated view
    leaf = x.clone().requires_grad_()
    zero = torch._efficientzerotensor(4, 8)
    assert torch.equal(torch.autograd.grad(F.max_min(leaf), leaf, zero)[0], torch.zeros(4, 8))
    # An expanded gradient (from a sum) takes the loop after one copy, a double backward `where`.
    ops = _ops(lambda: F.max_min(leaf).sum().backward())
    assert "aten::where" not in ops and torch.equal(leaf.grad, torch.ones(4, 8))
    out = F.max_min(leaf)
    ops = _ops(lambda: torch.autograd.grad(out, leaf, torch.ones_like(out), create_graph=True))
    assert "aten::where" in ops


def test_tracing_records_the_compare_exchange():
    x = torch.randn(3, 6)
    traced = torch.jit.trace(lambda v: F.max_min(v), (x,))
    z = torch.randn(3, 6)
    assert torch.equal(traced(z), F.max_min(z))


def _fresh(code: str, tmp_path, **env):
    """Run ``code`` in a new interpreter with a fresh kernel cache; returns its stdout."""
    full = {"PATH": "/usr/bin:/bin", "LIPSORT_CACHE": str(tmp_path), "HOME": str(tmp_path), **env}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full)
    assert done.returncode == 0, done.stderr
    return done.stdout


_USES_KERNELS = (  # the C loops through the Python Function: no C++ build in a fresh cache
    "import torch\nfrom lipsort import _native, _native_op\nfrom lipsort import functional as F\n"
    "_native_op.OPERATOR.enabled = False\ny = F.max_min(torch.tensor([[1., 3.]]))\n"
    "print(y.tolist(), _native.kernels(torch.float32) is not None)\n"
)


@pytest.mark.skipif(not __import__("shutil").which("g++"), reason="no C++ compiler")
def test_a_cpp_compiler_builds_the_same_kernels(tmp_path):
    assert _fresh(_USES_KERNELS, tmp_path, CC="g++").split() == ["[[3.0,", "1.0]]", "True"]


def test_a_corrupt_cached_library_is_rebuilt(tmp_path):
    assert "True" in _fresh(_USES_KERNELS, tmp_path)
    (built,) = (tmp_path / "native").glob("*.so")
    built.write_bytes(b"not a shared library")
    assert _fresh(_USES_KERNELS, tmp_path).split() == ["[[3.0,", "1.0]]", "True"]
    assert built.read_bytes()[:4] == b"\x7fELF"


def test_a_failed_build_warns_once_even_when_warnings_are_errors(tmp_path):
    code = (
        "import torch, warnings\nfrom lipsort import functional as F\n"
        "warnings.simplefilter('error')\n"
        "try:\n    F.max_min(torch.ones(1, 2))\nexcept RuntimeWarning as w:\n    print('warned:', w)\n"
        "print(F.max_min(torch.tensor([[1., 3.]])).tolist())\n"
    )
    out = _fresh(code, tmp_path, CC="no-such-compiler")
    warned = "warned: lipsort: MaxMin and a ± aᵀ fall back to PyTorch ops: no C compiler found"
    assert warned in out
    assert out.strip().endswith("[[3.0, 1.0]]")


def test_without_a_cpp_compiler_the_python_function_runs_the_loops_after_one_warning(tmp_path):
    code = (
        "import torch, warnings\nwarnings.simplefilter('always')\nfrom lipsort import functional as F\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    x = torch.tensor([[1., 3.]], requires_grad=True)\n"
        "    y = F.max_min(x)\n    y.backward(torch.tensor([[5., 7.]]))\n    F.max_min(x)\n"
        "print(y.tolist(), x.grad.tolist(), type(y.grad_fn).__name__, [str(m.message) for m in w])\n"
    )
    out = _fresh(code, tmp_path, CXX="no-such-compiler")
    assert out.startswith("[[3.0, 1.0]] [[7.0, 5.0]] _FusedBackward")
    assert out.count("run their loops from Python: no C++ compiler found (tried 'no-such-compiler'; set $CXX)") == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(128, 128), (1000, 1000), (3, 130, 130), (2, 2, 96, 96), (9, 9)])
def test_plus_transpose_equals_the_pytorch_expression_bit_for_bit(shape, dtype):
    a = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(3))
    for view in (a, a.mT):  # a transposed view is made contiguous first
        sym, skew = _native.plus_transpose(view, 1), _native.plus_transpose(view, -1)
        assert torch.equal(sym, view + view.mT) and torch.equal(skew, view - view.mT)
        assert torch.equal(sym, sym.mT) and torch.equal(skew, -skew.mT)  # exactly (skew-)symmetric


def test_plus_transpose_takes_the_kernel_only_outside_autograd(monkeypatch):
    a = torch.randn(200, 200, dtype=torch.float64, requires_grad=True)
    calls = []
    real = _native.kernels
    monkeypatch.setattr(_native, "kernels", lambda dtype: calls.append(dtype) or real(dtype))
    cotangent = torch.ones(200, 200, dtype=torch.float64).triu()
    (g,) = torch.autograd.grad(_native.plus_transpose(a, -1), a, cotangent)
    assert calls == [] and torch.equal(g, cotangent - cotangent.mT)
    with torch.no_grad():
        _native.plus_transpose(a, 1)
    assert calls == [torch.float64]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,dim", [((256, 1024), 1), ((8, 16, 5, 5), 1), ((3, 8), -1),
                                       ((2, 4, 3, 8), 3), ((8, 2, 3), 0), ((0, 8), 1)])
def test_fused_group_sort_4_equals_torch_sort(shape, dim, dtype, monkeypatch, fused):
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(11))
    g = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(12))

    def run():
        leaf = x.clone().requires_grad_()
        out = F.group_sort(leaf, 4, dim)
        return out.detach(), torch.autograd.grad(out, leaf, g)[0]

    calls = _spy(monkeypatch, group=4)
    out = run()
    with _native.disabled():
        reference = run()
    assert calls == [dtype]
    assert torch.equal(out[0], reference[0]) and torch.equal(out[1], reference[1])  # no ties


def test_fused_group_sort_4_at_ties_and_nans_is_a_permutation(fused):
    nan = float("nan")
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0, nan, 2.0, nan, -0.0, 0.0, 5.0, -0.0]])
    leaf = x.clone().requires_grad_()
    out = F.group_sort(leaf, 4)
    with _native.disabled():
        ref = F.group_sort(x, 4)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.nan_to_num(), ref.nan_to_num())
    g = torch.arange(1.0, 13.0).unsqueeze(0)
    (grad,) = torch.autograd.grad(out, leaf, g)
    # Each group's gradient is a permutation of the incoming one; ties keep their order.
    for k in range(3):
        assert sorted(grad[0, 4 * k : 4 * k + 4].tolist()) == g[0, 4 * k : 4 * k + 4].tolist()
    assert grad[0, :4].tolist() == [1.0, 2.0, 3.0, 4.0] and grad[0, 4:8].tolist() == [7.0, 5.0, 8.0, 6.0]


def test_fused_group_sort_4_double_backward_and_vmap(fused):
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda v: F.group_sort(v, 4), (x,))
    # A batched backward (is_grads_batched) takes the scatter path.
    out = F.group_sort(x, 4)
    eye = torch.eye(24, dtype=torch.float64).reshape(24, 3, 8)
    (jac,) = torch.autograd.grad(out, x, eye, is_grads_batched=True)
    assert torch.equal(jac.reshape(24, 24).abs().sum(0), torch.ones(24, dtype=torch.float64))
