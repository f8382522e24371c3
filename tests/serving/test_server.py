"""`loraq serve` driven by the official ``openai`` client: answers equal `loraq generate`'s and transformers', in
OpenAI's shapes, batched across adapters, with adapters loaded and unloaded at runtime."""
from __future__ import annotations

import concurrent.futures
import json

import openai
import pytest
import torch

PROMPT = "hello there, how are you"
NEW = 10


def chat(client, model, prompt=PROMPT, **kw):
    kw = {"temperature": 0, "max_tokens": NEW, **kw}
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], **kw)


def test_models_lists_the_base_and_every_adapter_with_the_base_as_parent(client, base_name):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {base_name, "a", "b"}
    assert cards["a"].parent == cards["b"].parent == base_name
    assert cards[base_name].owned_by == "loraq"


@pytest.mark.parametrize("model", ["base", "a", "b"])
def test_greedy_chat_equals_loraq_generate_for_the_same_adapter(client, base_name, tiny_llama_dir, adapter_dirs,
                                                                model):
    import loraq

    adapter = None if model == "base" else str(adapter_dirs[model])
    want = loraq.generate(PROMPT, model=str(tiny_llama_dir), adapter=adapter, max_new_tokens=NEW, dtype="fp32")
    got = chat(client, base_name if model == "base" else model)
    assert got.choices[0].message.content == want
    assert got.choices[0].message.role == "assistant"
    assert got.usage.completion_tokens > 0
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_the_adapters_change_the_answer(client, base_name):
    answers = {m: chat(client, m).choices[0].message.content for m in (base_name, "a", "b")}
    assert len(set(answers.values())) == 3


def test_a_stream_gives_the_same_text_and_the_usage_last(client):
    whole = chat(client, "a").choices[0].message.content
    chunks = list(chat(client, "a", stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["length"], ["stop"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_completions_answer_transformers_greedy_tokens_and_log_probabilities(client, base_name, tiny_llama_dir,
                                                                             tiny_tokenizer):
    """The legacy endpoint on a raw prompt: transformers' own greedy tokens and log-softmax (an independent
    reference: its model, its generate loop)."""
    from transformers import AutoModelForCausalLM

    from loraq.data.prompts import stop_token_ids

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    ids = tiny_tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    stops = stop_token_ids(tiny_tokenizer, model.generation_config)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0, eos_token_id=stops)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    tokens = tokens[:next((k for k, t in enumerate(tokens) if t in stops), len(tokens))]
    reference = [torch.log_softmax(z[0].double(), -1) for z in out.logits][:len(tokens)]
    assert tokens
    got = client.completions.create(model=base_name, prompt="The capital of France is", max_tokens=6, temperature=0,
                                    logprobs=2)
    choice = got.choices[0]
    assert choice.text == tiny_tokenizer.decode(tokens, skip_special_tokens=True)
    assert choice.logprobs.token_logprobs == pytest.approx([float(r[t]) for r, t in zip(reference, tokens)], abs=1e-4)
    for top, ref in zip(choice.logprobs.top_logprobs, reference):
        assert sorted(top.values(), reverse=True) == pytest.approx(ref.topk(2).values.tolist(), abs=1e-4)


def test_concurrent_requests_for_different_adapters_get_what_each_gets_alone(client, base_name, server):
    """Continuous batching: 12 requests at once over the base, a, b and a weighted mix; each answer equals the
    same request sent alone."""
    routes = [(base_name, None), ("a", None), ("b", None), (base_name, [{"name": "a", "scale": 0.5},
                                                                      {"name": "b", "scale": 1.0}])]
    prompts = ["hello there", "tell me a story about a cat", "x", "what is two plus two? answer briefly"]
    jobs = [(model, mix, prompts[k % 4], 6 + k) for k, (model, mix) in enumerate(routes * 3)]

    def ask(job):
        model, mix, prompt, n = job
        return chat(client, model, prompt, max_tokens=n, extra_body={"adapters": mix} if mix else None
                    ).choices[0].message.content

    alone = [ask(j) for j in jobs]
    steps, rows = server.metrics.decode_steps._value.get(), server.metrics.decode_rows._value.get()
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(ask, jobs))
    assert together == alone
    mean_batch = (server.metrics.decode_rows._value.get() - rows) / (server.metrics.decode_steps._value.get() - steps)
    assert mean_batch > 2  # they were decoded together
    mixed = [alone[k] for k in range(3, 12, 4)]
    assert all(m not in (alone[k - 1], alone[k - 2]) for k, m in zip(range(3, 12, 4), mixed))


def test_n_choices_with_a_seed_differ_and_reproduce(client):
    first = chat(client, "a", n=3, temperature=1.0, seed=7, max_tokens=8)
    again = chat(client, "a", n=3, temperature=1.0, seed=7, max_tokens=8)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1


def test_stop_strings_are_cut_from_the_text(client):
    whole = chat(client, "b", max_tokens=12).choices[0].message.content
    stop = whole[3:5]
    got = chat(client, "b", max_tokens=12, stop=[stop, "\u2603"]).choices[0]
    assert got.message.content == whole[:whole.find(stop)]
    assert got.finish_reason == "stop"


def test_an_adapter_loaded_at_runtime_is_listed_served_then_unloaded(server, client, http, adapter_dirs, base_name):
    admin = {"Authorization": f"Bearer {server.admin_key}"}
    body = {"lora_name": "c", "lora_path": str(adapter_dirs["c"])}
    assert http.post("/v1/load_lora_adapter", json=body).status_code == 401  # the API key is not the admin key
    assert http.post("/v1/load_lora_adapter", json=body, headers=admin).status_code == 200
    card = next(m for m in client.models.list().data if m.id == "c")
    assert card.parent == base_name
    answer = chat(client, "c").choices[0].message.content
    assert answer != chat(client, base_name).choices[0].message.content
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "c"}, headers=admin).status_code == 200
    assert "c" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError) as caught:
        chat(client, "c")
    assert caught.value.body["code"] == "model_not_found"
    metrics = http.get("/metrics").text
    assert 'loraq_adapter_events_total{adapter="c",event="load"} 1.0' in metrics


