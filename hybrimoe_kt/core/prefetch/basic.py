"""Simple prefetchers: none, and the released HybriMoE's ``next-score`` (top cache scores of layer l+1)."""

from __future__ import annotations

from hybrimoe_kt.core.protocols import CacheView
from hybrimoe_kt.core.types import ExpertId, LayerRouting


class NoPrefetch:
    name = "none"

    def observe(self, routing: LayerRouting) -> None:
        pass

    def propose(self, layer: int, view: CacheView, budget_s: float) -> list[ExpertId]:
        return []

    def expected_uses(self, eid: ExpertId) -> float:
        return 0.0


class NextScorePrefetch:
    """The released code's prefetch: the top experts of layer l+1 by cache score, if not resident.

    ``size`` candidates are considered (the release's ``prefetch_size``); the budget caps how many go.
    """

    name = "next-score"

    def __init__(self, size: int = 2) -> None:
        if size < 0:
            raise ValueError(f"prefetch size must be >= 0, got {size}")
        self.size = size

    def observe(self, routing: LayerRouting) -> None:
        pass

    def propose(self, layer: int, view: CacheView, budget_s: float) -> list[ExpertId]:
        nxt = (layer + 1) % view.n_layers
        n = min(self.size, int(budget_s / view.cost.transfer()))
        if n <= 0:
            return []
        ranked = sorted(range(view.n_experts), key=lambda e: (-view.score((nxt, e)), e))[:self.size]
        res = view.resident(nxt)
        return [(nxt, e) for e in ranked if e not in res][:n]

    def expected_uses(self, eid: ExpertId) -> float:
        """The released prefetch ranks by cache score and estimates no probability."""
        return 0.0
