"""GGUF exports run in the real llama.cpp (node-llama-cpp, installed on first use into loraq's cache).

One node process answers the whole module (llama.cpp's start-up is paid once):

* SmolLM2-135M-Instruct with a random QLoRA adapter, exported merged in f16
  and q8_0: llama.cpp's greedy tokens from chat prompts equal transformers'
  greedy generation on the merged model (the first 16 new tokens, up to the
  first near tie of the float32 reference, where rounding decides); the same
  adapter as a GGUF LoRA applied on the base GGUF gives the merged file's
  tokens; llama.cpp tokenizes texts and renders the file's chat template
  exactly as transformers does;
* tiny random models of every family (f32): llama.cpp's next-token
  distributions equal transformers' (the q/k row order, q/k norms, biases,
  fused projections, head_dim != hidden/heads, llama3 rope factors, tied heads);
* tokenizers with GPT-2 + single-digit, Qwen2 and SentencePiece-style
  pre-tokenization: llama.cpp splits texts into the same ids.
"""
from __future__ import annotations

import pytest
import torch
from export_helpers import (
    save_adapter_as_trained,
    save_tiny,
    sentencepiece_style_tokenizer,
    tiny_model,
    tokenizer_with_pre,
)
from llama_cpp_node import node_missing_reason, run_llama_cpp

import loraq
from loraq.data.prompts import prompt_ids
from loraq.data.tokenize import render_chat
from loraq.lora.adapted import load_adapted
from loraq.lora.config import LoraConfig
from loraq.lora.model import inject_lora, merge_and_unload
from loraq.models.load import load_model, load_tokenizer

pytestmark = pytest.mark.slow

PROMPTS = [[{"role": "user", "content": "What is the capital of France?"}],
           [{"role": "user", "content": "Name three colours of the rainbow."}]]
TEXTS = ["Perth customer Hannah Mensah needs 16 pink helmets on Saturday.",
         "Numbers 0123456789, 3.14159 and 2024-05-01; café, naïve, 東京, emoji 🙂",
         "  leading spaces,\ttabs\n\nnewlines   and <|im_start|>special<|im_end|> tokens\n"]
NEW_TOKENS = 16
FAMILIES = [("llama", {"tie_word_embeddings": True}),
            ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 64}}),
            ("qwen2", {}), ("qwen3", {"head_dim": 32}), ("mistral", {}), ("phi3", {})]
QUIET = {"say": lambda _msg: None}


def _random_adapter(folder):
    """A rank-8 adapter with random B, recorded as trained on the 4-bit base (the file does not depend on the base)."""
    loaded = load_model(None, method="lora", dtype="fp32", device="cpu")
    torch.manual_seed(0)  # lora_A's init: the same adapter every run
    inject_lora(loaded.model, LoraConfig(r=8, alpha=16))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(loaded.model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return save_adapter_as_trained(loaded.model, folder, None, "qlora")


def _transformers_greedy(adapter, prompts):
    loaded = load_adapted(adapter, base="trained", dtype="fp32", device="cpu", say=lambda _m: None)
    merge_and_unload(loaded.model, dtype=torch.float32)
    out = []
    for ids in prompts:
        generated = loaded.model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                          eos_token_id=loaded.tokenizer.eos_token_id, pad_token_id=0,
                                          output_scores=True, return_dict_in_generate=True)
        top2 = [torch.log_softmax(s[0].double(), -1).topk(2).values for s in generated.scores]
        out.append((generated.sequences[0, len(ids):].tolist(), [(v[0] - v[1]).item() for v in top2]))
    return out


