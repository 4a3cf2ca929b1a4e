"""LRU: evict the resident expert whose last use is the oldest.

A *use* is an activation (the expert appears in ``routing.experts`` when ``on_route`` sees the layer)
or an admission (``on_admit``: a transfer or an initial placement). Time is logical: without a clock,
an internal counter that ``on_route`` advances by one per call (so admissions made after a layer's
``on_route`` share that layer's time, and placements before any routing have time 0); with an
injected ``Clock``, ``clock.now`` (``forward_index * n_layers + layer``). Ties, e.g. experts activated
by the same layer, fall to the lowest ``(layer, expert)`` id. ``on_step`` and ``score_array`` are the
step cadence's form (``core.upkeep``): a whole decode step's experts touched at once (at the step's
time), the last-use times as the ``[L, E]`` eviction rank. Ranked by staleness, this is also the
least-stale rule.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from hybrimoe_kt.core.eviction._common import check_dims, check_eid, lowest, lowest_masked, step_layers
from hybrimoe_kt.core.protocols import Clock
from hybrimoe_kt.core.types import ExpertId, LayerRouting


class RecencyTracker:
    """Last-use times of every expert of the model, ``[n_layers, n_experts]``, -1 = never used."""

    __slots__ = ("n_layers", "n_experts", "clock", "tick", "last")

    def __init__(self, n_layers: int, n_experts: int, clock: Optional[Clock] = None) -> None:
        self.n_layers, self.n_experts = check_dims(n_layers, n_experts)
        self.clock = clock
        self.tick = 0
        self.last = np.full((self.n_layers, self.n_experts), -1, dtype=np.int64)  # [L, E]

    def now(self) -> int:
        return int(self.clock.now) if self.clock is not None else self.tick

    def advance(self) -> int:
        """Called once per ``on_route``; returns the time of that routing."""
        self.tick += 1
        return self.now()

    def touch_routing(self, routing: LayerRouting) -> int:
        t = self.advance()
        if routing.experts:
            check_eid((routing.layer, max(routing.experts)), self.n_layers, self.n_experts)
            check_eid((routing.layer, min(routing.experts)), self.n_layers, self.n_experts)
            self.last[routing.layer, list(routing.experts)] = t
        return t

    def touch(self, eid: ExpertId) -> None:
        layer, expert = check_eid(eid, self.n_layers, self.n_experts)
        self.last[layer, expert] = self.now()

    def last_use(self, eid: ExpertId) -> int:
        return int(self.last[eid[0], eid[1]])

    def touch_step(self, step) -> None:
        """Every expert that ran in a decode step (``core.upkeep.StepRouting``) used now."""
        ids = np.asarray(step.ran)
        layer = step_layers(ids, self.n_layers, self.n_experts)
        ok = ids >= 0
        self.last[layer[ok], ids[ok]] = self.advance()


class LRU:
    """Least recently used. ``score(eid)`` is the last-use time (-1 if never used)."""

    name = "lru"

    def __init__(self, n_layers: int, n_experts: int, clock: Optional[Clock] = None) -> None:
        self._rec = RecencyTracker(n_layers, n_experts, clock)

    @property
    def n_layers(self) -> int:
        return self._rec.n_layers

    @property
    def n_experts(self) -> int:
        return self._rec.n_experts

    def on_route(self, routing: LayerRouting) -> None:
        self._rec.touch_routing(routing)

    def on_admit(self, eid: ExpertId) -> None:
        self._rec.touch(eid)

    def on_evict(self, eid: ExpertId) -> None:
        """Nothing to forget: the last-use time of an evicted expert stays valid."""

    def victim(self, candidates: Sequence[ExpertId]) -> ExpertId:
        return lowest(candidates, lambda eid: (self._rec.last_use(eid),))

    def victim_masked(self, first: int, mask: np.ndarray) -> ExpertId:
        """``victim`` over the candidates ``mask`` [n, E] marks from layer ``first`` (see ExpertCache)."""
        return lowest_masked(first, mask, self._rec.last[first:first + mask.shape[0]])

    def score(self, eid: ExpertId) -> float:
        return float(self._rec.last_use(eid))

    def on_step(self, step) -> None:
        """A whole decode step at once (the step cadence): its experts' last use is now."""
        self._rec.touch_step(step)

    def score_array(self) -> np.ndarray:
        """[L, E] last-use times (a live view; lowest = stalest = evicted first)."""
        return self._rec.last
