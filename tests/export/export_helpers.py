"""Tiny random models of each supported family, saved as HF folders with the shared tiny tokenizer."""
from __future__ import annotations

from pathlib import Path

import torch

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_config(family: str, vocab_size: int, **overrides):
    """A transformers config of ``family`` small enough for a test (random weights, the tiny vocabulary)."""
    from transformers import LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
               "phi3": Phi3Config}
    kw = dict(SMALL, vocab_size=vocab_size, tie_word_embeddings=False)
    if family == "qwen3":
        kw["head_dim"] = 16
    kw.update(overrides)
    return classes[family](**kw)


def tiny_model(family: str, vocab_size: int, seed: int = 0, init_std: float = 0.02, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, vocab_size, initializer_range=init_std, **overrides)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def save_tiny(model, tokenizer, folder: Path) -> Path:
    folder = Path(folder)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def token_ids(tokenizer, n_rows: int = 2) -> torch.Tensor:
    texts = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris. 42"]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[:n_rows]]
    length = min(len(r) for r in rows)
    return torch.tensor([r[:length] for r in rows])


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def gguf_model(path: Path):
    """The GGUF file as transformers' own GGUF reader loads it (dequantized to float32)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


_CORPUS = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France? The capital is Paris.",
           "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 16 pink helmets", "def add(a, b):\n    return a + b\n",
           "user assistant system answer question; Perth customer Hannah Mensah, Saturday"]


def tokenizer_with_pre(kind: str):
    """A small byte-level BPE tokenizer whose pre-tokenizer is GPT-2's + single digits (``smollm``) or Qwen2's split."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from loraq.exporting.gguf_tokenizer import QWEN2_SPLIT

    tok = Tokenizer(models.BPE())
    if kind == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def sentencepiece_style_tokenizer():
    """A Llama-2-style tokenizer: BPE with byte fallback, ``▁`` for spaces, a ``▁`` prepended, BOS added."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    trained = Tokenizer(models.BPE())
    trained.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trained.train_from_iterator(_CORPUS * 20, trainer=trainers.BpeTrainer(vocab_size=300, show_progress=False))
    spec = __import__("json").loads(trained.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for token in sorted(spec["vocab"], key=spec["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = trained.normalizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def save_adapter_as_trained(model, folder: Path, base: str | None, method: str) -> Path:
    """The adapter plus the record ``loraq train`` writes (its base, 4-bit or not), so loraq rebuilds that base."""
    from loraq.lora.files import save_adapter
    from loraq.lora.record import BaseModelId, QuantSettings, TrainingBase, write_training_base

    out = save_adapter(model, folder, base_model_name_or_path=base)
    record = TrainingBase(method=method, compute_dtype="fp32", quant=QuantSettings() if method == "qlora" else None,
                          init="default", base_model=BaseModelId(base, "default" if base is None else "dir", None))
    write_training_base(out, record)
    return out
