r"""Fused CPU kernels, compiled on first use: MaxMin's pairwise compare-exchange, GroupSort(4),
and the ``a ± aᵀ`` of the polar factor's and Björck's backward passes.

MaxMin in eager PyTorch is five strided kernels per training step (``ge``, ``maximum`` and
``minimum`` forward, two ``where`` backward), each reading the interleaved pairs with stride 2.
The two loops below do the same work in one pass each way, reading and writing every entry
once, as ReLU's two kernels do:

* forward: ``(hi, lo) = (max(a, b), min(a, b))`` and ``keep = a ≥ b`` for each pair;
* backward: ``(gₐ, g_b) = (g_hi, g_lo)`` where ``keep``, else ``(g_lo, g_hi)``: every gradient
  entry goes to exactly one input, so the Jacobian is a permutation even at ties.

Channel pairs of feature maps smaller than 64 pixels (rows of fewer than :data:`SHORT` entries)
take entry-wise loops over blocks of rows instead, which the compiler vectorizes where a loop
per row of 49 pixels ran scalar (1.2 ms against ReLU's 0.04 ms for a (128, 64, 7, 7) batch on
one thread here); their mask has a byte per entry (the pair's ``keep``, at both entries).

A NaN in a pair makes both outputs NaN, as ``torch.maximum`` / ``torch.minimum`` do, so the
fused and the PyTorch paths give equal values and the same routing masks on every input; only
bits that compare equal may differ: the sign of a zero on a tie of −0 and +0 (the kernel keeps
the pair as it is) and the payload of a NaN.

:func:`sort4` sorts groups of four by ranks (six comparisons, no branches) and keeps one byte
per group, the source slot of each output slot, where ``torch.sort`` keeps an int64 index per
unit; :func:`route4` sends the gradient back through it.

:func:`plus_transpose` forms ``a + aᵀ`` or ``a − aᵀ`` tile by tile: as an element-wise op on a
transposed view, PyTorch reads the mirror entry of each output row a column apart, which at a
power-of-two width maps a whole column to a few cache sets (a 1024×1024 float32 ``a − aᵀ``
measured 7 ms against about 1 ms in 32×32 tiles, on one thread of this machine).

The C source below is compiled once per machine with the system C compiler (``$CC``, else
``cc``; about a second) into ``$LIPSORT_CACHE/native`` (default ``~/.cache/lipsort/native``),
named by a hash of the source, the compiler, its flags and the CPU model and features, and
loaded with :mod:`ctypes`. With gcc, where torch runs GNU OpenMP as ``libgomp.so.1`` (its Linux
wheels), the loops run on torch's thread count in the same thread pool; elsewhere they run on
one thread rather than load a second OpenMP runtime. Without a compiler, or with
``LIPSORT_NATIVE=0`` at import, :func:`plan` returns None, :func:`plus_transpose` computes the
PyTorch expression, and the callers keep their PyTorch path (a warning says why, once).
MaxMin and GroupSort(4) call the loops through a C++ autograd operator where one can be built
(:mod:`lipsort._native_op`), else through a Python Function.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from ._build import Native, compiler, cpu_key, load_cached, torch_gomp

__all__ = [
    "LIBRARY", "Plan", "kernels", "plan", "compare_exchange", "route", "disabled", "plus_transpose",
    "sort4", "route4", "pair_keep", "SHORT",
]

SHORT = 64
"""Rows of MaxMin's layout shorter than this (``1 < inner < SHORT``: feature maps of fewer than
64 pixels) take the entry-wise loops, whose mask has one byte per entry instead of per pair."""

# Layout: ``x`` is (outer, 2, inner) contiguous, pair (o, i) is (x[o, 0, i], x[o, 1, i]) and
# keep[o, i] says whether it stayed in place. inner == 1 (MaxMin of an MLP: adjacent entries) has
# its own flat loops, which the compiler vectorizes; each thread takes a contiguous block of rows.
_SOURCE = f"#define SHORT {SHORT}\n" + r"""
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
static int omp_get_num_threads(void) { return 1; }
#endif

/* c ? a : b on the bits: as a ternary on floats the compiler's scalar code (edge rows, a
   thread's last block) jumps, and a random comparison mispredicts half the time. */
