"""Intra-layer schedulers: split one layer's activated experts between the CPU and the GPU.

Every scheduler implements ``hybrimoe_kt.core.protocols.Scheduler`` and prices its answer with the
shared rules of ``makespan.py`` (the same rules the simulator executes).

- ``stock``: everything on the CPU (kTransformers' default).
- ``static``: residents on the GPU, the rest on the CPU, no transfers.
- ``offload``: everything on the GPU, misses transferred.
- ``hss``: the released HybriMoE greedy, token-aware.
- ``balanced``: the project's scheduler (strategy ``hybrimoe``), never worse than the four above.
- ``greedy``: a 0-1 assignment (list scheduling plus local moves and swaps) outside balanced's family,
  returning the better of its split and balanced's: never worse than balanced. No strategy uses it
  (an ablation: ``scripts/ablate_scheduler.py``).
"""

from __future__ import annotations

from typing import Literal, get_args

from hybrimoe_kt.core.protocols import Scheduler
from hybrimoe_kt.core.schedulers.balanced import BalancedScheduler
from hybrimoe_kt.core.schedulers.fixed import OffloadScheduler, StaticScheduler, StockScheduler
from hybrimoe_kt.core.schedulers.greedy import GreedyScheduler
from hybrimoe_kt.core.schedulers.hss import HssScheduler

SchedulerName = Literal["stock", "static", "offload", "hss", "balanced", "greedy"]

SCHEDULERS: dict[str, type] = {
    "stock": StockScheduler,
    "static": StaticScheduler,
    "offload": OffloadScheduler,
    "hss": HssScheduler,
    "balanced": BalancedScheduler,
    "greedy": GreedyScheduler,
}
assert set(SCHEDULERS) == set(get_args(SchedulerName)), "SCHEDULERS out of sync with SchedulerName"

STRATEGY_SCHEDULER: dict[str, SchedulerName] = {"hybrimoe": "balanced", "hybrimoe-paper": "hss"}
"""Scheduler used by strategies whose name is not a scheduler name."""


def make_scheduler(name: str) -> Scheduler:
    """A fresh scheduler by name (a ``SchedulerName``, or the strategy alias ``hybrimoe`` -> balanced)."""
    key = STRATEGY_SCHEDULER.get(name, name)
    try:
        cls = SCHEDULERS[key]
    except KeyError:
        known = ", ".join(list(SCHEDULERS) + list(STRATEGY_SCHEDULER))
        raise ValueError(f"unknown scheduler {name!r}; known: {known}") from None
    return cls()


__all__ = ["SCHEDULERS", "STRATEGY_SCHEDULER", "SchedulerName", "make_scheduler", "BalancedScheduler",
           "GreedyScheduler", "HssScheduler", "OffloadScheduler", "StaticScheduler", "StockScheduler"]
