"""The bundled GRPO demo: small sums, scored by whether the answer is right.

Each record is a conversation prompt ``What is a + b? Reply with the number only.`` (``a`` in 1..20, ``b`` in
1..9) and its ``answer`` column. The demo's reward (recipes/grpo-demo.yaml) is the checker ``exact_answer``:
1 when the completion's last number is the sum. SmolLM2-135M-Instruct answers about half of them right
(greedy: 14 of the 30 held out), in many forms ("8 + 2 = 10", "The answer is 12."), so sampled groups differ
in reward from the first step: signal for GRPO. (Rewarding the number-alone form as well taught the form
faster than the sums: bench/NOTES.md.)

The 180 sums are shuffled with a fixed seed; 30 are held out. ``python -m loraq.data.grpo_demo`` rewrites the
bundled files and a test checks they match.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HELD_OUT = 30
QUESTION = "What is {a} + {b}? Reply with the number only."


def generate(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out) records."""
    sums = [(a, b) for a in range(1, 21) for b in range(1, 10)]
    random.Random(f"loraq-grpo-demo:{seed}").shuffle(sums)
    records = [{"prompt": [{"role": "user", "content": QUESTION.format(a=a, b=b)}], "answer": str(a + b)}
               for a, b in sums]
    return records[HELD_OUT:], records[:HELD_OUT]


def write(folder: Path) -> None:
    train, held_out = generate()
    for name, records in (("grpo-train.jsonl", train), ("grpo-eval.jsonl", held_out)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))


if __name__ == "__main__":
    write(Path(__file__).parent / "demo")