def _smollm_jobs(tmp):
    adapter = _random_adapter(tmp / "adapter")
    files = {}
    for key, kwargs in {"f16": dict(adapter=adapter, quant="f16"), "q8_0": dict(adapter=adapter, quant="q8_0"),
                        "base": dict(quant="f16"), "lora": dict(adapter=adapter, format="gguf-lora"),
                        "original": dict(adapter=adapter, quant="f16", into="original")}.items():
        files[key] = tmp / f"smollm-{key}.gguf"
        loraq.export(out=files[key], **kwargs, **QUIET)
    tokenizer = load_tokenizer(None)
    prompts = [prompt_ids(tokenizer, messages=m) for m in PROMPTS]
    want = _transformers_greedy(adapter, prompts)  # [(tokens, top-2 margins)] per prompt
    generate = [{"kind": "generate", "tokens": ids, "max_tokens": NEW_TOKENS} for ids in prompts]
    nll = [{"kind": "nll", "tokens": ids + tokens} for ids, (tokens, _) in zip(prompts, want)]
    jobs = [{"path": str(files["f16"]), "tasks": generate + [{"kind": "tokenize", "text": t} for t in TEXTS]
             + [{"kind": "render_chat", "messages": m} for m in PROMPTS] + [{"kind": "metadata"}]},
            {"path": str(files["q8_0"]), "tasks": generate},
            {"path": str(files["base"]), "tasks": generate + nll},
            {"path": str(files["base"]), "loras": [str(files["lora"])], "tasks": generate + nll},
            {"path": str(files["original"]), "tasks": generate + nll}]
    return jobs, {"tokenizer": tokenizer, "want": want}


def _family_jobs(tmp, tokenizer):
    jobs, refs = [], []
    ids = tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"][:12]
    for i, (family, overrides) in enumerate(FAMILIES):
        model = tiny_model(family, len(tokenizer), seed=i, init_std=0.1, **overrides)
        folder = save_tiny(model, tokenizer, tmp / f"tiny-{i}")
        out = tmp / f"tiny-{i}.gguf"
        loraq.export(model=str(folder), out=out, quant="f32", **QUIET)
        with torch.no_grad():
            refs.append(torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1))
        jobs.append({"path": str(out), "tasks": [{"kind": "probabilities", "tokens": ids}]})
    return jobs, refs


def _tokenizer_jobs(tmp):
    jobs, tokenizers = [], []
    kinds = [tokenizer_with_pre("smollm"), tokenizer_with_pre("qwen2"), sentencepiece_style_tokenizer()]
    for i, tok in enumerate(kinds):
        folder = save_tiny(tiny_model("llama", len(tok), seed=i), tok, tmp / f"tok-{i}")
        out = tmp / f"tok-{i}.gguf"
        loraq.export(model=str(folder), out=out, quant="f32", **QUIET)
        jobs.append({"path": str(out), "tasks": [{"kind": "tokenize", "text": t} for t in TEXTS]})
        tokenizers.append(tok)
    return jobs, tokenizers


@pytest.fixture(scope="module")
def llama_cpp(tmp_path_factory, smollm_dir, tiny_tokenizer):
    reason = node_missing_reason()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("llama_cpp")
    smollm, smollm_refs = _smollm_jobs(tmp)
    families, family_refs = _family_jobs(tmp, tiny_tokenizer)
    tokenizers, tokenizer_refs = _tokenizer_jobs(tmp)
    results = run_llama_cpp(smollm + families + tokenizers)
    n = len(smollm)
    return {"smollm": results[:n], "families": results[n:n + len(families)], "family_refs": family_refs,
            "tokenizers": results[n + len(families):], "tokenizer_refs": tokenizer_refs, **smollm_refs}


NEAR_TIE = 0.25  # nats between the reference's top two tokens: below it, 16-bit rounding may pick either


def _decided(tokens: list[int], margins: list[float], ends: set[int]) -> list[int]:
    """The reference's greedy tokens up to the first near tie, or to the end of generation.

    node-llama-cpp stops at an end-of-generation token without yielding it; transformers includes it.
    A step whose top-two log-probabilities differ by less than NEAR_TIE is decided by rounding (f16
    weights, and llama.cpp's f16 activations in its CPU matmuls), not by the file's layout: the tokens
    compared end before it (measured: a 0.149-nat tie flipped in f16, every step above 0.25 agreed).
    """
    for i, (t, margin) in enumerate(zip(tokens, margins)):
        if t in ends or margin < NEAR_TIE:
            return tokens[:i]
    return tokens


