"""The host's placements in the simulator: kt-frequency replays as static-frequency does, and
kt-dynamic-update's layer-wise prefill calls pay their whole-layer copies on the copy queue, run on the
GPU, re-place the layer's GPU experts and hold a full-layer buffer in GPU memory."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from hybrimoe_kt.core.cache import ExpertCache
from hybrimoe_kt.core.hardware import load_profile
from hybrimoe_kt.core.layerwise import device_copy_s
from hybrimoe_kt.core.models import get_model
from hybrimoe_kt.core.protocols import Clock
from hybrimoe_kt.core.strategies import build_policies, get_strategy, slots_for, with_overrides
from hybrimoe_kt.core.types import LayerRouting
from hybrimoe_kt.sim.engine import Step, replay
from hybrimoe_kt.sim.runner import SimSetup, simulate
from hybrimoe_kt.traces.synthetic import synthetic_trace
from hybrimoe_kt.core.cost import RooflineCost

MODEL = "deepseek-v2-lite"
PER_STRATEGY = ("strategy", "description", "oracle_variant")


def setup(prompt_len: int = 16, chunk: int = 8, memory: bool = False, decode_len: int = 12) -> SimSetup:
    trace = synthetic_trace(MODEL, n_requests=2, prompt_len=prompt_len, decode_len=decode_len, n_layers=3)
    profile = load_profile("rtx4090-ddr5")
    if not memory:
        profile = dataclasses.replace(profile, gpu_mem_gib=0.0)
    return SimSetup(trace, "small", get_model(MODEL), profile, prefill_chunk=chunk)


def hand_cost() -> RooflineCost:
    """Round, binary-exact seconds (the engine tests' hand cost model)."""
    return RooflineCost(cpu_call=1.0, gpu_call=0.5, cpu_fixed=0.0, cpu_mem=2.0, cpu_per_token=0.125,
                        gpu_fixed=0.0, gpu_mem=0.25, gpu_per_token=0.0625, transfer_s=3.0, attn_mem=0.5,
                        attn_per_token=0.0625, layer_fixed=0.5, shared_mem=0.0, shared_per_token=0.0,
                        extra_mem=0.25, extra_per_token=0.0625, n_extra_layers=2, copy_dram_share=0.5,
                        expert_bytes_cpu=100, expert_bytes_gpu=1000)


def test_kt_frequency_replays_exactly_as_static_frequency() -> None:
    recs = simulate(setup(), ["static-frequency", "kt-frequency"], [0.25, 0.5], workers=1)
    by = {(r["strategy"], r["cache_ratio"]): r for r in recs}
    for ratio in (0.25, 0.5):
        a, b = by[("static-frequency", ratio)], by[("kt-frequency", ratio)]
        assert {k: v for k, v in a.items() if k not in PER_STRATEGY} == \
               {k: v for k, v in b.items() if k not in PER_STRATEGY}
        assert b["host_critical_us_per_layer"] > 0  # charged static-frequency's measured host time


def test_kt_dynamic_update_below_its_threshold_is_kt_frequency() -> None:
    recs = simulate(setup(), ["kt-frequency", "kt-dynamic-update"], [0.25], workers=1)
    a, b = recs
    assert b["prefill_layer_modes"]["layerwise"] == 0 and b["replaced"] == 0
    skip = PER_STRATEGY + ("memory_gib",)  # it holds a full-layer buffer (test below)
    assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}


