"""loraq's decode loop against transformers' ``generate`` (the reference): greedy and seeded sampling, left-padded
batches of different lengths, rows leaving early, every family, and batches whose rows use different adapters."""
from __future__ import annotations

import pytest
import torch

from family_configs import FAMILIES, family_config
from loraq.errors import ConfigError
from loraq.generation.engine import DecodeBatch, Row, StopText, generate_ids
from loraq.generation.lean import supports
from loraq.generation.sampling import Sampling
from loraq.lora.config import LoraConfig
from loraq.lora.model import disable_adapters, inject_lora, set_adapter

VOCAB = 300
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [18]]


def tiny(family: str = "llama", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(family_config(family, VOCAB)).eval()


def hf_alone(model, prompt: list[int], n: int, stops=(), **sampling) -> list[int]:
    """transformers' generate on the prompt alone (no padding): the new tokens, stop token excluded."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, do_sample=bool(sampling), pad_token_id=0,
                             eos_token_id=list(stops) or None, top_k=None, **sampling)
    new = out[0, len(prompt):].tolist()
    return new[:next((k for k, t in enumerate(new) if t in stops), len(new))]


@pytest.fixture(params=["lean", "transformers"])
def path(request, monkeypatch):
    """Both decode paths: the lean step where it applies, and transformers' forward (``LORAQ_COMPILE=0``)."""
    if request.param == "transformers":
        monkeypatch.setenv("LORAQ_COMPILE", "0")
    return request.param


def test_the_lean_step_takes_the_llama_shaped_families_only():
    for family in FAMILIES:
        assert supports(tiny(family), 64) == (family in ("llama", "mistral", "qwen2")), family


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_batch_of_different_lengths_equals_each_prompt_alone_in_transformers(family, path):
    model = tiny(family)
    got = generate_ids(model, PROMPTS, Sampling(max_new_tokens=10), pad_id=0)
    assert [r.tokens for r in got] == [hf_alone(model, p, 10) for p in PROMPTS]
    assert all(r.finish_reason == "length" for r in got)


@pytest.mark.parametrize("family", FAMILIES)
def test_inside_a_training_run_with_its_fast_paths_the_tokens_are_transformers(family):
    """Exact match during training generates from a model in train mode with loraq's training fast paths on
    (matmul attention, lean norms): the loop switches to eval for the block and back, and the tokens stay
    transformers' own."""
    from loraq.kernels import apply_fast_paths

    model = tiny(family)
    want = [hf_alone(model, p, 8) for p in PROMPTS]
    apply_fast_paths(model)
    model.train()
    got = generate_ids(model, PROMPTS, Sampling(max_new_tokens=8), pad_id=0)
    assert [r.tokens for r in got] == want
    assert model.training


def test_rows_that_stop_leave_and_the_rest_are_unchanged(path):
    model = tiny()
    budgets = [3, 12, 1, 7]  # rows leave the batch after 1, 3 and 7 steps
    reference = [hf_alone(model, p, 12) for p in PROMPTS]
    stop = reference[1][5]  # a token row 1 makes at step 6: it ends there, and any other row that makes it
    got = generate_ids(model, PROMPTS, [Sampling(max_new_tokens=n) for n in budgets], stop_ids=[stop], pad_id=0)
    for r, ref, n in zip(got, reference, budgets):
        want = ref[:n][:next((k for k, t in enumerate(ref[:n]) if t == stop), n)]
        assert r.tokens == want
        assert r.finish_reason == ("stop" if len(want) < min(n, len(ref)) else "length")
    assert got[1].finish_reason == "stop" and len(got[1].tokens) <= 5


@pytest.mark.parametrize("kw", [dict(temperature=0.8), dict(temperature=1.3, top_k=20),
                                dict(temperature=0.7, top_p=0.6), dict(temperature=1.0, top_k=50, top_p=0.9)])
def test_seeded_sampling_draws_what_transformers_draws_after_manual_seed(kw):
    model = tiny()
    for seed in (1, 7):
        (got,) = generate_ids(model, [PROMPTS[0]], Sampling(max_new_tokens=12, seed=seed, **kw), pad_id=0)
        torch.manual_seed(seed)
        hf_kw = {"top_k": None, **kw}
        with torch.no_grad():
            out = model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=12, do_sample=True, pad_token_id=0,
                                 **hf_kw)
        assert got.tokens == out[0, len(PROMPTS[0]):].tolist()


