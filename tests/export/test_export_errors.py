"""`loraq export` mistakes: one line, exit code 2, nothing of the user's overwritten, no partial .gguf left."""
from __future__ import annotations

import torch
from export_helpers import save_tiny, tiny_model

import loraq
from loraq import faults
from loraq.cli import main
from loraq.lora.config import LoraConfig
from loraq.lora.files import save_adapter
from loraq.lora.model import inject_lora
from loraq.models.load import load_model


def _run(capsys, *argv) -> tuple[int, str]:
    rc = main(["export", *map(str, argv)])
    err = capsys.readouterr().err.strip()
    return rc, err


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("loraq: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix in (".gguf", ".Modelfile"))


def test_existing_output_is_kept_without_overwrite(capsys, tiny_llama_dir, tmp_path):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"mine")
    rc, err = _run(capsys, "--model", tiny_llama_dir, "--out", out)
    assert rc == 2 and "--overwrite" in _one_line(err)
    assert out.read_bytes() == b"mine"


def test_unknown_quant_and_requantized_into(capsys, tiny_llama_dir, tmp_path):
    rc, err = _run(capsys, "--model", tiny_llama_dir, "--out", tmp_path / "m.gguf", "--quant", "q3_k")
    assert rc == 2 and "--quant" in _one_line(err)
    rc, err = _run(capsys, "--adapter", tmp_path, "--out", tmp_path / "m.gguf", "--into", "requantized")
    assert rc == 2 and "--quant" in _one_line(err)
    assert _leftovers(tmp_path) == []


def test_unsupported_family_names_the_supported_ones(capsys, tiny_tokenizer, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=1, n_head=2))
    folder = save_tiny(model, tiny_tokenizer, tmp_path / "gpt2")
    rc, err = _run(capsys, "--model", folder, "--out", tmp_path / "m.gguf")
    line = _one_line(err)
    assert rc == 2 and "'gpt2'" in line and "Llama" in line and "Qwen2" in line and "Phi-3" in line
    assert _leftovers(tmp_path) == []


def test_adapter_that_does_not_fit_the_base(capsys, tiny_tokenizer, tmp_path):
    small = save_tiny(tiny_model("llama", len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "small")
    wide = save_tiny(tiny_model("llama", len(tiny_tokenizer), hidden_size=96), tiny_tokenizer, tmp_path / "wide")
    loaded = load_model(str(small), method="lora", dtype="fp32", device="cpu")
    inject_lora(loaded.model, LoraConfig(r=2, alpha=4))
    adapter = save_adapter(loaded.model, tmp_path / "adapter", base_model_name_or_path=str(small))
    rc, err = _run(capsys, "--adapter", adapter, "--model", wide, "--out", tmp_path / "m.gguf")
    assert rc == 2 and "adapter" in _one_line(err).lower()
    assert _leftovers(tmp_path) == []


def test_full_disk_mid_write_leaves_the_old_file_and_no_temporary(capsys, monkeypatch, tiny_llama_dir, tmp_path):
    out = tmp_path / "model.gguf"
    loraq.export(model=str(tiny_llama_dir), out=out, quant="f32", say=lambda _m: None)
    previous = out.read_bytes()
    monkeypatch.setenv("LORAQ_FAULT", "enospc:gguf-tensor:3")
    faults.reset()
    try:
        rc, err = _run(capsys, "--model", tiny_llama_dir, "--out", out, "--overwrite")
    finally:
        monkeypatch.delenv("LORAQ_FAULT")
        faults.reset()
    assert rc == 2 and "disk filled" in _one_line(err)
    assert out.read_bytes() == previous
    assert _leftovers(tmp_path) == ["model.Modelfile", "model.gguf"]


def test_overwrite_replaces_only_a_gguf_file(capsys, tiny_llama_dir, tmp_path):
    out = tmp_path / "notes.gguf"
    out.write_text("my notes")
    rc, err = _run(capsys, "--model", tiny_llama_dir, "--out", out, "--overwrite")
    assert rc == 2 and "not a GGUF" in _one_line(err)
    assert out.read_text() == "my notes"


def test_gguf_lora_refuses_modules_to_save(capsys, tiny_llama_dir, tmp_path):
    loaded = load_model(str(tiny_llama_dir), method="lora", dtype="fp32", device="cpu")
    inject_lora(loaded.model, LoraConfig(r=2, alpha=4, modules_to_save=["model.norm"]))
    adapter = save_adapter(loaded.model, tmp_path / "adapter", base_model_name_or_path=str(tiny_llama_dir))
    rc, err = _run(capsys, "--adapter", adapter, "--format", "gguf-lora", "--out", tmp_path / "a.gguf")
    assert rc == 2 and "modules_to_save" in _one_line(err)
    assert _leftovers(tmp_path) == []
