"""An adapter remembers the base it was trained on (training_base.json), and every command rebuilds that base.

References: the training run's own evaluation (the model as trained), PEFT on the full-precision base,
bitsandbytes' dequantization for the re-quantized merge.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from lora_helpers import assert_one_line, rel_err

import loraq
from loraq.cli import main

pytestmark = pytest.mark.slow


def _chat(path, n, seed):
    import random

    rng = random.Random(seed)
    words = ["red", "blue", "green", "cat", "dog", "fox", "one", "two", "three", "sun", "moon"]
    with open(path, "w") as fh:
        for _ in range(n):
            a, b = rng.choice(words), rng.choice(words)
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"Join {a} and {b}."},
                                              {"role": "assistant", "content": f"{a}-{b}"}]}) + "\n")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base_data")
    return _chat(folder / "train.jsonl", 32, 0), _chat(folder / "val.jsonl", 12, 1)


def _train(model_dir, files, out, **kw):
    train, val = files
    args = dict(model=str(model_dir), data=str(train), val_data=str(val), method="qlora", max_steps=3, batch_size=4,
                seq_len=64, dtype="fp32", output_dir=str(out), eval_samples=8, seed=0, lr=2e-2, threads=1)
    args.update(kw)
    return loraq.train(**args)


@pytest.fixture(scope="module")
def qlora_run(tiny_llama_dir, files, tmp_path_factory):
    return _train(tiny_llama_dir, files, tmp_path_factory.mktemp("qlora_run") / "run")


def _eval(capsys, *args):
    capsys.readouterr()
    assert main(["eval", "--data", *args, "--json"]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def test_the_run_records_its_4bit_base_and_peft_still_loads_the_folder(qlora_run, tiny_llama_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraq.models.fingerprint import weights_fingerprint

    record = json.loads((qlora_run.run_dir / "training_base.json").read_text())
    assert record["method"] == "qlora" and record["compute_dtype"] == "fp32" and record["init"] == "default"
    assert record["quant"] == {"quant_type": "nf4", "double_quant": True, "blocksize": 64}
    assert record["base_model"]["name_or_path"] == str(tiny_llama_dir.resolve())
    # the fingerprint follows the weights, not the folder: a copy matches, changed weights do not
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_dir, copy)
    assert weights_fingerprint(list(copy.glob("*.safetensors"))) == record["base_model"]["fingerprint"]
    changed = AutoModelForCausalLM.from_pretrained(str(copy), dtype=torch.float32)
    with torch.no_grad():
        changed.model.layers[1].mlp.up_proj.weight.mul_(1.001)
    changed.save_pretrained(str(copy))
    assert weights_fingerprint(list(copy.glob("*.safetensors"))) != record["base_model"]["fingerprint"]

    # PEFT loads the run folder as before (the record is one more file it ignores): same as loraq's --into original
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(qlora_run.run_dir)).eval()
    report = loraq.merge(adapter=str(qlora_run.run_dir), out=str(tmp_path / "orig"), into="original", dtype="fp32")
    assert report["into"] == "original" and report["merged_layers"] == 14
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "orig"), dtype=torch.float32).eval()
    ids = torch.randint(3, base.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(merged(input_ids=ids).logits, peft_model(input_ids=ids).logits) < 1e-4


def test_eval_and_merge_with_no_flags_give_the_model_that_was_trained(qlora_run, files, tmp_path, capsys):
    summary = qlora_run.summary
    _, val = files
    got, err = _eval(capsys, str(val), "--adapter", str(qlora_run.run_dir))
    assert_one_line(err, "applying the adapter to the 4-bit base it was trained on (nf4+DQ, blocksize 64)")
    assert got["loss"] == pytest.approx(summary["eval_loss"], rel=1e-3)
    assert got["exact_match"] == summary["final_accuracy"]
    # the full-precision base is an explicit choice, and a different model
    full, err = _eval(capsys, str(val), "--adapter", str(qlora_run.run_dir), "--quant", "none")
    assert "full-precision base, as asked; it was trained on a 4-bit base" in err
    assert abs(full["loss"] - summary["eval_loss"]) > 1e-6

    assert main(["merge", "--adapter", str(qlora_run.run_dir), "--out", str(tmp_path / "merged")]) == 0
    merged, _ = _eval(capsys, str(val), "--model", str(tmp_path / "merged"))
    assert merged["loss"] == pytest.approx(summary["eval_loss"], rel=1e-2)


def test_requantized_merge_reports_the_error_it_adds(qlora_run, tmp_path, capsys):
    """The report's error, against bitsandbytes reading and dequantizing the written 4-bit layers."""
    import bitsandbytes.functional as bnbf
    from safetensors.torch import load_file

    run = str(qlora_run.run_dir)
    assert main(["merge", "--adapter", run, "--out", str(tmp_path / "deq"), "--dtype", "fp32"]) == 0
    capsys.readouterr()
    assert main(["merge", "--adapter", run, "--out", str(tmp_path / "req"), "--into", "requantized"]) == 0
    line = capsys.readouterr().out
    reported = float(line.split("relative error of ")[1].split("%")[0]) / 100
    exact = load_file(tmp_path / "deq" / "model.safetensors")
    packed = load_file(tmp_path / "req" / "model.safetensors")
    err_sq = ref_sq = 0.0
    for key, weight in exact.items():
        if key + ".absmax" not in packed:
            continue
        pieces = {k[len(key) + 1:]: v for k, v in packed.items() if k.startswith(key + ".")}
        state = bnbf.QuantState.from_dict(pieces, device=torch.device("cpu"))
        deq = bnbf.dequantize_4bit(packed[key], state).float()
        err_sq += float((deq - weight).norm()) ** 2
        ref_sq += float(weight.norm()) ** 2
    assert ref_sq > 0
    assert reported == pytest.approx((err_sq / ref_sq) ** 0.5, rel=2e-2)


