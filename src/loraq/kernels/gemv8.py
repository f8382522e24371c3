"""An int8 copy of a weight, one scale per output row, and a C product of 1-16 rows with it (decoding's head).

:class:`Int8Rows` holds ``q = round(w / s_row)`` (int8 ``[out, in]``) and ``s_row = max|w_row| / 127`` (float32
``[out]``), made once from a float weight: a quarter of a float32 weight's bytes, half a bf16 one's. For the
output head of a small model (49152 x 576, tied to the embeddings) that is what a generated token reads most.
:func:`int8_rows_matmul` gives ``y = (x @ q^T) * s_row`` for ``x`` [R, in] (R = 1..16, float32 or bf16; any
leading shape flattened), in ``x``'s dtype, by one of two paths:

* int16 (AVX2): each ``x`` row rounded once per call to int16, ``x_q = round(x / s_x)``, ``s_x = max|x_row| /
  32767``; 16 codes at a time widened to int16 (``vpmovsxbw``) and multiplied-added pairwise into int32
  (``vpmaddwd``). One lane's pair is at most ``2 * 127 * 32767 < 2^23`` and 256 pairs (4096 columns) are summed
  before the lane is converted to float: ``256 * 2 * 127 * 32767 = 2130641408 < 2^31``, so the integer sums
  are exact. Error against ``x @ (q * s_row)^T`` in float64: at most ``(s_x / 2) sum_j |q_j s_row|`` from
  rounding ``x``, plus float32 conversion, sums and scaling.
* float (AVX2 + FMA, and the plain C loop everywhere): codes widened to float32 and multiplied-added with ``x``;
  only float32 summation's error.

Rows where ``x`` has a non-finite value or a largest ``|x|`` outside [1e-30, 1e30] (other than 0) run the float
path. Output rows are split across ``torch.get_num_threads()`` OpenMP threads. Built as ``gemv4`` is
(:mod:`loraq.kernels.cbuild`); where no compiler works or ``LORAQ_COMPILE=0``, :func:`int8_rows_matmul` returns
None. Nothing in loraq calls it yet: the decode engine is where it goes.
"""
from __future__ import annotations

import ctypes
import logging

import torch

from loraq.kernels.cbuild import NATIVE, LazyLibrary
from loraq.kernels.gemv4 import C_WIDEN
from loraq.kernels.native import C_HELPERS
from loraq.quant.functional import SMALL_BATCH_ROWS

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
int omp_get_thread_num(void);
int omp_get_num_threads(void);
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GEMV_AVX2 1
#endif
#define GROUP 8 /* x rows sharing one load of a weight row */
#define X_LEVELS 32767
#define FLUSH_COLUMNS 4096 /* 256 int32 pairs per lane: exact (module docstring) */

typedef struct { const int8_t *q; const float *scale; int64_t n_out, n_in; } rows8;
typedef struct { const rows8 *w; const float *xf; const int16_t *xq; const float *sx; } problem;

