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


def test_the_fit_stays_frozen_beside_a_default_start_and_is_stored_beside_the_adapter(tmp_path):
    """The base is plain NF4 (the codes of loading the model 4-bit); the fit is a frozen pair beside an adapter
    that starts as the default init does (B = 0), so the layer computes Q + s B0 A0 + s B A, held against a
    float64 product; training moves A and B only; the folder is an ordinary adapter of the full-precision
    weights (its update is zero at the start) with the fit in base_correction.safetensors, which rebuilds
    the same model on a plain 4-bit base, and whose absence is a clear error."""
    from loraq.errors import AdapterError
    from loraq.lora.correction import CORRECTION_NAME, load_correction
    from loraq.lora.files import load_adapter, save_adapter
    from loraq.quant.linear import Linear4bit

    fp = outlier_model()
    model = copy.deepcopy(fp)
    inject_lora(model, LoraConfig(r=4, alpha=8, init="calibrated"), quant=NF4, calibration=rows(seed=3))
    x = torch.randn(3, 5, fp.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for name, layer in lora_layers(model):
        plain = Linear4bit.from_linear(fp.get_submodule(name), **NF4)
        assert torch.equal(layer.base.weight, plain.weight), name
        assert not layer.lora_B["default"].weight.any() and "default" in layer.lora_correction, name
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    c, s = layer.lora_correction["default"], layer.scaling["default"]
    expected = x.double() @ (layer.base.dequantize(torch.float64) + s * c.b.double() @ c.a.double()).t()
    assert torch.allclose(layer(x).double(), expected, rtol=1e-4, atol=1e-4)

    before = {n: (lay.lora_correction["default"].a.clone(), lay.lora_correction["default"].b.clone())
              for n, lay in lora_layers(model)}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randint(0, VOCAB, (2, 8)), labels=torch.randint(0, VOCAB, (2, 8))).loss.backward()
    optimizer.step()
    for n, lay in lora_layers(model):
        assert torch.equal(lay.lora_correction["default"].a, before[n][0]), n
        assert torch.equal(lay.lora_correction["default"].b, before[n][1]), n
    assert layer.lora_B["default"].weight.any()

    save_adapter(model, tmp_path / "a")
    assert (tmp_path / "a" / CORRECTION_NAME).is_file()
    rebuilt = copy.deepcopy(fp)
    for name, _ in lora_layers(model):
        parent, child = name.rsplit(".", 1)
        setattr(rebuilt.get_submodule(parent), child, Linear4bit.from_linear(fp.get_submodule(name), **NF4))
    load_adapter(rebuilt, tmp_path / "a")
    assert load_correction(rebuilt, tmp_path / "a") == len(before)
    assert torch.allclose(rebuilt(torch.arange(8)[None]).logits, model(torch.arange(8)[None]).logits, atol=1e-5)
    (tmp_path / "a" / CORRECTION_NAME).unlink()
    with pytest.raises(AdapterError, match="base_correction.safetensors is missing"):
        load_correction(rebuilt, tmp_path / "a")


def test_calibrated_needs_rows_and_layers_inside_blocks():
    with pytest.raises(ConfigError, match="calibration rows"):
        inject_lora(outlier_model(), LoraConfig(init="calibrated"), quant=NF4, calibration=[])
    with pytest.raises(ConfigError, match="lm_head is not in one"):
        inject_lora(outlier_model(), LoraConfig(init="calibrated", target_modules=["q_proj", "lm_head"]), quant=NF4,
                    calibration=rows(seed=3))


def test_the_frozen_fit_takes_its_own_rank_and_is_the_best_fit_of_that_rank():
    """--correction-rank 8 beside a rank-4 adapter: every layer's frozen pair is the Eckart-Young optimum of
    rank 8 for its NF4 error on the calibration rows (float64 moments of a whole-model forward, a full SVD),
    the trainable pair keeps rank 4."""
    fp, token_rows = outlier_model(), rows(seed=3)
    model = copy.deepcopy(fp)
    inject_lora(model, LoraConfig(r=4, alpha=8, init="calibrated", correction_rank=8), quant=NF4,
                calibration=token_rows)
    names = [n for n, _ in lora_layers(model)]
    moments = reference_moments(fp, names, token_rows)
    for name, layer in lora_layers(model):
        c, s = layer.lora_correction["default"], layer.scaling["default"]
        assert layer.lora_A["default"].weight.shape[0] == 4 and c.a.shape == (8, layer.in_features), name
        h = moments[name]
        chol = torch.linalg.cholesky(h + 0.01 * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64))
        error = fp.get_submodule(name).weight.detach().double() - layer.base.dequantize(torch.float64)
        best = float((torch.linalg.svdvals(error @ chol)[8:] ** 2).sum())
        fitted = float(((error - s * c.b.double() @ c.a.double()) @ chol).norm() ** 2)
        assert fitted == pytest.approx(best, rel=1e-3), name
