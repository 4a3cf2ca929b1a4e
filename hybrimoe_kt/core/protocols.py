"""The policy interfaces. Each policy is a small class behind one of these Protocols.

Time is injected: policies that need a notion of "now" receive a ``Clock`` whose ``now`` is a logical
position (``forward_index * n_layers + layer``) advanced by the executor. Randomness is injected as a
seeded ``numpy.random.Generator``. Nothing here touches a tensor or a device.
"""

from __future__ import annotations

from typing import Collection, Mapping, Protocol, Sequence

from hybrimoe_kt.core.cost import CostModel
from hybrimoe_kt.core.types import ExpertId, LayerRouting, Split

EMPTY_READY: Mapping[int, float] = {}


class Clock:
    """Logical time shared by the executor and the policies: position = forward * n_layers + layer."""

    __slots__ = ("now",)

    def __init__(self, now: int = 0) -> None:
        self.now = now


class EvictionPolicy(Protocol):
    """Ranks resident experts. The ExpertCache owns capacity, pinning and counters.

    Hooks are called by the cache/executor: ``on_route`` for every layer of every forward (before the
    plan is executed), ``on_admit``/``on_evict`` when a slot changes owner. ``victim`` picks one of
    ``candidates`` (never empty; the cache has already removed experts in use, pinned or in flight).
    ``score`` orders experts by how much they are worth keeping (higher = keep), for admission rules
    and prefetchers.
    """

    name: str

    def on_route(self, routing: LayerRouting) -> None: ...
    def on_admit(self, eid: ExpertId) -> None: ...
    def on_evict(self, eid: ExpertId) -> None: ...
    def victim(self, candidates: Sequence[ExpertId]) -> ExpertId: ...
    def score(self, eid: ExpertId) -> float: ...


class Scheduler(Protocol):
    """Splits one layer's activated experts between the CPU and the GPU.

    ``resident``: experts of this layer with a GPU slot (including copies still in flight).
    ``ready``: for resident experts whose copy is still in flight, seconds from the layer start until
    it lands. ``copy_free``: seconds from the layer start until the copy queue can start a demand load.
    ``gpu_free``: seconds from the layer start until the GPU can start routed experts (shared experts
    run first). Must return every activated expert exactly once, in ``gpu`` or ``cpu``.
    """

    name: str

    def plan(self, routing: LayerRouting, resident: Collection[int], cost: CostModel,
             ready: Mapping[int, float] = EMPTY_READY, copy_free: float = 0.0,
             gpu_free: float = 0.0) -> Split: ...


class CacheView(Protocol):
    """What a prefetcher may look at: residency, policy scores, the cost model and the scheduler."""

    n_layers: int
    n_experts: int
    top_k: int
    cost: CostModel
    scheduler: Scheduler

    def resident(self, layer: int) -> Collection[int]: ...
    def score(self, eid: ExpertId) -> float: ...


class Prefetcher(Protocol):
    """Proposes background copies after layer ``layer`` has been planned, best first.

    ``budget_s`` is the copy-queue time the executor can spend without delaying demand loads; the
    proposal's transfers should fit in it. The executor admits them through the cache (which may evict).
    ``observe`` sees every layer's routing (after it ran), to learn predictions. ``expected_uses`` is
    how many activations the last proposal expects of ``eid`` at its target layer (0 when the
    prefetcher does not estimate it); admission rules may add it to the expert's value.
    """

    name: str

    def observe(self, routing: LayerRouting) -> None: ...
    def propose(self, layer: int, view: CacheView, budget_s: float) -> list[ExpertId]: ...
    def expected_uses(self, eid: ExpertId) -> float: ...
