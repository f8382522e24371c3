"""A lean decode step for the Llama-shaped families (Llama, Mistral, Qwen2): the model's own modules, less the
framework around them.

transformers' forward spends most of a small model's decode step outside its matrix products (mask building,
cache bookkeeping, output objects, hooks: bench/NOTES.md, "decode"). Here each block is::

    h  = x + o_proj(attention(rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1)))      n1 = rms_norm_1(x)
    x' = h + down_proj(act(gate_proj(n2)) * up_proj(n2))                              n2 = rms_norm_2(h)

with the model's own linear layers called as modules (4-bit, LoRA, per-row adapters all act as usual), its
own rotary embedding module for ``cos``/``sin`` (once per step, every RoPE scaling it knows), its norms'
weights and epsilons through ``torch.nn.functional.rms_norm``, and
``rope(t) = t cos + rotate_half(t) sin``, ``rotate_half([t1, t2]) = [-t2, t1]`` (halves of the head dim).
Attention is ``softmax(q k^T / sqrt(d) + mask) v`` by ``scaled_dot_product_attention`` (grouped KV heads
shared, ``enable_gqa``) over the keys kept so far. The KV cache is loraq's: one ``[rows, kv_heads, length,
head_dim]`` pair per block, allocated once, written at the next free position (every row at the same column:
the batch is left-padded), attended up to the last written column. A padded query attends to itself only
(its output is never used), so no row of the softmax is empty.

:func:`supports` says when this applies (the family, plain RMSNorms, no sliding window within the length,
``LORAQ_COMPILE`` not ``0``, no FSDP-sharded parameters); the engine otherwise uses transformers' forward with its
static cache, which is also the reference the tests hold this one to.
"""
from __future__ import annotations

import os
import weakref

import torch
import torch.nn.functional as F
from torch import nn

FAMILIES = ("llama", "mistral", "qwen2")


def supports(model: nn.Module, length: int) -> bool:
    """This step computes ``model`` for sequences of up to ``length`` tokens (see the module docstring)."""
    if os.environ.get("LORAQ_COMPILE", "1").lower() in {"0", "false", "no", "off"}:
        return False
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in FAMILIES:
        return False
    window = getattr(config, "sliding_window", None)
    windowed = getattr(config, "use_sliding_window", True) and window is not None
    if windowed and length > window:
        return False
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, n) for n in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    if _sharded(model):  # FSDP2: each block gathers its shards in its own forward, which this step does not call
        return False
    return all(_plain_norm(n) for b in inner.layers for n in (b.input_layernorm, b.post_attention_layernorm))


def _sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _plain_norm(norm: nn.Module) -> bool:
    return type(norm).__name__.endswith("RMSNorm") and hasattr(norm, "variance_epsilon") and hasattr(norm, "weight")


