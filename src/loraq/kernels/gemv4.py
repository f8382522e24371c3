"""A C kernel for the product of a few rows with a 4-bit weight on the CPU, read straight from the packed codes.

For ``x`` [R, in] (R = 1..16 rows, any leading shape flattened) and the ``[out, in]`` 4-bit weight
(:mod:`loraq.quant.functional`: blocks over the flattened row-major weight, first element in the high
nibble)::

    scale_b   = absmax[b]                                               (plain scales), or
    scale_b   = nested_code[qabsmax[b]] * nested_absmax[b // 256] + offset    (double quant; as native.py)
    t_b[c]    = code[c] * scale_b                          (the 16-entry table of block b, float32 products)
    y[r, o]   = bias[o] + sum_j x[r, j] * t_{b(o*in + j)}[nibble(o*in + j)]

``t_b[c]`` is bit for bit the float32 weight :func:`~loraq.quant.functional.dequantize_4bit` gives, so the
result differs from ``F.linear(x, dequantize_4bit(packed, state, float32), bias)`` only by the order of the
float32 sum (tests hold it to a float64 reference within float32 accumulation's bound). The weight is never
written out: what a decode step reads is the packed bytes, a quarter of a bf16 weight and an eighth of a
float32 one. bf16 ``x`` and ``bias`` are widened to float32 (exactly), the sum is float32, and the output is
rounded once to ``x``'s dtype.

How: ``x``'s rows are split once per call into even and odd columns (``x[r, 2k]``, ``x[r, 2k+1]``), so byte
``k`` of a weight row pairs its high nibble with the first and its low nibble with the second -- no shuffle.
Per stretch of a weight row inside one block, the block's table is scaled (one multiply per 8 entries) and
kept in registers; 8 bytes (AVX2: codes widened to 8 lanes, each nibble looked up with two ``vpermps`` and a
blend on the index's bit 3) or 16 bytes (AVX-512F: one ``vpermps`` of the whole table) at a time are decoded
once and multiplied-added (FMA) into every row's accumulators; up to 8 rows share a decoding (16 rows: two
passes over a weight row, which is in L1 by then). Tails, and CPUs without AVX2 + FMA, run a plain C loop; an
odd ``in`` (a row starting mid-byte) runs a per-element C loop. Output rows are split across
``torch.get_num_threads()`` OpenMP threads.

The int16 path (``mode="int16"``; the default on AVX2 without AVX-512F, ``LORAQ_GEMV4=float`` switches it
off): codes as int16 ``c_q = round(code * 2^13)`` looked up 32 at a time with two ``vpshufb`` (the low and the
high bytes of the 16 values) and interleaved into int16 lanes by ``vpunpck{l,h}bw``; each ``x`` row rounded
once per call, ``x_q = round(x / s_x)``, ``s_x = max|x_row| / 32767``, stored in the lane order those unpacks
make; ``vpmaddwd`` pairs summed exactly in int32 (``|pair| <= 2 * 2^13 * 32767``, four pairs per lane before
the flush: ``<= 2^31 - 2^19``), then converted and scaled by the block's scale into float32, all rows of a group
sharing each decoded block. Error against the float64 product of ``x`` and the dequantized weight, per output:
``2^-14 sum_j |x_j| |s_j|`` (codes; ``s_j`` the block scale) ``+ (s_x / 2) sum_j |w_j|`` (``x``) plus the
float32 sums' -- for ordinary rows far under bf16's rounding (2^-9 of ``sum_j |x_j w_j|``), growing with
``max|x| / mean|x|`` where one value dwarfs the rest. Rows with a non-finite value or a largest ``|x|`` outside
[1e-30, 1e30], codes beyond [-1, 1], odd ``in`` or blocksize: the float path runs.

Built with ``cc -O3 -march=native -ffp-contract=off`` (:mod:`loraq.kernels.cbuild`); where no compiler works
or ``LORAQ_COMPILE=0``, :func:`matmul_4bit_native` is None and :func:`loraq.quant.functional.matmul_4bit`
runs its reference.
"""
from __future__ import annotations

