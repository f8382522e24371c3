"""The bytes a training forward keeps for backward, measured on the model's own code with tensors that have no storage.

The planner does not model how a transformers release implements attention,
RoPE, masks or norms: it runs them. :func:`build_probe_model` builds the
user's model class from ``config.json`` with :data:`PROBE_BLOCKS` decoder
blocks, gives it storage-less parameters (``FakeTensorMode``: shapes, dtypes
and the device, no bytes), and prepares it as training does (4-bit layers,
LoRA with its rank, DoRA and the calibrated init's frozen pair, every weight
trainable for ``--method full``, loraq's fast paths, checkpointing). One
forward of the backbone runs under ``torch.autograd.graph.saved_tensors_hooks``,
which records each storage autograd keeps, once (the model's weights left
out), and the block during which it was first saved. Token ids, positions and
the padding mask are real tensors, so every value-dependent choice (is a mask
built, is it causal) is the one the run makes; autocast applies as on the CPU.

A fake forward costs about a second on a small model, too slow to repeat for
every size a plan searches. So each kind of run (the attention path, a mask
or not) is probed twice, one row of :data:`PROBE_LENGTHS` tokens each, and
every storage's size is solved as ``a T + q T^2`` -- exact, since a
training forward keeps tensors of ``T`` rows (activations) and of ``T x T``
(the mask, the attention probabilities), each proportional to the batch.
At a batch of ``B`` rows of ``T`` tokens, with ``L`` blocks::

    saved(B, T) = B [ sum over the probe's storages  a T + q T^2
                      + (L - PROBE_BLOCKS) x the same over its last block ]

with one exception, loraq's own matmul attention
(:mod:`loraq.kernels.attention`): it keeps the probabilities of the causal
blocks it computes, so there ``q T^2`` becomes ``q sum (t1 - t0) t1`` over
:func:`~loraq.kernels.attention.causal_blocks` (the probe's rows fit one block,
where the two agree), and which path a batch takes is that module's rule
(:func:`~loraq.kernels.attention.fits_matmul_path`).

The head and the loss are loraq's fused kernel (:mod:`loraq.training.loss`),
counted in :mod:`loraq.planning.estimate` from its code. A GPU run is probed
on the CPU with SDPA (the matmul attention is CPU-only); CUDA's SDPA kernels
keep about the same tensors (queries, keys, values, the output, the log-sum-exp).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraq.planning import probe_store

PROBE_BLOCKS = 2
PROBE_LENGTHS = (16, 32, 48)  # evenly spaced, within one causal block of the matmul attention (kernels.attention.BLOCK)
OUTSIDE = -1  # saved outside every decoder block (embeddings, the final norm)


@dataclass(frozen=True)
class ProbeRun:
    """What decides the saved tensors besides the batch: method, compute dtype, device, checkpointing, LoRA."""

    method: str
    dtype: torch.dtype
    device: str
    grad_checkpointing: bool
    lora: Any  # a LoraConfig (None for --method full)
    quant: tuple[str, bool, int]  # (quant_type, double_quant, blocksize)


@dataclass(frozen=True)
class Storage:
    """One saved storage: ``fixed + B (linear T + quadratic T^2)`` bytes for ``B`` rows of ``T`` tokens (``fixed``:
    what no batch changes, such as the adapter's compute-dtype copies); ``block``: the probe's block that first
    saved it (:data:`OUTSIDE`: none)."""

    fixed: int
    linear: int
    quadratic: int
    block: int


def _fit(sizes: list[int], block: int) -> Storage:
    """``Storage`` from its bytes at the three evenly spaced :data:`PROBE_LENGTHS` (one row each)."""
    (t1, t2, _), (s1, s2, s3) = PROBE_LENGTHS, sizes
    step = t2 - t1
    quadratic, rest = divmod(s1 - 2 * s2 + s3, 2 * step * step)
    linear, rest2 = divmod(s2 - s1 - quadratic * (t2 * t2 - t1 * t1), step)
    if rest or rest2:
        raise RuntimeError(f"a saved tensor of {sizes} bytes at {PROBE_LENGTHS} tokens is not a + b T + c T^2")
    return Storage(s1 - linear * t1 - quadratic * t1 * t1, linear, quadratic, block)


@dataclass(frozen=True)
class SavedTensors:
    """What one kind of training forward keeps (see the module docstring), for any batch and length."""

    storages: tuple[Storage, ...]
    probe_blocks: int
    layers: int
    matmul_attention: bool  # the probabilities are loraq's matmul path's (causal blocks), not a T x T mask

    def sizes(self, batch: int, length: int) -> list[int]:
        """The bytes of each storage a forward of ``batch`` rows of ``length`` tokens keeps, the blocks past the
        probe's repeated as its last one."""
        extra = self.layers - self.probe_blocks
        out = []
        for st in self.storages:
            copies = 1 + (extra if st.block == self.probe_blocks - 1 else 0)
            out.extend(self._bytes(st, batch, length) for _ in range(max(copies, 0)))
        return [size for part in out for size in part]

    def _bytes(self, st: Storage, batch: int, length: int) -> list[int]:
        linear = st.fixed + batch * st.linear * length
        if not st.quadratic:
            return [linear]
        if not self.matmul_attention:
            return [linear + batch * st.quadratic * length * length]
        from loraq.kernels.attention import causal_blocks

        blocks = causal_blocks(length, None, True)  # one probability tensor per causal block
        return [linear] * bool(linear) + [batch * st.quadratic * (t1 - t0) * t1 for t0, t1 in blocks]

    def total(self, batch: int, length: int) -> int:
        return sum(self.sizes(batch, length))

    def below(self, batch: int, length: int, limit: int) -> int:
        """The part in storages smaller than ``limit`` bytes."""
        return sum(size for size in self.sizes(batch, length) if size < limit)

    def first_block(self, batch: int, length: int) -> int:
        """What the first block keeps (with RoPE's cos/sin): one block recomputed under checkpointing."""
        one = dataclasses.replace(self, storages=tuple(st for st in self.storages if st.block == 0),
                                  layers=self.probe_blocks)
        return one.total(batch, length)


class ActivationProbe:
    """Measures :class:`SavedTensors` for a model folder, each kind of run once."""

    def __init__(self, folder: str | Path, trust_remote_code: bool = False):
        self.folder = str(folder)
        self.trust_remote_code = trust_remote_code
        self._models: dict[str, nn.Module] = {}
        self._matmul_capable: dict[str, bool] = {}  # apply_fast_paths found nothing that keeps the model on SDPA
        self._records: dict[str, dict[str, Any]] = {}  # per run: matmul_capable, heads, probe_blocks, kinds
        self._keys: dict[str, str | None] = {}  # per run: its key in probe_store
        self._lock = threading.Lock()

    def saved(self, run: ProbeRun, batch: int, length: int, masked: bool) -> SavedTensors:
        """The saved tensors of a training forward of ``batch`` rows of ``length`` tokens (``masked``: padded or
        packed rows, so the attention gets a mask); use ``.total(batch, length)`` and the like on the result."""
        with self._lock:
            record = self._record(run)
            matmul = self._matmul_path(run, record, batch, length)
            kind = f"masked={int(masked)} matmul={int(matmul)}"
            if kind not in record["kinds"]:
                record["kinds"][kind] = self._measure(run, masked, matmul)
                probe_store.write(self._keys[_run_key(run)], record)
            storages = tuple(Storage(*values) for values in record["kinds"][kind])
            return SavedTensors(storages, record["probe_blocks"], self.layers, matmul)

    def _record(self, run: ProbeRun) -> dict[str, Any]:
        """What is known of ``run`` on this model: on disk (:mod:`loraq.planning.probe_store`), else probed now."""
        key = _run_key(run)
        if key not in self._records:
            self._keys[key] = probe_store.record_key(self.folder, key)
            record = probe_store.read(self._keys[key])
            if not {"matmul_capable", "heads", "probe_blocks", "kinds"} <= record.keys():
                model = self._model(run)
                record = {"matmul_capable": self._matmul_capable[key], "kinds": {},
                          "heads": int(model.config.num_attention_heads),
                          "probe_blocks": int(model.config.num_hidden_layers)}
            self._records[key] = record
        return self._records[key]

    @staticmethod
    def _matmul_path(run: ProbeRun, record: dict[str, Any], batch: int, length: int) -> bool:
        from loraq.kernels.attention import fits_matmul_path

        if not record["matmul_capable"]:
            return False  # not on the CPU, or the model's attention keeps SDPA (dropout, softcapping, ...)
        itemsize = 4 if run.method == "full" else run.dtype.itemsize  # full: fp32 weights, queries in fp32
        return fits_matmul_path(batch, record["heads"], length, itemsize)

    def _measure(self, run: ProbeRun, masked: bool, matmul: bool) -> list[list[int]]:
        """Each saved storage as ``[fixed, linear, quadratic, block]`` (:class:`Storage`)."""
        from loraq.kernels.attention import NAME

        model = self._model(run)
        if getattr(model.config, "_attn_implementation", None) in (NAME, "sdpa"):  # the path this batch takes
            model.set_attn_implementation(NAME if matmul else "sdpa")
        measured = [_forward_saved(model, 1, t, masked, run) for t in PROBE_LENGTHS]
        if len({len(sizes) for sizes, _ in measured}) != 1:
            raise RuntimeError(f"{self.folder}: the probe kept {[len(s) for s, _ in measured]} tensors at "
                               f"{PROBE_LENGTHS} tokens; cannot scale them")
        runs = [sizes for sizes, _ in measured] + [measured[0][1]]
        return [list(dataclasses.astuple(_fit(sizes, block))) for *sizes, block in zip(*runs[:-1], runs[-1])]

    def _model(self, run: ProbeRun) -> nn.Module:
        key = _run_key(run)
        if key not in self._models:
            self._models[key], self._matmul_capable[key] = build_probe_model(self.folder, run, self.trust_remote_code)
        return self._models[key]

    @functools.cached_property
    def layers(self) -> int:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.folder, trust_remote_code=self.trust_remote_code)
        return int(config.num_hidden_layers)


