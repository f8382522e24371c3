"""The decode step as one native call (loraq.generation.fused) against transformers' forward over the whole
sequence: float32 and 4-bit bases (NF4 with double quantization, FP4 without), with and without a LoRA adapter on
every linear layer, grouped KV heads and q/k/v biases (qwen2), a left-padded batch; and the cases it hands back to
the module-by-module step."""
from __future__ import annotations

import contextlib

import pytest
import torch

from family_configs import family_config
from loraq.generation.engine import left_padded, position_ids
from loraq.generation.lean import LeanDecoder
from loraq.lora.config import LoraConfig
from loraq.lora.model import inject_lora
from loraq.quant.model import quantize_model_

VOCAB = 300
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_for(family: str, base: str, adapter: bool, use_dora: bool = False, names=("a",), dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(family, VOCAB)).eval().to(dtype)
    if base != "float32":
        quantize_model_(model, base, double_quant=base == "nf4", blocksize=64, compute_dtype=dtype)
    for k, name in enumerate(names if adapter else ()):  # ranks 8, 4: the stacks pad the second
        targets = ALL if k == 0 else ["q_proj", "v_proj", "down_proj"]
        inject_lora(model, LoraConfig(r=8 // (k + 1), alpha=16, target_modules=targets, use_dora=use_dora), name)
    if adapter:
        randomize(model, 0.2)
    return model.eval()


def randomize(model, scale: float) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


class Steps:
    """A prefill of PROMPTS, then decode steps of one token per row; each step's logits and whether the native
    call ran. ``decoder``: one made before (its native plan made for the model as it was then)."""

    def __init__(self, model, decoder: LeanDecoder | None = None):
        self.model, self.decoder = model, decoder or LeanDecoder(model)
        self.ids, self.mask = left_padded(PROMPTS, 0)
        self.cache = self.decoder.new_cache(len(PROMPTS), self.ids.shape[1] + 4)
        with torch.no_grad():
            self.decoder.forward(self.ids, self.mask, position_ids(self.mask), self.cache)

    def step(self, token: int) -> tuple[torch.Tensor, bool, torch.Tensor]:
        """(native logits, whether the native call ran, transformers' logits for the same sequence)."""
        new = torch.full((len(PROMPTS), 1), token)
        self.ids, self.mask = torch.cat([self.ids, new], 1), torch.cat([self.mask, torch.ones_like(new)], 1)
        ran = []
        run = self.decoder.fused.run
        self.decoder.fused.run = lambda *a: ran.append(run(*a)) or ran[-1]
        with torch.no_grad():
            got = self.decoder.forward(new, self.mask, (self.mask.sum(1) - 1)[:, None], self.cache)
            want = self.model(input_ids=self.ids, attention_mask=self.mask, position_ids=position_ids(self.mask))
        return got, ran == [True], want.logits[:, -1].float()


def close(got: torch.Tensor, want: torch.Tensor, tol: float) -> bool:
    return float((got - want).abs().max()) <= tol * float(want.abs().max())


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("base", ["float32", "nf4", "fp4"])
@pytest.mark.parametrize("adapter", [False, True])
def test_two_native_steps_equal_transformers_forward_over_the_whole_sequence(family, base, adapter):
    """Step 2 reads the keys and values step 1 wrote into the cache natively. Float32 weights: float32 rounding;
    4-bit ones: the product's int16 activations (bound in kernels/gemv4.py), well under 1e-3 of the logits."""
    steps = Steps(model_for(family, base, adapter))
    for token in (40, 41):
        got, ran, want = steps.step(token)
        assert ran
        assert close(got, want, 1e-5 if base == "float32" else 2e-3), float((got - want).abs().max())


@pytest.mark.parametrize("target", [("-march=native", "-mno-avx2"), ("-march=native", "-mno-avx512f")],
                         ids=["portable", "avx2"])
def test_the_portable_and_avx2_builds_equal_transformers_too(target, tmp_path, monkeypatch):
    """The same source built without AVX2 (every loop scalar) or without AVX-512 (this CPU may lack either)."""
    import platform

    from loraq.kernels import block
    from loraq.kernels.cbuild import cpu_flags

    if platform.machine() != "x86_64" or (target[1] == "-mno-avx512f" and "avx2" not in cpu_flags().split()):
        pytest.skip("an x86-64 build of this target")
    monkeypatch.setenv("LORAQ_CACHE", str(tmp_path))
    steps = Steps(model_for("qwen2", "nf4", True))
    steps.decoder.fused.lib = block.build(target)
    for token in (40, 41):
        got, ran, want = steps.step(token)
        assert ran and close(got, want, 2e-3)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_bf16_model_decodes_natively_in_float32_with_its_bf16_cache(family):
    """A bf16 model (4-bit base, bf16 norms, embeddings, biases and KV cache): the step widens what it reads and
    rounds what it writes. Held to transformers' forward of the same model built in float32, within what the
    bf16 weights and the bf16 prefill move (~1-3% of the largest logit; the module-by-module bf16 step lands
    as close)."""
    want = Steps(model_for(family, "nf4", True)).step(40)[2]
    steps = Steps(model_for(family, "nf4", True, dtype=torch.bfloat16))
    assert steps.cache.keys[0].dtype == torch.bfloat16
    for token in (40, 41):
        got, ran, reference = steps.step(token)
        assert ran
        if token == 40:
            assert close(got, want, 5e-2)
    assert close(got, reference, 5e-2)  # step 2 reads the keys step 1 wrote as bf16


def test_more_rows_than_one_pass_takes_run_in_groups(monkeypatch):
    """20 rows: two C calls of 10 rows, each on its rows of the cache, the mask and the routing."""
    from loraq.lora.rows import RowAdapters, as_route

    monkeypatch.setitem(globals(), "PROMPTS", [[5 + k % 7] * (1 + k % 5) + [20 + k] for k in range(20)])
    model = model_for("llama", "nf4", True, names=("a", "b"))
    routes = ["a", None, "b", "b", "a"] * 4
    with RowAdapters(model, [as_route(r) for r in routes]):
        steps = Steps(model)
        got, ran, _ = steps.step(40)
    assert ran
    assert close(got, routed_logits(steps, routes), 2e-3)


def test_a_factor_written_after_a_step_is_read_by_the_next_steps():
    """The plan points at the adapter's factors as they were: a write (an optimizer step, a load) remakes it."""
    model = model_for("llama", "nf4", True)
    first = Steps(model)
    first.step(40)
    randomize(model, 0.5)
    got, ran, want = Steps(model, first.decoder).step(41)
    assert ran and close(got, want, 2e-3)


def test_an_adapter_injected_after_the_decoder_was_made_is_applied():
    """A server's decode loop outlives adapters loaded into it: the plan looks the layers up on every step."""
    model = model_for("llama", "nf4", False)
    first = Steps(model)
    first.step(40)
    inject_lora(model, LoraConfig(r=8, alpha=16, target_modules=ALL), "a")
    randomize(model.eval(), 0.2)
    got, ran, want = Steps(model, first.decoder).step(41)
    assert ran and close(got, want, 2e-3)


def routed_logits(steps: Steps, routes: list) -> torch.Tensor:
    """transformers' logits of each row with its own adapter active (None: adapters off)."""
    from loraq.lora.model import disable_adapters, set_adapter

    logits = {}
    with torch.no_grad():
        for route in set(routes):
            context = disable_adapters(steps.model) if route is None else contextlib.nullcontext()
            if route is not None:
                set_adapter(steps.model, route)
            with context:
                out = steps.model(input_ids=steps.ids, attention_mask=steps.mask, position_ids=position_ids(steps.mask))
            logits[route] = out.logits[:, -1].float()
    return torch.stack([logits[r][k] for k, r in enumerate(routes)])


@pytest.mark.parametrize("base", ["float32", "nf4"])
def test_rows_routed_to_adapters_a_b_and_none_in_one_native_step_equal_each_alone_in_transformers(base):
    """The server's batch: rows on different adapters (ranks 8 and 4, on different layers) and none, in one step."""
    from loraq.lora.rows import RowAdapters, as_route

    model = model_for("llama", base, True, names=("a", "b"))
    routes = ["a", None, "b"]
    with RowAdapters(model, [as_route(r) for r in routes]):
        steps = Steps(model)
        got, ran, _ = steps.step(40)
    assert ran
    assert close(got, routed_logits(steps, routes), 1e-5 if base == "float32" else 2e-3)


def test_a_row_mixing_two_adapters_equals_the_routings_segment_form():
    """A mix (0.3 a + 0.7 b) has no transformers counterpart; its reference is the routing's segment form, which
    tests/generation/test_engine.py holds to the adapters' weighted updates."""
    from loraq.lora.rows import RowAdapters, as_route

    model = model_for("llama", "nf4", True, names=("a", "b"))
    routes = [as_route([("a", 0.3), ("b", 0.7)]), as_route("b"), as_route(None)]
    logits = []
    for stacked in (True, False):
        with RowAdapters(model, routes) as routing:
            routing.stacked = stacked
            got, ran, _ = Steps(model).step(40)
        assert ran == stacked
        logits.append(got)
    assert close(logits[0], logits[1], 2e-3)


@pytest.mark.parametrize("case", ["dora", "disabled", "segments"])
def test_what_the_native_step_does_not_compute_runs_module_by_module(case):
    """DoRA and the routing's segment form (its reference) run module by module (the native call says no);
    adapters switched off run natively without them. Either way transformers' logits."""
    from loraq.lora.model import disable_adapters
    from loraq.lora.rows import RowAdapters, as_route

    model = model_for("llama", "nf4", True, use_dora=case == "dora")
    if case == "segments":
        with RowAdapters(model, [as_route("a")] * 3) as routing:
            routing.stacked = False
            got, ran, want = Steps(model).step(40)
    else:
        with disable_adapters(model) if case == "disabled" else contextlib.nullcontext():
            got, ran, want = Steps(model).step(40)
    assert ran == (case == "disabled")
    assert close(got, want, 2e-3)
