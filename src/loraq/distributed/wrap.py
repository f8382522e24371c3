"""Wrapping the loss module for several ranks: DDP (default) or FSDP2.

* DDP replicates the model; only trainable parameters (the adapters) take
  part in the gradient all-reduce; frozen weights, 4-bit ones included, are
  left out of DDP's bookkeeping entirely.
* FSDP2 (``torch.distributed.fsdp.fully_shard``) shards the frozen base
  across ranks, one unit per decoder layer, one for an untied input
  embedding, and a root unit (final norm, head, a tied embedding),
  all-gathering a unit only while it runs: the FSDP+QLoRA
  approach for models larger than one device. For a 4-bit layer the packed
  ``uint8`` weight (a frozen ``nn.Parameter``) is sharded like any other;
  its QuantState (absmax and the code tables, plain tensors, 1/32 of the
  packed bytes with double quantization) stays whole on every rank.
  The trainable parameters (LoRA A/B, ``--modules-to-save``) are left out
  of sharding (``ignored_params``): they are a fraction of a percent of the
  model, so each rank keeps a full copy and their gradients are averaged
  by one all-reduce at the end of each synchronised backward
  (:class:`ReplicatedGradSync`), exactly as DDP would. Optimizer state,
  checkpoints and the saved adapter are therefore the same plain tensors as
  under DDP or one process.
"""
from __future__ import annotations

import contextlib
import ctypes
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from loraq.config import TrainConfig


def wrap_for_distributed(loss_module: nn.Module, cfg: TrainConfig, runtime) -> nn.Module:
    """The module the loop calls: DDP, or FSDP2 with ``--fsdp``; both give it a ``no_sync()`` context."""
    if cfg.fsdp:
        return shard_with_fsdp2(loss_module, runtime)
    frozen = [name for name, p in loss_module.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in loss_module.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(loss_module, frozen)
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    # every buffer is ignored above (rotary tables, nothing rank-local): no buffer sync in forward
    return DistributedDataParallel(loss_module, device_ids=device_ids, forward_sync_buffers=False)


def shard_with_fsdp2(loss_module: nn.Module, runtime) -> nn.Module:
    """``fully_shard`` every decoder layer, then the rest (see the module docstring)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    if runtime.device.type == "cpu":
        fixed_mmap_threshold()
    trainable = [p for p in loss_module.parameters() if p.requires_grad]
    ignored = set(trainable)
    for p in trainable:  # every rank starts from rank 0's adapters, as DDP would make sure
        dist.broadcast(p.data, src=0)
    for layer in decoder_layers(loss_module.model):
        # move the whole layer first: FSDP moves parameters and buffers only, a 4-bit layer's QuantState
        # moves with Linear4bit._apply. One layer at a time: the device never holds more than one full layer
        layer.to(runtime.device)
        fully_shard(layer, mesh=mesh, ignored_params=ignored)
    embed, head = loss_module.model.get_input_embeddings(), loss_module.model.get_output_embeddings()
    if embed is not None and (head is None or head.weight is not embed.weight):
        # an untied embedding is its own unit, gathered only while it runs; a tied one stays with the head in the
        # root (the fused loss reads the head's weight directly, so the root must hold it)
        embed.to(runtime.device)
        fully_shard(embed, mesh=mesh, ignored_params=ignored)
    loss_module.to(runtime.device)
    fully_shard(loss_module, mesh=mesh, ignored_params=ignored)
    # settle now which unit is the root (FSDP2 would do it at the root's first forward): generation calls the
    # layers without passing through the loss module, and a layer that ran first would claim to be a root
    fully_shard.state(loss_module)._lazy_init()
    sync = ReplicatedGradSync(trainable, runtime.world_size)
    loss_module.no_sync = sync.no_sync  # the loop's accumulation hook
    # transformers' generate() then keeps every rank stepping until all are done (synced_gpus): the layers
    # all-gather in each forward, so a rank that stopped early would leave the others waiting
    loss_module.model._is_fsdp_managed_module = True
    loss_module.replicated_grad_sync = sync
    return loss_module


def fixed_mmap_threshold(threshold_bytes: int = 1 << 20) -> None:
    """On glibc, serve every block of ``threshold_bytes`` or more by mmap, so that freeing it returns it.

    glibc raises its mmap threshold each time a large block is freed; from
    then on FSDP's per-layer gathers, allocated and freed at every forward and
    backward, come from a heap that only grows (docs/distributed.md gives
    the peaks measured with and without). A fixed threshold keeps
    resident memory at what is live, for some speed. The environment variable
    ``MALLOC_MMAP_THRESHOLD_``, if set, wins; elsewhere than glibc this does nothing.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return
    try:
        ctypes.CDLL(None).mallopt(-3, threshold_bytes)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (``model.layers`` of a Llama-like model), found by their class name."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and "DecoderLayer" in type(module[0]).__name__:
            return list(module)
    return []


class ReplicatedGradSync:
    """Average the gradients of replicated parameters over ranks once per synchronised backward.

    Each parameter's post-accumulate hook queues one callback that autograd
    runs when the whole backward is done; it all-reduces every gradient as
    one flat tensor (the same order on every rank) and divides by the world
    size, as DDP does. Inside :meth:`no_sync` nothing is queued, so gradient
    accumulation adds up locally and the last micro-batch reduces the sum.
    """

    def __init__(self, params: list[nn.Parameter], world_size: int):
        self.params = params
        self.world_size = world_size
        self.enabled = True
        self._queued = False
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_grad)

    def _on_grad(self, _param: torch.Tensor) -> None:
        if self.enabled and not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.all_reduce)

    def all_reduce(self) -> None:
        self._queued = False
        if not self.params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p, g in zip(self.params, grads):
            n = g.numel()
            reduced = flat[offset:offset + n].view_as(g)
            if p.grad is None:
                p.grad = reduced.clone()
            else:
                p.grad.copy_(reduced)
            offset += n

    @contextlib.contextmanager
    def no_sync(self):
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True


def gathered_for_inference(loss_module: nn.Module):
    """A context in which the model may be called outside the loss module (generation) under FSDP2.

    The root unit's parameters (embeddings, head) are all-gathered for its
    duration; the decoder layers all-gather themselves as they run. Every
    rank must enter it and run the same calls. A no-op for DDP.
    """
    if not hasattr(loss_module, "replicated_grad_sync"):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def gathered():
        loss_module.unshard()
        try:
            yield
        finally:
            loss_module.reshard()

    return gathered()
