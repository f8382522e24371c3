"""The planner's activation terms against the bytes autograd really keeps for backward.

A small random Llama goes through loraq's own training setup (4-bit loading or
not, the fast paths, LoRA or every weight trained, checkpointing, the fused
loss). A ``saved_tensors_hooks`` pair records every tensor the forward saves
for backward, each storage once, the model's own weights left out: that total
is the reference. The planner, which sees only config.json and the file
headers, must name the same bytes.
"""
from __future__ import annotations

import pytest
import torch

from loraq.config import TrainConfig
from loraq.planning.activations import activation_bytes, block_bytes, heap_bytes
from loraq.planning.settings import RunSettings
from loraq.planning.shapes import model_shape


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("plan_llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(str(out))
    tiny_tokenizer.save_pretrained(str(out))
    return out


# --init calibrated with a frozen pair of another rank than the adapter's
CALIBRATED = {"init": "calibrated", "correction_rank": 24}


def saved_bytes(folder, method: str, batch: int, length: int, grad_checkpointing: bool = False, pad: int = 0,
                init: dict | None = None) -> int:
    """Bytes autograd keeps after one training forward of loraq's setup (storages once, weights excluded)."""
    return sum(saved_storages(folder, method, batch, length, grad_checkpointing, pad, init).values())


def saved_storages(folder, method: str, batch: int, length: int, grad_checkpointing: bool = False,
                   pad: int = 0, init: dict | None = None) -> dict[int, int]:
    """``{storage address: bytes}`` of what autograd keeps after one training forward (weights excluded)."""
    from loraq.kernels import apply_fast_paths
    from loraq.lora.config import LoraConfig
    from loraq.lora.model import inject_lora
    from loraq.models.load import load_model
    from loraq.quant.linear import Linear4bit
    from loraq.training.objective import CausalLMLoss

    # the quantizing inits load the full-precision weights and quantize the targets themselves
    model = load_model(str(folder), method="lora" if init else method,
                       dtype="fp32" if method == "full" else "bf16").model
    apply_fast_paths(model)
    if method == "full":
        model.requires_grad_(True)
    elif init:
        quant = dict(quant_type="nf4", double_quant=True, blocksize=64, compute_dtype=torch.bfloat16)
        inject_lora(model, LoraConfig.from_train_config(TrainConfig(method=method, **init)), quant=quant,
                    calibration=[list(range(3, 40))] * 4)
    else:
        inject_lora(model, LoraConfig.from_train_config(TrainConfig(method=method)))
    if grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    loss_module = CausalLMLoss(model, torch.bfloat16 if method == "full" else None)
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    for module in model.modules():
        if isinstance(module, Linear4bit):
            weights |= {t.untyped_storage().data_ptr() for t in module.quant_state.tensors().values()}
    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=generator)
    labels, mask = ids.clone(), torch.ones(batch, length, dtype=torch.long)
    if pad:
        labels[0, length - pad:], mask[0, length - pad:] = -100, 0
    positions = torch.arange(length).expand(batch, length)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_module(ids, labels, positions, mask, None)
    return kept


def predicted_bytes(folder, method: str, batch: int, length: int, grad_checkpointing: bool = False,
                    pad: int = 0, init: dict | None = None) -> int:
    """The planner's terms that are saved tensors: activations, dh and its row index, and the adapter's
    compute-dtype copies (lora/qlora) or the head's dW and autocast's weight copies (full)."""
    from loraq.models.source import resolve_source

    shape = model_shape(resolve_source(str(folder)), TrainConfig(model=str(folder), method=method, **(init or {})))
    run = RunSettings(method=method, batch_size=batch, compute_bytes=2, device="cpu",
                      grad_checkpointing=grad_checkpointing, double_quant=True, blocksize=64, eval_every=0)
    total = activation_bytes(shape, batch, length, bool(pad), run)
    if grad_checkpointing:
        # forward keeps the block inputs; the recomputed block only exists in backward, and the rotary cos/sin
        # reach it through the checkpoint's own references, not as saved tensors
        total -= max(block_bytes(shape, [lin for lin in shape.linears if lin.layer == i], batch, length, bool(pad),
                                 run) for i in range(shape.layers))
        total -= 2 * batch * length * shape.head_dim * 2
    trained_rows = batch * (length - 1) - pad
    total += trained_rows * (shape.hidden * 2 + 8)
    if method == "full":
        return total + shape.vocab * shape.hidden * 4 + 2 * shape.linear_params
    return total + (0 if grad_checkpointing else 2 * (shape.adapter_params + shape.correction_params))


@pytest.mark.parametrize("method, batch, length, checkpointing, pad, init", [
    ("qlora", 2, 100, False, 0, None),   # loraq's matmul attention, two causal blocks
    ("lora", 3, 40, False, 5, None),     # one block, a padded row
    ("full", 2, 100, False, 0, None),    # autocast: fp32 residual stream, bf16 copies per linear
    ("qlora", 2, 100, True, 0, None),    # checkpointing: the block inputs
    ("lora", 2, 1500, False, 0, None),   # past the matmul path's 32 MiB of probabilities: SDPA, no mask
    ("lora", 2, 1500, False, 7, None),   # SDPA with a padding mask: keys/values repeated to every head, the mask kept
    ("qlora", 2, 100, False, 0, CALIBRATED),  # a frozen rank-24 pair beside the rank-16 adapter: wider x [A; A0]^T
])
def test_activation_terms_equal_the_bytes_autograd_saves(llama_dir, method, batch, length, checkpointing, pad, init):
    measured = saved_bytes(llama_dir, method, batch, length, checkpointing, pad, init)
    predicted = predicted_bytes(llama_dir, method, batch, length, checkpointing, pad, init)
    assert predicted == pytest.approx(measured, rel=1e-3)


def test_the_heap_share_counts_the_saved_tensors_below_the_mmap_threshold(llama_dir):
    """glibc serves a tensor below its mmap threshold from the heap, which keeps it when freed; the plan's heap
    term counts the activations below it. With a threshold between the [N, d] and the MLP's [N, I] tensors
    (SDPA: no probabilities kept), it must equal the saved tensors autograd holds below that size."""
    from loraq.models.source import resolve_source

    batch, length, limit = 2, 1500, 700_000  # [N, d] bf16 = 384,000 bytes, [N, I] = 1,056,000
    kept = saved_storages(llama_dir, "lora", batch, length)
    below = sum(size for size in kept.values() if size < limit)
    assert below < sum(kept.values())  # the MLP's tensors are above it
    shape = model_shape(resolve_source(str(llama_dir)), TrainConfig(model=str(llama_dir), method="lora"))
    run = RunSettings(method="lora", batch_size=batch, compute_bytes=2, device="cpu", grad_checkpointing=False,
                      double_quant=True, blocksize=64, eval_every=0)
    not_activations = batch * (length - 1) * (shape.hidden * 2 + 8) + 2 * shape.adapter_params  # dh, copies
    # (rel 2e-3: the activation formulas' own 0.1%, held in the test above)
    assert heap_bytes(shape, batch, length, False, run, limit) + not_activations == pytest.approx(below, rel=2e-3)
    assert heap_bytes(shape, batch, length, False, run) == activation_bytes(shape, batch, length, False, run)
