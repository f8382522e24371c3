"""``--objective grpo`` end to end on a tiny random Llama: what the reward functions are given and what the run
logs of them, exact resume (sampling included), and the user mistakes that end in one line."""
from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import loraq
from loraq.errors import LoraqError

G = 4

RECORDING_REWARD = '''
import json, os

def score(prompts, completions, completion_ids, answer, **kw):
    values = [round(len(c) / 8.0, 6) if a == "x" else None if a == "skip" else 0.5 for c, a in zip(completions, answer)]
    with open(os.environ["REWARD_LOG"], "a") as f:
        f.write(json.dumps({"prompts": prompts, "completions": completions, "ids": completion_ids,
                            "answer": answer, "values": values}) + "\\n")
    return values
'''


def write_prompts(path, n=8, long=False):
    with open(path, "w") as f:
        for i in range(n):
            text = "hello world " * (40 if long and i == 3 else 1) + f"number {i}"
            f.write(json.dumps({"prompt": text, "answer": "x" if i % 2 else ("skip" if i == 2 else "y")}) + "\n")
    return path


def _train(tiny_llama_dir, data, out, **kw):
    args = dict(model=str(tiny_llama_dir), data=str(data), objective="grpo", method="lora", max_steps=3,
                batch_size=2, num_generations=G, max_completion_length=6, seq_len=64, dtype="fp32",
                output_dir=str(out), eval_samples=0, seed=0, lr=1e-2, threads=1, reward=["length:4"])
    args.update(kw)
    return loraq.train(**args)


def test_rewards_see_trl_arguments_and_the_metrics_are_their_means(tiny_llama_dir, tmp_path, monkeypatch):
    """The user's function gets each prompt G times in a row, the texts, the ids (at most
    --max-completion-length, the stop token included) and the other columns; the logged ``rewards/<name>/mean``,
    ``reward`` and ``completions/mean_length`` are the means of what it returned and was given, ``reward_std``
    and ``rewards/<name>/std`` their sample std as TRL logs them."""
    reward_file = tmp_path / "my_rewards.py"
    reward_file.write_text(RECORDING_REWARD)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("REWARD_LOG", str(log))
    result = _train(tiny_llama_dir, write_prompts(tmp_path / "p.jsonl"), tmp_path / "run",
                    reward=[f"{reward_file}:score", "length:4"], reward_weights=[1.0, 0.5])
    assert (result.run_dir / "reward.png").stat().st_size > 0
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert len(calls) == len(steps) == 3
    for call, step in zip(calls, steps):
        assert len(call["prompts"]) == 2 * G
        assert all(call["prompts"][k] == call["prompts"][k - k % G] for k in range(2 * G))
        assert all(1 <= len(ids) <= 6 for ids in call["ids"])
        scored = [v for v in call["values"] if v is not None]
        assert step["rewards/score/mean"] == pytest.approx(sum(scored) / len(scored), abs=1e-9)
        lengths = [len(ids) for ids in call["ids"]]
        assert step["completions/mean_length"] == pytest.approx(sum(lengths) / len(lengths))
        length_reward = [max(0.0, 1 - abs(n - 4) / 4) for n in lengths]
        total = [(v if v is not None else 0.0) + 0.5 * r for v, r in zip(call["values"], length_reward)]
        assert step["reward"] == pytest.approx(sum(total) / len(total), abs=1e-9)
        # TRL 1.16 logs the sample std over the step's completions (not per group), NaN skipped
        assert step["reward_std"] == pytest.approx(statistics.stdev(total), abs=1e-9)
        assert step["rewards/score/std"] == pytest.approx(statistics.stdev(scored), abs=1e-9)
        for key in ("reward_std", "frac_reward_zero_std", "clip_ratio/region_mean", "completions/clipped_ratio",
                    "time/generation_share", "rewards/length/std", "entropy"):
            assert key in step, key
        assert 0 < step["entropy"] < 20  # nats per completion token (log of the tiny vocabulary bounds it)