import ctypes
import logging
import os
import weakref

import torch

from loraq.kernels.cbuild import NATIVE, LazyLibrary
from loraq.kernels.native import C_HELPERS, StateArguments
from loraq.quant.functional import SMALL_BATCH_ROWS, QuantState, packed_bytes

log = logging.getLogger(__name__)

# x and bias as the kernels take them: float32 (kind 0) or bf16 bits widened exactly (kind 1)
C_WIDEN = r"""
static inline float widen(const void *v, int kind, int64_t i) {
    if (!kind) return ((const float *)v)[i];
    const uint32_t u = (uint32_t)((const uint16_t *)v)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
"""
_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
int omp_get_thread_num(void); /* declared here: some toolchains ship gcc without omp.h on the default path */
int omp_get_num_threads(void);
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GEMV_AVX2 1
#endif
""" + C_HELPERS + r"""
#define GROUP 8 /* rows that share one decoding of the codes: their accumulators stay in registers */

typedef struct {
    const uint8_t *packed; const float *code, *absmax; const uint8_t *qabsmax;
    const float *nested_code, *nested_absmax; float offset; int64_t nested_bs;
    int64_t bs, n_out, n_in, half;
    const float *xe, *xo; /* even n_in: x[r][2k] = xe[r * half + k], x[r][2k + 1] = xo[r * half + k] */
    const float *xf;      /* odd n_in: x[r][j] = xf[r * n_in + j] */
    const int16_t *xq;    /* int16 path: x[r][j] ~ xq[r * xstride + lane_pos(j)] * sx[r] * 2^CODE_BITS */
    const float *sx; int64_t xstride;
    int8_t cq_lo[16], cq_hi[16]; /* the low and high bytes of the int16 codes round(code * 2^CODE_BITS) */
} problem;

/* Walking a weight row's blocks without a division per block (one costs as much as decoding 32 codes):
   block b = nb * nested_bs + nr ends at element `end`; its scale is block_scale's, product then sum. */
typedef struct { int64_t b, nb, nr, end; } cursor;

static inline cursor cursor_at(const problem *p, int64_t e) {
    const int64_t b = e / p->bs;
    cursor c = {b, b / p->nested_bs, b % p->nested_bs, (b + 1) * p->bs};
    return c;
}

static inline void cursor_next(const problem *p, cursor *c) {
    ++c->b;
    c->end += p->bs;
    if (++c->nr == p->nested_bs) c->nr = 0, ++c->nb;
}

static inline float cursor_scale(const problem *p, const cursor *c) {
    if (!p->qabsmax) return p->absmax[c->b];
    const float s = p->nested_code[p->qabsmax[c->b]] * p->nested_absmax[c->nb];
    return s + p->offset;
}

/* Bytes [k0, k1) of one weight row (q) against x rows r0 .. r0 + g - 1, t the block's scaled table. */
static inline void bytes_scalar(const problem *p, const uint8_t *q, const float *t, int64_t k0, int64_t k1,
                                int64_t r0, int g, float *acc) {
    for (int64_t k = k0; k < k1; ++k) {
        const float wh = t[q[k] >> 4], wl = t[q[k] & 15];
        for (int r = 0; r < g; ++r) {
            const int64_t at = (r0 + r) * p->half + k;
            acc[r] += wh * p->xe[at];
            acc[r] += wl * p->xo[at];
        }
    }
}

#ifdef GEMV_AVX2
static inline __m256 lookup8(__m256 t_lo, __m256 t_hi, __m256i idx) {
    const __m256 lo = _mm256_permutevar8x32_ps(t_lo, idx), hi = _mm256_permutevar8x32_ps(t_hi, idx);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28))); /* bit 3 -> sign */
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

/* y[r] for x rows r0 .. r0 + g - 1 and weight row o (n_in even, so every block stretch starts on a byte).
   Few rows: two accumulators per row (high and low nibbles) to hide the FMA latency. */
