"""The token loop the server runs for one request: prefill, then one forward per new token over the
request's own ``DynamicCache``; a sampler (greedy, or temperature/top-p with a seeded generator); and an
incremental detokenizer that applies ``stop`` strings and never emits half a character or the start of a
stop string it may still have to cut."""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any, Iterator, Optional, Sequence

import torch

log = logging.getLogger(__name__)


class Sampler:
    """Picks the next token from a logits row [V]: argmax when ``temperature`` is 0, else a draw from
    softmax(logits / temperature) restricted to the top-p nucleus, reproducible for a given ``seed``."""

    def __init__(self, temperature: float, top_p: float = 1.0, seed: Optional[int] = None) -> None:
        self.temperature = temperature
        self.top_p = top_p
        self.greedy = temperature == 0.0
        self.generator = torch.Generator()
        self.generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)

    def __call__(self, logits: torch.Tensor) -> int:
        if self.greedy:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)  # [V]
        if self.top_p < 1.0:
            p_sorted, order = probs.sort(descending=True)
            before = p_sorted.cumsum(0) - p_sorted  # mass of strictly more likely tokens
            p_sorted = torch.where(before < self.top_p, p_sorted, torch.zeros_like(p_sorted))
            probs = torch.zeros_like(probs).scatter_(0, order, p_sorted)
        return int(torch.multinomial(probs / probs.sum(), 1, generator=self.generator))


def _cache_kwarg(model: Any) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def token_loop(model: Any, prompt_ids: Sequence[int], sampler: Sampler, max_tokens: int) -> Iterator[int]:
    """Yield up to ``max_tokens`` new token ids. The next forward runs only when the caller asks for
    the next token, so a caller that stops iterating stops the computation."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    key = _cache_kwarg(model)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)  # [1, T]
    for step in range(max_tokens):
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{key: cache})
            token = sampler(out.logits[0, -1])
        yield token
        ids = torch.tensor([[token]], dtype=torch.long)  # [1, 1]


class TextAssembler:
    """Turns generated token ids into text deltas. ``add`` returns (new text safe to send, stopped):
    trailing replacement characters (an incomplete UTF-8 sequence) and any tail that could begin a stop
    string are held back; when a stop string appears, text is cut before it and ``stopped`` is True."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def add(self, token: int) -> tuple[str, bool]:
        self.ids.append(token)
        text = self._decode()
        self.text = text
        if self.stop:
            start = max(0, self.sent - max(len(s) for s in self.stop))
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                cut = max(min(hits), self.sent)
                self.text = text[:cut]
                delta, self.sent = self.text[self.sent:], cut
                return delta, True
        safe = len(text) - self._held(text)
        if safe <= self.sent:
            return "", False
        delta, self.sent = text[self.sent:safe], safe
        return delta, False

    def _held(self, text: str) -> int:
        n = len(text) - len(text.rstrip("\ufffd"))
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    n = max(n, k)
                    break
        return n

    def flush(self) -> str:
        """The held-back rest, at the end of a generation that did not stop on a stop string."""
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta
