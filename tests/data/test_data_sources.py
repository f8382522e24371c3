"""Hugging Face datasets as --data: save_to_disk folders, Arrow files, hub ids offline, and without `datasets`."""
from __future__ import annotations

import sys

import pytest
from data_helpers import ALPACA, CHAT, COMPLETION, SHAREGPT, TEXT, one_line_error, write_jsonl

from loraq.cli import main
from loraq.config import TrainConfig
from loraq.data.dataset import build_data

datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAQ_CACHE", str(tmp_path / "cache"))


def chats(first: int, n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"number {i}"}, {"role": "assistant", "content": str(i)}]}
            for i in range(first, first + n)]


def cfg(**kw) -> TrainConfig:
    return TrainConfig.from_dict({"eval_samples": 0, "seq_len": 64, **kw})


def rows(bundle) -> list:
    return [[(e.input_ids, e.labels) for e in row] for row in bundle.train]


def test_save_to_disk_folder_and_its_arrow_file_equal_the_jsonl(tmp_path, tiny_tokenizer):
    records = chats(0, 12)
    jsonl = build_data(cfg(data=str(write_jsonl(tmp_path / "d.jsonl", records))), tiny_tokenizer)
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records),
                          "validation": datasets.Dataset.from_list(chats(100, 3))}).save_to_disk(str(folder))
    saved = build_data(cfg(data=str(folder), val_data=str(folder), eval_samples=2), tiny_tokenizer)
    assert rows(saved) == rows(jsonl) and saved.format == "chat"
    assert saved.stats.val.examples == 3 and [r.answer for r in saved.references] == ["100", "101"]
    assert saved.train_examples[4].where == f"{folder}[train]: row 5"
    arrow = next((folder / "train").glob("*.arrow"))
    assert rows(build_data(cfg(data=str(arrow)), tiny_tokenizer)) == rows(jsonl)
    split = build_data(cfg(data=str(folder), data_split="validation"), tiny_tokenizer)
    assert split.stats.train.examples == 3
    one_line_error(lambda: build_data(cfg(data=str(folder), data_split="dev"), tiny_tokenizer), "'dev'", "train",
                   "validation", "--data-split")


@pytest.mark.parametrize("record, fmt", [(CHAT, "chat"), (SHAREGPT, "sharegpt"), (ALPACA, "alpaca"),
                                         (COMPLETION, "completion"), (TEXT, "text")])
def test_the_five_formats_are_detected_from_columns(tmp_path, tiny_llama_dir, capsys, record, fmt):
    folder = tmp_path / fmt
    datasets.Dataset.from_list([record] * 3).save_to_disk(str(folder))
    assert main(["data", str(folder), "--model", str(tiny_llama_dir)]) == 0
    out = capsys.readouterr().out
    assert f"format:     {fmt} (detected)" in out and "records:    3" in out


def test_hub_id_offline_and_without_datasets_is_one_line(tmp_path, tiny_tokenizer, monkeypatch):
    # offline, as HF_HUB_OFFLINE=1 at start makes it (huggingface_hub reads the variable once, at import)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    one_line_error(lambda: build_data(cfg(data="some-org/some-chat-set"), tiny_tokenizer), "some-org/some-chat-set",
                   "hub", "save_to_disk")
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(chats(0, 2)).save_to_disk(str(folder))
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails
    for spec in (str(folder), "some-org/some-chat-set"):
        one_line_error(lambda spec=spec: build_data(cfg(data=spec), tiny_tokenizer), spec,
                       "pip install 'loraq[datasets]'")
    # a file still needs no `datasets`
    plain = build_data(cfg(data=str(write_jsonl(tmp_path / "d.jsonl", chats(0, 2)))), tiny_tokenizer)
    assert plain.stats.train.examples == 2


def test_a_plain_folder_is_refused(tmp_path, tiny_tokenizer):
    one_line_error(lambda: build_data(cfg(data=str(tmp_path)), tiny_tokenizer), str(tmp_path), "folder", "save_to_disk")