static inline __attribute__((always_inline)) void row_even(const problem *p, int64_t o, int64_t r0, const int g,
                                                           float *out) {
    const int64_t first = o * p->n_in, last = first + p->n_in;
    const uint8_t *q = p->packed + first / 2;
    const int two = g <= 4;
    float tail[GROUP] = {0};
#ifdef __AVX512F__
    __m512 acc16[2 * GROUP];
    _Pragma("GCC unroll 16") for (int r = 0; r < 2 * g; ++r) acc16[r] = _mm512_setzero_ps();
#endif
#ifdef GEMV_AVX2
    __m256 acc8[2 * GROUP];
    _Pragma("GCC unroll 16") for (int r = 0; r < 2 * g; ++r) acc8[r] = _mm256_setzero_ps();
#endif
    for (cursor c = cursor_at(p, first); c.end - p->bs < last; cursor_next(p, &c)) {
        const int64_t e = c.end - p->bs > first ? c.end - p->bs : first, stop = c.end < last ? c.end : last;
        const float s = cursor_scale(p, &c);
        int64_t k = (e - first) / 2;
        const int64_t k1 = (stop - first) / 2;
#ifdef __AVX512F__
        const __m512 t = _mm512_mul_ps(_mm512_loadu_ps(p->code), _mm512_set1_ps(s));
        for (; k + 16 <= k1; k += 16) {
            const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + k)));
            const __m512 wh = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), t);
            const __m512 wl = _mm512_permutexvar_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)), t);
            _Pragma("GCC unroll 8") for (int r = 0; r < g; ++r) {
                const int64_t at = (r0 + r) * p->half + k;
                acc16[r] = _mm512_fmadd_ps(wh, _mm512_loadu_ps(p->xe + at), acc16[r]);
                acc16[two ? g + r : r] = _mm512_fmadd_ps(wl, _mm512_loadu_ps(p->xo + at), acc16[two ? g + r : r]);
            }
        }
#endif
#ifdef GEMV_AVX2
        const __m256 sv = _mm256_set1_ps(s);
        const __m256 t_lo = _mm256_mul_ps(_mm256_loadu_ps(p->code), sv), t_hi = _mm256_mul_ps(_mm256_loadu_ps(p->code + 8), sv);
        for (; k + 8 <= k1; k += 8) {
            const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + k)));
            const __m256 wh = lookup8(t_lo, t_hi, _mm256_srli_epi32(v, 4));
            const __m256 wl = lookup8(t_lo, t_hi, _mm256_and_si256(v, _mm256_set1_epi32(15)));
            _Pragma("GCC unroll 8") for (int r = 0; r < g; ++r) {
                const int64_t at = (r0 + r) * p->half + k;
                acc8[r] = _mm256_fmadd_ps(wh, _mm256_loadu_ps(p->xe + at), acc8[r]);
                acc8[two ? g + r : r] = _mm256_fmadd_ps(wl, _mm256_loadu_ps(p->xo + at), acc8[two ? g + r : r]);
            }
        }
#endif
        if (k < k1) {
            float t_s[16];
            for (int i = 0; i < 16; ++i) t_s[i] = p->code[i] * s;
            bytes_scalar(p, q, t_s, k, k1, r0, g, tail);
        }
    }
    _Pragma("GCC unroll 8") for (int r = 0; r < g; ++r) {
        float sum = tail[r];
#ifdef __AVX512F__
        sum += _mm512_reduce_add_ps(two ? _mm512_add_ps(acc16[r], acc16[g + r]) : acc16[r]);
#endif
#ifdef GEMV_AVX2
        sum += hsum8(two ? _mm256_add_ps(acc8[r], acc8[g + r]) : acc8[r]);
#endif
        out[r] = sum;
    }
}

