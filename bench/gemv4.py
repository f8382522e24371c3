"""The fused 4-bit product kernel (loraq.kernels.gemv4) against dequantize + matmul and a plain float32 F.linear.

For each weight shape of SmolLM2-135M's blocks (q / o 576 x 576, k / v 192 x 576, gate / up 1536 x 576,
down 576 x 1536) and a 1024-hidden one (1024 x 1024), NF4 + double quantization at blocksize 64, and
1, 4 and 16 rows of float32 ``x``, three paths alternate call by call (``--reps`` rounds after a warm-up):

* fused float / fused int16: ``matmul_4bit_native`` (the C kernel reading the packed codes) with
  ``mode="float"`` (codes looked up as float32, FMA) and ``mode="int16"`` (codes and ``x`` as int16,
  ``vpshufb`` lookups, ``vpmaddwd`` sums: the default on AVX2 without AVX-512F);
* dequant + matmul: what ``Linear4bit`` did for every call before it, the weight dequantized (the C
  dequantization kernel where installed) into the reused buffer, then ``F.linear``;
* fp32: ``F.linear`` with the float32 weight already in memory (8x the bytes; no 4-bit model keeps it).

Printed: median microseconds of each, the fused kernels' rates in GB/s of packed weight bytes
(``out * in / 2`` per call, the scales not counted), the ratios (> 1: int16 is faster), and each fused path's
largest error against float64 relative to the largest output. The last lines add up one SmolLM2 block (its
seven layers) per token.

``--head`` adds the int8 copy of the output head (``loraq.kernels.gemv8``, 49152 x 576 as SmolLM2's tied
head): ``int8_rows_matmul`` by its float and int16 paths against ``F.linear`` with the float32 and the bf16
weight, 1 / 4 / 16 rows of float32 ``x`` (bf16 ``x`` for the bf16 weight).

``--int8`` adds an experiment that is not in loraq (its C source is here, built by the benchmark alone): the
integer dot product fast engines use for 4-bit weights (llama.cpp's IQ4_NL idea) -- ``x`` rounded to int8 per
32 columns, the 16-entry code table rounded to int8 (``round(code * 127)``), 32 codes looked up at once with
``pshufb``, products summed in int16 / int32 (``pmaddubsw``, ``pmaddwd``), then scaled in float32. One
thread, AVX2, ``in`` a multiple of 32, power-of-two blocks of at least 32. Its column is time and the largest
error against a float64 reference relative to the largest output, beside the float kernel's.

    python bench/gemv4.py [--threads 2] [--reps 200] [--dtype fp32|bf16] [--int8] [--head]
    python bench/gemv4.py --smoke        # a 64 x 64 weight, 2 rounds; a kernel that does not build is reported
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smoke  # noqa: E402

SMOL = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
        "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (1024, 1024)]
ROWS = (1, 4, 16)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


INT8_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <immintrin.h>
#define G 4 /* x rows per pass */

/* x [rows][n_in] float32 -> xq (per row, per 32 columns: the 16 even columns then the 16 odd ones, int8) and
   dx[r][g] = max |x| / 127 / 127 (the code table's 1/127 folded in). */
static void quantize_x(const float *x, int64_t rows, int64_t n_in, int8_t *xq, float *dx) {
    const int64_t groups = n_in / 32;
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t g = 0; g < groups; ++g) {
            const float *v = x + r * n_in + 32 * g;
            float m = 0.f;
            for (int j = 0; j < 32; ++j) m = fabsf(v[j]) > m ? fabsf(v[j]) : m;
            const float inv = m > 0.f ? 127.f / m : 0.f;
            int8_t *q = xq + (r * groups + g) * 32;
            for (int k = 0; k < 16; ++k) q[k] = (int8_t)lrintf(v[2 * k] * inv), q[16 + k] = (int8_t)lrintf(v[2 * k + 1] * inv);
            dx[r * groups + g] = m / 127.f / 127.f;
        }
}

int bench_gemv4_int8(const uint8_t *packed, const float *code, const float *scales, int64_t bs_shift, int64_t n_out,
                     int64_t n_in, int64_t rows, const float *x, float *y) {
    const int64_t groups = n_in / 32;
    int8_t *xq = (int8_t *)malloc(rows * n_in);
    float *dx = (float *)malloc(sizeof(float) * rows * groups);
    if (!xq || !dx) return free(xq), free(dx), -1;
    quantize_x(x, rows, n_in, xq, dx);
    int8_t kv[16];
    for (int c = 0; c < 16; ++c) kv[c] = (int8_t)lrintf(code[c] * 127.f);
    const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)kv)), ones = _mm256_set1_epi16(1);
    const __m128i m4 = _mm_set1_epi8(15);
    for (int64_t o = 0; o < n_out; ++o)
        for (int64_t r0 = 0; r0 < rows; r0 += G) {
            const int g_rows = rows - r0 < G ? (int)(rows - r0) : G;
            __m256 acc[G];
            for (int r = 0; r < G; ++r) acc[r] = _mm256_setzero_ps();
            for (int64_t g = 0; g < groups; ++g) {
                const int64_t e = o * n_in + 32 * g;
                const __m128i v = _mm_loadu_si128((const __m128i *)(packed + e / 2));
                const __m256i idx = _mm256_set_m128i(_mm_and_si128(v, m4), _mm_and_si128(_mm_srli_epi16(v, 4), m4));
                const __m256i w = _mm256_shuffle_epi8(table, idx), aw = _mm256_sign_epi8(w, w);
                const float s = scales[e >> bs_shift];
                for (int r = 0; r < g_rows; ++r) {
                    const int64_t at = (r0 + r) * groups + g;
                    const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + at * 32));
                    const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, w)), ones);
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(s * dx[at]), acc[r]);
                }
            }
            for (int r = 0; r < g_rows; ++r) {
                __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
                h = _mm_add_ps(h, _mm_movehl_ps(h, h));
                y[(r0 + r) * n_out + o] = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
            }
        }
    free(xq), free(dx);
    return 0;
}
"""  # noqa: E501 -- C source


