"""ExpertCache unit tests: slots, quotas, global pool, pinning, in-flight copies, counters, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hybrimoe_kt.core.cache import CacheFull, ExpertCache
from hybrimoe_kt.core.eviction import LRU
from hybrimoe_kt.core.types import LayerRouting


def lru_cache(n_layers: int = 2, n_experts: int = 4, capacity=2, **kw) -> ExpertCache:
    return ExpertCache(n_layers, n_experts, capacity, LRU(n_layers, n_experts), **kw)


def test_admit_until_full_then_evict_lru() -> None:
    c = lru_cache()
    assert c.has_room(0)
    assert c.admit((0, 1), 0.0, set(), 0.0) is None
    assert c.admit((0, 2), 0.0, set(), 0.0) is None
    assert not c.has_room(0) and c.has_room(1)
    assert c.choose_victim(0, set(), 0.0) == (0, 1)  # same time, lowest id
    assert c.admit((0, 3), 0.0, set(), 0.0) == (0, 1)
    assert set(c.resident(0)) == {2, 3} and len(c) == 2
    assert (c.counters.admissions, c.counters.evictions) == (3, 1)


def test_admit_twice_and_evict_absent_raise() -> None:
    c = lru_cache()
    c.admit((0, 1), 0.0, set(), 0.0)
    with pytest.raises(ValueError, match="already resident"):
        c.admit((0, 1), 0.0, set(), 0.0)
    with pytest.raises(ValueError, match="not resident"):
        c.evict((0, 2))


@pytest.mark.parametrize("eid", [(0, 4), (2, 0), (-1, 0)])
def test_out_of_range_ids_raise(eid) -> None:
    c = lru_cache()
    for op in (lambda: c.admit(eid, 0.0, set(), 0.0), lambda: c.place([eid]), lambda: c.pin(eid),
               lambda: c.evict(eid)):
        with pytest.raises(ValueError, match="out of range"):
            op()


def test_place_is_free_and_idempotent() -> None:
    c = lru_cache()
    c.place([(0, 0), (0, 1), (0, 1), (1, 3)])
    assert len(c) == 3 and c.counters.admissions == 0
    assert c.ready_at((0, 0)) == -math.inf
    with pytest.raises(ValueError, match="exceeds the capacity at layer 0"):
        c.place([(0, 2)])


def test_in_use_experts_are_not_candidates_and_cache_full() -> None:
    c = lru_cache()
    c.place([(0, 0), (0, 1)])
    assert c.candidates(0, {(0, 0)}, 0.0) == [(0, 1)]
    assert c.admit((0, 2), 0.0, {(0, 0), (0, 2)}, 0.0) == (0, 1)
    with pytest.raises(CacheFull, match="layer 0"):
        c.admit((0, 3), 0.0, {(0, 0), (0, 2), (0, 3)}, 0.0)
    assert set(c.resident(0)) == {0, 2}, "a failed admit changes nothing"


def test_pinned_experts_stay() -> None:
    c = lru_cache()
    c.place([(0, 0), (0, 1)])
    c.pin((0, 0))
    assert c.candidates(0, set(), 0.0) == [(0, 1)]
    with pytest.raises(ValueError, match="pinned"):
        c.evict((0, 0))
    c.pin((0, 1))
    with pytest.raises(CacheFull):
        c.admit((0, 2), 0.0, set(), 0.0)
    c.unpin((0, 1))
    assert c.admit((0, 2), 0.0, set(), 0.0) == (0, 1)
    with pytest.raises(ValueError, match="not resident"):
        c.pin((0, 3))


def test_in_flight_copies_are_protected_and_counted_as_late_hits() -> None:
    c = lru_cache(capacity=1)
    c.admit((0, 1), 5.0, set(), 1.0)  # copy lands at t=5
    assert c.in_flight(0, 1.0) == {1: 4.0}
    assert c.in_flight(0, 5.0) == {}
    assert c.candidates(0, set(), 4.0) == []
    with pytest.raises(CacheFull):
        c.admit((0, 2), 6.0, set(), 4.0)
    assert c.account(0, [1, 2], 4.0) == (0, 1, 1)  # late hit, miss
    assert c.account(0, [1], 5.0) == (1, 0, 0)  # landed: hit
    assert c.admit((0, 2), 6.0, set(), 5.0) == (0, 1)
    k = c.counters
    assert (k.hits, k.late_hits, k.misses, k.accesses) == (1, 1, 1, 3)
    assert k.hit_rate == pytest.approx(2 / 3)


def test_global_pool_spans_layers() -> None:
    c = lru_cache(n_layers=3, n_experts=4, capacity=3, global_pool=True)
    c.admit((0, 0), 0.0, set(), 0.0)
    c.policy.on_route(LayerRouting.from_topk(1, np.array([[1]])))  # LRU time 1 for (1, 1)
    c.admit((1, 1), 0.0, set(), 0.0)
    c.admit((2, 2), 0.0, set(), 0.0)
    assert not c.has_room(0) and not c.has_room(2)
    # any layer's resident may be evicted for layer 2; LRU picks (0, 0) (time 0 < 1)
    assert set(c.candidates(2, set(), 0.0)) == {(0, 0), (1, 1), (2, 2)}
    assert c.admit((2, 3), 0.0, {(2, 3)}, 0.0) == (0, 0)
    assert len(c) == 3 and c.capacity == 3


def test_per_layer_quotas_may_differ() -> None:
    c = lru_cache(n_layers=3, n_experts=4, capacity=[0, 1, 4])
    assert c.capacity == 5 and c.quotas == [0, 1, 4]
    with pytest.raises(CacheFull):
        c.admit((0, 0), 0.0, set(), 0.0)
    c.place([(2, 0), (2, 1), (2, 2), (2, 3), (1, 0)])
    assert len(c) == 5


def test_numpy_integer_capacities_are_accepted() -> None:
    assert lru_cache(capacity=np.int64(2)).quotas == [2, 2]
    assert lru_cache(capacity=np.array([1, 3])).quotas == [1, 3]
    assert lru_cache(capacity=np.int32(5), global_pool=True).capacity == 5


@pytest.mark.parametrize("args, kw, match", [
    ((0, 4, 1), {}, "n_layers >= 1"),
    ((2, 0, 1), {}, "n_experts >= 1"),
    ((2, 4, 5), {}, "quotas"),
    ((2, 4, -1), {}, "quotas"),
    ((2, 4, [1, 2, 3]), {}, "2 ints"),
    ((2, 4, 1.5), {}, "quotas"),
    ((2, 4, [1, 2.5]), {}, "quotas"),
    ((2, 4, 9), {"global_pool": True}, "global pool capacity"),
    ((2, 4, [1, 1]), {"global_pool": True}, "global pool capacity"),
])
def test_bad_constructor_args(args, kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        ExpertCache(*args, LRU(1, 1), **kw)


class RogueVictim(LRU):
    """A broken policy that names a non-candidate: the cache must refuse it."""

    name = "rogue"

    def victim(self, candidates):
        return (0, 3)


def test_cache_rejects_a_victim_outside_the_candidates() -> None:
    c = ExpertCache(1, 4, 1, RogueVictim(1, 4))
    c.place([(0, 0)])
    with pytest.raises(RuntimeError, match="not a candidate"):
        c.admit((0, 1), 0.0, set(), 0.0)
