"""Five short generated skills with exact answers, held out by seed: a multi-skill set for quality benchmarks.

    reverse   "Reverse the words: lamp river stone"      -> "stone river lamp"
    add       "What is 38 + 45?"                         -> "83"
    upper     "Write in capitals: quiet morning"         -> "QUIET MORNING"
    sort      "Sort ascending: 7 2 9 4"                  -> "2 4 7 9"
    initials  "Initials of Maria Elena Gomez?"           -> "M.E.G."

Each answer follows from the prompt by a rule a small model can learn in a
few hundred steps; none is spelled out, so the base model's exact match is
low. ``python bench/skills.py OUT_DIR`` writes train.jsonl (1200) and
val.jsonl (100, disjoint prompts) as chat records; ``--smoke`` writes 20 and 5
into a temporary folder.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

WORDS = ("lamp river stone cloud apple tiger piano candle forest window garden silver rocket pencil orange "
         "bridge castle winter summer valley island marble ocean planet violet copper meadow harbor lantern").split()
FIRST = "Maria John Aiko Lars Nina Omar Sofia Peter Grace Hugo Yuki Rita Ada Ivan Lena Noah Emil Zoe Tariq Mei".split()
MIDDLE = "Elena Paul Mei Erik Rose Ali Ines Jan Ada Leon Sora Ann Kay Lou Joy Max".split()
LAST = "Gomez Smith Tanaka Olsen Patel Haddad Costa Novak Obi Dubois Ito Moore Berg Silva Khan Rossi".split()


def _reverse(rng):
    words = rng.sample(WORDS, rng.randint(3, 5))
    return f"Reverse the words: {' '.join(words)}", " ".join(reversed(words))


def _add(rng):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b}?", str(a + b)


def _upper(rng):
    words = rng.sample(WORDS, rng.randint(2, 3))
    return f"Write in capitals: {' '.join(words)}", " ".join(words).upper()


def _sort(rng):
    numbers = rng.sample(range(1, 100), rng.randint(4, 6))
    return f"Sort ascending: {' '.join(map(str, numbers))}", " ".join(map(str, sorted(numbers)))


def _initials(rng):
    full = [rng.choice(FIRST), rng.choice(MIDDLE), rng.choice(LAST)]
    return f"Initials of {' '.join(full)}?", "".join(w[0] + "." for w in full)


SKILLS = {"reverse": _reverse, "add": _add, "upper": _upper, "sort": _sort, "initials": _initials}


def generate(n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """``n`` chat records cycling through the skills, prompts not in ``exclude`` and all distinct."""
    rng = random.Random(seed)
    records, seen = [], set(exclude)
    makers = list(SKILLS.values())
    for _ in range(100 * n):
        if len(records) == n:
            break
        prompt, answer = makers[len(records) % len(makers)](rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        records.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    if len(records) < n:
        raise ValueError(f"only {len(records)} distinct prompts of the {n} asked for")
    return records


def write(out_dir: str | Path, n_train: int = 1200, n_val: int = 100, seed: int = 7) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    val = generate(n_val, seed + 1)
    train = generate(n_train, seed, exclude={r["messages"][0]["content"] for r in val})
    paths = out / "train.jsonl", out / "val.jsonl"
    for path, records in zip(paths, (train, val)):
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="skills", help="where train.jsonl and val.jsonl go")
    parser.add_argument("--smoke", action="store_true", help="20 + 5 records into a temporary folder, then remove it")
    args = parser.parse_args(argv)
    if args.smoke:
        with tempfile.TemporaryDirectory(prefix="loraq-skills-") as tmp:
            train, val = write(tmp, n_train=20, n_val=5)
            print(f"smoke: {len(train.read_text().splitlines())} train, {len(val.read_text().splitlines())} val")
        return
    print(*write(args.out_dir))


if __name__ == "__main__":
    main()
