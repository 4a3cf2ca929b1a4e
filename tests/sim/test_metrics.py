"""Metrics: per-request latencies (TTFT, TPOT, cold/warm) on hand-built step records, the bandwidth
bound on hand-built cost models, its fraction on real replays, and byte-identical JSON."""

from __future__ import annotations

import dataclasses
import json

import pytest

from hybrimoe_kt.core.cost import RooflineCost
from hybrimoe_kt.core.hardware import load_profile
from hybrimoe_kt.core.models import get_model
from hybrimoe_kt.core.strategies import get_strategy
from hybrimoe_kt.sim.engine import RunStats
from hybrimoe_kt.sim.folds import make_folds
from hybrimoe_kt.sim.metrics import COLD_TOKENS, Metrics, bandwidth_bound_s, request_latencies
from hybrimoe_kt.sim.runner import run_one
from hybrimoe_kt.traces.synthetic import synthetic_trace
from hybrimoe_kt.traces.workloads import batched


def hand_stats() -> RunStats:
    """Request 0 (batch 1): prefill 0.1 + 0.2 s, then 70 decode steps of 10 ms.
    Request 7 stands for a batch of 3: prefill 0.5 s, then 66 decode steps of 3 rows, 20 ms each.
    A step without a request id (-1) must be ignored by the per-request metrics."""
    steps = [(0, True, 512, 0.1), (0, True, 100, 0.2)] + [(0, False, 1, 0.01)] * 70
    steps += [(7, True, 96, 0.5)] + [(7, False, 3, 0.02)] * 66 + [(-1, False, 1, 5.0)]
    dec = [s for s in steps if not s[1]]
    return RunStats(decode_s=sum(s[3] for s in dec), decode_tokens=sum(s[2] for s in dec),
                    decode_steps=len(dec), prefill_s=0.8, prefill_tokens=708,
                    token_latencies_s=[s[3] for s in dec], steps=steps)


def test_ttft_tpot_cold_warm_by_hand() -> None:
    assert COLD_TOKENS == 64
    ttft, p90, tpot, cold, warm = request_latencies(hand_stats().steps)
    # TTFT: request 0 = 0.3 + 0.01 s (1 request), batch 7 = 0.5 + 0.02 s (3 requests)
    assert ttft == pytest.approx((310.0 + 3 * 520.0) / 4)
    assert p90 == pytest.approx(520.0)  # 90th percentile of [310, 520, 520, 520]
    assert tpot == pytest.approx((10.0 + 3 * 20.0) / 4)
    # cold: 64 steps of each stream; warm: 6 steps of request 0 and 2 steps of the batch
    assert cold == pytest.approx((64 * 1 + 64 * 3) / (64 * 0.01 + 64 * 0.02))
    assert warm == pytest.approx((6 * 1 + 2 * 3) / (6 * 0.01 + 2 * 0.02))


def test_p90_interpolates_and_time_scale_stretches() -> None:
    steps = [(r, True, 4, 0.1 * (r + 1)) for r in range(10)]
    steps += [(r, False, 1, 0.001) for r in range(10)]
    ttft, p90, tpot, cold, warm = request_latencies(steps)
    vals = [100.0 * (r + 1) + 1.0 for r in range(10)]
    assert ttft == pytest.approx(sum(vals) / 10)
    assert p90 == pytest.approx(vals[8] + 0.1 * (vals[9] - vals[8]))  # linear interpolation
    assert tpot is None and warm is None  # one decode step each: no TPOT, nothing warm
    scaled = request_latencies(steps, time_scale=2.0)
    assert scaled[0] == pytest.approx(2 * ttft) and scaled[3] == pytest.approx(cold / 2)


def test_without_request_ids_latencies_are_undefined() -> None:
    steps = [(-1, True, 8, 0.1), (-1, False, 2, 0.01), (-1, False, 2, 0.01)]
    assert request_latencies(steps) == (None, None, None, None, None)
    st = RunStats(decode_s=0.02, decode_tokens=4, decode_steps=2, steps=steps, decode_bytes_copied=2_000_000)
    m = Metrics.from_stats(st)
    assert m.ttft_ms is None and m.bandwidth_bound_fraction is None  # no cost model given
    assert m.pcie_gb_per_decode_token == pytest.approx(0.002 / 4)


def toy_cost(**changes: float) -> RooflineCost:
    base = dict(cpu_call=0.0, gpu_call=0.0, cpu_fixed=0.0, cpu_mem=10.0, cpu_per_token=0.0, gpu_fixed=0.0,
                gpu_mem=1.0, gpu_per_token=0.0, transfer_s=30.0, attn_mem=2.0, attn_per_token=0.0,
                shared_mem=0.0, shared_per_token=0.0, layer_fixed=0.0, extra_mem=5.0, extra_per_token=0.0,
                n_extra_layers=0, copy_dram_share=0.4, expert_bytes_cpu=1, expert_bytes_gpu=1)
    base.update(changes)
    return RooflineCost(**base)  # type: ignore[arg-type]