@pytest.mark.parametrize("init,dora", [("pissa", False), ("loftq", False), ("calibrated", False), ("pissa", True)])
def test_a_base_changed_by_the_init_is_rebuilt_exactly(init, dora, tiny_llama_dir, files, tmp_path, capsys):
    """PiSSA / LoftQ changed the frozen 4-bit base: eval replays the init and gets the run's own loss (a DoRA
    adapter's magnitudes carried over from the file's rank-2r form); the calibrated init kept the plain 4-bit
    base and changed the function through its initial factors."""
    result = _train(tiny_llama_dir, files, tmp_path / "run", init=init, eval_samples=0, max_steps=2, dora=dora)
    if init in ("loftq", "calibrated"):  # loaded unquantized and quantized by the init: not "0 layers in nf4"
        assert f"the adapted layers in nf4+DQ by the {init} init" in capsys.readouterr().err
    got, err = _eval(capsys, str(files[1]), "--adapter", str(result.run_dir), "--max-examples", "0")
    assert "warning" not in err
    assert got["loss"] == pytest.approx(result.summary["eval_loss"], rel=1e-6)
    original, _ = _eval(capsys, str(files[1]), "--adapter", str(result.run_dir), "--max-examples", "0",
                        "--quant", "none")
    assert original["loss"] != got["loss"]


def test_another_model_or_a_missing_base_is_one_line(qlora_run, tiny_llama_dir, tmp_path, capsys, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    other = tmp_path / "other"  # the same architecture, other weights
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9)
    model.save_pretrained(str(other))
    tiny_tokenizer.save_pretrained(str(other))
    run = str(qlora_run.run_dir)
    capsys.readouterr()
    assert main(["merge", "--adapter", run, "--model", str(other), "--out", str(tmp_path / "m")]) == 2
    assert_one_line(capsys.readouterr().err, "loraq: error: --model", "is not the base this adapter was trained on",
                    "--ignore-base-fingerprint")
    assert not (tmp_path / "m").exists()
    assert main(["merge", "--adapter", run, "--model", str(other), "--out", str(tmp_path / "m"),
                 "--ignore-base-fingerprint"]) == 0

    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    record = json.loads((moved / "training_base.json").read_text())
    record["base_model"]["name_or_path"] = str(tmp_path / "gone")
    (moved / "training_base.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert main(["generate", "--adapter", str(moved), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    assert_one_line(capsys.readouterr().err, "loraq: error:", "gone", "does not exist here", "--model")


def test_an_unreadable_record_is_a_warning_and_the_full_precision_default(qlora_run, files, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(qlora_run.run_dir, broken)
    (broken / "training_base.json").write_text("{not json")
    base = json.loads((qlora_run.run_dir / "training_base.json").read_text())["base_model"]["name_or_path"]
    got, err = _eval(capsys, str(files[1]), "--adapter", str(broken), "--model", base, "--max-examples", "0")
    assert "warning" in err and "training_base.json is unreadable" in err and "assuming a full-precision base" in err
    full, _ = _eval(capsys, str(files[1]), "--adapter", str(qlora_run.run_dir),
                    "--quant", "none", "--max-examples", "0")
    assert got["loss"] == pytest.approx(full["loss"], rel=1e-9)
