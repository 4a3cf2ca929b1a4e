"""The common shape of the queue schedulers: take the canonical queue (residents, then non-resident
experts by tokens desc), choose how much of it goes to the GPU, price the split with the shared rules."""

from __future__ import annotations

from typing import Collection, Mapping, Sequence

from hybrimoe_kt.core.cost import CostModel
from hybrimoe_kt.core.protocols import EMPTY_READY
from hybrimoe_kt.core.schedulers.costtable import CostTable, CostTableCache
from hybrimoe_kt.core.schedulers.makespan import canonical_queue, prefix_split
from hybrimoe_kt.core.types import LayerRouting, Split


class PrefixScheduler:
    """Subclasses choose ``cut``: how many residents stay on the GPU and how many misses are loaded."""

    name = "prefix"

    def __init__(self) -> None:
        self._tables = CostTableCache()

    def cut(self, res: Sequence[int], res_n: Sequence[int], unc: Sequence[int], unc_n: Sequence[int],
            table: CostTable, ready: Mapping[int, float], copy_free: float,
            gpu_free: float) -> tuple[int, int]:
        raise NotImplementedError

    def plan(self, routing: LayerRouting, resident: Collection[int], cost: CostModel,
             ready: Mapping[int, float] = EMPTY_READY, copy_free: float = 0.0,
             gpu_free: float = 0.0) -> Split:
        res, res_n, unc, unc_n = canonical_queue(routing, resident, ready)
        table = self._tables.get(cost)
        keep, n_loads = self.cut(res, res_n, unc, unc_n, table, ready, copy_free, gpu_free)
        return prefix_split(res, res_n, unc, unc_n, keep, n_loads, table, ready, copy_free, gpu_free)
