"""Log-probabilities of answer tokens, summed per row, without materialising [tokens, vocab] logits.

For the hidden state ``h_t`` of each position whose next token ``y_t`` is
scored, a frozen head ``W`` ([V, d]) and bias ``b``::

    z_t = W h_t + b          logp_t = z_t[y_t] - logsumexp(z_t)
    d logp_t / d h_t = -(softmax(z_t) - onehot(y_t)) W = -G_t

:class:`FusedTokenLogps` computes ``logp_t`` and ``G_t`` in the forward, a
chunk of rows at a time (the [c, V] logits live one chunk at a time, the
softmax and its gradient in one generated kernel,
:func:`loraq.kernels.cross_entropy.ce_grad_rows_fused`), and keeps only
``G`` ([N, d], what the SFT loss keeps as ``dh``); backward scales its rows by
the incoming gradient, ``dh_t = -g_t G_t``. So scoring a preference pair costs
the head what an SFT step costs it, although the weight of each token's
gradient (through DPO's sigmoid) is known only after the forward.

A trained head (``--method full``, ``lm_head`` in modules_to_save) and
models whose logits are not just ``W h + b`` take the plain path
:func:`token_logps_reference` (full logits, log-softmax, gather), which is
also the reference the tests hold the fused path to.

Per row: ``sum_r = sum over scored t in row r of logp_t``. GRPO also logs each scored position's entropy,
``H_t = logsumexp(z_t) - sum_v softmax(z_t)_v z_{t,v}`` (:func:`token_entropy`), from the same chunk of logits
(a metric: no gradient).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from loraq.kernels.cross_entropy import ce_grad_rows_fused, ce_grad_rows_reference
from loraq.training.loss import IGNORE_INDEX, LossBuffers, shift_targets
from loraq.training.objective import CausalLMLoss


class FusedTokenLogps(torch.autograd.Function):
    """``logp [N]`` (fp32) of ``targets`` under ``hidden @ weight^T + bias``; the head must be frozen."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows: int, grad_enabled: bool, buffers: LossBuffers,
                entropy: torch.Tensor | None):
        """``entropy`` ([N] fp32, or None): filled with each row's entropy, a metric (no gradient flows from it)."""
        n = hidden.shape[0]
        need_dh = grad_enabled and bool(ctx.needs_input_grad[0])
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_rows = torch.empty_like(hidden) if need_dh else None
        logits_buf = buffers.scratch("logits", (max(1, min(chunk_rows, n)), weight.shape[0]), hidden.dtype,
                                     hidden.device)
        head_t = buffers.head_transposed(weight) if need_dh else None
        for start in range(0, n, chunk_rows):
            h, y = hidden[start:start + chunk_rows], targets[start:start + chunk_rows]
            logits = logits_buf[:h.shape[0]]
            if bias is None:
                torch.mm(h, weight.t(), out=logits)
            else:
                torch.addmm(bias, h, weight.t(), out=logits)
            if entropy is not None:
                entropy[start:start + h.shape[0]] = token_entropy(logits)
            # the same arithmetic with and without gradients: a reference pass and the policy's first step agree
            row_loss = ce_grad_rows_fused(logits, y)
            if row_loss is None:
                row_loss = ce_grad_rows_reference(logits, y)
            logp[start:start + h.shape[0]] = -row_loss
            if need_dh:  # the logits now hold softmax - onehot
                torch.mm(logits, head_t.t() if head_t is not None else weight, out=grad_rows[start:start + h.shape[0]])
        ctx.need_dh = need_dh
        if need_dh:
            ctx.save_for_backward(grad_rows)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        dh = None
        if ctx.need_dh:
            (grad_rows,) = ctx.saved_tensors
            dh = grad_rows * (-grad_logp).to(grad_rows.dtype)[:, None]
        return dh, None, None, None, None, None, None, None


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v`` per row of ``logits`` ([..., V]), fp32 or wider."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)


