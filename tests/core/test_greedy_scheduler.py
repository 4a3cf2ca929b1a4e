"""The ``greedy`` scheduler: contract, never worse than ``balanced``, a case it strictly wins, and the
exhaustive optimum on small layers (seeded random layers, drawn like test_scheduler_properties)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pytest

from hybrimoe_kt.core.cost import CostModel, ReleasedCost, RooflineCost
from hybrimoe_kt.core.hardware import load_profile
from hybrimoe_kt.core.models import get_model
from hybrimoe_kt.core.schedulers import GreedyScheduler, make_scheduler
from hybrimoe_kt.core.schedulers.makespan import split_makespan
from hybrimoe_kt.core.types import LayerRouting

from test_scheduler_properties import BASE, exhaustive_makespan
from test_schedulers import check_contract, routing_from_tokens


@dataclass(frozen=True)
class LinearCost:
    """CPU time = tokens; GPU time = max(1, gpu_per_token * tokens) (compute-bound past 1/gpu_per_token)."""

    cpu_call: float = 0.0
    gpu_call: float = 0.0
    gpu_per_token: float = 0.5
    transfer_s: float = 3.0

    def cpu_expert(self, n: int) -> float:
        return float(n)

    def gpu_expert(self, n: int) -> float:
        return max(1.0, self.gpu_per_token * n)

    def transfer(self) -> float:
        return self.transfer_s


def random_layer(rng: np.random.Generator, max_experts: int = 16) -> tuple:
    n = int(rng.integers(1, max_experts + 1))
    experts = [int(e) for e in rng.choice(128, n, replace=False)]
    counts = [1] * n if rng.random() < 0.4 else [int(c) for c in rng.integers(1, 513, n)]
    routing = LayerRouting.from_topk(0, np.repeat(np.array(experts), np.array(counts))[:, None],
                                     is_prefill=sum(counts) > 1)
    resident = {e for e in experts if rng.random() < 0.5}
    ready = {e: float(rng.uniform(0, 1e-3)) for e in sorted(resident) if rng.random() < 0.25}
    copy_free = float(rng.uniform(0, 1e-4)) if rng.random() < 0.5 else 0.0
    gpu_free = float(rng.uniform(0, 1e-4)) if rng.random() < 0.5 else 0.0
    pick = rng.random()
    if pick < 0.3:
        cost: CostModel = ReleasedCost(c=float(rng.uniform(0.01, 5.0)))
    elif pick < 0.6:
        f = rng.uniform(1e-7, 1e-3, 9)
        cost = replace(BASE, cpu_call=f[0], gpu_call=f[1], cpu_fixed=f[2], cpu_mem=f[3],
                       cpu_per_token=f[4] * 1e-2, gpu_fixed=f[5], gpu_mem=f[6],
                       gpu_per_token=f[7] * 1e-3, transfer_s=f[8])
    elif pick < 0.8:
        cost = LinearCost(gpu_per_token=float(rng.uniform(0.001, 1.0)), transfer_s=float(rng.uniform(1, 600)))
    else:
        cost = BASE
    return routing, resident, ready, copy_free, gpu_free, cost


def test_contract_and_never_worse_than_balanced_on_random_layers() -> None:
    rng = np.random.default_rng(0)
    greedy, balanced = GreedyScheduler(), make_scheduler("balanced")
    wins = 0
    for _ in range(600):
        routing, resident, ready, copy_free, gpu_free, cost = random_layer(rng)
        g = greedy.plan(routing, resident, cost, ready, copy_free, gpu_free)
        b = balanced.plan(routing, resident, cost, ready, copy_free, gpu_free)
        check_contract(g, routing, resident, cost, ready, copy_free, gpu_free)
        assert sorted(g.gpu + g.cpu) == sorted(routing.experts)  # every activated expert exactly once
        assert set(g.loads) <= set(routing.experts) - set(resident)  # loads are non-residents only
        assert g.makespan_s == split_makespan(g, routing, cost, ready, copy_free, gpu_free)
        assert g.makespan_s <= b.makespan_s
        wins += g.makespan_s < b.makespan_s
    assert wins > 0  # the random layers include some where a 0-1 assignment outside the family wins


def test_strictly_beats_balanced_when_the_gpu_is_compute_bound() -> None:
    """Two misses of 4 and 1 tokens; CPU time = tokens, GPU time = max(1, tokens / 2), a copy takes 3.
    balanced loads a prefix of the copy order (biggest first): none -> CPU 5; the 4-token one -> GPU
    3 + 2 = 5; both -> 7. greedy loads the 1-token one: GPU 3 + 1 = 4, CPU 4."""
    routing = routing_from_tokens({10: 4, 11: 1}, prefill=True)
    cost = LinearCost()
    b = make_scheduler("balanced").plan(routing, set(), cost)
    g = make_scheduler("greedy").plan(routing, set(), cost)
    assert b.makespan_s == 5.0
    assert (g.gpu, g.cpu, g.loads, g.makespan_s) == ((11,), (10,), (11,), 4.0)
    check_contract(g, routing, set(), cost)


def test_uniform_decode_returns_balanced_split() -> None:
    cost = RooflineCost.build(load_profile("rtx4090-ddr5"), get_model("deepseek-v2-lite"))
    rng = np.random.default_rng(3)
    for _ in range(50):
        experts = [int(e) for e in rng.choice(64, 6, replace=False)]
        routing = LayerRouting.from_topk(0, np.array([experts]))
        resident = {e for e in experts if rng.random() < 0.5}
        assert (make_scheduler("greedy").plan(routing, resident, cost)
                == make_scheduler("balanced").plan(routing, resident, cost))


def test_reaches_the_exhaustive_optimum_more_often_than_balanced() -> None:
    rng = np.random.default_rng(1)
    opt_g = opt_b = 0
    n = 300
    for _ in range(n):
        routing, resident, ready, copy_free, gpu_free, cost = random_layer(rng, max_experts=6)
        args = (routing, resident, cost, ready, copy_free, gpu_free)
        opt = exhaustive_makespan(*args)
        g = make_scheduler("greedy").plan(*args).makespan_s
        b = make_scheduler("balanced").plan(*args).makespan_s
        assert opt <= g * (1 + 1e-12) and g <= b
        opt_g += g <= opt * (1 + 1e-12)
        opt_b += b <= opt * (1 + 1e-12)
    assert opt_g >= opt_b and opt_g >= 0.98 * n


@pytest.mark.parametrize("rounds", [0, 1])
def test_search_budget_is_a_parameter(rounds: int) -> None:
    routing = routing_from_tokens({10: 4, 11: 1}, prefill=True)
    split = GreedyScheduler(rounds=rounds).plan(routing, set(), LinearCost())
    assert split.makespan_s == 4.0  # list scheduling alone finds it: the small miss's copy is the cheapest
