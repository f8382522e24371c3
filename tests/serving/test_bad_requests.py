"""A client's mistakes get OpenAI's error shape and the right 4xx (never a 5xx: the official clients retry
those), and the server keeps serving."""
from __future__ import annotations

import threading
import time

import httpx
import pytest

LONG = "word " * 600  # beyond the tiny Llama's 512 positions


def chat_body(model, **kw):
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **kw}


def cases(base, adapters):
    a = str(adapters["a"])
    return [
        ("bad JSON", "POST", "/v1/chat/completions", b"{not json", 400, None),
        ("a JSON list", "POST", "/v1/chat/completions", [], 400, None),
        ("no model", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
        ("unknown model", "POST", "/v1/chat/completions", chat_body("nope"), 404, "model"),
        ("no messages", "POST", "/v1/chat/completions", {"model": base}, 400, "messages"),
        ("bad role", "POST", "/v1/chat/completions",
         {"model": base, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
        ("content not text", "POST", "/v1/chat/completions",
         {"model": base, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
        ("negative max_tokens", "POST", "/v1/chat/completions", chat_body(base, max_tokens=-1), 400, "max_tokens"),
        ("zero max_completion_tokens", "POST", "/v1/chat/completions",
         chat_body(base, max_completion_tokens=0), 400, "max_completion_tokens"),
        ("temperature 3", "POST", "/v1/chat/completions", chat_body(base, temperature=3), 400, "temperature"),
        ("top_p 0", "POST", "/v1/chat/completions", chat_body(base, top_p=0), 400, "top_p"),
        ("n too large", "POST", "/v1/chat/completions", chat_body(base, n=99), 400, "n"),
        ("stop with 5 strings", "POST", "/v1/chat/completions", chat_body(base, stop=list("abcde")), 400, "stop"),
        ("seed not an integer", "POST", "/v1/chat/completions", chat_body(base, seed="x"), 400, "seed"),
        ("top_logprobs without logprobs", "POST", "/v1/chat/completions", chat_body(base, top_logprobs=2), 400,
         "top_logprobs"),
        ("top_logprobs 50", "POST", "/v1/chat/completions", chat_body(base, logprobs=True, top_logprobs=50), 400,
         "top_logprobs"),
        ("prompt over the context", "POST", "/v1/completions", {"model": base, "prompt": LONG, "max_tokens": 4},
         400, "prompt"),
        ("max_tokens over the context", "POST", "/v1/chat/completions", chat_body(base, max_tokens=100000), 400,
         "messages"),
        ("token id out of the vocabulary", "POST", "/v1/completions",
         {"model": base, "prompt": [1, 2, 10 ** 9], "max_tokens": 2}, 400, "prompt"),
        ("empty prompt list", "POST", "/v1/completions", {"model": base, "prompt": [], "max_tokens": 2}, 400,
         "prompt"),
        ("echo", "POST", "/v1/completions", {"model": base, "prompt": "x", "echo": True}, 400, "echo"),
        ("mix on an adapter", "POST", "/v1/chat/completions",
         chat_body("a", adapters=[{"name": "b", "scale": 1}]), 400, "adapters"),
        ("mix of an unknown adapter", "POST", "/v1/chat/completions",
         chat_body(base, adapters=[{"name": "zz", "scale": 1}]), 404, "adapters[0].name"),
        ("stream not a boolean", "POST", "/v1/chat/completions", chat_body(base, stream="yes"), 400, "stream"),
        ("unknown route", "GET", "/v1/nothing", None, 404, None),
        ("wrong method", "GET", "/v1/chat/completions", None, 405, None),
        ("load without a path", "POST", "/v1/load_lora_adapter", {"lora_name": "x"}, 400, "lora_name"),
        ("load a folder that is not an adapter", "POST", "/v1/load_lora_adapter",
         {"lora_name": "x", "lora_path": str(adapters["a"].parent)}, 400, "lora_path"),
        ("load under the base's name", "POST", "/v1/load_lora_adapter", {"lora_name": base, "lora_path": a}, 400,
         "lora_name"),
        ("unload an unknown adapter", "POST", "/v1/unload_lora_adapter", {"lora_name": "zz"}, 404, "lora_name"),
    ]


def test_each_mistake_gets_its_status_and_openai_s_error_shape(server, base_name, adapter_dirs):
    admin = {"Authorization": f"Bearer {server.admin_key}"}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for what, method, path, body, status, param in cases(base_name, adapter_dirs):
            kw = {"content": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
            response = http.request(method, path, headers=admin if "lora" in path else
                                    {"Authorization": f"Bearer {server.api_key}"}, **kw)
            assert response.status_code == status, (what, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, what
            assert error["message"] and error["param"] == param, (what, error)
        assert http.get("/health").status_code == 200
        ok = http.post("/v1/chat/completions", json=chat_body(base_name), headers={"Authorization":
                                                                                  f"Bearer {server.api_key}"})
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"


def test_a_wrong_key_is_401_for_the_official_client(server, base_name):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.models.list()
    assert caught.value.body["code"] == "invalid_api_key"


def test_adapters_that_do_not_fit_the_base_are_refused_with_the_reason(server, tmp_path, tiny_llama_dir,
                                                                       adapter_dirs):
    """Another model's adapter (other shapes), one trained on another base (its record's fingerprint), a
    DoRA adapter: each a 400 naming why; the server keeps serving."""
    import shutil

    from adapter_folders import save_random_adapter

    from tiny_models import make_tiny_llama

    other = tmp_path / "other-model"
    make_tiny_llama(300, hidden_size=32, intermediate_size=64).save_pretrained(str(other))
    wrong_shape = save_random_adapter(other, tmp_path / "wrong-shape", seed=4)
    record_mismatch = tmp_path / "other-base"
    shutil.copytree(adapter_dirs["a"], record_mismatch)
    _write_record(record_mismatch, str(other), "0" * 16)
    dora = save_random_adapter(tiny_llama_dir, tmp_path / "dora", seed=5, use_dora=True)
    admin = {"Authorization": f"Bearer {server.admin_key}"}
    with httpx.Client(base_url=server.url, timeout=60, headers=admin) as http:
        for folder, reason in ((wrong_shape, "another base model"), (record_mismatch, "not the base"),
                               (dora, "DoRA")):
            response = http.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(folder)})
            assert response.status_code == 400, response.text
            assert reason in response.json()["error"]["message"], response.text
        assert "bad" not in {m["id"] for m in http.get("/v1/models").json()["data"]}


def _write_record(folder, base_path: str, fingerprint: str) -> None:
    from loraq.lora.record import BaseModelId, TrainingBase, write_training_base

    base = BaseModelId(base_path, "folder", fingerprint)
    write_training_base(folder, TrainingBase("lora", "fp32", None, "default", base))


def test_a_full_queue_is_429_with_retry_after(tiny_llama_dir):
    """One request decoding (--max-batch 1), one waiting (--max-queue 1): the third is refused at once."""
    import loraq

    with loraq.serve(model=str(tiny_llama_dir), port=0, dtype="fp32", max_batch=1, max_queue=1) as small:
        name = small.served.base.name
        long = chat_body(name, max_tokens=480, temperature=0, ignore_eos=True)  # busy for a while, whatever it says
        results = []
        with httpx.Client(base_url=small.url, timeout=120) as http:
            threads = []
            for gauge in (small.metrics.batch_rows, small.metrics.queue_depth):  # first decoding, then one waiting
                threads.append(threading.Thread(target=lambda: results.append(
                    http.post("/v1/chat/completions", json=long))))
                threads[-1].start()
                deadline = time.monotonic() + 60
                while gauge._value.get() != 1:
                    assert time.monotonic() < deadline, f"{gauge} never reached 1"
                    time.sleep(0.01)
            refused = http.post("/v1/chat/completions", json=chat_body(name))
            for t in threads:
                t.join()
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"
        assert [r.status_code for r in results] == [200, 200]