def test_a_seeded_row_draws_the_same_beside_other_rows():
    model = tiny()
    sampled = Sampling(max_new_tokens=10, temperature=1.5, seed=3)
    (alone,) = generate_ids(model, [PROMPTS[2]], sampled, pad_id=0)
    batch = generate_ids(model, PROMPTS, [Sampling(max_new_tokens=4, temperature=1.5, seed=9), Sampling(8), sampled,
                                          Sampling(max_new_tokens=10, temperature=2.0)], pad_id=0)
    assert batch[2].tokens == alone.tokens
    again = generate_ids(model, [PROMPTS[2]], sampled, pad_id=0)[0]
    assert again.tokens == alone.tokens
    other = generate_ids(model, [PROMPTS[2]], Sampling(max_new_tokens=10, temperature=1.5, seed=4), pad_id=0)[0]
    assert other.tokens != alone.tokens


def test_a_group_of_one_prompt_prefilled_once_draws_what_transformers_draws_for_each_seed(path):
    """GRPO's groups (and ``n`` choices): rows repeating a prompt share one prefill; each still draws what
    transformers' sampling draws for that prompt alone after ``manual_seed(seed)``."""
    model = tiny()
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 2
    seeds = [11, 12, 13, 14, 15]
    got = generate_ids(model, prompts, [Sampling(max_new_tokens=8, temperature=1.2, seed=s) for s in seeds],
                       pad_id=0)
    for prompt, seed, row in zip(prompts, seeds, got):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=True, pad_token_id=0,
                                 temperature=1.2, top_k=None)
        assert row.tokens == out[0, len(prompt):].tolist()
    assert len({tuple(r.tokens) for r in got[:3]}) > 1  # one prompt, different draws


def test_prompts_that_open_alike_share_one_prefill_of_the_prefix_and_decode_what_each_decodes_alone(monkeypatch):
    """A chat template's system turn: its keys and values are computed once on one row and copied; each row's rest
    follows after a gap of pads. The tokens stay transformers' for each prompt alone."""
    from loraq.generation import lean

    model = tiny()
    prefix = list(range(20, 44))
    prompts = [prefix + [50, 51, 52], prefix + [53], prefix + [54, 55, 56, 57, 58], prefix + [59, 60]]
    shapes = []
    forward = lean.LeanDecoder.forward
    monkeypatch.setattr(lean.LeanDecoder, "forward", lambda self, ids, *a: shapes.append(tuple(ids.shape)) or
                        forward(self, ids, *a))
    got = generate_ids(model, prompts, Sampling(max_new_tokens=8), pad_id=0)
    assert shapes[:2] == [(1, 24), (4, 5)]
    assert [r.tokens for r in got] == [hf_alone(model, p, 8) for p in prompts]
    batch = DecodeBatch(model, pad_id=0)
    with torch.no_grad():
        batch.join([Row(k, p, Sampling(max_new_tokens=8)) for k, p in enumerate(prompts)])
        want = torch.cat([model(input_ids=torch.tensor([p])).logits[:, -1] for p in prompts])
    assert torch.allclose(batch.logits, want, atol=1e-5, rtol=1e-4)


def test_stop_strings_cut_the_text_before_them():
    model = tiny(seed=2)
    reference = hf_alone(model, PROMPTS[1], 12)

    def decode(ids):  # tokens as words: a stop string may span tokens
        return " ".join(str(t) for t in ids)

    stop = decode(reference[4:6])
    first = next(k for k in range(1, 13) if stop in decode(reference[:k]))  # the token completing it
    (got,) = generate_ids(model, [PROMPTS[1]], Sampling(max_new_tokens=12, stop=(stop,)), pad_id=0,
                          stop_text=[StopText(decode, [stop])])
    assert got.finish_reason == "stop"
    assert got.tokens == reference[:first]
    text = decode(reference[:first])
    assert got.text == text[:text.find(stop)]


