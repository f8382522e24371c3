"""The reference side of bench/throughput.py: the same training with transformers + PEFT (+ bitsandbytes).

What a PEFT user writes: the model from transformers (4-bit through
BitsAndBytesConfig for QLoRA: nf4, double quant, bf16 compute; bf16 weights
for LoRA), ``peft.get_peft_model`` with LoraConfig(r, alpha, dropout 0,
target_modules="all-linear"), the model's own loss, torch AdamW over the
trainable parameters, bf16. The batches are exactly loraq's (same packed
rows, position ids restarting per document), so both tools see the same tokens.

    python bench/peft_run.py --method qlora|lora --steps N --model DIR --data docs.jsonl
    python bench/peft_run.py --smoke      # 2 steps of each method on a tiny random model (bench/smoke.py)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smoke  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=("qlora", "lora"), help="required")
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps (or --epoch)")
    ap.add_argument("--model", help="HF folder (required)")
    ap.add_argument("--data", help="a loraq dataset file (required)")
    ap.add_argument("--batch-size", type=int, default=4, help="rows per step")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank")
    ap.add_argument("--alpha", type=int, default=32, help="LoRA alpha")
    ap.add_argument("--padding", action="store_true", help="HF-style padding instead of packing (epoch benchmark)")
    ap.add_argument("--epoch", action="store_true", help="run one epoch instead of --steps")
    smoke.add_flag(ap, "both methods, 2 steps each")
    args = ap.parse_args(argv)
    if args.smoke:
        return run_smoke(args)
    if None in (args.method, args.model, args.data):
        ap.error("give --method, --model and --data")
    if not args.epoch and args.steps < 1:
        ap.error("give --steps N or --epoch")
    run(args)


def run_smoke(args: argparse.Namespace) -> None:
    from throughput import docs_jsonl

    smoke.setup()
    args.model, args.steps, args.seq_len = str(smoke.tiny_model()), 2, 64
    args.data = str(docs_jsonl(smoke.temp_dir("loraq-peft-run-") / "docs.jsonl", n_docs=4))
    for method in ("qlora", "lora"):
        args.method = method
        run(args)


def run(args: argparse.Namespace) -> None:
    """``args.steps`` optimizer steps (or one epoch) of PEFT; prints steps, seconds, tokens and the last loss."""
    torch.manual_seed(0)
    model, opt, tok = build(args.method, args.model, args.rank, args.alpha)
    batches = load_batches(tok, args.data, args.seq_len, args.batch_size, padding=args.padding)
    n = len(batches) if args.epoch else args.steps
    t0 = time.perf_counter()
    tokens = 0
    for step_index in range(n):
        b = batches[step_index % len(batches)]
        loss = step(model, opt, b)
        tokens += b.num_tokens
    print(json.dumps({"steps": n, "seconds": time.perf_counter() - t0, "tokens": tokens, "loss": loss}))


def build(method: str, model_dir: str, rank: int, alpha: int):
    """(model in train mode, AdamW, tokenizer), as a PEFT user sets them up."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=torch.bfloat16)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    return model, opt, tok


def step(model, opt, b) -> float:
    """One optimizer step on loraq's batch ``b``: the model's own loss, backward, clipping at 1.0, AdamW."""
    kwargs = {"input_ids": b.input_ids, "labels": b.labels, "position_ids": b.position_ids, "use_cache": False}
    if b.attention_mask is not None:
        kwargs["attention_mask"] = b.attention_mask
    loss = model(**kwargs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def load_batches(tok, data: str, seq_len: int, batch_size: int, padding: bool = False) -> list:
    """One epoch of loraq's own batches of ``data`` (packed unless ``padding``), so both tools see identical tokens."""
    from loraq.config import TrainConfig
    from loraq.data.dataset import build_data

    cfg = TrainConfig(data=data, seq_len=seq_len, packing=not padding, batch_size=batch_size, eval_samples=0)
    it = build_data(cfg, tok).train_batches(batch_size, seed=0)
    return [next(it) for _ in range(it.batches_per_epoch)]


if __name__ == "__main__":
    main()
