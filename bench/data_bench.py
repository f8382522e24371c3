"""Dataset preparation at scale: loraq's token store against the bare batched tokenizer, side by side.

For each size (generated chat examples, ``bench/chat_generator.py``, files
under ``--tmp``), each measurement in a fresh process:

* ``bare``: what any pipeline must do at least: read the JSONL, render every
  conversation with ``apply_chat_template``, encode the texts with batched
  calls of the fast tokenizer (20,000 at a time, results dropped);
* ``prepare``: ``build_data`` as ``loraq data --seq-len 512 --packing`` calls
  it, empty cache: read, tokenize with masks, write the token store, pack,
  stats. The ratio ``prepare / bare`` is the figure (both in this run);
* ``cached``: the same ``build_data`` again, from the store;
* up to ``--old-max`` examples, ``loraq data`` wall time and peak (process
  start to exit), cold, and with ``--old-src`` the same command of another
  loraq tree (today's ``main``);
* ``first step`` (sizes in ``--first-step-at``): ``loraq train`` on the cached store, from process start to
  the top of step 1 (the fault hook ``LORAQ_CRASH_AT=step-start:1`` stops it
  there: a test hook, used here to time that moment exactly), twice: the first run quantizes the 4-bit base
  and keeps it (:mod:`loraq.models.quantized_cache`), the second reads it;
* with ``--train-steps N`` on the largest size: a run of N steps.

Memory: the peak proportional set size (PSS) of the process and its worker
processes together, sampled every 0.2 s, minus the process's own PSS
just before the work starts (after imports and the tokenizer). The cache is
a fresh folder per size whose other entries (the default model, compiled
kernels) link to the user's cache, so only the token stores start empty.

    python bench/data_bench.py --sizes 20000,200000,2000000 --old-src /work/main/src --train-steps 3
    python bench/data_bench.py --smoke    # 40 examples, a tiny random model, 1 step, in this process (bench/smoke.py)

``--smoke`` runs every measurement in this process (no fresh processes, no first-step runs: their fault
hook kills the process that reaches step 1).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(HERE))
import smoke  # noqa: E402

MB = 1e6


# ---------------------------------------------------------------- children (one measurement each)
def _pss_bytes() -> int:
    """This process's proportional set size (what the parent's samples add up)."""
    with open("/proc/self/smaps_rollup") as fh:
        for line in fh:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(mode: str, path: str, model: str) -> dict:
    from loraq.models.load import load_tokenizer

    tokenizer = load_tokenizer(model)
    baseline = _pss_bytes()
    print(json.dumps({"baseline": baseline}), flush=True)
    start = time.perf_counter()
    if mode == "bare":
        tokens = _bare(path, tokenizer)
        return {"seconds": time.perf_counter() - start, "tokens": tokens, "baseline": baseline}
    from loraq.config import TrainConfig
    from loraq.data.dataset import build_data

    cfg = TrainConfig.from_dict({"data": path, "seq_len": 512, "packing": True, "eval_samples": 0})
    bundle = build_data(cfg, tokenizer)
    seconds = time.perf_counter() - start
    st = bundle.stats.train
    return {"seconds": seconds, "tokens": st.tokens, "examples": st.examples, "rows": st.rows,
            "store": bundle.store_paths[0], "baseline": baseline}


def _bare(path: str, tokenizer) -> int:
    tokens = 0
    texts: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            texts.append(tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False))
            if len(texts) == 20000:
                tokens += sum(map(len, tokenizer(texts, add_special_tokens=False)["input_ids"]))
                texts = []
    if texts:
        tokens += sum(map(len, tokenizer(texts, add_special_tokens=False)["input_ids"]))
    return tokens


# ---------------------------------------------------------------- the parent
class TreeMemory:
    """Peak PSS of a process and its descendants, sampled in a thread."""

    def __init__(self, pid: int, every: float = 0.2):
        import psutil

        self.process, self.every, self.peak = psutil.Process(pid), every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            try:
                for p in [self.process] + self.process.children(recursive=True):
                    try:
                        total += p.memory_full_info().pss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
            except psutil.NoSuchProcess:
                return
            self.peak = max(self.peak, total)
            self._stop.wait(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_child(args: list[str], env: dict, in_process: bool = False) -> tuple[dict, int, float]:
    """(the child's JSON result, peak tree PSS above its baseline, wall seconds); ``in_process``: a smoke run."""
    start = time.perf_counter()
    if in_process:
        memory = TreeMemory(os.getpid())
        lines = smoke.run_command([sys.executable, *args], env, capture_stdout=True)[2].splitlines()
        return json.loads(lines[-1]), memory.stop() - json.loads(lines[0])["baseline"], time.perf_counter() - start
    proc = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, text=True)
    memory = TreeMemory(proc.pid)
    lines = proc.stdout.read().splitlines()
    proc.wait()
    peak = memory.stop()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode})")
    result = json.loads(lines[-1])
    return result, peak - json.loads(lines[0])["baseline"], wall


