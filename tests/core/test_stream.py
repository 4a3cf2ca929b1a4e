"""Layer-streaming prefill (core.stream): staging order, the choice, and the controller's bookkeeping."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from hybrimoe_kt.core.cache import ExpertCache
from hybrimoe_kt.core.controller import Controller
from hybrimoe_kt.core.cost import RooflineCost
from hybrimoe_kt.core.hardware import load_profile
from hybrimoe_kt.core.memory import memory_budget
from hybrimoe_kt.core.models import get_model
from hybrimoe_kt.core.protocols import Clock
from hybrimoe_kt.core.schedulers.balanced import BalancedScheduler
from hybrimoe_kt.core.strategies import build_policies, get_strategy, with_overrides
from hybrimoe_kt.core.stream import StreamPlan, choose_stream, proxy_routing, staging_slots, stream_order
from hybrimoe_kt.core.types import LayerRouting

L, E, K = 4, 16, 2


def routing(layer: int, rows: int, seed: int = 0, n_experts: int = E, k: int = K) -> LayerRouting:
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(n_experts, k, replace=False) for _ in range(rows)])
    return LayerRouting.from_topk(layer, ids, np.full(ids.shape, 1 / k, np.float32), is_prefill=True)


def slow_cpu_cost() -> RooflineCost:
    """A CPU far slower than the GPU and cheap copies that leave the CPU's memory alone: streaming pays."""
    c = RooflineCost.build(load_profile("rtx4090-ddr5"), get_model("deepseek-v2-lite"), "q4_k_m", "q4_k_m")
    return replace(c, cpu_fixed=200e-6, gpu_fixed=1e-6, transfer_s=20e-6, copy_dram_share=0.0)


def plan_fn(cost: RooflineCost):
    sched = BalancedScheduler()
    return lambda r, res, ready, cf, gf: sched.plan(r, res, cost, ready, cf, gf)


def test_staging_slots_and_order() -> None:
    assert staging_slots(0, 64) == 128 and staging_slots(64, 8) == 16 and staging_slots(16, 64) == 32
    proxy = LayerRouting.from_topk(1, np.array([[5, 3], [5, 9], [5, 3]]), is_prefill=True)
    # non-residents only, the proxy's first (most tokens first), then by prior, capped by the buffer
    prior = np.zeros(E)
    prior[12] = 2.0
    assert stream_order(E, {3}, 4, proxy, prior) == (5, 9, 12, 0)
    assert stream_order(E, set(range(E)), 4, proxy) == ()


def test_proxy_is_the_same_layers_last_chunk_when_there_is_one() -> None:
    here = routing(0, 8, seed=1)
    assert proxy_routing(here, None).layer == 1 and proxy_routing(here, None).tokens == here.tokens
    last = routing(1, 16, seed=2)
    p = proxy_routing(here, last)
    assert p.layer == 1 and set(p.experts) == set(last.experts) and p.n_rows == 8
    assert sum(p.tokens) == pytest.approx(sum(last.tokens) / 2, abs=len(last.tokens))
    assert proxy_routing(here, routing(3, 8)).tokens == here.tokens  # another layer's: not a proxy


def test_choice_streams_when_it_pays_and_not_when_copies_cost_more() -> None:
    cost = slow_cpu_cost()
    here = routing(0, 64, seed=3)
    split = BalancedScheduler().plan(here, set(), cost)
    staged = stream_order(E, set(), E, proxy_routing(here, None))
    kw = dict(now=0.0, next_start=split.makespan_s + 1e-4, copy_free=0.0, stream_free=0.0, ready_next={},
              gpu_free=0.0)
    c = choose_stream(here, split, proxy_routing(here, None), set(), staged, plan_fn(cost), cost, **kw)
    assert c.stream and 0 < c.count <= len(staged) and c.with_stream_s < c.without_s
    # copies 1000x dearer: the next layer's split does better without them
    dear = replace(cost, transfer_s=cost.transfer_s * 1000)
    c = choose_stream(here, split, proxy_routing(here, None), set(), staged, plan_fn(dear), dear, **kw)
    assert not c.stream and c.count == 0
    assert not choose_stream(here, split, proxy_routing(here, None), set(), (), plan_fn(cost), cost, **kw).stream


def controller(cost: RooflineCost, stream: bool = True) -> Controller:
    spec = with_overrides(get_strategy("hybrimoe"), prefill_stream=stream, stream_min_rows=0)  # short test prompts
    clock = Clock()
    pol = build_policies(spec, L, E, K, 2, clock)
    cache = ExpertCache(L, E, 2, pol.eviction)
    cache.place(pol.placement)
    return Controller(pol, cache, cost, clock, K)


