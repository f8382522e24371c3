"""DPO and ORPO against TRL (the reference implementation, a test-only dependency pinned in pyproject.toml).

The same tiny Llama, the same LoRA weights (random A and B, so the adapter
changes the model and every factor gets a gradient), fp32, one batch of four
pairs: the first step's loss and every adapter gradient equal TRL's to a
relative 1e-5. The policy runs through PEFT in TRL and through loraq's own
LoRA layers and fused per-token log-probabilities here; the reference is the
adapter switched off in both.

* DPO: TRL's DPOTrainer tokenizes the conversational pairs itself (a chat
  template without a newline after the end-of-turn token, so that TRL's
  completion -- everything after the prompt -- is exactly loraq's answer:
  content + end-of-turn), collates them, and ``_compute_loss`` gives the loss.
  The tokens themselves are compared too.
* ORPO: TRL's ORPOTrainer (trl.experimental) scores loraq's rows
  (``get_batch_loss_metrics``); TRL's SFT term covers prompt and answer, which
  is loraq's ORPO with ``train_on_inputs=True``.
"""
from __future__ import annotations

import json

import pytest
import torch

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

PAIRS = [
    ("Join red and fox.", "red-fox", "fox red"),
    ("Join two and sun.", "two-sun", "sun two and more"),
    ("Say the capital of France.", "Paris", "The capital of France is Paris."),
    ("Add 2 and 3.", "5", "2 + 3 = 5"),
]
TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
            "'<|im_end|>'}}{% if not loop.last %}{{'\n'}}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '\n<|im_start|>assistant\n' }}{% endif %}")
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def setting(tiny_llama_dir, tmp_path_factory):
    """A LoRA adapter with random A and B saved by PEFT, and the tokenizer with the template above."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    tok.chat_template = TEMPLATE
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    folder = tmp_path_factory.mktemp("trl-adapter")
    model.save_pretrained(str(folder))
    return tok, folder


def peft_model(tiny_llama_dir, folder):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(folder), is_trainable=True)


def loraq_model(tiny_llama_dir, folder):
    from transformers import AutoModelForCausalLM

    from loraq.lora.files import load_adapter

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    load_adapter(model, folder)
    return model.train()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def peft_grads(model) -> dict[str, torch.Tensor]:
    return {n.removeprefix("base_model.model."): p.grad.clone()
            for n, p in model.named_parameters() if "lora_" in n and ".ref." not in n}


def loraq_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_step(ours_loss, ours_grads, theirs_loss, theirs_grads):
    assert rel(ours_loss, theirs_loss) <= 1e-5, (float(ours_loss), float(theirs_loss))
    assert sorted(ours_grads) == sorted(theirs_grads) and len(ours_grads) == 2 * 2 * len(TARGETS)
    for name, g in theirs_grads.items():
        assert float(g.norm()) > 0, name
        assert rel(ours_grads[name], g) <= 1e-5, (name, rel(ours_grads[name], g))


def chat_pairs(tok):
    from loraq.data.preference import PreferenceSample, tokenize_pair

    samples = [PreferenceSample("chat", f"t:{i}", prompt_messages=[{"role": "user", "content": p}],
                                chosen=[{"role": "assistant", "content": c}],
                                rejected=[{"role": "assistant", "content": r}])
               for i, (p, c, r) in enumerate(PAIRS)]
    return [tokenize_pair(s, tok, 256)[0] for s in samples]


def loraq_step(model, pairs, tok, name: str, fresh: bool = True, **kwargs):
    """loraq's loss for one batch of every pair (reference: the adapter switched off), and its backward."""
    from loraq.data.preference import PreferenceData, collate_pairs
    from loraq.training.logps import SequenceLogps
    from loraq.training.preference import PreferenceObjective
    from loraq.training.reference import compute_reference, reference_context

    module = SequenceLogps(model)
    data = PreferenceData(format="preference", train=pairs, val=[], stats=None, pad_id=tok.pad_token_id, seq_len=256)
    reference = compute_reference(module, reference_context(model, fresh_adapter=fresh), data, range(len(pairs)), 4,
                                  torch.device("cpu"))
    objective = PreferenceObjective(name, reference=reference, **kwargs)
    batch = collate_pairs(pairs, range(len(pairs)), tok.pad_token_id)
    counts = objective.counts([batch])
    loss = objective.loss(module, batch, counts)
    loss.backward()
    return loss.detach(), loraq_grads(model)


