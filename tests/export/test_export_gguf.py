"""GGUF export read back by transformers' own GGUF reader (an independent implementation of the format).

Tiny random models of every supported family: the logits of the model loaded
from the exported file equal the original's (f32 exactly up to float rounding,
f16 within 1e-3 relative, q8_0 within 3e-2: Q8_0 rounds each weight to the
nearest of 255 levels of its 32-block's absmax, an error of at most absmax/254
per weight, which two random layers and the head turn into ~1% of the logits'
range). Transformers undoes llama.cpp's q/k row order on load, so a wrong
permutation, name or tied head shows up here as a logit mismatch.
"""
from __future__ import annotations

import gguf
import pytest
import torch
from export_helpers import gguf_model, logits, rel_err, save_adapter_as_trained, save_tiny, tiny_model, token_ids

import loraq
from loraq.lora.config import LoraConfig
from loraq.lora.files import load_adapter
from loraq.lora.model import inject_lora
from loraq.models.load import load_model

FAMILIES = [
    ("llama", {"tie_word_embeddings": True}),
    ("qwen2", {}),  # q/k/v biases, untied head
    ("qwen3", {"head_dim": 128}),  # q/k norms; head_dim != hidden / heads (transformers' reader assumes 128)
    ("mistral", {}),
    ("phi3", {}),  # fused qkv and gate_up
]
QUIET = {"say": lambda _msg: None}


@pytest.mark.parametrize("family,overrides", FAMILIES, ids=[f for f, _ in FAMILIES])
def test_transformers_reads_the_export_with_the_same_logits(family, overrides, tiny_tokenizer, tmp_path):
    model = tiny_model(family, len(tiny_tokenizer), **overrides)
    # general.name comes from the folder; transformers 5.24's reader sends a llama-architecture file whose
    # name contains "mistral" to a Mistral weight map that gguf-py lacks, so the folder is named neutrally
    folder = save_tiny(model, tiny_tokenizer, tmp_path / f"tiny-{len(family)}")
    ids = token_ids(tiny_tokenizer)
    reference = logits(model, ids)
    bounds = {"f32": 1e-6, "f16": 1e-3, "q8_0": 3e-2}
    for quant, bound in bounds.items():
        out = tmp_path / f"tiny-{quant}.gguf"
        loraq.export(model=str(folder), out=out, quant=quant, **QUIET)
        err = rel_err(logits(gguf_model(out), ids), reference)
        assert err < bound, (family, quant, err)


def _adapter_on(folder, tmp_path, method: str, modules_to_save=None):
    """A random LoRA (B non-zero) trained, as it were, on ``folder`` loaded for ``method``; saved as PEFT files."""
    loaded = load_model(str(folder), method=method, dtype="fp32", device="cpu")
    inject_lora(loaded.model, LoraConfig(r=4, alpha=8, modules_to_save=modules_to_save))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(loaded.model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return save_adapter_as_trained(loaded.model, tmp_path / f"adapter-{method}", str(folder), method)


@pytest.mark.parametrize("method,into", [("qlora", "auto"), ("lora", "original")])
def test_adapter_is_merged_per_tensor_as_the_model_computes_it(method, into, tiny_tokenizer, tmp_path):
    """The exported merge (4-bit base dequantized + s B A, or full base + s B A) gives the adapted model's logits."""
    folder = save_tiny(tiny_model("llama", len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "base")
    adapter = _adapter_on(folder, tmp_path, method, modules_to_save=["lm_head"])
    adapted = load_model(str(folder), method=method, dtype="fp32", device="cpu")
    load_adapter(adapted.model, adapter)
    ids = token_ids(tiny_tokenizer)
    reference = logits(adapted.model, ids)
    base = logits(load_model(str(folder), method=method, dtype="fp32", device="cpu").model, ids)
    out = tmp_path / "merged.gguf"
    loraq.export(adapter=adapter, out=out, quant="f32", into=into, **QUIET)
    exported = logits(gguf_model(out), ids)
    assert rel_err(base, reference) > 1e-2  # the adapter changes the model: the check below can fail
    assert rel_err(exported, reference) < 1e-5


def test_bnb_4bit_folder_is_dequantized_by_loraqs_engine(tiny_tokenizer, tmp_path):
    folder = save_tiny(tiny_model("qwen2", len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "base")
    quantized = tmp_path / "nf4"
    loraq.quantize(model=str(folder), out=str(quantized))
    reference = load_model(str(quantized), method="qlora", dtype="fp32", device="cpu").model
    ids = token_ids(tiny_tokenizer)
    out = tmp_path / "nf4.gguf"
    loraq.export(model=str(quantized), out=out, quant="f32", **QUIET)
    assert rel_err(logits(gguf_model(out), ids), logits(reference, ids)) < 1e-5


def test_metadata_and_modelfile(tiny_llama_dir, tiny_tokenizer, tmp_path):
    out = tmp_path / "tiny.gguf"
    report = loraq.export(model=str(tiny_llama_dir), out=out, quant="q8_0", **QUIET)
    fields = gguf.GGUFReader(out).fields
    value = {k: f.contents() for k, f in fields.items() if not k.startswith("tokenizer.ggml.")}
    assert value["general.architecture"] == "llama"
    assert value["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert value["llama.block_count"] == 2 and value["llama.attention.head_count_kv"] == 2
    assert value["llama.rope.dimension_count"] == 16
    assert value["tokenizer.chat_template"] == tiny_tokenizer.chat_template
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert tokens == tiny_tokenizer.convert_ids_to_tokens(list(range(len(tiny_tokenizer))))
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tiny_tokenizer.eos_token_id
    assert report["types"] == {"Q8_0": 15, "F32": 5}  # tied head: no output.weight; norms in F32
    modelfile = (tmp_path / "tiny.Modelfile").read_text()
    assert "FROM ./tiny.gguf\n" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
