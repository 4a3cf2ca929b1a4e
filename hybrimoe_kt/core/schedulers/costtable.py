"""Per-cost-model memo of expert times for small token counts, for the schedulers' hot paths.

A decode layer asks for ``cpu_expert(1)`` and ``gpu_expert(1)`` a dozen times; a method call through the
``CostModel`` protocol costs far more than a list index in CPython. ``CostTable`` evaluates the model
once for token counts ``0..size-1`` and keeps the per-call constants. Cost models are treated as
immutable (``RooflineCost`` and ``ReleasedCost`` are frozen dataclasses): a table is reused while the
scheduler is given the very same cost object, and rebuilt when it gets another one.
"""

from __future__ import annotations

from hybrimoe_kt.core.cost import CostModel

DEFAULT_TABLE_SIZE = 65
"""Token counts 0..64 are tabulated: every decode step and most small-batch layers."""


class CostTable:
    """Tabulated ``cpu_expert``/``gpu_expert`` for ``n < size`` plus ``cpu_call``, ``gpu_call``, ``transfer``.

    Hot loops index ``cpu``/``gpu`` directly when ``n < size`` and fall back to ``cost`` otherwise;
    ``cpu_time``/``gpu_time`` do that for callers that are not hot.
    """

    __slots__ = ("cost", "size", "cpu", "gpu", "cpu_call", "gpu_call", "transfer")

    def __init__(self, cost: CostModel, size: int = DEFAULT_TABLE_SIZE) -> None:
        if size < 1:
            raise ValueError(f"cost table size must be >= 1, got {size}")
        self.cost = cost
        self.size = size
        self.cpu: list[float] = [cost.cpu_expert(n) for n in range(size)]
        self.gpu: list[float] = [cost.gpu_expert(n) for n in range(size)]
        self.cpu_call: float = cost.cpu_call
        self.gpu_call: float = cost.gpu_call
        self.transfer: float = cost.transfer()

    def cpu_time(self, n: int) -> float:
        return self.cpu[n] if n < self.size else self.cost.cpu_expert(n)

    def gpu_time(self, n: int) -> float:
        return self.gpu[n] if n < self.size else self.cost.gpu_expert(n)


class CostTableCache:
    """Holds the table of the last cost model one scheduler instance was given (per instance, not global)."""

    __slots__ = ("_table",)

    def __init__(self) -> None:
        self._table: CostTable | None = None

    def get(self, cost: CostModel) -> CostTable:
        t = self._table
        if t is None or t.cost is not cost:
            t = self._table = CostTable(cost)
        return t