def test_controller_stages_the_next_layer_and_serves_it_without_admitting_it() -> None:
    cost = slow_cpu_cost()
    ctl = controller(cost)
    before = {layer: set(ctl.cache.resident(layer)) for layer in range(L)}
    now = 0.0
    staged_total = 0
    staged_of: dict[int, set[int]] = {}
    for layer in range(L):
        r = routing(layer, 64, seed=10 + layer)
        d = ctl.decide(r, now, 0.0, is_prefill=True)
        if layer + 1 < L:
            assert d.stream is not None and d.stream.layer == layer + 1
            assert not set(d.stream.experts) & before[layer + 1]  # non-residents only
            assert list(d.stream.landing) == sorted(d.stream.landing)
            staged_of[layer + 1] = set(d.stream.experts)
        else:
            assert d.stream is None  # nothing after the last layer
        if layer > 0:
            assert set(d.staged) <= set(d.plan.gpu) & staged_of[layer] and not set(d.staged) & set(d.plan.loads)
            staged_total += len(d.staged)
        assert set(d.plan.gpu) | set(d.plan.cpu) == set(r.experts)
        ctl.background()
        now += d.plan.predicted_s + 1e-4
        ctl.finish(d.plan.predicted_s + 1e-4)
    assert staged_total > 0
    for layer in range(1, L):  # staged experts were never admitted (demand loads of others may be)
        assert not set(ctl.cache.resident(layer)) & staged_of[layer]
    # decode never streams, and a staging plan does not leak into a later layer or forward
    d = ctl.decide(routing(0, 1, seed=99), now, 0.0, is_prefill=False)
    assert d.stream is None and d.staged == ()


def test_without_streaming_the_decisions_are_unchanged() -> None:
    cost = slow_cpu_cost()
    a, b = controller(cost, stream=False), controller(cost, stream=False)
    for layer in range(L):
        r = routing(layer, 64, seed=10 + layer)
        da, db = a.decide(r, 0.0, 0.0, True), b.decide(r, 0.0, 0.0, True)
        assert da.plan == db.plan and da.stream is None and da.staged == ()


def test_stream_plan_ready_times() -> None:
    p = StreamPlan(1, (4, 2), (1.0, 2.0))
    assert p.ready(1.5) == {4: 0.0, 2: 0.5}


def test_memory_counts_the_staging_buffers() -> None:
    m = get_model("deepseek-v2-lite")
    plain = memory_budget(m, "q4_k_m", 24.0, dense_format="bf16")
    staged = memory_budget(m, "q4_k_m", 24.0, dense_format="bf16", staging_experts=128)
    assert staged.resident["stream_buffers"] == 128 * m.expert_bytes("q4_k_m")
    assert staged.resident_bytes - plain.resident_bytes == 128 * m.expert_bytes("q4_k_m")
    assert staged.weight_bytes == plain.weight_bytes  # buffers are not weights
    assert staged.max_ratio() <= plain.max_ratio()
    with pytest.raises(ValueError, match="stream buffers"):
        memory_budget(m, "q4_k_m", 0.5, dense_format="bf16", staging_experts=4096).check(0.1)
    # the slots hold the GGUF blocks; the other GPU weights stay bf16
    assert plain.expert_bytes == m.expert_bytes("q4_k_m")
    assert plain.resident["attention"] == memory_budget(m, "bf16", 24.0).resident["attention"]


def test_quick_split_is_the_best_resident_prefix_and_never_beats_balanced() -> None:
    """``quick_split`` (the stream options' price) = the best of balanced's no-load candidates (k, 0),
    checked by brute force over every resident prefix, and never below balanced's own makespan."""
    from hybrimoe_kt.core.schedulers.makespan import canonical_queue, makespan, token_map
    from hybrimoe_kt.core.stream import quick_split

    cost = RooflineCost.build(load_profile("rtx5090-ddr5"), get_model("deepseek-v2-lite"), "q4_k_m", "q4_k_m")
    sched = BalancedScheduler()
    rng = np.random.default_rng(7)
    for case in range(60):
        r = routing(1, int(rng.integers(1, 200)), seed=case, n_experts=64, k=6)
        resident = set(rng.choice(64, int(rng.integers(0, 64)), replace=False).tolist())
        ready = {e: float(rng.random()) * 4 * cost.transfer() for e in resident if rng.random() < 0.6}
        gpu_free = float(rng.random()) * 1e-4
        q = quick_split(r, resident, cost, ready, gpu_free)
        assert not q.loads and sorted(q.gpu + q.cpu) == sorted(r.experts)
        tokens = token_map(r)
        assert q.makespan_s == pytest.approx(makespan(q.gpu, q.cpu, (), tokens, cost, ready, 0.0, gpu_free))
        res, _, unc, _ = canonical_queue(r, resident, ready)
        brute = min(makespan(tuple(res[:k]), tuple(res[k:]) + tuple(unc), (), tokens, cost, ready, 0.0, gpu_free)
                    for k in range(len(res) + 1))
        assert q.makespan_s == pytest.approx(brute, rel=1e-12)
        b = sched.plan(r, resident, cost, ready, 0.0, gpu_free)
        assert q.makespan_s >= b.makespan_s * (1 - 1e-12)