def dpo_trainer(tiny_llama_dir, folder, tok, tmp_path, reference: str):
    """TRL's DPOTrainer. ``adapter-off``: it adds a fresh adapter (its reference: the adapter disabled), whose
    factors are then set to the saved ones; ``as-it-starts``: it gets the trained adapter (its reference: a frozen
    copy of it, TRL's rule for a model that already has one, and loraq's for --init-adapter)."""
    from datasets import Dataset
    from peft import LoraConfig
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    records = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
                "rejected": [{"role": "assistant", "content": r}]} for p, c, r in PAIRS]
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, beta=0.1, max_length=None,
                     report_to=[], use_cpu=True, bf16=False)
    if reference == "as-it-starts":
        return DPOTrainer(model=peft_model(tiny_llama_dir, folder), args=args,
                          train_dataset=Dataset.from_list(records), processing_class=tok)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    trainer = DPOTrainer(model=base, args=args, train_dataset=Dataset.from_list(records), processing_class=tok,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    saved = load_file(str(folder / "adapter_model.safetensors"))
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_" in name:
                p.copy_(saved[name.replace(".default.", ".")])
    return trainer


@pytest.mark.parametrize("reference", ["adapter-off", "as-it-starts"])
def test_dpo_first_step_equals_trl(setting, tiny_llama_dir, tmp_path, reference):
    tok, folder = setting
    trainer = dpo_trainer(tiny_llama_dir, folder, tok, tmp_path, reference)
    rows = [trainer.train_dataset[i] for i in range(len(PAIRS))]
    pairs = chat_pairs(tok)
    for row, pair in zip(rows, pairs):  # the same tokens, and TRL's completion is loraq's answer
        assert row["prompt_ids"] + row["chosen_ids"] == pair.chosen.input_ids
        assert row["prompt_ids"] + row["rejected_ids"] == pair.rejected.input_ids
        assert len(row["prompt_ids"]) == pair.prompt_tokens
    trainer.model.train()
    theirs = trainer._compute_loss(trainer.model, trainer.data_collator(rows), return_outputs=False)
    theirs.backward()

    ours, grads = loraq_step(loraq_model(tiny_llama_dir, folder), pairs, tok, "dpo", fresh=reference == "adapter-off",
                             beta=0.1)
    # with the adapter off, the policy is off the reference already; as it starts, it is the reference (loss ln 2)
    assert (abs(float(theirs) - 0.693147) > 1e-3) == (reference == "adapter-off")
    assert_same_step(ours, grads, theirs.detach(), peft_grads(trainer.model))


def test_orpo_first_step_equals_trl(setting, tiny_llama_dir, tmp_path):
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from loraq.data.preference import PreferenceSample, tokenize_pair

    tok, folder = setting
    records = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    args = ORPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, beta=0.25, max_length=256,
                      report_to=[], use_cpu=True, bf16=False)
    trainer = ORPOTrainer(model=peft_model(tiny_llama_dir, folder), args=args,
                          train_dataset=Dataset.from_list(records), processing_class=tok)
    pairs = [tokenize_pair(PreferenceSample("text", f"t:{i}", prompt=p, chosen=" " + c, rejected=" " + r), tok, 256)[0]
             for i, (p, c, r) in enumerate(PAIRS)]
    batch = {}
    for side in ("chosen", "rejected"):
        rows = [getattr(pair, side) for pair in pairs]
        width = max(len(r) for r in rows)
        batch[f"{side}_input_ids"] = torch.tensor([r.input_ids + [tok.pad_token_id] * (width - len(r)) for r in rows])
        batch[f"{side}_attention_mask"] = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        batch[f"{side}_labels"] = torch.tensor([r.labels + [-100] * (width - len(r)) for r in rows])
    trainer.model.train()
    theirs, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    theirs.backward()

    ours, grads = loraq_step(loraq_model(tiny_llama_dir, folder), pairs, tok, "orpo", orpo_lambda=0.25,
                             train_on_inputs=True)
    assert_same_step(ours, grads, theirs.detach(), peft_grads(trainer.model))
    assert json.dumps(metrics)  # TRL's own metrics computed without error
