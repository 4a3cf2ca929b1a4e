"""Hand-computed eviction sequences on tiny traces, plus MRS regressions (bug B1, every token counts).

Every trace is replayed by ``replay``: per layer, set the clock, ``on_route``, then admit each missed
running expert (copies land at once). Expected victims are written by hand next to the reasoning.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pytest

from hybrimoe_kt.core.cache import ExpertCache
from hybrimoe_kt.core.eviction import LFU, LRU, MRS, Belady, StaticPlacement, belady_uses_from_routings
from hybrimoe_kt.core.protocols import Clock
from hybrimoe_kt.core.types import ExpertId, LayerRouting


def decode(layer: int, expert: int) -> LayerRouting:
    return LayerRouting.from_topk(layer, np.array([[expert]]), top_k=1)


def replay(cache: ExpertCache, forwards: Sequence[Sequence[LayerRouting]],
           clock: Optional[Clock] = None) -> list[ExpertId]:
    victims = []
    for f, fwd in enumerate(forwards):
        for r in fwd:
            if clock is not None:
                clock.now = f * cache.n_layers + r.layer
            cache.policy.on_route(r)
            cache.account(r.layer, r.experts, 0.0)
            in_use = {(r.layer, e) for e in r.experts}
            for e in r.experts:
                if (r.layer, e) not in cache:
                    v = cache.admit((r.layer, e), 0.0, in_use, 0.0)
                    if v is not None:
                        victims.append(v)
    return victims


def test_lru_golden() -> None:
    # 1 layer, 2 slots, top-1 decode of experts 0 1 0 2 1 3; on_route ticks 1..6.
    # t1 admit 0; t2 admit 1; t3 hit 0 (last: 0@3, 1@2)
    # t4 miss 2: {0@3, 1@2} -> evict 1;  t5 miss 1: {0@3, 2@4} -> evict 0;
    # t6 miss 3: {2@4, 1@5} -> evict 2.
    cache = ExpertCache(1, 4, 2, LRU(1, 4))
    assert replay(cache, [[decode(0, e)] for e in (0, 1, 0, 2, 1, 3)]) == [(0, 1), (0, 0), (0, 2)]
    c = cache.counters
    assert (c.hits, c.misses) == (1, 5)


def test_lru_ties_fall_to_the_lowest_id() -> None:
    # Experts 2 and 1 are activated by the same layer call (same time): the lower id goes first.
    pol = LRU(1, 4)
    pol.on_route(LayerRouting.from_topk(0, np.array([[2, 1]])))
    assert pol.victim([(0, 2), (0, 1)]) == (0, 1)


def test_lfu_golden() -> None:
    # 1 layer, 2 slots; each forward is a list of rows (one expert per row, top-1).
    # f1 rows 0 0 1: counts 0:2 1:1, both admitted.
    # f2 row 2: 2:1, miss, {0:2, 1:1} -> evict 1.                       res {0, 2}
    # f3 rows 1 1: 1:1+2=3 (count kept through eviction), {0:2, 2:1} -> evict 2.   res {0, 1}
    # f4 row 2: 2:1+1=2, {0:2, 1:3} -> evict 0.                         res {1, 2}
    # f5 row 0: 0:3, {1:3, 2:2} -> evict 2.                             res {1, 0}
    # f6 row 3: 3:1, {1:3 last f3, 0:3 last f5} -> tie on count, LRU -> evict 1.
    rows = [[0, 0, 1], [2], [1, 1], [2], [0], [3]]
    forwards = [[LayerRouting.from_topk(0, np.array(r)[:, None], top_k=1)] for r in rows]
    cache = ExpertCache(1, 4, 2, LFU(1, 4))
    assert replay(cache, forwards) == [(0, 1), (0, 2), (0, 0), (0, 2), (0, 1)]
    assert cache.policy.counts.tolist() == [[3, 3, 2, 1]]


def mrs_row(layer: int, ids: Sequence[int], scores: Sequence[float]) -> LayerRouting:
    """One token with two scored columns; only the first one runs (top-1)."""
    return LayerRouting.from_topk(layer, np.array([ids]), np.array([scores]), top_k=1)


def test_mrs_golden_and_differs_from_lru() -> None:
    # a = 0.5, p = 2 (top_k = 1), 2 slots. Scores are dyadic, so every value below is exact.
    # f1 [0:.75, 1:.25]  S = (.375, .125, 0, 0)            run 0, admit
    # f2 [1:.5, 2:.5]    S = (.1875, .3125, .25, 0)        run 1, admit
    # f3 [2:.75, 3:.25]  S = (.09375, .15625, .5, .125)    run 2: {0:.09375, 1:.15625} -> evict 0
    # f4 [3:.5, 2:.5]    S = (.046875, .078125, .5, .3125) run 3: {1:.078125, 2:.5} -> evict 1
    # f5 [1:.875, 0:.125] S = (.0859375, .4765625, .25, .15625) run 1: {2:.25, 3:.15625} -> evict 3
    # (LRU evicts 2 at f5: expert 2 last ran at f3, expert 3 at f4.)
    forwards = [[mrs_row(0, i, s)] for i, s in [
        ((0, 1), (0.75, 0.25)), ((1, 2), (0.5, 0.5)), ((2, 3), (0.75, 0.25)),
        ((3, 2), (0.5, 0.5)), ((1, 0), (0.875, 0.125))]]
    pol = MRS(1, 4, top_k=1)
    assert pol.p == 2 and pol.alpha == 0.5
    assert replay(ExpertCache(1, 4, 2, pol), forwards) == [(0, 0), (0, 1), (0, 3)]
    assert pol.scores.tolist() == [[0.0859375, 0.4765625, 0.25, 0.15625]]
    assert replay(ExpertCache(1, 4, 2, LRU(1, 4)), forwards) == [(0, 0), (0, 1), (0, 2)]


def test_mrs_b1_score_comes_from_the_experts_own_weight() -> None:
    # Router order 3, 1 with weights .75, .25. The released code's bug B1 paired the sorted scores with
    # the experts in ascending-id order (1 <- .75, 3 <- .25). Correct: S[3] = .5*.75, S[1] = .5*.25.
    for ids, scores in [((3, 1), (0.75, 0.25)), ((1, 3), (0.25, 0.75))]:  # column order must not matter
        pol = MRS(1, 4, top_k=1)
        pol.on_route(LayerRouting.from_topk(0, np.array([ids]), np.array([scores]), top_k=1))
        assert pol.score((0, 3)) == 0.375
        assert pol.score((0, 1)) == 0.125
        assert pol.victim([(0, 1), (0, 3)]) == (0, 1)


def test_mrs_top_p_picks_by_score_not_by_column() -> None:
    # p = 1: only each row's highest-scoring valid id counts, wherever its column is; -1 is skipped.
    pol = MRS(1, 4, top_k=1, p=1)
    pol.on_route(LayerRouting.from_topk(0, np.array([[2, 0, -1]]), np.array([[0.25, 0.5, 0.9]]), top_k=1))
    assert pol.scores.tolist() == [[0.25, 0.0, 0.0, 0.0]]


def test_mrs_every_token_counts_prefill_included() -> None:
    # A prefill chunk of 3 rows, each picking expert 0 with weight 1: S = 1 - 0.5**3 = .875
    # (the released code's bug B5, first token only, would give .5). Row by row gives the same.
    chunk = LayerRouting.from_topk(0, np.array([[0], [0], [0]]), np.array([[1.0], [1.0], [1.0]]),
                                   is_prefill=True, top_k=1)
    pol = MRS(1, 2, top_k=1)
    pol.on_route(chunk)
    assert pol.score((0, 0)) == 0.875
    one_by_one = MRS(1, 2, top_k=1)
    for _ in range(3):
        one_by_one.on_route(LayerRouting.from_topk(0, np.array([[0]]), np.array([[1.0]]), top_k=1))
    assert one_by_one.score((0, 0)) == 0.875
    # A later row that does not pick expert 0 still decays it: every row is one step.
    pol.on_route(LayerRouting.from_topk(0, np.array([[1], [1]]), np.array([[1.0], [1.0]]), top_k=1))
    assert pol.score((0, 0)) == 0.875 / 4
    assert pol.score((0, 1)) == 0.75


def test_belady_golden_global_pool() -> None:
    # 2 layers, 3 experts, global pool of 2, top-1. Positions = forward * 2 + layer:
    #   f0: L0 -> 0 (pos 0), L1 -> 0 (pos 1); f1: L0 -> 1 (pos 2), L1 -> 0 (pos 3);
    #   f2: L0 -> 0 (pos 4), L1 -> 2 (pos 5)
    # pos 0, 1: admit (0,0), (1,0).
    # pos 2 miss (0,1): next uses (0,0)@4, (1,0)@3 -> evict (0,0) (furthest).
    # pos 3 hit (1,0).
    # pos 4 miss (0,0): (1,0) never again, (0,1) never again -> tie at inf, lowest id -> evict (0,1).
    # pos 5 miss (1,2): (1,0) inf, (0,0) inf -> evict (0,0).
    forwards = [[decode(0, a), decode(1, b)] for a, b in [(0, 0), (1, 0), (0, 2)]]  # (L0, L1) experts
    uses = belady_uses_from_routings((f * 2 + r.layer, r.layer, r.experts)
                                     for f, fwd in enumerate(forwards) for r in fwd)
    assert uses == {(0, 0): [0, 4], (0, 1): [2], (1, 0): [1, 3], (1, 2): [5]}
    clock = Clock()
    cache = ExpertCache(2, 3, 2, Belady(uses, clock), global_pool=True)
    assert replay(cache, forwards, clock) == [(0, 0), (0, 1), (0, 0)]
    assert cache.counters.misses == 5 and cache.counters.hits == 1


def test_belady_score_is_minus_distance_to_next_use() -> None:
    clock = Clock(3)
    pol = Belady({(0, 0): [1, 3, 7], (0, 1): [2]}, clock)
    assert pol.score((0, 0)) == -4.0  # next use strictly after now=3 is 7
    assert pol.score((0, 1)) == -np.inf
    assert pol.score((0, 2)) == -np.inf  # never used at all
    with pytest.raises(ValueError, match="sorted"):
        Belady({(0, 0): [3, 1]}, clock)


def test_static_golden() -> None:
    # Placement {0, 1} with counts (5, 1, 9, 2): a candidate outside the placement goes first even
    # when a placed expert has a lower count; inside the placement, the lowest count.
    pol = StaticPlacement([(0, 0), (0, 1)], [[5, 1, 9, 2]])
    assert pol.victim([(0, 0), (0, 1), (0, 2), (0, 3)]) == (0, 3)
    assert pol.victim([(0, 0), (0, 1), (0, 2)]) == (0, 2)
    assert pol.victim([(0, 0), (0, 1)]) == (0, 1)
    assert pol.score((0, 2)) == 9.0