def _run_key(run: ProbeRun) -> str:
    """The run's settings as text (a LoraConfig is not hashable), without the model's own path."""
    lora = run.lora if run.lora is None else dataclasses.replace(run.lora, base_model_name_or_path=None)
    return repr(dataclasses.replace(run, lora=lora))


def build_probe_model(folder: str, run: ProbeRun, trust_remote_code: bool) -> tuple[nn.Module, bool]:
    """The model class of ``folder`` with :data:`PROBE_BLOCKS` blocks (fewer if it has fewer) and storage-less CPU
    parameters, prepared for training as ``run`` says; and whether loraq's matmul attention may take its
    attention (:func:`loraq.kernels.families.attention_fallback`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    _truncate_layers(config, PROBE_BLOCKS)
    dtype = torch.float32 if run.method == "full" else run.dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        model.to_empty(device="cpu")
        matmul_capable = _prepare(model, run)
    return model, matmul_capable


def _truncate_layers(config: Any, blocks: int) -> None:
    """``num_hidden_layers`` = ``blocks``, and every per-layer list of the config (``layer_types``, ...) cut to it."""
    layers = int(config.num_hidden_layers)
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == layers:
            setattr(config, key, value[:blocks])
    config.num_hidden_layers = min(blocks, layers)


def _prepare(model: nn.Module, run: ProbeRun) -> bool:
    """As training prepares a loaded model (``training.setup``): 4-bit layers, fast paths, LoRA or every weight;
    returns whether the matmul attention applies to the model (on its device)."""
    from loraq.kernels import apply_fast_paths

    if run.method == "qlora":
        _quantize_placeholders(model, run)
    fast_paths = apply_fast_paths(model, torch.device(run.device))
    if run.method == "full":
        model.requires_grad_(True)
    else:
        _inject(model, run)
    if run.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return fast_paths.attention is None


def _quantize_placeholders(model: nn.Module, run: ProbeRun) -> None:
    """Every layer 4-bit loading converts becomes a ``Linear4bit`` of the right shapes (no values to quantize)."""
    from loraq.quant.functional import placeholder_state
    from loraq.quant.linear import Linear4bit
    from loraq.quant.model import quantizable_layer_names

    quant_type, double_quant, blocksize = run.quant
    for name in quantizable_layer_names(model):
        linear = model.get_submodule(name)
        from loraq.modules import linear_weight

        weight = linear_weight(linear)
        packed, state = placeholder_state(tuple(weight.shape), blocksize, quant_type, double_quant, weight.dtype)
        bias = None if linear.bias is None else linear.bias.detach()
        model.set_submodule(name, Linear4bit(packed, state, bias, run.dtype))


def _inject(model: nn.Module, run: ProbeRun) -> None:
    """LoRA on the targets; with the calibrated init, its frozen pair of the fit's rank beside each adapter."""
    from loraq.lora.layer import LoraLinear
    from loraq.lora.model import inject_lora

    lora = run.lora
    inject_lora(model, dataclasses.replace(lora, init="default") if lora.init != "default" else lora,
                initialise=False)
    if lora.init != "calibrated":
        return
    for module in model.modules():
        if isinstance(module, LoraLinear):
            for name in module.adapter_names:
                rank = lora.fit_rank(module.r[name])
                module.set_correction(name, torch.empty(rank, module.in_features),
                                      torch.empty(module.out_features, rank))


