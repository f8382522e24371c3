"""Progress display: a live one-line bar on a terminal, plain log lines otherwise."""
from __future__ import annotations

import sys
import time
from typing import TextIO


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    def __init__(self, total_steps: int, start_step: int = 0, stream: TextIO | None = None, enabled: bool = True,
                 log_every: int = 1):
        self.total = total_steps
        self.start_step = start_step
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.live = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.log_every = log_every
        self.t0 = time.perf_counter()
        self._width = 0

    def update(self, step: int, loss: float, lr: float, tokens_per_second: float, memory_bytes: int,
               extra: str = "") -> None:
        if not self.enabled:
            return
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        fields = (f"step {step}/{self.total}  loss {loss:.4f}{extra}  lr {lr:.2e}  {tokens_per_second:,.0f} tok/s  "
                  f"eta {_fmt_time(eta)}  mem {memory_bytes / 2**30:.2f} GB")
        if self.live:
            frac = step / max(1, self.total)
            bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
            line = f"\r[{bar}] {fields}"
            pad = max(0, self._width - len(line))
            self._width = len(line)
            self.stream.write(line + " " * pad)
            self.stream.flush()
        elif step % self.log_every == 0 or step == self.total:
            self.stream.write(fields + "\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        """A line that must not be overwritten by the bar."""
        if not self.enabled:
            return
        if self.live and self._width:
            self.stream.write("\n")
            self._width = 0
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.live and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
