"""GRPO's reward functions: the built-ins on hand-checked cases, and a user's file called with TRL's keywords."""
from __future__ import annotations

import math

import pytest

from loraq.errors import ConfigError, LoraqError
from loraq.training.rewards import answers_match, load_rewards, score


@pytest.mark.parametrize("text, expected, same", [
    ("The total is 42.", "42", True), ("so 6 * 7 = 42", "42.0", True), ("#### 1,234", "1234", True),
    ("We get \\boxed{7} apples, not 8", "7", True), ("Answer: Paris.", "paris", True), ("London", "Paris", False),
    ("3 and then 5", "3", False), ("answer: 0.5\nmore text 9", "1/2", False), ("1e3", "1000", True)])
def test_exact_answer_reads_the_answer_then_compares(text, expected, same):
    assert answers_match(text, expected) is same


def test_built_ins_on_text_and_conversation_completions():
    rewards = load_rewards(["exact_answer:solution", r"regex:Answer: \d+", "length:4", "json"])
    completions = ["Answer: 12", [{"role": "assistant", "content": "Answer: 13"}], '```json\n{"a": 1}\n```']
    table = score(rewards, ["p"] * 3, completions, [[1, 2, 3, 4], [1, 2], list(range(10))],
                  {"solution": ["12", "12", "12"]})
    assert table[0] == [1.0, 1.0, 1.0, 0.0]
    assert table[1] == [0.0, 1.0, 0.5, 0.0]
    assert table[2][:3] == [0.0, 0.0, 0.0] and table[2][3] == 1.0


def test_a_user_function_gets_trl_s_keywords_and_may_say_none(tmp_path):
    (tmp_path / "mine.py").write_text(
        "seen = {}\n"
        "def score(prompts, completions, completion_ids, **columns):\n"
        "    seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)\n"
        "    return [None if c == 'skip' else len(c) for c in completions]\n")
    (reward,) = load_rewards([f"{tmp_path / 'mine.py'}:score"])
    table = score([reward], ["p1", "p1"], ["abc", "skip"], [[5], [6, 7]], {"answer": ["x", "x"], "id": [3, 3]})
    assert table[0] == [3.0] and math.isnan(table[1][0])
    seen = reward.function.__globals__["seen"]
    assert seen == {"prompts": ["p1", "p1"], "completions": ["abc", "skip"], "completion_ids": [[5], [6, 7]],
                    "answer": ["x", "x"], "id": [3, 3]}


@pytest.mark.parametrize("spec, says", [
    ("nope", "not a built-in"), ("regex:(", "not a valid regular expression"), ("length:0", "length:N"),
    ("missing.py:f", "does not exist"), ("regex", "give the pattern")])
def test_bad_reward_specs_are_one_line(spec, says):
    with pytest.raises(ConfigError, match=says):
        load_rewards([spec])


def test_a_wrong_return_and_a_missing_column_name_the_reward(tmp_path):
    (tmp_path / "bad.py").write_text("def f(completions, **_):\n    return 1.0\n")
    with pytest.raises(LoraqError, match="'f' returned float"):
        score(load_rewards([f"{tmp_path / 'bad.py'}:f"]), ["p"], ["c"], [[1]], {})
    with pytest.raises(LoraqError, match="no 'answer' column"):
        score(load_rewards(["exact_answer"]), ["p"], ["c"], [[1]], {"solution": ["1"]})
