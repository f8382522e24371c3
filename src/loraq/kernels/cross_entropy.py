"""Cross-entropy and its logit gradient for one chunk of rows, as one generated kernel.

For logits ``z`` [c, V] (any float dtype), targets ``y`` [c] and a factor ``k``
(1 / the loss normalizer), with every sum over the vocabulary in float32::

    m_i = max_j z_ij        s_i = sum_j exp(z_ij - m_i)        lse_i = m_i + log s_i
    loss = sum_i (lse_i - z_i,y_i)
    z_ij <- k * (exp(z_ij - m_i) / s_i - [j == y_i])      (written back in z's dtype)

The eager path in :mod:`loraq.training.loss` spends five passes over the chunk on
this (an fp32 copy inside ``log_softmax``, the softmax, ``exp_``, the scale,
and the copy back to bf16); the generated loop reads the bf16 logits a few
times while they sit in cache and writes the gradient once (``bench/NOTES.md``,
items 5-9). :func:`ce_grad_reference` is the
definition; a test holds the generated kernel to it and to float64.
"""
from __future__ import annotations

import torch

from loraq.kernels.compile import compiled, enabled


def ce_grad_reference(logits: torch.Tensor, targets: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """The module docstring's formulas; overwrites ``logits`` with the gradient, returns the summed loss (fp32)."""
    z = logits.float()
    m = z.amax(-1, keepdim=True)
    e = torch.exp(z - m)
    s = e.sum(-1, keepdim=True)
    loss = (m + torch.log(s) - z.gather(1, targets[:, None])).sum()
    cols = torch.arange(z.shape[1], device=z.device)
    grad = (e / s - (cols[None, :] == targets[:, None]).float()) * factor
    logits.copy_(grad.to(logits.dtype))
    return loss


def ce_grad_fused(logits: torch.Tensor, targets: torch.Tensor, factor: float) -> torch.Tensor | None:
    """:func:`ce_grad_reference` as one generated kernel, or None where kernels are off (the caller goes eager)."""
    if not enabled() or logits.device.type != "cpu" or not logits.is_contiguous():
        return None
    # the factor travels as a tensor: a Python float would be baked into the kernel and recompiled per value
    k = torch.tensor(factor, dtype=torch.float32, device=logits.device)
    return compiled("ce_grad", ce_grad_reference)(logits, targets, k)


def ce_grad_rows_reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per row: the loss ``lse_i - z_i,y_i`` (fp32, [c]); ``logits`` overwritten with ``softmax - onehot`` (k = 1).

    The per-sequence log-probabilities of preference training (:mod:`loraq.training.logps`) need each
    row's value, not their sum; the gradient is scaled per row later, in backward.
    """
    z = logits.float()
    m = z.amax(-1, keepdim=True)
    e = torch.exp(z - m)
    s = e.sum(-1, keepdim=True)
    loss = (m + torch.log(s) - z.gather(1, targets[:, None])).squeeze(1)
    cols = torch.arange(z.shape[1], device=z.device)
    logits.copy_((e / s - (cols[None, :] == targets[:, None]).float()).to(logits.dtype))
    return loss


def ce_grad_rows_fused(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
    """:func:`ce_grad_rows_reference` as one generated kernel, or None where kernels are off."""
    if not enabled() or logits.device.type != "cpu" or not logits.is_contiguous():
        return None
    return compiled("ce_grad_rows", ce_grad_rows_reference)(logits, targets)