class LeanCache:
    """Keys and values of every block, ``[rows, kv_heads, length, head_dim]``, and how many columns are filled."""

    def __init__(self, blocks: int, rows: int, kv_heads: int, length: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        shape = (rows, kv_heads, length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(blocks)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(blocks)]
        self.filled = 0

    def write(self, block: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` ``[rows, kv_heads, T, d]`` at the next columns; all keys and values so far."""
        end = self.filled + k.shape[2]
        self.keys[block][:, :, self.filled:end] = k
        self.values[block][:, :, self.filled:end] = v
        return self.keys[block][:, :, :end], self.values[block][:, :, :end]

    def join(self, mask: torch.Tensor, other: LeanCache, other_mask: torch.Tensor,
             room: int) -> tuple[LeanCache, torch.Tensor]:
        """This cache's rows then ``other``'s in one cache, and their mask (``mask`` / ``other_mask``: 1 = a real
        token, one column per filled column). Both are left-padded to the wider, ``W``, after dropping the
        leading columns that no row of this cache uses any more; ``room`` free columns follow."""
        lead = int((mask.sum(0) > 0).nonzero()[0]) if mask.numel() else 0
        mine, theirs = self.filled - lead, other.filled
        width = max(mine, theirs)
        rows, kv_heads, _, head_dim = self.keys[0].shape
        total = rows + other.keys[0].shape[0]
        joined = LeanCache(0, total, kv_heads, width + room, head_dim, self.keys[0].dtype, self.keys[0].device)
        for first, second, into in ((self.keys, other.keys, joined.keys), (self.values, other.values, joined.values)):
            for a, b in zip(first, second):
                c = a.new_zeros((total, kv_heads, width + room, head_dim))
                c[:rows, :, width - mine:width] = a[:, :, lead:self.filled]
                c[rows:, :, width - theirs:width] = b[:, :, :theirs]
                into.append(c)
        joined.filled = width
        merged = mask.new_zeros((total, width))
        merged[:rows, width - mine:] = mask[:, lead:]
        merged[rows:, width - theirs:] = other_mask
        return joined, merged

    def reorder_cache(self, rows: torch.Tensor) -> None:
        """Only ``rows`` stay (the engine's name for it, as transformers' caches)."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]


class LeanDecoder:
    """``forward(ids, mask, positions, cache) -> last logits`` for a Llama-shaped model (module docstring)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.inner = model.model
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scaling = self.inner.layers[0].self_attn.scaling
        self.dtype = self.inner.embed_tokens.weight.dtype
        self.head = decode_head(model.lm_head)
        from loraq.generation.fused import FusedBlocks, enabled

        self.fused = FusedBlocks(self.inner, self.heads, self.kv_heads, self.head_dim, self.scaling) if enabled() \
            else None

    def new_cache(self, rows: int, length: int) -> LeanCache:
        device = self.inner.embed_tokens.weight.device
        return LeanCache(len(self.inner.layers), rows, self.kv_heads, length, self.head_dim, self.dtype, device)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: LeanCache) -> torch.Tensor:
        """Logits ``[rows, V]`` (float32) of the last position; ``mask [rows, filled + T]`` (1 = a real token)."""
        x = self.inner.embed_tokens(ids)
        cos, sin = self.inner.rotary_emb(x, positions)
        if self.fused is None or not self.fused.run(x, cos, sin, mask, cache):
            x = self._blocks(x, (cos.unsqueeze(1), sin.unsqueeze(1)), _attention_mask(mask, ids.shape[1]), cache)
        cache.filled += ids.shape[1]
        last = _rms(self.inner.norm, x[:, -1])
        logits = self.head(last) if self.head is not None else None
        return (logits if logits is not None else self.model.lm_head(last)).float()

    def _blocks(self, x: torch.Tensor, rope, attend: torch.Tensor, cache: LeanCache) -> torch.Tensor:
        """Every block, module by module (the reference of :mod:`loraq.generation.fused`)."""
        for index, block in enumerate(self.inner.layers):
            x = x + self._attention(block.self_attn, _rms(block.input_layernorm, x), rope, attend, cache, index)
            n = _rms(block.post_attention_layernorm, x)
            mlp = block.mlp
            x = x + mlp.down_proj(mlp.act_fn(mlp.gate_proj(n)) * mlp.up_proj(n))
        return x

    def _attention(self, attn: nn.Module, n: torch.Tensor, rope, attend: torch.Tensor, cache: LeanCache,
                   index: int) -> torch.Tensor:
        rows, t, _ = n.shape
        q = attn.q_proj(n).view(rows, t, self.heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(n).view(rows, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(n).view(rows, t, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        keys, values = cache.write(index, k, v)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attend, scale=self.scaling,
                                             enable_gqa=self.kv_heads != self.heads)
        return attn.o_proj(out.transpose(1, 2).reshape(rows, t, self.heads * self.head_dim))


# a head smaller than this is read in its own dtype: the int8 copy pays off on large vocabularies only
INT8_HEAD_MIN_BYTES = 8 << 20
_int8_heads: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decode_head(head: nn.Module):
    """The output head for decode steps (``x [rows, hidden] -> logits``, or None where it does not apply): the
    weight's int8 copy with one float32 scale per row (:class:`loraq.kernels.gemv8.Int8Rows`: ``w ~ q * s_row``,
    ``|w - q s_row| <= s_row / 2``), made once per weight version and kept while the head module lives. A quarter of
    a float32 head's bytes, and most of a small model's bytes per token. Used for a plain ``nn.Linear`` head of at
    least ``INT8_HEAD_MIN_BYTES`` without bias; the tests hold greedy tokens to transformers' up to near ties."""
    weight = getattr(head, "weight", None)
    if type(head) is not nn.Linear or head.bias is not None or weight is None or weight.device.type != "cpu":
        return None
    if weight.numel() * weight.element_size() < INT8_HEAD_MIN_BYTES or weight.dtype not in (torch.float32,
                                                                                            torch.bfloat16):
        return None
    from loraq.kernels.gemv8 import Int8Rows, int8_rows_matmul, library

    if library() is None:
        return None
    version = (weight.data_ptr(), weight._version)  # the same storage, not written since
    kept = _int8_heads.get(head)
    if kept is None or kept[0] != version:
        kept = _int8_heads[head] = (version, Int8Rows.from_weight(weight))
    rows = kept[1]
    return lambda x: int8_rows_matmul(x, rows)


def _rotate_half(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[-1] // 2
    return torch.cat((-t[..., half:], t[..., :half]), dim=-1)


def _rms(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm: normalised in float32, back to the input's dtype, then times the weight."""
    if x.dtype == torch.float32 and norm.weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)
    return norm.weight * F.rms_norm(x.float(), (x.shape[-1],), None, norm.variance_epsilon).to(x.dtype)


def _attention_mask(mask: torch.Tensor, t: int) -> torch.Tensor:
    """``[rows, 1, T, filled + T]`` booleans: a query sees the real keys up to its own column (a pad query: itself)."""
    total = mask.shape[1]
    real = mask.bool()[:, None, None, :]
    if t == 1:
        return real
    columns = torch.arange(total, device=mask.device)
    query_columns = columns[total - t:, None]
    causal = columns[None, :] <= query_columns
    own = columns[None, :] == query_columns
    return (real & causal) | own
