"""One contract suite for every strategy, under a per-layer and a global pool.

A thin driver builds each strategy's policies like the simulator's runner does and replays a small
synthetic trace through ``sim.engine.replay`` on a ``CheckedCache``: an ExpertCache that checks the
cache invariants at every layer start and every slot change, and logs every eviction.

The engine evicts at two moments. Demand loads (``admit`` with the layer's in-use set) run while the
layer computes: their victims must never be an expert the layer uses. Background copies (``admit``
with an empty in-use set) are queued after both tiers finished the layer, so any resident whose copy
has landed may go; the in-flight rule still applies.
"""

from __future__ import annotations

from typing import Collection, Optional

import pytest

from hybrimoe_kt.core.cache import ExpertCache
from hybrimoe_kt.core.protocols import Clock
from hybrimoe_kt.core.strategies import (STRATEGIES, StrategySpec, build_policies, get_strategy, slots_for,
                                         with_overrides)
from hybrimoe_kt.core.types import ExpertId
from hybrimoe_kt.sim.engine import RunStats, replay
from hybrimoe_kt.sim.folds import make_folds
from hybrimoe_kt.traces.format import Trace
from hybrimoe_kt.traces.synthetic import synthetic_trace

MODEL = "deepseek-v2-lite"


class CheckedCache(ExpertCache):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.layer: Optional[int] = None
        self.layer_in_use: frozenset[ExpertId] = frozenset()
        self.demand = False
        self.now = 0.0
        self.evictions: list[tuple[int, int, ExpertId]] = []  # (layer start index, layer, victim)
        self.n_layer_starts = 0

    def check_capacity(self) -> None:
        sizes = [len(self.resident(l)) for l in range(self.n_layers)]
        assert sum(sizes) == len(self)
        if self.global_pool:
            assert len(self) <= self.capacity, (len(self), self.capacity)
        else:
            assert all(n <= q for n, q in zip(sizes, self.quotas)), (sizes, self.quotas)

    def account(self, layer: int, experts: Collection[int], now: float) -> tuple[int, int, int]:  # type: ignore[override]
        self.check_capacity()  # after the previous layer
        self.layer = layer
        self.layer_in_use = frozenset((layer, e) for e in experts)
        self.n_layer_starts += 1
        return super().account(layer, experts, now)

    def account_landed(self, layer: int, experts, t: float, now: float):  # type: ignore[override]
        """The step cadence's decode split: a layer start like ``account``."""
        self.check_capacity()
        self.layer = layer
        self.layer_in_use = frozenset((layer, e) for e in experts)
        self.n_layer_starts += 1
        return super().account_landed(layer, experts, t, now)

    def admit(self, eid: ExpertId, ready_at: float, in_use: Collection[ExpertId], now: float,
              victim: Optional[ExpertId] = None) -> Optional[ExpertId]:
        self.demand = bool(in_use)
        if self.demand:
            # the engine passes exactly the current layer's activated experts
            assert frozenset(in_use) == self.layer_in_use
            assert eid in self.layer_in_use
        assert ready_at >= now
        self.now = now
        out = super().admit(eid, ready_at, in_use, now, victim)
        assert eid in self
        self.check_capacity()
        return out

    def evict(self, eid: ExpertId) -> None:
        assert eid in self, f"victim {eid} is not resident"
        assert self.ready_at(eid) <= self.now, f"victim {eid} is still being copied"
        if self.demand:
            assert eid not in self.layer_in_use, f"evicted {eid}, in use by layer {self.layer}"
        assert self.layer is not None
        self.evictions.append((self.n_layer_starts, self.layer, eid))
        super().evict(eid)
        assert eid not in self


def small_trace() -> Trace:
    return synthetic_trace(MODEL, n_requests=2, prompt_len=12, decode_len=20, n_layers=3)


def drive(spec: StrategySpec, trace: Trace, ratio: float) -> tuple[RunStats, list[CheckedCache]]:
    """The runner's run_one with a CheckedCache; returns the totals and each fold's cache."""
    n_layers, n_experts, top_k = trace.n_layers, trace.n_experts, trace.top_k
    total = RunStats()
    caches = []
    for fold in make_folds(trace, prefill_chunk=8):
        clock = Clock()
        slots = slots_for(spec, n_layers, n_experts, ratio)
        pol = build_policies(spec, n_layers, n_experts, top_k, slots, clock, counts=fold.counts,
                             uses=fold.uses() if spec.clairvoyant else None,
                             future=fold.future if spec.clairvoyant else None)
        cache = CheckedCache(n_layers, n_experts, slots, pol.eviction, global_pool=spec.pool == "global")
        cache.place(pol.placement)
        cache.check_capacity()
        total.merge(replay(fold.steps, cost_model(), pol, cache, clock, top_k))
        cache.check_capacity()
        assert cache.n_layer_starts == len(fold.steps) * n_layers
        caches.append(cache)
    return total, caches


_COST = None


def cost_model():  # type: ignore[no-untyped-def]
    from hybrimoe_kt.core.cost import RooflineCost
    from hybrimoe_kt.core.hardware import load_profile
    from hybrimoe_kt.core.models import get_model

    global _COST
    if _COST is None:
        _COST = RooflineCost.build(load_profile("rtx4090-ddr5"), get_model(MODEL))
    return _COST


LAYERWISE = "kt-dynamic-update@8"  # kt-dynamic-update with a threshold the small trace's 8-row chunks reach


