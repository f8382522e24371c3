"""One C call for a whole decode step of a Llama-shaped model's decoder blocks (float32, a few rows, one token each).

For ``x [R, H]`` (one new token per row) and each block in turn::

    n      = rms(x) * w_1,                         rms(t) = t / sqrt(mean(t^2) + eps)
    q,k,v  = lin_q(n), lin_k(n), lin_v(n)          lin(t) = t W^T + b + (t A^T)(s B)^T   (each part optional)
    q,k    = rope(q), rope(k)                      rope(t)_i = t_i cos_i - t_{i+d/2} sin_i        (i < d/2)
                                                   rope(t)_i = t_i cos_i + t_{i-d/2} sin_i        (i >= d/2)
    K[:, :, c], V[:, :, c] = k, v                  c = the cache's next column (every row the same: left padding)
    a_h    = sum_c softmax_c(q_h . K_{g(h)}[c] * scaling, over real columns) V_{g(h)}[c]   g(h) = h / (heads / kv)
    x      = x + lin_o(a)
    n      = rms(x) * w_2
    x      = x + lin_down(silu(lin_gate(n)) * lin_up(n))                                  silu(t) = t / (1 + e^-t)

For rows routed to adapters (:class:`loraq.lora.rows.RowAdapters`' stacked form) ``lin`` adds, instead of one
adapter's update, ``sum_c C[r, c] (t_r . A_stack[c]) B_stack^T[c]`` over the columns ``c`` with a nonzero
weight ``C[r, c]`` (the row's adapters, each over its slot's columns): each row computes its own adapters only.

``W`` is a 4-bit weight (the product is :mod:`loraq.kernels.gemv4`'s ``loraq_gemv4``, the same function and
arguments the per-layer path calls, so its outputs are bit for bit those) or a float32 one (dot products of 16
columns at a time, two FMA accumulators). The LoRA update is ``rank`` dot products and ``rank`` axpys per row.
A column is real where the row's mask is nonzero; the new token's column always is, so no softmax is empty.

Why: the same step in PyTorch is ~35 operator calls per block at 3-15 us each around seven products that take
~20-130 us each (bench/NOTES.md, "decode"): for a 135M model the calls, not the weights' bytes, set the speed.
The reference is :class:`loraq.generation.lean.LeanDecoder`'s per-module step (tests hold the two equal within
float32 rounding, and both to transformers' tokens). Built as :mod:`loraq.kernels.gemv4`'s source plus this
file's, ``-O3 -march=native -ffp-contract=off``; None where kernels are off or no compiler works.
"""
from __future__ import annotations

import ctypes
import logging

import torch

from loraq.kernels.cbuild import NATIVE, LazyLibrary
from loraq.kernels.gemv4 import SOURCE as GEMV4_SOURCE

log = logging.getLogger(__name__)

