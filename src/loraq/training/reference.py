"""The reference model's log-probabilities for DPO: computed once per pair, cached with the run.

The reference is the model as the run starts. With a fresh LoRA adapter
(``--init default`` or ``gaussian``: B = 0) that is the base itself, so its
log-probabilities come from the same model with the adapter switched off
(:func:`loraq.lora.model.disable_adapters`): no second copy, no extra memory.
With ``--init-adapter`` (the SFT adapter is copied and trains), PiSSA/LoftQ
(whose starting point is not the bare base) and ``--method full``, it is the
model itself before its first step. Either way it is evaluated once, before
training, for:

* the training pairs the run will visit (all of them once it runs a full
  epoch; the first ``steps x global batch`` of epoch 0's order otherwise),
  in index order, ``--batch-size`` pairs at a time;
* every validation pair (its chosen-vs-rejected comparison is also the
  ``base_preference_accuracy``).

The cache is 8 bytes per pair (two float32 sums), so it always fits; it is
written to ``<run>/reference_logps.safetensors`` once, with a fingerprint of
the pairs' tokens and the settings that shape the reference, and read back on
``--resume`` instead of being recomputed (a stale or damaged file is
recomputed, which gives the same bits: the same batches in the same order).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraq.data.preference import PairExample, collate_pairs

CACHE_FILE = "reference_logps.safetensors"
# the settings that change the reference model or which pairs it scores, and how they are batched
_SHAPING = ("model", "method", "dtype", "quant", "double_quant", "blocksize", "init", "init_adapter", "loftq_iters",
            "calibration_data", "calibration_samples", "correction_rank",
            "seq_len", "batch_size", "grad_accum", "seed", "max_steps", "epochs", "train_on_inputs")


@dataclass
class ReferenceLogps:
    """[pairs, 2] float32 tensors (chosen, rejected summed log-probabilities); NaN for pairs never needed."""

    train: torch.Tensor
    val: torch.Tensor

    def for_split(self, split: str) -> torch.Tensor:
        return self.train if split == "train" else self.val

    def base_preference_accuracy(self) -> float | None:
        """Share of validation pairs whose chosen answer the reference model finds likelier (None: no pairs)."""
        if not len(self.val):
            return None
        return float((self.val[:, 0] > self.val[:, 1]).float().mean())


def visited_pairs(num_pairs: int, global_batch: int, batches: int, seed: int) -> list[int]:
    """Indices of the pairs the first ``batches`` global batches of :class:`~loraq.data.batches.BatchIterator` hold."""
    from loraq.data.batches import epoch_order

    per_epoch = -(-num_pairs // global_batch)
    if batches >= per_epoch:
        return list(range(num_pairs))
    order = epoch_order(num_pairs, seed, 0)
    return sorted({order[k % num_pairs] for k in range(batches * global_batch)})


@torch.no_grad()
def score_pairs(loss_module: nn.Module, pairs: Sequence[PairExample], indices: Sequence[int], batch_size: int,
                pad_id: int, device: torch.device, out: torch.Tensor) -> None:
    """Fill ``out[i]`` with (chosen, rejected) summed answer log-probabilities for each ``i`` in ``indices``."""
    for start in range(0, len(indices), batch_size):
        chunk = list(indices[start:start + batch_size])
        batch = collate_pairs([pairs[i] for i in chunk], chunk, pad_id).to(device)
        rows = loss_module(batch.input_ids, batch.labels, batch.position_ids, batch.attention_mask)
        b = len(chunk)
        out[chunk] = torch.stack([rows.answer[:b], rows.answer[b:]], dim=1).float().cpu()


def reference_context(model: nn.Module, fresh_adapter: bool) -> Callable[[], Any]:
    """How to run the reference: the adapter switched off (a fresh adapter: the base itself), or the model as is."""
    if not fresh_adapter:
        return contextlib.nullcontext
    from loraq.lora.model import disable_adapters

    return lambda: disable_adapters(model)


def frozen_adapter_context(model: nn.Module) -> Callable[[], Any]:
    """How to run a reference that is the adapter as it is now, frozen (GRPO's ``--beta`` > 0 with
    ``--init-adapter``): a copy of the trainable values is kept, and each reference pass swaps it in and the
    trained values back after (two copies of the adapter, no second model)."""
    params = [p for p in model.parameters() if p.requires_grad]
    frozen = [p.detach().clone() for p in params]

    @contextlib.contextmanager
    def swapped():
        current = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, value in zip(params, frozen):
                p.copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(params, current):
                    p.copy_(value)

    return swapped


def compute_reference(loss_module: nn.Module, context: Callable[[], Any], data, train_indices: Sequence[int],
                      batch_size: int, device: torch.device) -> ReferenceLogps:
    """The reference log-probabilities of ``train_indices`` and every validation pair (eval mode, RNG untouched)."""
    train = torch.full((len(data.train), 2), float("nan"))
    val = torch.full((len(data.val), 2), float("nan"))
    was, rng = loss_module.training, torch.get_rng_state()
    loss_module.eval()
    try:
        with context():
            score_pairs(loss_module, data.train, train_indices, batch_size, data.pad_id, device, train)
            score_pairs(loss_module, data.val, range(len(data.val)), batch_size, data.pad_id, device, val)
    finally:
        torch.set_rng_state(rng)
        loss_module.train(was)
    return ReferenceLogps(train, val)


def fingerprint(cfg: Any, data) -> str:
    """What the cached values depend on: the settings in ``_SHAPING`` and every pair's tokens."""
    digest = hashlib.sha256(json.dumps({k: getattr(cfg, k, None) for k in _SHAPING}, sort_keys=True,
                                       default=str).encode())
    for pair in list(data.train) + list(data.val):
        for row in (pair.chosen, pair.rejected):
            digest.update(json.dumps([row.input_ids, row.labels]).encode())
    return digest.hexdigest()


def save_cache(run_dir: Path, reference: ReferenceLogps, key: str) -> None:
    from safetensors.torch import save

    from loraq.paths import atomic_write_bytes

    blob = save({"train": reference.train.contiguous(), "val": reference.val.contiguous()},
                metadata={"fingerprint": key})
    atomic_write_bytes(Path(run_dir) / CACHE_FILE, blob)


def load_cache(run_dir: Path, key: str, sizes: tuple[int, int]) -> ReferenceLogps | None:
    """The cached values when the file is there, whole, and made for these pairs and settings; else None."""
    from safetensors import safe_open

    path = Path(run_dir) / CACHE_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as fh:
            if (fh.metadata() or {}).get("fingerprint") != key:
                return None
            train, val = fh.get_tensor("train"), fh.get_tensor("val")
    except Exception:  # a damaged file is recomputed, never trusted
        return None
    if (len(train), len(val)) != sizes:
        return None
    return ReferenceLogps(train, val)
