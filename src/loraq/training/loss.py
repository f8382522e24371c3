"""Causal-LM loss without materialising full fp32 logits.

For hidden states ``h`` ([N, d], one row per position whose next token is
trained), output head ``W`` ([V, d]) and targets ``y``::

    logits_i = W h_i                       (in the compute dtype, fp32 accumulate)
    loss     = sum_i (logsumexp(logits_i) - logits_i[y_i]) / normalizer

Its gradient is known as soon as the forward is done::

    dlogits_i = (softmax(logits_i) - onehot(y_i)) / normalizer
    dh_i      = dlogits_i W                 dW = sum_i dlogits_i^T h_i

so :class:`FusedLinearCrossEntropy` computes both in the forward, a chunk of
rows at a time, and keeps only ``dh`` ([N, d]) (and ``dW`` when the head is
trained) for backward: no [N, V] tensor outlives its chunk, and the head's
matmul runs once instead of twice. Rows whose label is ignored (prompt
tokens, padding, the last position) are dropped before the head, so they cost
no head FLOPs at all. The tests hold it to the plain formula (full logits,
``F.cross_entropy``) in float64.
"""
from __future__ import annotations

import torch

from loraq.kernels.cross_entropy import ce_grad_fused

IGNORE_INDEX = -100


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """targets[t] = labels[t + 1]; the last position predicts nothing."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[..., :-1] = labels[..., 1:]
    return targets


class FusedLinearCrossEntropy(torch.autograd.Function):
    """loss = CE(h @ W^T (+ b), y).sum() / normalizer, gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, normalizer: float, chunk_rows: int, grad_enabled: bool,
                buffers: LossBuffers):
        n, _ = hidden.shape
        # needs_input_grad stays True under torch.no_grad(), so the caller says whether grads are wanted
        need_dh, need_dw, need_db = (grad_enabled and bool(x) for x in ctx.needs_input_grad[:3])
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        dh = torch.empty_like(hidden) if need_dh else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
        db = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_db else None
        inv = 1.0 / float(normalizer)
        # chunk-sized scratch reused across chunks and steps: a fresh 100+ MB tensor per step costs more in
        # page faults than the softmax itself
        rows = min(chunk_rows, n)
        vocab = weight.shape[0]
        logits_buf = buffers.scratch("logits", (rows, vocab), hidden.dtype, hidden.device)
        head_t = buffers.head_transposed(weight) if need_dh and not need_dw else None
        for start in range(0, n, chunk_rows):
            h = hidden[start:start + chunk_rows]
            y = targets[start:start + chunk_rows]
            c = h.shape[0]
            logits = logits_buf[:c]
            if bias is None:
                torch.mm(h, weight.t(), out=logits)
            else:
                torch.addmm(bias, h, weight.t(), out=logits)
            need_grad = need_dh or need_dw or need_db
            chunk_loss = ce_grad_fused(logits, y, inv) if need_grad else None
            if chunk_loss is not None:  # one generated pass: the logits now hold dlogits
                total += chunk_loss
                g = logits
            else:
                # log-softmax reads the compute-dtype logits once and writes fp32 (no separate upcast pass)
                logp_buf = buffers.scratch("logp", (rows, vocab), torch.float32, hidden.device)
                logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32, out=logp_buf[:c])
                total -= logp.gather(1, y[:, None]).sum()
                if not need_grad:
                    continue
                # dlogits = (softmax - onehot) / normalizer, in place over the chunk's log-probabilities
                grad = logp.exp_()
                grad.scatter_add_(1, y[:, None], torch.full((c, 1), -1.0, dtype=grad.dtype, device=grad.device))
                grad.mul_(inv)
                g = grad if hidden.dtype == torch.float32 else logits.copy_(grad)  # the logits are spent: reuse them
            if need_dh:
                torch.mm(g, head_t.t() if head_t is not None else weight, out=dh[start:start + chunk_rows])
            if need_dw:
                dw.add_(g.t() @ h)
            if need_db:
                db.add_(g.sum(0, dtype=torch.float32))
        ctx.save_for_backward(*(t for t in (dh, dw, db) if t is not None))
        ctx.has = (need_dh, need_dw, need_db)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        ctx.hidden_dtype = hidden.dtype
        return total * inv

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        need_dh, need_dw, need_db = ctx.has
        unit = bool(grad_out == 1)  # the usual case: skip a pass over dh

        def scaled(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            return (t if unit else t * grad_out.to(t.dtype)).to(dtype)

        dh = scaled(saved.pop(0), ctx.hidden_dtype) if need_dh else None
        dw = scaled(saved.pop(0), ctx.dtypes[0]) if need_dw else None
        db = scaled(saved.pop(0), ctx.dtypes[1]) if need_db else None
        return dh, dw, db, None, None, None, None, None


class LossBuffers:
    """Memory the loss reuses from call to call, owned by whoever computes the loss (a run's loss module).

    * chunk scratch: a fresh 100+ MB tensor per step costs more in page
      faults than the softmax itself, so one buffer per name is kept and
      regrown when a larger one is needed;
    * a frozen head's transposed copy ``weight.t()`` [d, V] for ``dh =
      dlogits @ weight``: from it the product runs at the matmul's full speed
      on the CPU (bench/NOTES.md, items 5-9), for one more copy of the head.
      Only for frozen heads; rebuilt whenever the weight's storage or version
      changes.

    :meth:`release` frees both (they also go with the owner).
    """

    def __init__(self):
        self._scratch: dict[str, torch.Tensor] = {}
        self._head_key: tuple | None = None
        self._head_t: torch.Tensor | None = None

    def scratch(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self._scratch.get(name)
        numel = shape[0] * shape[1]
        if buf is None or buf.dtype != dtype or buf.device != device or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._scratch[name] = buf
        return buf[:numel].view(shape)

    def head_transposed(self, weight: torch.Tensor) -> torch.Tensor | None:
        if weight.device.type != "cpu" or weight.requires_grad:
            return None
        key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype)
        if self._head_key != key:
            self._head_t = None  # drop the old copy before making the new one
            self._head_key, self._head_t = key, weight.detach().t().contiguous()
        return self._head_t

    def release(self) -> None:
        self._scratch.clear()
        self._head_key = self._head_t = None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               normalizer: float | None = None, bias: torch.Tensor | None = None,
                               chunk_rows: int = 128, buffers: LossBuffers | None = None) -> torch.Tensor:
    """Sum of next-token cross-entropy over trained rows / normalizer (default: their count).

    ``hidden`` is [..., d] and ``targets`` [...] (already shifted, -100 = ignored). ``buffers``: memory
    kept for the next call (default: none kept).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    keep = targets != IGNORE_INDEX
    if normalizer is None:
        normalizer = max(int(keep.sum()), 1)
    idx = keep.nonzero().squeeze(1)
    return FusedLinearCrossEntropy.apply(hidden.index_select(0, idx), weight, bias, targets.index_select(0, idx),
                                         float(normalizer), chunk_rows, torch.is_grad_enabled(),
                                         buffers if buffers is not None else LossBuffers())
