"""Impact-driven prefetch (the HybriMoE paper's intent): copy the experts whose residency would
shorten the coming layers the most, as estimated with the scheduler itself.

For each of the next ``depth`` layers the predictor gives expected activations p[e]. The predicted
routing is the top_k most likely experts (one token each in decode; ``rows * p`` tokens in prefill).
A candidate's impact is p[e] * (makespan without it resident - makespan with it resident), both from
the strategy's scheduler and cost model, discounted by ``discount ** (distance - 1)``. The best
candidates with positive impact are proposed while the copy budget lasts.
"""

from __future__ import annotations

import numpy as np

from hybrimoe_kt.core.prefetch.predictor import RoutingPredictor
from hybrimoe_kt.core.protocols import CacheView
from hybrimoe_kt.core.types import ExpertId, LayerRouting

_NO_IDS = np.zeros((0, 0), dtype=np.int32)
_NO_SCORES = np.zeros((0, 0), dtype=np.float32)


class ImpactPrefetch:
    name = "impact"

    def __init__(self, predictor: RoutingPredictor, depth: int = 2, discount: float = 0.7) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.predictor = predictor
        self.depth = depth
        self.discount = discount
        self._rows = 1
        self._expected: dict[ExpertId, float] = {}

    def observe(self, routing: LayerRouting) -> None:
        self.predictor.observe(routing)
        self._rows = routing.n_rows

    def propose(self, layer: int, view: CacheView, budget_s: float) -> list[ExpertId]:
        n_max = int(budget_s / view.cost.transfer())
        self._expected = {}
        if n_max <= 0:
            return []
        k = view.top_k
        scored: list[tuple[float, ExpertId]] = []
        rows = self._rows
        for d in range(1, self.depth + 1):
            target = (layer + d) % view.n_layers
            p = self.predictor.predict(target)
            order = np.argsort(-p, kind="stable")[:k]
            predicted = [int(e) for e in order if p[e] > 0]
            if not predicted:
                continue
            probs = [float(p[e]) for e in predicted]
            if rows == 1:
                tokens: tuple[int, ...] = (1,) * len(predicted)
            else:
                tokens = tuple(max(1, int(round(rows * min(1.0, q)))) for q in probs)
            routing = LayerRouting(target, tuple(predicted), tokens, rows, rows > 1, _NO_IDS, _NO_SCORES)
            resident = set(view.resident(target))
            base = view.scheduler.plan(routing, resident, view.cost).makespan_s
            weight = self.discount ** (d - 1)
            gain_by_tokens: dict[int, float] = {}  # the gain depends only on the expert's token count
            for e, q, n in zip(predicted, probs, tokens):
                if e in resident:
                    continue
                gain = gain_by_tokens.get(n)
                if gain is None:
                    resident.add(e)
                    gain = base - view.scheduler.plan(routing, resident, view.cost).makespan_s
                    resident.discard(e)
                    gain_by_tokens[n] = gain
                impact = weight * q * gain
                if impact > 0:
                    scored.append((impact, (target, e)))
                    self._expected[(target, e)] = min(1.0, q)
        scored.sort(key=lambda x: (-x[0], x[1]))
        return [eid for _, eid in scored[:n_max]]

    def expected_uses(self, eid: ExpertId) -> float:
        """The predicted activation probability of ``eid`` at its target layer (last proposal)."""
        return self._expected.get(eid, 0.0)
