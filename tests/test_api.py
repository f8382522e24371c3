"""The Python twin of every command, each against an independent reference: transformers' own forward and
chat template, the tokenizer's own counts, an argmax loop written here, bitsandbytes' stored bits."""
from __future__ import annotations

import json

import pytest
import torch

import loraq


@pytest.fixture
def chat_file(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Join {a} and {b}."},
                          {"role": "assistant", "content": f"{a}-{b}"}]}
            for a, b in [("red", "sun"), ("blue", "cat"), ("green", "dog"), ("one", "two")]]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _hf(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()


def test_generate_and_a_chat_turn_are_greedy_continuations_of_the_template(tiny_llama_dir, tiny_tokenizer):
    model = _hf(tiny_llama_dir)
    conversation = [{"role": "user", "content": "What is red?"}]

    def argmax(messages, n):
        ids = list(tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"])
        start = len(ids)
        with torch.no_grad():
            for _ in range(n):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
                if ids[-1] == tiny_tokenizer.eos_token_id:
                    ids.pop()
                    break
        return tiny_tokenizer.decode(ids[start:], skip_special_tokens=True)

    reply = loraq.generate("What is red?", model=str(tiny_llama_dir), max_new_tokens=6, dtype="fp32")
    assert reply == argmax(conversation, 6)
    session = loraq.chat(model=str(tiny_llama_dir), max_new_tokens=6, dtype="fp32")
    assert session.reply("What is red?") == reply
    # the second turn continues the whole conversation, the first answer included
    second = session.reply("And blue?")
    history = conversation + [{"role": "assistant", "content": reply.strip()}, {"role": "user", "content": "And blue?"}]
    assert second == argmax(history, 6)


def test_inspect_data_counts_what_the_tokenizer_counts(chat_file, tiny_llama_dir, tiny_tokenizer):
    report = loraq.inspect_data(chat_file, model=str(tiny_llama_dir), show=1)
    rows = [json.loads(line) for line in chat_file.read_text().splitlines()]
    lengths = [len(tiny_tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
               for r in rows]
    assert report["format"] == "chat" and report["examples"] == 4
    assert report["tokens"] == sum(lengths)
    assert report["examples_shown"][0]["text"].endswith("[[red-sun<|im_end|>]]\n")


def test_evaluate_gives_transformers_own_loss(chat_file, tiny_llama_dir, tiny_tokenizer):
    from loraq.data.formats import Sample
    from loraq.data.tokenize import tokenize_sample

    result = loraq.evaluate(chat_file, model=str(tiny_llama_dir), dtype="fp32", max_examples=2)
    model, total, count = _hf(tiny_llama_dir), 0.0, 0
    for i, line in enumerate(chat_file.read_text().splitlines()):
        example = tokenize_sample(Sample("chat", f"f:{i}", messages=json.loads(line)["messages"]), tiny_tokenizer)
        labels = torch.tensor([example.labels])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([example.input_ids]), labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        total, count = total + float(loss) * n, count + n
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["exact_match_examples"] == 2


def test_quantize_and_cached_models(tiny_llama_dir, tmp_path, monkeypatch):
    report = loraq.quantize(model=str(tiny_llama_dir), out=str(tmp_path / "q"))
    # NF4 + double quantization at blocksize 64: 4 + 8/64 + 32/(64*256) bits per weight (the QLoRA paper's 4.127)
    assert report["bits_per_param"] == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), rel=2e-2)
    # a cache with one complete folder (config + marker), one half-written (no marker) and one temporary
    monkeypatch.setenv("LORAQ_CACHE", str(tmp_path / "cache"))
    for name, complete in (("done", True), ("half", False), (".done.tmp-1", True)):
        folder = tmp_path / "cache" / "models" / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        if complete:
            (folder / "loraq-source.json").write_text('{"source": "hub"}')
    rows = loraq.cached_models()
    assert [(r["name"], r["kind"], r["source"]) for r in rows] == [("done", "model", "hub")]
    assert rows[0]["bytes"] == sum(f.stat().st_size for f in (tmp_path / "cache" / "models" / "done").iterdir())
