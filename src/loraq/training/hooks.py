"""Observing a run from outside: callbacks called at fixed points of the loop.

    class Timer(loraq.training.hooks.Callback):
        def on_train_start(self, settings): ...     # once: the run's settings (run.json's) and its folder
        def on_step_start(self, step): ...
        def on_step_end(self, step, result): ...     # result: StepResult (loss, grad norm, lr, tokens)
        def on_eval(self, step, result): ...         # result: EvalLoss (loss, perplexity, tokens)
        def on_metrics(self, record): ...            # each line written to metrics.jsonl, as written
        def on_train_end(self, summary): ...         # once: summary.json's contents

    loraq.train(..., callbacks=[Timer()])

Callbacks run on every rank, between steps: they may measure, log or run
other work (``bench/interleaved.py`` runs a PEFT step in ``on_step_start``),
but must not change the model, the optimizer or the data, or the run stops
being reproducible. An exception in a callback stops the run.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StepResult:
    """One optimizer step: the global mean loss, the gradient norm before clipping, the learning rate used,
    the tokens processed (all ranks) and whether the step was applied (False: skipped as non-finite); ``metrics``:
    the objective's own numbers (DPO/ORPO: rewards, margin, accuracies), empty for SFT."""

    loss: float
    grad_norm: float
    lr: float
    tokens: int
    finite: bool
    metrics: dict = field(default_factory=dict)


class Callback:
    """No-op base: override the points you need."""

    def on_train_start(self, settings: dict) -> None:
        """Once, before the first step: the settings (every TrainConfig key, the model, the compute dtype, the
        number of processes, ``run_dir``); metrics.jsonl lines start after this."""

    def on_step_start(self, step: int) -> None:
        """Before step ``step`` (1-based) takes its first micro-batch."""

    def on_step_end(self, step: int, result: StepResult) -> None:
        """After the optimizer step and its metrics line."""

    def on_eval(self, step: int, result) -> None:
        """After a validation pass (periodic or final) whose loss is ``result`` (an EvalLoss)."""

    def on_metrics(self, record: dict) -> None:
        """After a line is written to metrics.jsonl (rank 0 writes it): ``record`` is that line's object."""

    def on_train_end(self, summary: dict) -> None:
        """Once, after the final evaluation and the files: ``summary`` is summary.json's object."""
