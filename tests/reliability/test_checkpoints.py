"""Checkpoints: temporary folder + fsync + rename, keep-last-K, damaged ones skipped without a trace of their
state, and a write that fails (disk full, read-only) as one line with the previous checkpoint untouched.

In-process on the real pieces of a run: the tiny Llama with LoRA, the loop's AdamW and schedule, the data
bundle's batch iterator, and one real training step between checkpoints.
"""
from __future__ import annotations

import copy
import json
import os
import random
from pathlib import Path

import pytest
import torch
from reliability_lib import snapshot_diff, tree_snapshot
from safetensors.torch import load_file, save_file

from loraq import faults
from loraq.errors import OutputError
from loraq.training import checkpoint as ckpt


class Run:
    """Model, optimizer, schedule and data position of a short LoRA run, trained one step at a time."""

    def __init__(self, model_dir: Path, data: Path, seed: int = 0):
        from loraq.config import TrainConfig
        from loraq.data.dataset import build_data
        from loraq.lora.config import LoraConfig
        from loraq.lora.model import inject_lora
        from loraq.models.load import load_model
        from loraq.training.objective import CausalLMLoss
        from loraq.training.schedule import make_scheduler
        from loraq.training.setup import make_optimizer

        torch.manual_seed(seed)
        self.cfg = TrainConfig(model=str(model_dir), data=str(data), method="lora", dtype="fp32", seq_len=64,
                               batch_size=4, rank=4, dropout=0.1, lr=1e-2, eval_samples=0)
        loaded = load_model(str(model_dir), method="lora", dtype="fp32", device="cpu")
        self.model = loaded.model
        inject_lora(self.model, LoraConfig.from_train_config(self.cfg))
        self.model.train()
        self.loss = CausalLMLoss(self.model)
        self.batches = build_data(self.cfg, loaded.tokenizer).train_batches(4, seed=0)
        self.optimizer = make_optimizer(self.model, self.cfg)
        self.scheduler = make_scheduler(self.optimizer, 20, 2, "cosine")
        self.step = 0

    def train(self, steps: int = 1) -> None:
        from loraq.training.objective import batch_loss

        for _ in range(steps):
            batch = next(self.batches)
            batch_loss(self.loss, batch, max(1, batch.global_trained_tokens)).backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.step += 1

    def save(self, run_dir: Path, keep: int = 5) -> Path:
        state = {"data": self.batches.state_dict(), "counters": {"tokens": self.step}}
        return ckpt.save_checkpoint(run_dir, self.step, model=self.model, optimizer=self.optimizer,
                                    scheduler=self.scheduler, state=state, keep=keep)

    def resume(self, run_dir: Path, warnings: list[str]):
        return ckpt.resume_latest(run_dir, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                  data=self.batches, warn=warnings.append)

    def snapshot(self) -> dict:
        """Everything a checkpoint restores, copied."""
        return {"params": {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad},
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "scheduler": copy.deepcopy(self.scheduler.state_dict()),
                "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                "data": self.batches.state_dict()}


def assert_same_state(got: dict, want: dict) -> None:
    assert got["params"].keys() == want["params"].keys()
    for name in want["params"]:
        assert torch.equal(got["params"][name], want["params"][name]), name
    go, wo = got["optimizer"], want["optimizer"]
    assert go["state"].keys() == wo["state"].keys()
    for idx in wo["state"]:
        for field, value in wo["state"][idx].items():
            assert torch.equal(torch.as_tensor(go["state"][idx][field]), torch.as_tensor(value)), (idx, field)
    assert [{k: v for k, v in g.items()} for g in go["param_groups"]] == wo["param_groups"]
    assert got["scheduler"] == want["scheduler"]
    assert torch.equal(got["torch_rng"], want["torch_rng"])
    assert got["python_rng"] == want["python_rng"]
    assert got["data"] == want["data"]


@pytest.fixture
def run(tiny_llama_dir, chat_data):
    return Run(tiny_llama_dir, chat_data)


@pytest.fixture
def no_faults(monkeypatch):
    """Fault hooks set by a test are cleared after it."""
    yield monkeypatch
    monkeypatch.delenv(faults.FAULT_ENV, raising=False)
    monkeypatch.delenv(faults.CRASH_ENV, raising=False)
    faults.reset()


def test_written_to_a_temporary_folder_fsynced_then_renamed(run, tmp_path, monkeypatch):
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", str(src), str(dst)))
        return real_rename(src, dst)

    run.train(1)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    final = run.save(tmp_path / "run")
    monkeypatch.undo()

    assert sorted(p.name for p in final.iterdir()) == ["optimizer.safetensors", "rng.safetensors", "state.json",
                                                       "trainable.safetensors"]
    assert json.loads((final / "state.json").read_text())["complete"] is True
    renames = [e for e in events if e[0] == "rename"]
    assert len(renames) == 1 and renames[0][2] == str(final)
    tmp = renames[0][1]
    assert Path(tmp).parent == final.parent and Path(tmp).name.startswith(".step-00000001.tmp-")
    at_rename = events.index(renames[0])
    synced_before = {e[1] for e in events[:at_rename] if e[0] == "fsync"}
    for name in ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"):
        assert f"{tmp}/{name}" in synced_before, name  # every file on disk before the folder gets its name
    assert tmp in synced_before  # and the folder's entries
    assert ("fsync", str(final.parent)) in events[at_rename:]  # then the rename itself


@pytest.mark.parametrize("keep", [1, 3])
def test_keeps_the_newest_k(run, tmp_path, keep):
    for _ in range(5):
        run.train(1)
        run.save(tmp_path / "run", keep=keep)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == [f"step-{s:08d}" for s in range(6 - keep, 6)]


def _rewrite_json(path: Path, change) -> None:
    state = json.loads(path.read_text())
    change(state)
    path.write_text(json.dumps(state))


def _reshape_tensor(path: Path, field: str | None = None) -> None:
    tensors = load_file(str(path))
    key = sorted(k for k in tensors if field is None or k.endswith(field))[0]
    tensors[key] = tensors[key].reshape(-1)
    save_file(tensors, str(path))


def _drop_tensor(path: Path) -> None:
    tensors = load_file(str(path))
    tensors.pop(sorted(tensors)[-1])
    save_file(tensors, str(path))


def _truncated_extra(path: Path) -> None:
    """A file another part of loraq adds to a checkpoint (per-rank RNG states), cut short."""
    save_file({"rank0/torch_cpu": torch.get_rng_state(), "rank1/torch_cpu": torch.get_rng_state()}, str(path))
    path.write_bytes(path.read_bytes()[:-100])


def _rename_group_param(state: dict) -> None:
    state["optimizer"]["param_groups"][0]["params"][0] = "model.layers.9.self_attn.q_proj.lora_A.default.weight"


DAMAGE = {
    "truncated-trainable":
        lambda d: (d / "trainable.safetensors").write_bytes((d / "trainable.safetensors").read_bytes()[:-64]),
    "truncated-optimizer":
        lambda d: (d / "optimizer.safetensors").write_bytes((d / "optimizer.safetensors").read_bytes()[:500]),
    "empty-rng": lambda d: (d / "rng.safetensors").write_bytes(b""),
    "missing-state-json": lambda d: (d / "state.json").unlink(),
    "garbled-state-json": lambda d: (d / "state.json").write_text((d / "state.json").read_text()[:200]),
    "state-not-complete": lambda d: _rewrite_json(d / "state.json", lambda s: s.update(complete=False)),
    "state-wrong-step": lambda d: _rewrite_json(d / "state.json", lambda s: s.update(step=3)),
    "python-rng-garbage": lambda d: _rewrite_json(d / "state.json", lambda s: s.update(python_rng=5)),
    "scheduler-not-a-mapping": lambda d: _rewrite_json(d / "state.json", lambda s: s.update(scheduler=[1, 2])),
    "optimizer-group-names-another-parameter": lambda d: _rewrite_json(d / "state.json", _rename_group_param),
    "data-position-garbage": lambda d: _rewrite_json(d / "state.json", lambda s: s.update(data="epoch 2")),
    "trainable-wrong-shape": lambda d: _reshape_tensor(d / "trainable.safetensors"),
    "optimizer-moment-wrong-shape": lambda d: _reshape_tensor(d / "optimizer.safetensors", "/exp_avg"),
    "trainable-missing-tensor": lambda d: _drop_tensor(d / "trainable.safetensors"),
    "rng-missing-file": lambda d: (d / "rng.safetensors").unlink(),
    "extra-file-truncated": lambda d: _truncated_extra(d / "rng-ranks.safetensors"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_skipped_and_applies_nothing(run, tmp_path, damage):
    run_dir = tmp_path / "run"
    run.train(2)
    run.save(run_dir)
    at_step_2 = run.snapshot()
    run.train(2)
    newest = run.save(run_dir)
    DAMAGE[damage](newest)
    run.train(1)  # the live state is now step 5's

    # alone, the damaged checkpoint is refused and nothing of it reaches the model, optimizer, schedule, RNG or data
    older = run_dir / "checkpoints" / "step-00000002"
    older.rename(tmp_path / "aside")
    before = run.snapshot()
    warnings: list[str] = []
    assert run.resume(run_dir, warnings) is None
    assert len(warnings) == 1 and "step-00000004" in warnings[0]
    after = run.snapshot()
    assert_same_state(after, before)

    # with an older good one beside it, the run continues exactly from that one
    (tmp_path / "aside").rename(older)
    warnings.clear()
    loaded = run.resume(run_dir, warnings)
    assert loaded is not None and loaded.step == 2 and loaded.path == older
    assert len(warnings) == 1 and "skipping checkpoint step-00000004" in warnings[0]
    assert_same_state(run.snapshot(), at_step_2)


def test_resume_after_a_checkpoint_continues_bitwise(run, tmp_path, tiny_llama_dir, chat_data):
    """Two more steps after resuming in a fresh process state give what they gave the first time."""
    run.train(2)
    run.save(tmp_path / "run")
    run.train(2)
    want = run.snapshot()

    other = Run(tiny_llama_dir, chat_data, seed=123)  # another initialisation, another RNG stream
    assert other.resume(tmp_path / "run", []).step == 2
    other.train(2)
    got = other.snapshot()
    for name in want["params"]:
        assert torch.equal(got["params"][name], want["params"][name]), name


def test_a_data_position_from_other_settings_is_a_one_line_error_not_damage(run, tmp_path, tiny_llama_dir, chat_data):
    from loraq.errors import DataError

    run.train(1)
    run.save(tmp_path / "run")
    other = Run(tiny_llama_dir, chat_data)
    other.batches = other.batches.__class__(other.batches.rows[:-4],
                                            global_batch_size=4, pad_id=0, packed=False, seed=0)
    before = other.snapshot()
    with pytest.raises(DataError, match="same --data"):
        other.resume(tmp_path / "run", [])
    assert_same_state(other.snapshot(), before)


@pytest.mark.parametrize("fault, words", [
    ("enospc", ("No space left on device", "free some space")),
    ("erofs", ("Read-only file system", "make the folder writable")),
])
def test_a_failed_write_is_one_line_and_keeps_the_last_checkpoint(run, tmp_path, no_faults, fault, words):
    run_dir = tmp_path / "run"
    run.train(1)
    run.save(run_dir)
    before = tree_snapshot(run_dir)
    run.train(1)
    no_faults.setenv(faults.FAULT_ENV, f"{fault}:checkpoint-write:1")
    faults.reset()
    with pytest.raises(OutputError) as info:
        run.save(run_dir)
    message = str(info.value)
    assert "\n" not in message and "step-00000002" in message and str(run_dir) in message
    assert "step-00000001, is intact" in message and "--resume" in message
    for word in words:
        assert word in message
    assert snapshot_diff(before, tree_snapshot(run_dir)) == []  # no temporary folder, step 1 untouched
    warnings: list[str] = []
    assert run.resume(run_dir, warnings).step == 1 and warnings == []


def test_the_first_checkpoint_failing_says_none_was_written(run, tmp_path, no_faults):
    no_faults.setenv(faults.FAULT_ENV, "enospc:checkpoint-write:1")
    faults.reset()
    run.train(1)
    with pytest.raises(OutputError, match="no checkpoint was written yet"):
        run.save(tmp_path / "run")
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


def test_a_write_the_disk_cut_short_is_caught(run, tmp_path, monkeypatch):
    """safetensors can lose the tail of a small file on a full disk without an error: the read-back catches it."""
    import loraq.training.checkpoint as module

    real_save_file = module.save_file

    def save_then_lose_the_tail(tensors, path, *args, **kwargs):
        real_save_file(tensors, path, *args, **kwargs)
        if path.endswith("optimizer.safetensors"):
            with open(path, "r+b") as fh:  # what a silently failed final flush leaves
                fh.truncate(os.path.getsize(path) - 16)

    run.train(1)
    monkeypatch.setattr(module, "save_file", save_then_lose_the_tail)
    with pytest.raises(OutputError, match="read back incomplete"):
        run.save(tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints" / "step-00000001").exists()
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path):
    from loraq.training.metrics import MetricsWriter

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"kind": "train", "step": s}) + "\n" for s in range(1, 6)) + '{"kind": "tr')
    MetricsWriter(path, truncate_after_step=3).close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
