import json

import pytest


def write_chat_jsonl(path, n=24, seed=0):
    import random

    rng = random.Random(seed)
    words = ["red", "blue", "green", "cat", "dog", "fox", "one", "two", "three", "sun", "moon"]
    with open(path, "w") as fh:
        for _i in range(n):
            a, b = rng.choice(words), rng.choice(words)
            fh.write(json.dumps({"messages": [
                {"role": "user", "content": f"Join {a} and {b}."},
                {"role": "assistant", "content": f"{a}-{b}"}]}) + "\n")
    return path


@pytest.fixture
def chat_file(tmp_path):
    return write_chat_jsonl(tmp_path / "chat.jsonl")
