"""The 4-bit base kept on disk (loraq.models.quantized_cache): a cached load is a fresh quantization, bit for bit.

Against the independent facts: the packed bytes and scales equal ``quantize_4bit`` of the weights read from the
file (itself held byte-identical to bitsandbytes in tests/quant), the logits equal transformers' model with loraq's
quantizer applied after loading, and the cached load neither quantizes nor reads a quantized layer's weight.
"""
from __future__ import annotations

import pytest
import torch
from models_testlib import logits, small_llama
from safetensors.torch import load_file, save_file
from test_qlora_load import _reference, _save

from loraq.models import quantized_cache
from loraq.models.load import load_model
from loraq.quant.functional import quantize_4bit


@pytest.fixture
def cache_on(loraq_cache, monkeypatch):
    monkeypatch.setattr(quantized_cache, "MIN_PARAMS", 0)  # the tiny models are far below the real threshold
    return loraq_cache / "quantized"


@pytest.fixture
def biased_model(tmp_path, tiny_tokenizer):
    """Untied head, biases on q/k/v (loaded after or before their layer), weights in two shards."""
    model = small_llama(len(tiny_tokenizer), seed=5, tie_word_embeddings=False, attention_bias=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    return _save(model, tiny_tokenizer, tmp_path / "biased", max_shard_size="100KB")


def _stored(folder):
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def _load(folder):
    return load_model(str(folder), method="qlora", dtype="fp32", device="cpu")


def _assert_is_quantize_4bit(loaded, stored):
    for name in loaded.quantized_modules:
        layer = loaded.model.get_submodule(name)
        packed, state = quantize_4bit(stored[name + ".weight"])
        assert torch.equal(layer.weight, packed), name
        for field in ("absmax", "code", "offset", "nested_absmax", "nested_code"):
            assert torch.equal(getattr(layer.quant_state, field), getattr(state, field)), (name, field)
        assert layer.quant_state.shape == state.shape and layer.quant_state.dtype == state.dtype


def test_the_second_load_reads_the_cache_and_equals_quantize_4bit(cache_on, biased_model, probe_ids, monkeypatch):
    from loraq.models.cache import cached_models

    cold = _load(biased_model)
    (entry,) = cache_on.glob("*.safetensors")
    assert [(r["kind"], r["path"], r["source"]) for r in cached_models()] == [("4-bit", str(entry), str(biased_model))]
    read: list[str] = []
    real_get = __import__("loraq.models.skeleton", fromlist=["x"]).open_safetensors

    def spying_open(path):  # records every tensor the loader reads from the model's files
        handle = real_get(path)

        class Spy:
            def __enter__(self):
                self.f = handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def keys(self):
                return self.f.keys()

            def get_tensor(self, key):
                read.append(key)
                return self.f.get_tensor(key)

        return Spy()

    monkeypatch.setattr("loraq.models.skeleton.open_safetensors", spying_open)
    monkeypatch.setattr("loraq.models.lowmem.quantize_in_chunks", lambda *a, **k: pytest.fail("quantized again"))
    warm = _load(biased_model)
    stored = _stored(biased_model)
    assert warm.quantized_modules == cold.quantized_modules and len(warm.quantized_modules) == 14
    assert not {k for k in read if k.removesuffix(".weight") in warm.quantized_modules}  # no 4-bit layer's weight
    assert {k for k in read if k.endswith("_proj.bias")}  # ... but their biases, from the model's files
    _assert_is_quantize_4bit(warm, stored)
    reference, _ = _reference(biased_model)
    assert torch.equal(logits(warm.model, probe_ids), logits(reference, probe_ids))
    assert torch.equal(logits(cold.model, probe_ids), logits(reference, probe_ids))


def test_changed_weights_damaged_entries_and_the_switch(cache_on, tiny_model_copy, monkeypatch):
    _load(tiny_model_copy)
    (entry,) = cache_on.glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])  # as a killed writer cannot leave it
    _assert_is_quantize_4bit(_load(tiny_model_copy), _stored(tiny_model_copy))  # ignored, quantized again
    assert load_file(str(entry))  # and replaced by a whole entry
    state = _stored(tiny_model_copy)
    state["model.layers.1.mlp.down_proj.weight"] *= 1.5  # the same names and shapes, other values
    save_file(state, str(tiny_model_copy / "model.safetensors"))
    _assert_is_quantize_4bit(_load(tiny_model_copy), state)
    assert len(list(cache_on.glob("*.safetensors"))) == 2
    monkeypatch.setenv("LORAQ_QUANT_CACHE", "0")
    state["model.layers.1.mlp.down_proj.weight"] *= 1.5
    save_file(state, str(tiny_model_copy / "model.safetensors"))
    _assert_is_quantize_4bit(_load(tiny_model_copy), state)
    assert len(list(cache_on.glob("*.safetensors"))) == 2
