"""Which base should a QLoRA adapter be applied to or merged into? Held-out loss and exact match, five ways.

For one trained QLoRA run and its held-out file:

    unmerged, 4-bit base        loraq eval --adapter RUN                      (the model that was trained)
    adapter on full precision   loraq eval --adapter RUN --quant none
    merge --into dequantized    loraq merge --adapter RUN --out M; loraq eval --model M
    merge --into original       ... --into original
    merge --into requantized    ... --into requantized (a bitsandbytes 4-bit folder, loaded 4-bit)

Usage:
    python bench/merge_quality.py --run runs/x --val val.jsonl            # an existing run
    python bench/merge_quality.py --demo                                  # train the demo (loraq train), then measure
    python bench/merge_quality.py --skills                                # train on bench/skills.py's set, then measure
    python bench/merge_quality.py --smoke          # --skills with a tiny random model: 2 steps, 4 examples scored
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loraq  # noqa: E402
import smoke  # noqa: E402


def measure(run: str | Path, val: str | Path, max_examples: int = 200) -> list[dict]:
    """One row per variant: name, loss, perplexity, exact match."""
    quiet = lambda _msg: None  # noqa: E731
    rows = []

    def score(name: str, **kw) -> None:
        result = loraq.evaluate(str(val), max_examples=max_examples, say=quiet, **kw)
        rows.append({"variant": name, "loss": result["loss"], "perplexity": result["perplexity"],
                     "exact_match": result["exact_match"], "examples": result["exact_match_examples"]})
        print(f"  {name:<28} loss {result['loss']:.4f}  exact match {result['exact_match']:.1%}", flush=True)

    score("unmerged, 4-bit base", adapter=run)
    score("adapter on full precision", adapter=run, quant="none")
    with tempfile.TemporaryDirectory() as tmp:
        for into in ("dequantized", "original", "requantized"):
            out = Path(tmp) / into
            report = loraq.merge(adapter=str(run), out=str(out), into=into, say=quiet)
            score(f"merge --into {into}", model=str(out), **_data_settings(run))
            if "requantize_error" in report:
                rows[-1]["requantize_error"] = report["requantize_error"]
    return rows


def _data_settings(run: str | Path) -> dict:
    """The run's own data settings, so the merged folders are scored on the same tokens as the adapter."""
    from loraq.api.evaluate import data_settings

    settings = data_settings(run, {})
    return {"format": settings["format"], "seq_len": settings["seq_len"],
            "train_on_inputs": settings["train_on_inputs"]}


def train_demo(out: Path) -> tuple[Path, Path]:
    from loraq.data.demo import demo_paths

    result = loraq.train(output_dir=str(out), overwrite=True)
    return result.run_dir, Path(demo_paths()[1])


def train_skills(out: Path, data_dir: Path, **overrides) -> tuple[Path, Path]:
    """A QLoRA run on bench/skills.py's set; ``overrides`` (a smoke run's model, steps, sizes) win."""
    from skills import write

    sizes = {k: overrides.pop(k) for k in ("n_train", "n_val") if k in overrides}
    train, val = write(data_dir, **sizes)
    settings = dict(max_steps=150, batch_size=8, seq_len=128, lr=1e-3, warmup=0.1, eval_samples=100, log_every=10)
    result = loraq.train(data=str(train), val_data=str(val), output_dir=str(out), overwrite=True,
                         **{**settings, **overrides})
    return result.run_dir, val


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a finished QLoRA run folder")
    parser.add_argument("--val", help="its held-out file (with --run)")
    parser.add_argument("--demo", action="store_true", help="train the demo, then measure it")
    parser.add_argument("--skills", action="store_true", help="train on bench/skills.py's set, then measure it")
    parser.add_argument("--work", default="/tmp/loraq-merge-quality", help="where --demo / --skills train")
    parser.add_argument("--json", action="store_true", help="print the report as JSON at the end")
    smoke.add_flag(parser, "--skills on a tiny random model, 2 steps, 4 held-out examples scored")
    args = parser.parse_args(argv)
    work = Path(args.work)
    runs, max_examples = [], 200
    if args.smoke:
        smoke.setup()
        work, max_examples = smoke.temp_dir("loraq-merge-quality-"), 4
        runs.append(("five skills (smoke)", *train_skills(work / "skills", work / "skills-data", n_train=40, n_val=4,
                                                          model=str(smoke.tiny_model()), max_steps=2, eval_samples=4)))
    if args.run:
        runs.append(("given run", Path(args.run), Path(args.val)))
    if args.demo:
        runs.append(("demo", *train_demo(work / "demo")))
    if args.skills:
        runs.append(("five skills", *train_skills(work / "skills", work / "skills-data")))
    report = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "runs": {}}
    for name, run, val in runs:
        print(f"{name}: {run} on {val}", flush=True)
        report["runs"][name] = {"run": str(run), "val": str(val), "rows": measure(run, val, max_examples)}
    if args.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