""" + C_WIDEN + r"""
/* ---- the int16 path (AVX2): codes and x as int16, products summed exactly in int32 ----
   c_q = round(code * 2^CODE_BITS), |c_q| <= 2^13 (|code| <= 1, else the float path runs); per x row
   x_q = round(x / s_x), s_x = max|x_row| / 32767, |x_q| <= 32767. One vpmaddwd lane sums two products:
   |pair| <= 2 * 2^13 * 32767 < 2^27; a chunk of 32 columns adds two pairs per int32 lane and CHUNKS_PER_FLUSH
   chunks are summed before the lane is converted to float: 4 pairs <= 8 * 2^13 * 32767 = 2^31 - 2^19 < 2^31,
   so the int32 sums never overflow and are exact. The float partial then takes the block's scale (FMA). */
#define CODE_BITS 13
#define X_LEVELS 32767
#define CHUNKS_PER_FLUSH (1 << (14 - CODE_BITS))

/* Where column j of a row sits in xq: per 32 columns, the even ones of the first 16, the odd ones, then the
   even and the odd ones of the next 16 -- the int16 lanes vpunpck{l,h}bw make of [high nibbles | low nibbles]. */
static inline int64_t lane_pos(int64_t j) { return (j & ~(int64_t)15) + ((j & 1) << 3) + ((j & 15) >> 1); }

/* Columns [j0, j1) of one weight row (q) in exact int64 sums, scaled by the block's s into tail. */
static inline void cols_int16(const problem *p, const uint8_t *q, int64_t j0, int64_t j1, int64_t r0, int g,
                              float s, float *tail) {
    int64_t sum[GROUP] = {0};
    for (int64_t j = j0; j < j1; ++j) {
        const int nib = (j & 1) ? q[j >> 1] & 15 : q[j >> 1] >> 4;
        const int c = (int)(uint8_t)p->cq_lo[nib] | (int)p->cq_hi[nib] * 256;
        for (int r = 0; r < g; ++r) sum[r] += (int64_t)c * p->xq[(r0 + r) * p->xstride + lane_pos(j)];
    }
    for (int r = 0; r < g; ++r) tail[r] += (float)sum[r] * s;
}

#ifdef GEMV_AVX2
static inline __attribute__((always_inline)) void row_int16(const problem *p, int64_t o, int64_t r0, const int g,
                                                            float *out) {
    const int64_t first = o * p->n_in, last = first + p->n_in;
    const uint8_t *q = p->packed + first / 2;
    const __m256i t_lo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p->cq_lo));
    const __m256i t_hi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p->cq_hi));
    const __m128i m4 = _mm_set1_epi8(15);
    float tail[GROUP] = {0};
    __m256 accf[GROUP];
    _Pragma("GCC unroll 8") for (int r = 0; r < g; ++r) accf[r] = _mm256_setzero_ps();
    for (cursor c = cursor_at(p, first); c.end - p->bs < last; cursor_next(p, &c)) {
        const int64_t j0 = (c.end - p->bs > first ? c.end - p->bs : first) - first;
        const int64_t j1 = (c.end < last ? c.end : last) - first, v0 = (j0 + 31) & ~(int64_t)31, v1 = j1 & ~(int64_t)31;
        const float s = cursor_scale(p, &c);
        if (v0 >= v1) { cols_int16(p, q, j0, j1, r0, g, s, tail); continue; }
        if (j0 < v0) cols_int16(p, q, j0, v0, r0, g, s, tail);
        if (v1 < j1) cols_int16(p, q, v1, j1, r0, g, s, tail);
        const __m256 sv = _mm256_set1_ps(s);
        for (int64_t j = v0; j < v1;) {
            __m256i acc[GROUP];
            _Pragma("GCC unroll 8") for (int r = 0; r < g; ++r) acc[r] = _mm256_setzero_si256();
            const int64_t stop = j + 32 * CHUNKS_PER_FLUSH < v1 ? j + 32 * CHUNKS_PER_FLUSH : v1;
            for (; j < stop; j += 32) {
                const __m128i v = _mm_loadu_si128((const __m128i *)(q + j / 2));
                const __m256i idx = _mm256_set_m128i(_mm_and_si128(v, m4), _mm_and_si128(_mm_srli_epi16(v, 4), m4));
                const __m256i lo = _mm256_shuffle_epi8(t_lo, idx), hi = _mm256_shuffle_epi8(t_hi, idx);
                const __m256i a = _mm256_unpacklo_epi8(lo, hi), b = _mm256_unpackhi_epi8(lo, hi);
                _Pragma("GCC unroll 8") for (int r = 0; r < g; ++r) {
                    const int16_t *xr = p->xq + (r0 + r) * p->xstride + j;
                    const __m256i pa = _mm256_madd_epi16(a, _mm256_loadu_si256((const __m256i *)xr));
                    const __m256i pb = _mm256_madd_epi16(b, _mm256_loadu_si256((const __m256i *)(xr + 16)));
                    acc[r] = _mm256_add_epi32(acc[r], _mm256_add_epi32(pa, pb));
                }
            }
            _Pragma("GCC unroll 8") for (int r = 0; r < g; ++r) accf[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r]), sv, accf[r]);
        }
    }
    _Pragma("GCC unroll 8") for (int r = 0; r < g; ++r) out[r] = (hsum8(accf[r]) + tail[r]) * p->sx[r0 + r];
}

