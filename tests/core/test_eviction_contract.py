"""One contract suite for every eviction policy, driving an ExpertCache with random routings.

Each policy runs under per-layer quotas (equal and mixed) and under one global pool. The driver plays
an executor: per layer it advances the clock, calls ``on_route``, accounts hits, admits misses (with
copies that may still be in flight), prefetches an expert of the next layer, and pins/unpins residents
at random. After every change it checks the cache invariants; two identical runs must give identical
event logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybrimoe_kt.core.cache import CacheFull, ExpertCache
from hybrimoe_kt.core.eviction import (
    EVICTION_POLICIES,
    LFU,
    LRU,
    MRS,
    Belady,
    NextUse,
    ReuseRate,
    StaticPlacement,
    belady_uses_from_routings,
    place_frequency,
    place_per_layer_quota,
)
from hybrimoe_kt.core.protocols import Clock
from hybrimoe_kt.core.types import ExpertId, LayerRouting

Forward = list[LayerRouting]  # one routing per layer


def random_routings(seed: int, n_layers: int, n_experts: int, top_k: int, n_forwards: int,
                    prefill_rows: int, max_decode_rows: int = 2) -> list[Forward]:
    """Forward 0 is a prefill chunk of ``prefill_rows`` rows; later forwards decode 1..max_decode_rows rows.

    Each row lists ``min(2k, E)`` distinct experts drawn from a skewed per-layer distribution, with
    descending scores; the first ``top_k`` columns run.
    """
    rng = np.random.default_rng(seed)
    cols = min(2 * top_k, n_experts)
    probs = [rng.dirichlet(np.full(n_experts, 0.5)) * 0.9 + 0.1 / n_experts for _ in range(n_layers)]
    out: list[Forward] = []
    for f in range(n_forwards):
        rows = prefill_rows if f == 0 else int(rng.integers(1, max_decode_rows + 1))
        fwd = []
        for layer in range(n_layers):
            ids = np.stack([rng.choice(n_experts, cols, replace=False, p=probs[layer]) for _ in range(rows)])
            scores = -np.sort(-rng.dirichlet(np.ones(cols), size=rows), axis=1)
            fwd.append(LayerRouting.from_topk(layer, ids, scores, is_prefill=f == 0, top_k=top_k))
        out.append(fwd)
    return out


@dataclass
class Setup:
    n_layers: int
    n_experts: int
    top_k: int
    routings: list[Forward]
    calibration: list[Forward]
    capacity: object  # int (global pool or equal quotas) or list of per-layer quotas
    global_pool: bool
    clock: Clock = field(default_factory=Clock)

    def layer_calls(self, policy: Any) -> Iterator[tuple[int, Any]]:
        """``(forward index, routing)`` in replay order, with the clock at the call's position and
        ``policy`` fed the routing first, as the engine does."""
        for f, fwd in enumerate(self.routings):
            for r in fwd:
                self.clock.now = f * self.n_layers + r.layer
                policy.on_route(r)
                yield f, r


def calibration_counts(s: Setup) -> np.ndarray:
    counts = np.zeros((s.n_layers, s.n_experts))  # [L, E], from a separate split
    for fwd in s.calibration:
        for r in fwd:
            counts[r.layer, list(r.experts)] += r.tokens
    return counts


def make_static(s: Setup) -> tuple[StaticPlacement, list[ExpertId]]:
    counts = calibration_counts(s)
    placement = (place_frequency(counts, s.capacity) if s.global_pool
                 else place_per_layer_quota(counts, s.capacity))
    return StaticPlacement(placement, counts, n_layers=s.n_layers, n_experts=s.n_experts), placement


def make_belady(s: Setup) -> tuple[Belady, list[ExpertId]]:
    records = [(f * s.n_layers + r.layer, r.layer, r.experts) for f, fwd in enumerate(s.routings) for r in fwd]
    return Belady(belady_uses_from_routings(records), s.clock, s.n_layers, s.n_experts), []


FACTORIES: dict[str, Callable[[Setup], tuple[object, list[ExpertId]]]] = {
    "lru": lambda s: (LRU(s.n_layers, s.n_experts), []),
    "lru-clock": lambda s: (LRU(s.n_layers, s.n_experts, clock=s.clock), []),
    "lfu": lambda s: (LFU(s.n_layers, s.n_experts), []),
    "lfu-clock": lambda s: (LFU(s.n_layers, s.n_experts, clock=s.clock), []),
    "mrs": lambda s: (MRS(s.n_layers, s.n_experts, top_k=s.top_k), []),
    "mrs-a0.9-p1": lambda s: (MRS(s.n_layers, s.n_experts, top_k=s.top_k, alpha=0.9, p=1), []),
    "static": make_static,
    "belady": make_belady,
    "reuse": lambda s: (ReuseRate(s.n_layers, s.n_experts), []),
    "reuse-hl2": lambda s: (ReuseRate(s.n_layers, s.n_experts, half_life=2.0), []),
    "nextuse": lambda s: (NextUse(s.n_layers, s.n_experts, s.top_k), []),
    "nextuse-b1": lambda s: (NextUse(s.n_layers, s.n_experts, s.top_k, beta=1.0), []),
}


def test_every_registered_policy_is_in_the_contract_suite() -> None:
    assert {name.split("-")[0] for name in FACTORIES} == set(EVICTION_POLICIES)


def check_invariants(cache: ExpertCache) -> None:
    per_layer = [len(cache.resident(layer)) for layer in range(cache.n_layers)]
    assert sum(per_layer) == len(cache) <= cache.capacity
    if not cache.global_pool:
        assert all(n <= q for n, q in zip(per_layer, cache.quotas))


def admit_checked(cache: ExpertCache, eid: ExpertId, ready_at: float, in_use: set[ExpertId], now: float,
                  pinned: set[ExpertId], log: list) -> None:
    """Admit through the cache and check the victim against a snapshot taken before."""
    before = {(l, e): cache.ready_at((l, e)) for l in range(cache.n_layers) for e in cache.resident(l)}
    try:
        victim = cache.admit(eid, ready_at, in_use, now)
    except CacheFull:
        log.append(("full", eid))
        return
    if victim is not None:
        assert victim in before, "victim was not resident"
        assert victim not in in_use, "evicted an expert in use by the current forward"
        assert victim not in pinned, "evicted a pinned expert"
        assert before[victim] <= now, "evicted a copy still in flight"
        assert victim not in cache
    assert eid in cache and cache.ready_at(eid) == ready_at
    log.append(("admit", eid, victim))
    check_invariants(cache)


def drive(name: str, s: Setup, seed: int) -> tuple[list, ExpertCache, int]:
    """Run one policy over the setup; returns (event log, cache, number of activations)."""
    s.clock.now = 0
    policy, placement = FACTORIES[name](s)
    cache = ExpertCache(s.n_layers, s.n_experts, s.capacity, policy, global_pool=s.global_pool)
    cache.place(placement)
    check_invariants(cache)
    rng = np.random.default_rng(seed)
    pinned: set[ExpertId] = set()
    log: list = [("placed", len(cache))]
    activations = 0
    for f, r in s.layer_calls(policy):
        layer = r.layer
        now = float(s.clock.now)
        in_use = {(layer, e) for e in r.experts}
        activations += len(r.experts)
        log.append(("account", layer, cache.account(layer, r.experts, now)))
        if pinned and rng.random() < 0.3:  # unpin one, in id order
            eid = sorted(pinned)[int(rng.integers(len(pinned)))]
            cache.unpin(eid)
            pinned.discard(eid)
        residents = sorted((l, e) for l in range(s.n_layers) for e in cache.resident(l))
        if residents and len(pinned) < 2 and rng.random() < 0.3:
            eid = residents[int(rng.integers(len(residents)))]
            cache.pin(eid)
            pinned.add(eid)
        for e in r.experts:  # demand loads; the copy may land a little later
            if (layer, e) not in cache:
                delay = float(rng.choice([0.0, 0.5, 2.5]))
                admit_checked(cache, (layer, e), now + delay, in_use, now, pinned, log)
        nxt = (layer + 1) % s.n_layers  # a prefetch for the next layer, landing later
        e = int(rng.integers(s.n_experts))
        if (nxt, e) not in cache and rng.random() < 0.5:
            admit_checked(cache, (nxt, e), now + 1.5, in_use, now, pinned, log)
    return log, cache, activations


def make_setup(seed: int, n_layers: int, n_experts: int, top_k: int, n_forwards: int, prefill_rows: int,
               layout: str, fill: float) -> Setup:
    rng = np.random.default_rng(seed + 1)
    if layout == "global":
        capacity: object = int(round(fill * n_layers * n_experts))
    elif layout == "quota":
        capacity = int(round(fill * n_experts))
    else:  # mixed per-layer quotas
        capacity = [int(q) for q in rng.integers(0, n_experts + 1, size=n_layers)]
    return Setup(n_layers, n_experts, top_k,
                 random_routings(seed, n_layers, n_experts, top_k, n_forwards, prefill_rows),
                 random_routings(seed + 7919, n_layers, n_experts, top_k, 6, 4),
                 capacity, layout == "global")


LAYOUTS = ["quota", "mixed", "global"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_contract_fixed_trace(name: str, layout: str) -> None:
    s = make_setup(3, n_layers=3, n_experts=8, top_k=2, n_forwards=40, prefill_rows=6, layout=layout, fill=0.5)
    log1, cache1, acts = drive(name, s, seed=11)
    c = cache1.counters
    assert c.hits + c.late_hits + c.misses == acts
    assert log1[0][0] == "placed"
    assert len(cache1) == log1[0][1] + c.admissions - c.evictions, "size accounting drifted"
    log2, cache2, _ = drive(name, s, seed=11)
    assert log1 == log2, "two identical runs must evict identically"
    assert cache1.counters == cache2.counters


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    n_layers=st.integers(1, 3),
    n_experts=st.integers(2, 8),
    top_k=st.integers(1, 3),
    n_forwards=st.integers(1, 12),
    prefill_rows=st.integers(1, 6),
    fill=st.floats(0.0, 1.0, allow_subnormal=False),  # order-proof: a loaded kt-kernel sets flush-to-zero
)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_contract_random(name: str, layout: str, seed: int, n_layers: int, n_experts: int, top_k: int,
                         n_forwards: int, prefill_rows: int, fill: float) -> None:
    top_k = min(top_k, n_experts)
    s = make_setup(seed, n_layers, n_experts, top_k, n_forwards, prefill_rows, layout, fill)
    log1, cache, acts = drive(name, s, seed)
    c = cache.counters
    assert c.hits + c.late_hits + c.misses == acts
    log2, _, _ = drive(name, s, seed)
    assert log1 == log2


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_victim_is_a_candidate_and_order_independent(name: str) -> None:
    s = make_setup(5, n_layers=2, n_experts=6, top_k=2, n_forwards=8, prefill_rows=3, layout="global", fill=0.5)
    policy, _ = FACTORIES[name](s)
    for f, r in s.layer_calls(policy):
        cands = [(l, e) for l in range(s.n_layers) for e in range(s.n_experts) if (l + e + f) % 3]
        v = policy.victim(cands)
        assert v in cands
        assert policy.victim(list(reversed(cands))) == v, "ties must not depend on candidate order"
        assert isinstance(policy.score(v), float)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), n_experts=st.integers(2, 6), quota=st.integers(1, 5),
       n_forwards=st.integers(1, 30))
def test_belady_is_optimal_for_single_expert_decode(seed: int, n_experts: int, quota: int,
                                                     n_forwards: int) -> None:
    """With top-1 decode and copies that land at once this is classic paging: Belady misses least."""
    quota = min(quota, n_experts)
    s = Setup(2, n_experts, 1, random_routings(seed, 2, n_experts, 1, n_forwards, 1, max_decode_rows=1),
              random_routings(seed + 1, 2, n_experts, 1, 4, 2), quota, False)
    misses = {}
    for name in ("belady", "lru", "lfu", "mrs", "static", "reuse"):
        s.clock.now = 0
        policy, placement = FACTORIES[name](s)
        cache = ExpertCache(2, n_experts, quota, policy)
        for _, r in s.layer_calls(policy):
            cache.account(r.layer, r.experts, 0.0)
            for e in r.experts:
                if (r.layer, e) not in cache:
                    cache.admit((r.layer, e), 0.0, {(r.layer, x) for x in r.experts}, 0.0)
        misses[name] = cache.counters.misses
    assert misses["belady"] == min(misses.values()), misses