def token_logps_reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``logp[..., t]`` of ``targets`` (already shifted; -100 = not scored, gives 0) from full logits, in fp32 or
    wider."""
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * (targets != IGNORE_INDEX)


class RowLogps(NamedTuple):
    """Per row: summed log-probability and count of the answer tokens; and of the SFT tokens (ORPO's NLL term,
    which may include the prompt) when they were asked for, else None."""

    answer: torch.Tensor
    answer_tokens: torch.Tensor
    nll: torch.Tensor | None
    nll_tokens: torch.Tensor | None


class SequenceLogps(CausalLMLoss):
    """``forward(input_ids, labels, position_ids, attention_mask, nll_labels=None) -> RowLogps``.

    ``labels`` mark the answer tokens (HF convention, unshifted); ``nll_labels`` optionally mark a second
    set (ORPO's SFT tokens). The model's forward and fused-head choice are :class:`CausalLMLoss`'s.
    """

    def forward(self, input_ids, labels, position_ids, attention_mask=None, nll_labels=None) -> RowLogps:
        answer_targets = shift_targets(labels)
        nll_targets = None if nll_labels is None else shift_targets(nll_labels)
        scored = answer_targets if nll_targets is None else torch.where(answer_targets != IGNORE_INDEX,
                                                                          answer_targets, nll_targets)
        with self._autocast():
            if self._fused and not self._head.weight.requires_grad:
                token_logp = self._fused_token_logps(input_ids, position_ids, attention_mask, scored)[0]
            else:
                logits = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                    use_cache=False).logits
                token_logp = token_logps_reference(logits, scored)
        answer_mask = answer_targets != IGNORE_INDEX
        answer = (token_logp * answer_mask).sum(-1)
        if nll_targets is None:
            return RowLogps(answer, answer_mask.sum(-1), None, None)
        nll_mask = nll_targets != IGNORE_INDEX
        return RowLogps(answer, answer_mask.sum(-1), -(token_logp * nll_mask).sum(-1), nll_mask.sum(-1))

    def _fused_token_logps(self, input_ids, position_ids, attention_mask, targets, temperature: float = 1.0,
                           entropy: bool = False):
        """[R, T] log-probabilities (0 where not scored) through :class:`FusedTokenLogps`, and with ``entropy``
        the [R, T] entropies of the same positions (else None); at a temperature ``tau`` the logits
        ``(W h + b) / tau`` are ``W (h / tau) + b / tau``."""
        hidden, weight, bias = self._hidden_and_head(input_ids, position_ids, attention_mask)
        if temperature != 1.0:
            hidden = hidden / temperature
            bias = None if bias is None else bias / temperature
        flat = targets.reshape(-1)
        idx = (flat != IGNORE_INDEX).nonzero().squeeze(1)
        ent = torch.empty(idx.shape[0], dtype=torch.float32, device=hidden.device) if entropy else None
        picked = FusedTokenLogps.apply(hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype).index_select(0, idx),
                                       weight, bias, flat.index_select(0, idx), 128, torch.is_grad_enabled(),
                                       self.loss_buffers, ent)
        out = torch.zeros(flat.shape[0], dtype=torch.float32, device=picked.device)
        if ent is not None:
            ent = torch.zeros_like(out).index_add(0, idx, ent).view(targets.shape)
        return out.index_add(0, idx, picked).view(targets.shape), ent


class TokenLogps(SequenceLogps):
    """``forward(input_ids, labels, position_ids, attention_mask, temperature=1.0, entropy=False) -> [R, T]``:
    each scored token's log-probability under ``softmax(logits / temperature)`` at its position in ``labels``
    (HF convention, unshifted: column ``t`` holds ``log p(labels[t] | tokens < t)``; 0 where not scored). GRPO's
    per-token terms; the fused head keeps the ``[rows, tokens, vocab]`` logits from ever existing at once. With
    ``entropy``, ``(logps, entropies)``: the entropy of the same distribution at the same positions (a metric,
    detached)."""

    def forward(self, input_ids, labels, position_ids, attention_mask=None, temperature: float = 1.0,
                entropy: bool = False):
        targets = shift_targets(labels)
        with self._autocast():
            if self._fused and not self._head.weight.requires_grad:
                token_logp, ent = self._fused_token_logps(input_ids, position_ids, attention_mask, targets,
                                                          temperature, entropy)
            else:
                logits = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                    use_cache=False).logits / temperature
                token_logp = token_logps_reference(logits, targets)
                ent = token_entropy(logits.detach()) * (targets != IGNORE_INDEX) if entropy else None
        logps = torch.nn.functional.pad(token_logp[:, :-1], (1, 0))
        return (logps, torch.nn.functional.pad(ent[:, :-1], (1, 0))) if entropy else logps


def sequence_logps_reference(model, input_ids, labels, position_ids, attention_mask=None) -> torch.Tensor:
    """Summed answer log-probabilities per row from the model's full logits (the plain definition)."""
    logits = model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                   use_cache=False).logits
    return token_logps_reference(logits, shift_targets(labels)).sum(-1)


__all__ = ["FusedTokenLogps", "RowLogps", "SequenceLogps", "TokenLogps", "sequence_logps_reference",
           "token_entropy", "token_logps_reference"]
