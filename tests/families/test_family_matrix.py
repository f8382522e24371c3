"""Every common decoder family trains (qlora, lora, full), merges and round-trips through PEFT's files.

Tiny random models of fifteen families (``family_configs.py``), the shared tiny tokenizer, two steps each.
References, all independent of loraq:

* lora / qlora: PEFT loads the run's adapter onto the base transformers loads, and its logits equal those
  of the folder ``loraq merge`` wrote (loaded by transformers), relative 1e-4 in fp32. For qlora the base
  PEFT gets has each converted layer's weight quantized and dequantized by bitsandbytes, as transformers +
  bitsandbytes convert it (a Conv1D weight transposed first): the function the adapter was trained on.
* full: the folder the run wrote, loaded by transformers, gives the run's own final evaluation loss.

The fast paths' backward formulas run eagerly here (``LORAQ_COMPILE=0``): their generated versions are held
to them in ``tests/kernels``, and generating them for fifteen families' shapes would cost CI a minute.
"""
from __future__ import annotations

import json

import pytest
import torch

import loraq
from family_configs import FAMILIES, save_family

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _eager_kernels(monkeypatch):
    monkeypatch.setenv("LORAQ_COMPILE", "0")


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("family_data")
    words = [("red", "sun"), ("blue", "cat"), ("green", "dog"), ("one", "two"), ("fox", "moon"), ("three", "sun")]

    def write(name, pairs):
        rows = [{"messages": [{"role": "user", "content": f"Join {a} and {b}."},
                              {"role": "assistant", "content": f"{a}-{b}"}]} for a, b in pairs]
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return folder / name

    return write("train.jsonl", words[:4]), write("val.jsonl", words[4:])


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory, tiny_tokenizer):
    made = {}

    def get(name):
        if name not in made:
            made[name] = save_family(name, tiny_tokenizer, tmp_path_factory.mktemp(name))
        return made[name]

    return get


def _train(model_dir, chat_files, out, method, **extra):
    train, val = chat_files
    return loraq.train(model=str(model_dir), data=str(train), val_data=str(val) if method == "full" else None,
                       method=method, max_steps=2, batch_size=2, seq_len=48, dtype="fp32", output_dir=str(out),
                       eval_samples=0, seed=0, lr=1e-2, warmup=0, threads=1, **extra)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _bnb_round_trip_(model):
    """Each layer transformers + bitsandbytes would convert, quantized and dequantized by bitsandbytes (nf4+DQ)."""
    import bitsandbytes.functional as bnbf

    from loraq.modules import is_conv1d
    from loraq.quant.model import quantizable_layer_names

    with torch.no_grad():
        for name in quantizable_layer_names(model):
            layer = model.get_submodule(name)
            weight = layer.weight.t() if is_conv1d(layer) else layer.weight
            packed, state = bnbf.quantize_4bit(weight.contiguous(), blocksize=64, quant_type="nf4",
                                               compress_statistics=True)
            dense = bnbf.dequantize_4bit(packed, state).to(weight.dtype)
            layer.weight.copy_(dense.t() if is_conv1d(layer) else dense)


@pytest.mark.parametrize("method", ["qlora", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_loads_in_peft_and_equals_the_merged_model(family, method, family_dir, chat_files, tmp_path, capsys):
    run = _train(family_dir(family), chat_files, tmp_path / "run", method).run_dir
    printed = capsys.readouterr()
    assert (printed.out + printed.err).count("loraq: fast paths: ") == 1  # said once, whatever is on
    _check_against_peft(family_dir(family), run, method, tmp_path, 1e-4)


@pytest.mark.parametrize("family,method", [("llama", "qlora"), ("gpt2", "lora"), ("gpt_neox", "qlora")])
def test_a_dora_adapter_loads_in_peft_and_equals_the_merged_model(family, method, family_dir, chat_files, tmp_path):
    run = _train(family_dir(family), chat_files, tmp_path / "run", method, dora=True).run_dir
    assert json.loads((run / "adapter_config.json").read_text())["use_dora"] is True
    _check_against_peft(family_dir(family), run, method, tmp_path, 1e-5)


def _check_against_peft(base_dir, run, method, tmp_path, tolerance):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = tmp_path / "merged"
    loraq.merge(adapter=str(run), out=str(merged), dtype="fp32")

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    if method == "qlora":
        _bnb_round_trip_(base)
    ids = torch.randint(3, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    before = _logits(base, ids)
    reference = _logits(PeftModel.from_pretrained(base, str(run)).eval(), ids)
    got = _logits(AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval(), ids)
    assert _rel(got, reference) < tolerance
    assert _rel(before, reference) > 1e-3  # the adapter changed the function: the comparison means something


@pytest.mark.parametrize("family", FAMILIES)
def test_full_fine_tuning_writes_a_folder_transformers_reads_as_trained(family, family_dir, chat_files, tiny_tokenizer,
                                                                         tmp_path):
    from transformers import AutoModelForCausalLM

    from loraq.data.formats import Sample
    from loraq.data.tokenize import tokenize_sample

    result = _train(family_dir(family), chat_files, tmp_path / "run", "full")
    model = AutoModelForCausalLM.from_pretrained(str(result.run_dir), dtype=torch.float32).eval()
    total = count = 0
    for i, line in enumerate(chat_files[1].read_text().splitlines()):
        example = tokenize_sample(Sample("chat", f"v:{i}", messages=json.loads(line)["messages"]), tiny_tokenizer)
        labels = torch.tensor([example.labels])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([example.input_ids]), labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        total, count = total + float(loss) * n, count + n
    assert total / count == pytest.approx(result.summary["eval_loss"], rel=1e-4)
