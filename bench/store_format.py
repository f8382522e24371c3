"""The token store's format, measured: numpy memory maps (what loraq writes) against an Arrow dataset (datasets).

The same 20 k generated chat examples (``chat_generator.py``, SmolLM2's
tokenizer, seq-len 512) are stored both ways; then the size on disk, the time
to open, and the time to read one random example as the lists ``collate``
takes (ids and labels) are compared.

    python bench/store_format.py
    python bench/store_format.py --smoke     # 50 examples, a tiny random model's tokenizer, 20 reads
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "src"), str(HERE)]
import smoke  # noqa: E402


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(folder) for f in files)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20000, help="generated chat examples stored")
    parser.add_argument("--reads", type=int, default=4000, help="random examples read back from each store")
    parser.add_argument("--model", default=None, help="whose tokenizer (default: loraq's default model)")
    smoke.add_flag(parser, "50 examples, 20 reads, a tiny random model's tokenizer")
    args = parser.parse_args(argv)
    if args.smoke:
        smoke.setup()
        args.examples, args.reads, args.model = 50, 20, str(smoke.tiny_model())
    if args.model is None:  # from the user's cache, before the token stores' cache below replaces it
        from loraq.models.default import ensure_default_model

        args.model = str(ensure_default_model(progress=False))
    tmp = Path(tempfile.mkdtemp(prefix="loraq-store-format-"))
    os.environ["LORAQ_CACHE"] = str(tmp / "cache")
    try:
        measure(tmp, args)
    finally:
        shutil.rmtree(tmp)


def measure(tmp: Path, args: argparse.Namespace) -> None:
    import datasets
    import numpy as np
    import pyarrow as pa

    from chat_generator import write_jsonl
    from loraq.data.prepare import prepare_store
    from loraq.data.readers import open_file
    from loraq.data.store import TokenStore
    from loraq.models.load import load_tokenizer

    datasets.disable_progress_bars()
    write_jsonl(str(tmp / "chat.jsonl"), args.examples)
    tokenizer = load_tokenizer(args.model)
    store = prepare_store(open_file(tmp / "chat.jsonl"), tokenizer, seq_len=512, workers=0)
    offsets = np.asarray(store.offsets)
    ids = [np.asarray(store.ids[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
    masks = [store.trained_mask(int(a), int(b)) for a, b in zip(offsets[:-1], offsets[1:])]
    start = time.perf_counter()
    table = pa.table({"input_ids": pa.array(ids, type=pa.list_(pa.uint16())),
                      "mask": pa.array(masks, type=pa.list_(pa.bool_()))})  # Arrow stores bools as bits too
    datasets.Dataset(table).save_to_disk(str(tmp / "arrow"))
    arrow_write = time.perf_counter() - start
    picks = [random.Random(0).randrange(store.samples) for _ in range(args.reads)]

    start = time.perf_counter()
    again = TokenStore.open(store.folder)
    np_open = time.perf_counter() - start
    start = time.perf_counter()
    for i in picks:
        a, b = int(offsets[i]), int(offsets[i + 1])
        row_ids, mask = again.token_ids(a, b).tolist(), again.trained_mask(a, b).tolist()
        [t if m else -100 for t, m in zip(row_ids, mask)]
    np_read = (time.perf_counter() - start) / len(picks)

    start = time.perf_counter()
    loaded = datasets.load_from_disk(str(tmp / "arrow"))
    arrow_open = time.perf_counter() - start
    start = time.perf_counter()
    for i in picks:
        row = loaded[i]
        [t if m else -100 for t, m in zip(row["input_ids"], row["mask"])]
    arrow_read = (time.perf_counter() - start) / len(picks)
    print(f"{store.samples} examples, {int(offsets[-1]):,} tokens{' (SMOKE RUN)' if args.smoke else ''}")
    print(f"numpy maps:       {folder_bytes(str(store.folder)) / 1e6:5.1f} MB, open {np_open * 1e3:5.1f} ms, "
          f"one example {np_read * 1e6:4.0f} us")
    print(f"Arrow (datasets): {folder_bytes(str(tmp / 'arrow')) / 1e6:5.1f} MB, open {arrow_open * 1e3:5.1f} ms, "
          f"one example {arrow_read * 1e6:4.0f} us (written in {arrow_write:.2f} s from the arrays)")


if __name__ == "__main__":
    main()
