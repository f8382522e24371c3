"""The planner's activation terms against the bytes autograd really keeps for backward.

A small random Llama (three blocks, more than the planner's probe runs) goes
through loraq's own training setup on real tensors (4-bit loading or not, the
fast paths, LoRA or every weight trained, checkpointing, the fused loss). A
``saved_tensors_hooks`` pair records every tensor the forward saves for
backward, each storage once, the model's own weights left out: that total is
the reference. The planner -- a storage-less two-block probe at 16-48 tokens,
scaled to the blocks, rows and length -- must name the same bytes, plus the
loss's own (dh, its row index, the head's gradient under --method full).
"""
from __future__ import annotations

import pytest
import torch
from autograd_saved import kept_storages

from loraq.config import TrainConfig
from loraq.planning.activations import activation_bytes, forward_bytes, heap_bytes
from loraq.planning.activations import probe_run as activations_probe_run
from loraq.planning.shapes import model_shape


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("plan_llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=176, num_hidden_layers=3,
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
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=generator)
    labels, mask = ids.clone(), torch.ones(batch, length, dtype=torch.long)
    if pad:
        labels[0, length - pad:], mask[0, length - pad:] = -100, 0
    positions = torch.arange(length).expand(batch, length)
    with kept_storages(model) as kept:
        loss_module(ids, labels, positions, mask, None)
    return kept


def run_settings(folder, method: str, batch: int, grad_checkpointing: bool = False, init: dict | None = None):
    from loraq.models.source import resolve_source
    from loraq.planning.plan import run_settings as settings

    cfg = TrainConfig(model=str(folder), method=method, grad_checkpointing=grad_checkpointing, **(init or {}))
    return model_shape(resolve_source(str(folder)), cfg), settings(cfg, batch, 2, "cpu")


def predicted_bytes(folder, method: str, batch: int, length: int, grad_checkpointing: bool = False,
                    pad: int = 0, init: dict | None = None) -> int:
    """The planner's terms that are saved tensors in forward: the activations (the adapter's compute-dtype
    copies among them), and the loss's dh and its row index, and the head's dW (full)."""
    shape, run = run_settings(folder, method, batch, grad_checkpointing, init)
    total = forward_bytes(shape, batch, length, bool(pad), run)
    total += (batch * (length - 1) - pad) * (shape.hidden * 2 + 8)
    return total + (shape.vocab * shape.hidden * 4 if method == "full" else 0)


@pytest.mark.parametrize("method, batch, length, checkpointing, pad, init", [
    ("qlora", 2, 100, False, 0, None),   # loraq's matmul attention, two causal blocks
    ("lora", 3, 40, False, 5, None),     # one block, a padded row
    ("full", 2, 100, False, 0, None),    # autocast: fp32 residual stream, bf16 copies per linear
    ("qlora", 2, 100, True, 0, None),    # checkpointing: the block inputs
    ("lora", 2, 1500, False, 0, None),   # past the matmul path's 32 MiB of probabilities: SDPA, no mask
    ("lora", 2, 1500, False, 7, None),   # SDPA with a padding mask: keys/values repeated to every head, the mask kept
    ("qlora", 2, 100, False, 0, CALIBRATED),  # a frozen rank-24 pair beside the rank-16 adapter: wider x [A; A0]^T
    ("qlora", 3, 200, False, 9, {"dora": True}),  # DoRA's norms and magnitudes; four causal blocks, a mask
    ("full", 2, 300, True, 4, None),     # autocast under checkpointing, a padded row
])
def test_activation_terms_equal_the_bytes_autograd_saves(llama_dir, method, batch, length, checkpointing, pad, init):
    measured = saved_bytes(llama_dir, method, batch, length, checkpointing, pad, init)
    predicted = predicted_bytes(llama_dir, method, batch, length, checkpointing, pad, init)
    assert predicted == measured


def test_the_heap_share_counts_the_saved_tensors_below_the_mmap_threshold(llama_dir):
    """glibc serves a tensor below its mmap threshold from the heap, which keeps it when freed; the plan's heap
    term counts the activations below it. With a threshold between the [N, d] and the MLP's [N, I] tensors
    (SDPA: no probabilities kept), it must equal the saved tensors autograd holds below that size."""
    batch, length, limit = 2, 1500, 700_000  # [N, d] bf16 = 384,000 bytes, [N, I] = 1,056,000
    kept = saved_storages(llama_dir, "lora", batch, length)
    below = sum(size for size in kept.values() if size < limit)
    assert below < sum(kept.values())  # the MLP's tensors are above it
    shape, run = run_settings(llama_dir, "lora", batch)
    dh = batch * (length - 1) * (shape.hidden * 2 + 8)  # the loss's dh and index: not activations
    assert heap_bytes(shape, batch, length, False, run, limit) + dh == below
    assert heap_bytes(shape, batch, length, False, run) == activation_bytes(shape, batch, length, False, run)


def test_checkpointing_adds_one_recomputed_block(llama_dir):
    """Under checkpointing the step holds the checkpoints and, in backward, one block's full activations:
    the first block of a run without checkpointing (RoPE's cos/sin with it)."""
    batch, length = 2, 100
    shape, run = run_settings(llama_dir, "qlora", batch, grad_checkpointing=True)
    plain_shape, plain = run_settings(llama_dir, "qlora", batch)
    kept = forward_bytes(shape, batch, length, False, run)
    assert kept == saved_bytes(llama_dir, "qlora", batch, length, True) - 2 * (length - 1) * (shape.hidden * 2 + 8)
    block = activation_bytes(shape, batch, length, False, run) - kept
    full = forward_bytes(plain_shape, batch, length, False, plain)
    assert shape.layers * (block - 2 * batch * length * shape.head_dim * 2) < full < shape.layers * block + kept


def test_a_probe_is_kept_on_disk_for_the_same_config_elsewhere(llama_dir, tmp_path, monkeypatch):
    """The second plan of the same model class and settings (here: a copy in another folder) reads the first
    one's measurement from loraq's cache: no probe model is built, and the bytes are the same."""
    import shutil

    from loraq.planning.probe import ActivationProbe

    monkeypatch.setenv("LORAQ_CACHE", str(tmp_path / "cache"))
    shape, run = run_settings(llama_dir, "qlora", 2)
    first = ActivationProbe(llama_dir)
    expected = first.saved(activations_probe_run(run), 2, 100, False).total(2, 100)
    copy = shutil.copytree(llama_dir, tmp_path / "copy")
    second = ActivationProbe(copy)
    assert second.saved(activations_probe_run(run), 2, 100, False).total(2, 100) == expected
    assert first._models and not second._models
    monkeypatch.setenv("LORAQ_PLAN_CACHE", "0")
    third = ActivationProbe(copy)
    assert third.saved(activations_probe_run(run), 2, 100, False).total(2, 100) == expected and third._models