@pytest.mark.parametrize("reuse", [False, True], ids=["on-policy", "mid-group"])
def test_a_resumed_run_ends_bitwise_equal_sampling_included(tiny_llama_dir, tmp_path, reuse):
    """Resumed from step 2 (on-policy), or -- with ``--num-iterations 2 --beta 0.04`` -- from step 3, between the
    two steps that train on one sampling: the checkpoint holds that group (completions, rewards, old and
    reference log-probabilities), so step 4 trains on what the uninterrupted run's step 4 did."""
    data = write_prompts(tmp_path / "p.jsonl")
    reward_file = tmp_path / "parity.py"  # rewards that differ within groups: the adapter moves
    reward_file.write_text("def parity(completion_ids, **kw):\n"
                           "    return [float(sum(c) % 2) for c in completion_ids]\n")
    kw = dict(max_steps=5, save_every=3 if reuse else 2, dropout=0.1, temperature=0.9, top_p=0.95,
              reward=[f"{reward_file}:parity"])
    if reuse:
        kw.update(num_iterations=2, beta=0.04)
    full = _train(tiny_llama_dir, data, tmp_path / "full", **kw)
    part = tmp_path / "part"
    _train(tiny_llama_dir, data, part, **kw)
    for name in ("adapter_model.safetensors", "adapter_config.json", "summary.json", "loss.png"):
        (part / name).unlink()
    if reuse:
        assert (part / "checkpoints" / "step-00000003" / "grpo_groups.safetensors").is_file()
    else:
        shutil.rmtree(part / "checkpoints" / "step-00000004")
    resumed = _train(tiny_llama_dir, data, part, resume=True, **kw)
    ta = load_file(str(full.run_dir / "adapter_model.safetensors"))
    tb = load_file(str(resumed.run_dir / "adapter_model.safetensors"))
    assert any(t.abs().sum() > 0 for k, t in ta.items() if "lora_B" in k)  # it trained
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    rewards = [[json.loads(x)["reward"] for x in (run / "metrics.jsonl").read_text().splitlines()]
               for run in (full.run_dir, part)]
    assert rewards[0] == rewards[1]


HEAD = "def score(completions, **kw):\n    "


@pytest.mark.parametrize("body, expected", [
    (HEAD + "raise KeyError('boom')\n", "reward 'score' raised KeyError: 'boom' on the prompt"),
    (HEAD + "return [1.0]\n", "reward 'score' returned list of 1 values for 8 completions"),
    (HEAD + "return ['yes'] * len(completions)\n", "reward 'score' returned 'yes' (str)"),
], ids=["raises", "wrong-length", "not-a-number"])
def test_a_bad_reward_function_is_one_line_naming_it(tiny_llama_dir, tmp_path, body, expected):
    reward_file = tmp_path / "bad.py"
    reward_file.write_text(body)
    with pytest.raises(LoraqError, match="^" + expected.replace("(", r"\(").replace(")", r"\)")):
        _train(tiny_llama_dir, write_prompts(tmp_path / "p.jsonl"), tmp_path / "run", reward=[f"{reward_file}:score"])


def test_a_reward_that_fails_on_one_prompt_is_named_with_its_line(tiny_llama_dir, tmp_path):
    reward_file = tmp_path / "picky.py"
    reward_file.write_text("def score(completions, answer, **kw):\n"
                           "    return [1.0 / (a != 'skip') for a in answer]\n")
    with pytest.raises(LoraqError, match=r"raised ZeroDivisionError.*'hello world number 2' \(.*p\.jsonl:3\)"):
        _train(tiny_llama_dir, write_prompts(tmp_path / "p.jsonl"), tmp_path / "run",
               reward=[f"{reward_file}:score"], batch_size=8)


