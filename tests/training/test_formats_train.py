"""Issue 4's check: each of the five formats is detected by `loraq data` and trains for 2 steps."""
import json

import pytest

import loraq
from loraq.cli import main

RECORDS = {
    "chat": [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say {w}."},
                           {"role": "assistant", "content": w}, {"role": "user", "content": "Again."},
                           {"role": "assistant", "content": f"{w} {w}"}]} for w in ("cat", "dog", "fox", "sun")],
    "sharegpt": [{"conversations": [{"from": "human", "value": f"Say {w}."}, {"from": "gpt", "value": w}]}
                 for w in ("cat", "dog", "fox", "sun")],
    "alpaca": [{"instruction": "Repeat the word.", "input": w, "output": w} for w in ("cat", "dog", "fox", "sun")],
    "completion": [{"prompt": f"The word is {w}:", "completion": f" {w}"} for w in ("cat", "dog", "fox", "sun")],
    "text": [{"text": f"The quick brown {w} jumps over the lazy dog. " * 3} for w in ("cat", "dog", "fox", "sun")],
}


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_format_is_detected_and_trains_two_steps(fmt, tiny_llama_dir, tmp_path, capsys):
    path = tmp_path / f"{fmt}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[fmt]))

    assert main(["data", str(path), "--model", str(tiny_llama_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == fmt

    result = loraq.train(model=str(tiny_llama_dir), data=str(path), method="lora", max_steps=2, batch_size=2,
                         seq_len=64, dtype="fp32", output_dir=str(tmp_path / "run"), eval_samples=0, threads=1)
    assert result.summary["steps"] == 2 and result.summary["format"] == fmt
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)
