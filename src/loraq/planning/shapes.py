"""What decides a run's memory, read without loading a weight: the model's shape and its files.

* The architecture is built from ``config.json`` on the meta device
  (:func:`loraq.models.skeleton.build_skeleton`: shapes and dtypes, no
  storage), so the layers 4-bit loading converts
  (:func:`loraq.quant.model.quantizable_layer_names`) and the layers LoRA
  adapts (:func:`loraq.lora.targeting.find_targets`) are the very ones the run
  will have.
* The safetensors headers give the stored bytes (what a load reads) and the
  largest stored tensor (what the low-memory loader holds at once).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from loraq.planning.probe import ActivationProbe


@dataclass(frozen=True)
class LinearShape:
    """One linear layer of the decoder (the output head apart): ``rank`` 0 when LoRA does not adapt it;
    ``correction_rank`` the rank of the calibrated init's frozen pair beside the adapter (0: none)."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    quantizable: bool
    rank: int
    layer: int | None  # decoder block index, None outside the blocks
    correction_rank: int = 0

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ModelShape:
    """The numbers the memory formulas need (see :mod:`loraq.planning.estimate`)."""

    name: str
    family: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    linears: tuple[LinearShape, ...]
    other_params: int  # embeddings, norms and an untied head: kept in the compute dtype (fp32 for full)
    largest_param: int
    stored_bytes: int
    largest_stored_bytes: int
    tokenizer_file_bytes: int
    prequantized: bool
    fused_loss: bool  # training.objective fuses the head and the cross-entropy (no [tokens, vocab] logits)
    probe: ActivationProbe = field(compare=False, repr=False)  # what the forward keeps, measured

    @property
    def linear_params(self) -> int:
        return sum(lin.numel for lin in self.linears)

    @property
    def adapter_params(self) -> int:
        return sum(lin.rank * (lin.in_features + lin.out_features) for lin in self.linears)

    @property
    def correction_params(self) -> int:
        """The frozen pairs' values (``--init calibrated``): no gradients or optimizer state."""
        return sum(lin.correction_rank * (lin.in_features + lin.out_features) for lin in self.linears)

    @property
    def total_params(self) -> int:
        return self.linear_params + sum(lin.out_features for lin in self.linears if lin.bias) + self.other_params


def model_shape(source: Any, cfg: Any) -> ModelShape:
    """The shape of ``source`` (a :class:`~loraq.models.source.ModelSource`) for the run ``cfg`` describes."""
    import torch

    from loraq.models.safety import weight_files
    from loraq.models.skeleton import build_skeleton

    label = source.origin or source.name
    model = build_skeleton(source.path, torch.bfloat16, cfg.trust_remote_code, label)
    files = weight_files(source.path, allow_pickle=cfg.allow_pickle, label=label)
    stored, largest = _stored_bytes(files.files, files.format)
    config = model.config
    linears = _linears(model, cfg)
    head = _head(model)
    in_linears = {id(m.weight) for name, m in model.named_modules() if name in {lin.name for lin in linears}}
    seen: set[int] = set()
    other, largest_param = 0, 0
    for p in model.parameters():
        largest_param = max(largest_param, p.numel())
        if id(p) in seen or id(p) in in_linears:
            continue
        seen.add(id(p))
        other += p.numel()
    other -= sum(lin.out_features for lin in linears if lin.bias)
    heads = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    return ModelShape(
        name=source.name, family=str(getattr(config, "model_type", "?")), layers=int(config.num_hidden_layers),
        hidden=hidden, heads=heads, kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(config, "head_dim", None) or hidden // heads),
        intermediate=int(getattr(config, "intermediate_size", None) or 4 * hidden),
        vocab=int(head.out_features if head is not None else config.vocab_size),
        tied=bool(getattr(config, "tie_word_embeddings", False)), linears=tuple(linears), other_params=other,
        largest_param=largest_param,
        stored_bytes=stored, largest_stored_bytes=largest,
        tokenizer_file_bytes=_tokenizer_bytes(Path(source.path)), prequantized=source.kind == "bnb4bit",
        fused_loss=_fused_loss(model), probe=ActivationProbe(source.path, cfg.trust_remote_code))


def _linears(model: nn.Module, cfg: Any) -> list[LinearShape]:
    """Every nn.Linear but the head, with the rank LoRA gives it under ``cfg`` (0 for --method full)."""
    from loraq.lora.targeting import layer_index
    from loraq.modules import output_head_name
    from loraq.quant.model import quantizable_layer_names

    head = output_head_name(model)
    quantizable = set(quantizable_layer_names(model))
    ranks = _ranks(model, cfg)
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name == head:
            continue
        rank, fit_rank = ranks.get(name, (0, 0))
        out.append(LinearShape(name, module.in_features, module.out_features, module.bias is not None,
                               name in quantizable, rank, layer_index(name), fit_rank))
    return out


def _ranks(model: nn.Module, cfg: Any) -> dict[str, tuple[int, int]]:
    """``{adapted layer: (its rank, the rank of the calibrated init's frozen fit beside it, 0 without)}``."""
    if cfg.method == "full":
        return {}
    from loraq.lora.config import LoraConfig
    from loraq.lora.targeting import find_targets

    lora = LoraConfig.from_train_config(cfg)
    return {name: (lora.rank_for(name), lora.fit_rank(lora.rank_for(name))) for name in find_targets(model, lora)}


def _head(model: nn.Module) -> nn.Linear | None:
    from loraq.modules import output_head

    head = output_head(model)
    return head if isinstance(head, nn.Linear) else None


def _fused_loss(model: nn.Module) -> bool:
    from loraq.training.objective import CausalLMLoss

    return CausalLMLoss(model).fused


def _stored_bytes(files: tuple[Path, ...], fmt: str) -> tuple[int, int]:
    """(bytes of all weight files, bytes of the largest tensor as stored) from the headers alone."""
    from loraq.errors import ModelError
    from loraq.models.fingerprint import file_header

    total = sum(Path(f).stat().st_size for f in files)
    if fmt != "safetensors":
        return total, total
    largest = 0
    for path in files:
        for key, info in file_header(Path(path)).items():
            if key == "__metadata__":
                continue
            try:
                begin, end = info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise ModelError(f"{path}: tensor {key} has no data offsets in its header; "
                                 "the model folder is damaged") from None
            largest = max(largest, end - begin)
    return total, largest


def _tokenizer_bytes(folder: Path) -> int:
    return sum((folder / n).stat().st_size for n in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model")
               if (folder / n).is_file())
