"""Wrapping the loss module for several ranks: DDP (default) or FSDP2.

* DDP replicates the model; only trainable parameters (the adapters) take
  part in the gradient all-reduce; frozen weights, 4-bit ones included, are
  left out of DDP's bookkeeping entirely.
* FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every decoder layer's
  parameters, the frozen base (packed 4-bit weights too) included, across
  ranks, all-gathering a layer only while it runs: the FSDP+QLoRA approach
  for models larger than one device.
"""
from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from loraq.config import TrainConfig


def wrap_for_distributed(loss_module: nn.Module, cfg: TrainConfig, runtime) -> nn.Module:
    if cfg.fsdp:
        return _fsdp2(loss_module, runtime)
    frozen = [name for name, p in loss_module.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in loss_module.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(loss_module, frozen)
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(loss_module, device_ids=device_ids, broadcast_buffers=False)


def _fsdp2(loss_module: nn.Module, runtime) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = loss_module.model
    layers = _decoder_layers(model)
    for layer in layers:
        fully_shard(layer)
    fully_shard(loss_module)
    loss_module.no_sync = _fsdp_no_sync(loss_module)  # the loop's accumulation hook
    return loss_module


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and "DecoderLayer" in type(module[0]).__name__:
            return list(module)
    return []


def _fsdp_no_sync(module):
    import contextlib

    @contextlib.contextmanager
    def no_sync():
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)

    return no_sync