#define ROW_INT16(G) static void row_int16_##G(const problem *p, int64_t o, int64_t r0, int g, float *out) { \
    (void)g; row_int16(p, o, r0, G, out); }
ROW_INT16(1) ROW_INT16(2) ROW_INT16(3) ROW_INT16(4) ROW_INT16(5) ROW_INT16(6) ROW_INT16(7) ROW_INT16(8)
#endif

/* x's rows as int16 in lane_pos order (xq zeroed by the caller) and sx[r] = s_x * 2^-CODE_BITS; the int16
   codes. 0 where the int16 path does not apply: a code beyond [-1, 1], a row with a non-finite value, or one
   whose largest |x| is below 1e-30 or above 1e30 (s_x would lose bits or the sums overflow). */
static int quantize_int16(problem *p, const void *x, int kind, int64_t rows, int16_t *xq, float *sx) {
    for (int i = 0; i < 16; ++i) {
        if (!(fabsf(p->code[i]) <= 1.f)) return 0;
        const int c = (int)lrintf(p->code[i] * (float)(1 << CODE_BITS));
        p->cq_lo[i] = (int8_t)(uint8_t)(c & 255), p->cq_hi[i] = (int8_t)((c - (c & 255)) / 256);
    }
    for (int64_t r = 0; r < rows; ++r) {
        float m = 0.f;
        for (int64_t j = 0; j < p->n_in; ++j) {
            const float v = fabsf(widen(x, kind, r * p->n_in + j));
            if (!(v <= 1e30f)) return 0; /* inf, NaN, or too large */
            m = v > m ? v : m;
        }
        if (m > 0.f && m < 1e-30f) return 0;
        const double inv = m > 0.f ? X_LEVELS / (double)m : 0.;
        for (int64_t j = 0; j < p->n_in; ++j) {
            long v = lrint((double)widen(x, kind, r * p->n_in + j) * inv);
            xq[r * p->xstride + lane_pos(j)] = (int16_t)(v > X_LEVELS ? X_LEVELS : v < -X_LEVELS ? -X_LEVELS : v);
        }
        sx[r] = m / (float)X_LEVELS * (1.f / (float)(1 << CODE_BITS));
    }
    p->xq = xq, p->sx = sx;
    return 1;
}

/* Any n_in (odd: rows start mid-byte), one element at a time. */
static void row_any(const problem *p, int64_t o, int64_t r0, int g, float *out) {
    float acc[GROUP] = {0}, t[16];
    cursor c = cursor_at(p, o * p->n_in);
    for (int64_t j = 0; j < p->n_in; ++j) {
        const int64_t e = o * p->n_in + j;
        if (j == 0 || e == c.end) {
            if (j) cursor_next(p, &c);
            const float s = cursor_scale(p, &c);
            for (int i = 0; i < 16; ++i) t[i] = p->code[i] * s;
        }
        const uint8_t byte = p->packed[e >> 1];
        const float w = t[(e & 1) ? byte & 15 : byte >> 4];
        for (int r = 0; r < g; ++r) acc[r] += w * p->xf[(r0 + r) * p->n_in + j];
    }
    for (int r = 0; r < g; ++r) out[r] = acc[r];
}

