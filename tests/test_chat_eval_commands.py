"""loraq chat and loraq eval against transformers computing the same thing."""
import json
import math
import subprocess
import sys

import torch


def test_chat_second_turn_matches_transformers_greedy(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    proc = subprocess.run([sys.executable, "-m", "loraq", "chat", "--model", str(tiny_llama_dir), "--dtype", "fp32",
                           "--max-new-tokens", "6"], input="hello there\nwhat is the capital?\n",
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()

    def reply(messages):
        ids = tok.apply_chat_template(messages, add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        out = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    first = reply([{"role": "user", "content": "hello there"}])
    second = reply([{"role": "user", "content": "hello there"}, {"role": "assistant", "content": first.strip()},
                    {"role": "user", "content": "what is the capital?"}])
    assert proc.stdout.replace("\n", "") == (first + second).replace("\n", "")


def test_eval_loss_matches_transformers_loss(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [{"prompt": "The quick brown", "completion": " fox jumps"},
            {"prompt": "Numbers: 1 2", "completion": " 3 4 5"}]
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.run([sys.executable, "-m", "loraq", "eval", "--model", str(tiny_llama_dir), "--dtype", "fp32",
                           "--data", str(data), "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["format"] == "completion" and got["examples"] == 2 and got["exact_match_examples"] == 2

    # reference: transformers' own loss, summed over completion tokens (+EOS), averaged over all of them
    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    total, count = 0.0, 0
    for r in rows:
        p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        c = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([p + c])
        labels = torch.tensor([[-100] * len(p) + c])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss
        total += float(loss) * len(c)
        count += len(c)
    assert got["tokens"] == count
    assert math.isclose(got["loss"], total / count, rel_tol=1e-4)
    assert math.isclose(got["perplexity"], math.exp(total / count), rel_tol=1e-4)