def lora_model(names=("a", "b")):
    model = tiny(seed=1)
    g = torch.Generator().manual_seed(5)
    for k, name in enumerate(names):
        inject_lora(model, LoraConfig(r=4 + 4 * k, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), name)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if f"lora_A.{name}." in pname or f"lora_B.{name}." in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def routed_alone(model, prompt: list[int], route: str | None, n: int) -> list[int]:
    """transformers' generate for the prompt alone with adapter ``route`` active (None: adapters off)."""
    if route is None:
        with disable_adapters(model):
            return hf_alone(model, prompt, n)
    set_adapter(model, route)
    return hf_alone(model, prompt, n)


def test_rows_with_adapters_a_b_and_none_equal_three_runs_of_transformers_generate(path):
    model = lora_model()
    routes = ["a", None, "b", "a"]
    got = generate_ids(model, PROMPTS, Sampling(max_new_tokens=10), pad_id=0, adapters=routes)
    want = [routed_alone(model, prompt, route, 10) for prompt, route in zip(PROMPTS, routes)]
    assert [r.tokens for r in got] == want
    assert len({tuple(w) for w in want[:3]}) == 3  # the adapters change the tokens: the routing is tested


def test_mixed_adapter_rows_leave_the_batch_with_their_routing(path):
    model = lora_model()
    routes = ["b", "a", None, "b"]
    budgets = [2, 9, 4, 9]
    got = generate_ids(model, PROMPTS, [Sampling(max_new_tokens=n) for n in budgets], pad_id=0, adapters=routes)
    alone = [generate_ids(model, [p], Sampling(max_new_tokens=n), pad_id=0, adapters=[r])[0].tokens
             for p, n, r in zip(PROMPTS, budgets, routes)]
    assert [r.tokens for r in got] == alone


def test_generation_leaves_the_model_as_it_was():
    model = lora_model()
    set_adapter(model, "a")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    generate_ids(model, PROMPTS[:2], Sampling(max_new_tokens=3), pad_id=0, adapters=["b", "b"])
    generate_ids(model, PROMPTS[:2], Sampling(max_new_tokens=3), pad_id=0, adapters=["b", None])
    assert model.training
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert all(layer.row_adapters is None for layer in model.modules() if hasattr(layer, "row_adapters"))


def test_unknown_and_dora_adapters_are_refused_with_one_line():
    model = lora_model(names=("a",))
    with pytest.raises(ConfigError, match="'zz' is not loaded"):
        generate_ids(model, PROMPTS[:2], Sampling(max_new_tokens=2), adapters=["a", "zz"])
    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj"], use_dora=True), "d")
    with pytest.raises(ConfigError, match="DoRA"):
        generate_ids(model, PROMPTS[:2], Sampling(max_new_tokens=2), adapters=["a", "d"])


@pytest.mark.parametrize("kw, flag", [({"max_new_tokens": 0}, "--max-new-tokens"), ({"temperature": -1}, "--temp"),
                                      ({"top_p": 0.0}, "--top-p"), ({"top_k": -2}, "--top-k")])
def test_bad_options_name_their_flag(kw, flag):
    with pytest.raises(ConfigError, match=flag):
        Sampling(**kw)


def joined_midway(model, plan, new_tokens=8, **row_kw):
    """A DecodeBatch fed as a server feeds it: ``plan`` = [(step to join at, prompt, route)]; the rows' tokens."""
    from loraq.generation.engine import DecodeBatch, Row
    from loraq.lora.rows import RowAdapters

    rows = [Row(k, p, Sampling(max_new_tokens=new_tokens), route=route, **row_kw) for k, (_, p, route) in
            enumerate(plan)]
    with torch.no_grad(), RowAdapters(model) as routing:
        batch = DecodeBatch(model, pad_id=0, routing=routing)
        step = 0
        while step <= max(at for at, _, _ in plan) or batch.rows:
            batch.join([r for r, (at, _, _) in zip(rows, plan) if at == step])
            if batch.rows:
                batch.step()
            step += 1
    return rows