#include <string.h>
#define DEFINE_PICK(T, U, SFX)                                                               \
static inline T pick_##SFX(int c, T a, T b) {                                                \
    U ua, ub, m = (U)0 - (U)(c != 0);                                                        \
    memcpy(&ua, &a, sizeof ua);                                                              \
    memcpy(&ub, &b, sizeof ub);                                                              \
    ua = (ua & m) | (ub & ~m);                                                               \
    memcpy(&a, &ua, sizeof a);                                                               \
    return a;                                                                                \
}
DEFINE_PICK(float, uint32_t, f32)
DEFINE_PICK(double, uint64_t, f64)

#define GRAIN 16384 /* pairs per thread below which one thread does the work */
/* Inputs, outputs and masks never overlap: without the promise the compiler guards each row's
   loop with overlap checks (the keep bytes may alias anything); with the old NaN rule that
   forward measured 1.7x slower on a (64, 128, 16, 16) batch, one thread, here. */
#define RS __restrict

static int team(int64_t pairs, int threads) {
    int64_t chunks = pairs / GRAIN;
    return chunks < 1 ? 1 : (chunks < threads ? (int)chunks : threads);
}

/* Each thread of a team sized for `work` pairs runs CALL on its contiguous block [lo, hi) of
   0..total. */
#define SPLIT(total, work, threads, CALL)                                                    \
    int nt = team(work, threads);                                                            \
    _Pragma("omp parallel num_threads(nt) if(nt > 1)")                                       \
    {                                                                                        \
        int t = omp_get_thread_num(), n = omp_get_num_threads();                             \
        int64_t lo = (total) * t / n, hi = (total) * (t + 1) / n;                            \
        CALL;                                                                                \
    }

/* The body once per entry i of a row of inner >= SHORT entries, in whole vectors of SHORT
   (64 bytes of mask) only: the last one starts at inner - SHORT, overlapping the one before,
   whose entries it computes again to the same values. A scalar tail of up to 63 entries cost
   more than the rest of the row: rows of 90 entries took 8x as long as rows of 96. */
#define ROW(...)                                                                             \
    {                                                                                        \
        int64_t full = inner - inner % SHORT;                                                \
        for (int64_t i = 0; i < full; ++i) { __VA_ARGS__ }                                   \
        if (full < inner)                                                                    \
            for (int64_t i = inner - SHORT; i < inner; ++i) { __VA_ARGS__ }                  \
    }

