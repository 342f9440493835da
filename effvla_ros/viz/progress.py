"""A progress line per episode: on a terminal one line rewritten in place (``\\r``, throttled); in a
log (not a TTY, e.g. CI) plain lines, at most one per ``log_every`` units of progress or on a state
change, so a log shows progress without a flood of carriage returns."""
from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressLine:
    """``update(done, status, state)`` draws ``prefix [#####.....] done/total unit | status | state``; in log mode
    a line is written when ``state`` changes or ``log_every`` units passed (``status``, e.g. counters, changes
    alone print nothing)."""

    def __init__(self, prefix: str, total: float, *, unit: str = "s", stream: TextIO | None = None,
                 tty: bool | None = None, width: int = 24, min_interval: float = 0.2, log_every: float = 5.0) -> None:
        self.prefix, self.total, self.unit = prefix, float(total), unit
        self.stream = stream if stream is not None else sys.stdout
        self.tty = bool(self.stream.isatty()) if tty is None else bool(tty)
        self.width, self.min_interval, self.log_every = width, min_interval, log_every
        self._last_draw = -float("inf")
        self._last_logged: float | None = None
        self._last_state: str | None = None
        self._len = 0
        self.lines = 0  # plain lines written (log mode)

    def render(self, done: float, status: str = "", state: str = "") -> str:
        frac = min(max(done / self.total, 0.0), 1.0) if self.total > 0 else 0.0
        n = int(round(frac * self.width))
        bar = "#" * n + "." * (self.width - n)
        return f"{self.prefix} [{bar}] {done:5.1f}/{self.total:.1f} {self.unit}" + "".join(f" | {x}" for x in (status, state) if x)

    def update(self, done: float, status: str = "", state: str = "", force: bool = False) -> None:
        text = self.render(done, status, state)
        if self.tty:
            now = time.monotonic()
            if not force and now - self._last_draw < self.min_interval:
                return
            self._last_draw = now
            pad = max(self._len - len(text), 0)
            self.stream.write("\r" + text + " " * pad)
            self._len = len(text)
            self.stream.flush()
            return
        changed = state != self._last_state
        due = self._last_logged is None or done - self._last_logged >= self.log_every
        if force or changed or due:
            self._last_logged, self._last_state = done, state
            self.stream.write(text + "\n")
            self.stream.flush()
            self.lines += 1

    def close(self, final: str | None = None) -> None:
        """End the progress line (a TTY's line is replaced by ``final`` when given) and print ``final``."""
        if self.tty:
            self.stream.write("\r" + " " * self._len + "\r")
        if final is not None:
            self.stream.write(final + "\n")
        self.stream.flush()
