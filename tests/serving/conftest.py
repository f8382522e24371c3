"""Fixtures for tests/serving: a tiny Llama base with two adapters saved as PEFT folders, and a running server.

The server (``loraq.serve(..., port=0)``) listens on a free loopback port; tests drive it with the official
``openai`` client (``client``) or plain HTTP (``http``). Keys: ``API_KEY`` for /v1, ``ADMIN_KEY`` for loading
adapters at runtime.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from adapter_folders import save_random_adapter

API_KEY, ADMIN_KEY = "test-key", "admin-key"


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory, tiny_llama_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("served_adapters")
    return {name: save_random_adapter(tiny_llama_dir, root / name, seed) for name, seed in (("a", 1), ("b", 2),
                                                                                              ("c", 3))}


@pytest.fixture(scope="session")
def server(tiny_llama_dir, adapter_dirs):
    """The tiny Llama (fp32) serving adapters a and b (c is left for runtime loading)."""
    import loraq

    running = loraq.serve(model=str(tiny_llama_dir), adapter={"a": str(adapter_dirs["a"]), "b": str(adapter_dirs["b"])},
                          port=0, api_key=API_KEY, admin_key=ADMIN_KEY, dtype="fp32", max_batch=8, max_queue=32)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def base_name(server) -> str:
    return server.served.base.name


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture
def http(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c
