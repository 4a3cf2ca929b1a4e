"""LFU: evict the resident expert that the fewest tokens have selected.

Frequency is the number of rows (tokens) that selected the expert, summed over every ``on_route``
(``routing.tokens``: a prefill chunk of N rows adds up to N). Counts are kept when an expert is evicted
and are never aged: they estimate how popular the expert is over the whole run, not while it was
resident, so a popular expert evicted by a burst does not start again from zero. Admission does not
count as a use for the frequency. Ties fall to the least recently used (same notion of time as LRU),
then to the lowest ``(layer, expert)`` id. ``on_step`` and ``score_array`` are the step cadence's form
(``core.upkeep``): each row of a decode step adds one to the experts it ran, and the counts are the
``[L, E]`` eviction rank.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from hybrimoe_kt.core.eviction._common import lowest, lowest_masked, step_layers
from hybrimoe_kt.core.eviction.lru import RecencyTracker
from hybrimoe_kt.core.protocols import Clock
from hybrimoe_kt.core.types import ExpertId, LayerRouting


class LFU:
    """Least frequently used. ``score(eid)`` is the accumulated token count."""

    name = "lfu"

    def __init__(self, n_layers: int, n_experts: int, clock: Optional[Clock] = None) -> None:
        self._rec = RecencyTracker(n_layers, n_experts, clock)
        self.counts = np.zeros((self._rec.n_layers, self._rec.n_experts), dtype=np.int64)  # [L, E]

    @property
    def n_layers(self) -> int:
        return self._rec.n_layers

    @property
    def n_experts(self) -> int:
        return self._rec.n_experts

    def on_route(self, routing: LayerRouting) -> None:
        self._rec.touch_routing(routing)  # validates the ids
        if routing.experts:
            np.add.at(self.counts[routing.layer], list(routing.experts), list(routing.tokens))

    def on_admit(self, eid: ExpertId) -> None:
        self._rec.touch(eid)

    def on_evict(self, eid: ExpertId) -> None:
        """Counts survive eviction (see the module docstring)."""

    def frequency(self, eid: ExpertId) -> int:
        return int(self.counts[eid[0], eid[1]])

    def victim(self, candidates: Sequence[ExpertId]) -> ExpertId:
        return lowest(candidates, lambda eid: (self.frequency(eid), self._rec.last_use(eid)))

    def victim_masked(self, first: int, mask: np.ndarray) -> ExpertId:
        """``victim`` over the candidates ``mask`` [n, E] marks from layer ``first`` (see ExpertCache)."""
        rows = slice(first, first + mask.shape[0])
        return lowest_masked(first, mask, self.counts[rows], self._rec.last[rows])

    def score(self, eid: ExpertId) -> float:
        return float(self.frequency(eid))

    def on_step(self, step) -> None:
        """A whole decode step at once (the step cadence): one count per row that ran an expert."""
        ids = np.asarray(step.ran)
        layer = step_layers(ids, self.n_layers, self.n_experts)
        ok = ids >= 0
        np.add.at(self.counts, (layer[ok], ids[ok]), 1)
        self._rec.touch_step(step)

    def score_array(self) -> np.ndarray:
        """[L, E] token counts (a live view; lowest = evicted first)."""
        return self.counts
