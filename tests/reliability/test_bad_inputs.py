"""A catalogue of user mistakes: each one is exit code 2, ONE line on stderr naming the problem and the fix,
no traceback, and no file changed (none added, removed or modified -- nor a run folder created).

Every case goes through the real command line (``loraq.cli.main``, in-process for speed; a few through
``python -m loraq`` at the end). Kinds: data files, flags, recipes, models, adapters, output folders.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from reliability_lib import (
    assert_one_line_error,
    run_loraq,
    snapshot_diff,
    tree_snapshot,
)

from loraq.cli import main

CHAT = {"messages": [{"role": "user", "content": "Say cat."}, {"role": "assistant", "content": "cat"}]}


@dataclass
class Ctx:
    """What a case builds its files from: a scratch folder and the shared tiny model/adapters/data."""

    tmp: Path
    model: Path
    adapter: Path
    wide_adapter: Path
    data: Path
    held: list = field(default_factory=list)  # things a case keeps alive while the command runs

    def file(self, name: str, content: str | bytes) -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return str(path)

    def jsonl(self, name: str, *records) -> str:
        return self.file(name, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))

    def train(self, *flags, data: str | None = None, out: str | None = None) -> list[str]:
        """``loraq train`` on the tiny model with fast settings, plus ``flags``."""
        return ["train", "--model", str(self.model), "--method", "lora", "--dtype", "fp32", "--max-steps", "1",
                "--threads", "1", "--eval-samples", "0", "--seq-len", "64", "--batch-size", "2",
                "--data", data or str(self.data), "--output-dir", out or str(self.tmp / "out"), *flags]

    def recipe(self, text: str | bytes, *flags) -> list[str]:
        path = self.file("recipe.yaml", text)
        return ["train", path, *self.train(*flags)[1:]]

    def model_copy(self, name: str = "model") -> Path:
        dst = self.tmp / name
        shutil.copytree(self.model, dst)
        return dst

    def adapter_copy(self, name: str = "adapter") -> Path:
        dst = self.tmp / name
        shutil.copytree(self.adapter, dst)
        return dst

    def run_folder(self, name: str = "old-run", **config) -> Path:
        """A finished-looking loraq run folder (run.json, an adapter, metrics) to be left alone."""
        from loraq.config import TrainConfig

        run = self.tmp / name
        run.mkdir()
        cfg = TrainConfig.from_dict({"model": str(self.model), "data": str(self.data), "method": "lora",
                                     "dtype": "fp32", "seq_len": 64, "batch_size": 2, **config})
        (run / "run.json").write_text(json.dumps({"config": cfg.to_dict()}, default=str))
        (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 2.5}\n')
        shutil.copy(self.adapter / "adapter_model.safetensors", run / "adapter_model.safetensors")
        return run


def _pickle_only_model(ctx: Ctx) -> list[str]:
    from safetensors.torch import load_file

    folder = ctx.model_copy()
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return ctx.train("--model", str(folder))


def _remote_code_model(ctx: Ctx) -> list[str]:
    folder = ctx.model_copy()
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="my_secret_arch", auto_map={"AutoModelForCausalLM": "modeling_secret.SecretModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_secret.py").write_text("raise SystemExit('remote code ran')\n")
    return ctx.train("--model", str(folder))


def _truncated(path: Path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _adapter_missing_key(ctx: Ctx) -> list[str]:
    from safetensors.torch import load_file, save_file

    folder = ctx.adapter_copy()
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return ["eval", "--model", str(ctx.model), "--adapter", str(folder), "--data", str(ctx.data)]


def _adapter_pickle_only(ctx: Ctx) -> list[str]:
    from safetensors.torch import load_file

    folder = ctx.adapter_copy()
    torch.save(load_file(str(folder / "adapter_model.safetensors")), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    return ["merge", "--model", str(ctx.model), "--adapter", str(folder), "--out", str(ctx.tmp / "merged")]


def _adapter_foreign_target(ctx: Ctx) -> list[str]:
    folder = ctx.adapter_copy()
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = ["query_key_value"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return ["generate", "--model", str(ctx.model), "--adapter", str(folder), "--prompt", "hi"]


def _garbled_adapter_config(ctx: Ctx) -> list[str]:
    folder = ctx.adapter_copy()
    (folder / "adapter_config.json").write_text('{"r": 4, "target_modules": [')
    return ["generate", "--model", str(ctx.model), "--adapter", str(folder), "--prompt", "hi"]


def _truncated_adapter(ctx: Ctx) -> list[str]:
    folder = ctx.adapter_copy()
    _truncated(folder / "adapter_model.safetensors", 300)
    return ["merge", "--model", str(ctx.model), "--adapter", str(folder), "--out", str(ctx.tmp / "merged")]


def _corrupt_model_weights(ctx: Ctx) -> list[str]:
    folder = ctx.model_copy()
    _truncated(folder / "model.safetensors", 1000)
    return ctx.train("--model", str(folder))


def _model_without_tokenizer(ctx: Ctx) -> list[str]:
    folder = ctx.model_copy()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    return ctx.train("--model", str(folder))


def _model_bad_config(ctx: Ctx) -> list[str]:
    folder = ctx.model_copy()
    (folder / "config.json").write_text('{"model_type": "llama", ')
    return ctx.train("--model", str(folder))


def _model_unknown_type(ctx: Ctx) -> list[str]:
    folder = ctx.model_copy()
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "transformer9000"
    (folder / "config.json").write_text(json.dumps(config))
    return ctx.train("--model", str(folder))


def _merge_out_not_empty(ctx: Ctx) -> list[str]:
    out = ctx.tmp / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    return ["merge", "--model", str(ctx.model), "--adapter", str(ctx.adapter), "--out", str(out)]


def _overwrite_with_bad_data(ctx: Ctx) -> list[str]:
    run = ctx.run_folder()
    return ctx.train("--overwrite", data=ctx.jsonl("bad.jsonl", '{"messages": ['), out=str(run))


def _overwrite_with_bad_targets(ctx: Ctx) -> list[str]:
    run = ctx.run_folder()
    return ctx.train("--overwrite", "--target-modules", "wq,wk", out=str(run))


def _resume_changed_settings(ctx: Ctx) -> list[str]:
    run = ctx.run_folder(lr=1e-3)
    return ctx.train("--resume", "--lr", "2e-3", out=str(run))


def _resume_not_a_run(ctx: Ctx) -> list[str]:
    folder = ctx.tmp / "my-stuff"
    folder.mkdir()
    (folder / "thesis.tex").write_text("important")
    return ctx.train("--resume", out=str(folder))


def _resume_garbled_run_json(ctx: Ctx) -> list[str]:
    run = ctx.run_folder()
    (run / "run.json").write_text("{ not json")
    return ctx.train("--resume", out=str(run))


def _overwrite_deletes_data(ctx: Ctx) -> list[str]:
    run = ctx.run_folder()
    data = run / "train.jsonl"
    data.write_text(json.dumps(CHAT) + "\n")
    return ctx.train("--overwrite", data=str(data), out=str(run))


def _run_in_use(ctx: Ctx) -> list[str]:
    """Another loraq process holds the run folder (its flock, taken here as that process would)."""
    from loraq.training.rundir import lock_run_dir

    run = ctx.run_folder()
    ctx.held.append(lock_run_dir(run))
    return ctx.train("--resume", out=str(run))


def _wide_adapter(ctx: Ctx) -> list[str]:
    return ["generate", "--model", str(ctx.model), "--adapter", str(ctx.wide_adapter), "--prompt", "hi"]


# (id, build(ctx) -> argv, words the one line must hold)
CASES: list[tuple[str, Callable[[Ctx], list[str]], tuple[str, ...]]] = [
    # --- data files ---------------------------------------------------------------------------------
    ("data-malformed-json", lambda c: c.train(data=c.jsonl("bad.jsonl", CHAT, '{"messages": [')),
     ("bad.jsonl:2", "malformed JSON")),
    ("data-empty-file", lambda c: c.train(data=c.file("empty.jsonl", "")), ("empty.jsonl", "empty", "add")),
    ("data-only-blank-lines", lambda c: c.train(data=c.file("blank.jsonl", "\n   \n\n")), ("blank.jsonl", "empty")),
    ("data-wrong-fields", lambda c: c.train(data=c.jsonl("f.jsonl", {"question": "a", "reply": "b"})),
     ("f.jsonl:1", "cannot tell the format", "--format")),
    ("data-wrong-role", lambda c: c.train(data=c.jsonl("r.jsonl", {"messages": [
        {"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]})), ("r.jsonl:1", "'bot'", "use one of")),
    ("data-not-utf8", lambda c: c.train(data=c.file("l1.jsonl", '{"text": "caf\xe9"}\n'.encode("latin-1"))),
     ("l1.jsonl:1", "UTF-8")),
    ("data-no-assistant-turn", lambda c: c.train(data=c.jsonl("na.jsonl", {"messages": [
        {"role": "user", "content": "hi"}]})), ("na.jsonl:1", "assistant")),
    ("data-all-longer-than-seq-len", lambda c: c.train("--seq-len", "16", data=c.jsonl("long.jsonl", {"messages": [
        {"role": "user", "content": "tell me " * 40}, {"role": "assistant", "content": "ok"}]})),
     ("long.jsonl", "--seq-len")),
    ("data-is-a-folder", lambda c: c.train(data=str(c.tmp)), ("folder", "give a .jsonl")),
    ("data-missing-file", lambda c: c.train(data=str(c.tmp / "nope.jsonl")), ("nope.jsonl", "no such file")),
    ("data-is-a-weight-file", lambda c: c.train(data=c.file("w.bin", b"\x00\x01\x02\x03")), ("w.bin", "not a dataset")),
    ("data-json-array-of-strings", lambda c: c.train(data=c.file("s.json", '["a", "b"]')), ("s.json:1", "JSON object")),
    ("data-empty-messages", lambda c: c.train(data=c.jsonl("em.jsonl", {"messages": []})), ("em.jsonl:1", "empty")),
    ("data-content-not-text", lambda c: c.train(data=c.jsonl("ct.jsonl", {"messages": [
        {"role": "user", "content": 7}, {"role": "assistant", "content": "b"}]})), ("ct.jsonl:1", "string")),
    ("data-mixed-formats", lambda c: c.train(data=c.jsonl("mix.jsonl", CHAT, {"instruction": "a", "output": "b"})),
     ("mix.jsonl:2", "first record")),
    ("data-csv-unknown-columns", lambda c: c.train(data=c.file("t.csv", "a,b\n1,2\n")), ("t.csv", "cannot tell")),
    ("data-parquet-unreadable", lambda c: c.train(data=c.file("t.parquet", b"PAR1 not really")), ("t.parquet",)),
    ("data-format-contradicts-file", lambda c: c.train("--format", "alpaca"), ("instruction", "format alpaca")),
    ("data-val-data-missing", lambda c: c.train("--val-data", str(c.tmp / "val.jsonl")), ("val.jsonl", "no such file")),
    ("data-too-few-for-val-fraction", lambda c: c.train("--val-fraction", "0.5", data=c.jsonl("one.jsonl", CHAT)),
     ("one.jsonl", "--val-fraction")),
    # --- preference pairs (--objective dpo / orpo) ---------------------------------------------------
    ("pref-chosen-equals-rejected", lambda c: c.train("--objective", "dpo", data=c.jsonl(
        "same.jsonl", {"prompt": "a", "chosen": "b", "rejected": "b"})), ("same.jsonl:1", "same answer")),
    ("pref-missing-field", lambda c: c.train("--objective", "dpo", data=c.jsonl(
        "mf.jsonl", {"prompt": "a", "chosen": "b"})), ("mf.jsonl:1", "missing field 'rejected'")),
    ("pref-prompt-longer-than-seq-len", lambda c: c.train("--objective", "orpo", "--seq-len", "16", data=c.jsonl(
        "lp.jsonl", {"prompt": "tell me " * 40, "chosen": "b", "rejected": "c"})), ("lp.jsonl:1", "--seq-len")),
    ("pref-beta-not-positive", lambda c: c.train("--objective", "dpo", "--beta", "0"), ("--beta", "positive")),
    ("pref-dpo-without-pairs", lambda c: c.train("--objective", "dpo"), ("no preference pairs", "--objective dpo")),
    ("pref-pairs-without-objective", lambda c: c.train(data=c.jsonl(
        "pp.jsonl", {"prompt": "a", "chosen": "b", "rejected": "c"})), ("pp.jsonl:1", "--objective dpo")),
    ("pref-beta-for-sft", lambda c: c.train("--beta", "0.2"), ("--beta", "--objective dpo")),
    ("pref-packing", lambda c: c.train("--objective", "dpo", "--packing"), ("--packing", "--objective dpo")),
    ("pref-init-adapter-missing", lambda c: c.train("--objective", "dpo", "--init-adapter", str(c.tmp / "gone")),
     ("gone", "does not exist")),
    # --- flags --------------------------------------------------------------------------------------
    ("flag-unknown", lambda c: c.train("--learning-rate", "1e-4"), ("--learning-rate",)),
    ("flag-wrong-type", lambda c: c.train("--lr", "fast"), ("--lr", "fast")),
    ("flag-out-of-range-rank", lambda c: c.train("--rank", "0"), ("--rank", "minimum")),
    ("flag-seq-len-4", lambda c: c.train("--seq-len", "4"), ("--seq-len",)),
    ("flag-batch-size-0", lambda c: c.train("--batch-size", "0"), ("--batch-size",)),
    ("flag-negative-lr", lambda c: c.train("--lr", "-0.001"), ("--lr", "minimum")),
    ("flag-nan-lr", lambda c: c.train("--lr", "nan"), ("--lr", "NaN")),
    ("flag-val-fraction-0.9", lambda c: c.train("--val-fraction", "0.9"), ("--val-fraction", "maximum")),
    ("flag-dropout-1", lambda c: c.train("--dropout", "1"), ("--dropout",)),
    ("flag-bad-choice", lambda c: c.train("--schedule", "exponential"), ("--schedule", "exponential")),
    ("flag-full-with-quant", lambda c: c.train("--method", "full", "--quant", "nf4"), ("--quant", "--method full")),
    ("flag-full-with-rank", lambda c: c.train("--method", "full", "--rank", "8"), ("--rank", "--method full")),
    ("flag-full-with-dora", lambda c: c.train("--method", "full", "--dora"), ("--dora", "--method full")),
    ("flag-loraplus-ratio-0", lambda c: c.train("--loraplus-lr-ratio", "0"), ("--loraplus-lr-ratio", "> 0")),
    ("flag-resume-and-overwrite", lambda c: c.train("--resume", "--overwrite"), ("--resume", "--overwrite")),
    ("resume-nothing-written", lambda c: c.train("--resume", out=str(c.tmp / "never-ran")),
     ("--resume", "never-ran", "no checkpoint")),
    ("resume-no-checkpoint-yet", lambda c: c.train("--resume", out=str(c.run_folder())),
     ("--resume", "no checkpoint", "--auto-resume")),
    ("flag-loftq-without-qlora", lambda c: c.train("--init", "loftq"), ("loftq", "--method qlora")),
    ("flag-calibrated-without-qlora", lambda c: c.train("--init", "calibrated"), ("calibrated", "--method qlora")),
    ("flag-calibration-samples-without-calibrated", lambda c: c.train("--calibration-samples", "8"),
     ("--calibration-samples", "--init calibrated")),
    ("data-calibration-data-missing", lambda c: c.train("--method", "qlora", "--init", "calibrated",
                                                        "--calibration-data", str(c.tmp / "cal.jsonl")),
     ("cal.jsonl", "no such file")),
    ("flag-val-data-and-fraction", lambda c: c.train("--val-data", str(c.data), "--val-fraction", "0.1"),
     ("--val-data", "--val-fraction")),
    ("flag-max-steps-0", lambda c: c.train("--max-steps", "0"), ("--max-steps",)),
    ("flag-fsdp-one-process", lambda c: c.train("--fsdp", "--nproc", "1"), ("--fsdp", "--nproc")),
    ("flag-keep-checkpoints-0", lambda c: c.train("--keep-checkpoints", "0"), ("--keep-checkpoints",)),
    ("flag-layers-not-numbers", lambda c: c.train("--layers-to-transform", "first,last"), ("layers_to_transform",)),
    ("flag-bad-regex", lambda c: c.train("--target-modules", "re:(q|k"), ("re:(q|k", "regular expression")),
    ("flag-unknown-command", lambda c: ["trian", "--model", str(c.model)], ("trian", "train")),
    ("flag-blocksize-not-power-of-two", lambda c: c.train("--method", "qlora", "--blocksize", "100"), ("--blocksize",)),
    # --- recipes ------------------------------------------------------------------------------------
    ("recipe-unknown-key", lambda c: c.recipe("learning_rate: 0.001\n"), ("learning_rate", "did you mean")),
    ("recipe-not-a-mapping", lambda c: c.recipe("- lr: 0.001\n"), ("recipe.yaml", "mapping")),
    ("recipe-yaml-syntax", lambda c: c.recipe("lr: [0.001\nrank: 8\n"), ("recipe.yaml", "YAML")),
    ("recipe-nan-lr", lambda c: c.recipe("lr: .nan\n"), ("--lr", "NaN")),
    ("recipe-missing-file", lambda c: ["train", str(c.tmp / "nope.yaml")], ("nope.yaml", "no such file")),
    ("recipe-wrong-type", lambda c: c.recipe("packing: maybe\n"), ("packing", "true or false")),
    ("recipe-list-for-number", lambda c: c.recipe("lr: [0.1, 0.2]\n"), ("'lr'", "number")),
    ("recipe-not-utf8", lambda c: c.recipe("lr: 0.001 # caf\xe9\n".encode("latin-1")), ("recipe.yaml", "UTF-8")),
    ("recipe-contradicts-flag", lambda c: c.recipe("quant: fp4\n"), ("--quant", "--method lora")),
    # --- models -------------------------------------------------------------------------------------
    ("model-missing", lambda c: c.train("--model", str(c.tmp / "no-model")), ("no-model", "no such file or folder")),
    ("model-folder-not-a-model", lambda c: c.train("--model", str(Path(c.file("stuff/readme.txt", "hi")).parent)),
     ("stuff", "config.json")),
    ("model-file-not-a-model", lambda c: c.train("--model", c.file("m.txt", "hi")), ("m.txt", "unsupported")),
    ("model-is-a-weight-file", lambda c: c.train("--model", str(c.model / "model.safetensors")),
     ("model.safetensors", "folder")),
    ("model-is-an-adapter", lambda c: c.train("--model", str(c.adapter)), ("adapter", "--adapter")),
    ("model-targets-match-nothing", lambda c: c.train("--target-modules", "wq,wk,wv"), ("wq", "linear layers")),
    ("model-layers-out-of-range", lambda c: c.train("--layers-to-transform", "7"), ("layers_to_transform", "0..1")),
    ("model-modules-to-save-missing", lambda c: c.train("--modules-to-save", "score"), ("score", "modules_to_save")),
    ("model-pickle-only", _pickle_only_model, ("pytorch_model.bin", "--allow-pickle")),
    ("model-remote-code", _remote_code_model, ("own Python code", "--trust-remote-code")),
    ("model-corrupt-weights", _corrupt_model_weights, ("model",)),
    ("model-no-tokenizer", _model_without_tokenizer, ("tokenizer",)),
    ("model-config-not-json", _model_bad_config, ("config.json",)),
    ("model-unknown-architecture", _model_unknown_type, ("transformer9000",)),
    # --- adapters (generate, eval, merge) -----------------------------------------------------------
    ("adapter-missing", lambda c: ["generate", "--model", str(c.model), "--adapter", str(c.tmp / "gone"),
                                   "--prompt", "hi"], ("gone", "does not exist")),
    ("adapter-is-a-model", lambda c: ["generate", "--model", str(c.model), "--adapter", str(c.model), "--prompt", "hi"],
     ("adapter_config.json",)),
    ("adapter-corrupt-safetensors", _truncated_adapter, ("adapter_model.safetensors", "damaged")),
    ("adapter-missing-tensor", _adapter_missing_key, ("lacks", "lora_")),
    ("adapter-shape-does-not-fit", _wide_adapter, ("needs", "another base model")),
    ("adapter-pickle-only", _adapter_pickle_only, ("adapter_model.bin", "--allow-pickle")),
    ("adapter-targets-another-architecture", _adapter_foreign_target, ("query_key_value", "does not fit")),
    ("adapter-config-not-json", _garbled_adapter_config, ("adapter_config.json", "JSON")),
    ("merge-out-not-empty", _merge_out_not_empty, ("merged", "--overwrite")),
    ("merge-overwrite-a-folder-loraq-did-not-make", lambda c: _merge_out_not_empty(c) + ["--overwrite"],
     ("merged", "not made by loraq", "loraq_output.json")),
    ("quantize-overwrite-a-folder-loraq-did-not-make",
     lambda c: ["quantize", "--model", str(c.model), "--out", str(Path(c.file("theirs/notes.txt", "x")).parent),
                "--overwrite"], ("theirs", "not made by loraq")),
    ("merge-out-is-the-adapter", lambda c: ["merge", "--model", str(c.model), "--adapter", str(c.adapter),
                                            "--out", str(c.adapter), "--overwrite"], ("input of this command",)),
    # --- output folders -----------------------------------------------------------------------------
    ("out-not-empty", lambda c: c.train(out=str(c.run_folder())), ("old-run", "--resume", "--overwrite")),
    ("out-overwrite-not-a-run", lambda c: c.train("--overwrite", out=str(Path(c.file("mine/a.txt", "x")).parent)),
     ("mine", "not made by loraq")),
    ("out-is-a-file", lambda c: c.train(out=c.file("out.txt", "x")), ("out.txt", "file")),
    ("out-below-a-file", lambda c: c.train(out=str(Path(c.file("f.txt", "x")) / "run")), ("f.txt", "not writable")),
    ("out-resume-not-a-run", _resume_not_a_run, ("my-stuff", "no loraq run")),
    ("out-resume-changed-settings", _resume_changed_settings, ("--lr", "same settings")),
    ("out-resume-garbled-run-json", _resume_garbled_run_json, ("run.json", "unreadable")),
    ("out-overwrite-would-delete-the-data", _overwrite_deletes_data, ("--data", "inside --output-dir")),
    ("out-overwrite-with-bad-data", _overwrite_with_bad_data, ("bad.jsonl:1", "malformed JSON")),
    ("out-overwrite-with-bad-targets", _overwrite_with_bad_targets, ("wq", "linear layers")),
    ("out-in-use-by-another-process", _run_in_use, ("old-run", "in use by another loraq process")),
]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama_dir):
    """An adapter of the tiny model, and one of a wider model with the same layer names (shapes that do not fit)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from loraq.lora.config import LoraConfig
    from loraq.lora.files import save_adapter
    from loraq.lora.model import inject_lora

    root = tmp_path_factory.mktemp("adapters")
    config = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    inject_lora(model, config)
    save_adapter(model, root / "tiny", base_model_name_or_path=str(tiny_llama_dir))
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=model.config.vocab_size, hidden_size=96, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    inject_lora(wide, config)
    save_adapter(wide, root / "wide", base_model_name_or_path=str(tiny_llama_dir))
    return root / "tiny", root / "wide"


