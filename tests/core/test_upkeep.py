"""The step cadence's core: vectorized policy updates, the swap planner and the controller's upkeep."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from hybrimoe_kt.core.cache import ExpertCache
from hybrimoe_kt.core.controller import Controller
from hybrimoe_kt.core.cost import RooflineCost
from hybrimoe_kt.core.eviction.lfu import LFU
from hybrimoe_kt.core.eviction.lru import LRU
from hybrimoe_kt.core.eviction.mrs import MRS
from hybrimoe_kt.core.eviction.reuse import ReuseRate
from hybrimoe_kt.core.hardware import load_profile
from hybrimoe_kt.core.models import get_model
from hybrimoe_kt.core.protocols import Clock
from hybrimoe_kt.core.strategies import build_policies, get_strategy, with_overrides
from hybrimoe_kt.core.types import LayerRouting
from hybrimoe_kt.core.upkeep import StepRouting, plan_swaps

L, E, K = 4, 16, 2


def random_step(rng: np.random.Generator, n: int, p: int = K) -> list[LayerRouting]:
    out = []
    for layer in range(L):
        ids = np.stack([rng.choice(E, size=p, replace=False) for _ in range(n)]).astype(np.int32)
        scores = rng.random((n, p)).astype(np.float32)
        if n > 1:
            ids[0, -1] = -1  # a skipped slot
        out.append(LayerRouting.from_topk(layer, ids, scores, is_prefill=n > 1, top_k=K))
    return out


@pytest.mark.parametrize("n,p", [(1, K), (3, K), (2, 5)])
def test_on_step_equals_on_route_layer_by_layer(n: int, p: int) -> None:
    rng = np.random.default_rng(n * 10 + p)
    for make in (lambda: MRS(L, E, K, alpha=0.3), lambda: ReuseRate(L, E, half_life=8.0)):
        a, b = make(), make()
        for _ in range(5):
            routings = random_step(rng, n, p)
            for r in routings:
                a.on_route(r)
            b.on_step(StepRouting.from_layers(routings, L))
            np.testing.assert_allclose(a.score_array(), b.score_array(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("n", [1, 3])
def test_lru_and_lfu_step_forms_rank_as_their_per_layer_forms(n: int) -> None:
    """LFU: the same counts; LRU: per layer the same order (a layer's experts of one step share a time
    either way; only the clock's units differ)."""
    rng = np.random.default_rng(n)
    a_u, b_u, a_f, b_f = LRU(L, E), LRU(L, E), LFU(L, E), LFU(L, E)
    for _ in range(6):
        routings = random_step(rng, n)
        for r in routings:
            a_u.on_route(r)
            a_f.on_route(r)
        step = StepRouting.from_layers(routings, L)
        b_u.on_step(step)
        b_f.on_step(step)
        np.testing.assert_array_equal(a_f.score_array(), b_f.score_array())
        for layer in range(L):
            np.testing.assert_array_equal(np.argsort(a_u.score_array()[layer], kind="stable"),
                                          np.argsort(b_u.score_array()[layer], kind="stable"))
    for spec in ("lru", "lfu"):  # usable as the step cadence's eviction rank
        pol = build_policies(with_overrides(get_strategy("hybrimoe"), eviction=spec), L, E, K, 4, Clock())
        assert pol.upkeep is not None and pol.upkeep.eviction.name == spec


def brute_force(value, rank, resident, evictable, quotas, max_copies, horizon, threshold):
    """Per layer: j-th best candidate with the j-th slot (free ones first, then lowest-rank victims)."""
    pairs = []
    for layer in range(value.shape[0]):
        cands = sorted((e for e in range(E) if not resident[layer, e]), key=lambda e: (-value[layer, e], e))
        free = quotas[layer] - int(resident[layer].sum())
        victims = sorted((e for e in range(E) if evictable[layer, e]), key=lambda e: (rank[layer, e], e))
        slots = [None] * max(free, 0) + victims
        for j, (c, v) in enumerate(zip(cands, slots)):
            old = 0.0 if v is None else value[layer, v]
            gain = (value[layer, c] - old) * horizon - threshold
            if gain > 0 and j < 8:
                pairs.append((gain, layer * E + c, (layer, c), None if v is None else (layer, v)))
    pairs.sort(key=lambda t: (-t[0], t[1]))
    return [(new, old) for _, _, new, old in pairs[:max_copies]]


@pytest.mark.parametrize("seed", range(6))
def test_plan_swaps_matches_the_pairing_rule(seed: int) -> None:
    rng = np.random.default_rng(seed)
    value = rng.random((L, E)) * 0.2
    rank = rng.random((L, E))
    quotas = [4, 5, 3, 6]
    resident = np.zeros((L, E), dtype=bool)
    for layer, q in enumerate(quotas):
        resident[layer, rng.choice(E, size=q - (layer % 2), replace=False)] = True  # odd layers: a free slot
    evictable = resident & (rng.random((L, E)) < 0.8)
    for max_copies in (0, 1, 3, 100):
        got = plan_swaps(value, rank, resident, evictable, quotas=quotas, max_copies=max_copies,
                         horizon=32.0, threshold=1.0)
        assert got == brute_force(value, rank, resident, evictable, quotas, max_copies, 32.0, 1.0)
        news = [n for n, _ in got]
        olds = [o for _, o in got if o is not None]
        assert len(set(news)) == len(news) and len(set(olds)) == len(olds)
        assert all(not resident[n] for n in news) and all(evictable[o] for o in olds)


def test_plan_swaps_global_pool_uses_free_slots_then_the_lowest_ranked() -> None:
    value = np.zeros((2, 3))
    value[1, 2] = 0.9
    value[0, 1] = 0.5
    rank = np.array([[0.1, 0.0, 0.7], [0.4, 0.0, 0.0]])
    resident = np.array([[True, False, True], [True, False, False]])
    got = plan_swaps(value, rank, resident, resident.copy(), capacity=4, max_copies=5, horizon=32.0,
                     threshold=1.0)
    assert got == [((1, 2), None), ((0, 1), (0, 0))]  # one free slot, then the lowest rank (0, 0)


def controller(strategy: str = "hybrimoe", slots: int = 4, **over: object) -> Controller:
    model = get_model("deepseek-v2-lite")
    cost = RooflineCost.build(load_profile("rtx4090-ddr5"), model, "bf16", "bf16")
    spec = with_overrides(get_strategy(strategy), **over) if over else get_strategy(strategy)
    clock = Clock()
    pol = build_policies(spec, L, E, K, slots, clock, counts=np.ones((L, E), dtype=np.int64))
    cache = ExpertCache(L, E, slots, pol.eviction, global_pool=spec.pool == "global")
    cache.place(pol.placement)
    return Controller(pol, cache, cost, clock, K)


def decode_step(experts: list[int]) -> list[LayerRouting]:
    ids = np.array([experts], dtype=np.int32)
    return [LayerRouting.from_topk(layer, ids, np.full((1, K), 0.5, np.float32)) for layer in range(L)]


def test_upkeep_copies_become_visible_only_after_they_land() -> None:
    ctl = controller(admission_margin=0.0)
    ctl.layer_time_ema = 1e-3  # a step of 4 ms: room for a few copies
    hot = [14, 15]  # not placed (placement: the lowest ids by equal counts)
    assert not ctl.visible()[:, hot].any()
    now, ups = 0.0, []
    for _ in range(3):  # hot experts every step
        step = StepRouting.from_layers(decode_step(hot), L)
        ups.append(ctl.upkeep(step, now))
        for layer in range(L):
            d = ctl.decide(decode_step(hot)[layer], now)
            vis = ctl.visible()
            assert set(d.plan.gpu) == {e for e in hot if vis[layer, e]}
            assert not d.plan.loads and not d.plan.evictions
        now += 1e-6  # the next upkeep comes before the copies land
    copies = [c for u in ups for c in u.copies]
    assert copies and all(e in hot for _, e in copies)
    landing = max(t for u in ups for t in u.landing)
    assert not ctl.visible()[:, hot].any()  # booked, in flight, invisible
    ctl.upkeep(None, landing)
    assert all(ctl.visible()[eid] for eid in copies)
    for eid in (v for u in ups for v in u.evictions):
        assert not ctl.visible()[eid]


def test_upkeep_respects_the_copy_budget_and_capacity() -> None:
    ctl = controller(admission_margin=0.0, step_copy_budget=0.0)
    step = StepRouting.from_layers(decode_step([14, 15]), L)
    ctl.layer_time_ema = 1.0
    assert ctl.upkeep(step, 0.0).copies == ()  # no budget, no copy
    ctl = controller(admission_margin=0.0)
    ctl.layer_time_ema = 1.0  # a huge budget
    for t in itertools.count():
        up = ctl.upkeep(step, float(t))
        for layer in range(L):
            assert len(ctl.cache.resident(layer)) <= 4
        if not up.copies:
            break
    assert t >= 1


def test_layer_cadence_upkeep_is_a_no_op() -> None:
    ctl = controller("hybrimoe-layer")
    step = StepRouting.from_layers(decode_step([14, 15]), L)
    up = ctl.upkeep(step, 0.0)
    assert up.copies == () and up.evictions == ()
