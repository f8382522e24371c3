"""LoftQ on the default model: perplexity at initialisation, full precision vs NF4 vs LoftQ.

Run ``python tests/lora/loftq_table.py [n_seq]`` to print the table in
docs/loftq.md; the slow test in test_lora_4bit.py asserts its criterion at a
smaller scale. Perplexity is measured on Python's own reference text
(``pydoc_data.topics``, topics joined in key order), the first ``n_seq`` x 512
tokens as non-overlapping sequences; every linear layer but the output head is
quantized (NF4, double quantization, blocksize 64, float32 compute).
"""
from __future__ import annotations

import copy
import math
import sys
import time

import torch

NF4 = dict(quant_type="nf4", double_quant=True, blocksize=64, compute_dtype=torch.float32)


def pydoc_token_blocks(tokenizer, n_seq: int, seq_len: int = 512) -> torch.Tensor:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) >= n_seq * seq_len, f"only {len(ids)} tokens of text"
    return torch.tensor(ids[: n_seq * seq_len]).view(n_seq, seq_len)


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch: int = 4) -> float:
    """exp(mean next-token cross-entropy) over every predicted token of every block."""
    total, count = 0.0, 0
    for start in range(0, blocks.shape[0], batch):
        ids = blocks[start:start + batch]
        logits = model(input_ids=ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                 reduction="sum")
        total += loss.item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def _config(r: int = 16, iters: int = 5, layers: list[int] | None = None):
    from loraq.lora.config import LoraConfig

    return LoraConfig(r=r, alpha=2 * r, init="loftq", loftq_iters=iters, layers_to_transform=layers or [])


def nf4_model(model, layers: list[int] | None = None):
    """A copy with every linear layer but the output head (in blocks ``layers``, default all) as loraq's Linear4bit."""
    from loraq.lora.model import set_submodule
    from loraq.lora.targeting import find_targets
    from loraq.quant.linear import Linear4bit

    model = copy.deepcopy(model)
    for name in find_targets(model, _config(layers=layers)):
        set_submodule(model, name, Linear4bit.from_linear(model.get_submodule(name), **NF4))
    return model


def loftq_model(model, r: int, iters: int, layers: list[int] | None = None):
    """A copy with LoftQ (rank r, ``iters`` iterations) on the same layers as :func:`nf4_model`."""
    from loraq.lora.model import inject_lora

    model = copy.deepcopy(model)
    inject_lora(model, _config(r, iters, layers), quant=NF4)
    return model


def load_default():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraq.models.default import ensure_default_model

    folder = ensure_default_model()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(folder))


def main(n_seq: int = 16) -> None:
    model, tokenizer = load_default()
    blocks = pydoc_token_blocks(tokenizer, n_seq)
    rows = [("full precision (fp32)", lambda: model)]
    rows.append(("NF4 + DQ", lambda: nf4_model(model)))
    for r, iters in ((16, 1), (16, 5), (64, 5)):
        rows.append((f"LoftQ r={r}, {iters} iteration{'s' * (iters > 1)}",
                     lambda r=r, iters=iters: loftq_model(model, r, iters)))
    print(f"| model ({n_seq} x 512 tokens) | perplexity | init time |")
    print("|---|---|---|")
    for label, build in rows:
        t0 = time.perf_counter()
        m = build()
        built = time.perf_counter() - t0
        print(f"| {label} | {perplexity(m, blocks):.2f} | {built:.0f} s |", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 16)
