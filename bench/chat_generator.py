"""Seeded generator of varied chat examples shaped like instruction-tuning sets.

Each example is ``{"messages": [...]}``: a system prompt in about half of
them, then 1-4 user/assistant exchanges (60/25/10/5%). Message lengths are
log-normal in words (user median ~14, assistant median ~32, a long tail up to
a few hundred), built from common English words with punctuation, numbers,
the odd list and code block, so that the tokenizer sees text like real
instruction data: about 150 tokens and 600 bytes of JSON per example on
SmolLM2's tokenizer. Deterministic for a given ``seed`` and index, so a
200 k-example file is the first 200 k examples of the 2 M-example one.

    python bench/chat_generator.py /tmp/chat-200k.jsonl 200000
    python bench/chat_generator.py --smoke      # 50 examples into a temporary file
"""
from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
from pathlib import Path

WORDS = (
    "the of and to a in is it you that he was for on are with as his they be at one have this from or had by "
    "word but what some we can out other were all there when up use your how said an each she which do their "
    "time if will way about many then them write would like so these her long make thing see him two has look "
    "more day could go come did number sound no most people my over know water than call first who may down "
    "side been now find any new work part take get place made live where after back little only round man year "
    "came show every good me give our under name very through just form sentence great think say help low line "
    "differ turn cause much mean before move right boy old too same tell does set three want air well also play "
    "small end put home read hand port large spell add even land here must big high such follow act why ask men "
    "change went light kind off need house picture try us again animal point mother world near build self earth "
    "father head stand own page should country found answer school grow study still learn plant cover food sun "
    "four between state keep eye never last let thought city tree cross farm hard start might story saw far sea "
    "draw left late run while press close night real life few north open seem together next white children begin "
    "got walk example ease paper group always music those both mark often letter until mile river car feet care "
    "second book carry took science eat room friend began idea fish mountain stop once base hear horse cut sure "
    "watch color face wood main enough plain girl usual young ready above ever red list though feel talk bird soon "
    "body dog family direct pose leave song measure door product black short numeral class wind question happen "
    "complete ship area half rock order fire south problem piece told knew pass since top whole king space heard "
    "best hour better true during hundred five remember step early hold west ground interest reach fast verb sing "
    "listen six table travel less morning ten simple several vowel toward war lay against pattern slow center love "
    "person money serve appear road map rain rule govern pull cold notice voice unit power town fine certain fly "
    "fall lead cry dark machine note wait plan figure star box noun field rest correct able pound done beauty drive "
    "stood contain front teach week final gave green oh quick develop ocean warm free minute strong special mind "
    "behind clear tail produce fact street inch multiply nothing course stay wheel full force blue object decide "
    "surface deep moon island foot system busy test record boat common gold possible plane stead dry wonder laugh "
    "thousand ago ran check game shape equate hot miss brought heat snow tire bring yes distant fill east paint "
    "language among function variable data model training error value result method network memory process "
    "summary explain describe compare analysis improve customer service recipe history travel budget health"
).split()
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in as few words as possible.",
    "You are an expert tutor who explains things step by step.",
    "You are a friendly customer service agent for an online store.",
    "You are a senior software engineer reviewing code.",
    "You write clear, well structured answers with short paragraphs.",
    "You are a travel planner. Suggest practical itineraries.",
    "Answer as a careful scientist: state assumptions, then reason.",
]
TURNS, TURN_WEIGHTS = [1, 2, 3, 4], [0.60, 0.25, 0.10, 0.05]


def _sentence(rng: random.Random, n: int) -> str:
    words = rng.choices(WORDS, k=n)
    if rng.random() < 0.15:
        words[rng.randrange(n)] = str(rng.randrange(10000))
    text = " ".join(words)
    if n > 8 and rng.random() < 0.3:
        cut = rng.randrange(3, n - 3)
        text = " ".join(words[:cut]) + ", " + " ".join(words[cut:])
    return text[0].upper() + text[1:] + (("?" if rng.random() < 0.2 else ".") if n > 2 else ":")


def _text(rng: random.Random, median_words: float, sigma: float) -> str:
    total = int(min(max(rng.lognormvariate(math.log(median_words), sigma), 2), 700))
    pieces, left = [], total
    while left > 0:
        n = min(left, max(2, rng.randrange(4, 24)))
        pieces.append(_sentence(rng, n))
        left -= n
    if total > 40 and rng.random() < 0.15:
        items = "\n".join(f"{k}. {_sentence(rng, rng.randrange(3, 10))}" for k in range(1, rng.randrange(3, 6)))
        pieces.insert(len(pieces) // 2, "\n" + items + "\n")
    if total > 40 and rng.random() < 0.07:
        code = f"```python\ndef {rng.choice(WORDS)}(x):\n    return x * {rng.randrange(2, 9)}\n```"
        pieces.append("\n" + code)
    return " ".join(pieces)


def example(seed: int, index: int) -> dict:
    """Example number ``index`` of the set ``seed`` (independent of every other index)."""
    rng = random.Random(seed * 1_000_000_007 + index)
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(rng.choices(TURNS, TURN_WEIGHTS)[0]):
        messages.append({"role": "user", "content": _text(rng, 14, 0.8)})
        messages.append({"role": "assistant", "content": _text(rng, 32, 0.9)})
    return {"messages": messages}


def write_jsonl(path: str, count: int, seed: int = 0) -> int:
    """Write ``count`` examples to ``path``; returns the bytes written."""
    size = 0
    with open(path, "w", encoding="utf-8") as fh:
        for index in range(count):
            line = json.dumps(example(seed, index)) + "\n"
            fh.write(line)
            size += len(line.encode("utf-8"))
    return size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", help="the JSONL file to write")
    parser.add_argument("count", nargs="?", type=int, help="how many examples")
    parser.add_argument("seed", nargs="?", type=int, default=0, help="the set's seed (default 0)")
    parser.add_argument("--smoke", action="store_true", help="write 50 examples into a temporary file, then remove it")
    args = parser.parse_args(argv)
    if args.smoke:
        with tempfile.TemporaryDirectory(prefix="loraq-chat-") as tmp:
            path = Path(tmp) / "chat.jsonl"
            written = write_jsonl(str(path), 50, args.seed)
            assert len(path.read_text().splitlines()) == 50 and json.loads(path.read_text().splitlines()[0])
        print(f"smoke: 50 examples, {written} bytes")
        return
    if args.path is None or args.count is None:
        parser.error("give PATH COUNT [SEED]")
    written = write_jsonl(args.path, args.count, args.seed)
    print(f"{args.path}: {args.count} examples, {written / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
