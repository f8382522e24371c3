"""DoRA, weight-decomposed LoRA (Liu et al., 2024), as PEFT computes it (``use_dora``).

For a frozen ``W0`` [out, in] (as ``nn.Linear`` holds it; a Conv1D's weight
transposed), an adapter's ``s B A`` and a trained magnitude ``m`` [out]::

    W' = (m / n) * (W0 + s B A)          n_o = || (W0 + s B A)[o, :] ||_2

(``n`` is the paper's column norm of ``W^T``: one norm per output). ``n`` is a
constant for backward -- the paper's section 4.3; PEFT detaches it -- so with
``c = m / n``::

    y = W' x + b = c * (W0 x) + b + c * s B A x
                 = base(x) + (c - 1) * (base(x) - b) + c * s B A x

and with dropout ``d`` on the adapter's input, PEFT's form::

    y = base(x) + (c - 1) * W0 d(x) + c * s B A d(x)

``m`` starts as ``n`` (so ``W' = W0 + s B A`` at the start). Merging writes
``W'``. In PEFT's files ``m`` is the tensor ``<module>.lora_magnitude_vector``.

``n`` is computed in chunks of rows: each chunk of ``W0`` (decoded on its own
for a 4-bit base, :func:`loraq.quant.functional.dequantize_4bit_rows`) plus
``s B[rows] A``, its row norms taken and the chunk freed -- no dense copy of a
4-bit weight is made, let alone kept.
"""
from __future__ import annotations

import torch
from torch import nn

from loraq.modules import linear_weight

CHUNK_ELEMENTS = 1 << 20  # values of W0 decoded at a time: a 4 MB float32 scratch


def _is_4bit(base: nn.Module) -> bool:
    return hasattr(base, "quant_state") and hasattr(base, "dequantize_rows")


def weight_row_chunks(base: nn.Module, chunk_elements: int = CHUNK_ELEMENTS):
    """``(start, stop, rows)``: ``W0[start:stop]`` in float32, chunk after chunk (``[out, in]`` orientation)."""
    if _is_4bit(base):
        from loraq.quant.functional import dequantize_absmax, row_step

        out_features, in_features = base.quant_state.shape
        step = row_step(in_features, base.quant_state.blocksize, chunk_elements)
        scales = dequantize_absmax(base.quant_state)
        for start in range(0, out_features, step):
            rows = base.dequantize_rows(start, start + step, torch.float32, scales)
            yield start, min(start + step, out_features), rows
        return
    weight = linear_weight(base).detach()
    step = max(1, chunk_elements // max(weight.shape[1], 1))
    for start in range(0, weight.shape[0], step):
        yield start, min(start + step, weight.shape[0]), weight[start:start + step].to(torch.float32, copy=True)


@torch.no_grad()
def weight_norm(base: nn.Module, a: torch.Tensor, b: torch.Tensor, scale: float,
                chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """``n = ||W0 + s B A||`` per output row, float32 [out], without a gradient (see the module docstring)."""
    a32, b32 = a.detach().float(), b.detach().float()
    norms = torch.empty(b32.shape[0], dtype=torch.float32, device=a32.device)
    for start, stop, rows in weight_row_chunks(base, chunk_elements):
        rows.addmm_(b32[start:stop], a32, alpha=scale)
        torch.linalg.vector_norm(rows, dim=1, out=norms[start:stop])
    return norms


def reference_weight_norm(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """The definition, in float64 on the whole matrix: what :func:`weight_norm` is tested against."""
    return torch.linalg.vector_norm(weight.double() + scale * (b.double() @ a.double()), dim=1)
