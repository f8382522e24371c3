"""The calibrated initialisation: a rank-r correction of the 4-bit error fitted on the layers' real inputs.

References: float64 formulas (Eckart-Young through a full SVD, ``torch.linalg.svdvals``), and second moments
collected in float64 by a whole-model forward, one row at a time, with no padding and no block walk.
"""
from __future__ import annotations

import copy

import pytest
import torch
from lora_helpers import VOCAB, tiny_model

from loraq.errors import ConfigError
from loraq.lora.calibrate import block_second_moments
from loraq.lora.config import LoraConfig
from loraq.lora.init import whitened_low_rank_factors
from loraq.lora.model import inject_lora, lora_layers
from loraq.lora.targeting import find_targets

NF4 = dict(quant_type="nf4", double_quant=True, blocksize=64, compute_dtype=torch.float32)


def _anisotropic_inputs(n: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, width, generator=g, dtype=torch.float64) * torch.logspace(0, 2, width, dtype=torch.float64)


def test_the_factors_are_the_best_rank_r_fit_on_the_inputs_and_balanced():
    g = torch.Generator().manual_seed(0)
    residual = torch.randn(24, 32, generator=g, dtype=torch.float64)
    x = _anisotropic_inputs(500, 32, seed=1)
    h, r, s, damp = x.T @ x, 4, 2.0, 0.01
    a, b = whitened_low_rank_factors(residual, h, r, s, damp)
    fit = s * b.double() @ a.double()
    chol = torch.linalg.cholesky(h + damp * h.diagonal().mean() * torch.eye(32, dtype=torch.float64))
    # Eckart-Young: no rank-r M does better than the singular values of residual @ L beyond the r-th
    best = float((torch.linalg.svdvals(residual @ chol)[r:] ** 2).sum())
    assert float(((residual - fit) @ chol).norm() ** 2) == pytest.approx(best, rel=1e-5)
    assert torch.allclose(b.norm(dim=0), a.norm(dim=1), rtol=1e-4)
    # the weight-space fit LoftQ makes (truncated SVD of the residual) is worse on these inputs ...
    u, sv, vh = torch.linalg.svd(residual)
    weight_fit = u[:, :r] @ torch.diag(sv[:r]) @ vh[:r]
    assert ((residual - fit) @ x.T).norm() < 0.9 * ((residual - weight_fit) @ x.T).norm()
    # ... and is what the calibrated fit becomes for inputs with no preferred direction
    a_iso, b_iso = whitened_low_rank_factors(residual, torch.eye(32, dtype=torch.float64), r, s, damp)
    assert torch.allclose(s * b_iso.double() @ a_iso.double(), weight_fit, rtol=0, atol=1e-5)


def outlier_model(seed: int = 0):
    """The tiny Llama with a few input channels of every block 30x louder, as trained LLMs have (outlier features)."""
    model = tiny_model(seed, hidden=64, layers=2)
    with torch.no_grad():
        for block in model.model.layers:
            for norm in (block.input_layernorm, block.post_attention_layernorm):
                norm.weight[:4] *= 30.0
    return model


def rows(seed: int, n: int = 12) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (int(torch.randint(3, 24, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@torch.no_grad()
def reference_moments(model, names: list[str], token_rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """float64, a whole-model forward per row (no padding), hooks on every named layer at once."""
    model = copy.deepcopy(model).double()
    sums = {n: torch.zeros(model.get_submodule(n).in_features, model.get_submodule(n).in_features,
                           dtype=torch.float64) for n in names}

    def add(name):
        def hook(module, args):
            sums[name].add_(args[0][0].T @ args[0][0])  # returns None: the input is left as it is
        return hook

    hooks = [model.get_submodule(n).register_forward_pre_hook(add(n)) for n in names]
    for row in token_rows:
        model(input_ids=torch.tensor([row]))
    for hook in hooks:
        hook.remove()
    return sums


def test_block_walk_moments_match_a_float64_whole_model_reference():
    model, token_rows = outlier_model(), rows(seed=3)
    names = find_targets(model, LoraConfig())
    expected = reference_moments(model, names, token_rows)
    seen = []
    for moments in block_second_moments(model, names, token_rows):
        seen += list(moments)
        for name, h in moments.items():
            assert h.dtype == torch.float64
            assert float((h - expected[name]).norm() / expected[name].norm()) < 1e-5, name
    assert sorted(seen) == sorted(names)


def activation_error(fp_weights: dict[str, torch.Tensor], start: dict[str, torch.Tensor],
                     moments: dict[str, torch.Tensor]) -> float:
    """sum over layers of sum_x ||(W - W_start) x||^2 = tr(D H D^T), D the weight error at the start, float64."""
    return sum(float(torch.einsum("oi,ij,oj->", d, moments[n], d))
               for n, d in ((n, fp_weights[n] - start[n].double()) for n in fp_weights))


def test_calibrated_beats_loftq_in_activation_space_on_held_out_rows():
    """The tiny-model version of the default model's benchmark: held-out inputs, float64 reference moments."""
    from loraq.quant.linear import Linear4bit

    fp = outlier_model()
    names = find_targets(fp, LoraConfig())
    weights = {n: fp.get_submodule(n).weight.detach().double() for n in names}
    held_out = reference_moments(fp, names, rows(seed=4, n=16))
    starts = {"nf4": {n: Linear4bit.from_linear(fp.get_submodule(n), **NF4).dequantize(torch.float64) for n in names}}
    for init in ("loftq", "calibrated"):
        model = copy.deepcopy(fp)
        inject_lora(model, LoraConfig(r=4, alpha=8, init=init, loftq_iters=5 if init == "loftq" else 1), quant=NF4,
                    calibration=rows(seed=3, n=24))
        starts[init] = {n: layer.merged_weight(torch.float32) for n, layer in lora_layers(model)}
    errors = {k: activation_error(weights, start, held_out) for k, start in starts.items()}
    assert errors["calibrated"] < 0.8 * errors["loftq"] < 0.8 * errors["nf4"], errors


def test_the_base_is_plain_nf4_and_the_file_holds_the_update_relative_to_the_untouched_base(tmp_path):
    from safetensors.torch import load_file

    from loraq.lora.files import save_adapter
    from loraq.quant.linear import Linear4bit

    fp = outlier_model()
    model = copy.deepcopy(fp)
    inject_lora(model, LoraConfig(r=4, alpha=8, init="calibrated"), quant=NF4, calibration=rows(seed=3))
    tensors = None
    for name, layer in lora_layers(model):
        plain = Linear4bit.from_linear(fp.get_submodule(name), **NF4)
        assert torch.equal(layer.base.weight, plain.weight), name  # the same codes as loading the model 4-bit
    save_adapter(model, tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    for name, _layer in lora_layers(model):  # untrained: the update relative to W is zero
        key = f"base_model.model.{name}.lora_"
        assert float((tensors[key + "B.weight"] @ tensors[key + "A.weight"]).abs().max()) < 1e-6


def test_calibrated_needs_rows_and_layers_inside_blocks():
    with pytest.raises(ConfigError, match="calibration rows"):
        inject_lora(outlier_model(), LoraConfig(init="calibrated"), quant=NF4, calibration=[])
    with pytest.raises(ConfigError, match="lm_head is not in one"):
        inject_lora(outlier_model(), LoraConfig(init="calibrated", target_modules=["q_proj", "lm_head"]), quant=NF4,
                    calibration=rows(seed=3))
