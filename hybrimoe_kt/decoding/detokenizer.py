"""Incremental detokenization with stop strings, in time linear in the generation's length.

Decoding the whole token list after every new token costs O(n) per token (O(n^2) per answer). Here each
step decodes a short window: the tokens since the last emitted piece plus a few tokens of left context
(``CONTEXT``), because a tokenizer may render a token differently at the start of a sequence (a leading
space, a merged byte sequence). The new text is what the window adds to its context. A window that ends
in an incomplete UTF-8 sequence (a trailing U+FFFD) is held until the next token completes it.

Stop strings are matched on the assembled text; any tail that could be the start of a stop string is
held back, and text is cut before the first stop string found.
"""

from __future__ import annotations

from typing import Any, Sequence

CONTEXT = 4  # tokens of left context decoded with each window


class Detokenizer:
    """``add(token)`` returns (text safe to emit now, stopped). ``flush()`` returns the held-back rest at
    the end of a generation that did not stop on a stop string. ``text`` is the answer so far (cut at a
    stop string once one is found)."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.longest_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.prefix = 0   # ids[prefix:read] is the context already rendered into self.text
        self.read = 0
        self.text = ""    # rendered text (complete characters only)
        self.sent = 0     # characters of self.text already emitted
        self.stopped = False

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _render(self, final: bool = False) -> None:
        """Append what the tokens since ``read`` add to the text, unless they end mid-character (and
        this is not the ``final`` rendering)."""
        context = self._decode(self.ids[self.prefix:self.read])
        window = self._decode(self.ids[self.prefix:])
        if window.endswith("\ufffd") and not final:
            return
        if window.startswith(context):
            self.text += window[len(context):]
        else:  # the context renders differently with the new tokens after it: re-render it all once
            self.text = self._decode(self.ids)
        self.read = len(self.ids)
        self.prefix = max(0, self.read - CONTEXT)

    def add(self, token: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.ids.append(int(token))
        self._render()
        if self.stop:
            start = max(0, self.sent - self.longest_stop)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                cut = max(min(hits), self.sent)
                self.text = self.text[:cut]
                delta, self.sent, self.stopped = self.text[self.sent:], cut, True
                return delta, True
        safe = len(self.text) - self._held()
        if safe <= self.sent:
            return "", False
        delta, self.sent = self.text[self.sent:safe], safe
        return delta, False

    def _held(self) -> int:
        """Characters at the end of the text that may begin a stop string."""
        for k in range(min(self.longest_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def flush(self) -> str:
        if self.stopped:
            return ""
        if self.read < len(self.ids):  # an incomplete character at the very end: render it as it is
            self._render(final=True)
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta
