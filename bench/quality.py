"""Does the adapter recover what 4-bit lost? Exact match, held-out loss and forgetting, five ways, three seeds.

    python bench/quality.py                          # the suite: 5 methods x 3 seeds, then the merges (hours, 2 cores)
    python bench/quality.py --init-only --json       # perplexity at initialisation: full, nf4, loftq, calibrated
    python bench/quality.py --steps 2 --seeds 0 --train-per-skill 8 --val-per-skill 2 --ppl-seqs 1   # a quick check
    python bench/quality.py --smoke     # a tiny random model: --init-only, then the calibrated run, 2 steps

The suite: six skills with exact answers, each generated with a seed, held-out
prompts disjoint from the training ones -- the five of bench/skills.py
(reverse, add, upper, sort, initials) and the demo's order records
(loraq.data.demo). The same steps, batch, schedule, rank and targets for

    full        every weight (fp32 masters, bf16 compute), its own learning rate (--full-lr)
    lora        LoRA on the bf16 base
    qlora       LoRA on the NF4+DQ base, default init (B = 0)
    loftq       QLoRA, LoftQ init (5 iterations)
    calibrated  QLoRA, calibrated init (src/loraq/lora/init.py; calibration rows from the training data)
    calibrated_r64   the same with a rank-64 frozen fit beside the rank-16 adapter (--correction-rank 64)

For each run: held-out exact match and loss (the run's own final evaluation),
and forgetting: perplexity on Python's reference text (pydoc_data.topics,
the first --ppl-seqs x 512 tokens, as bench/quant_bench.py and
tests/lora/loftq_table.py cut it) of the trained model, against the
full-precision model's. Then, for every QLoRA-family run, the merges of
bench/merge_quality.py (unmerged, adapter on full precision, merge --into
dequantized / original / requantized). Each run's results are appended to
OUT/results.jsonl as they come, and a run already there is not repeated, so
a stopped benchmark continues where it was.

--init-only: the model at initialisation (fp32 compute, NF4+DQ, r=16,
all-linear), perplexity on the same text; the calibrated init fitted on rows
disjoint from the evaluated text: the next --calibration-samples x 512
tokens of the same text (key ``calibrated``), stdlib docstrings
(``calibrated_docstrings``) and the suite's training rows
(``calibrated_suite``).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests" / "lora")]

import loraq  # noqa: E402
import smoke  # noqa: E402

METHODS = ("full", "lora", "qlora", "loftq", "calibrated", "calibrated_r64")
SEQ_LEN = 512  # perplexity blocks
QUANTIZED = ("qlora", "loftq", "calibrated", "calibrated_r64")
CORRECTION_RANKS = {"calibrated": 0, "calibrated_r64": 64}  # 0: the adapter's rank (16)


# -- the suite -----------------------------------------------------------------------------------
def write_suite(folder: Path, train_per_skill: int, val_per_skill: int, seed: int = 17) -> tuple[Path, Path]:
    """train.jsonl / val.jsonl: bench/skills.py's five skills and the demo's records, val prompts held out."""
    from loraq.data.demo import generate as demo_records
    from skills import SKILLS, generate

    n = len(SKILLS)
    val = generate(val_per_skill * n, seed + 1)
    train = generate(train_per_skill * n, seed, exclude={r["messages"][0]["content"] for r in val})
    records_train, records_val = demo_records(train_per_skill, val_per_skill, seed + 2)
    train += records_train
    val += records_val
    random.Random(seed).shuffle(train)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.jsonl", folder / "val.jsonl"
    for path, rows in zip(paths, (train, val)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return paths


def run_settings(method: str, args: argparse.Namespace) -> dict:
    """The loraq.train keyword arguments of one method: all shared but the method, init and full's lr."""
    shared = dict(max_steps=args.steps, batch_size=8, seq_len=128, warmup=0.1, schedule="cosine", dtype="bf16",
                  eval_samples=10_000, log_every=10, lr=args.lr, **({"model": args.model} if args.model else {}))
    if method == "full":
        return {**shared, "method": "full", "lr": args.full_lr}
    lora = dict(rank=16, alpha=32, target_modules=["all-linear"])
    if method == "lora":
        return {**shared, **lora, "method": "lora"}
    if method in CORRECTION_RANKS:
        extra = {"init": "calibrated", "calibration_samples": args.calibration_samples,
                 "correction_rank": CORRECTION_RANKS[method]}
    else:
        extra = {"init": {"qlora": "default", "loftq": "loftq"}[method]}
    return {**shared, **lora, "method": "qlora", **extra}


