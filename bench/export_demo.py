"""The demo's tuned adapter, exported to GGUF with the defaults, answering the demo's held-out examples in llama.cpp.

    loraq train --output-dir runs/demo                # the demo (`make demo`), ~2-3 minutes
    python bench/export_demo.py runs/demo            # export (q8_0) + exact match in llama.cpp

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
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "export"))  # the llama.cpp runner the tests use


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--quant", default=None, help="default: the export's default (q8_0)")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    args = parser.parse_args()
    from llama_cpp_node import run_llama_cpp

    import loraq
    from loraq.data.references import exact_match

    summary = json.loads((args.run_dir / "summary.json").read_text())
    data, tokenizer, stop_ids = references(args.run_dir)
    out = Path(tempfile.mkdtemp(prefix="loraq-export-demo-")) / "demo.gguf"
    report = loraq.export(adapter=str(args.run_dir), out=out, **({"quant": args.quant} if args.quant else {}))
    tasks = [{"kind": "generate", "tokens": r.prompt_ids, "max_tokens": data.max_answer_tokens}
             for r in data.references]
    results = run_llama_cpp([{"path": str(out), "context": 1024, "tasks": tasks}], threads=args.threads)[0]
    stops, hits, misses = set(stop_ids), 0, []
    for ref, result in zip(data.references, results):
        new = result["tokens"]
        cut = next((k for k, t in enumerate(new) if t in stops), len(new))
        text = tokenizer.decode(new[:cut], skip_special_tokens=True)
        hits += exact_match(text, ref.answer)
        if not exact_match(text, ref.answer):
            misses.append((ref.answer, text))
    ours, theirs = summary["final_accuracy"], hits / len(data.references)
    print(f"export: {report['quant']}, {report['bytes'] / 1e6:.1f} MB, {report['types']}")
    print(f"exact match on {len(data.references)} held-out examples: loraq {ours:.4f}, llama.cpp {theirs:.4f} "
          f"({theirs / ours:.1%} of loraq's)" if ours else f"loraq {ours}, llama.cpp {theirs}")
    for answer, text in misses[:5]:
        print(f"  miss: want {answer!r}, llama.cpp said {text!r}")


if __name__ == "__main__":
    main()
