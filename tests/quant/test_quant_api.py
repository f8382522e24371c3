"""`loraq quantize` and quantize(...): report, sizes, and the user mistakes that exit 2."""
from __future__ import annotations

import math

import pytest
from safetensors import safe_open

from loraq.api.quantize import quantize
from loraq.cli import main
from loraq.errors import ConfigError, ModelError


def _expected_bits_per_param(numels: list[int], blocksize: int = 64) -> float:
    """4-bit codes + one uint8 absmax per block + one float32 per 256 blocks, per layer (REFERENCE.md)."""
    bits = 0
    for n in numels:
        blocks = math.ceil(n / blocksize)
        bits += 8 * math.ceil(n / 2) + 8 * blocks + 32 * math.ceil(blocks / 256)
    return bits / sum(numels)


def test_quantize_reports_sizes_and_bits(tiny_llama_dir, tmp_path):
    out = tmp_path / "q"
    report = quantize(model=tiny_llama_dir, out=out)
    # the tiny Llama: per layer q,o [64x64], k,v [32x64], gate,up [128x64], down [64x128]
    numels = [64 * 64, 32 * 64, 32 * 64, 64 * 64, 128 * 64, 128 * 64, 64 * 128] * 2
    assert report["layers_quantized"] == 14 and report["params_quantized"] == sum(numels)
    assert report["bits_per_param"] == pytest.approx(_expected_bits_per_param(numels), rel=1e-12)
    assert report["weights_bytes_after"] == (out / "model.safetensors").stat().st_size
    assert report["weights_bytes_after"] < report["weights_bytes_before"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4" in keys
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # tied, kept full precision


def test_cli_prints_before_after_and_bits(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_llama_dir), "--out", str(out), "--quant", "fp4",
                 "--no-double-quant", "--blocksize", "128", "--compute-dtype", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert "fp4" in printed and "MB" in printed and "4.250 bits/param" in printed  # 4 + 32/128 and str(out) in printed
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "model.layers.1.self_attn.q_proj.weight.quant_state.bitsandbytes__fp4" in f.keys()
        assert "model.layers.1.self_attn.q_proj.weight.nested_absmax" not in f.keys()


def test_cli_refuses_a_non_empty_out_without_overwrite(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["quantize", "--model", str(tiny_llama_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err and str(out) in err
    assert (out / "keep.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    # --overwrite replaces only a folder loraq made: not this one, but a quantized folder it wrote before
    assert main(["quantize", "--model", str(tiny_llama_dir), "--out", str(out), "--overwrite"]) == 2
    assert "not made by loraq" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    ours = tmp_path / "ours"
    assert main(["quantize", "--model", str(tiny_llama_dir), "--out", str(ours)]) == 0
    (ours / "stale.txt").write_text("left from before")
    assert main(["quantize", "--model", str(tiny_llama_dir), "--out", str(ours), "--overwrite"]) == 0
    assert (ours / "model.safetensors").is_file() and not (ours / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "q"]  # no temporary folders left


def test_an_empty_out_folder_is_fine(tiny_llama_dir, tmp_path):
    (tmp_path / "q").mkdir()
    assert quantize(model=tiny_llama_dir, out=tmp_path / "q")["layers_quantized"] == 14


@pytest.mark.parametrize("argv, words", [
    (["--model", "/nonexistent/model"], ["--model", "/nonexistent/model"]),
    (["--blocksize", "48"], ["--blocksize", "48"]),
    (["--quant", "int4"], ["--quant", "int4"]),
    (["--compute-dtype", "fp8"], ["--compute-dtype"]),
])
def test_cli_user_mistakes_exit_2_with_one_line(tiny_llama_dir, tmp_path, capsys, argv, words):
    if "--model" not in argv:
        argv = ["--model", str(tiny_llama_dir), *argv]
    assert main(["quantize", *argv, "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loraq: error: ") and err.count("\n") == 1
    assert all(w in err for w in words)
    assert not (tmp_path / "q").exists()


def test_api_errors_are_loraq_errors(tiny_llama_dir, tmp_path):
    with pytest.raises(ModelError):
        quantize(model=tmp_path, out=tmp_path / "q")  # no config.json
    with pytest.raises(ConfigError):
        quantize(model=tiny_llama_dir, out=tiny_llama_dir, overwrite=True)  # would replace its own source
    with pytest.raises(ConfigError):
        quantize(model=tiny_llama_dir, out=None)