def test_reloading_a_name_serves_the_new_folder(server, client, http, adapter_dirs):
    admin = {"Authorization": f"Bearer {server.admin_key}"}
    want = {}
    for name in ("a", "b"):
        want[name] = chat(client, name).choices[0].message.content
    http.post("/v1/load_lora_adapter", json={"lora_name": "swap", "lora_path": str(adapter_dirs["a"])}, headers=admin)
    assert chat(client, "swap").choices[0].message.content == want["a"]
    http.post("/v1/load_lora_adapter", json={"lora_name": "swap", "lora_path": str(adapter_dirs["b"])}, headers=admin)
    assert chat(client, "swap").choices[0].message.content == want["b"]
    http.post("/v1/unload_lora_adapter", json={"lora_name": "swap"}, headers=admin)


def test_more_adapters_than_active_slots_are_evicted_and_reloaded(tiny_llama_dir, adapter_dirs):
    import loraq

    with loraq.serve(model=str(tiny_llama_dir), adapter={k: str(v) for k, v in adapter_dirs.items()}, port=0,
                     dtype="fp32", max_active_adapters=2) as small:
        c = openai.OpenAI(base_url=small.url + "/v1", api_key="none", max_retries=0)
        first = [chat(c, name).choices[0].message.content for name in ("a", "b", "c")]
        again = [chat(c, name).choices[0].message.content for name in ("a", "b", "c")]
        assert first == again
        assert len(small.served.registry.installed) == 2
        assert small.metrics.adapter_events.labels("a", "eviction")._value.get() >= 1


def test_a_client_that_leaves_mid_stream_frees_its_row(server, http, base_name):
    body = {"model": base_name, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 400,
            "temperature": 0, "stream": True}
    before = _counter(http, "loraq_requests_total", 'status="cancelled"')
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        next(lines)
    for _ in range(100):  # the decode thread drops it before its next step
        if _counter(http, "loraq_requests_total", 'status="cancelled"') > before:
            break
        import time

        time.sleep(0.05)
    assert _counter(http, "loraq_requests_total", 'status="cancelled"') == before + 1
    assert server.served is not None and http.get("/health").status_code == 200


def _counter(http, name: str, label: str) -> float:
    total = 0.0
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name) and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_health_and_metrics_speak_their_formats(http, client):
    assert http.get("/health").json() == {"status": "ok"}
    chat(client, "a")
    text = http.get("/metrics").text
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {"loraq_requests", "loraq_generation_tokens", "loraq_queue_depth",
            "loraq_time_to_first_token_seconds"} <= set(families)
    ok = [s for s in families["loraq_requests"].samples if s.labels.get("model") == "a" and s.labels["status"] == "ok"]
    assert ok and ok[0].value >= 1


def test_server_sent_events_end_with_done(http, base_name):
    body = {"model": base_name, "prompt": "abc", "max_tokens": 3, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_ignore_eos_decodes_exactly_max_tokens(client, base_name):
    """vLLM's extension, for benchmarks: the model's stop tokens end nothing."""
    got = [client.completions.create(model=base_name, prompt=p, max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True}).usage.completion_tokens
           for p in ("a", "hello", "The")]
    assert got == [30, 30, 30]


def test_an_adapters_dir_of_130_is_listed_and_served_through_4_active_slots(tmp_path, tiny_llama_dir, adapter_dirs):
    import shutil

    import loraq

    for k in range(130):
        shutil.copytree(adapter_dirs["abc"[k % 3]], tmp_path / f"ad{k:03d}")
    with loraq.serve(model=str(tiny_llama_dir), adapters_dir=str(tmp_path), port=0, dtype="fp32",
                     max_active_adapters=4) as big:
        c = openai.OpenAI(base_url=big.url + "/v1", api_key="none", max_retries=0)
        assert len(c.models.list().data) == 131
        answers = {name: chat(c, name).choices[0].message.content for name in ("ad000", "ad001", "ad002", "ad003",
                                                                             "ad004", "ad129")}
        assert answers["ad000"] == answers["ad003"] == answers["ad129"] != answers["ad001"]
        assert answers["ad001"] == answers["ad004"] != answers["ad002"]
        assert len(big.served.registry.installed) == 4