typedef void (*row_fn)(const problem *, int64_t, int64_t, int, float *);
#define ROW_EVEN(G) static void row_even_##G(const problem *p, int64_t o, int64_t r0, int g, float *out) { \
    (void)g; row_even(p, o, r0, G, out); }
ROW_EVEN(1) ROW_EVEN(2) ROW_EVEN(3) ROW_EVEN(4) ROW_EVEN(5) ROW_EVEN(6) ROW_EVEN(7) ROW_EVEN(8)
static const row_fn ROWS_EVEN[GROUP + 1] = {0, row_even_1, row_even_2, row_even_3, row_even_4, row_even_5,
                                            row_even_6, row_even_7, row_even_8};

/* Outputs [o0, o1) of every row; rows in groups of at most GROUP, as even as can be (9 rows: 5 + 4). */
static void outputs(const problem *p, const row_fn *table, int64_t rows, int64_t o0, int64_t o1, const float *bias,
                    float *y) {
    const int64_t groups = (rows + GROUP - 1) / GROUP;
    float part[GROUP];
    for (int64_t o = o0; o < o1; ++o) {
        int64_t r0 = 0;
        for (int64_t i = 0; i < groups; ++i) {
            const int g = (int)((rows - r0 + groups - i - 1) / (groups - i));
            if (p->xf) row_any(p, o, r0, g, part);
            else table[g](p, o, r0, g, part);
            for (int r = 0; r < g; ++r) y[(r0 + r) * p->n_out + o] = bias ? part[r] + bias[o] : part[r];
            r0 += g;
        }
    }
}

#if defined(GEMV_AVX2) && !defined(__AVX512F__)
#define INT16_DEFAULT 1
#else
#define INT16_DEFAULT 0
#endif

/* The int16 path where asked for (mode 1, or mode -1 on an AVX2 build without AVX-512F) and it applies: AVX2,
   even n_in and blocksize, x as quantize_int16 takes it. Sets up p and returns its row table, or NULL. */
static const row_fn *int16_table(problem *p, int mode, const void *x, int kind, int64_t rows, int16_t *xq, float *sx) {
#ifdef GEMV_AVX2
    static const row_fn ROWS_INT16[GROUP + 1] = {0, row_int16_1, row_int16_2, row_int16_3, row_int16_4, row_int16_5,
                                                 row_int16_6, row_int16_7, row_int16_8};
    if ((mode == 1 || (mode < 0 && INT16_DEFAULT)) && !p->xf && quantize_int16(p, x, kind, rows, xq, sx))
        return ROWS_INT16;
#else
    (void)p, (void)mode, (void)x, (void)kind, (void)rows, (void)xq, (void)sx;
#endif
    return 0;
}

/* kind: 0 = float32 x, bias and y; 1 = bfloat16 (as uint16 bits). mode: 0 the float path, 1 the int16 path
   where it applies, -1 the build's default. Returns the path that ran (0 float, 1 int16), or -1 where memory ran
   out. */
typedef struct { /* what a call passes that depends on the weight alone (made once per weight in Python) */
    const uint8_t *packed; const float *code, *absmax; const uint8_t *qabsmax; const float *nested_code, *nested_absmax;
    float offset; int64_t nested_bs, blocksize, n_out, n_in;
} weight;

int loraq_gemv4(const weight *w, int64_t rows, const void *x, const void *bias, int kind, void *y, int threads,
                int mode) {
    const uint8_t *packed = w->packed;
    const float *code = w->code, *absmax = w->absmax, *nested_code = w->nested_code, *nested_absmax = w->nested_absmax;
    const uint8_t *qabsmax = w->qabsmax;
    const float offset = w->offset;
    const int64_t nested_bs = w->nested_bs, blocksize = w->blocksize, n_out = w->n_out, n_in = w->n_in;
    const int64_t xstride = (n_in + 31) & ~(int64_t)31;
    char *scratch = (char *)calloc(1, sizeof(float) * (rows * n_in + n_out + (kind ? rows * n_out : 0) + rows)
                                      + sizeof(int16_t) * rows * xstride);
    if (!scratch) return -1;
    float *xs = (float *)scratch, *bias_f = xs + rows * n_in, *yf = kind ? bias_f + n_out : (float *)y;
    float *sx = bias_f + n_out + (kind ? rows * n_out : 0);
    int16_t *xq = (int16_t *)(sx + rows);
    const int even = n_in % 2 == 0 && blocksize % 2 == 0;
    problem p = {packed, code, absmax, qabsmax, nested_code, nested_absmax, offset, nested_bs, blocksize,
                 n_out, n_in, n_in / 2, xs, xs + rows * (n_in / 2), even ? 0 : xs, 0, 0, xstride, {0}, {0}};
    const row_fn *table = int16_table(&p, mode, x, kind, rows, xq, sx);
    for (int64_t r = 0; !table && r < rows; ++r)
        for (int64_t j = 0; j < n_in; ++j)
            xs[even ? (j & 1) * rows * p.half + r * p.half + j / 2 : r * n_in + j] = widen(x, kind, r * n_in + j);
    if (!table) table = ROWS_EVEN;
    for (int64_t o = 0; bias && o < n_out; ++o) bias_f[o] = widen(bias, kind, o);
    if (threads <= 1 || n_out * n_in < (1 << 15)) {
        outputs(&p, table, rows, 0, n_out, bias ? bias_f : 0, yf);
    } else {
        #pragma omp parallel num_threads(threads)
        {
            const int64_t t = omp_get_thread_num(), k = omp_get_num_threads();
            outputs(&p, table, rows, n_out * t / k, n_out * (t + 1) / k, bias ? bias_f : 0, yf);
        }
    }
    for (int64_t i = 0; kind && i < rows * n_out; ++i) ((uint16_t *)y)[i] = bf16_rne(yf[i]);
    free(scratch);
    return table != ROWS_EVEN;
}
"""  # noqa: E501 -- C source: rewrapping it would change the kernel's cache key (a rebuild) for nothing
SOURCE = _SOURCE  # the kernel's C source, which kernels/block.py builds on
_KIND = {torch.float32: 0, torch.bfloat16: 1}
_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MODES = {"auto": -1, "float": 0, "int16": 1}
_DEFAULT_MODE = "float" if os.environ.get("LORAQ_GEMV4", "").lower() == "float" else "auto"
_LIBRARY = LazyLibrary(
    "gemv4", _SOURCE, {"loraq_gemv4": (ctypes.c_int, [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
        ctypes.c_int, ctypes.c_int])},
    flags=("-ffp-contract=off",), what="native 4-bit matmul kernel", instead="dequantizing for each product",
    log=log)


def build(target: tuple[str, ...] = NATIVE) -> ctypes.CDLL:
    """The kernel built for ``target``'s flags (tests build ``-mno-avx2`` and ``-mno-avx512f`` ones); raises."""
    return _LIBRARY.build(target)


def library() -> ctypes.CDLL | None:
    """The kernel for this CPU, or None where it cannot be built (logged once) or kernels are switched off."""
    return _LIBRARY.get()


def _applies(x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None) -> bool:
    if not (x.is_cpu and packed.is_cpu) or x.dtype not in _KIND or len(state.shape) != 2:
        return False
    n_out, n_in = state.shape
    if x.dim() == 0 or x.shape[-1] != n_in or n_in == 0 or n_out == 0 or state.code.numel() != 16:
        return False
    if not 0 < x.numel() // n_in <= SMALL_BATCH_ROWS:
        return False
    return bias is None or (bias.is_cpu and bias.dtype == x.dtype and bias.shape == (n_out,))


