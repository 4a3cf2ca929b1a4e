"""Property tests: every scheduler meets the contract on random layers; balanced is never worse than
hss, static, stock or offload; on small layers it is compared with an exhaustive search."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Collection, Mapping

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybrimoe_kt.core.cost import CostModel, ReleasedCost, RooflineCost
from hybrimoe_kt.core.hardware import load_profile
from hybrimoe_kt.core.models import get_model
from hybrimoe_kt.core.schedulers import SCHEDULERS, make_scheduler
from hybrimoe_kt.core.schedulers.makespan import canonical_queue, makespan, token_map
from hybrimoe_kt.core.types import LayerRouting

from test_schedulers import check_contract

BASE = RooflineCost.build(load_profile("rtx4090-ddr5"), get_model("qwen3-30b-a3b"))

pos = st.floats(min_value=1e-7, max_value=1e-3, allow_nan=False, allow_infinity=False)
nonneg = st.one_of(st.just(0.0), pos)


@st.composite
def cost_models(draw: st.DrawFn) -> CostModel:
    if draw(st.booleans()):
        return ReleasedCost(c=draw(st.floats(min_value=0.01, max_value=5.0)))
    # A RooflineCost with random positive scheduler-relevant fields (the others do not matter here).
    return replace(BASE, cpu_call=draw(nonneg), gpu_call=draw(nonneg), cpu_fixed=draw(nonneg),
                   cpu_mem=draw(pos), cpu_per_token=draw(pos) * 1e-2, gpu_fixed=draw(nonneg),
                   gpu_mem=draw(pos), gpu_per_token=draw(pos) * 1e-3, transfer_s=draw(pos))


@st.composite
def layers(draw: st.DrawFn, max_experts: int = 16) -> tuple:
    n = draw(st.integers(1, max_experts))
    experts = draw(st.lists(st.integers(0, 127), min_size=n, max_size=n, unique=True))
    if draw(st.booleans()):
        counts = [1] * n  # decode
    else:
        counts = draw(st.lists(st.integers(1, 512), min_size=n, max_size=n))
    ids = np.repeat(np.array(experts), np.array(counts))[:, None]
    routing = LayerRouting.from_topk(3, ids, is_prefill=len(ids) > 1)
    resident = {e for e in experts if draw(st.booleans())}
    ready = {e: draw(pos) for e in sorted(resident) if draw(st.integers(0, 3)) == 0}
    copy_free = draw(nonneg)
    gpu_free = draw(nonneg)
    return routing, resident, ready, copy_free, gpu_free


PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(layer=layers(), cost=cost_models())
def test_every_scheduler_meets_the_contract(layer: tuple, cost: CostModel) -> None:
    routing, resident, ready, copy_free, gpu_free = layer
    for name in SCHEDULERS:
        split = make_scheduler(name).plan(routing, resident, cost, ready, copy_free, gpu_free)
        check_contract(split, routing, resident, cost, ready, copy_free, gpu_free)


@PROPS
@given(layer=layers(), cost=cost_models())
def test_balanced_never_worse_than_the_others(layer: tuple, cost: CostModel) -> None:
    routing, resident, ready, copy_free, gpu_free = layer
    ms = {name: make_scheduler(name).plan(routing, resident, cost, ready, copy_free, gpu_free).makespan_s
          for name in SCHEDULERS}
    for other in ("hss", "static", "stock", "offload"):
        assert ms["balanced"] <= ms[other] + 1e-12, (other, ms)


def exhaustive_makespan(routing: LayerRouting, resident: Collection[int], cost: CostModel,
                        ready: Mapping[int, float], copy_free: float, gpu_free: float) -> float:
    """Best makespan over every GPU subset, with the canonical GPU order (residents first by ready
    time then tokens desc, loads by tokens desc)."""
    res, _, unc, _ = canonical_queue(routing, resident, ready)
    tokens = token_map(routing)
    best = float("inf")
    for r_mask in itertools.product((False, True), repeat=len(res)):
        gpu_res = tuple(e for e, on in zip(res, r_mask) if on)
        cpu_res = tuple(e for e, on in zip(res, r_mask) if not on)
        for u_mask in itertools.product((False, True), repeat=len(unc)):
            loads = tuple(e for e, on in zip(unc, u_mask) if on)
            cpu = cpu_res + tuple(e for e, on in zip(unc, u_mask) if not on)
            ms = makespan(gpu_res + loads, cpu, loads, tokens, cost, ready, copy_free, gpu_free)
            best = min(best, ms)
    return best


@PROPS
@given(layer=layers(max_experts=6), cost=cost_models())
def test_balanced_against_exhaustive_search(layer: tuple, cost: CostModel) -> None:
    """Only sanity is asserted (the optimum is a lower bound; balanced <= hss); the gap is measured
    by ``balanced_gap`` and reported, not asserted."""
    routing, resident, ready, copy_free, gpu_free = layer
    bal = make_scheduler("balanced").plan(routing, resident, cost, ready, copy_free, gpu_free).makespan_s
    hss = make_scheduler("hss").plan(routing, resident, cost, ready, copy_free, gpu_free).makespan_s
    opt = exhaustive_makespan(routing, resident, cost, ready, copy_free, gpu_free)
    assert opt <= bal + 1e-12
    assert bal <= hss + 1e-12


def balanced_gap(n_cases: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean and max relative gap of balanced (and hss) over the exhaustive optimum on random small
    layers drawn like the property tests. Not a test: run it by hand to report the numbers."""
    rng = np.random.default_rng(seed)
    gaps_bal, gaps_hss = [], []
    for _ in range(n_cases):
        n = int(rng.integers(1, 7))
        experts = [int(e) for e in rng.choice(128, n, replace=False)]
        counts = [1] * n if rng.random() < 0.5 else [int(c) for c in rng.integers(1, 513, n)]
        routing = LayerRouting.from_topk(0, np.repeat(np.array(experts), np.array(counts))[:, None])
        resident = {e for e in experts if rng.random() < 0.5}
        ready = {e: float(rng.uniform(0, 1e-3)) for e in sorted(resident) if rng.random() < 0.25}
        copy_free, gpu_free = float(rng.uniform(0, 1e-4)), float(rng.uniform(0, 1e-4))
        if rng.random() < 0.5:
            cost: CostModel = ReleasedCost(c=float(rng.uniform(0.01, 5.0)))
        else:
            f = rng.uniform(1e-7, 1e-3, 9)
            cost = replace(BASE, cpu_call=f[0], gpu_call=f[1], cpu_fixed=f[2], cpu_mem=f[3],
                           cpu_per_token=f[4] * 1e-2, gpu_fixed=f[5], gpu_mem=f[6],
                           gpu_per_token=f[7] * 1e-3, transfer_s=f[8])
        args = (routing, resident, cost, ready, copy_free, gpu_free)
        opt = exhaustive_makespan(*args)
        gaps_bal.append(make_scheduler("balanced").plan(*args).makespan_s / opt - 1.0)
        gaps_hss.append(make_scheduler("hss").plan(*args).makespan_s / opt - 1.0)
    b, h = np.array(gaps_bal), np.array(gaps_hss)
    return {"cases": n_cases, "seed": seed, "balanced_mean": float(b.mean()),
            "balanced_max": float(b.max()), "balanced_optimal_share": float((b < 1e-12).mean()),
            "hss_mean": float(h.mean()), "hss_max": float(h.max())}