def test_rows_that_join_between_steps_decode_what_transformers_decodes_for_each_alone(path):
    """Continuous batching: rows join a running batch (longer and shorter prompts than those decoding, other
    adapters, a weighted mix of two) and each still gets transformers' tokens for its prompt alone."""
    model = lora_model()
    mix = (("a", 0.5), ("b", 1.0))
    plan = [(0, PROMPTS[1], "a"), (0, PROMPTS[3], None), (2, PROMPTS[0], "b"), (3, PROMPTS[2], mix),
            (9, PROMPTS[1], None)]
    rows = joined_midway(model, plan)
    # a mix: the layers' own sum of two active adapters, a's update weighted by scaling its B
    want = [_mixed_reference(model, prompt, 8) if route == mix else routed_alone(model, prompt, route, 8)
            for _, prompt, route in plan]
    assert [r.result.tokens for r in rows] == want
    assert len({tuple(w) for w in want[:4]}) == 4


def _mixed_reference(model, prompt, n):
    from loraq.lora.model import lora_layers

    layers = [layer for _, layer in lora_layers(model)]
    with torch.no_grad():
        for layer in layers:
            layer.lora_B["a"].weight.mul_(0.5)
        set_adapter(model, ["a", "b"])
        try:
            return hf_alone(model, prompt, n)
        finally:
            for layer in layers:
                layer.lora_B["a"].weight.mul_(2.0)


def test_log_probabilities_are_transformers_log_softmax_of_its_logits(path):
    model = tiny()
    (row,) = joined_midway(model, [(0, PROMPTS[0], ())], new_tokens=5, top_logprobs=3)
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=5, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    reference = [torch.log_softmax(z[0].double(), -1) for z in out.logits]
    assert [t for t, _, _ in row.result.logprobs] == row.result.tokens == out.sequences[0, 7:].tolist()
    for (token, lp, top), ref in zip(row.result.logprobs, reference):
        assert lp == pytest.approx(float(ref[token]), abs=1e-4)
        values, ids = ref.topk(3)
        assert [t for t, _ in top] == ids.tolist()
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-4)


def test_a_dropped_row_leaves_and_the_others_decode_as_before(path):
    from loraq.generation.engine import DecodeBatch, Row

    model = tiny()
    rows = [Row(k, p, Sampling(max_new_tokens=8)) for k, p in enumerate(PROMPTS[:3])]
    with torch.no_grad():
        batch = DecodeBatch(model, pad_id=0)
        batch.join(rows)
        for _ in range(3):
            batch.step()
        assert [r.key for r in batch.drop({1})] == [1]
        while batch.rows:
            batch.step()
    assert len(rows[1].result.tokens) == 3
    assert [rows[k].result.tokens for k in (0, 2)] == [hf_alone(model, PROMPTS[k], 8) for k in (0, 2)]


def test_the_stacked_adapter_form_equals_the_segment_form_on_every_layer():
    """lora/rows.py's fast path (all adapters' factors stacked, one product per layer) against its reference
    (each adapter's rows gathered and updated apart), with single adapters, none, and weighted mixes."""
    from loraq.lora.model import lora_layers
    from loraq.lora.rows import RowAdapters

    model = lora_model(names=("a", "b", "c"))
    routes = ["a", None, (("a", 0.5), ("c", -1.25)), "b", (("b", 2.0),), "c"]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad(), RowAdapters(model, routes) as routing:
        for _, layer in lora_layers(model):
            x = torch.randn(len(routes), 3, layer.in_features, generator=g)
            stacked = routing.forward(layer, x)
            routing.stacked = False
            try:
                reference = routing.forward(layer, x)
            finally:
                routing.stacked = True
            torch.testing.assert_close(stacked, reference, rtol=1e-5, atol=1e-5)
            assert not torch.equal(reference, layer.base(x))