class _Weight:
    """What a call passes that depends on the weight alone, made once per state (a decode step calls every layer
    once per token, and making these costs about what the product of a small layer does): the packed bytes as
    uint8 and the kernel's leading arguments. Made anew if the packed tensor or the state's scales were replaced."""

    def __init__(self, packed: torch.Tensor, state: QuantState):
        self.packed, self.source = packed, state.absmax
        self.codes = packed if packed.element_size() == 1 and packed.is_contiguous() else packed_bytes(packed)
        self.codes = self.codes.contiguous()
        self.state_arguments = StateArguments(state)  # keeps the float32 copies the pointers point to
        self.struct = _WeightStruct(self.codes.data_ptr(), *self.state_arguments.values(), state.blocksize,
                                    *state.shape)
        self.address = ctypes.addressof(self.struct)


class _WeightStruct(ctypes.Structure):
    """The C kernel's ``weight``."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("packed", "code", "absmax", "qabsmax", "nested_code",
                                                     "nested_absmax")] + [
        ("offset", ctypes.c_float), ("nested_bs", ctypes.c_int64), ("blocksize", ctypes.c_int64),
        ("n_out", ctypes.c_int64), ("n_in", ctypes.c_int64)]


def weight_arguments(packed: torch.Tensor, state: QuantState) -> _Weight:
    """The C ``weight`` of a 4-bit layer (``.address``), made once per state and kept while the state lives."""
    return _weight(packed, state)


def _weight(packed: torch.Tensor, state: QuantState) -> _Weight:
    weight = _WEIGHTS.get(state)
    if weight is None or weight.packed is not packed or weight.source is not state.absmax:
        weight = _WEIGHTS[state] = _Weight(packed, state)
    return weight


def _pointer(t: torch.Tensor, keep: list[torch.Tensor]) -> int:
    """``t``'s data pointer, through a contiguous copy (kept alive in ``keep``) where it is not contiguous."""
    if not t.is_contiguous():
        t = t.contiguous()
        keep.append(t)
    return t.data_ptr()


def product(x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None,
            lib: ctypes.CDLL | None = None, mode: str = "auto") -> tuple[torch.Tensor, str] | None:
    """(``F.linear(x, dequantize_4bit(packed, state), bias)`` by the C kernel, the path that ran: "float" or
    "int16"), or None where the kernel does not apply (see :func:`matmul_4bit_native`). ``mode``: "auto" (the
    build's default: int16 on AVX2 without AVX-512F, else float; ``LORAQ_GEMV4=float`` makes it float),
    "float", or "int16" (where it applies: AVX2, even ``in`` and blocksize, finite ``x`` rows whose largest
    value lies in [1e-30, 1e30] or is 0, codes within [-1, 1]; the float path elsewhere)."""
    if not _applies(x, packed, state, bias):
        return None
    lib = lib or library()
    if lib is None:
        return None
    keep: list[torch.Tensor] = []
    y = torch.empty((*x.shape[:-1], state.shape[0]), dtype=x.dtype)
    ran = lib.loraq_gemv4(_weight(packed, state).address, x.numel() // state.shape[1], _pointer(x, keep),
                          None if bias is None else _pointer(bias, keep), _KIND[x.dtype], y.data_ptr(),
                          torch.get_num_threads(), _MODES[_DEFAULT_MODE if mode == "auto" else mode])
    return None if ran < 0 else (y, ("float", "int16")[ran])


def matmul_4bit_native(x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None,
                       lib: ctypes.CDLL | None = None, mode: str = "auto") -> torch.Tensor | None:
    """``F.linear(x, dequantize_4bit(packed, state), bias)`` by the C kernel (no autograd), or None where it
    does not apply: not CPU, more than ``SMALL_BATCH_ROWS`` rows, ``x`` neither float32 nor bf16, a bias of
    another dtype or shape, the kernel unavailable. ``lib``: a library from :func:`build`; default
    :func:`library`. ``mode``: the path (:func:`product`)."""
    result = product(x, packed, state, bias, lib, mode)
    return None if result is None else result[0]
