"""The demo's tuned adapter, exported to GGUF with the defaults, answering the demo's held-out examples in llama.cpp.

    loraq train --output-dir runs/demo                # the demo (`make demo`), ~2-3 minutes
    python bench/export_demo.py runs/demo            # export (q8_0) + exact match in llama.cpp
    python bench/export_demo.py --smoke              # a 1-step run of a tiny random model, exported; no llama.cpp

The references are rebuilt from the run's own settings (run.json) exactly as
``loraq train`` built them for its final evaluation: the same prompts (chat
template with the generation prompt, as token ids), the same answer budget
(``max_answer_tokens``), the same stop tokens. llama.cpp decodes greedily
from those ids; its continuation, cut at the first stop token and decoded by
the tokenizer, is compared with the answer as loraq compares it
(:func:`loraq.data.references.exact_match`). Prints loraq's own final
accuracy (summary.json), llama.cpp's, and their ratio.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests" / "export"), str(HERE)]  # the llama.cpp runner the tests use; smoke.py
import smoke  # noqa: E402


def references(run_dir: Path):
    from loraq.config import TrainConfig
    from loraq.data.dataset import build_data
    from loraq.models.load import load_tokenizer

    settings = json.loads((run_dir / "run.json").read_text())["config"]
    known = {f.name for f in dataclasses.fields(TrainConfig)}  # a run made by an older loraq may have more keys
    cfg = TrainConfig.from_dict({k: v for k, v in settings.items() if v is not None and k in known})
    from transformers import GenerationConfig

    from loraq.data.prompts import stop_token_ids
    from loraq.models.default import ensure_default_model

    tokenizer = load_tokenizer(cfg.model)
    generation = GenerationConfig.from_pretrained(cfg.model or ensure_default_model(progress=False))
    return build_data(cfg, tokenizer), tokenizer, stop_token_ids(tokenizer, generation)


def smoke_run() -> Path:
    """A QLoRA run of the tiny random model: 1 step on 24 demo examples, its final evaluation on 4 held out."""
    import loraq
    from loraq.data.demo import demo_paths

    smoke.setup()
    tmp = smoke.temp_dir("loraq-export-demo-run-")
    train, val = (smoke.head_jsonl(path, tmp / name, n) for path, name, n in zip(demo_paths(), ("t.jsonl", "v.jsonl"),
                                                                                  (24, 4)))
    result = loraq.train(model=str(smoke.tiny_model()), data=str(train), val_data=str(val), method="qlora",
                         max_steps=1, batch_size=4, seq_len=128, eval_samples=4, output_dir=str(tmp / "demo"))
    return Path(result.run_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, nargs="?", help="a finished `loraq train` run (required)")
    parser.add_argument("--quant", default=None, help="default: the export's default (q8_0)")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    smoke.add_flag(parser, "loraq's side only: a 1-step tiny run, its references and export; llama.cpp not run")
    args = parser.parse_args(argv)
    if args.smoke:
        args.run_dir = smoke_run()
    elif args.run_dir is None:
        parser.error("give the run folder")
    import loraq

    summary = json.loads((args.run_dir / "summary.json").read_text())
    data, tokenizer, stop_ids = references(args.run_dir)
    out = Path(tempfile.mkdtemp(prefix="loraq-export-demo-")) / "demo.gguf"
    report = loraq.export(adapter=str(args.run_dir), out=out, **({"quant": args.quant} if args.quant else {}))
    print(f"export: {report['quant']}, {report['bytes'] / 1e6:.1f} MB, {report['types']}")
    tasks = [{"kind": "generate", "tokens": r.prompt_ids, "max_tokens": data.max_answer_tokens}
             for r in data.references]
    if args.smoke:
        shutil.rmtree(out.parent)
        print(f"smoke run: {len(tasks)} prompts for llama.cpp, stop ids {sorted(set(stop_ids))}, loraq's exact match "
              f"{summary['final_accuracy']}; llama.cpp not run")
        return
    compare(summary, data, tokenizer, stop_ids, tasks, out, args.threads)


def compare(summary: dict, data, tokenizer, stop_ids: list[int], tasks: list[dict], out: Path, threads: int) -> None:
    """llama.cpp's greedy answers from the GGUF against the references, beside loraq's own final accuracy."""
    from llama_cpp_node import run_llama_cpp

    from loraq.data.references import exact_match

    results = run_llama_cpp([{"path": str(out), "context": 1024, "tasks": tasks}], threads=threads)[0]
    stops, hits, misses = set(stop_ids), 0, []
    for ref, result in zip(data.references, results):
        new = result["tokens"]
        cut = next((k for k, t in enumerate(new) if t in stops), len(new))
        text = tokenizer.decode(new[:cut], skip_special_tokens=True)
        hits += exact_match(text, ref.answer)
        if not exact_match(text, ref.answer):
            misses.append((ref.answer, text))
    ours, theirs = summary["final_accuracy"], hits / len(data.references)
    print(f"exact match on {len(data.references)} held-out examples: loraq {ours:.4f}, llama.cpp {theirs:.4f} "
          f"({theirs / ours:.1%} of loraq's)" if ours else f"loraq {ours}, llama.cpp {theirs}")
    for answer, text in misses[:5]:
        print(f"  miss: want {answer!r}, llama.cpp said {text!r}")


if __name__ == "__main__":
    main()