""" + C_HELPERS + C_WIDEN + r"""
#ifdef GEMV_AVX2
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* Weight row o against x rows r0 .. r0 + g - 1, int16 x: exact int32 sums of FLUSH_COLUMNS columns at most. */
static inline __attribute__((always_inline)) void row_int16(const problem *p, int64_t o, int64_t r0, const int g,
                                                            float *out) {
    const int64_t n = p->w->n_in, v1 = n & ~(int64_t)15;
    const int8_t *q = p->w->q + o * n;
    __m256 accf[GROUP];
    int64_t tail[GROUP] = {0};
    _Pragma("GCC unroll 8") for (int r = 0; r < g; ++r) accf[r] = _mm256_setzero_ps();
    for (int64_t j = 0; j < v1;) {
        const int64_t stop = j + FLUSH_COLUMNS < v1 ? j + FLUSH_COLUMNS : v1;
        __m256i acc[GROUP];
        _Pragma("GCC unroll 8") for (int r = 0; r < g; ++r) acc[r] = _mm256_setzero_si256();
        for (; j < stop; j += 16) {
            const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + j)));
            _Pragma("GCC unroll 8") for (int r = 0; r < g; ++r) {
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(p->xq + (r0 + r) * n + j));
                acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(w, xv));
            }
        }
        _Pragma("GCC unroll 8") for (int r = 0; r < g; ++r)
            accf[r] = _mm256_add_ps(accf[r], _mm256_cvtepi32_ps(acc[r]));
    }
    for (int64_t j = v1; j < n; ++j)
        for (int r = 0; r < g; ++r) tail[r] += (int64_t)q[j] * p->xq[(r0 + r) * n + j];
    _Pragma("GCC unroll 8") for (int r = 0; r < g; ++r)
        out[r] = (hsum8(accf[r]) + (float)tail[r]) * p->sx[r0 + r] * p->w->scale[o];
}

/* The same with float32 x: codes widened to float, 8 at a time, two accumulators per row. */
static inline __attribute__((always_inline)) void row_float(const problem *p, int64_t o, int64_t r0, const int g,
                                                            float *out) {
    const int64_t n = p->w->n_in, v1 = n & ~(int64_t)15;
    const int8_t *q = p->w->q + o * n;
    __m256 acc[2 * GROUP];
    _Pragma("GCC unroll 8") for (int r = 0; r < g; ++r) acc[r] = acc[GROUP + r] = _mm256_setzero_ps();
    for (int64_t j = 0; j < v1; j += 16) {
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + j))));
        const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + j + 8))));
        _Pragma("GCC unroll 8") for (int r = 0; r < g; ++r) {
            const float *xr = p->xf + (r0 + r) * n + j;
            acc[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[r]);
            acc[GROUP + r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc[GROUP + r]);
        }
    }
    _Pragma("GCC unroll 8") for (int r = 0; r < g; ++r) {
        float sum = hsum8(_mm256_add_ps(acc[r], acc[GROUP + r]));
        for (int64_t j = v1; j < n; ++j) sum += (float)q[j] * p->xf[(r0 + r) * n + j];
        out[r] = sum * p->w->scale[o];
    }
}
#define ROW(KIND, G) static void row_##KIND##_##G(const problem *p, int64_t o, int64_t r0, int g, float *out) { \
    (void)g; row_##KIND(p, o, r0, G, out); }
ROW(int16, 1) ROW(int16, 2) ROW(int16, 3) ROW(int16, 4) ROW(int16, 5) ROW(int16, 6) ROW(int16, 7) ROW(int16, 8)
ROW(float, 1) ROW(float, 2) ROW(float, 3) ROW(float, 4) ROW(float, 5) ROW(float, 6) ROW(float, 7) ROW(float, 8)
#endif

/* Plain C: float codes times float x. */
static void row_scalar(const problem *p, int64_t o, int64_t r0, int g, float *out) {
    const int64_t n = p->w->n_in;
    const int8_t *q = p->w->q + o * n;
    for (int r = 0; r < g; ++r) {
        float sum = 0.f;
        for (int64_t j = 0; j < n; ++j) sum += (float)q[j] * p->xf[(r0 + r) * n + j];
        out[r] = sum * p->w->scale[o];
    }
}

typedef void (*row_fn)(const problem *, int64_t, int64_t, int, float *);
static const row_fn ROWS_SCALAR[GROUP + 1] = {0, row_scalar, row_scalar, row_scalar, row_scalar, row_scalar,
                                              row_scalar, row_scalar, row_scalar};
#ifdef GEMV_AVX2
static const row_fn ROWS_INT16[GROUP + 1] = {0, row_int16_1, row_int16_2, row_int16_3, row_int16_4, row_int16_5,
                                             row_int16_6, row_int16_7, row_int16_8};
