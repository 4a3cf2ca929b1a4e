"""Fixed-placement schedulers: the baselines whose split does not depend on the cost model.

- ``stock``: every routed expert on the CPU (kTransformers' default placement).
- ``static``: resident experts on the GPU, the rest on the CPU; never transfers (a static GPU cache).
- ``offload``: every routed expert on the GPU, misses transferred first (MoE-offloading style).

All three emit the canonical GPU order (residents by ready time then tokens desc, then loads in copy
order, loads by tokens desc) and price the split with the shared evaluator in ``makespan.py``.
"""

from __future__ import annotations

from typing import Collection, Mapping

from hybrimoe_kt.core.cost import CostModel
from hybrimoe_kt.core.protocols import EMPTY_READY
from hybrimoe_kt.core.schedulers.costtable import CostTableCache
from hybrimoe_kt.core.schedulers.makespan import ends_from_times
from hybrimoe_kt.core.schedulers.prefix import PrefixScheduler
from hybrimoe_kt.core.types import LayerRouting, Split


class StockScheduler:
    """All routed experts on the CPU, in routing order (tokens desc); nothing on the GPU."""

    name = "stock"

    def __init__(self) -> None:
        self._tables = CostTableCache()

    def plan(self, routing: LayerRouting, resident: Collection[int], cost: CostModel,
             ready: Mapping[int, float] = EMPTY_READY, copy_free: float = 0.0,
             gpu_free: float = 0.0) -> Split:
        experts = routing.experts
        if not experts:
            return Split((), (), (), 0.0)
        t = self._tables.get(cost)
        # all on the CPU: the shared rules reduce to the CPU end
        cpu_end, _ = ends_from_times((), (), [t.cpu_time(n) for n in routing.tokens], t.cpu_call, t.gpu_call)
        return Split((), experts, (), cpu_end)


class StaticScheduler(PrefixScheduler):
    """Resident experts on the GPU (late hits wait for their copy), the others on the CPU."""

    name = "static"

    def cut(self, res, res_n, unc, unc_n, table, ready, copy_free, gpu_free):  # type: ignore[no-untyped-def]
        return len(res), 0


class OffloadScheduler(PrefixScheduler):
    """Every activated expert on the GPU; non-resident ones are loaded in tokens-desc order."""

    name = "offload"

    def cut(self, res, res_n, unc, unc_n, table, ready, copy_free, gpu_free):  # type: ignore[no-untyped-def]
        return len(res), len(unc)
