"""FSDP2 over a 4-bit base on 2 CPU processes (gloo), and QLoRA under DDP.

The worker checks the sharding itself against the unsharded model in the
same process; the end-to-end runs check that QLoRA gives the same adapter,
evaluation loss and predictions under one process, DDP and FSDP2.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from dist_helpers import (
    assert_same_weights,
    base_args,
    loraq_cli,
    torchrun,
    train_in_process,
    weights,
)

WORKER = Path(__file__).with_name("fsdp_worker.py")


@pytest.fixture(scope="module")
def untied_llama_dir(tiny_llama_dir, tiny_tokenizer, tmp_path_factory) -> Path:
    """The tiny Llama's shape with its own head (the end-to-end runs use the tied one)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(str(tiny_llama_dir))
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("untied_llama")
    LlamaForCausalLM(config).save_pretrained(str(out))
    tiny_tokenizer.save_pretrained(str(out))
    return out


def test_fsdp2_shards_the_4bit_base_and_matches_the_unsharded_model(untied_llama_dir, tmp_path):
    out = tmp_path / "fsdp.json"
    torchrun([str(WORKER), str(untied_llama_dir), str(out)])
    r = json.loads(out.read_text())
    assert not r["tied"] and r["embedding_own_unit"]  # an untied embedding is gathered only while it runs
    # every packed 4-bit weight is split in two, and gathers back to the very bytes it had
    assert r["linear4bit_layers"] > 0 and r["packed_weights_sharded"] == r["linear4bit_layers"]
    assert r["packed_rows_local"] * 2 == r["packed_rows_full"]
    assert r["gathered_equal"] and r["quant_stats_whole"]
    assert r["local_frozen_bytes"] <= r["frozen_bytes"] / 2 + 1024  # each rank holds half the frozen base
    assert r["trainable_sharded"] == 0  # the adapters stay whole (replicated)
    # 2 ranks x 2 micro-batches (the first under no_sync) == the whole batch in one unsharded model
    assert r["loss"] == pytest.approx(r["reference_loss"], rel=1e-6)
    assert r["max_grad_relative_error"] < 1e-5
    assert r["logits_relative_error"] < 1e-6  # generation path: the root gathered for calls outside the loss
    assert r["adapters_equal_across_ranks"]


@pytest.mark.slow
def test_qlora_one_process_ddp_and_fsdp2_agree(tiny_llama_dir, chat_data, tmp_path, monkeypatch):
    """QLoRA with validation and exact match: 1 process (accum 2) == DDP x2 == FSDP2 x2.

    On the reference paths (``LORAQ_COMPILE=0``, inherited by the ranks): FSDP2's sharded 4-bit weights cannot
    take the decode kernels, which sum in another order, and this random model's greedy tokens are near ties
    everywhere; the kernels are held to their references in tests/kernels and tests/generation."""
    monkeypatch.setenv("LORAQ_COMPILE", "0")
    common = dict(method="qlora", dtype="fp32", val_fraction=0.2, eval_samples=3)
    runs = {"one": dict(grad_accum=2), "ddp": dict(nproc=2), "fsdp": dict(nproc=2, fsdp=True)}
    train_in_process(tiny_llama_dir, chat_data, tmp_path / "one", **common, **runs["one"])
    procs = {name: loraq_cli(["train", *base_args(tiny_llama_dir, chat_data, tmp_path / name, **common, **runs[name])])
             for name in ("ddp", "fsdp")}
    assert "2 processes (FSDP2, gloo)" in procs["fsdp"].stderr
    reference = weights(tmp_path / "one")
    summaries = {name: json.loads((tmp_path / name / "summary.json").read_text()) for name in runs}
    for name in ("ddp", "fsdp"):
        assert_same_weights(reference, weights(tmp_path / name), rtol=1e-5)
        assert summaries[name]["eval_loss"] == pytest.approx(summaries["one"]["eval_loss"], rel=1e-6)
        assert summaries[name]["sample"] == summaries["one"]["sample"]  # greedy predictions, before and after
        assert summaries[name]["tokens"] == summaries["one"]["tokens"]
