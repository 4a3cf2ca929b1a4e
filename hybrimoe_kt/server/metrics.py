"""Server counters shown at ``GET /metrics``: requests by outcome, tokens, recent decode speed. Updated
by the worker and the HTTP threads under one lock."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

RECENT = 32  # requests in the decode tokens/s window


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.served = 0          # generations that ran to EOS, a stop string or max_tokens
        self.failed = 0          # generations that raised (HTTP 500)
        self.rejected = 0        # queue full (HTTP 429)
        self.invalid = 0         # bad requests (HTTP 400)
        self.cancelled = 0       # client went away before or during its generation
        self.prompt_tokens = 0
        self.tokens_generated = 0
        self._decode: deque[tuple[int, float]] = deque(maxlen=RECENT)  # (tokens after the first, seconds)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def finished(self, outcome: str, prompt_tokens: int, generated: int, decode_s: float) -> None:
        """One generation ended: ``outcome`` is served, cancelled or failed."""
        with self._lock:
            setattr(self, outcome, getattr(self, outcome) + 1)
            self.prompt_tokens += prompt_tokens
            self.tokens_generated += generated
            if generated > 1 and decode_s > 0:
                self._decode.append((generated - 1, decode_s))

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            tokens = sum(t for t, _ in self._decode)
            secs = sum(s for _, s in self._decode)
            return {
                "requests": {"served": self.served, "failed": self.failed, "rejected": self.rejected,
                             "invalid": self.invalid, "cancelled": self.cancelled},
                "prompt_tokens": self.prompt_tokens,
                "tokens_generated": self.tokens_generated,
                "decode_tokens_per_s_recent": round(tokens / secs, 3) if secs > 0 else None,
            }