#define DEFINE(T, SFX)                                                                       \
static void fwd_##SFX(const T *RS x, T *RS y, uint8_t *RS keep, int64_t o0, int64_t o1,        \
                      int64_t inner) {                                                       \
    if (inner == 1) {                                                                        \
        for (int64_t p = o0; p < o1; ++p) {                                                  \
            T u = x[2 * p], v = x[2 * p + 1];                                                \
            int ge = u >= v;                                                                 \
            y[2 * p] = pick_##SFX(ge | (u != u), u, v);                                      \
            y[2 * p + 1] = pick_##SFX(ge | (v != v), v, u);                                  \
            keep[p] = (uint8_t)ge;                                                           \
        }                                                                                    \
        return;                                                                              \
    }                                                                                        \
    for (int64_t o = o0; o < o1; ++o) {                                                      \
        const T *RS a = x + 2 * o * inner, *RS b = a + inner;                                \
        T *RS hi = y + 2 * o * inner, *RS lo = hi + inner;                                   \
        uint8_t *RS k = keep + o * inner;                                                    \
        ROW(                                                                                 \
            T u = a[i], v = b[i];                                                            \
            int ge = u >= v;                                                                 \
            hi[i] = pick_##SFX(ge | (u != u), u, v);                                         \
            lo[i] = pick_##SFX(ge | (v != v), v, u);                                         \
            k[i] = (uint8_t)ge;                                                              \
        )                                                                                    \
    }                                                                                        \
}                                                                                            \
static void bwd_##SFX(const T *RS g, const uint8_t *RS keep, T *RS out, int64_t o0, int64_t o1, \
                      int64_t inner) {                                                       \
    if (inner == 1) {                                                                        \
        for (int64_t p = o0; p < o1; ++p) {                                                  \
            T h = g[2 * p], l = g[2 * p + 1];                                                \
            int s = keep[p] != 0;                                                            \
            out[2 * p] = pick_##SFX(s, h, l);                                                \
            out[2 * p + 1] = pick_##SFX(s, l, h);                                            \
        }                                                                                    \
        return;                                                                              \
    }                                                                                        \
    for (int64_t o = o0; o < o1; ++o) {                                                      \
        const T *RS gh = g + 2 * o * inner, *RS gl = gh + inner;                             \
        T *RS ga = out + 2 * o * inner, *RS gb = ga + inner;                                 \
        const uint8_t *RS k = keep + o * inner;                                              \
        ROW(                                                                                 \
            T h = gh[i], l = gl[i];                                                          \
            int s = k[i] != 0;                                                               \
            ga[i] = pick_##SFX(s, h, l);                                                     \
            gb[i] = pick_##SFX(s, l, h);                                                     \
        )                                                                                    \
    }                                                                                        \
}                                                                                            \
void lipsort_cx_forward_##SFX(const T *x, T *y, uint8_t *keep, int64_t outer, int64_t inner, \
                              int threads) {                                                 \
    if (inner > 1 && inner < SHORT) {                                                        \
        SPLIT(outer, outer * inner, threads, fwds_##SFX(x, y, keep, lo, hi, inner, outer))  \
    } else {                                                                                 \
        SPLIT(outer, outer * inner, threads, fwd_##SFX(x, y, keep, lo, hi, inner))          \
    }                                                                                        \
}                                                                                            \
void lipsort_cx_backward_##SFX(const T *g, const uint8_t *keep, T *out, int64_t outer,       \
                               int64_t inner, int threads) {                                 \
    if (inner > 1 && inner < SHORT) {                                                        \
        SPLIT(outer, outer * inner, threads, bwds_##SFX(g, keep, out, lo, hi, inner, outer)) \
    } else {                                                                                 \
        SPLIT(outer, outer * inner, threads, bwd_##SFX(g, keep, out, lo, hi, inner))         \
    }                                                                                        \
}

/* The short loops' pattern for a block of rows, half[j] = 1 in the first half of each row; returns
   the block's length in rows: whole vectors of SHORT entries (a multiple of lcm(2 inner, SHORT)
   entries, at most 4032), so that only a thread's last block has a scalar tail. */
static int64_t short_block(uint8_t *half, int64_t inner) {
    int64_t period = 2 * inner, span = period;
    while (span % SHORT) span += period;
    int64_t block = span / period * (2048 / span > 1 ? 2048 / span : 1);
    for (int64_t r = 0; r < block; ++r)
        for (int64_t k = 0; k < period; ++k) half[r * period + k] = k < inner;
    return block;
}

/* The rows one pass of a short loop takes from row r (of its thread's r..r1): the first and last
   rows of the tensor alone (*edge), middle rows in blocks that stop before the last. */
static int64_t short_rows(int64_t r, int64_t r1, int64_t outer, int64_t block, int *edge) {
    int64_t end = r1 < outer - 1 ? r1 : outer - 1;
    *edge = r == 0 || r == outer - 1;
    return *edge ? 1 : block < end - r ? block : end - r;
}

/* The body once per pass of a short loop over rows r0..r1, with the pass's `edge`, `rows` and
   `at`, the offset of its first entry, in scope (and `half`, `period`). */
#define SHORT_PASSES(...)                                                                    \
    uint8_t half[4096];                                                                      \
    int64_t period = 2 * inner, block = short_block(half, inner);                            \
    for (int64_t r = r0, rows; r < r1; r += rows) {                                          \
        int edge;                                                                            \
        rows = short_rows(r, r1, outer, block, &edge);                                       \
        int64_t at = r * period;                                                             \
        __VA_ARGS__                                                                          \
    }

/* Short rows (1 < inner < SHORT, feature maps of a few pixels): a row loop would run a few
   entries per row, too few for the vectorizer, so this loop walks whole blocks of rows entry by
   entry. Entry e of row r meets its partner e + inner (in the first half, a pattern byte of 1)
   or e - inner (second half); keep[e] = a >= b for both entries of a pair, so backward is
   out[e] = keep[e] ? g[e] : g[partner]. The first and last rows of the tensor are done one
   entry at a time: only there would the unused partner load leave the tensor. */
#define DEFINE_SHORT(T, SFX)                                                                 \
static void fwds_##SFX(const T *RS x, T *RS y, uint8_t *RS keep, int64_t r0, int64_t r1,     \
                       int64_t inner, int64_t outer) {                                       \
    SHORT_PASSES(                                                                            \
        const T *RS xs = x + at;                                                             \
        T *RS ys = y + at;                                                                   \
        uint8_t *RS ks = keep + at;                                                          \
        if (edge) {                                                                          \
            for (int64_t j = 0; j < period; ++j) {                                           \
                T w = xs[j], p = j < inner ? xs[j + inner] : xs[j - inner];                  \
                int c = j < inner ? w >= p : p >= w;                                         \
                ys[j] = pick_##SFX(c | (w != w), w, p);                                      \
                ks[j] = (uint8_t)c;                                                          \
            }                                                                                \
        } else {                                                                             \
            for (int64_t j = 0; j < rows * period; ++j) {                                    \
                int first = half[j];                                                         \
                T w = xs[j], up = xs[j + inner], down = xs[j - inner];                       \
                T p = pick_##SFX(first, up, down);                                           \
                int c = (first & (w >= p)) | (!first & (p >= w));                            \
                ys[j] = pick_##SFX(c | (w != w), w, p);                                      \
                ks[j] = (uint8_t)c;                                                          \
            }                                                                                \
        }                                                                                    \
    )                                                                                        \
}                                                                                            \
static void bwds_##SFX(const T *RS g, const uint8_t *RS keep, T *RS out, int64_t r0, int64_t r1,\
                       int64_t inner, int64_t outer) {                                       \
    SHORT_PASSES(                                                                            \
        const T *RS gs = g + at;                                                             \
        T *RS os = out + at;                                                                 \
        const uint8_t *RS ks = keep + at;                                                    \
        if (edge) {                                                                          \
            for (int64_t j = 0; j < period; ++j) {                                           \
                T p = j < inner ? gs[j + inner] : gs[j - inner];                             \
                os[j] = pick_##SFX(ks[j], gs[j], p);                                         \
            }                                                                                \
        } else {                                                                             \
            for (int64_t j = 0; j < rows * period; ++j) {                                    \
                T up = gs[j + inner], down = gs[j - inner];                                  \
                T p = pick_##SFX(half[j], up, down);                                         \
                os[j] = pick_##SFX(ks[j], gs[j], p);                                         \
            }                                                                                \
        }                                                                                    \
    )                                                                                        \
}

/* out = a + sign * a^T for each of `batch` contiguous d x d matrices, by 32 x 32 tiles so that
   the transposed reads stay in cache (an element-wise op on a transposed view walks a column
   per output row). sign is +1 or -1: sign * x is exact, so the result equals a + a^T or a - a^T
   computed entry by entry, bit for bit, and is exactly symmetric or skew. */
#define TILE 32
#define DEFINE_T(T, SFX)                                                                     \
void lipsort_tadd_##SFX(const T *RS a, T *RS out, int64_t batch, int64_t d, T sign,          \
                        int threads) {                                                       \
    int64_t tiles = (d + TILE - 1) / TILE, jobs = batch * tiles * tiles;                     \
    int nt = team(batch * d * d / 2, threads);                                               \
    _Pragma("omp parallel for num_threads(nt) if(nt > 1) schedule(static)")                 \
    for (int64_t job = 0; job < jobs; ++job) {                                               \
        int64_t b = job / (tiles * tiles), r = job % (tiles * tiles);                        \
        int64_t i0 = r / tiles * TILE, j0 = r % tiles * TILE;                                \
        int64_t i1 = i0 + TILE < d ? i0 + TILE : d, j1 = j0 + TILE < d ? j0 + TILE : d;      \
        const T *m = a + b * d * d;                                                          \
        T *o = out + b * d * d;                                                              \
        for (int64_t i = i0; i < i1; ++i)                                                    \
            for (int64_t j = j0; j < j1; ++j)                                                \
                o[i * d + j] = m[i * d + j] + sign * m[j * d + i];                           \
    }                                                                                        \
}

/* GroupSort(4): each group (o, 0..3, i) sorted largest first (a NaN counts as the largest, as
   in torch.sort; ties keep their order) by ranks: six comparisons give each input its output
   slot, without branches. code packs the source slot of each output slot in two bits,
   y[k] = x[(code >> 2k) & 3], so backward is g_x[src] = g_y[k]. */
#define BEATS(x, y) (!((y) > (x)) & !(((y) != (y)) & ((x) == (x))))
/* Groups n0..n1 (n = o * inner + i), walked row by row: no division per group. */
#define GROUPS(...)                                                                          \
    for (int64_t n = n0; n < n1;) {                                                          \
        int64_t o = n / inner, i = n - o * inner;                                            \
        int64_t stop = (o + 1) * inner < n1 ? (o + 1) * inner : n1;                          \
        for (; n < stop; ++n, ++i) { __VA_ARGS__ }                                           \
    }
#define DEFINE_S4(T, SFX)                                                                    \
static void gs4_fwd_##SFX(const T *RS x, T *RS y, uint8_t *RS code, int64_t n0, int64_t n1, \
                          int64_t inner) {                                                   \
    GROUPS(                                                                                  \
        const T *a = x + 4 * o * inner + i;                                                  \
        T *b = y + 4 * o * inner + i;                                                        \
        T v0 = a[0], v1 = a[inner], v2 = a[2 * inner], v3 = a[3 * inner];                   \
        /* bjk (j < k): slot j goes before slot k, unless v_k is larger or a NaN beside a    \
           number; ties keep their order. r_k: the output slot of input k. */                \
        int b01 = BEATS(v0, v1), b02 = BEATS(v0, v2), b03 = BEATS(v0, v3);                   \
        int b12 = BEATS(v1, v2), b13 = BEATS(v1, v3), b23 = BEATS(v2, v3);                   \
        int r0 = 3 - b01 - b02 - b03, r1 = b01 + 2 - b12 - b13, r2 = b02 + b12 + 1 - b23;    \
        int r3 = b03 + b13 + b23;                                                            \
        b[r0 * inner] = v0; b[r1 * inner] = v1; b[r2 * inner] = v2; b[r3 * inner] = v3;      \
        code[n] = (uint8_t)(1 << 2 * r1 | 2 << 2 * r2 | 3 << 2 * r3);                        \
    )                                                                                        \
}                                                                                            \
static void gs4_bwd_##SFX(const T *RS g, const uint8_t *RS code, T *RS out, int64_t n0,      \
                          int64_t n1, int64_t inner) {                                       \
    GROUPS(                                                                                  \
        const T *a = g + 4 * o * inner + i;                                                  \
        T *b = out + 4 * o * inner + i;                                                      \
        unsigned c = code[n];                                                                \
        b[(c & 3) * inner] = a[0];                                                           \
        b[(c >> 2 & 3) * inner] = a[inner];                                                  \
        b[(c >> 4 & 3) * inner] = a[2 * inner];                                              \
        b[(c >> 6) * inner] = a[3 * inner];                                                  \
    )                                                                                        \
}                                                                                            \
void lipsort_gs4_forward_##SFX(const T *x, T *y, uint8_t *code, int64_t outer, int64_t inner,\
                               int threads) {                                                \
    SPLIT(outer * inner, 2 * outer * inner, threads, gs4_fwd_##SFX(x, y, code, lo, hi, inner)) \
}                                                                                            \
void lipsort_gs4_backward_##SFX(const T *g, const uint8_t *code, T *out, int64_t outer,      \
                                int64_t inner, int threads) {                                \
    SPLIT(outer * inner, 2 * outer * inner, threads, gs4_bwd_##SFX(g, code, out, lo, hi, inner)) \
}

#ifdef __cplusplus
extern "C" {
#endif
DEFINE_SHORT(float, f32)
DEFINE_SHORT(double, f64)
DEFINE(float, f32)
DEFINE(double, f64)
DEFINE_T(float, f32)
DEFINE_T(double, f64)
DEFINE_S4(float, f32)
DEFINE_S4(double, f64)
#ifdef __cplusplus
}
#endif
"""

_FLAGS = ["-O3", "-fPIC", "-shared", "-fno-fast-math"]
# Full-width AVX-512 vectors where the compiler knows the flag (x86-64): the forward loop packs
# comparisons into bytes, and 512-bit lanes measured 1.3x faster there than gcc's default 256.
_TUNING = ["-march=native", "-mprefer-vector-width=512"]
_DTYPES = {torch.float32: "f32", torch.float64: "f64"}


def _compile(cc: list[str], src: Path, out: Path, openmp: bool) -> None:
    threads = ["-fopenmp"] if openmp else []
    for tuning in (_TUNING, _TUNING[:1], []):  # the first set this compiler accepts
        done = subprocess.run([*cc, *_FLAGS, *threads, *tuning, str(src), "-o", str(out)],
                              capture_output=True, text=True)
        if done.returncode == 0:
            return
    raise OSError(f"{' '.join(cc)} failed to compile the native kernels:\n{done.stderr.strip()}")


def _build() -> dict:
    """Compile (once per machine) and load the kernels, ``{dtype: (forward, backward,
    transpose_add, forward4, backward4)}``; raises OSError with the reason."""
    cc, version = compiler("CC", "cc", "C compiler")
    openmp = torch_gomp() and "Free Software Foundation" in version  # gcc links libgomp.so.1
    names = ("cx_forward", "cx_backward", "tadd", "gs4_forward", "gs4_backward")

    def load(path: Path) -> dict:
        lib = ctypes.CDLL(str(path))
        return {dtype: tuple(getattr(lib, f"lipsort_{n}_{sfx}") for n in names) for dtype, sfx in _DTYPES.items()}

    key = [*cc, version, *_FLAGS, *_TUNING, str(openmp), cpu_key()]
    fns = load_cached("compare_exchange.c", key, _SOURCE, lambda src, out: _compile(cc, src, out, openmp), load)
    for dtype, (forward, backward, tadd, forward4, backward4) in fns.items():
        for fn in (forward, backward, forward4, backward4):
            fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
        scalar = ctypes.c_float if dtype == torch.float32 else ctypes.c_double
        tadd.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [scalar, ctypes.c_int]
        for fn in fns[dtype]:
            fn.restype = None
    return fns


LIBRARY = Native(_build, "lipsort: MaxMin and a ± aᵀ fall back to PyTorch ops",
                 enabled=os.environ.get("LIPSORT_NATIVE", "1") != "0")
"""The compiled loops, built on first use; ``LIBRARY.enabled`` is False for this process with
``LIPSORT_NATIVE=0`` at import, and inside :func:`disabled`."""


def kernels(dtype: torch.dtype) -> tuple | None:
    """The compiled ``(forward, backward, transpose_add, forward4, backward4)`` for ``dtype``, or
    None when there are none for it, they are disabled or they cannot be built (the reason is
    warned once)."""
    fns = LIBRARY.get()
    return fns.get(dtype) if fns else None


def disabled():
    """Run without the kernels inside the block (the PyTorch path, as ``LIPSORT_NATIVE=0``)."""
    return LIBRARY.disabled()


class Plan(NamedTuple):
    """How one input shape goes through the kernels: its pairs along ``gdim`` of
    ``grouped_shape`` are rows ``(outer, 2, inner)``; ``keep`` has ``keep_shape``, the input's
    own shape when ``entrywise`` (short rows: a byte per entry, equal for both entries of a
    pair), else one entry per pair or group."""

    forward: Callable
    backward: Callable
    grouped_shape: torch.Size
    gdim: int
    keep_shape: torch.Size
    outer: int
    inner: int
    entrywise: bool = False


@functools.lru_cache(maxsize=256)
def _plan(shape: torch.Size, dim: int, dtype: torch.dtype, group: int) -> Plan | None:
    fns = kernels(dtype)
    if fns is None or not -len(shape) <= dim < len(shape) or shape[dim] % group:
        return None
    dim %= len(shape)
    grouped = shape[:dim] + (shape[dim] // group, group) + shape[dim + 1 :]
    inner = math.prod(shape[dim + 1 :])
    outer = math.prod(shape) // (group * inner) if inner else 0
    entrywise = group == 2 and 1 < inner < SHORT  # the C side's rule for its loops
    keep = shape if entrywise else shape[:dim] + (shape[dim] // group,) + shape[dim + 1 :]
    forward, backward = fns[:2] if group == 2 else fns[3:5]
    return Plan(forward, backward, grouped, dim + 1, keep, outer, inner, entrywise)


def plan(shape: torch.Size, dim: int, dtype: torch.dtype, group: int = 2) -> Plan | None:
    """The :class:`Plan` of MaxMin (``group=2``) or GroupSort(4) (``group=4``) along ``dim`` of
    a contiguous CPU tensor of ``shape`` and ``dtype``, or None where the kernels do not apply
    (no kernel for the dtype, disabled, not built, a size ``group`` does not divide or an
    invalid ``dim``: the PyTorch path raises the errors)."""
    return _plan(shape, dim, dtype, group) if LIBRARY.enabled else None


def compare_exchange(x: torch.Tensor, p: Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, keep)``: every pair of ``x`` exchanged into (max, min) in one pass, and
    ``keep = a ≥ b`` (the pair stayed in place; at both entries of the pair when
    ``p.entrywise``)."""
    y = torch.empty_like(x)
    keep = torch.empty(p.keep_shape, dtype=torch.bool, device=x.device)
    if p.outer:
        p.forward(x.data_ptr(), y.data_ptr(), keep.data_ptr(), p.outer, p.inner, torch.get_num_threads())
    return y, keep


def pair_keep(keep: torch.Tensor, p: Plan) -> torch.Tensor:
    """The mask of :func:`compare_exchange` with one entry per pair (``keep`` itself unless
    ``p.entrywise``), for the PyTorch routing of double backward and batched gradients."""
    return keep.reshape(p.grouped_shape).select(p.gdim, 0) if p.entrywise else keep


def route(grad: torch.Tensor, keep: torch.Tensor, p: Plan) -> torch.Tensor:
    """The backward of :func:`compare_exchange`: each pair of the contiguous ``grad`` sent back
    to the slots its values came from."""
    out = torch.empty_like(grad)
    if p.outer:
        p.backward(grad.data_ptr(), keep.data_ptr(), out.data_ptr(), p.outer, p.inner, torch.get_num_threads())
    return out


def sort4(x: torch.Tensor, p: Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, code)``: every group of four of ``x`` sorted largest first in one pass, and one
    byte per group with the source slot of each output slot (two bits each)."""
    y = torch.empty_like(x)
    code = torch.empty(p.keep_shape, dtype=torch.uint8, device=x.device)
    if p.outer:
        p.forward(x.data_ptr(), y.data_ptr(), code.data_ptr(), p.outer, p.inner, torch.get_num_threads())
    return y, code


def route4(grad: torch.Tensor, code: torch.Tensor, p: Plan) -> torch.Tensor:
    """The backward of :func:`sort4`: each entry of the contiguous ``grad`` sent back to the
    slot its value came from."""
    out = torch.empty_like(grad)
    if p.outer:
        p.backward(grad.data_ptr(), code.data_ptr(), out.data_ptr(), p.outer, p.inner, torch.get_num_threads())
    return out


def plus_transpose(a: torch.Tensor, sign: int) -> torch.Tensor:
    """``a + aᵀ`` (``sign=1``) or ``a − aᵀ`` (``sign=-1``) over the last two dimensions of a
    batch of square matrices, equal bit for bit to the PyTorch expression (so exactly
    symmetric or skew). A tiled pass on CPU float tensors outside autograd, where the PyTorch
    expression reads the transposed operand column by column (7 ms against 1 ms for a
    1024×1024 float32 matrix here); the PyTorch expression elsewhere and below 16384 entries."""
    fns = (
        kernels(a.dtype)
        if a.device.type == "cpu" and a.dim() >= 2 and a.shape[-1] == a.shape[-2]
        and not (a.requires_grad and torch.is_grad_enabled()) and type(a) is torch.Tensor
        else None
    )
    if fns is None or a.numel() < 16384:  # small: a ctypes call costs more than it saves
        return a + a.mT if sign > 0 else a - a.mT
    a = a.contiguous()
    out = torch.empty_like(a, memory_format=torch.contiguous_format)
    d = a.shape[-1]
    batch, unit = a.numel() // (d * d), 1.0 if sign > 0 else -1.0
    fns[2](a.data_ptr(), out.data_ptr(), batch, d, unit, torch.get_num_threads())
    return out
