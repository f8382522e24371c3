"""Run by test_fsdp.py under torchrun with 2 ranks: FSDP2 over a 4-bit base, checked against the unsharded model.

    torchrun --standalone --nproc-per-node 2 fsdp_worker.py MODEL_DIR OUT.json

Every rank builds the same QLoRA model and keeps an unsharded deep copy as
the reference. The copy runs the whole batch (4 rows) in one process; the
sharded model runs it as 2 ranks x 2 micro-batches (the first under
``no_sync``). Rank 0 writes what it measured to OUT.json for the test to judge.
"""
from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from loraq.distributed.runtime import init_runtime
from loraq.distributed.wrap import gathered_for_inference, shard_with_fsdp2
from loraq.lora.config import LoraConfig
from loraq.lora.model import inject_lora
from loraq.models.load import load_model
from loraq.quant.linear import Linear4bit
from loraq.training.objective import CausalLMLoss


def main(model_dir: str, out: str) -> None:
    runtime = init_runtime()
    torch.manual_seed(0)
    model = load_model(model_dir, method="qlora", dtype="fp32").model
    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=["all-linear"]))
    with torch.no_grad():  # B = 0 at initialisation would leave every A without a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    reference = copy.deepcopy(model)
    packed = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    absmax = {n: m.quant_state.absmax.clone() for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    frozen_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (4, 12), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # prompt tokens
    labels[1, 8:] = -100  # a shorter answer
    positions = torch.arange(12).expand(4, 12)
    normalizer = float((labels[:, 1:] != -100).sum())  # the global trained-token count, as the loop uses

    ref_loss = CausalLMLoss(reference)(ids, labels, positions, None, normalizer)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in reference.named_parameters() if p.requires_grad}
    with torch.no_grad():
        ref_logits = reference(input_ids=ids, position_ids=positions).logits

    loss_module = shard_with_fsdp2(CausalLMLoss(model), runtime)
    sharded = {n: m.weight for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    local_frozen_bytes = sum(p.to_local().numel() * p.element_size() for p in model.parameters()
                             if isinstance(p, DTensor))
    gathered_equal = all(torch.equal(sharded[n].full_tensor(), packed[n]) for n in packed)
    stats_whole = all(torch.equal(m.quant_state.absmax, absmax[n]) for n, m in model.named_modules()
                      if isinstance(m, Linear4bit))

    rows = [2 * runtime.rank, 2 * runtime.rank + 1]  # rank r's micro-batches: rows 2r and 2r + 1
    loss_sum = 0.0
    for i, row in enumerate(rows):
        sl = slice(row, row + 1)
        with (loss_module.no_sync() if i == 0 else torch.enable_grad()):
            loss = loss_module(ids[sl], labels[sl], positions[sl], None, normalizer)
            (loss * runtime.world_size).backward()
        loss_sum += float(loss)
    loss_total = runtime.sum(loss_sum)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    grad_error = max(float((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm()) for n in ref_grads)

    with torch.no_grad(), gathered_for_inference(loss_module):
        logits = model(input_ids=ids, position_ids=positions).logits
    logits_error = float((logits - ref_logits).abs().max() / ref_logits.abs().max())

    # one optimizer step: the replicated adapters must stay identical on both ranks
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, foreach=False)
    optimizer.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
    other = [torch.empty_like(flat) for _ in range(runtime.world_size)]
    dist.all_gather(other, flat)
    adapters_equal = all(torch.equal(other[0], o) for o in other)

    if runtime.is_main:
        with open(out, "w") as fh:
            json.dump({
                "world_size": runtime.world_size,
                "linear4bit_layers": len(packed),
                "packed_weights_sharded": sum(isinstance(w, DTensor) for w in sharded.values()),
                "packed_rows_full": sum(int(w.shape[0]) for w in sharded.values()),
                "packed_rows_local": sum(int(w.to_local().shape[0]) for w in sharded.values()),
                "frozen_bytes": frozen_bytes,
                "local_frozen_bytes": local_frozen_bytes,
                "gathered_equal": gathered_equal,
                "quant_stats_whole": stats_whole,
                "embedding_own_unit": isinstance(model.get_input_embeddings(), FSDPModule),
                "tied": model.get_input_embeddings().weight is model.get_output_embeddings().weight,
                "trainable_sharded": sum(isinstance(p, DTensor) for p in model.parameters() if p.requires_grad),
                "loss": loss_total,
                "reference_loss": float(ref_loss),
                "max_grad_relative_error": grad_error,
                "logits_relative_error": logits_error,
                "adapters_equal_across_ranks": adapters_equal,
            }, fh)
    runtime.shutdown(wait=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