def _forward_saved(model: nn.Module, batch: int, length: int, masked: bool,
                   run: ProbeRun) -> tuple[list[int], list[int]]:
    """One training forward of the backbone: the size of each storage autograd kept (weights left out), and the
    index of the block that first saved it (:data:`OUTSIDE` for none)."""
    weights = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    for module in model.modules():
        state = getattr(module, "quant_state", None)
        if state is not None:
            weights |= {t.untyped_storage()._cdata for t in vars(state).values() if isinstance(t, torch.Tensor)}
    seen: dict[int, tuple[int, int]] = {}
    current = [OUTSIDE]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in weights and storage._cdata not in seen:
            seen[storage._cdata] = (storage.nbytes(), current[0])
        return t

    handles = _block_hooks(model, current)
    ids, positions, mask = _inputs(batch, length, masked)
    backbone = getattr(model, getattr(model, "base_model_prefix", "model"))
    autocast = (torch.autocast("cpu", dtype=run.dtype) if run.method == "full" and run.dtype != torch.float32
                else contextlib.nullcontext())
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast, torch.enable_grad():
            backbone(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [size for size, _ in seen.values()], [block for _, block in seen.values()]


def _block_hooks(model: nn.Module, current: list[int]) -> list[Any]:
    """Forward hooks that set ``current[0]`` to the index of the decoder block running (OUTSIDE between them)."""
    layers = _decoder_layers(model)

    def enter(index: int):
        def hook(module, args, kwargs=None):
            current[0] = index
        return hook

    def leave(module, args, output):
        current[0] = OUTSIDE

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(enter(i)))
        handles.append(layer.register_forward_hook(leave))
    return handles


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks: the ModuleList as long as ``num_hidden_layers``."""
    count = int(model.config.num_hidden_layers)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise RuntimeError(f"{type(model).__name__}: no list of {count} decoder blocks")


def _inputs(batch: int, length: int, masked: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Real token ids, positions and (for a padded batch: the first row ends in padding) a padding mask."""
    ids = torch.zeros(batch, length, dtype=torch.long)
    positions = torch.arange(length).expand(batch, length)
    if not masked:
        return ids, positions, None
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length - max(1, length // 8):] = 0
    return ids, positions, mask