# -- perplexity on general text ------------------------------------------------------------------
def text_blocks(tokenizer, n_seq: int, skip_seq: int = 0):
    """Rows ``skip_seq .. skip_seq + n_seq`` of pydoc_data.topics cut in 512-token rows (loftq_table's cut)."""
    from loftq_table import pydoc_token_blocks

    return pydoc_token_blocks(tokenizer, skip_seq + n_seq, SEQ_LEN)[skip_seq:]


def model_perplexity(blocks, model: str | None = None, adapter: str | None = None) -> float:
    from loftq_table import perplexity

    loaded = loraq.load_for_inference(model, adapter, say=lambda _m: None)
    return perplexity(loaded.model, blocks)


# -- the training runs ---------------------------------------------------------------------------
def done_runs(results: Path) -> dict[tuple[str, int], dict]:
    if not results.is_file():
        return {}
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    return {(r["method"], r["seed"]): r for r in rows if "method" in r}


def train_one(method: str, seed: int, train: Path, val: Path, out: Path, blocks, args) -> dict:
    from merge_quality import measure

    t0 = time.perf_counter()
    run = loraq.train(data=str(train), val_data=str(val), output_dir=str(out / f"{method}-s{seed}"), overwrite=True,
                      seed=seed, **run_settings(method, args))
    s = run.summary
    row = {"method": method, "seed": seed, "exact_match": s.get("final_accuracy"), "eval_loss": s.get("eval_loss"),
           "base_exact_match": s.get("base_accuracy"), "train_seconds": s.get("train_seconds"),
           "run_dir": str(run.run_dir)}
    if method == "full":
        row["perplexity_after"] = model_perplexity(blocks, model=str(run.run_dir))
    else:
        row["perplexity_after"] = model_perplexity(blocks, adapter=str(run.run_dir))
    if method in QUANTIZED and not args.no_merges:
        row["merges"] = measure(run.run_dir, val, max_examples=10_000)
    row["wall_seconds"] = time.perf_counter() - t0
    return row


