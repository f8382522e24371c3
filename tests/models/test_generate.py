"""Generation: greedy equals an argmax loop written here, streaming, sampling limits, the CLI."""
from __future__ import annotations

import io

import pytest
import torch
from models_testlib import assert_one_line

from loraq.cli import main
from loraq.errors import ConfigError
from loraq.generation.text import generate_text


def _argmax_loop(model, tokenizer, ids: list[int], n: int, stops: set[int]) -> str:
    new = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(nxt)
            if nxt in stops:
                break
    return tokenizer.decode(new, skip_special_tokens=True)


def _chat_ids(tokenizer, prompt):
    return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"])


@pytest.mark.parametrize("chat", [True, False])
def test_greedy_is_argmax_and_streams_the_same_text(tiny_reference, tiny_tokenizer, chat):
    prompt = "What is the capital of France?"
    ids = _chat_ids(tiny_tokenizer, prompt) if chat else tiny_tokenizer(prompt)["input_ids"]
    expected = _argmax_loop(tiny_reference, tiny_tokenizer, ids, 12, {tiny_tokenizer.eos_token_id})
    stream = io.StringIO()
    text = generate_text(tiny_reference, tiny_tokenizer, prompt, max_new_tokens=12, chat_template=chat, stream=stream)
    assert text == expected
    assert stream.getvalue() == text + "\n"


def test_nucleus_of_one_token_is_greedy(tiny_reference, tiny_tokenizer):
    greedy = generate_text(tiny_reference, tiny_tokenizer, "hello", max_new_tokens=8)
    nucleus = generate_text(tiny_reference, tiny_tokenizer, "hello", max_new_tokens=8,
                            temperature=1.0, top_p=1e-6, seed=3)
    assert nucleus == greedy


def test_sampling_is_seeded(tiny_reference, tiny_tokenizer):
    runs = [generate_text(tiny_reference, tiny_tokenizer, "hello", max_new_tokens=8, temperature=5.0, seed=s)
            for s in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]


@pytest.mark.parametrize("kw, flag", [({"max_new_tokens": 0}, "--max-new-tokens"),
                                      ({"temperature": -1.0}, "--temperature"),
                                      ({"top_p": 1.5}, "--top-p"), ({"temperature": float("nan")}, "--temperature")])
def test_bad_decoding_options(tiny_reference, tiny_tokenizer, kw, flag):
    with pytest.raises(ConfigError) as err:
        generate_text(tiny_reference, tiny_tokenizer, "hi", **kw)
    assert_one_line(err.value, flag)


def test_cli_prints_the_greedy_reply(tiny_llama_dir, tiny_reference, tiny_tokenizer, capsys):
    expected = generate_text(tiny_reference, tiny_tokenizer, "hello there", max_new_tokens=6)
    rc = main(["generate", "--model", str(tiny_llama_dir), "--prompt", "hello there", "--max-new-tokens", "6",
               "--dtype", "fp32"])
    assert rc == 0 and capsys.readouterr().out == expected + "\n"


@pytest.mark.parametrize("argv, needle", [
    (["--model", "./missing-model"], "no such file or folder"),
    (["--top-p", "0"], "--top-p"),
    (["--top-k", "-1"], "--top-k"),
    (["--max-new-tokens", "many"], "--max-new-tokens"),
])
def test_cli_mistakes_are_one_line_exit_2(tiny_llama_dir, capsys, argv, needle):
    rc = main(["generate", "--prompt", "hi", *argv] + ([] if "--model" in argv else ["--model", str(tiny_llama_dir)]))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0]


def test_cli_with_an_adapter_matches_peft(tiny_llama_dir, tiny_tokenizer, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraq.lora.config import LoraConfig
    from loraq.lora.files import save_adapter
    from loraq.lora.model import inject_lora

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    inject_lora(model, LoraConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a non-zero update, so the adapter changes the reply
    adapter = save_adapter(model, tmp_path / "adapter")

    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    plain = generate_text(base, tiny_tokenizer, "hello there", max_new_tokens=8)
    reference = generate_text(PeftModel.from_pretrained(base, str(adapter)).eval(), tiny_tokenizer, "hello there",
                              max_new_tokens=8)
    assert reference != plain
    rc = main(["generate", "--model", str(tiny_llama_dir), "--adapter", str(adapter), "--prompt", "hello there",
               "--max-new-tokens", "8", "--dtype", "fp32"])
    assert rc == 0 and capsys.readouterr().out == reference + "\n"


def test_generate_starts_and_stops_where_training_s_exact_match_does(tiny_reference, tiny_tokenizer):
    """One rule for prompts, stop tokens and padding: `loraq generate` and exact match during training agree."""
    import copy

    from loraq.data.formats import Sample
    from loraq.data.references import eval_references
    from loraq.generation.text import build_prompt_ids
    from loraq.training.evaluate import exact_match

    user = "Join red and sun."
    sample = Sample("chat", "f:1", messages=[{"role": "user", "content": user},
                                           {"role": "assistant", "content": "red-sun"}])
    reference = eval_references([sample], tiny_tokenizer, 1)[0]
    assert reference.prompt_ids == build_prompt_ids(tiny_tokenizer, user)[0].tolist()
    assert reference.prompt_ids == _chat_ids(tiny_tokenizer, user)  # what transformers' template renders
    # a stop token taken from the model's own greedy output, declared only in its generation config: both stop there
    free = _argmax_loop(tiny_reference, tiny_tokenizer, reference.prompt_ids, 8, set())
    stop = tiny_tokenizer(free, add_special_tokens=False)["input_ids"][3]
    model = copy.deepcopy(tiny_reference)
    model.generation_config.eos_token_id = [stop]
    expected = _argmax_loop(model, tiny_tokenizer, reference.prompt_ids, 8, {stop, tiny_tokenizer.eos_token_id})
    generated = generate_text(model, tiny_tokenizer, user, max_new_tokens=8)
    predicted = exact_match(model, tiny_tokenizer, [reference], max_new_tokens=8).predictions[0]
    assert generated == predicted
    assert len(tiny_tokenizer(generated, add_special_tokens=False)["input_ids"]) < 8
    assert expected.startswith(generated) and generated != free


def test_cli_stop_strings_end_the_reply_before_them_and_the_stream_never_shows_them(tiny_llama_dir, tiny_reference,
                                                                                      tiny_tokenizer, capsys):
    free = generate_text(tiny_reference, tiny_tokenizer, "hello there", max_new_tokens=12)
    stop = free[len(free) // 2:len(free) // 2 + 3]
    assert len(stop) == 3
    expected = free[:free.index(stop)]
    stream = io.StringIO()
    assert generate_text(tiny_reference, tiny_tokenizer, "hello there", max_new_tokens=12, stop=[stop],
                         stream=stream) == expected
    assert stream.getvalue() == expected + "\n"
    rc = main(["generate", "--model", str(tiny_llama_dir), "--prompt", "hello there", "--max-new-tokens", "12",
               "--dtype", "fp32", "--stop", "zzz-never", "--stop", stop])
    assert rc == 0 and capsys.readouterr().out == expected + "\n"


def test_cli_top_k_one_is_greedy(tiny_llama_dir, tiny_reference, tiny_tokenizer, capsys):
    greedy = generate_text(tiny_reference, tiny_tokenizer, "hello there", max_new_tokens=6)
    rc = main(["generate", "--model", str(tiny_llama_dir), "--prompt", "hello there", "--max-new-tokens", "6",
               "--dtype", "fp32", "--temperature", "2", "--top-k", "1", "--seed", "5"])
    assert rc == 0 and capsys.readouterr().out == greedy + "\n"
