"""The next-token sampler: argmax at temperature 0, else a draw from softmax(logits / temperature)
restricted to the top-p nucleus, reproducible for a given seed (its own generator per request)."""

from __future__ import annotations

import os
from typing import Optional

import torch

SEED_RANGE = (-(2**63), 2**64 - 1)
"""What ``torch.Generator.manual_seed`` accepts."""


class Sampler:
    """Picks the next token id from a logits row ``[V]``. ``seed`` None draws a random seed."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: Optional[int] = None) -> None:
        if not 0.0 <= temperature or not 0.0 < top_p <= 1.0:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
        if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
            raise ValueError(f"seed must be in [-2^63, 2^64 - 1], got {seed}")
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.greedy = self.temperature == 0.0
        self.generator: Optional[torch.Generator] = None
        if not self.greedy:
            self.generator = torch.Generator()
            self.generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)

    def __call__(self, logits: torch.Tensor) -> int:
        if self.greedy:
            return int(logits.argmax())
        probs = torch.softmax(logits.float().cpu() / self.temperature, dim=-1)  # [V]
        if self.top_p < 1.0:
            p_sorted, order = probs.sort(descending=True)
            before = p_sorted.cumsum(0) - p_sorted  # mass of strictly more likely tokens: keeps the top one
            p_sorted = torch.where(before < self.top_p, p_sorted, torch.zeros_like(p_sorted))
            probs = torch.zeros_like(probs).scatter_(0, order, p_sorted)
        return int(torch.multinomial(probs / probs.sum(), 1, generator=self.generator))