static const row_fn ROWS_FLOAT[GROUP + 1] = {0, row_float_1, row_float_2, row_float_3, row_float_4, row_float_5,
                                             row_float_6, row_float_7, row_float_8};
#endif

static void outputs(const problem *p, const row_fn *table, int64_t rows, int64_t o0, int64_t o1, float *y) {
    const int64_t groups = (rows + GROUP - 1) / GROUP;
    float part[GROUP];
    for (int64_t o = o0; o < o1; ++o)
        for (int64_t i = 0, r0 = 0; i < groups; ++i) {
            const int g = (int)((rows - r0 + groups - i - 1) / (groups - i));
            table[g](p, o, r0, g, part);
            for (int r = 0; r < g; ++r) y[(r0 + r) * p->w->n_out + o] = part[r];
            r0 += g;
        }
}

/* x's rows as int16 (module docstring), or 0 where a row cannot be (the float path then runs). */
static int quantize_x(const void *x, int kind, int64_t rows, int64_t n, int16_t *xq, float *sx) {
    for (int64_t r = 0; r < rows; ++r) {
        float m = 0.f;
        for (int64_t j = 0; j < n; ++j) {
            const float v = fabsf(widen(x, kind, r * n + j));
            if (!(v <= 1e30f)) return 0; /* inf, NaN, or too large */
            m = v > m ? v : m;
        }
        if (m > 0.f && m < 1e-30f) return 0;
        const double inv = m > 0.f ? X_LEVELS / (double)m : 0.;
        for (int64_t j = 0; j < n; ++j) {
            const long v = lrint((double)widen(x, kind, r * n + j) * inv);
            xq[r * n + j] = (int16_t)(v > X_LEVELS ? X_LEVELS : v < -X_LEVELS ? -X_LEVELS : v);
        }
        sx[r] = m / (float)X_LEVELS;
    }
    return 1;
}

/* kind: 0 float32 x and y, 1 bf16. mode: 0 float, 1 int16 where it applies, -1 the build's default (int16 on
   AVX2). Returns the path that ran (0 float, 1 int16) or -1 where memory ran out. */
