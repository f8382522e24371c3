"""`loraq plan` / loraq.plan, `--batch-size auto` and the check that stops a run before it loads anything."""
from __future__ import annotations

import json

import pytest
import torch

import loraq
from loraq.cli import main


@pytest.fixture
def text_file(tmp_path):
    """Text long enough that every row is cut at --seq-len."""
    words = ["alpha", "beta", "gamma", "delta", "cat", "dog", "fox", "one", "two", "three"]
    path = tmp_path / "text.jsonl"
    with open(path, "w") as fh:
        for doc in range(4):
            fh.write(json.dumps({"text": " ".join(words[(doc + i) % 10] for i in range(600))}) + "\n")
    return path


def test_plan_counts_the_weights_and_adapter_the_loaded_model_holds(tiny_llama_dir, text_file):
    """The plan reads config.json and headers only; the model loaded for training holds exactly the bytes it names."""
    from loraq.lora.config import LoraConfig
    from loraq.lora.model import count_parameters, inject_lora
    from loraq.quant.linear import Linear4bit

    plan = loraq.plan(model=str(tiny_llama_dir), data=str(text_file), method="qlora", dtype="bf16", device="cpu")
    terms = dict(plan.estimate.terms)
    planned = terms["frozen weights (4-bit codes + scales)"] + terms["frozen weights (bf16: embeddings, norms, head)"]

    model = loraq.load_model(str(tiny_llama_dir), method="qlora", dtype="bf16").model
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()
               or t.dtype == torch.uint8}
    for module in model.modules():
        if isinstance(module, Linear4bit):
            tensors.update({t.data_ptr(): t for name, t in module.quant_state.tensors().items()
                            if name not in ("code", "nested_code")})  # the code tables: 64 bytes a layer, shared
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # rotary frequencies: not weights
    held = sum(t.numel() * t.element_size() for t in tensors.values()) - buffers
    assert planned == pytest.approx(held, rel=0.01)

    inject_lora(model, LoraConfig(r=16, alpha=32, target_modules=["all-linear"]))
    assert plan.shape.adapter_params == count_parameters(model)[0]


def test_plan_json_from_the_command_line(tiny_llama_dir, text_file, capsys):
    assert main(["plan", "--model", str(tiny_llama_dir), "--data", str(text_file), "--batch-size", "3",
                 "--seq-len", "64", "--json", "--memory", "100"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["peak_bytes"] > 0 and out["batch_size"] == 3 and out["available_bytes"] == 100e9
    assert out["phase"] in ("training step", "loading", "exact-match generation")
    assert out["longest_row"] <= 64 and out["rows_from_data"] is True


def test_auto_batch_is_the_largest_whose_plan_with_its_margin_fits(tiny_llama_dir, text_file):
    from loraq.planning.fit import with_margin

    settings = dict(model=str(tiny_llama_dir), data=str(text_file), seq_len=64, dtype="fp32", eval_samples=0,
                    device="cpu")
    memory = with_margin(loraq.plan(**settings, batch_size=4, memory=10**12).peak_bytes) + 1000
    plan = loraq.plan(**settings, batch_size="auto", memory=memory)
    chosen = plan.max_batch_size
    assert plan.batch_size == chosen == 4
    assert with_margin(loraq.plan(**settings, batch_size=chosen, memory=memory).peak_bytes) <= memory
    assert with_margin(loraq.plan(**settings, batch_size=chosen + 1, memory=memory).peak_bytes) > memory


def test_a_run_larger_than_this_machine_stops_before_loading(tiny_llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_llama_dir), "--data", str(text_file), "--seq-len", "512",
                 "--batch-size", "60000", "--eval-samples", "0", "--output-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0]
    line = err[0]
    assert "needs" in line and "available here" in line and "--force" in line
    assert "--batch-size" in line or "--grad-checkpointing" in line  # flags that would fit
    assert not out.exists()  # nothing made, nothing loaded


def test_batch_size_auto_trains_with_the_batch_the_plan_chose(tiny_llama_dir, text_file, tmp_path, capfd):
    result = loraq.train(model=str(tiny_llama_dir), data=str(text_file), method="lora", batch_size="auto",
                         max_steps=1, seq_len=64, dtype="fp32", eval_samples=0, output_dir=str(tmp_path / "run"),
                         threads=1)
    chosen = json.loads((result.run_dir / "run.json").read_text())["config"]["batch_size"]
    assert isinstance(chosen, int) and chosen >= 1
    assert f"--batch-size auto: {chosen}" in capfd.readouterr().err


@pytest.mark.parametrize("value", ["autp", "0", "1.5", ""])
def test_batch_size_takes_a_number_or_auto_only(value, tmp_path, capsys):
    assert main(["plan", "--batch-size", value, "--output-dir", str(tmp_path / "r")]) == 2
    assert "batch-size" in capsys.readouterr().err


def test_the_data_term_is_the_token_store_the_run_reads(tiny_llama_dir, text_file, tmp_path, monkeypatch):
    """The data is read from the memory-mapped token store: the plan counts its pages (the files loraq data
    wrote, on disk) and a small index per example -- not the tokens as Python lists (50x more)."""
    from loraq.planning.estimate import DATA_BYTES_PER_EXAMPLE

    monkeypatch.setenv("LORAQ_CACHE", str(tmp_path / "cache"))
    plan = loraq.plan(model=str(tiny_llama_dir), data=str(text_file), method="qlora", seq_len=64, device="cpu")
    (store,) = (p for p in (tmp_path / "cache" / "tokens").iterdir() if p.is_dir())
    pages = sum(f.stat().st_size for f in store.glob("*.bin") if f.name in ("ids.bin", "mask.bin"))
    term = dict(plan.estimate.terms)["tokenized data (token store pages read, index)"]
    index = DATA_BYTES_PER_EXAMPLE * plan.rows.examples
    assert term - index == pytest.approx(pages, rel=0.02) and term < 10 * plan.rows.tokens