def suite(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    train, val = write_suite(out / "data", args.train_per_skill, args.val_per_skill)
    results = out / "results.jsonl"
    done = done_runs(results)
    tokenizer = loraq.load_for_inference(args.model, say=lambda _m: None).tokenizer
    blocks = text_blocks(tokenizer, args.ppl_seqs)
    if ("base", 0) not in done:
        with held(args.lock):
            done[("base", 0)] = {"method": "base", "seed": 0, "perplexity": model_perplexity(blocks, args.model)}
        _append(results, done[("base", 0)])
    for seed in args.seeds:
        for method in args.methods:
            if (method, seed) in done:
                continue
            with held(args.lock):
                print(f"== {method}, seed {seed}", flush=True)
                done[(method, seed)] = train_one(method, seed, train, val, out, blocks, args)
            _append(results, done[(method, seed)])
    return {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "steps": args.steps, "seeds": args.seeds, "train": str(train), "val": str(val),
            "base_perplexity": done[("base", 0)]["perplexity"],
            "runs": [r for k, r in done.items() if k[0] != "base" and k[0] in args.methods and k[1] in args.seeds]}


@contextlib.contextmanager
def held(lock: str | None):
    """``flock(lock)`` around one run (others' heavy jobs may go between runs), or nothing."""
    if lock is None:
        yield
        return
    import fcntl

    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _append(path: Path, row: dict) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


# -- tables --------------------------------------------------------------------------------------
def spread(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    """``mean +- standard deviation`` (``mean`` alone for one value)."""
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} +- {statistics.stdev(values):.{digits}f}"


def print_tables(report: dict) -> None:
    runs = report["runs"]
    by = {m: [r for r in runs if r["method"] == m] for m in METHODS}
    print(f"\nheld-out exact match (%), loss, and perplexity on pydoc_data.topics (full-precision model before "
          f"training: {report['base_perplexity']:.2f}); {report['steps']} steps, seeds {report['seeds']}")
    print("| method | exact match % | held-out loss | perplexity after | runs |\n|---|---|---|---|---|")
    for method, rows in by.items():
        if rows:
            print(f"| {method} | {spread([r['exact_match'] for r in rows], 100)} | "
                  f"{spread([r['eval_loss'] for r in rows], digits=4)} | "
                  f"{spread([r['perplexity_after'] for r in rows], digits=2)} | {len(rows)} |")
    merged = [r for r in runs if r.get("merges")]
    if not merged:
        return
    print("\nmerging the QLoRA-family adapters (exact match %, held-out loss; mean +- sd over runs)")
    print("| method | variant | exact match % | held-out loss |\n|---|---|---|---|")
    for method in QUANTIZED:
        rows = [r for r in merged if r["method"] == method]
        for variant in [v["variant"] for v in rows[0]["merges"]] if rows else []:
            cells = [next(v for v in r["merges"] if v["variant"] == variant) for r in rows]
            print(f"| {method} | {variant} | {spread([c['exact_match'] for c in cells], 100)} | "
                  f"{spread([c['loss'] for c in cells], digits=4)} |")


# -- perplexity at initialisation ----------------------------------------------------------------
def init_only(args: argparse.Namespace) -> dict:
    """{"full", "nf4", "loftq", "calibrated", ...}: perplexity at initialisation (module docstring)."""
    import copy

    from loftq_table import NF4, loftq_model, nf4_model, perplexity

    from loraq.lora.config import LoraConfig
    from loraq.lora.model import inject_lora

    model, tokenizer = load_base(args.model)
    blocks = text_blocks(tokenizer, args.ppl_seqs)
    sources = {"calibrated": lambda: [row.tolist() for row in text_blocks(tokenizer, args.calibration_samples,
                                                                          skip_seq=args.ppl_seqs)],
               "calibrated_docstrings": lambda: docstring_rows(tokenizer, args.calibration_samples),
               "calibrated_suite": lambda: suite_rows(tokenizer, args)}
    sources = {k: v() for k, v in sources.items() if k in args.sources}
    result = {"full": perplexity(model, blocks), "nf4": perplexity(nf4_model(model), blocks),
              "loftq": perplexity(loftq_model(model, 16, 5), blocks)}
    for key, rows in sources.items():
        calibrated = copy.deepcopy(model)
        t0 = time.perf_counter()
        inject_lora(calibrated, LoraConfig(r=16, alpha=32, init="calibrated", correction_rank=args.correction_rank),
                    quant=NF4, calibration=rows)
        result[key] = perplexity(calibrated, blocks)
        result[key + "_seconds"] = round(time.perf_counter() - t0, 1)
        result[key + "_tokens"] = sum(len(r) for r in rows)
    if "calibrated" in sources and args.correction_rank in (0, 16):
        t0 = time.perf_counter()
        result["calibrated_requantized_5"] = perplexity(alternated_model(model, sources["calibrated"], iters=5),
                                                        blocks)
        result["calibrated_requantized_5_seconds"] = round(time.perf_counter() - t0, 1)
    gap = result["nf4"] - result["full"]
    result["recovered"] = {k: round((result["nf4"] - result[k]) / gap, 3)
                           for k in ("loftq", *sources, "calibrated_requantized_5") if isinstance(result.get(k), float)}
    result.update(date=datetime.date.today().isoformat(), machine=platform.processor() or platform.machine(),
                  tokens=int(blocks.numel()), correction_rank=args.correction_rank or 16)
    return result


def load_base(model: str | None):
    """(the model in fp32, its tokenizer): ``model``'s, or the default model's (tests/lora/loftq_table.py's)."""
    if model is None:
        from loftq_table import load_default

        return load_default()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(model)


def alternated_model(model, rows: list[list[int]], iters: int):
    """A copy whose linear layers hold ``Q_t + s B_t A_t`` of :func:`loraq.lora.init.calibrated` with ``iters``
    alternations (re-quantizing ``W - s B A`` between fits, as LoftQ does), as dense fp32 weights."""
    import copy

    import torch
    from loftq_table import NF4

    from loraq.lora.calibrate import block_second_moments
    from loraq.lora.config import LoraConfig
    from loraq.lora.init import calibrated
    from loraq.lora.targeting import find_targets
    from loraq.quant.functional import dequantize_4bit, quantize_4bit

    def quantize(w):
        packed, state = quantize_4bit(w, NF4["blocksize"], NF4["quant_type"], NF4["double_quant"])
        q = dequantize_4bit(packed, state, dtype=torch.float32)
        return q, q  # the "quantized" handed back is the dequantized Q the last fit was made for

    model = copy.deepcopy(model)
    for moments in block_second_moments(model, find_targets(model, LoraConfig()), rows):
        for name, h in moments.items():
            layer = model.get_submodule(name)
            w = layer.weight.detach().float()
            a, b, q = calibrated(w, h, 16, 2.0, iters, quantize)
            with torch.no_grad():
                layer.weight.copy_(q + 2.0 * (b @ a))
    return model


def docstring_rows(tokenizer, n: int) -> list[list[int]]:
    """``n`` rows of up to 512 tokens of the standard library's module docstrings (prose unlike pydoc's topics)."""
    import importlib

    skip = {"this", "antigravity", "idlelib", "tkinter", "turtle", "turtledemo", "pydoc_data", "pydoc"}
    texts = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in skip:
            continue
        try:
            doc = importlib.import_module(name).__doc__
        except Exception:  # noqa: BLE001 - a module that cannot be imported here simply gives no text
            continue
        if doc and len(doc) > 200:
            texts.append(doc)
        if sum(map(len, texts)) > n * SEQ_LEN * 6:
            break
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    return [ids[i:i + SEQ_LEN] for i in range(0, min(len(ids), n * SEQ_LEN), SEQ_LEN)]


def suite_rows(tokenizer, args: argparse.Namespace) -> list[list[int]]:
    """The suite's training rows as ``loraq train --init calibrated`` takes them (its calibration default)."""
    import tempfile

    from loraq.config import TrainConfig
    from loraq.data.dataset import build_data, calibration_rows

    with tempfile.TemporaryDirectory() as tmp:
        train, val = write_suite(Path(tmp), args.train_per_skill, args.val_per_skill)
        cfg = TrainConfig(data=str(train), val_data=str(val), seq_len=128, calibration_samples=256)
        data = build_data(cfg, tokenizer)
        return calibration_rows(cfg, data.train_examples, tokenizer)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init-only", action="store_true", help="perplexity at initialisation only")
    parser.add_argument("--json", action="store_true", help="print one JSON object (after the tables)")
    parser.add_argument("--out", default="/tmp/loraq-quality", help="runs, data and results.jsonl")
    parser.add_argument("--model", default=None, help="HF folder (default: loraq's default model)")
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS),
                        help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2],
                        help="comma-separated training seeds")
    parser.add_argument("--steps", type=int, default=200, help="training steps of each run")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the LoRA runs")
    parser.add_argument("--full-lr", type=float, default=1e-4, help="learning rate of full fine-tuning")
    parser.add_argument("--train-per-skill", type=int, default=120,
                        help="training examples per skill (bench/skills.py has 144 distinct initials prompts)")
    parser.add_argument("--val-per-skill", type=int, default=20, help="held-out examples per skill")
    parser.add_argument("--calibration-samples", type=int, default=None,
                        help="calibration rows (default: 64 text rows of 512 tokens for --init-only, "
                             "256 training rows)")
    parser.add_argument("--correction-rank", type=int, default=0,
                        help="--init-only: rank of the calibrated fits (default: the adapter's, 16)")
    parser.add_argument("--sources", type=lambda s: s.split(","),
                        default=["calibrated", "calibrated_docstrings", "calibrated_suite"],
                        help="--init-only: the calibration rows fitted on (calibrated: more of the text; "
                             "calibrated_docstrings; calibrated_suite: the suite's training rows)")
    parser.add_argument("--ppl-seqs", type=int, default=16, help="512-token rows of pydoc_data.topics scored")
    parser.add_argument("--no-merges", action="store_true", help="skip the merges of the QLoRA-family runs")
    parser.add_argument("--lock", default=None, help="a file to flock around each training run (a shared machine)")
    smoke.add_flag(parser, "--init-only, then the suite's calibrated run (no merges: merge_quality.py's)")
    return parser.parse_args(argv)


def run_smoke(args: argparse.Namespace) -> None:
    """Both parts on the tiny random model: --init-only with 1 calibration row, then 2 steps of the calibrated
    init on 2 training examples per skill, 1 held out, perplexity on 1 row of 512 tokens; the merges are
    bench/merge_quality.py's, whose smoke runs them."""
    smoke.setup()
    args.model, args.out, args.lock = str(smoke.tiny_model()), str(smoke.temp_dir("loraq-quality-")), None
    args.steps, args.seeds, args.train_per_skill, args.val_per_skill, args.ppl_seqs = 2, [0], 2, 1, 1
    args.calibration_samples = 1
    report = init_only(args)
    print("\n".join(f"{k}: {v}" for k, v in report.items()))
    args.methods, args.calibration_samples, args.no_merges = ["calibrated"], 8, True
    print_tables(suite(args))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.smoke:
        run_smoke(args)
        return
    if args.init_only:
        args.calibration_samples = args.calibration_samples or 64
        report = init_only(args)
        print(json.dumps(report) if args.json else "\n".join(f"{k}: {v}" for k, v in report.items()))
        return
    args.calibration_samples = args.calibration_samples or 256
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
    report = suite(args)
    print_tables(report)
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
