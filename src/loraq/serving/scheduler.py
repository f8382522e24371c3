"""Continuous batching: one decode thread owns the model and a :class:`~loraq.generation.engine.DecodeBatch`.

Requests wait in a bounded queue (full: 429 with ``Retry-After``). Between two decode steps the thread admits
waiting requests in arrival order while their rows fit in ``max_batch`` -- whatever adapters they name: it
installs the adapters they need (:meth:`AdapterRegistry.activate`), routes each row to its own
(:class:`loraq.lora.rows.RowAdapters`) and prefills them into the running batch -- then runs one step for
every row. A row leaves when it ends, and when its client goes away (:meth:`Scheduler.cancel`: dropped before
the next step). Tokens and endings reach each request's asyncio queue on its own event loop.

``stop()`` refuses new requests (503), lets the admitted ones finish within a bounded wait, then ends the rest.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from loraq.serving.protocol import ApiError, Job

log = logging.getLogger("loraq.serve")


@dataclass(eq=False)
class Choice:
    """One row of a request (the engine's row key): which prompt, which choice."""

    pending: Pending
    index: int
    row: Any = None


@dataclass(eq=False)
class Pending:
    """A request inside the server: its job, its event loop's queue, whether its client left."""

    job: Job
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    submitted: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    cancelled: bool = False
    left: int = 0  # choices still decoding
    choices: list[Choice] = field(default_factory=list)
    versions: set = field(default_factory=set)  # the adapter versions its rows use (not to be evicted)

    def emit(self, event: tuple) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class Scheduler:
    """The decode thread and its queue (see the module docstring)."""

    def __init__(self, model, tokenizer, registry, metrics, *, max_batch: int, max_queue: int, context_length: int):
        from loraq.data.prompts import pad_token_id, stop_token_ids
        from loraq.generation.text import text_decoder

        self.model, self.tokenizer, self.registry, self.metrics = model, tokenizer, registry, metrics
        self.max_batch, self.max_queue, self.context_length = max_batch, max_queue, context_length
        self.stop_ids = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
        self.pad_id = pad_token_id(tokenizer, self.stop_ids)
        self.decode = text_decoder(tokenizer)
        self.waiting: deque[Pending] = deque()
        self.wake = threading.Condition()
        self.stopping = False
        self._layout = -1  # the registry's change count the routing was laid out for
        self.thread = threading.Thread(target=self._run, name="loraq-decode", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job, loop: asyncio.AbstractEventLoop) -> Pending:
        """Queue a request; ApiError 429 (queue full) or 503 (shutting down)."""
        pending = Pending(job, loop, asyncio.Queue())
        with self.wake:
            if self.stopping:
                raise ApiError(503, "the server is shutting down", kind="server_error", code="shutting_down",
                               headers={"Retry-After": "5"})
            if len(self.waiting) >= self.max_queue:
                raise ApiError(429, f"the server's queue is full ({self.max_queue} requests waiting); retry shortly",
                               kind="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
            self.waiting.append(pending)
            self.metrics.queue_depth.set(len(self.waiting))
            self.wake.notify()
        return pending

    def cancel(self, pending: Pending) -> None:
        """The client went away: its rows leave the batch before the next step."""
        with self.wake:
            pending.cancelled = True
            self.wake.notify()

    def stop(self, timeout: float = 30.0) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(timeout)

    # -- the decode thread ------------------------------------------------------------------------
    def _run(self) -> None:
        from loraq.generation.engine import DecodeBatch, eval_mode
        from loraq.lora.rows import RowAdapters

        with torch.no_grad(), eval_mode(self.model), RowAdapters(self.model) as routing:
            batch = DecodeBatch(self.model, stop_ids=self.stop_ids, pad_id=self.pad_id, routing=routing,
                                on_token=self._on_token, length=self.context_length)
            while True:
                try:
                    self._drop_cancelled(batch)
                    if not self._admit(batch, routing) and not batch.rows:
                        if not self._idle():
                            return
                        continue
                    if batch.rows:
                        self._step(batch)
                except Exception as exc:  # a bug: the requests decoding fail, the thread (and server) goes on
                    self._fail_all(batch, exc)

    def _fail_all(self, batch, exc: Exception) -> None:
        log.exception("decode thread")
        for row in batch.drop({r.key for r in batch.rows}):
            row.key.pending.emit(("error", ApiError(500, f"decoding failed: {exc}", kind="server_error")))

    def _idle(self) -> bool:
        """Wait for work; False once stopping with nothing left."""
        with self.wake:
            if self.stopping and not self.waiting:
                return False
            if not self.waiting:
                self.wake.wait(0.5)
        return True

    def _step(self, batch) -> None:
        """One decode step (a failure is the caller's: :meth:`_run` fails the batch's requests and goes on)."""
        self.metrics.decode_steps.inc()
        self.metrics.decode_rows.inc(len(batch.rows))
        for row in batch.step():
            self._finished(row.key)
        self.metrics.batch_rows.set(len(batch.rows))

    def _on_token(self, key: Choice, token: int) -> None:
        pending = key.pending
        if pending.first_token is None:
            pending.first_token = time.monotonic()
            self.metrics.time_to_first_token.observe(pending.first_token - pending.submitted)
        logprobs = key.row.result.logprobs
        pending.emit(("token", key.index, token, logprobs[-1] if logprobs else None))

    def _finished(self, key: Choice) -> None:
        pending = key.pending
        pending.emit(("done", key.index, key.row.result))
        pending.left -= 1
        if pending.left == 0:
            self.metrics.finished(pending)
            pending.emit(("end",))

    def _drop_cancelled(self, batch) -> None:
        with self.wake:
            gone = [p for p in self.waiting if p.cancelled]
            for p in gone:
                self.waiting.remove(p)
            self.metrics.queue_depth.set(len(self.waiting))
        keys = {r.key for r in batch.rows if r.key.pending.cancelled}
        if keys:
            batch.drop(keys)
            for pending in {k.pending for k in keys}:
                self.metrics.cancelled(pending)

    def _admit(self, batch, routing) -> bool:
        """Prefill waiting requests that fit into the batch; whether any joined."""
        joining: list = []
        while True:
            with self.wake:
                if not self.waiting or len(batch.rows) + len(joining) + self.waiting[0].job.choices > self.max_batch:
                    break
                pending = self.waiting[0]
                route = self._internal_route(pending, batch.rows, joining)
                if route is None:  # its adapters have no room yet: wait for rows to finish
                    break
                self.waiting.popleft()
                self.metrics.queue_depth.set(len(self.waiting))
            if route is not False:
                joining += self._rows(pending, route)
        if joining:
            if self.registry.changes != self._layout:  # adapters installed or removed: new slots
                self._layout = self.registry.changes
                routing.refresh()
            self._join(batch, joining)
        return bool(joining)

    def _internal_route(self, pending: Pending, running: list, joining: list):
        """The request's route in internal adapter names; None: no room for its adapters yet; False: failed."""
        from loraq.errors import LoraqError

        try:
            versions = [(self.registry.route_of(name), weight) for name, weight in pending.job.route]
        except KeyError as exc:
            pending.emit(("error", ApiError(404, f"adapter {exc.args[0]!r} was unloaded", param="model",
                                            code="model_not_found")))
            return False
        in_use = {key for r in running + joining for key in r.key.pending.versions}
        try:
            names = self.registry.activate({key for key, _ in versions}, in_use)
        except LoraqError as exc:  # its folder changed since it was registered
            pending.emit(("error", ApiError(400, str(exc), param="model")))
            return False
        except Exception as exc:  # a bug: this request fails, the others go on
            log.exception("installing adapters")
            pending.emit(("error", ApiError(500, f"installing its adapters failed: {exc}", kind="server_error")))
            return False
        if names is None:
            return None
        pending.versions = {key for key, _ in versions}
        return tuple((names[key], weight) for key, weight in versions)

    def _rows(self, pending: Pending, route: tuple) -> list:
        from loraq.generation.engine import Row, StopText

        decode = self.decode
        for p, prompt in enumerate(pending.job.prompts):
            for j, options in enumerate(pending.job.options):
                choice = Choice(pending, p * len(pending.job.options) + j)
                checker = StopText(decode, options.stop) if options.stop else None
                choice.row = Row(choice, prompt, options, checker, route, pending.job.logprobs,
                                 ignore_stop_ids=pending.job.ignore_eos)
                pending.choices.append(choice)
        pending.left = len(pending.choices)
        return [c.row for c in pending.choices]

    def _join(self, batch, rows: list) -> None:
        try:
            batch.join(rows)
        except Exception as exc:  # a bug: these requests fail, the running ones go on
            log.exception("prefill failed")
            batch.route([r.route for r in batch.rows])
            for pending in {r.key.pending for r in rows}:
                pending.emit(("error", ApiError(500, f"prefill failed: {exc}", kind="server_error")))
        self.metrics.batch_rows.set(len(batch.rows))
