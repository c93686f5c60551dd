"""Bounded log and error text, shared by edge and learner.

A hostile or broken peer can make either side describe arbitrarily large input (10,000 observation
keys) or fail thousands of times a second. Error details travel in gRPC trailers, which a client
refuses above its metadata limit (8 KiB by default: it then sees RESOURCE_EXHAUSTED instead of the
real status), and one warning per rejected record floods the log. So text is capped and repeated
warnings are summarised.
"""

from __future__ import annotations

import logging
import threading
import time

MAX_DETAIL_CHARS = 1024  # error details sent to a peer: well under gRPC's 8 KiB metadata limit


def bounded(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how much was cut."""
    text = str(text)
    if len(text) <= limit:
        return text
    note = f"... ({len(text) - limit} more characters)"
    return text[: max(0, limit - len(note))] + note


def some(names, limit: int = 5, width: int = 64) -> str:
    """At most ``limit`` names (each cut to ``width``) and how many more there are."""
    names = sorted(str(n) for n in names)
    shown = [n if len(n) <= width else n[: width - 3] + "..." for n in names[:limit]]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return "[" + ", ".join(repr(n) for n in shown) + "]" + more


class RateLimitedLog:
    """At most one line per ``key`` every ``period`` seconds; the next line that gets through says
    how many were suppressed in between."""

    def __init__(self, logger: logging.Logger, period: float = 10.0):
        self.logger, self.period = logger, period
        self._lock = threading.Lock()
        self._next: dict[object, float] = {}
        self._suppressed: dict[object, int] = {}

    def log(self, level: int, key, msg: str, *args) -> bool:
        """Log ``msg % args`` unless a line with ``key`` went out less than ``period`` s ago."""
        now = time.monotonic()
        with self._lock:
            if now < self._next.get(key, 0.0):
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            self._next[key] = now + self.period
            suppressed = self._suppressed.pop(key, 0)
            if len(self._next) > 10_000:  # keys come from peers: never grow without bound
                self._next = {k: t for k, t in self._next.items() if t > now}
        if suppressed:
            msg += " (%d similar lines suppressed in the last %.0fs)"
            args = (*args, suppressed, self.period)
        self.logger.log(level, msg, *args)
        return True

    def warning(self, key, msg: str, *args) -> bool:
        return self.log(logging.WARNING, key, msg, *args)

    def error(self, key, msg: str, *args) -> bool:
        return self.log(logging.ERROR, key, msg, *args)