_SOURCE = GEMV4_SOURCE + r"""
typedef struct {
    const weight *w4; const float *dense, *bias, *lora_a, *lora_bt; /* lora_bt: (s B)^T, [rank, n_out] */
    const float *stack_a, *stack_bt; /* rows routed to adapters: [cols, n_in] and [cols, n_out] (rows.py's stacks) */
    int64_t rank, n_out, n_in, stack_cols;
} linear;

typedef struct {
    linear q, k, v, o, gate, up, down;
    const float *norm1, *norm2; float eps1, eps2;
    void *keys, *values; /* [rows, kv_heads, length, head_dim], float32 or (cache_bf16) bfloat16 bits */
} block;

typedef struct {
    int64_t rows, hidden, heads, kv_heads, head_dim, inter, length, filled, mask_stride, max_rank, cache_bf16;
    const float *cos, *sin; /* [rows, head_dim] */
    const int64_t *mask;    /* [rows, mask_stride]: column c real where nonzero, c <= filled */
    const float *coef;      /* routed rows: [rows, coef_stride], row r's weight of each stacked column */
    int64_t coef_stride;
    float scaling; int threads;
} step;

static inline float dot(const float *a, const float *b, int64_t n) {
    int64_t j = 0;
    float s = 0.f;
#ifdef GEMV_AVX2
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (; j + 16 <= n; j += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), s1);
    }
    for (; j + 8 <= n; j += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), s0);
    s = hsum8(_mm256_add_ps(s0, s1));
#endif
    for (; j < n; ++j) s += a[j] * b[j];
    return s;
}

static inline void axpy(float a, const float *x, float *y, int64_t n) {
    for (int64_t j = 0; j < n; ++j) y[j] += a * x[j];
}

static void dense_outputs(const linear *l, int64_t rows, const float *x, float *y, int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
        const float *w = l->dense + o * l->n_in;
        const float b = l->bias ? l->bias[o] : 0.f;
        for (int64_t r = 0; r < rows; ++r) y[r * l->n_out + o] = dot(w, x + r * l->n_in, l->n_in) + b;
    }
}

/* Rows [r0, r1) of y += their LoRA updates: the layer's one adapter, (x A^T)(s B)^T (h: rank floats of scratch),
   and, for routed rows, column c of the stacks where the row's weight coef[r][c] is nonzero. */
static void updates(const linear *l, const step *s, const float *x, float *y, float *h, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
        const float *xr = x + r * l->n_in;
        float *yr = y + r * l->n_out;
        for (int64_t i = 0; l->lora_a && i < l->rank; ++i) h[i] = dot(l->lora_a + i * l->n_in, xr, l->n_in);
        for (int64_t i = 0; l->lora_a && i < l->rank; ++i) axpy(h[i], l->lora_bt + i * l->n_out, yr, l->n_out);
        const float *cr = l->stack_a ? s->coef + r * s->coef_stride : 0;
        for (int64_t c = 0; l->stack_a && c < l->stack_cols; ++c) {
            if (cr[c] == 0.f) continue;
            axpy(dot(l->stack_a + c * l->n_in, xr, l->n_in) * cr[c], l->stack_bt + c * l->n_out, yr, l->n_out);
        }
    }
}

/* y = lin(x) for the step's rows of x; h: max_rank floats of scratch per thread. -1 where memory ran out. */
static int linear_apply(const linear *l, const step *s, const float *x, float *y, float *h) {
    const int64_t rows = s->rows;
    const int threads = s->threads;
    if (l->w4) {
        if (loraq_gemv4(l->w4, rows, x, l->bias, 0, y, threads, -1) < 0) return -1;
    } else if (threads <= 1 || l->n_out * l->n_in < (1 << 15)) {
        dense_outputs(l, rows, x, y, 0, l->n_out);
    } else {
        #pragma omp parallel num_threads(threads)
        {
            const int64_t t = omp_get_thread_num(), k = omp_get_num_threads();
            dense_outputs(l, rows, x, y, l->n_out * t / k, l->n_out * (t + 1) / k);
        }
    }
    if (!l->lora_a && !l->stack_a) return 0;
    if (threads <= 1 || rows < 2) {
        updates(l, s, x, y, h, 0, rows);
    } else { /* rows split across threads: each writes its own rows of y */
        #pragma omp parallel num_threads(threads)
        {
            const int64_t t = omp_get_thread_num(), k = omp_get_num_threads();
            updates(l, s, x, y, h + t * s->max_rank, rows * t / k, rows * (t + 1) / k);
        }
    }
    return 0;
}

static void rms(const float *x, const float *w, float eps, int64_t rows, int64_t n, float *y) {
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * n;
        double ss = 0.;
        for (int64_t j = 0; j < n; ++j) ss += (double)xr[j] * xr[j];
        const float inv = 1.f / sqrtf((float)(ss / (double)n) + eps);
        for (int64_t j = 0; j < n; ++j) y[r * n + j] = xr[j] * inv * w[j];
    }
}

/* rope on every head of t [rows, heads * d] with row r's cos/sin [d] */
static void rope(float *t, const step *s, int64_t heads) {
    const int64_t d = s->head_dim, half = d / 2;
    for (int64_t r = 0; r < s->rows; ++r) {
        const float *c = s->cos + r * d, *sn = s->sin + r * d;
        for (int64_t h = 0; h < heads; ++h) {
            float *v = t + (r * heads + h) * d;
            for (int64_t i = 0; i < half; ++i) {
                const float a = v[i], b = v[i + half];
                v[i] = a * c[i] - b * sn[i];
                v[i + half] = b * c[i + half] + a * sn[i + half];
            }
        }
    }
}

/* Column `at` (an element offset) of a cache: the float32 values, or bf16 widened into tmp (head_dim floats). */
static inline const float *cache_row(const step *s, const void *cache, int64_t at, float *tmp) {
    if (!s->cache_bf16) return (const float *)cache + at;
    for (int64_t i = 0; i < s->head_dim; ++i) tmp[i] = widen(cache, 1, at + i);
    return tmp;
}

/* out[r, h] for the (row, head) pairs [p0, p1); scores: filled + 1 + head_dim floats */
static void attend(const block *b, const step *s, const float *q, float *out, int64_t p0, int64_t p1,
                   float *scores) {
    const int64_t d = s->head_dim, cols = s->filled + 1, group = s->heads / s->kv_heads;
    for (int64_t p = p0; p < p1; ++p) {
        const int64_t r = p / s->heads, h = p % s->heads, g = h / group;
        const float *qv = q + p * d;
        const int64_t first = (r * s->kv_heads + g) * s->length * d, *m = s->mask + r * s->mask_stride;
        float *tmp = scores + cols;
        float top = -INFINITY, sum = 0.f;
        for (int64_t c = 0; c < cols; ++c) {
            scores[c] = m[c] ? dot(qv, cache_row(s, b->keys, first + c * d, tmp), d) * s->scaling : -INFINITY;
            top = scores[c] > top ? scores[c] : top;
        }
        for (int64_t c = 0; c < cols; ++c) sum += scores[c] = m[c] ? expf(scores[c] - top) : 0.f;
        float *o = out + p * d;
        for (int64_t i = 0; i < d; ++i) o[i] = 0.f;
        for (int64_t c = 0; c < cols; ++c)
            if (m[c]) axpy(scores[c] / sum, cache_row(s, b->values, first + c * d, tmp), o, d);
    }
}

static void attention(const block *b, const step *s, const float *q, float *out, float *scores) {
    const int64_t pairs = s->rows * s->heads, cols = s->filled + 1;
    if (s->threads <= 1 || pairs * cols * s->head_dim < (1 << 16)) {
        attend(b, s, q, out, 0, pairs, scores);
        return;
    }
    #pragma omp parallel num_threads(s->threads)
    {
        const int64_t t = omp_get_thread_num(), k = omp_get_num_threads();
        attend(b, s, q, out, pairs * t / k, pairs * (t + 1) / k, scores + t * (cols + s->head_dim));
    }
}

/* k, v [rows, kv_heads * d] into column `filled` of the block's cache */
static void cache_write(const block *b, const step *s, const float *k, const float *v) {
    const int64_t d = s->head_dim;
    for (int64_t r = 0; r < s->rows; ++r)
        for (int64_t g = 0; g < s->kv_heads; ++g) {
            const int64_t at = ((r * s->kv_heads + g) * s->length + s->filled) * d, from = (r * s->kv_heads + g) * d;
            if (s->cache_bf16) {
                for (int64_t i = 0; i < d; ++i) ((uint16_t *)b->keys)[at + i] = bf16_rne(k[from + i]);
                for (int64_t i = 0; i < d; ++i) ((uint16_t *)b->values)[at + i] = bf16_rne(v[from + i]);
            } else {
                memcpy((float *)b->keys + at, k + from, sizeof(float) * d);
                memcpy((float *)b->values + at, v + from, sizeof(float) * d);
            }
        }
}

typedef struct { float *n, *q, *k, *v, *a, *t, *g, *u, *h, *scores; } buffers;

static int one_block(const block *b, const step *s, float *x, const buffers *w) {
    const int64_t R = s->rows, H = s->hidden;
    rms(x, b->norm1, b->eps1, R, H, w->n);
    if (linear_apply(&b->q, s, w->n, w->q, w->h) || linear_apply(&b->k, s, w->n, w->k, w->h)
        || linear_apply(&b->v, s, w->n, w->v, w->h)) return -1;
    rope(w->q, s, s->heads);
    rope(w->k, s, s->kv_heads);
    cache_write(b, s, w->k, w->v);
    attention(b, s, w->q, w->a, w->scores);
    if (linear_apply(&b->o, s, w->a, w->t, w->h)) return -1;
    for (int64_t i = 0; i < R * H; ++i) x[i] += w->t[i];
    rms(x, b->norm2, b->eps2, R, H, w->n);
    if (linear_apply(&b->gate, s, w->n, w->g, w->h) || linear_apply(&b->up, s, w->n, w->u, w->h)) return -1;
    for (int64_t i = 0; i < R * s->inter; ++i) w->g[i] = w->g[i] / (1.f + expf(-w->g[i])) * w->u[i];
    if (linear_apply(&b->down, s, w->g, w->t, w->h)) return -1;
    for (int64_t i = 0; i < R * H; ++i) x[i] += w->t[i];
    return 0;
}

/* Every block in turn on x [rows, hidden] (updated in place). 0, or -1 where memory ran out. */
int loraq_decode_blocks(const block *blocks, int64_t n_blocks, const step *s, float *x) {
    const int64_t R = s->rows, qd = s->heads * s->head_dim, kd = s->kv_heads * s->head_dim;
    const int64_t threads = s->threads > 1 ? s->threads : 1;
    const int64_t total = R * (2 * s->hidden + 2 * qd + 2 * kd + 2 * s->inter) + threads * (s->max_rank + s->filled + 1 + s->head_dim);
    float *all = (float *)malloc(sizeof(float) * (total > 0 ? total : 1));
    if (!all) return -1;
    buffers w;
    w.n = all, w.t = w.n + R * s->hidden, w.q = w.t + R * s->hidden, w.a = w.q + R * qd, w.k = w.a + R * qd;
    w.v = w.k + R * kd, w.g = w.v + R * kd, w.u = w.g + R * s->inter, w.h = w.u + R * s->inter;
    w.scores = w.h + threads * s->max_rank;
    int failed = 0;
    for (int64_t i = 0; i < n_blocks && !failed; ++i) failed = one_block(blocks + i, s, x, &w);
    free(all);
    return failed ? -1 : 0;
}
"""  # noqa: E501