def test_f16_and_q8_0_generate_transformers_greedy_tokens(llama_cpp):
    ends = {llama_cpp["tokenizer"].eos_token_id, 0}
    f16, q8_0 = llama_cpp["smollm"][0], llama_cpp["smollm"][1]
    for i, (want, margins) in enumerate(llama_cpp["want"]):
        decided = _decided(want, margins, ends)
        assert len(decided) >= 6, (want, margins)  # a real answer, decided for at least 6 tokens
        assert f16[i]["tokens"][:len(decided)] == decided
        assert q8_0[i]["tokens"][:len(decided)] == decided


def test_gguf_lora_on_the_base_gives_the_merged_files_tokens(llama_cpp):
    """The LoRA file on the original base GGUF is the adapter merged into the original weights (for this
    QLoRA adapter, ``--into original``; the default merge is into the dequantized 4-bit base)."""
    smollm = llama_cpp["smollm"]
    merged, base, base_with_lora = smollm[4], smollm[2], smollm[3]
    n = len(PROMPTS)
    assert [r["tokens"] for r in base_with_lora[:n]] == [r["tokens"] for r in merged[:n]]
    for i in range(n, 2 * n):  # per token of a text: the LoRA file moves the log-likelihood as the merge does
        count = merged[i]["count"]
        applied = abs(base_with_lora[i]["nll"] - merged[i]["nll"]) / count
        change = abs(base[i]["nll"] - merged[i]["nll"]) / count
        # the merged file rounds W0 + s B A to f16, the LoRA file adds s B A to f16 W0 at run time: a few
        # thousandths of a nat per token apart, against an adapter that moves it by 10x that
        assert applied < 0.005 and change > 10 * applied, (applied, change)


def test_llama_cpp_tokenizes_and_renders_the_chat_template_like_transformers(llama_cpp):
    tokenizer = llama_cpp["tokenizer"]
    results = llama_cpp["smollm"][0][len(PROMPTS):]
    for text, got in zip(TEXTS, results):
        assert got["tokens"] == tokenizer(text, add_special_tokens=False)["input_ids"], text
    rendered = results[len(TEXTS):len(TEXTS) + len(PROMPTS)]
    for messages, got in zip(PROMPTS, rendered):
        assert got["text"] == render_chat(tokenizer, messages, add_generation_prompt=True)
    meta = results[-1]
    assert meta["architecture"] == "llama" and meta["n_vocab"] == len(tokenizer) and meta["add_bos"] is False


@pytest.mark.parametrize("index", range(len(FAMILIES)), ids=[f"{f}-{i}" for i, (f, _) in enumerate(FAMILIES)])
def test_every_family_gives_transformers_next_token_distribution(llama_cpp, index):
    want = llama_cpp["family_refs"][index]
    got = torch.tensor(llama_cpp["families"][index][0]["probs"], dtype=torch.float64).clamp(min=1e-30).log()
    assert got.shape == want.shape
    top = want.exp() > 1e-3  # log-probabilities of the tokens that carry the distribution
    err = (got - want)[top].abs().max().item()
    spread = (want.max(-1).values - want.min(-1).values).min().item()
    assert spread > 1.0  # the distributions are far from uniform, so a wrong layout cannot pass
    assert err < 2e-2, (FAMILIES[index], err)


def test_pre_tokenizers_split_texts_as_transformers_does(llama_cpp):
    for tokenizer, results in zip(llama_cpp["tokenizer_refs"], llama_cpp["tokenizers"]):
        for text, got in zip(TEXTS, results):
            assert got["tokens"] == tokenizer(text, add_special_tokens=False)["input_ids"], (type(tokenizer), text)