def test_serial_bound_is_the_reference_formula() -> None:
    c = toy_cost()
    # per layer: 3 hits x 1 + 1 miss x min(10, 30 + 1) + attention 2; 4 layers; + extra 5
    assert bandwidth_bound_s(c, 3, 1, 4, overlap=False) == pytest.approx(4 * (3 + 10 + 2) + 5)
    # a cheap link makes copying the miss the cheaper path; free transfers cost only the GPU read
    assert bandwidth_bound_s(toy_cost(transfer_s=2.0), 3, 1, 4, overlap=False) == pytest.approx(4 * (3 + 3 + 2) + 5)
    assert bandwidth_bound_s(c, 3, 1, 4, free_transfers=True, overlap=False) == pytest.approx(4 * (3 + 1 + 2) + 5)


def test_overlap_bound_balances_the_tiers() -> None:
    c = toy_cost(shared_mem=4.0)
    # the split is continuous (counts are averages over layers): 3/4 of the miss on the CPU (7.5),
    # 1/4 copied (30 / 4 = 7.5) while the GPU reads shared 4 + 3 hits + 1/4 miss (7.25)
    assert bandwidth_bound_s(c, 3, 1, 1) == pytest.approx(2 + 7.5 + 5)
    # a slow link leaves the miss on the CPU: max(10, 4 + 3) beats copying
    assert bandwidth_bound_s(toy_cost(shared_mem=4.0, transfer_s=1e9), 3, 1, 1) == pytest.approx(2 + 10 + 5)
    # many hits: moving hits to the CPU balances the tiers: 10 z = 4 + (20 - z) -> z = 24 / 11
    assert bandwidth_bound_s(c, 19, 1, 1) == pytest.approx(2 + 240 / 11 + 5)
    for hits, misses in [(0, 8), (2, 6), (6, 2), (8, 0)]:
        assert bandwidth_bound_s(c, hits, misses, 3) <= bandwidth_bound_s(c, hits, misses, 3, overlap=False)


def replay_stats(strategy: str, ratio: float) -> tuple[RunStats, RooflineCost, bool]:
    model = get_model("deepseek-v2-lite")
    trace = batched(synthetic_trace(model, n_requests=4, prompt_len=12, decode_len=20, seed=3, n_layers=3), 2)
    cost = RooflineCost.build(load_profile("rtx4090-ddr5"), model, "q4_k_m", "bf16")
    spec = get_strategy(strategy)
    st = run_one(spec, ratio, make_folds(trace, prefill_chunk=8), cost, 3, model.n_experts, model.top_k)
    return st, cost, spec.free_transfers


@pytest.mark.parametrize("strategy", ["stock", "lru-offload", "hybrimoe", "roofline"])
def test_bound_fraction_of_real_replays_is_at_most_one(strategy: str) -> None:
    for ratio in (0.25, 0.75):
        st, cost, free = replay_stats(strategy, ratio)
        m = Metrics.from_stats(st, time_scale=26 / 3, cost=cost, free_transfers=free)
        assert m.bandwidth_bound_fraction is not None and 0.0 < m.bandwidth_bound_fraction <= 1.0
        assert m.bandwidth_bound_tok_s >= m.decode_tok_s
        assert m.bandwidth_bound_serial_tok_s <= m.bandwidth_bound_tok_s  # type: ignore[operator]
        assert m.ttft_ms is not None and m.tpot_ms is not None and m.cold_decode_tok_s is not None
        assert m.warm_decode_tok_s is None  # 20 decode steps: all cold
        assert m.pcie_gb_per_decode_token == pytest.approx(st.decode_bytes_copied / 1e9 / st.decode_tokens)
        assert st.decode_bytes_copied <= st.bytes_copied


def test_metrics_json_is_byte_identical_across_runs() -> None:
    texts = []
    for _ in range(2):
        st, cost, free = replay_stats("hybrimoe", 0.5)
        texts.append(json.dumps(Metrics.from_stats(st, 26 / 3, cost, free).as_dict(), sort_keys=True))
    assert texts[0] == texts[1]
    fields = {f.name for f in dataclasses.fields(Metrics)}
    assert {"ttft_ms", "ttft_p90_ms", "tpot_ms", "cold_decode_tok_s", "warm_decode_tok_s",
            "pcie_gb_per_decode_token", "bandwidth_bound_fraction"} <= fields
