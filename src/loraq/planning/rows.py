"""The batches a run will see, from its data: how long the longest padded batch is, and what is evaluated.

A batch is padded to its longest row (:func:`loraq.data.packing.collate`),
so the largest batch of a run is ``batch_size`` rows of the longest row's
length; its memory is what the peak is made of. The data is read and
tokenized as the run reads it (:func:`loraq.data.dataset.build_data`,
the one implementation) -- no model weight is needed for that. Without the
data (``rows_at_seq_len``) every row is taken to fill ``--seq-len``: the
worst case any data could give.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# a share of rows shorter than the longest from which batches are taken to carry a padding mask (with one
# short row in a hundred, a batch of 8 holds one with a chance of 8%; below that the peak batch has none)
MASKED_SHARE = 0.01


@dataclass(frozen=True)
class RowShape:
    """``longest``: tokens of the longest row (the padded length of the largest batch); ``trained``: the most
    trained tokens one row carries; ``varied``: batches carry an attention mask (packed rows, or padding: see
    MASKED_SHARE);
    ``tokens``: tokens of the data (train + validation), ``examples`` the examples they come from;
    ``eval_rows`` x ``eval_prompt`` + ``eval_new``:
    the exact-match generation before training (none when ``eval_rows`` is 0)."""

    longest: int
    trained: int
    varied: bool
    rows: int
    tokens: int
    examples: int
    eval_rows: int
    eval_prompt: int
    eval_new: int
    has_val: bool
    from_data: bool

    def at_length(self, length: int) -> RowShape:
        """The same data with rows of ``length`` tokens (the largest --seq-len question)."""
        return dataclasses.replace(self, longest=length, trained=min(self.trained, length) if self.from_data
                                   else length)


def rows_from_data(cfg: Any, tokenizer: Any) -> RowShape:
    """Tokenize ``cfg``'s data as training will and measure its rows (``cfg.batch_size`` may be 'auto')."""
    if getattr(cfg, "objective", "sft") == "grpo":
        return rows_of_prompts(cfg, tokenizer)
    from loraq.data.dataset import build_data
    from loraq.data.packing import row_length

    probe = dataclasses.replace(cfg, batch_size=1) if not isinstance(cfg.batch_size, int) else cfg
    data = build_data(probe, tokenizer)
    lengths = [row_length(row) for row in data.train]
    examples = sum(len(row) for row in data.train) + sum(len(row) for row in data.val)
    trained = max(sum(ex.num_trained for ex in row) for row in data.train)
    tokens = sum(lengths) + sum(row_length(row) for row in data.val)
    refs = data.references if cfg.eval_samples and not cfg.resume else []
    short = sum(1 for n in lengths if n < max(lengths)) / len(lengths)
    return RowShape(longest=max(lengths), trained=trained, varied=bool(data.packed) or short >= MASKED_SHARE,
                    rows=len(lengths), tokens=tokens, examples=examples, eval_rows=len(refs),
                    eval_prompt=max((len(r.prompt_ids) for r in refs), default=0),
                    eval_new=data.max_answer_tokens if refs else 0, has_val=bool(data.val), from_data=True)


def rows_of_prompts(cfg: Any, tokenizer: Any) -> RowShape:
    """GRPO: each prompt becomes ``--num-generations`` rows of the prompt and a completion of up to
    ``--max-completion-length`` tokens, all of which are scored (the batch's row count is multiplied in
    :func:`loraq.planning.plan.run_settings`); the held-out prompts are generated greedily before training."""
    from loraq.data.prompt_data import build_prompt_data

    data = build_prompt_data(cfg, tokenizer)
    longest_prompt = max(len(p) for p in data.train)
    new = cfg.max_completion_length
    val_prompt = max((len(p) for p in data.val), default=0)
    return RowShape(longest=longest_prompt + new, trained=new, varied=True, rows=len(data.train),
                    tokens=sum(len(p) + new for p in data.train), examples=len(data.train) + len(data.val),
                    eval_rows=len(data.val) if not cfg.resume else 0, eval_prompt=val_prompt,
                    eval_new=new if data.val else 0, has_val=bool(data.val), from_data=True)


def rows_at_seq_len(cfg: Any) -> RowShape:
    """Every row ``--seq-len`` tokens long, all trained, no data held and no exact match (the worst case)."""
    return RowShape(longest=cfg.seq_len, trained=cfg.seq_len, varied=False, rows=1 << 30, tokens=0, examples=0,
                    eval_rows=0,
                    eval_prompt=0, eval_new=0, has_val=False, from_data=False)