@pytest.mark.parametrize("args, expected", [
    (["--num-generations", "1"], "--num-generations 1 is below its minimum 2"),
    ([], "--objective grpo needs at least one --reward"),
    (["--reward", "length:4", "--seq-len", "16"], "p.jsonl:4: the prompt is"),
    (["--reward", "nope"], "--reward 'nope': not a built-in"),
    (["--reward", "length:4", "--reward-weights", "1,2"], "--reward-weights gives 2 weights for 1 --reward"),
], ids=["one-generation", "no-reward", "prompt-too-long", "unknown-reward", "weights"])
def test_cli_mistakes_end_in_one_line_and_exit_2(tiny_llama_dir, tmp_path, args, expected):
    data = write_prompts(tmp_path / "p.jsonl", long=True)
    base = ["--objective", "grpo", "--model", str(tiny_llama_dir), "--data", str(data), "--method", "lora",
            "--output-dir", str(tmp_path / "run"), "--max-steps", "1"]
    if args and args[0] == "--num-generations":
        base += ["--reward", "length:4"]
    proc = subprocess.run([sys.executable, "-m", "loraq", "train", *base, *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loraq: error: ") and expected in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


def test_the_bundled_sums_are_what_the_generator_writes_and_the_held_out_ones_are_unseen(tmp_path):
    from loraq.data import grpo_demo

    grpo_demo.write(tmp_path)
    bundled = grpo_demo.__file__.replace("grpo_demo.py", "demo")
    for name in ("grpo-train.jsonl", "grpo-eval.jsonl"):
        assert (tmp_path / name).read_text() == open(f"{bundled}/{name}").read()
    train, held_out = grpo_demo.generate()
    questions = {r["prompt"][0]["content"] for r in train}
    assert len(held_out) == 30 and not questions & {r["prompt"][0]["content"] for r in held_out}
    for record in train + held_out:  # the answer column is the sum the question asks for (a float64 check)
        a, b = (int(x) for x in record["prompt"][0]["content"].split("?")[0][8:].split(" + "))
        assert record["answer"] == str(a + b)


FLAKY_REWARD = '''
import os
calls = {"n": 0}

def parity(completion_ids, **kw):
    calls["n"] += 1
    if calls["n"] == int(os.environ.get("FAIL_AT", "0")):
        raise RuntimeError("checker down")
    return [float(sum(c) % 2) for c in completion_ids]
'''


def test_a_reward_failing_midway_keeps_the_steps_done_and_resume_finishes_the_same_run(tiny_llama_dir, tmp_path,
                                                                                      monkeypatch):
    """The step is not lost: the steps before the failing one are checkpointed, the error says where, and
    --resume (the function fixed) ends bitwise equal to a run that never failed."""
    data = write_prompts(tmp_path / "p.jsonl")
    reward_file = tmp_path / "flaky.py"
    reward_file.write_text(FLAKY_REWARD)
    kw = dict(max_steps=4, temperature=0.9, reward=[f"{reward_file}:parity"])
    clean = _train(tiny_llama_dir, data, tmp_path / "clean", **kw)
    monkeypatch.setenv("FAIL_AT", "3")
    with pytest.raises(LoraqError, match=r"raised RuntimeError: checker down.*steps 1-2 are kept in .*step-00000002"):
        _train(tiny_llama_dir, data, tmp_path / "broken", **kw)
    monkeypatch.delenv("FAIL_AT")
    resumed = _train(tiny_llama_dir, data, tmp_path / "broken", resume=True, **kw)
    ta = load_file(str(clean.run_dir / "adapter_model.safetensors"))
    tb = load_file(str(resumed.run_dir / "adapter_model.safetensors"))
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def _float64_logps(model_dir, adapter_dir, rows) -> torch.Tensor:
    """Per-token log-probabilities of ``rows``' labelled tokens (column t: token t given tokens < t; 0 where not
    labelled) under the tiny Llama in float64, with the PEFT adapter in ``adapter_dir`` merged as
    ``W + (alpha / r) B A`` (None: the base model)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()
    if adapter_dir is not None:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        scale = config["lora_alpha"] / config["r"]
        tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
        for key, a in tensors.items():
            if key.endswith("lora_A.weight"):
                b = tensors[key.replace("lora_A", "lora_B")]
                module = model.get_submodule(key.removeprefix("base_model.model.").removesuffix(".lora_A.weight"))
                with torch.no_grad():
                    module.weight += scale * (b.double() @ a.double())
    with torch.no_grad():
        logits = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask,
                       position_ids=rows.position_ids).logits
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, rows.labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    return torch.nn.functional.pad(logp * (rows.labels[:, 1:] != -100), (1, 0))


def test_num_iterations_2_reuses_the_completions_and_its_clip_ratios_equal_trl_formulas(tiny_llama_dir, tmp_path,
                                                                                       monkeypatch):
    """``--num-iterations 2``: step 2 trains on step 1's completions, against the log-probabilities they were
    sampled under. Its logged clip ratios equal TRL's formulas (``clip_ratio/low_mean``: ratio < 1 - epsilon where
    the advantage is negative; ``high_mean``: ratio > 1 + epsilon_high where it is positive; ``region_mean``:
    either; means over completion tokens) evaluated in float64 on the base model (the policy that sampled: B = 0)
    and on the adapter written after step 1, merged. Step 1 is on-policy: no clipping."""
    from loraq.training import grpo_run, rollout

    seen = []  # the rows each sampling built (prompt + completion, labels on the completion)
    monkeypatch.setattr(grpo_run, "scored_rows", lambda *a, **k: seen.append(rollout.scored_rows(*a, **k))
                        or seen[-1])
    reward_file = tmp_path / "mod3.py"
    reward_file.write_text("def mod3(completion_ids, **kw):\n"
                           "    return [float(sum(c) % 3) / 2 for c in completion_ids]\n")
    data = write_prompts(tmp_path / "p.jsonl")
    kw = dict(num_iterations=2, reward=[f"{reward_file}:mod3"], lr=3e-2, warmup=0, schedule="constant",
              epsilon=0.2, epsilon_high=0.28)
    two = _train(tiny_llama_dir, data, tmp_path / "two", max_steps=2, **kw)
    assert len(seen) == 1  # sampled once, trained on twice
    one = _train(tiny_llama_dir, data, tmp_path / "one", max_steps=1, **kw)  # the same first step; its adapter
    assert len(seen) == 2 and torch.equal(seen[0].input_ids, seen[1].input_ids)
    steps = [json.loads(x) for x in (two.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["kind"] == "train"]
    assert [steps[0][f"clip_ratio/{k}_mean"] for k in ("low", "high", "region")] == [0.0, 0.0, 0.0]

    rows = seen[0]
    scored = rows.labels != -100
    ratio = torch.exp(_float64_logps(tiny_llama_dir, one.run_dir, rows) - _float64_logps(tiny_llama_dir, None, rows))
    rewards = torch.tensor([float(sum(c) % 3) / 2 for c in (r[s].tolist() for r, s in zip(rows.input_ids, scored))],
                           dtype=torch.float64).view(-1, G)
    sign = torch.sign(rewards - rewards.mean(1, keepdim=True)).view(-1, 1)
    low = (ratio < 1 - 0.2) & (sign < 0) & scored
    high = (ratio > 1 + 0.28) & (sign > 0) & scored
    margin = torch.minimum((ratio - 0.8).abs(), (ratio - 1.28).abs())[scored].min()
    assert margin > 1e-4  # no token sits on a boundary, where fp32 and float64 could disagree
    tokens = scored.sum().double()
    expected = {"low": low.sum() / tokens, "high": high.sum() / tokens, "region": (low | high).sum() / tokens}
    assert expected["region"] > 0  # the update moved the policy enough to clip
    for key, value in expected.items():
        assert steps[1][f"clip_ratio/{key}_mean"] == pytest.approx(float(value), abs=1e-6), key  # same count


def test_beta_with_an_init_adapter_measures_kl_to_that_adapter_frozen(tiny_llama_dir, tmp_path):
    """``--beta 0.04 --init-adapter RUN``: the reference is the adapter the run continues, frozen. At step 1 the
    policy is that adapter, so ``kl`` is exactly 0 (against the adapter switched off it is not: the SFT adapter
    moved the model); training moves away from it (``kl`` > 0 at the end), and the reference is untouched by the swaps
    (a run resumed from step 2 ends bitwise equal)."""
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {i}"},
                                                     {"role": "assistant", "content": f"number {i} " * 3}]}) + "\n"
                            for i in range(16)))
    sft = loraq.train(model=str(tiny_llama_dir), data=str(chat), method="lora", max_steps=4, batch_size=4,
                      seq_len=64, dtype="fp32", output_dir=str(tmp_path / "sft"), eval_samples=0, seed=0, lr=5e-2,
                      threads=1, val_fraction=0)
    data = write_prompts(tmp_path / "p.jsonl")
    reward_file = tmp_path / "parity.py"
    reward_file.write_text("def parity(completion_ids, **kw):\n"
                           "    return [float(sum(c) % 2) for c in completion_ids]\n")
    kw = dict(max_steps=5, save_every=2, beta=0.04, init_adapter=str(sft.run_dir), reward=[f"{reward_file}:parity"])
    full = _train(tiny_llama_dir, data, tmp_path / "full", **kw)
    steps = [json.loads(x) for x in (full.run_dir / "metrics.jsonl").read_text().splitlines()]
    kl = [s["kl"] for s in steps if s["kind"] == "train"]
    assert kl[0] == 0.0 and kl[-1] > 0, kl
    moved = load_file(str(sft.run_dir / "adapter_model.safetensors"))
    assert all(t.abs().max() > 1e-3 for k, t in moved.items() if "lora_B" in k)  # the base is not the policy
    part = tmp_path / "part"
    _train(tiny_llama_dir, data, part, **kw)
    (part / "adapter_model.safetensors").unlink()
    shutil.rmtree(part / "checkpoints" / "step-00000004")
    resumed = _train(tiny_llama_dir, data, part, resume=True, **kw)
    ta = load_file(str(full.run_dir / "adapter_model.safetensors"))
    tb = load_file(str(resumed.run_dir / "adapter_model.safetensors"))
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_scale_rewards_batch_spans_every_micro_batch_of_the_step(tiny_llama_dir, tmp_path, monkeypatch):
    """``--scale-rewards batch --grad-accum 2``: each completion's advantage is its reward minus its group's mean,
    over the std of all the step's completions (both micro-batches: TRL's generation batch) plus 1e-4 -- the
    float64 formula on the rewards the function returned."""
    from loraq.training import grpo_run

    seen = []
    real = grpo_run.policy_loss
    monkeypatch.setattr(grpo_run, "policy_loss",
                        lambda logps, advantages, *a, **k: seen.append(advantages.clone()) or real(logps, advantages,
                                                                                                   *a, **k))
    reward_file = tmp_path / "mod3.py"
    reward_file.write_text("def mod3(completion_ids, **kw):\n"
                           "    values = [float(sum(c) % 3) for c in completion_ids]\n"
                           "    import json, os\n"
                           "    open(os.environ['REWARD_LOG'], 'a').write(json.dumps(values) + '\\n')\n"
                           "    return values\n")
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("REWARD_LOG", str(log))
    _train(tiny_llama_dir, write_prompts(tmp_path / "p.jsonl"), tmp_path / "run", max_steps=1, grad_accum=2,
           scale_rewards="batch", reward=[f"{reward_file}:mod3"])
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == len(seen) == 2  # two micro-batches, each scored once
    rewards = torch.tensor(calls, dtype=torch.float64).view(-1)
    grouped = rewards.view(-1, G)
    expected = (grouped - grouped.mean(1, keepdim=True)).view(-1) / (rewards.std() + 1e-4)
    assert calls[0] != calls[1] and rewards.view(2, -1).std(1).sub(rewards.std()).abs().max() > 1e-3
    assert torch.allclose(torch.cat(seen).double(), expected, atol=1e-6, rtol=0)
