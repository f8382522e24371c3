"""Safe loading: weights and adapters from safetensors; a pickle is refused unless --allow-pickle, and even then
read as plain tensors only; a model's own code never runs unless --trust-remote-code; a run writes nothing
outside its folder and the user cache; a run's files hold no pickle.

The "malicious" files here would create a marker file if their code ever ran.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from reliability_lib import (
    assert_one_line_error,
    loraq_env,
    run_loraq,
    snapshot_diff,
    tree_snapshot,
)
from safetensors.torch import load_file

from loraq.cli import main


class RunsCode:
    """Unpickling this runs ``touch <marker>`` -- what a hostile pickle would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "CODE-RAN"
    yield path
    assert not path.exists(), "code from a model or adapter file ran"


def hostile_model(tiny_llama_dir, tmp_path, marker):
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save({**state, "extra": RunsCode(marker)}, folder / "pytorch_model.bin")
    return folder


def hostile_adapter(tiny_llama_dir, tmp_path, marker):
    from loraq.lora.config import LoraConfig
    from loraq.lora.files import save_adapter
    from loraq.lora.model import inject_lora
    from loraq.models.load import load_model

    model = load_model(str(tiny_llama_dir), method="lora", dtype="fp32", device="cpu").model
    inject_lora(model, LoraConfig(r=2, alpha=4, target_modules=["q_proj"]))
    folder = save_adapter(model, tmp_path / "adapter")
    state = load_file(str(folder / "adapter_model.safetensors"))
    (folder / "adapter_model.safetensors").unlink()
    torch.save({**state, "extra": RunsCode(marker)}, folder / "adapter_model.bin")
    return folder


@pytest.mark.parametrize("allow_pickle", [False, True], ids=["default", "allow-pickle"])
def test_a_hostile_pickle_model_never_runs(tiny_llama_dir, chat_data, tmp_path, marker, capfd, allow_pickle):
    folder = hostile_model(tiny_llama_dir, tmp_path, marker)
    argv = ["train", "--model", str(folder), "--data", str(chat_data), "--method", "lora", "--dtype", "fp32",
            "--max-steps", "1", "--eval-samples", "0", "--output-dir", str(tmp_path / "run"), "--threads", "1"]
    assert main(argv + (["--allow-pickle"] if allow_pickle else [])) == 2
    needles = ("objects other than tensors", "safetensors") if allow_pickle else ("pytorch_model.bin", "--allow-pickle")
    assert_one_line_error(capfd.readouterr().err, *needles)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("allow_pickle", [False, True], ids=["default", "allow-pickle"])
def test_a_hostile_pickle_adapter_never_runs(tiny_llama_dir, tmp_path, marker, capfd, allow_pickle):
    folder = hostile_adapter(tiny_llama_dir, tmp_path, marker)
    capfd.readouterr()
    argv = ["generate", "--model", str(tiny_llama_dir), "--adapter", str(folder), "--prompt", "hi",
            "--max-new-tokens", "2"]
    assert main(argv + (["--allow-pickle"] if allow_pickle else [])) == 2
    needles = ("objects other than tensors",) if allow_pickle else ("adapter_model.bin", "--allow-pickle")
    assert_one_line_error(capfd.readouterr().err, *needles)


def test_a_plain_tensor_pickle_loads_with_allow_pickle_only(tiny_llama_dir, chat_data, tmp_path, capfd):
    """--allow-pickle is the way in for an honest .bin; without it the same folder is refused."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    argv = ["train", "--model", str(folder), "--data", str(chat_data), "--method", "lora", "--dtype", "fp32",
            "--max-steps", "1", "--eval-samples", "0", "--threads", "1", "--output-dir"]
    assert main(argv + [str(tmp_path / "a")]) == 2
    assert main(argv + [str(tmp_path / "b"), "--allow-pickle"]) == 0
    assert (tmp_path / "b" / "adapter_model.safetensors").is_file()


def remote_code_model(tiny_llama_dir, tmp_path, marker, model_type):
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "custom.Config",
                                                   "AutoModelForCausalLM": "custom.Model"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    return folder


def test_a_model_s_own_code_never_runs_without_trust_remote_code(tiny_llama_dir, chat_data, tmp_path, marker, capfd):
    folder = remote_code_model(tiny_llama_dir, tmp_path, marker, "custom_arch")
    for argv in (["train", "--model", str(folder), "--data", str(chat_data), "--method", "lora",
                  "--output-dir", str(tmp_path / "run")],
                 ["generate", "--model", str(folder), "--prompt", "hi"]):
        assert main(argv) == 2
        assert_one_line_error(capfd.readouterr().err, "own Python code", "--trust-remote-code")


def test_a_known_architecture_ignores_the_folder_s_code(tiny_llama_dir, chat_data, tmp_path, marker, capfd):
    """model_type llama with an auto_map: transformers' own Llama is used, custom.py is never imported."""
    folder = remote_code_model(tiny_llama_dir, tmp_path, marker, "llama")
    argv = ["train", "--model", str(folder), "--data", str(chat_data), "--method", "lora", "--dtype", "fp32",
            "--max-steps", "1", "--eval-samples", "0", "--threads", "1", "--output-dir", str(tmp_path / "run")]
    assert main(argv) == 0


def test_a_run_writes_only_its_folder_and_the_user_cache(run_flags, tiny_llama_dir, chat_data, tmp_path):
    """HOME, the caches, the temp dir and cwd are fresh folders: afterwards only runs/<name> and the caches changed.

    The output folder is the default one (runs/<name> under cwd); the final exact-match evaluation and
    loss.png (matplotlib, which keeps its own config and font cache) run too.
    """
    home, xdg, cache, tmp, cwd = (tmp_path / n for n in ("home", "xdg-cache", "loraq-cache", "tmp", "cwd"))
    for d in (home, xdg, cache, tmp, cwd):
        d.mkdir()
    args = run_flags(None, max_steps=3, save_every=2, eval_samples=2)
    watched = {"model": tiny_llama_dir, "data": chat_data.parent, "home": home}
    before = {k: tree_snapshot(v) for k, v in watched.items()}
    # the generated kernels on (the suite's helpers turn them off): their compiler's caches must stay in loraq's
    env = loraq_env(HOME=str(home), XDG_CACHE_HOME=str(xdg), LORAQ_CACHE=str(cache), TMPDIR=str(tmp),
                    LORAQ_COMPILE="1")
    env.pop("MPLCONFIGDIR", None)
    done = run_loraq(args, env=env, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    for key, path in watched.items():
        assert snapshot_diff(before[key], tree_snapshot(path)) == [], key
    runs = list((cwd / "runs").iterdir())
    assert os.listdir(cwd) == ["runs"] and len(runs) == 1 and (runs[0] / "adapter_model.safetensors").is_file()
    # the temp dir: no file left behind (imported libraries may leave an empty folder of their own)
    assert [f for _, _, files in os.walk(tmp) for f in files] == []


def test_a_run_s_files_hold_no_pickle(reference_run):
    run = reference_run.result()
    files = [p for p in run.rglob("*") if p.is_file()]
    assert files and {p.suffix for p in files} <= {".safetensors", ".json", ".jsonl", ".png"}
    for path in files:
        if path.suffix == ".safetensors":
            load_file(str(path))  # a header and raw tensors, or it raises
            continue
        head = path.read_bytes()[:4]
        assert not head.startswith(b"\x80") and head != b"PK\x03\x04", path  # pickle / torch.save zip
