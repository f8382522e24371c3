"""A hand-written C kernel for 4-bit dequantization on the CPU, built on first use with the system compiler.

The math is :func:`loraq.quant.functional.dequantize_4bit_eager`'s, element
for element (tests hold the two bitwise equal)::

    scale_b  = absmax[b]                                   (plain scales), or
    scale_b  = nested_code[q[b]] * nested_absmax[b // 256] + offset   (double quant; product, then sum, in float32)
    w[2j]    = round(code[byte_j >> 4] * scale_{2j // bs})        (float32 product, rounded once to the output dtype)
    w[2j+1]  = round(code[byte_j & 15] * scale_{(2j+1) // bs})

Why it exists: Inductor's generated kernel for this (:mod:`loraq.kernels.dequant`)
does the table lookup as a scalar loop with a bounds check per element into a
float32 scratch, then scales it in a second pass, and each call pays for
Dynamo's guards; a QLoRA step calls it twice per frozen layer (bench/NOTES.md,
item 10). Here one pass
over the bytes does it: with AVX-512, 16 bytes are widened to 16 lanes, both
nibbles looked up in a register holding the 16-entry table (``vpermps``),
scaled, and, for bf16, rounded to nearest-even with integer ops and stored as
32 interleaved values -- no gather, no scratch. Without AVX-512 the same loop
runs scalar (the compiler may vectorise it).

Built with ``cc -O3 -march=native -ffp-contract=off`` (no fused multiply-add:
the two scale operations must round separately, as PyTorch's do) into
loraq's cache, keyed by the source, the compiler and the CPU's flags, and
loaded with ctypes (:mod:`loraq.kernels.cbuild`). Linux only for now; where no
compiler works or ``LORAQ_COMPILE=0``, :func:`library` is None and callers
use the generated or eager path. Threads: blocks are split across ``torch.get_num_threads()``
OpenMP threads, linked against the same ``libgomp`` PyTorch loaded.
"""
from __future__ import annotations

import ctypes
import logging

import torch

from loraq.kernels.cbuild import NATIVE, LazyLibrary
from loraq.quant.functional import QuantState, packed_bytes

log = logging.getLogger(__name__)

# The two helpers every 4-bit C kernel of loraq's shares (:mod:`loraq.kernels.gemv4` includes them too): a block's
# scale, and float32 -> bfloat16 rounded to nearest-even (NaN kept a quiet NaN).
C_HELPERS = r"""
static inline float block_scale(const float *absmax, const uint8_t *qabsmax, const float *nested_code,
                                const float *nested_absmax, float offset, int64_t nested_bs, int64_t b) {
    if (!qabsmax) return absmax[b];
    float s = nested_code[qabsmax[b]] * nested_absmax[b / nested_bs];
    return s + offset;
}

static inline uint16_t bf16_rne(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
"""
_SOURCE = r"""
#include <stdint.h>
#include <string.h>
int omp_get_thread_num(void); /* declared here: some toolchains ship gcc without omp.h on the default path */
int omp_get_num_threads(void);
#ifdef __AVX512F__
#include <immintrin.h>
#endif
""" + C_HELPERS + r"""
/* Blocks [b0, b1): out_kind 0 = float32, 1 = bfloat16 (as uint16 bits). blocksize is even. */
static void dequant_blocks(const uint8_t *packed, const float *code, const float *absmax, const uint8_t *qabsmax,
                           const float *nested_code, const float *nested_absmax, float offset, int64_t nested_bs,
                           int64_t blocksize, int out_kind, void *out, int64_t b0, int64_t b1) {
    const int64_t bpb = blocksize / 2;
#ifdef __AVX512F__
    const __m512 table = _mm512_loadu_ps(code);
    const __m512i fifteen = _mm512_set1_epi32(15), one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff);
    const __m512i high_half = _mm512_set1_epi32((int)0xffff0000u);
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
#endif
    for (int64_t b = b0; b < b1; ++b) {
        const float s = block_scale(absmax, qabsmax, nested_code, nested_absmax, offset, nested_bs, b);
        const uint8_t *p = packed + b * bpb;
        int64_t j = 0;
#ifdef __AVX512F__
        const __m512 sv = _mm512_set1_ps(s);
        for (; j + 16 <= bpb; j += 16) {
            __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + j)));
            __m512 hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table), sv);
            __m512 lo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(v, fifteen), table), sv);
            int64_t at = 2 * (b * bpb + j);
            if (out_kind == 1) {
                __m512i uh = _mm512_castps_si512(hi), ul = _mm512_castps_si512(lo);
                uh = _mm512_add_epi32(uh, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(uh, 16), one)));
                ul = _mm512_add_epi32(ul, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(ul, 16), one)));
                __m512i pair = _mm512_or_si512(_mm512_srli_epi32(uh, 16), _mm512_and_si512(ul, high_half));
                __mmask16 nan_hi = _mm512_cmp_ps_mask(hi, hi, _CMP_UNORD_Q), nan_lo = _mm512_cmp_ps_mask(lo, lo, _CMP_UNORD_Q);
                if (nan_hi | nan_lo) break; /* the scalar loop below handles NaN exactly */
                _mm512_storeu_si512((void *)((uint16_t *)out + at), pair);
            } else {
                _mm512_storeu_ps((float *)out + at, _mm512_permutex2var_ps(hi, first, lo));
                _mm512_storeu_ps((float *)out + at + 16, _mm512_permutex2var_ps(hi, second, lo));
            }
        }
#endif
        for (; j < bpb; ++j) {
            const uint8_t byte = p[j];
            const float hi = code[byte >> 4] * s, lo = code[byte & 15] * s;
            const int64_t at = 2 * (b * bpb + j);
            if (out_kind == 1) {
                ((uint16_t *)out)[at] = bf16_rne(hi);
                ((uint16_t *)out)[at + 1] = bf16_rne(lo);
            } else {
                ((float *)out)[at] = hi;
                ((float *)out)[at + 1] = lo;
            }
        }
    }
}

void loraq_dequant4(const uint8_t *packed, const float *code, const float *absmax, const uint8_t *qabsmax,
                    const float *nested_code, const float *nested_absmax, float offset, int64_t nested_bs,
                    int64_t blocksize, int64_t n_blocks, int out_kind, void *out, int threads) {
    if (threads <= 1 || n_blocks < 64) {
        dequant_blocks(packed, code, absmax, qabsmax, nested_code, nested_absmax, offset, nested_bs, blocksize,
                       out_kind, out, 0, n_blocks);
        return;
    }
    #pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), k = omp_get_num_threads();
        int64_t b0 = n_blocks * t / k, b1 = n_blocks * (t + 1) / k;
        dequant_blocks(packed, code, absmax, qabsmax, nested_code, nested_absmax, offset, nested_bs, blocksize,
                       out_kind, out, b0, b1);
    }
}
"""  # noqa: E501 -- C source: rewrapping it would change the kernel's cache key (a rebuild) for nothing
_OUT_KIND = {torch.float32: 0, torch.bfloat16: 1}
_LIBRARY = LazyLibrary(
    "dequant4", _SOURCE, {"loraq_dequant4": (None, [ctypes.c_void_p] * 6 + [
        ctypes.c_float, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_int])},
    flags=("-ffp-contract=off",), what="native dequantization kernel", instead="using the generated one", log=log)


def _build(flags: tuple[str, ...] = NATIVE) -> ctypes.CDLL:
    """Compile (once per source, compiler, flags and CPU) into loraq's cache and load the library."""
    return _LIBRARY.build(flags)


def library() -> ctypes.CDLL | None:
    """The built kernel library, or None where it cannot be built (logged once) or kernels are switched off."""
    return _LIBRARY.get()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class StateArguments:
    """A QuantState as the C kernels take it: ``code, absmax, qabsmax, nested_code, nested_absmax, offset,
    nested_bs`` (:meth:`values`), the plain or the double-quantized scales; the other ones' pointers NULL.
    Holds the contiguous float32 copies it made until the kernel has run; ``source`` is the state's ``absmax``
    it was made from."""

    def __init__(self, state: QuantState):
        self.source = state.absmax
        self.code = state.code.to(torch.float32).contiguous()
        if state.double_quant:
            self.absmax, self.qabsmax = None, state.absmax.contiguous()
            self.nested_code = state.nested_code.to(torch.float32).contiguous()
            self.nested_absmax = state.nested_absmax.to(torch.float32).contiguous()
            self.offset, self.nested_bs = float(state.offset), state.nested_blocksize
        else:
            self.absmax, self.qabsmax = state.absmax.to(torch.float32).contiguous(), None
            self.nested_code = self.nested_absmax = None
            self.offset, self.nested_bs = 0.0, 1
        self._values = (self.code.data_ptr(), _ptr(self.absmax), _ptr(self.qabsmax), _ptr(self.nested_code),
                        _ptr(self.nested_absmax), self.offset, self.nested_bs)

    def values(self) -> tuple:
        return self._values


def dequantize_native(packed: torch.Tensor, state, dtype: torch.dtype, lib: ctypes.CDLL | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor | None:
    """``dequantize_4bit(packed, state, dtype)`` by the C kernel, or None where it does not apply.

    Applies to CPU tensors, float32 / bfloat16 output, whole blocks of at least 32 values. ``lib``: a
    library from :func:`_build` (tests build one without AVX-512); default :func:`library`. ``out``: a
    contiguous CPU buffer of the weight's size in ``dtype`` to write into (else a new tensor).
    """
    if packed.device.type != "cpu" or dtype not in _OUT_KIND or state.code.numel() != 16:
        return None
    n, bs = state.numel, state.blocksize
    if n % bs or bs < 32 or bs % 32:
        return None
    lib = lib or library()
    if lib is None:
        return None
    flat = packed_bytes(packed).contiguous()
    out = torch.empty(state.shape, dtype=dtype) if out is None else out.view(state.shape)
    args = StateArguments(state)
    lib.loraq_dequant4(flat.data_ptr(), *args.values(), bs, n // bs, _OUT_KIND[dtype], out.data_ptr(),
                       torch.get_num_threads())
    return out
