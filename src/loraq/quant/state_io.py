"""A QuantState as the tensors bitsandbytes stores beside a 4-bit weight, and back.

For a weight key ``W`` (e.g. ``model.layers.0.mlp.up_proj.weight``) the
checkpoint holds, besides the packed uint8 ``W`` itself:

====================================  ======================================
``W.absmax``                          uint8 [n_blocks] (double quant) or float32
``W.quant_map``                       float32 [16], the 4-bit code table
``W.nested_absmax``                   float32 [ceil(n_blocks / 256)] (double quant)
``W.nested_quant_map``                float32 [256] (double quant)
``W.quant_state.bitsandbytes__nf4``   uint8 bytes of a UTF-8 JSON object:
                                      quant_type, blocksize, dtype, shape, and
                                      with double quant nested_blocksize,
                                      nested_dtype, nested_offset (``__fp4`` for FP4)
====================================  ======================================
"""
from __future__ import annotations

import json
from collections.abc import Mapping

import torch

from loraq.choices import QUANT_TYPES
from loraq.quant.codes import quant_type_of
from loraq.quant.errors import QuantizationError
from loraq.quant.functional import FLOAT_DTYPES, QuantState, check_settings

PACKED_STATE_PREFIX = "quant_state.bitsandbytes__"
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def state_to_tensors(state: QuantState) -> dict[str, torch.Tensor]:
    """Suffix (after ``W.``) -> tensor, in bitsandbytes' order."""
    meta: dict = {"quant_type": state.quant_type, "blocksize": state.blocksize,
                  "dtype": DTYPE_NAMES[state.dtype], "shape": list(state.shape)}
    tensors = {"absmax": state.absmax, "quant_map": state.code}
    if state.double_quant:
        tensors["nested_absmax"] = state.nested_absmax
        tensors["nested_quant_map"] = state.nested_code.clone()  # its own storage: safetensors refuses shared ones
        meta.update(nested_blocksize=state.nested_blocksize, nested_dtype="float32", nested_offset=state.offset.item())
    tensors[PACKED_STATE_PREFIX + state.quant_type] = torch.tensor(list(json.dumps(meta).encode("utf-8")),
                                                                   dtype=torch.uint8)
    return tensors


def is_quant_state_key(suffix: str) -> bool:
    return suffix.startswith(PACKED_STATE_PREFIX)


def state_from_tensors(packed: torch.Tensor, tensors: Mapping[str, torch.Tensor], where: str) -> QuantState:
    """Rebuild a QuantState from the tensors stored beside the packed weight ``where`` (named in errors)."""
    meta_keys = [k for k in tensors if is_quant_state_key(k)]
    if len(meta_keys) != 1:
        raise QuantizationError(f"{where}: expected one {PACKED_STATE_PREFIX}nf4|fp4 entry, found {len(meta_keys)}")
    try:
        meta = json.loads(bytes(tensors[meta_keys[0]].to("cpu", torch.uint8).numpy()).decode("utf-8"))
        quant_type, blocksize = meta["quant_type"], int(meta["blocksize"])
        dtype, shape = getattr(torch, meta["dtype"]), torch.Size(meta["shape"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise QuantizationError(f"{where}.{meta_keys[0]}: unreadable quant state ({exc})") from None
    if quant_type not in QUANT_TYPES or dtype not in FLOAT_DTYPES:
        raise QuantizationError(f"{where}: unsupported quant_type {quant_type!r} or dtype {meta['dtype']!r}")
    check_settings(blocksize, quant_type)
    for needed in ("absmax", "quant_map"):
        if needed not in tensors:
            raise QuantizationError(f"{where}.{needed} is missing")
    code = tensors["quant_map"].to(torch.float32)
    if quant_type_of(code) != quant_type:
        raise QuantizationError(f"{where}.quant_map does not match quant_type {quant_type!r}")
    state = QuantState(quant_type, blocksize, shape, dtype, tensors["absmax"], code)
    if "nested_absmax" in tensors:
        try:
            offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=code.device)
            nested_blocksize = int(meta["nested_blocksize"])
        except (KeyError, TypeError, ValueError):
            raise QuantizationError(f"{where}: double-quantized but "
                                    "nested_offset/nested_blocksize are missing") from None
        if "nested_quant_map" not in tensors:
            raise QuantizationError(f"{where}.nested_quant_map is missing")
        state.offset, state.nested_blocksize = offset, nested_blocksize
        state.nested_absmax = tensors["nested_absmax"].to(torch.float32)
        state.nested_code = tensors["nested_quant_map"].to(torch.float32)
    check_consistent(packed, state, where)
    return state


def check_consistent(packed: torch.Tensor, state: QuantState, where: str) -> None:
    """Sizes of the packed weight and the state's tensors must agree with shape and blocksize."""
    expect = {
        "": ((state.numel + 1) // 2, packed.numel()),
        ".absmax": (state.n_blocks, state.absmax.numel()),
    }
    if state.double_quant:
        expect[".nested_absmax"] = (-(-state.n_blocks // state.nested_blocksize), state.nested_absmax.numel())
        expect[".nested_quant_map"] = (256, state.nested_code.numel())
        if state.absmax.dtype != torch.uint8:
            raise QuantizationError(f"{where}.absmax must be uint8 when double-quantized, got {state.absmax.dtype}")
    elif state.absmax.dtype != torch.float32:
        raise QuantizationError(f"{where}.absmax must be float32 without double quantization, got {state.absmax.dtype}")
    if packed.dtype != torch.uint8:
        raise QuantizationError(f"{where}: packed weight must be uint8 "
                                f"(bnb_4bit_quant_storage=uint8), got {packed.dtype}")
    for suffix, (want, got) in expect.items():
        if want != got:
            raise QuantizationError(f"{where}{suffix}: {got} elements, expected {want} for shape {list(state.shape)} "
                                    f"and blocksize {state.blocksize}")
