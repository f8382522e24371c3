"""The token store: build_data from it equals the in-memory path, it is reused, shared, and rebuilt after a kill."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from data_helpers import one_line_error, write_jsonl
from test_data_encode import varied_chats, varied_text

from loraq.config import TrainConfig
from loraq.data import prepare
from loraq.data.batches import BatchIterator
from loraq.data.dataset import build_data, read_samples, split_off, tokenize_samples
from loraq.data.packing import pack
from loraq.data.readers import open_file
from loraq.data.store import stores_root


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAQ_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def chat_file(path, n=50, seed=0):
    return write_jsonl(path, [{"messages": s.messages} for s in varied_chats(n, seed)])


def cfg(**kw) -> TrainConfig:
    return TrainConfig.from_dict({"eval_samples": 0, **kw})


def reference_rows(path, tok, c):
    """What build_data computed before the store: read, split, tokenize, truncate, drop, pack, all in memory."""
    _, samples = read_samples(path)
    val = []
    if c.val_fraction:
        samples, val = split_off(samples, c.val_fraction, c.seed, str(path))
    rows = []
    for part in (samples, val):
        examples, _ = tokenize_samples(part, tok, c.seq_len, c.train_on_inputs) if part else ([], None)
        rows.append(pack(examples, c.seq_len) if c.packing else [(e,) for e in examples])
    return rows


def as_lists(rows):
    return [[(e.input_ids, e.labels, e.where) for e in row] for row in rows]


@pytest.mark.parametrize("kind, settings", [
    ("chat", dict(val_fraction=0.2, packing=True, seq_len=64, seed=3)),
    ("chat", dict(packing=False, seq_len=40, train_on_inputs=True)),
    ("completion", dict(val_fraction=0.1, packing=True, seq_len=32)),
    ("text", dict(val_fraction=0.25, packing=False, seq_len=16, seed=1)),
])
def test_rows_and_batches_equal_the_in_memory_path(tmp_path, tiny_tokenizer, cache, kind, settings):
    import random

    rng = random.Random(0)
    if kind == "chat":
        path = chat_file(tmp_path / "d.jsonl")
    elif kind == "completion":
        path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": varied_text(rng), "completion": varied_text(rng) + "x"}
                                                  for _ in range(60)])
    else:
        path = write_jsonl(tmp_path / "d.jsonl", [{"text": varied_text(rng) + "x"} for _ in range(40)])
    c = cfg(data=str(path), **settings)
    bundle = build_data(c, tiny_tokenizer)
    train, val = reference_rows(path, tiny_tokenizer, c)
    assert as_lists(bundle.train) == as_lists(train) and as_lists(bundle.val) == as_lists(val)
    assert bundle.stats.train.rows == len(train)
    ours = bundle.train_batches(global_batch_size=4, seed=5)
    theirs = BatchIterator(train, global_batch_size=4, pad_id=bundle.pad_id, packed=c.packing, seed=5)
    for _ in range(2 * ours.batches_per_epoch + 1):  # past two epoch boundaries: the same batches, bit for bit
        a, b = next(ours), next(theirs)
        for field in ("input_ids", "labels", "position_ids"):
            assert torch.equal(getattr(a, field), getattr(b, field))
        assert (a.num_trained_tokens, a.global_trained_tokens) == (b.num_trained_tokens, b.global_trained_tokens)


def store_files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix == ".bin"}


def test_workers_write_the_same_store_and_a_second_run_reuses_it(tmp_path, tiny_tokenizer, cache, monkeypatch):
    monkeypatch.setattr(prepare, "CHUNK_ITEMS", 64)  # several chunks, so that two workers share them
    path = chat_file(tmp_path / "d.jsonl", n=300)
    kwargs = dict(seq_len=64)
    in_process = prepare.prepare_store(open_file(path), tiny_tokenizer, workers=0, **kwargs)
    expected = store_files(in_process.folder)
    os.rename(in_process.folder, tmp_path / "first")  # gone from the cache: built again, by two workers
    forked = prepare.prepare_store(open_file(path), tiny_tokenizer, workers=2, **kwargs)
    assert forked.folder == in_process.folder and store_files(forked.folder) == expected

    def no_build(*args, **kw):
        raise AssertionError("built again")

    monkeypatch.setattr(prepare, "build_store", no_build)
    assert prepare.prepare_store(open_file(path), tiny_tokenizer, **kwargs).folder == forked.folder
    # other settings, other content: another store
    monkeypatch.undo()
    monkeypatch.setenv("LORAQ_CACHE", str(cache))
    others = {prepare.prepare_store(open_file(path), tiny_tokenizer, seq_len=32).folder,
              prepare.prepare_store(open_file(path), tiny_tokenizer, seq_len=64, train_on_inputs=True).folder,
              prepare.prepare_store(open_file(chat_file(tmp_path / "e.jsonl", n=300, seed=1)), tiny_tokenizer,
                                    seq_len=64).folder}
    assert len(others) == 3 and forked.folder not in others


def test_a_damaged_store_is_rebuilt(tmp_path, tiny_tokenizer, cache):
    path = chat_file(tmp_path / "d.jsonl")
    store = prepare.prepare_store(open_file(path), tiny_tokenizer, seq_len=64)
    expected = store_files(store.folder)
    ids = store.folder / "ids.bin"
    ids.write_bytes(ids.read_bytes()[:-2])  # a lost tail
    rebuilt = prepare.prepare_store(open_file(path), tiny_tokenizer, seq_len=64)
    assert store_files(rebuilt.folder) == expected


def test_killed_while_writing_the_store_then_rerun(tmp_path, tiny_llama_dir, cache):
    """SIGKILLed after the second chunk is written: a temporary folder is left, never read; the rerun
    builds the store anew, removes it, and reports what a clean build reports."""
    path = chat_file(tmp_path / "d.jsonl", n=2 * prepare.CHUNK_ITEMS + 100)
    env = dict(os.environ, LORAQ_CACHE=str(cache), LORAQ_DATA_WORKERS="0", TOKENIZERS_PARALLELISM="false")
    args = [sys.executable, "-m", "loraq", "data", str(path), "--model", str(tiny_llama_dir), "--seq-len", "64",
            "--json", "--show", "0"]
    killed = subprocess.run(args, env=dict(env, LORAQ_CRASH_AT="data-store-write:2"), capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    left = list((cache / "tokens").iterdir())
    temp = [p for p in left if ".tmp-" in p.name]
    assert len(temp) == 1 and (temp[0] / "ids.bin").stat().st_size > 0 and not (temp[0] / "meta.json").exists()
    assert not [p for p in left if p.is_dir() and not p.name.startswith(".")]
    rerun = subprocess.run(args, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    report = json.loads(rerun.stdout)
    assert not [p for p in (cache / "tokens").iterdir() if ".tmp-" in p.name]
    assert report["records"] == len(read_samples(path)[1])
    os.environ["LORAQ_CACHE"] = str(tmp_path / "clean")  # restored by the fixture's monkeypatch
    from transformers import AutoTokenizer

    clean = prepare.prepare_store(open_file(path), AutoTokenizer.from_pretrained(str(tiny_llama_dir)), seq_len=64,
                                  workers=0)
    assert store_files(clean.folder) == store_files(Path(report["token_store"]))


def test_jsonl_is_read_lazily_and_bad_lines_keep_their_numbers(tmp_path, tiny_tokenizer, cache):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    path.write_text("\n".join([good] * 3 + ["{broken"] + [good] * 2 + ["[1]"]) + "\n", encoding="utf-8")
    items = open_file(path).items()
    assert [next(items)[0] for _ in range(3)] == [1, 2, 3]  # nothing read past what is asked for
    one_line_error(lambda: build_data(cfg(data=str(path)), tiny_tokenizer), f"{path}:4", "malformed JSON")
    bundle = build_data(cfg(data=str(path), skip_bad_examples=True), tiny_tokenizer)
    assert bundle.stats.skipped == 2 and bundle.stats.train.examples == 5
    assert [m.split(":")[1] for m in bundle.stats.skipped_messages] == ["4", "7"]
    assert [e.where for e in bundle.train_examples] == [f"{path}:{n}" for n in (1, 2, 3, 5, 6)]


def test_an_unwritable_cache_falls_back_to_a_temporary_store(tmp_path, tiny_tokenizer, monkeypatch):
    blocked = tmp_path / "ro"
    blocked.write_text("a file where the cache folder should be")
    monkeypatch.setenv("LORAQ_CACHE", str(blocked))
    lines = []
    bundle = build_data(cfg(data=str(chat_file(tmp_path / "d.jsonl"))), tiny_tokenizer, log=lines.append)
    assert bundle.stats.train.examples == 50 and "warning" in lines[0] and str(stores_root()) in lines[0]


def test_two_processes_at_once_share_one_store(tmp_path, tiny_llama_dir, cache):
    """As the ranks of a --nproc run do: both start on an empty cache; one builds while the other waits on the
    store's lock, then both read the same store."""
    path = chat_file(tmp_path / "d.jsonl", n=3000)
    env = dict(os.environ, LORAQ_CACHE=str(cache), LORAQ_DATA_WORKERS="0", TOKENIZERS_PARALLELISM="false")
    args = [sys.executable, "-m", "loraq", "data", str(path), "--model", str(tiny_llama_dir), "--seq-len", "64",
            "--json", "--show", "0"]
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        reports.append(json.loads(out))
    assert reports[0] == reports[1]
    assert [p.name for p in (cache / "tokens").iterdir() if not p.name.startswith(".")] == \
        [Path(reports[0]["token_store"]).name]