class Linear(ctypes.Structure):
    """The C ``linear``: a 4-bit weight (gemv4's struct) or a float32 ``[out, in]`` one, bias, LoRA factors."""

    _fields_ = [(n, ctypes.c_void_p) for n in ("w4", "dense", "bias", "lora_a", "lora_bt", "stack_a", "stack_bt")] + [
        (n, ctypes.c_int64) for n in ("rank", "n_out", "n_in", "stack_cols")]


LINEARS = ("q", "k", "v", "o", "gate", "up", "down")


class Block(ctypes.Structure):
    """The C ``block``: its seven linear layers, norms and KV cache."""

    _fields_ = [(n, Linear) for n in LINEARS] + [("norm1", ctypes.c_void_p), ("norm2", ctypes.c_void_p),
                                                 ("eps1", ctypes.c_float), ("eps2", ctypes.c_float),
                                                 ("keys", ctypes.c_void_p), ("values", ctypes.c_void_p)]


class Step(ctypes.Structure):
    """The C ``step``: shapes, this token's rotary ``cos``/``sin`` and the rows' mask."""

    _fields_ = [(n, ctypes.c_int64) for n in ("rows", "hidden", "heads", "kv_heads", "head_dim", "inter", "length",
                                              "filled", "mask_stride", "max_rank", "cache_bf16")] + [
        ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p), ("mask", ctypes.c_void_p), ("coef", ctypes.c_void_p),
        ("coef_stride", ctypes.c_int64), ("scaling", ctypes.c_float), ("threads", ctypes.c_int)]


_LIBRARY = LazyLibrary(
    "decode_blocks", _SOURCE, {"loraq_decode_blocks": (ctypes.c_int, [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p])},
    flags=("-ffp-contract=off",), what="native decode step", instead="one call per module", log=log)


def build(target: tuple[str, ...] = NATIVE) -> ctypes.CDLL:
    """The kernel built for ``target``'s flags (tests build a ``-mno-avx2`` one: the portable loops); raises."""
    return _LIBRARY.build(target)


def library() -> ctypes.CDLL | None:
    """The decode-step kernel for this CPU, or None where it cannot be built or kernels are switched off."""
    return _LIBRARY.get()


def decode_blocks(lib: ctypes.CDLL, blocks: ctypes.Array, step: Step, x: torch.Tensor) -> None:
    """Run every block on ``x [rows, hidden]`` (float32, contiguous; updated in place)."""
    step.threads = torch.get_num_threads()
    if lib.loraq_decode_blocks(ctypes.addressof(blocks), len(blocks), ctypes.addressof(step), x.data_ptr()) < 0:
        raise MemoryError("the native decode step could not allocate its scratch")
