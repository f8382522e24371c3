"""The training objective as a module: ``CausalLMLoss(model)(input_ids, labels, ...) -> loss``.

For models whose logits are just ``lm_head(hidden)`` the head and the
cross-entropy are fused (:mod:`loraq.training.loss`: no [tokens, vocab]
tensor outlives a chunk); any other model goes through its own forward and
the plain formula, :func:`loss_from_logits`. Wrapping the loss in a module
lets DDP / FSDP see one forward per micro-batch. The module owns the memory
the fused loss reuses from step to step (:class:`~loraq.training.loss.LossBuffers`).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from loraq.data.packing import Batch
from loraq.training.loss import (
    IGNORE_INDEX,
    LossBuffers,
    fused_linear_cross_entropy,
    shift_targets,
)


class CausalLMLoss(nn.Module):
    """``forward(input_ids, labels, position_ids, attention_mask, normalizer) -> loss`` (see the module docstring)."""

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.autocast_dtype = autocast_dtype
        self.loss_buffers = LossBuffers()
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        backbone = getattr(model, getattr(model, "base_model_prefix", "model"), None)
        config = getattr(model, "config", None)
        self._fused = (isinstance(head, nn.Linear) and type(head) is nn.Linear and backbone is not None
                       and not getattr(config, "final_logit_softcapping", None)
                       and not getattr(config, "logit_scale", None) and not getattr(config, "logits_scaling", None))
        self._backbone = backbone
        self._head = head

    @property
    def fused(self) -> bool:
        """Whether the head and the cross-entropy run fused (else the model's own logits and the plain formula)."""
        return self._fused

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device_type = next(self.model.parameters()).device.type
        return torch.autocast(device_type=device_type, dtype=self.autocast_dtype)

    def _hidden_and_head(self, input_ids, position_ids, attention_mask):
        """The backbone's last hidden states and the head's weight and bias, in the compute dtype."""
        hidden = self._backbone(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                use_cache=False).last_hidden_state
        weight, bias = self._head.weight, self._head.bias
        if self.autocast_dtype is not None:
            weight = weight.to(self.autocast_dtype)
            bias = None if bias is None else bias.to(self.autocast_dtype)
        return hidden, weight, bias

    def forward(self, input_ids, labels, position_ids, attention_mask=None, normalizer: float | None = None):
        targets = shift_targets(labels)
        with self._autocast():
            if self._fused:
                hidden, weight, bias = self._hidden_and_head(input_ids, position_ids, attention_mask)
                return fused_linear_cross_entropy(hidden.to(weight.dtype), weight, targets, normalizer, bias=bias,
                                                  buffers=self.loss_buffers)
            logits = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                use_cache=False).logits
        return loss_from_logits(logits, targets, normalizer)

    def release_buffers(self) -> None:
        """Free the loss's reused memory (evaluation and generation after training do without it)."""
        self.loss_buffers.release()


def loss_from_logits(logits: torch.Tensor, targets: torch.Tensor, normalizer: float | None) -> torch.Tensor:
    """Cross-entropy summed over trained positions / normalizer (default: their count), in float32."""
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    n = normalizer if normalizer is not None else max(int((targets != IGNORE_INDEX).sum()), 1)
    return loss / n


def batch_loss(loss_module: nn.Module, batch: Batch, normalizer: float | None) -> torch.Tensor:
    return loss_module(batch.input_ids, batch.labels, batch.position_ids, batch.attention_mask, normalizer)


def unwrapped(loss_module: nn.Module) -> CausalLMLoss:
    """The CausalLMLoss inside a DDP wrapper (FSDP2 shards the module in place)."""
    return getattr(loss_module, "module", loss_module)