@pytest.mark.parametrize("case_id, build, needles", CASES, ids=[c[0] for c in CASES])
def test_mistake_is_one_line_exit_2_and_changes_nothing(case_id, build, needles, tmp_path, monkeypatch, capfd,
                                                        tiny_llama_dir, chat_data, adapters):
    monkeypatch.chdir(tmp_path)  # a default runs/ folder would show up in the snapshot
    # loraq's own cache is not the user's (a token store or a lock file may stay there); everything else is
    cache = tmp_path.parent / f"{tmp_path.name}-cache"
    monkeypatch.setenv("LORAQ_CACHE", str(cache))
    ctx = Ctx(tmp=tmp_path / "work", model=tiny_llama_dir, adapter=adapters[0], wide_adapter=adapters[1],
              data=chat_data)
    ctx.tmp.mkdir()
    argv = build(ctx)
    watched = [tmp_path, tiny_llama_dir, adapters[0].parent, chat_data.parent]
    before = [tree_snapshot(p) for p in watched]
    capfd.readouterr()

    code = main(argv)

    out, err = capfd.readouterr()
    assert code == 2, f"exit code {code}; stderr: {err[-2000:]}"
    assert_one_line_error(err, *needles)
    for path, snap in zip(watched, before):
        assert snapshot_diff(snap, tree_snapshot(path)) == [], path


def test_catalogue_is_at_least_thirty_distinct_mistakes():
    assert len({c[0] for c in CASES}) == len(CASES) >= 30


@pytest.mark.parametrize("argv_of", [
    lambda c: c.train(data=c.jsonl("bad.jsonl", '{"messages": [')),
    lambda c: c.train("--model", str(c.tmp / "no-model")),
    lambda c: c.train("--method", "full", "--quant", "nf4"),
], ids=["data", "model", "flags"])
def test_the_installed_entry_point_behaves_the_same(argv_of, tmp_path, tiny_llama_dir, chat_data, adapters):
    """``python -m loraq`` in a fresh process: exit 2, one line, no traceback, no folder created."""
    ctx = Ctx(tmp=tmp_path, model=tiny_llama_dir, adapter=adapters[0], wide_adapter=adapters[1], data=chat_data)
    argv = argv_of(ctx)
    before = tree_snapshot(tmp_path)
    proc = run_loraq(argv, cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr)
    assert snapshot_diff(before, tree_snapshot(tmp_path)) == []
