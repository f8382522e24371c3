"""`loraq merge`: a PEFT adapter with random A and B, merged, loaded by plain transformers."""
from __future__ import annotations

import json

import pytest
import torch
from lora_helpers import assert_one_line, randomize_lora, rel_err
from safetensors.torch import load_file, save_file

from loraq.cli import main


def _base(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def _peft_adapter(base_dir, out, base_name=None, **kw):
    """PEFT's adapter on the base in ``base_dir`` with random A and B; returns PEFT's merged logits."""
    import peft

    cfg = peft.LoraConfig(task_type="CAUSAL_LM", base_model_name_or_path=base_name, **kw)
    pm = peft.get_peft_model(_base(base_dir), cfg)
    randomize_lora(pm, std=0.1)
    pm.save_pretrained(str(out))
    return pm


def _ids(vocab, seed=3):
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids).logits.float()


def test_merge_of_a_peft_adapter_gives_peft_s_logits(tiny_llama_dir, tmp_path, capsys):
    pm = _peft_adapter(tiny_llama_dir, tmp_path / "adapter", r=4, lora_alpha=8, target_modules="all-linear",
                       rank_pattern={"o_proj": 2}, use_rslora=True)
    ids = _ids(pm.config.vocab_size)
    reference = _logits(pm.merge_and_unload(), ids)
    capsys.readouterr()
    assert main(["merge", "--model", str(tiny_llama_dir), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    captured = capsys.readouterr()
    assert_one_line(captured.out, "merged 14 LoRA layers")
    # a PEFT adapter has no training record: the merge says what it assumes, and uses the original weights
    assert_one_line(captured.err, "loraq: no record of the base this adapter was trained on")
    assert "assuming a full-precision base" in captured.err
    out = tmp_path / "merged"
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json",
            "tokenizer.json", "tokenizer_config.json"} <= files
    assert "chat_template.jinja" in files or "chat_template" in (out / "tokenizer_config.json").read_text()
    assert not any("lora" in k for k in load_file(out / "model.safetensors"))
    assert "lm_head.weight" not in load_file(out / "model.safetensors")  # tied to the embeddings
    assert "loraq" not in (out / "config.json").read_text()
    merged = _base(out)
    assert rel_err(_logits(merged, ids), reference) < 1e-4
    assert rel_err(_logits(merged, ids), _logits(_base(tiny_llama_dir), ids)) > 1e-3  # the adapter mattered
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(out)).chat_template


