"""Oracle prefetch: perfect knowledge of the next layers' routing (a bound, not a real policy).

It copies exactly the experts that the next ``depth`` layer executions will activate and that are not
resident, in order of use, through the same bandwidth-limited copy queue as every other copy.
"""

from __future__ import annotations

from typing import Callable, Optional

from hybrimoe_kt.core.protocols import CacheView, Clock
from hybrimoe_kt.core.types import ExpertId, LayerRouting


class OraclePrefetch:
    name = "oracle"

    def __init__(self, future: Callable[[int], Optional[LayerRouting]], clock: Clock,
                 depth: int = 4) -> None:
        self.future = future
        self.clock = clock
        self.depth = depth

    def observe(self, routing: LayerRouting) -> None:
        pass

    def propose(self, layer: int, view: CacheView, budget_s: float) -> list[ExpertId]:
        per = view.cost.transfer()
        n_max = 1 << 30 if budget_s == float("inf") or per <= 0 else int(budget_s / per)  # free: no cap
        out: list[ExpertId] = []
        for d in range(1, self.depth + 1):
            if len(out) >= n_max:
                break
            r = self.future(self.clock.now + d)
            if r is None:
                break
            res = view.resident(r.layer)
            out.extend((r.layer, e) for e in r.experts if e not in res and (r.layer, e) not in out)
        return out[:n_max]

    def expected_uses(self, eid: ExpertId) -> float:
        """0: a clairvoyant eviction policy's score already counts this use (no double counting)."""
        return 0.0
