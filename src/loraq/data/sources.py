"""Where ``--data`` comes from: a file, or a Hugging Face dataset (a hub id, a ``save_to_disk`` folder, an Arrow file).

:func:`open_source` returns an object with the interface of
:class:`~loraq.data.readers.FileSource`: ``name``, ``items()`` (``(number,
payload)`` in order), ``record(number, payload)``, ``where(number)``,
``fingerprint()`` and ``progress()``. Rows of a Hugging Face dataset are
records like any other (their columns are the keys), so the same five
formats are detected from the columns.

Hugging Face datasets are read through the ``datasets`` package (an optional
extra: ``pip install 'loraq[datasets]'``); without it, only that input needs
it and says so in one line. A hub id (``org/name``) goes through
``datasets.load_dataset(id, name=--data-config, split=--data-split)``; a
machine without the network gets one line saying how to bring the data in
(a ``save_to_disk`` folder or a JSON Lines file made elsewhere).
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loraq.data.readers import NOT_DATA, SUFFIXES, Record, open_file
from loraq.errors import DataError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
EXTRA = "pip install 'loraq[datasets]'"
DEFAULT_SPLIT = "train"


def open_source(spec: str | Path, *, split: str | None = None, config: str | None = None, role: str = "train"):
    """The data named by ``spec`` (see the module docstring); DataError (one line) when it cannot be read.

    ``role`` ``"validation"`` picks a dataset dict's ``validation`` split (else
    ``test``) when no split is given.
    """
    p = Path(spec)
    if p.is_dir():
        if _is_saved_dataset(p):
            return HFSource.from_disk(p, split, role)
        raise DataError(f"{p}: is a folder, not a dataset; give a .jsonl, .json, .csv or .parquet file, or a folder "
                        f"written by datasets' save_to_disk")
    if p.suffix.lower() == ".arrow" and p.is_file():
        return HFSource.from_arrow(p)
    if not p.exists() and HUB_ID.fullmatch(str(spec)) and p.suffix.lower() not in {**SUFFIXES, **NOT_DATA, ".arrow": 0}:
        return HFSource.from_hub(str(spec), split, config, role)
    if split is not None or config is not None:
        raise DataError(f"{p}: --data-split and --data-config apply to Hugging Face datasets (hub ids, save_to_disk "
                        f"folders), not to a file; drop them")
    return open_file(p)


def source_records(spec: str | Path, skipped: list[str] | None = None, *, split: str | None = None,
                   config: str | None = None, role: str = "train") -> list[Record]:
    """All records of any data loraq reads (files, save_to_disk folders, Arrow files, hub ids), in order;
    bad records raise, or with a ``skipped`` list are left out and described there."""
    source = open_source(spec, split=split, config=config, role=role)
    records: list[Record] = []
    for number, payload in source.items():
        try:
            records.append(source.record(number, payload))
        except DataError as exc:
            if skipped is None:
                raise
            skipped.append(str(exc))
    if not records:
        raise DataError(f"{spec}: holds no records; add at least one example")
    return records


def first_record(spec: str | Path, *, split: str | None = None, config: str | None = None) -> Record | None:
    """The first readable record (None when the first one is malformed: the full read reports it)."""
    source = open_source(spec, split=split, config=config)
    for number, payload in source.items():
        try:
            return source.record(number, payload)
        except DataError:
            return None
    return None


def _is_saved_dataset(p: Path) -> bool:
    return (p / "dataset_dict.json").is_file() or ((p / "state.json").is_file() and (p / "dataset_info.json").is_file())


def _datasets(spec: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec}: reading a Hugging Face dataset needs the `datasets` package; run `{EXTRA}`, "
                        f"or give a .jsonl file") from None
    datasets.disable_progress_bars()
    return datasets


class HFSource:
    """A ``datasets.Dataset`` read row by row; ``where`` is ``name: row N``."""

    row_style = True

    def __init__(self, dataset: Any, name: str, files: list[str], identity: str):
        self.dataset, self.name = dataset, name
        self.files, self.identity = files, identity  # what the content hash covers
        self.rows_read = 0

    @classmethod
    def from_disk(cls, folder: Path, split: str | None, role: str) -> HFSource:
        datasets = _datasets(str(folder))
        try:
            loaded = datasets.load_from_disk(str(folder))
        except Exception as exc:  # datasets raises several types for a damaged folder
            raise DataError(f"{folder}: not a readable save_to_disk folder ({type(exc).__name__}: "
                            f"{_first_line(exc)}); write it again with Dataset.save_to_disk") from None
        dataset, chosen = _pick_split(loaded, split, role, str(folder))
        name = str(folder) if chosen is None else f"{folder}[{chosen}]"
        return cls(dataset, name, _cache_files(dataset), f"disk:{chosen}")

    @classmethod
    def from_arrow(cls, path: Path) -> HFSource:
        datasets = _datasets(str(path))
        try:
            dataset = datasets.Dataset.from_file(str(path))
        except Exception as exc:
            raise DataError(f"{path}: not a readable Arrow file ({type(exc).__name__}: {_first_line(exc)}); give the "
                            f".arrow file of a datasets save_to_disk folder (Arrow stream format)") from None
        return cls(dataset, str(path), [str(path)], "arrow")

    @classmethod
    def from_hub(cls, dataset_id: str, split: str | None, config: str | None, role: str) -> HFSource:
        datasets = _datasets(f"{dataset_id}: no such file or folder; as a hub dataset id, it")
        try:
            loaded = datasets.load_dataset(dataset_id, name=config, split=split)
        except Exception as exc:  # offline, unknown id, unknown config or split: datasets' many exception types
            raise DataError(f"{dataset_id}: no such file, and the Hugging Face hub did not provide it as a dataset "
                            f"({type(exc).__name__}: {_first_line(exc)}); offline, save it with "
                            f"Dataset.save_to_disk where there is a network and pass that folder") from None
        dataset, chosen = _pick_split(loaded, split, role, dataset_id)
        name = dataset_id if chosen is None else f"{dataset_id}[{chosen}]"
        return cls(dataset, name, _cache_files(dataset), f"hub:{dataset_id}:{config}:{chosen}")

    def where(self, number: int) -> str:
        return f"{self.name}: row {number}"

    def fingerprint(self) -> str:
        """sha256 of the Arrow files behind the dataset (or of its own fingerprint when it has none)."""
        digest = hashlib.sha256(self.identity.encode())
        for name in self.files:
            with open(name, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    digest.update(block)
        if not self.files:
            digest.update(str(getattr(self.dataset, "_fingerprint", "")).encode())
        return digest.hexdigest()

    def progress(self) -> float | None:
        return self.rows_read / len(self.dataset) if len(self.dataset) else None

    def items(self) -> Iterator[tuple[int, dict]]:
        columns = list(self.dataset.column_names)
        number = 0
        for batch in self.dataset.iter(batch_size=1000):
            for values in zip(*(batch[c] for c in columns)):
                number += 1
                yield number, dict(zip(columns, values))
            self.rows_read = number

    def record(self, number: int, payload: dict) -> Record:
        return Record(payload, self.where(number))


def _pick_split(loaded: Any, split: str | None, role: str, name: str) -> tuple[Any, str | None]:
    """(the Dataset, the split chosen from a DatasetDict or None for a single Dataset)."""
    if not hasattr(loaded, "keys"):  # a Dataset
        return loaded, split
    available = list(loaded.keys())
    if split is None:
        wanted = [DEFAULT_SPLIT] if role == "train" else ["validation", "test"]
        split = next((s for s in wanted if s in available), available[0] if len(available) == 1 else None)
    if split not in available:
        raise DataError(f"{name}: no split {split!r}; it has {', '.join(available)}: choose one with --data-split")
    return loaded[split], split


def _cache_files(dataset: Any) -> list[str]:
    return sorted({entry["filename"] for entry in getattr(dataset, "cache_files", []) or []})


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""