def spec_of(name: str, pool: str) -> StrategySpec:
    if name == LAYERWISE:
        return with_overrides(get_strategy("kt-dynamic-update"), layerwise_threshold=8, pool=pool)
    return with_overrides(get_strategy(name), pool=pool)


def variants() -> list[tuple[str, str]]:
    out = []
    for name, spec in STRATEGIES.items():
        pools = ["layer", "global"] if spec.uses_gpu_cache else [spec.pool]  # stock has no cache
        out += [(name, p) for p in pools]
    return out + [(LAYERWISE, "layer"), (LAYERWISE, "global")]


@pytest.fixture(scope="module")
def trace() -> Trace:
    return small_trace()


@pytest.mark.parametrize("ratio", [0.25, 0.5])
@pytest.mark.parametrize("name, pool", variants())
def test_strategy_contract(trace: Trace, name: str, pool: str, ratio: float) -> None:
    spec = spec_of(name, pool)
    stats, caches = drive(spec, trace, ratio)
    if name == LAYERWISE:
        assert stats.prefill_layers_layerwise > 0, "the layer-wise variant never ran a layer on the GPU"
    # determinism: a second run makes the same decisions and the same totals
    stats2, caches2 = drive(spec, trace, ratio)
    assert [c.evictions for c in caches] == [c.evictions for c in caches2]
    assert stats == stats2
    # accounting is consistent with the cache's own counters
    assert stats.hits + stats.late_hits == sum(c.counters.hits + c.counters.late_hits for c in caches)
    assert stats.misses == sum(c.counters.misses for c in caches)
    assert stats.gpu_experts + stats.cpu_experts == stats.hits + stats.late_hits + stats.misses
    n_evicted = sum(len(c.evictions) for c in caches)
    assert n_evicted == sum(c.counters.evictions for c in caches)
    if not spec.uses_gpu_cache:
        assert all(len(c) == 0 for c in caches) and stats.hits == 0 and n_evicted == 0
    elif spec.scheduler == "static" and not spec.admit_misses and spec.prefetch == "none":
        if spec.layerwise_threshold and stats.prefill_layers_layerwise:
            # layer-wise prefill calls copy whole layers and re-place from the batch, nothing else
            assert stats.layerwise_copies == stats.prefill_layers_layerwise * trace.n_experts
            assert stats.bytes_copied == stats.layerwise_copies * cost_model().expert_bytes_gpu
            assert stats.replaced == n_evicted > 0 and stats.demand_loads == stats.background_copies == 0
        else:
            assert n_evicted == 0 and stats.bytes_copied == 0  # a static cache never changes
    else:
        assert n_evicted > 0, "the cache is small enough that this strategy has to evict"


def test_contract_catches_an_in_use_eviction(trace: Trace) -> None:
    """The checks have teeth: evicting an expert the current layer uses fails the suite."""
    spec = get_strategy("lru-offload")
    slots = slots_for(spec, trace.n_layers, trace.n_experts, 0.25)
    pol = build_policies(spec, trace.n_layers, trace.n_experts, trace.top_k, slots, Clock())
    cache = CheckedCache(trace.n_layers, trace.n_experts, slots, pol.eviction)
    cache.place([(0, 0), (0, 1)])
    cache.account(0, [0], 0.0)
    cache.demand = True
    with pytest.raises(AssertionError, match="in use"):
        cache.evict((0, 0))


def test_get_strategy_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError) as err:
        get_strategy("no-such-strategy")
    msg = str(err.value)
    assert "no-such-strategy" in msg
    for name in STRATEGIES:
        assert name in msg
    assert get_strategy("hybrimoe") is STRATEGIES["hybrimoe"]


def test_with_overrides() -> None:
    base = get_strategy("hybrimoe-layer")
    with pytest.raises(ValueError, match="hybrimoe"):
        with_overrides(base, no_such_field=1)
    changed = with_overrides(base, prefetch_depth=3, pool="global")
    assert (changed.prefetch_depth, changed.pool, changed.name) == (3, "global", "hybrimoe-layer")
    assert base.prefetch_depth == 2 and base.pool == "layer"  # the registry's spec is untouched
    with pytest.raises(ValueError, match="prefetch_depth"):
        with_overrides(base, prefetch_depth=0)


def test_slots_for_pools_and_bounds() -> None:
    layer_pool = with_overrides(get_strategy("lru-offload"), pool="layer")
    global_pool = with_overrides(get_strategy("lru-offload"), pool="global")
    assert slots_for(layer_pool, 4, 64, 0.25) == 16           # per layer
    assert slots_for(global_pool, 4, 64, 0.25) == 64          # 16 per layer, 4 layers, in total
    assert slots_for(layer_pool, 4, 64, 0.0) == 0
    assert slots_for(layer_pool, 4, 64, 1.0) == 64
    assert slots_for(global_pool, 4, 64, 1.0) == 256
    assert slots_for(layer_pool, 2, 8, 0.1) == 1              # rounded to the nearest slot
    assert slots_for(get_strategy("stock"), 4, 64, 0.5) == 0  # stock uses no GPU cache
    assert slots_for(get_strategy("static-frequency"), 4, 64, 0.5) == 128  # a global pool
    for bad in (-0.01, 1.01, 1.5):
        with pytest.raises(ValueError, match="cache ratio"):
            slots_for(layer_pool, 4, 64, bad)