int loraq_gemv8(const rows8 *w, int64_t rows, const void *x, int kind, void *y, int threads, int mode) {
    const int64_t n = w->n_in;
    char *scratch = (char *)malloc(sizeof(float) * (rows * n + rows + (kind ? rows * w->n_out : 0)) + 2 * rows * n);
    if (!scratch) return -1;
    float *xf = (float *)scratch, *sx = xf + rows * n, *yf = kind ? sx + rows : (float *)y;
    int16_t *xq = (int16_t *)(sx + rows + (kind ? rows * w->n_out : 0));
    problem p = {w, xf, xq, sx};
    const row_fn *table = ROWS_SCALAR;
    int int16 = 0;
#ifdef GEMV_AVX2
    int16 = mode != 0 && quantize_x(x, kind, rows, n, xq, sx);
    table = int16 ? ROWS_INT16 : ROWS_FLOAT;
#else
    (void)mode, (void)quantize_x;
#endif
    for (int64_t i = 0; !int16 && i < rows * n; ++i) xf[i] = widen(x, kind, i);
    if (threads <= 1 || w->n_out * n < (1 << 15)) {
        outputs(&p, table, rows, 0, w->n_out, yf);
    } else {
        #pragma omp parallel num_threads(threads)
        {
            const int64_t t = omp_get_thread_num(), k = omp_get_num_threads();
            outputs(&p, table, rows, w->n_out * t / k, w->n_out * (t + 1) / k, yf);
        }
    }
    for (int64_t i = 0; kind && i < rows * w->n_out; ++i) ((uint16_t *)y)[i] = bf16_rne(yf[i]);
    free(scratch);
    return int16;
}
"""
_KIND = {torch.float32: 0, torch.bfloat16: 1}
_MODES = {"auto": -1, "float": 0, "int16": 1}
_LIBRARY = LazyLibrary(
    "gemv8", _SOURCE, {"loraq_gemv8": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,
                                                       ctypes.c_void_p, ctypes.c_int, ctypes.c_int])},
    flags=("-ffp-contract=off",), what="native int8 head kernel", instead="int8_rows_matmul returns None", log=log)


class _Rows8(ctypes.Structure):
    _fields_ = [("q", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("n_out", ctypes.c_int64),
                ("n_in", ctypes.c_int64)]


class Int8Rows:
    """An ``[out, in]`` weight as int8 codes ``q`` and float32 per-row scales ``scale`` (module docstring)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        if q.dtype != torch.int8 or q.dim() != 2 or scale.shape != (q.shape[0],):
            raise ValueError(f"Int8Rows: int8 [out, in] codes and [out] scales, got {q.dtype} {tuple(q.shape)} "
                             f"and {tuple(scale.shape)}")
        self.q, self.scale = q.contiguous(), scale.to(torch.float32).contiguous()
        self._struct = _Rows8(self.q.data_ptr(), self.scale.data_ptr(), *self.q.shape)
        self.address = ctypes.addressof(self._struct)

    @classmethod
    def from_weight(cls, w: torch.Tensor) -> Int8Rows:
        """``q = round(w / s_row)``, ``s_row = max|w_row| / 127`` (float32; an all-zero row: scale 0, codes 0)."""
        w = w.detach().to(device="cpu", dtype=torch.float32)
        scale = w.abs().amax(dim=1) / 127
        q = torch.where(scale[:, None] > 0, w / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None], 0.0)
        return cls(q.round().clamp(-127, 127).to(torch.int8), scale)

    def dequantize(self) -> torch.Tensor:
        """float32 ``[out, in]``: ``q * s_row``."""
        return self.q.float() * self.scale[:, None]


def build(target: tuple[str, ...] = NATIVE) -> ctypes.CDLL:
    """The kernel built for ``target``'s flags (tests build a ``-mno-avx2`` one); raises."""
    return _LIBRARY.build(target)


def library() -> ctypes.CDLL | None:
    """The kernel for this CPU, or None where it cannot be built (logged once) or kernels are switched off."""
    return _LIBRARY.get()


def product(x: torch.Tensor, rows: Int8Rows, lib: ctypes.CDLL | None = None,
            mode: str = "auto") -> tuple[torch.Tensor, str] | None:
    """(``y``, the path that ran: "float" or "int16"), or None where the kernel does not apply (see
    :func:`int8_rows_matmul`). ``mode``: "auto" (int16 on AVX2), "float" or "int16"."""
    n_out, n_in = rows.q.shape
    if not x.is_cpu or x.dtype not in _KIND or x.dim() == 0 or x.shape[-1] != n_in or n_in == 0:
        return None
    if not 0 < x.numel() // n_in <= SMALL_BATCH_ROWS:
        return None
    lib = lib or library()
    if lib is None:
        return None
    x = x.contiguous()
    y = torch.empty((*x.shape[:-1], n_out), dtype=x.dtype)
    ran = lib.loraq_gemv8(rows.address, x.numel() // n_in, x.data_ptr(), _KIND[x.dtype], y.data_ptr(),
                          torch.get_num_threads(), _MODES[mode])
    return None if ran < 0 else (y, ("float", "int16")[ran])


def int8_rows_matmul(x: torch.Tensor, rows: Int8Rows, lib: ctypes.CDLL | None = None,
                     mode: str = "auto") -> torch.Tensor | None:
    """``(x @ q^T) * s_row`` in ``x``'s dtype, or None where it does not apply: ``x`` not on the CPU, neither
    float32 nor bf16, not ``in`` wide, more than ``SMALL_BATCH_ROWS`` rows, or the kernel unavailable."""
    result = product(x, rows, lib, mode)
    return None if result is None else result[0]
