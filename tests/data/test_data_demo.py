"""The bundled demo set: regenerable, disjoint splits, and answers that follow from the notes."""
from __future__ import annotations

import json
import re

from loraq.data.demo import DAYS, SYSTEM, demo_paths, generate, to_jsonl


def load(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_shipped_files_are_what_the_generator_writes():
    train_path, eval_path = demo_paths()
    train, evaluation = generate()
    assert train_path.read_text(encoding="utf-8") == to_jsonl(train)
    assert eval_path.read_text(encoding="utf-8") == to_jsonl(evaluation)
    assert (len(train), len(evaluation)) == (2000, 100)


def test_eval_notes_never_appear_in_training():
    train, evaluation = (load(p) for p in demo_paths())
    notes = {e["messages"][1]["content"] for e in train}
    assert not notes & {e["messages"][1]["content"] for e in evaluation}


def test_every_answer_follows_the_convention_from_its_note():
    # read back independently: "Name Surname; City; Ddd; qty; colour item", each piece found in the note
    for example in sum((load(p) for p in demo_paths()), []):
        system, user, assistant = example["messages"]
        assert (system["role"], system["content"], user["role"], assistant["role"]) == (
            "system", SYSTEM, "user", "assistant")
        name, city, day, qty, item = assistant["content"].split("; ")
        note = user["content"]
        assert re.search(rf"\b{name}\b", note) and re.search(rf"\b{city}\b", note)
        assert re.search(rf"\b{qty} (x )?{item}\b", note)
        [full_day] = [d for d in DAYS if d in note]
        assert day == full_day[:3]