def test_layerwise_prefill_calls_copy_layers_and_re_place() -> None:
    s = setup(prompt_len=16, chunk=8)
    spec = with_overrides(get_strategy("kt-dynamic-update"), layerwise_threshold=8)  # full chunks of 8
    static, dyn = simulate(s, ["kt-frequency", spec], [0.25], workers=1)
    modes = dyn["prefill_layer_modes"]
    n_layers, n_experts = s.trace.n_layers, s.trace.n_experts
    assert modes["layerwise"] == 2 * 2 * n_layers  # 2 requests x 2 chunks of 8 rows x 3 layers
    assert modes["split"] == modes["cpu"] == modes["stream"] == 0
    assert dyn["layerwise_copies"] == modes["layerwise"] * n_experts
    bytes_gpu = s.model.expert_bytes(s.gpu_format)
    assert dyn["pcie_gb"] == pytest.approx(dyn["layerwise_copies"] * bytes_gpu / 1e9)
    assert dyn["demand_loads"] == dyn["background_copies"] == 0
    assert dyn["replaced"] > 0 and dyn["pcie_gb_per_decode_token"] == 0.0  # decode stays static
    assert static["replaced"] == 0 and static["pcie_gb"] == 0.0
    assert dyn["decode_hit_rate"] != static["decode_hit_rate"]  # decode sees the re-placed experts


def test_layerwise_call_time_by_hand() -> None:
    """One prefill forward of 4 rows over a 1-layer, 4-expert model, 2 GPU experts placed: the layer
    copies its 4 experts (4 x 3 s), computes every routed expert on the GPU, then re-places 2."""
    spec = with_overrides(get_strategy("kt-dynamic-update"), layerwise_threshold=4)
    c = hand_cost()
    clock = Clock()
    counts = np.array([[9, 8, 1, 1]])
    pol = build_policies(spec, 1, 4, 2, 2, clock, counts=counts)
    cache = ExpertCache(1, 4, 2, pol.eviction, global_pool=True)
    cache.place(pol.placement)
    r = LayerRouting.from_topk(0, np.array([[2, 3], [2, 3], [3, 1], [2, 0]]), is_prefill=True)
    st = replay([Step((r,), 4, True, 0)], c, pol, cache, clock, 2)
    gpu = 2 * c.gpu_expert(3) + 2 * c.gpu_expert(1)  # launched at once, run once the copy landed
    expect = c.forward_extra(4) + c.non_moe(4) + 4 * c.transfer() + gpu + 2 * device_copy_s(c)
    assert st.prefill_s == pytest.approx(expect, abs=1e-12)
    assert (st.gpu_experts, st.cpu_experts, st.cpu_busy_s) == (4, 0, 0.0)
    assert st.stall_s == pytest.approx(4 * c.transfer() - c.gpu_call, abs=1e-12)  # waits for the whole copy
    assert st.copy_busy_s == pytest.approx(4 * c.transfer()) and st.bytes_copied == 4 * c.expert_bytes_gpu
    assert (st.replaced, st.prefill_layers_layerwise) == (2, 1)
    assert sorted(cache.resident(0)) == [2, 3]


def test_full_layer_buffer_counts_in_gpu_memory() -> None:
    recs = simulate(setup(memory=True), ["kt-frequency", "kt-dynamic-update"], [0.25], workers=1)
    mem = {r["strategy"]: r["memory_gib"] for r in recs}
    expert_gib = get_model(MODEL).expert_bytes("q4_k_m") / 2 ** 30
    assert "stream_buffers" not in mem["kt-frequency"]
    assert mem["kt-dynamic-update"]["stream_buffers"] == pytest.approx(64 * expert_gib, rel=1e-3)


def test_bounds_hold_with_layerwise_prefills() -> None:
    """Prompts past the default threshold (500 tokens, one 512-row chunk each): the oracle runs
    kt-dynamic-update as one of its variants, and the run's bound check passes."""
    s = setup(prompt_len=600, chunk=512, decode_len=64)
    recs = simulate(s, ["kt-frequency", "kt-dynamic-update", "oracle", "roofline"], [0.25], workers=1)
    dyn = next(r for r in recs if r["strategy"] == "kt-dynamic-update")
    assert dyn["prefill_layer_modes"]["layerwise"] == 2 * s.trace.n_layers  # the 512-row chunks only
    oracle = next(r for r in recs if r["strategy"] == "oracle")
    assert oracle["prefill_tok_s"] >= dyn["prefill_tok_s"] * (1 - 1e-9)
    assert slots_for(get_strategy("kt-dynamic-update"), 3, 64, 0.25) == 16 * 3