def int8_library():
    """The int8 experiment, built for this CPU (AVX2 needed), or None where it cannot be."""
    import ctypes

    from loraq.kernels.cbuild import NATIVE, build

    try:
        return build("gemv4-int8-bench", INT8_SOURCE, NATIVE, {"bench_gemv4_int8": (ctypes.c_int, [
            ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 2)})
    except Exception as exc:
        print(f"the int8 experiment did not build here ({type(exc).__name__}: needs AVX2)")
        return None


def int8_product(lib, packed, state, scales):
    """``x -> y`` (float32, 2-D) by the int8 experiment; ``scales``: the float32 block scales."""
    n_out, n_in = state.shape
    code = state.code.float().contiguous()
    shift = state.blocksize.bit_length() - 1

    def product(x):
        y = torch.empty(x.shape[0], n_out)
        lib.bench_gemv4_int8(packed.data_ptr(), code.data_ptr(), scales.data_ptr(), shift, n_out, n_in, x.shape[0],
                             x.data_ptr(), y.data_ptr())
        return y
    return product


def cpu_name() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def interleaved(paths: list, reps: int) -> list[float]:
    """Median seconds of each path, the paths alternating call by call after one warm-up call each."""
    times: list[list[float]] = [[] for _ in paths]
    for path in paths:
        path()
    for _ in range(reps):
        for t, path in zip(times, paths):
            t0 = time.perf_counter()
            path()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def kernel_library(smoke_run: bool):
    """The kernel built for this CPU (even under LORAQ_COMPILE=0: it is what is measured), or None in a smoke."""
    from loraq.kernels import gemv4

    try:
        return gemv4.build()
    except Exception as exc:
        if not smoke_run:
            raise
        print(f"smoke: the fused kernel did not build here ({type(exc).__name__}); its column repeats dequant")
        return None


def measure(shape, rows: int, dtype: torch.dtype, lib, reps: int, int8_lib=None) -> tuple[dict, dict]:
    """({path: median seconds}, {path: largest error / largest output}) for one shape and row count."""
    import torch.nn.functional as F

    from loraq.kernels.gemv4 import matmul_4bit_native
    from loraq.quant.functional import dequantize_4bit, dequantize_absmax, dequantize_for_product, quantize_4bit

    g = torch.Generator().manual_seed(rows)
    w = torch.randn(shape, generator=g) * 0.02
    packed, state = quantize_4bit(w, 64, "nf4", double_quant=True)
    dense = dequantize_4bit(packed, state, torch.float32)
    x = torch.randn(rows, shape[1], generator=g).to(dtype)
    xf = x.float()
    want = xf.double() @ dense.double().T
    dequant = lambda: F.linear(x, dequantize_for_product(packed, state, dtype))
    fused = {mode: (dequant if lib is None else lambda mode=mode: matmul_4bit_native(x, packed, state, lib=lib,
                                                                                     mode=mode))
             for mode in ("float", "int16")}
    paths = {"fused": fused["float"], "int16": fused["int16"], "dequant": dequant, "fp32": lambda: F.linear(xf, dense)}
    if int8_lib is not None:
        int8 = int8_product(int8_lib, packed.reshape(-1), state, dequantize_absmax(state).contiguous())
        paths["int8"] = lambda: int8(xf)
    errors = {name: float((paths[name]().double() - want).abs().max() / want.abs().max())
              for name in ("fused", "int16", "int8") if name in paths}
    assert errors["fused"] < 1e-2 and errors["int16"] < 1e-2, "a fused result is wrong"
    return dict(zip(paths, interleaved(list(paths.values()), reps))), errors


def print_table(shapes, rows_list, args, lib, int8_lib) -> dict:
    extra = " int8 (experiment) | int8 / int16 | error int8 |" if int8_lib else ""
    print(f"| out x in | rows | fused float | fused int16 | dequant + matmul | fp32 F.linear | float GB/s | int16 GB/s "
          f"| float / int16 | dequant / int16 | fp32 / int16 | error float | error int16 |{extra}")
    print("|---" * (13 + (3 if int8_lib else 0)) + "|")
    results = {}
    for shape in shapes:
        for rows in rows_list:
            t, err = results[shape, rows] = measure(shape, rows, DTYPES[args.dtype], lib, args.reps, int8_lib)
            f, i = t["fused"], t["int16"]
            gb = shape[0] * shape[1] / 2 / 1e9
            line = (f"| {shape[0]} x {shape[1]} | {rows} | {f * 1e6:.1f} us | {i * 1e6:.1f} us "
                    f"| {t['dequant'] * 1e6:.1f} us | {t['fp32'] * 1e6:.1f} us | {gb / f:.2f} | {gb / i:.2f} "
                    f"| {f / i:.2f}x | {t['dequant'] / i:.2f}x | {t['fp32'] / i:.2f}x | {err['fused']:.1e} "
                    f"| {err['int16']:.1e} |")
            if int8_lib:
                line += f" {t['int8'] * 1e6:.1f} us | {i / t['int8']:.2f}x | {err['int8']:.1e} |"
            print(line)
    return results


def head_table(shape, rows_list, reps: int) -> None:
    """The int8 head (loraq.kernels.gemv8) by both paths against F.linear with a float32 and a bf16 weight."""
    import torch.nn.functional as F

    from loraq.kernels import gemv8

    lib = gemv8.build()
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05
    rows8, wb = gemv8.Int8Rows.from_weight(w), w.bfloat16()
    dense = rows8.dequantize().double()
    print(f"\n| head {shape[0]} x {shape[1]} | rows | int8 float | int8 int16 | fp32 F.linear | bf16 F.linear "
          "| int16 GB/s | fp32 / int16 | bf16 / int16 | float / int16 | error int16 |")
    print("|---" * 11 + "|")
    for rows in rows_list:
        x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(rows))
        xb = x.bfloat16()
        want = x.double() @ dense.T
        got = gemv8.int8_rows_matmul(x, rows8, lib=lib, mode="int16")
        err = float((got.double() - want).abs().max() / want.abs().max())
        t = interleaved([lambda x=x: gemv8.int8_rows_matmul(x, rows8, lib=lib, mode="float"),
                         lambda x=x: gemv8.int8_rows_matmul(x, rows8, lib=lib, mode="int16"),
                         lambda x=x: F.linear(x, w), lambda xb=xb: F.linear(xb, wb)], reps)
        print(f"| | {rows} | {t[0] * 1e3:.2f} ms | {t[1] * 1e3:.2f} ms | {t[2] * 1e3:.2f} ms | {t[3] * 1e3:.2f} ms "
              f"| {shape[0] * shape[1] / t[1] / 1e9:.2f} | {t[2] / t[1]:.2f}x | {t[3] / t[1]:.2f}x "
              f"| {t[0] / t[1]:.2f}x | {err:.1e} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the kernel uses as many)")
    ap.add_argument("--reps", type=int, default=200, help="rounds of the paths, after the warm-up")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="x's dtype (the fp32 column stays fp32)")
    ap.add_argument("--int8", action="store_true", help="add the int8-activation experiment (not in loraq)")
    ap.add_argument("--head", action="store_true", help="add the int8 output head (gemv8) against F.linear")
    smoke.add_flag(ap, "a 64 x 64 weight, 1 and 4 rows, the int8 experiment and a 256 x 64 head too")
    args = ap.parse_args(argv)
    shapes, rows_list = SHAPES, ROWS
    if args.smoke:
        smoke.setup()
        shapes, rows_list, args.reps, args.int8, args.head = [(64, 64)], (1, 4), 2, True, True
    else:
        torch.set_num_threads(args.threads)
        import loraq.kernels

        loraq.kernels.install()  # the dequant + matmul column with the C dequantization kernel, as models load
    lib = kernel_library(args.smoke)
    int8_lib = int8_library() if args.int8 and args.dtype == "fp32" else None
    print(f"# fused 4-bit product vs dequant + matmul vs fp32 F.linear -- {dt.datetime.now():%Y-%m-%d %H:%M} -- "
          f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, x {args.dtype}"
          f"{' -- SMOKE RUN, not a measurement' if args.smoke else ''}\n")
    results = print_table(shapes, rows_list, args, lib, int8_lib)
    if not args.smoke:
        print()
        for rows in rows_list:
            f, i, d, p = (sum(results[shape, rows][0][k] for shape in SMOL.values())
                          for k in ("fused", "int16", "dequant", "fp32"))
            print(f"one SmolLM2 block (7 layers), {rows} row(s): int16 {i * 1e3:.3f} ms, float {f * 1e3:.3f} ms "
                  f"({f / i:.2f}x), dequant + matmul {d * 1e3:.3f} ms ({d / i:.2f}x), fp32 {p * 1e3:.3f} ms "
                  f"({p / i:.2f}x)")
    if args.head:
        head_table((256, 64) if args.smoke else (49152, 576), rows_list, 2 if args.smoke else max(args.reps // 10, 5))


if __name__ == "__main__":
    main()
