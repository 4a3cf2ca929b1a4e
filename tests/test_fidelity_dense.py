"""Fidelity on a stack with attention-like parts, shared experts and host time: the simulator's per-layer
times are its own (they add up to the engine's totals; a stock layer is non-MoE + critical host time +
the longer of the CPU experts, the shared experts and the background host time), and the harness records
the whole layer, the call and its background host time per layer call. No timing is asserted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybrimoe_kt.core.hardware import load_profile
from hybrimoe_kt.core.host import HostTime
from hybrimoe_kt.core.strategies import get_strategy
from hybrimoe_kt.measure.fidelity import fit_two_point, sim_steps, simulate_layers, stack_cost
from hybrimoe_kt.runtime.dense_parts import DenseParts
from hybrimoe_kt.runtime.device import Tier
from hybrimoe_kt.runtime.harness import StackShape, random_store, run_replay
from hybrimoe_kt.runtime.moe import HybridMoE
from hybrimoe_kt.runtime.replay import RoutingReplay
from hybrimoe_kt.traces.synthetic import synthetic_trace

SHAPE = StackShape("deepseek-v2-lite", 2, 64, 32, shared_inter=64, attn_params=2 * 96 * 64)
HOST = {"decode": HostTime(40e-6, 300e-6), "prefill": HostTime(90e-6, 5e-6)}


@pytest.fixture(scope="module")
def replayed() -> tuple[RoutingReplay, list]:
    tr = synthetic_trace(SHAPE.model, n_requests=1, prompt_len=10, decode_len=4, seed=2, n_layers=2)
    rp = RoutingReplay(tr, SHAPE.preset(), prefill_chunk=8)
    return rp, rp.steps()


def test_stock_layers_follow_the_cost_model(replayed: tuple[RoutingReplay, list]) -> None:
    rp, steps = replayed
    routes = [[tuple(t.numpy() for t in rp.routing(s, l)) for l in range(2)] for s in steps]
    ss = sim_steps(routes, [s.is_prefill for s in steps], [0] * len(steps))
    cost = stack_cost(load_profile("rtx4090-ddr5"), SHAPE.preset(), (20e-6, 1e-6), (10e-6, 2e-6))
    assert cost.non_moe(1) == 20e-6 and cost.shared(8) == pytest.approx(16e-6) and cost.forward_extra(4) == 0
    counts = rp.expert_counts()
    pred = simulate_layers(ss, cost, get_strategy("stock"), counts, 0, SHAPE.top_k, HOST)
    assert sum(pred.layer_s) == pytest.approx(pred.stats.decode_s + pred.stats.prefill_s, rel=1e-12)
    i = 0
    for step in ss:
        ht = HOST["prefill" if step.is_prefill else "decode"]
        for r in step.routings:
            cpu = cost.cpu_call + sum(cost.cpu_expert(t) for t in r.tokens)
            want = cost.non_moe(step.n_rows) + ht.critical + max(cpu, cost.shared(step.n_rows), ht.background)
            assert pred.layer_s[i] == pytest.approx(want, rel=1e-9)
            i += 1
    assert fit_two_point(3.0, 16.0, 8) == (3.0, 2.0) and fit_two_point(3.0, 9.0, 1) == (3.0, 0.0)


def test_harness_records_whole_layers_calls_and_background(replayed: tuple[RoutingReplay, list]) -> None:
    rp, steps = replayed
    torch.manual_seed(0)
    dense = DenseParts(2, SHAPE.hidden, 96, 64, torch.device("cpu"))
    assert dense.attn_params == SHAPE.attn_params
    a, s = dense.measure(4, repeats=1)
    assert a > 0 and s > 0
    moe = HybridMoE(random_store(SHAPE), Tier("cpu"), "hybrimoe", 4, stack_cost(load_profile("rtx4090-ddr5"),
                    SHAPE.preset()), SHAPE.top_k, counts=rp.expert_counts(), cpu_backend="torch",
                    cpu_threads=1, max_len=8)
    rec = run_replay(moe, rp, steps, dense=dense)
    n = 2 * len(steps)
    assert len(rec.layer_s) == len(rec.layer_call_s) == len(rec.layer_background_s) == n
    assert all(w >= c > 0 for w, c in zip(rec.layer_s, rec.layer_call_s))
    assert all(b >= 0 for b in rec.layer_background_s)
    assert np.isclose(sum(rec.layer_background_s), moe.stats.background_s)
    assert moe.stats.forwards == n
