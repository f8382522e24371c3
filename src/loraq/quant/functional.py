"""Blockwise 4-bit quantization (NF4 / FP4) with optional double quantization.

Quantization of a weight ``w`` (float32, bf16 or fp16; read exactly as float32):

1. Flatten row-major; cut into blocks of ``blocksize`` (32..4096, a power of
   two); the last block may be partial.
2. Per block, ``absmax = max |w|`` (float32). Full blocks are scaled as
   ``w * (1 / max(absmax, 1e-38))``, the partial tail block as
   ``w / max(absmax, 1e-38)`` (bitsandbytes does the two differently, and the
   last bit matters at code boundaries); the tail's stored absmax is the
   clamped one. Scaled values are clamped to [-1, 1].
3. Each scaled value goes to the nearest code; a value exactly on a midpoint
   between two codes takes the lower one.
4. Two codes per byte, the FIRST element in the HIGH nibble; an odd count is
   padded with the code of 0.0. Stored as uint8 ``[(numel + 1) // 2, 1]``.
5. With double quantization the absmax vector is stored as 8 bits plus one
   float32 per 256 blocks and a float32 offset (see :mod:`loraq.quant.blockwise8`):
   ``4 + 8/blocksize + 32/(256 * blocksize)`` bits per parameter, 4.127 at 64.

Dequantization: ``w[i] = code[nibble(i)] * absmax[i // blocksize]`` in float32,
then cast to the requested dtype. For the same input the bytes and values
are identical to ``bitsandbytes.functional.quantize_4bit`` /
``dequantize_4bit`` (tests hold them so); :mod:`loraq.quant.reference` has
the plain version of every step, held equal to the fast one here.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from loraq.choices import QUANT_TYPES
from loraq.quant.backends import dequantizers, products
from loraq.quant.blockwise8 import dequantize_blockwise_8bit, quantize_blockwise_8bit
from loraq.quant.codes import (
    code_for,
    dynamic_map_signed,
    midpoints,
    sorted_order,
)
from loraq.quant.errors import QuantizationError

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIN_ABSMAX = 1e-38  # bitsandbytes' floor on a block's scale (an all-zero block)
SMALL_BATCH_ROWS = 16  # rows of x up to which a product kernel (matmul_4bit) reads the packed codes directly
CPU_CHUNK_BYTES = 1 << 18  # packed bytes per eager dequantization step on CPU: a 2 MB float32 scratch (bench/NOTES.md)


@dataclasses.dataclass(eq=False)  # tensors inside: compare fields explicitly
class QuantState:
    """Everything besides the packed bytes that dequantization needs.

    ``absmax`` is float32 [n_blocks], or uint8 [n_blocks] when double-quantized,
    in which case ``offset`` (float32 scalar), ``nested_absmax`` (float32
    [ceil(n_blocks / 256)]) and ``nested_code`` (float32 [256]) are set.
    ``dtype`` is the dtype of the original weight (the default output dtype).
    """

    quant_type: str
    blocksize: int
    shape: torch.Size
    dtype: torch.dtype
    absmax: torch.Tensor
    code: torch.Tensor
    offset: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state's tensors by field name (None fields left out)."""
        names = ("absmax", "code", "offset", "nested_absmax", "nested_code")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @property
    def nbytes(self) -> int:
        """Bytes held by the state's tensors (the packed weight not included)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def scale_bits(self) -> int:
        """Bits spent on the per-block scales: absmax, plus nested absmax with double quantization."""
        bits = self.absmax.numel() * self.absmax.element_size() * 8
        if self.double_quant:
            bits += self.nested_absmax.numel() * 32
        return bits

    def to(self, device: torch.device | str) -> QuantState:
        """A copy with every tensor on ``device``."""
        return dataclasses.replace(self, **{n: t.to(device) for n, t in self.tensors().items()})


def check_settings(blocksize: int, quant_type: str) -> None:
    if blocksize not in BLOCKSIZES:
        raise QuantizationError(f"blocksize {blocksize!r} is not supported; "
                                "use a power of two from 32 to 4096 (default 64)")
    if quant_type not in QUANT_TYPES:
        raise QuantizationError(f"quant_type {quant_type!r} is not one of: {', '.join(QUANT_TYPES)}")


def check_weight(w: torch.Tensor, name: str = "tensor") -> None:
    """Raise :class:`QuantizationError` naming ``name`` unless ``w`` is a non-empty float32/bf16/fp16 tensor."""
    if not isinstance(w, torch.Tensor):
        raise QuantizationError(f"{name}: expected a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise QuantizationError(f"{name}: dtype {w.dtype} cannot be quantized; use float32, bfloat16 or float16")
    if w.numel() == 0:
        raise QuantizationError(f"{name}: the tensor is empty (shape {list(w.shape)}); nothing to quantize")


def check_finite(w: torch.Tensor, absmax: torch.Tensor, name: str) -> None:
    """NaN and inf reach every block's absmax (amax propagates both), so the small vector is checked, not ``w``."""
    if not bool(torch.isfinite(absmax).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise QuantizationError(f"{name}: {bad} NaN or inf value(s); fix the weights before quantizing")


def quantize_4bit(
    w: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
    name: str = "tensor",
) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``w``: returns (packed uint8 [(numel + 1) // 2, 1], QuantState). ``name`` labels errors."""
    check_settings(blocksize, quant_type)
    check_weight(w, name)
    flat = w.detach().reshape(-1).to(torch.float32)  # exact for bf16/fp16
    scaled, absmax = scale_blocks(flat, blocksize)
    check_finite(w, absmax, name)
    code = code_for(quant_type).to(w.device, copy=True)  # each state owns its table, as in bitsandbytes
    packed = pack_nibbles(nearest_codes(scaled, code))
    state = QuantState(quant_type, blocksize, torch.Size(w.shape), w.dtype, absmax, code)
    if double_quant:
        state = compress_absmax(state)
    return packed.unsqueeze(1), state


def scale_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values scaled into [-1, 1] [n], float32 absmax [n_blocks]) -- steps 1-2 of the module docstring."""
    n = flat.numel()
    full = n - n % blocksize
    head = flat[:full].view(-1, blocksize)
    absmax = head.abs().amax(dim=1)
    scaled = (head * torch.reciprocal(absmax.clamp(min=MIN_ABSMAX))[:, None]).clamp_(-1.0, 1.0).reshape(-1)
    if full == n:
        return scaled, absmax
    tail_absmax = flat[full:].abs().amax().clamp(min=MIN_ABSMAX)
    tail = (flat[full:] / tail_absmax).clamp_(-1.0, 1.0)
    return torch.cat([scaled, tail]), torch.cat([absmax, tail_absmax[None]])


def nearest_codes(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """uint8 index of the nearest entry of ``code`` for each value (ties to the lower value), padded to even
    length with 0.0's code.

    The position of a value in sorted code order is the number of midpoints
    strictly below it. A uniform grid over [-1, 1] (``bin(x) = floor((x + 1) * K / 2)``,
    monotonic in x even after float rounding) holds at most one midpoint per
    bin, so ``position = below[bin] + (x > mid[bin])``: two table lookups and one
    comparison per value, instead of one comparison per midpoint.
    ``below[b]`` counts the midpoints whose own bin is before ``b`` -- every x in
    bin ``b`` is above those, by monotonicity -- and ``mid[b]`` is the midpoint in
    bin ``b`` (+inf if none). :func:`nearest_codes_by_comparison` is the plain
    version the tests hold this equal to.
    """
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    order = sorted_order(code)
    below, mid = _grid_tables(tuple(code.tolist()), scaled.device)
    bins = _grid_bin(scaled)
    position = below[bins]
    position.add_(torch.gt(scaled, mid[bins]))
    if torch.equal(order, torch.arange(len(code), device=order.device)):
        return position  # NF4: value order is index order
    return order.to(torch.uint8)[position.long()]


GRID_BINS = 4096  # FP4's two midpoints nearest zero are 0.0052 apart; a bin is 2/4096 = 0.0005 wide


def _grid_bin(x: torch.Tensor) -> torch.Tensor:
    """int64 bin of each value in [-1, 1]: floor((x + 1) * K / 2), clamped to K - 1 (x = 1)."""
    return (x + 1.0).mul_(GRID_BINS / 2).to(torch.int64).clamp_(max=GRID_BINS - 1)


@functools.lru_cache(maxsize=16)
def _grid_tables(code_values: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    code = torch.tensor(code_values, dtype=torch.float32)
    mids = midpoints(code[sorted_order(code)])
    mid_bins = _grid_bin(mids.clone())
    if len(set(mid_bins.tolist())) != len(mids):
        raise AssertionError("two midpoints share a grid bin; raise GRID_BINS")
    below = torch.zeros(GRID_BINS, dtype=torch.uint8)
    mid = torch.full((GRID_BINS,), float("inf"), dtype=torch.float32)
    for b, m in zip(mid_bins.tolist(), mids.tolist()):
        below[b + 1:] += 1
        mid[b] = m
    return below.to(device), mid.to(device)


def nearest_codes_by_comparison(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Reference for :func:`nearest_codes`: position = number of midpoints strictly below, one comparison each."""
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    order = sorted_order(code)
    position = torch.zeros(scaled.shape, dtype=torch.uint8, device=scaled.device)
    for midpoint in midpoints(code[order]).tolist():
        position.add_(torch.gt(scaled, midpoint))
    return order.to(torch.uint8)[position.long()]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [n/2]: element 2k in the high nibble, 2k+1 in the low nibble."""
    return (codes[0::2] << 4) | codes[1::2]


def placeholder_state(shape: tuple[int, ...], blocksize: int, quant_type: str, double_quant: bool,
                      dtype: torch.dtype) -> tuple[torch.Tensor, QuantState]:
    """(packed, QuantState) of a ``shape`` weight with every tensor the right size and nothing computed: for
    planning on tensors without storage (``loraq.planning.probe``), where there are no values to quantize."""
    check_settings(blocksize, quant_type)
    numel = int(torch.Size(shape).numel())
    blocks = -(-numel // blocksize)
    packed = torch.empty((numel + 1) // 2, 1, dtype=torch.uint8)
    state = QuantState(quant_type, blocksize, torch.Size(shape), dtype,
                       torch.empty(blocks, dtype=torch.uint8 if double_quant else torch.float32), code_for(quant_type))
    if double_quant:
        state = dataclasses.replace(state, offset=torch.empty((), dtype=torch.float32),
                                    nested_absmax=torch.empty(-(-blocks // NESTED_BLOCKSIZE), dtype=torch.float32),
                                    nested_code=torch.empty(256, dtype=torch.float32))
    return packed, state


def compress_absmax(state: QuantState) -> QuantState:
    """Double quantization of a state's float32 absmax (bitsandbytes' ``compress_statistics=True``)."""
    offset = state.absmax.mean()
    nested_code = dynamic_map_signed().to(state.absmax.device, copy=True)
    qabsmax, nested_absmax = quantize_blockwise_8bit(state.absmax - offset, nested_code, NESTED_BLOCKSIZE)
    return dataclasses.replace(state, absmax=qabsmax, offset=offset,
                               nested_absmax=nested_absmax, nested_code=nested_code)


def dequantize_absmax(state: QuantState) -> torch.Tensor:
    """float32 [n_blocks]: the per-block scales, ``code8[q] * nested[b // 256] + offset`` when double-quantized."""
    if not state.double_quant:
        return state.absmax.to(torch.float32)
    absmax = dequantize_blockwise_8bit(state.absmax, state.nested_absmax, state.nested_code, state.nested_blocksize)
    return absmax + state.offset


def packed_bytes(packed: torch.Tensor) -> torch.Tensor:
    """The packed 4-bit codes as a flat uint8 tensor (a loaded checkpoint may store them as another 1-byte dtype)."""
    flat = packed.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Tensor[state.shape] in ``dtype`` (default: the original weight's): ``code[nibble] * absmax`` in float32,
    then cast.

    ``code`` is the table of ``state.quant_type`` (a loaded ``quant_map`` is checked to be exactly that table).
    ``out``: a contiguous buffer of ``state.numel`` elements of ``dtype`` the result may be written into (a
    fast path that cannot returns a new tensor); use the returned tensor either way.

    Fast paths registered in :mod:`loraq.quant.backends` run first, in order (``loraq.kernels.install()``
    registers the C kernel, CPU float32 / bf16 output, then the generated one); where none applies, the
    eager path below. All are bitwise equal.

    Eager path: a table lookup turns each packed byte into its two float32
    code values in one gather; one multiply by the block scales writes them
    straight into ``dtype`` (float32 product, rounded once on store). On CPU
    this runs in chunks of whole blocks, so the float32 scratch stays in cache
    and is reused instead of a fresh weight-sized float32 tensor per call.
    """
    dtype = dtype or state.dtype
    if out is not None and (out.dtype != dtype or out.numel() != state.numel or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {dtype} buffer of {state.numel} elements")
    if _without_storage(packed):  # planning on storage-less tensors: the shape is all there is to compute
        return packed.new_empty(state.shape, dtype=dtype)
    for _name, fast_path in dequantizers():
        result = fast_path(packed, state, dtype, out=out)
        if result is not None:
            return result
    return dequantize_4bit_eager(packed, state, dtype, out)


def dequantize_4bit_eager(packed: torch.Tensor, state: QuantState, dtype: torch.dtype,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """The eager path of :func:`dequantize_4bit` (also the one for partial blocks and non-CPU devices)."""
    absmax = dequantize_absmax(state)
    flat = packed_bytes(packed)
    n, bs = state.numel, state.blocksize
    out = torch.empty(n, dtype=dtype, device=flat.device) if out is None else out.view(-1)
    step = CPU_CHUNK_BYTES // (bs // 2) * (bs // 2) if flat.device.type == "cpu" else flat.numel()
    step = max(step, bs // 2)
    index = torch.empty(min(step, flat.numel()), dtype=torch.int32, device=flat.device)
    pairs = torch.empty(min(step, flat.numel()), dtype=torch.int64, device=flat.device)
    table = _byte_table(state.quant_type, flat.device)
    for start in range(0, flat.numel(), step):
        stop = min(start + step, flat.numel())
        chunk_index = index[: stop - start]
        chunk_index.copy_(flat[start:stop])
        values = torch.index_select(table, 0, chunk_index, out=pairs[: stop - start]).view(torch.float32)
        first, last = 2 * start, min(2 * stop, n)  # element range; ``first`` starts a block
        _scale_into(values[: last - first], absmax[first // bs:], bs, out[first:last])
    return out.view(state.shape)


def dequantize_for_product(packed: torch.Tensor, state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    """:func:`dequantize_4bit` into the thread's reused buffer (:mod:`loraq.quant.scratch`) on the CPU: for a
    weight that feeds one product and is dropped -- valid until the next call, never to be saved."""
    from loraq.quant.scratch import buffer

    if _without_storage(packed):
        return dequantize_4bit(packed, state, dtype)

    return dequantize_4bit(packed, state, dtype, out=buffer(state.numel, dtype, packed.device))


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for the 4-bit weight ``W = dequantize_4bit(packed, state, x.dtype)`` ``[out, in]``.

    Where no gradient is asked for (grad mode off, or neither ``x`` nor ``bias`` requires one), the products
    registered in :mod:`loraq.quant.backends` are tried first (``loraq.kernels.install()`` registers the C
    kernel: CPU, up to ``SMALL_BATCH_ROWS`` rows of float32 / bf16 ``x``, which reads the packed codes and
    never writes ``W`` out); they sum in float32 in another order than the reference, so the result equals it
    within float32 rounding, not bit for bit. Otherwise, and where none applies, the reference: ``W`` in
    ``x``'s dtype (into the thread's reused buffer when no autograd graph will keep it), then ``F.linear``.
    """
    needs_graph = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
    if not needs_graph and not _without_storage(packed) and not _without_storage(x):
        for _name, product in products():
            result = product(x, packed, state, bias)
            if result is not None:
                return result
    weight = dequantize_4bit(packed, state, x.dtype) if needs_graph else dequantize_for_product(packed, state, x.dtype)
    return torch.nn.functional.linear(x, weight, bias)


def _without_storage(t: torch.Tensor) -> bool:
    """A fake (``FakeTensorMode``) or meta tensor: no bytes behind it, for a kernel to read or write."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "meta" or is_fake(t)


def _scale_into(values: torch.Tensor, absmax: torch.Tensor, blocksize: int, out: torch.Tensor) -> None:
    """``out[i] = values[i] * absmax[i // blocksize]`` (float32 product, cast on store); a partial last block too."""
    count = values.numel()
    full = count - count % blocksize
    torch.mul(values[:full].view(-1, blocksize), absmax[: full // blocksize, None], out=out[:full].view(-1, blocksize))
    if full < count:
        torch.mul(values[full:], absmax[full // blocksize], out=out[full:])


@functools.lru_cache(maxsize=16)
def _byte_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """int64 [256]: entry ``b`` holds (code[b >> 4], code[b & 15]) as two float32 in memory order."""
    code = code_for(quant_type)
    byte = torch.arange(256)
    pairs = torch.stack([code[byte >> 4], code[byte & 15]], dim=1).contiguous()
    return pairs.view(torch.int64).reshape(-1).to(device)


def row_step(columns: int, blocksize: int, target_elements: int = 1 << 20) -> int:
    """Rows per chunk for :func:`dequantize_4bit_rows`: about ``target_elements`` values, and a multiple of
    ``blocksize / gcd(columns, blocksize)`` so that every chunk starts on a block boundary."""
    import math

    align = blocksize // math.gcd(columns, blocksize)
    return max(align, target_elements // max(columns, 1) // align * align)


def dequantize_4bit_rows(packed: torch.Tensor, state: QuantState, start: int, stop: int,
                         dtype: torch.dtype | None = None, absmax: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``[start, stop)`` of a 2-D 4-bit weight, equal bit for bit to ``dequantize_4bit(...)[start:stop]``.

    Only those rows are decoded: the packed bytes and block scales they cover are a slice of the whole
    (row-major, so rows ``[start, stop)`` are elements ``[start * cols, stop * cols)``), which needs
    ``start * cols`` on a block boundary (:func:`row_step` gives chunk sizes that keep it there).
    ``absmax``: the float32 scales of the whole weight (:func:`dequantize_absmax`), when the caller
    walks several chunks and decodes them once.
    """
    rows, cols = state.shape
    bs = state.blocksize
    first, last = start * cols, min(stop, rows) * cols
    if first % bs:
        raise ValueError(f"row {start} does not start a {bs}-element block of a {cols}-column weight")
    scales = dequantize_absmax(state) if absmax is None else absmax
    part = dataclasses.replace(state, shape=torch.Size([min(stop, rows) - start, cols]),
                               absmax=scales[first // bs: -(-last // bs)], offset=None, nested_absmax=None,
                               nested_code=None)
    return dequantize_4bit(packed_bytes(packed)[first // 2: (last + 1) // 2], part, dtype or state.dtype)