def test_bf16_merge_writes_bf16_and_stays_close(tiny_llama_dir, tmp_path):
    pm = _peft_adapter(tiny_llama_dir, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    ids = _ids(pm.config.vocab_size)
    reference = _logits(pm.merge_and_unload(), ids)
    assert main(["merge", "--model", str(tiny_llama_dir), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    tensors = load_file(tmp_path / "merged" / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    assert rel_err(_logits(_base(tmp_path / "merged"), ids), reference) < 3e-2


def test_model_defaults_to_the_adapter_s_local_base(tiny_llama_dir, tmp_path):
    pm = _peft_adapter(tiny_llama_dir, tmp_path / "adapter", base_name=str(tiny_llama_dir), r=2, lora_alpha=4,
                       target_modules=["v_proj"])
    ids = _ids(pm.config.vocab_size)
    reference = _logits(pm.merge_and_unload(), ids)
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "m"), "--dtype", "fp32"]) == 0
    assert rel_err(_logits(_base(tmp_path / "m"), ids), reference) < 1e-4


def test_missing_lora_a_exits_2_naming_the_layer_and_writes_nothing(tiny_llama_dir, tmp_path, capsys):
    _peft_adapter(tiny_llama_dir, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors.pop("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight")
    save_file(tensors, str(path))
    capsys.readouterr()
    code = main(["merge", "--model", str(tiny_llama_dir), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")])
    assert code == 2
    assert_one_line(capsys.readouterr().err, "loraq: error:", "model.layers.1.self_attn.q_proj", "lora_A")
    assert not (tmp_path / "merged").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


@pytest.mark.parametrize("case", ["no-adapter", "pickle", "bad-rank", "out-not-empty", "bad-dtype", "gone-base"])
def test_user_mistakes_exit_2_with_one_line(tiny_llama_dir, tmp_path, capsys, case):
    adapter = tmp_path / "adapter"
    out = tmp_path / "merged"
    if case != "no-adapter":
        _peft_adapter(tiny_llama_dir, adapter, r=2, lora_alpha=4, target_modules=["q_proj"])
    needle = {"no-adapter": "does not exist", "pickle": "--allow-pickle", "bad-rank": "rank",
              "out-not-empty": "--overwrite", "bad-dtype": "--dtype", "gone-base": "does not exist here"}[case]
    extra = []
    if case == "pickle":
        (adapter / "adapter_model.safetensors").unlink()
        torch.save({}, adapter / "adapter_model.bin")
    if case == "bad-rank":
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "r": 0}))
    if case == "out-not-empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    if case == "bad-dtype":
        extra = ["--dtype", "int8"]
    model = ["--model", str(tiny_llama_dir)]
    if case == "gone-base":  # no --model, and the adapter's own base has been deleted
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**cfg,
                                                                 "base_model_name_or_path": str(tmp_path / "gone")}))
        model = []
    capsys.readouterr()
    code = main(["merge", *model, "--adapter", str(adapter), "--out", str(out), *extra])
    assert code == 2
    assert_one_line(capsys.readouterr().err, "loraq: error:", needle)
    if case == "out-not-empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
        # --overwrite replaces only what loraq made: not the user's folder, but a merge it wrote before
        merge = ["merge", "--model", str(tiny_llama_dir), "--adapter", str(adapter)]
        assert main([*merge, "--out", str(out), "--overwrite"]) == 2
        assert_one_line(capsys.readouterr().err, "loraq: error:", "not made by loraq")
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
        again = tmp_path / "again"
        assert main([*merge, "--out", str(again)]) == 0
        (again / "extra.txt").write_text("from the last merge")
        assert main([*merge, "--out", str(again), "--overwrite"]) == 0
        assert (again / "config.json").is_file() and not (again / "extra.txt").exists()
    else:
        assert not out.exists()


@pytest.mark.slow
def test_merge_on_the_default_model_gives_peft_s_logits(smollm_dir, tmp_path):
    """The issue's check on the real model: PEFT adapter, random A and B, `loraq merge`, plain transformers."""
    pm = _peft_adapter(smollm_dir, tmp_path / "adapter", r=8, lora_alpha=16, target_modules="all-linear")
    ids = _ids(pm.config.vocab_size)
    reference = _logits(pm.merge_and_unload(), ids)
    del pm
    assert main(["merge", "--model", str(smollm_dir), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    assert rel_err(_logits(_base(tmp_path / "merged"), ids), reference) < 1e-4


def test_a_trained_adapter_loaded_by_peft_equals_the_merged_folder(tiny_llama_dir, tmp_path):
    """The issue's first check: `loraq train --method lora` (4 steps), PEFT loads the adapter on the base,
    and its logits equal those of the folder `loraq merge` writes, loaded by plain transformers."""
    import peft

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Join {i} and {i + 3}."},
                                                     {"role": "assistant", "content": f"{i}-{i + 3}"}]}) + "\n"
                            for i in range(24)))
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_llama_dir), "--data", str(data), "--method", "lora", "--dtype", "fp32",
                 "--max-steps", "4", "--batch-size", "4", "--seq-len", "32", "--lr", "1e-2", "--rank", "4",
                 "--alpha", "8", "--target-modules", "all-linear", "--eval-samples", "0", "--eval-every", "0",
                 "--seed", "0", "--output-dir", str(run)]) == 0
    assert main(["merge", "--model", str(tiny_llama_dir), "--adapter", str(run), "--out", str(tmp_path / "merged"),
                 "--dtype", "fp32"]) == 0
    pm = peft.PeftModel.from_pretrained(_base(tiny_llama_dir), str(run)).eval()
    ids = _ids(pm.config.vocab_size)
    reference = _logits(pm, ids)
    merged = _base(tmp_path / "merged")
    assert rel_err(_logits(merged, ids), reference) < 1e-4
    assert rel_err(reference, _logits(_base(tiny_llama_dir), ids)) > 1e-4  # training moved the adapter
