"""Token rows for the calibrated initialisation (``--init calibrated``).

The rows are what the adapter will be trained on unless told otherwise: the
training examples (prompt and answer, as the model reads them), or the
examples of ``--calibration-data`` tokenized the same way (chat template,
``--seq-len`` cut; text is cut into ``--seq-len`` chunks). Up to
``--calibration-samples`` of them, chosen by ``--seed`` so a run is repeatable.
"""
from __future__ import annotations

import random
from typing import Any, Sequence

from loraq.data.tokenize import Example


def calibration_rows(cfg: Any, train_examples: Sequence[Example], tokenizer: Any) -> list[list[int]]:
    """Up to ``cfg.calibration_samples`` token-id rows from ``cfg.calibration_data`` (else ``train_examples``)."""
    from loraq.data.dataset import read_samples, tokenize_samples

    examples = list(train_examples)
    if cfg.calibration_data:
        _, samples = read_samples(cfg.calibration_data, "auto")
        # every token counts here, so the prompt is "trained" too (no example is dropped for lack of an answer)
        examples, _ = tokenize_samples(samples, tokenizer, cfg.seq_len, train_on_inputs=True,
                                       source=str(cfg.calibration_data))
    order = list(range(len(examples)))
    random.Random(f"loraq-calibration:{cfg.seed}").shuffle(order)
    return [list(examples[i].input_ids) for i in sorted(order[:cfg.calibration_samples])]
