"""The engine on the real default model (SmolLM2-135M-Instruct, 4-bit NF4 base): its greedy tokens equal
transformers' ``generate`` up to the first near tie, with and without an adapter, for a batch of prompts of
different lengths, and for one batch whose rows use two adapters and none."""
from __future__ import annotations

import pytest
import torch

from loraq.data.prompts import prompt_ids
from loraq.generation.engine import generate_ids
from loraq.generation.sampling import Sampling
from loraq.lora.config import LoraConfig
from loraq.lora.model import disable_adapters, inject_lora, set_adapter

pytestmark = pytest.mark.slow

NEAR_TIE = 0.25  # nats between transformers' top two tokens: below it, rounding may decide either way
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "List three prime numbers and explain why each one is prime, briefly.", "Hi!"]
NEW = 16


@pytest.fixture(scope="module")
def model_and_prompts(smollm_dir):
    from loraq.models.load import load_model
    from loraq.models.source import resolve_source

    loaded = load_model(resolve_source(str(smollm_dir)), method="qlora", dtype="float32", quant="nf4")
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    g = torch.Generator().manual_seed(0)
    for name, targets in (("a", ["q_proj", "v_proj"]), ("b", ["o_proj", "down_proj", "up_proj"])):
        inject_lora(model, LoraConfig(r=8, alpha=16, target_modules=targets), name)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if f".{name}." in pname and ("lora_A" in pname or "lora_B" in pname):
                    p.copy_(torch.randn(p.shape, generator=g) * (0.05 if "lora_A" in pname else 0.05))
    prompts = [prompt_ids(tokenizer, messages=[{"role": "user", "content": q}]) for q in QUESTIONS]
    return model, prompts


def decided(model, prompt: list[int]) -> list[int]:
    """transformers' greedy tokens for ``prompt`` alone, up to its first near tie."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, top_k=None,
                             output_scores=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    for i, scores in enumerate(out.scores):
        top = scores[0].float().log_softmax(-1).topk(2).values
        if float(top[0] - top[1]) < NEAR_TIE:
            return tokens[:i]
    return tokens


def reference(model, prompts, routes) -> list[list[int]]:
    want = []
    for prompt, route in zip(prompts, routes):
        if route is None:
            with disable_adapters(model):
                want.append(decided(model, prompt))
        else:
            set_adapter(model, route)
            want.append(decided(model, prompt))
    return want


@pytest.mark.parametrize("routes", [[None] * 4, ["a"] * 4, ["a", None, "b", "a"]], ids=["base", "adapter", "mixed"])
def test_greedy_tokens_equal_transformers_up_to_a_near_tie(model_and_prompts, routes):
    model, prompts = model_and_prompts
    want = reference(model, prompts, routes)
    got = generate_ids(model, prompts, Sampling(max_new_tokens=NEW), pad_id=0, adapters=routes)
    decided_total = 0
    for g, w in zip(got, want):
        assert g.tokens[:len(w)] == w
        decided_total += len(w)
    assert decided_total >= NEW, [len(w) for w in want]  # enough steps are decided: the comparison has teeth
    if routes[0] == "a":
        with disable_adapters(model):
            base = generate_ids(model, prompts, Sampling(max_new_tokens=NEW), pad_id=0)
        assert [r.tokens for r in base] != [r.tokens for r in got]  # the adapter changes the answers
