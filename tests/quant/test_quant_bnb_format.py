"""bitsandbytes pre-quantized folders: loraq writes what transformers writes, and each loads the other's."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from quant_helpers import tiny_llama
from safetensors import safe_open

from loraq.models.bnb_folder import save_quantized_folder
from loraq.models.load import load_model
from loraq.quant.linear import Linear4bit
from loraq.quant.model import quantize_model_

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")


def _load_fp(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def _transformers_4bit(folder: Path, quant_type="nf4", double_quant=True, compute_dtype=torch.bfloat16, quantize=True):
    kwargs = {}
    if quantize:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=compute_dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), **kwargs).eval()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # its fused AVX-512 inference kernel rounds activations to bf16; compare its plain dequantize + matmul path
            module.support_avx512bf16_for_cpu = False
    return model


def _logits(model, vocab: int) -> torch.Tensor:
    ids = torch.arange(24).remainder(vocab).view(2, 12)
    with torch.no_grad():
        return model(input_ids=ids).logits


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_loraq_writes_the_same_files_as_transformers(tiny_llama_dir, tiny_tokenizer, tmp_path):
    theirs_dir, ours_dir = tmp_path / "theirs", tmp_path / "ours"
    _transformers_4bit(tiny_llama_dir).save_pretrained(str(theirs_dir))
    model = _load_fp(tiny_llama_dir)
    quantize_model_(model, "nf4", True, 64, torch.bfloat16)
    save_quantized_folder(model, tiny_tokenizer, ours_dir)

    theirs, ours = _tensors(theirs_dir), _tensors(ours_dir)
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape, key
        assert torch.equal(ours[key], theirs[key]), key
    their_qc = json.loads((theirs_dir / "config.json").read_text())["quantization_config"]
    our_qc = json.loads((ours_dir / "config.json").read_text())["quantization_config"]
    assert our_qc.pop("llm_int8_skip_modules") == ["lm_head"]  # ours names the kept head; theirs derives it
    their_qc.pop("llm_int8_skip_modules")
    assert our_qc == their_qc
    assert (ours_dir / "tokenizer.json").is_file()


@pytest.mark.parametrize("quant_type, double_quant, blocksize, compute_dtype, bias", [
    ("nf4", True, 64, torch.bfloat16, False),
    ("fp4", False, 128, torch.float32, True),
    ("nf4", True, 32, torch.float16, True),
])
def test_transformers_loads_loraq_folders_with_the_same_logits(tmp_path, quant_type, double_quant, blocksize,
                                                               compute_dtype, bias):
    # rows of 128 and 256 columns: whole blocks per row, where bitsandbytes' CPU dequantization is right
    model = tiny_llama(300, seed=7, attention_bias=bias, mlp_bias=bias, hidden_size=128, intermediate_size=256)
    names = quantize_model_(model, quant_type, double_quant, blocksize, compute_dtype)
    assert len(names) == 2 * 7 and all(isinstance(model.get_submodule(n), Linear4bit) for n in names)
    assert type(model.lm_head) is torch.nn.Linear
    out = save_quantized_folder(model, None, tmp_path / "q")
    loaded = _transformers_4bit(out, quantize=False)
    for name in names:
        layer = loaded.get_submodule(name)
        assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_state.blocksize == blocksize
        assert layer.weight.quant_state.quant_type == quant_type and layer.compute_dtype == compute_dtype
    assert torch.equal(_logits(loaded, 300), _logits(model.eval(), 300))


def test_loraq_loads_folders_written_by_transformers(tiny_llama_dir, tiny_tokenizer, tmp_path):
    reference = _transformers_4bit(tiny_llama_dir, compute_dtype=torch.float32)
    reference.save_pretrained(str(tmp_path / "theirs"))
    tiny_tokenizer.save_pretrained(str(tmp_path / "theirs"))
    ours = load_model(str(tmp_path / "theirs"), method="qlora", dtype="fp32", device="cpu").model
    names = [n for n, m in reference.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert names and all(isinstance(ours.get_submodule(n), Linear4bit) for n in names)
    assert ours.get_submodule(names[0]).compute_dtype == torch.float32
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # re-tied
    vocab = reference.config.vocab_size
    assert torch.equal(_logits(ours, vocab), _logits(reference, vocab))


def test_a_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    import loraq.models.bnb_folder as bnb_folder

    model = tiny_llama(100)
    quantize_model_(model)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(bnb_folder, "write_generation_config", broken)
    with pytest.raises(OSError):
        save_quantized_folder(model, None, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []
