"""The metadata of a model GGUF: ``general.*``, the family's hyper-parameters and the tokenizer."""
from __future__ import annotations

from typing import Any

from loraq.exporting.gguf import FILE_TYPES, PlannedTensor
from loraq.exporting.gguf_arch import KV, Family, hyperparameters, string, u32

UNQUANTIZED = ("f32", "f16", "bf16")


def model_metadata(family: Family, config: Any, tokenizer: Any, generation_config: Any, name: str, quant: str,
                   plan: list[PlannedTensor]) -> dict[str, KV]:
    """Every key but ``general.architecture`` (the writer adds it); the vocabulary sized to the embedding's rows."""
    from loraq.data.tokenize import chat_template
    from loraq.exporting.gguf_tokenizer import tokenizer_metadata

    n_vocab = next(t.shape[0] for t in plan if t.name == "token_embd.weight")
    meta = {"general.type": string("model"), "general.name": string(name),
            "general.file_type": u32(FILE_TYPES[quant])}
    if quant not in UNQUANTIZED:
        meta["general.quantization_version"] = u32(2)  # ggml's current layout of the quantized blocks
    meta.update(hyperparameters(config, family))
    template = chat_template(tokenizer)
    if isinstance(template, dict):  # named templates: the default one is the chat template
        template = template.get("default") or next(iter(template.values()), None)
    meta.update(tokenizer_metadata(tokenizer, n_vocab, template, generation_config))
    return meta
