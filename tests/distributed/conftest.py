"""Fixtures for multi-process tests (helpers in dist_helpers.py)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

WORDS = ["red", "blue", "green", "cat", "dog", "fox", "one", "two", "three", "sun", "moon"]


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory) -> Path:
    """24 short chat examples of different lengths (so ranks pad differently)."""
    path = tmp_path_factory.mktemp("dist_data") / "chat.jsonl"
    rng = random.Random(0)
    with open(path, "w") as fh:
        for _ in range(24):
            words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
            fh.write(json.dumps({"messages": [{"role": "user", "content": "Join " + " and ".join(words) + "."},
                                              {"role": "assistant", "content": "-".join(words)}]}) + "\n")
    return path
