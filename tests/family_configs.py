"""Tiny random models of the common decoder families, built from their transformers configs.

``family_config(name, vocab)`` gives the config of family ``name`` at the tests' size (hidden 64, 2 layers,
4 heads, 2 KV heads where the family has grouped-query attention); ``bench/families.py`` asks for a larger
size through the same function. Each family keeps its own defaults otherwise (tied or untied head,
biases, norms, activation), which is the point: they are the models users bring.
"""
from __future__ import annotations

from pathlib import Path

TINY = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128}

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "phi", "olmo2", "granite", "stablelm",
            "starcoder2", "opt", "gpt_neox", "gpt2")


def family_config(name: str, vocab: int, size: dict | None = None):
    import transformers as T

    z = {**TINY, **(size or {})}
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    common = dict(vocab_size=vocab, hidden_size=z["hidden"], num_hidden_layers=z["layers"],
                  num_attention_heads=z["heads"], intermediate_size=z["intermediate"], max_position_embeddings=512,
                  **ids)
    gqa = dict(common, num_key_value_heads=z["kv_heads"])
    head_dim = z["hidden"] // z["heads"]
    builders = {
        "llama": lambda: T.LlamaConfig(**gqa, tie_word_embeddings=True),
        "qwen2": lambda: T.Qwen2Config(**gqa),
        "qwen3": lambda: T.Qwen3Config(**gqa, head_dim=head_dim),
        "mistral": lambda: T.MistralConfig(**gqa),
        "gemma2": lambda: T.Gemma2Config(**gqa, head_dim=head_dim),
        "gemma3": lambda: T.Gemma3TextConfig(**gqa, head_dim=head_dim),
        "phi3": lambda: T.Phi3Config(**gqa),
        "phi": lambda: T.PhiConfig(**common),
        "olmo2": lambda: T.Olmo2Config(**gqa),
        "granite": lambda: T.GraniteConfig(**gqa),
        "stablelm": lambda: T.StableLmConfig(**gqa),
        "starcoder2": lambda: T.Starcoder2Config(**gqa),
        "opt": lambda: T.OPTConfig(vocab_size=vocab, hidden_size=z["hidden"], num_hidden_layers=z["layers"],
                                   num_attention_heads=z["heads"], ffn_dim=z["intermediate"],
                                   word_embed_proj_dim=z["hidden"], max_position_embeddings=512, **ids),
        "gpt_neox": lambda: T.GPTNeoXConfig(**common),  # Pythia's family: untied head stored as embed_out
        "gpt2": lambda: T.GPT2Config(vocab_size=vocab, n_embd=z["hidden"], n_layer=z["layers"], n_head=z["heads"],
                                     n_inner=z["intermediate"], n_positions=512, **ids),  # Conv1D layers
    }
    return builders[name]()


def save_family(name: str, tokenizer, out: Path, seed: int = 0, size: dict | None = None) -> Path:
    """A randomly initialised model of family ``name`` saved as a HF folder (safetensors) with ``tokenizer``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(name, len(tokenizer), size))
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out