def timed(cmd: list[str], env: dict, in_process: bool = False) -> tuple[int, float, int]:
    """(return code, wall seconds, peak tree PSS) of a command; ``in_process``: a smoke run."""
    start = time.perf_counter()
    if in_process:
        memory = TreeMemory(os.getpid())
        smoke.run_command(cmd, env)
        return 0, time.perf_counter() - start, memory.stop()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    memory = TreeMemory(proc.pid)
    _, err = proc.communicate()
    peak = memory.stop()
    if proc.returncode not in (0, -9):
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return proc.returncode, time.perf_counter() - start, peak


def fresh_cache(cache: Path) -> None:
    """Empty token and 4-bit caches; everything else (the model, compiled kernels) shared with the user's cache."""
    from loraq.paths import cache_dir

    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    for entry in cache_dir().iterdir() if cache_dir().is_dir() else ():
        if entry.name not in ("tokens", "quantized"):
            (cache / entry.name).symlink_to(entry)


def folder_bytes(folder: str) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def bench_size(n: int, args, model: str) -> dict:
    from chat_generator import write_jsonl

    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / f"chat-{n}.jsonl"
    if not path.exists():
        write_jsonl(str(path), n)
    cache = tmp / f"cache-{n}"
    fresh_cache(cache)
    env = dict(os.environ, PYTHONPATH=str(SRC), LORAQ_CACHE=str(cache), HF_HUB_OFFLINE="1")
    env.pop("TOKENIZERS_PARALLELISM", None)  # the tokenizer's own default: parallel
    me = [str(Path(__file__).resolve()), "--child"]
    row = {"examples": n, "file_mb": path.stat().st_size / MB}
    here = args.smoke  # smoke: every command in this process
    bare, bare_mem, _ = run_child(me + ["bare", str(path), model], env, here)
    prep, prep_mem, _ = run_child(me + ["prepare", str(path), model], env, here)
    cached, cached_mem, _ = run_child(me + ["prepare", str(path), model], env, here)
    row.update(tokens=bare["tokens"], bare_s=bare["seconds"], bare_mem=bare_mem, prepare_s=prep["seconds"],
               prepare_mem=prep_mem, ratio=prep["seconds"] / bare["seconds"], cached_s=cached["seconds"],
               cached_mem=cached_mem, store_mb=folder_bytes(prep["store"]) / MB)
    data_cmd = ["-m", "loraq", "data", str(path), "--model", model, "--seq-len", "512", "--packing", "--show", "0"]
    if n <= args.old_max:  # the whole command, cold, beside today's (at 2 M, prepare above says it)
        fresh_cache(cache)
        _, row["data_cold_s"], row["data_cold_mem"] = timed([sys.executable, *data_cmd], env, here)
    if args.old_src and n <= args.old_max:
        old_env = dict(env, PYTHONPATH=args.old_src)
        _, row["old_data_s"], row["old_data_mem"] = timed([sys.executable, *data_cmd], old_env)
    train = ["-m", "loraq", "train", "--data", str(path), "--model", model, "--seq-len", "512", "--packing",
             "--eval-samples", "0", "--batch-size", "4", "--output-dir", str(tmp / f"run-{n}"), "--overwrite"]
    if n in args.first_step_at:  # the first run after `loraq data` quantizes the base and keeps it; the second not
        for name in ("first_step_s", "second_start_s"):
            code, row[name], _ = timed([sys.executable, *train, "--max-steps", "2"],
                                       dict(env, LORAQ_CRASH_AT="step-start:1"))
            assert code == -9, "the run did not reach step 1"
    if args.train_steps and n == max(args.sizes):
        steps = ["--max-steps", str(args.train_steps)]
        _, row["train_s"], row["train_mem"] = timed([sys.executable, *train, *steps], env, here)
        summary = json.loads((tmp / f"run-{n}" / "summary.json").read_text())
        row["train_steps"], row["train_loss"] = summary["steps"], summary["train_loss"]
    if not args.keep:
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(tmp / f"run-{n}", ignore_errors=True)
        path.unlink()
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| examples | tokens | bare tokenizer | prepare (ratio) | peak above baseline | cached start | "
             "store | `loraq data` (today's) | first step: 1st run, 2nd run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        old = f" ({r['old_data_s']:.0f} s, {r['old_data_mem'] / 1e9:.2f} GB)" if "old_data_s" in r else ""
        first = f"{r['first_step_s']:.1f} s, {r['second_start_s']:.1f} s" if "first_step_s" in r else "-"
        cold = f"{r['data_cold_s']:.0f} s, {r['data_cold_mem'] / 1e9:.2f} GB{old}" if "data_cold_s" in r else "-"
        lines.append(
            f"| {r['examples']:,} | {r['tokens'] / 1e6:.1f} M | {r['bare_s']:.1f} s | {r['prepare_s']:.1f} s "
            f"({r['ratio']:.2f}x) | {r['prepare_mem'] / MB:,.0f} MB | {r['cached_s']:.2f} s | "
            f"{r['store_mb']:,.0f} MB | "
            f"{cold} | {first} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(_child(*argv[1:4])), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="20000,200000,2000000", help="comma-separated numbers of examples")
    parser.add_argument("--model", default=None, help="tokenizer source (default: the default model's folder)")
    parser.add_argument("--old-src", default=None, help="src/ of another loraq tree to time `loraq data` with")
    parser.add_argument("--old-max", type=int, default=200000, help="largest size to run --old-src on")
    parser.add_argument("--train-steps", type=int, default=0, help="train this many steps on the largest size")
    parser.add_argument("--first-step-at", default="200000", help="sizes whose time to the first step is measured")
    parser.add_argument("--tmp", default="/tmp/loraq-data-bench", help="generated files, caches and runs")
    parser.add_argument("--keep", action="store_true", help="keep the generated files and caches")
    smoke.add_flag(parser, "all in this process, no first-step runs, no --old-src")
    args = parser.parse_args(argv)
    if args.smoke:
        smoke.setup()
        args.sizes, args.first_step_at, args.train_steps, args.old_src = "40", "", 1, None
        args.model, args.tmp, args.keep = str(smoke.tiny_model()), str(smoke.temp_dir("loraq-data-bench-")), False
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.first_step_at = [int(s) for s in args.first_step_at.split(",") if s]
    sys.path.insert(0, str(SRC))
    model = args.model
    if model is None:
        from loraq.models.default import ensure_default_model

        model = str(ensure_default_model(progress=False))
    print(f"# {datetime.date.today()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}{' -- SMOKE RUN, not a measurement' if args.smoke else ''}", flush=True)
    rows = [bench_size(n, args, model) for n in args.sizes]
    print(table(rows))
    if not args.keep:
        shutil.rmtree(args.tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
