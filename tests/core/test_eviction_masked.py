"""The vectorised victim search (``ExpertCache.candidate_mask`` + ``victim_masked``) must give exactly the
answer of ``victim`` over the candidate list, for every policy, layout, pin and in-flight state.

The driver of the contract suite runs each policy twice: once through the cache's masked path and once
with the hook disabled (the list path); both event logs must be identical. At every layer it also asks
both searches directly, for every layer of the model, with the current layer's experts in use.
"""

from __future__ import annotations

import numpy as np
import pytest

from hybrimoe_kt.core.cache import CacheFull, ExpertCache
from hybrimoe_kt.core.eviction import LRU, Belady, belady_uses_from_routings
from hybrimoe_kt.core.eviction._common import lowest_masked
from hybrimoe_kt.core.protocols import Clock
from tests.core.test_eviction_contract import FACTORIES, LAYOUTS, make_setup


def run(name: str, layout: str, seed: int, masked: bool, big_in_use: bool = False) -> list:
    s = make_setup(seed, n_layers=3, n_experts=8, top_k=2, n_forwards=30, prefill_rows=5, layout=layout,
                   fill=0.5)
    policy, placement = FACTORIES[name](s)
    cache = ExpertCache(s.n_layers, s.n_experts, s.capacity, policy, global_pool=s.global_pool)
    assert cache._masked is not None, f"{name} has no victim_masked hook"
    if not masked:
        cache._masked = None
    cache.place(placement)
    rng = np.random.default_rng(seed)
    log: list = []
    for f, r in s.layer_calls(policy):
        layer = r.layer
        now = float(s.clock.now)
        in_use = {(layer, e) for e in r.experts}
        if big_in_use:  # more than the cache takes out eagerly: the lazy search runs
            picks = rng.choice(s.n_layers * s.n_experts, size=17, replace=False)
            in_use |= {(int(i) // s.n_experts, int(i) % s.n_experts) for i in picks}
        for l in range(s.n_layers):  # both searches, directly
            cands = cache.candidates(l, in_use, now)
            if cands:
                want = policy.victim(cands)
                assert policy.victim_masked(*cache.candidate_mask(l, in_use, now)) == want
                if not cache.has_room(l) and masked:
                    assert cache.choose_victim(l, in_use, now) == want
        residents = sorted((l, e) for l in range(s.n_layers) for e in cache.resident(l))
        if residents and rng.random() < 0.3:
            eid = residents[int(rng.integers(len(residents)))]
            cache.pin(eid)
            log.append(("pin", eid))
        for e in r.experts:
            if (layer, e) not in cache:
                try:
                    log.append(("admit", cache.admit((layer, e), now + float(rng.choice([0.0, 2.5])),
                                                     in_use, now)))
                except CacheFull:
                    log.append(("full", e))
        for eid in list(cache._pinned):
            if rng.random() < 0.5:
                cache.unpin(eid)
    return log


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("seed", [1, 2])
def test_masked_search_equals_list_search(name: str, layout: str, seed: int) -> None:
    assert run(name, layout, seed, masked=True) == run(name, layout, seed, masked=False)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_lazy_in_use_exclusion_equals_list_search(name: str, layout: str) -> None:
    assert run(name, layout, 5, masked=True, big_in_use=True) == run(name, layout, 5, masked=False,
                                                                      big_in_use=True)


def test_lowest_masked_breaks_ties_by_lowest_id() -> None:
    keys = np.array([[3.0, 1.0, 1.0], [1.0, 0.5, 0.5]])
    mask = np.array([[True, True, True], [True, False, False]])
    assert lowest_masked(4, mask, keys) == (4, 1)  # (4, 1), (4, 2) and (5, 0) tie at 1.0
    second = np.array([[0, 5, 2], [1, 0, 0]])
    assert lowest_masked(4, mask, keys, second) == (5, 0)  # then the second key decides
    with pytest.raises(ValueError):
        lowest_masked(0, np.zeros((1, 3), dtype=bool), keys[:1])


def test_belady_next_use_array_follows_a_clock_that_moves_back() -> None:
    clock = Clock()
    uses = belady_uses_from_routings([(0, 0, [0, 1]), (2, 0, [1]), (5, 0, [0])])
    b = Belady(uses, clock, n_layers=1, n_experts=3)
    mask = np.ones((1, 3), dtype=bool)
    for now, want in [(0, (0, 2)), (2, (0, 1)), (5, (0, 0)), (1, (0, 2)), (3, (0, 1))]:
        clock.now = now
        assert b.victim_masked(0, mask) == want == b.victim([(0, 0), (0, 1), (0, 2)])


def test_a_subclass_that_overrides_victim_keeps_the_list_path() -> None:
    class Custom(LRU):
        def victim(self, candidates):
            return max(candidates)

    cache = ExpertCache(1, 4, 2, Custom(1, 4))
    assert cache._masked is None
    cache.place([(0, 0), (0, 1)])
    assert cache.admit((0, 2), 0.0, set(), 0.0) == (0, 1)
