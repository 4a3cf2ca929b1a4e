"""Host time in the simulator: the critical part delays every layer in full, the background part only
where it outlasts the layer's kernels (golden: a two-layer trace with hand-computed times); profiles
without host times are refused unless ``--host-cost zero``; records carry what they were charged."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from hybrimoe_kt.core.cache import ExpertCache
from hybrimoe_kt.core.cost import RooflineCost
from hybrimoe_kt.core.hardware import load_profile
from hybrimoe_kt.core.host import HostCosts, HostTime
from hybrimoe_kt.core.models import get_model
from hybrimoe_kt.core.protocols import Clock
from hybrimoe_kt.core.strategies import build_policies, get_strategy
from hybrimoe_kt.core.types import LayerRouting
from hybrimoe_kt.sim.engine import Step, replay
from hybrimoe_kt.sim.runner import SimSetup, simulate
from hybrimoe_kt.traces.synthetic import synthetic_trace

US = 1e-6
# every routed expert on the CPU: 5 us per call + 20 us per expert; 10 us of non-MoE work per layer
COST = RooflineCost(cpu_call=5 * US, gpu_call=0.0, cpu_fixed=0.0, cpu_mem=20 * US, cpu_per_token=0.0,
                    gpu_fixed=0.0, gpu_mem=1 * US, gpu_per_token=0.0, transfer_s=100 * US, attn_mem=0.0,
                    attn_per_token=0.0, shared_mem=0.0, shared_per_token=0.0, layer_fixed=10 * US,
                    extra_mem=0.0, extra_per_token=0.0, n_extra_layers=0, copy_dram_share=0.0,
                    expert_bytes_cpu=1, expert_bytes_gpu=1)


def _run(host: dict[str, HostTime] | None, is_prefill: bool = False) -> float:
    rows = 2 if is_prefill else 1
    ids = np.zeros((rows, 1), dtype=np.int64)
    step = Step(tuple(LayerRouting.from_topk(layer, ids, is_prefill=is_prefill) for layer in range(2)),
                rows, is_prefill, 0)
    clock = Clock()
    pol = build_policies(get_strategy("stock"), 2, 4, 1, 0, clock)
    cache = ExpertCache(2, 4, 0, pol.eviction)
    st = replay([step], COST, pol, cache, clock, 1, host)
    assert st.steps == [(0, is_prefill, rows, pytest.approx(st.prefill_s if is_prefill else st.decode_s))]
    return st.prefill_s if is_prefill else st.decode_s


def test_host_time_on_the_right_side_of_the_overlap() -> None:
    # per layer: 10 (non-MoE) + 25 (CPU call + one expert) = 35 us without host time
    assert _run(None) == pytest.approx(70 * US)
    # critical 7 us delays each layer: 10 + 7 + 25; background 3 us hides under the 25 us kernels
    short = {"decode": HostTime(7 * US, 3 * US), "prefill": HostTime(0.0, 0.0)}
    assert _run(short) == pytest.approx(2 * 42 * US)
    # background 30 us outlasts the kernels by 5 us: 10 + 7 + max(25, 30)
    long = {"decode": HostTime(7 * US, 30 * US), "prefill": HostTime(0.0, 0.0)}
    assert _run(long) == pytest.approx(2 * 47 * US)
    # a prefill step pays the prefill figures
    pre = {"decode": HostTime(0.0, 0.0), "prefill": HostTime(100 * US, 0.0)}
    assert _run(pre, is_prefill=True) == pytest.approx(2 * 135 * US)


def _setup(host_cost: str = "profile", profile: str = "rtx4090-ddr5") -> SimSetup:
    trace = synthetic_trace("deepseek-v2-lite", n_requests=2, prompt_len=16, decode_len=8, seed=0, n_layers=2)
    return SimSetup(trace, "synthetic", get_model("deepseek-v2-lite"), load_profile(profile), host_cost=host_cost)


def test_records_carry_the_host_time_they_were_charged() -> None:
    setup = _setup()
    recs = {r["strategy"]: r for r in simulate(setup, ["stock", "hybrimoe", "oracle"], [0.25], workers=1)}
    host = setup.profile.host
    assert host is not None
    want = host.get("hybrimoe", "decode")
    assert recs["hybrimoe"]["host_critical_us_per_layer"] == pytest.approx(want.critical * 1e6, abs=1e-3)
    assert recs["hybrimoe"]["host_background_us_per_layer"] == pytest.approx(want.background * 1e6, abs=1e-3)
    assert recs["oracle"]["host_critical_us_per_layer"] == 0.0  # bounds pay none
    assert all(r["host_cost"] == "profile" and r["projection"] is False for r in recs.values())
    zero = {r["strategy"]: r for r in simulate(_setup("zero"), ["stock", "hybrimoe"], [0.25], workers=1)}
    assert zero["hybrimoe"]["host_critical_us_per_layer"] == 0.0 and zero["hybrimoe"]["host_cost"] == "zero"
    assert zero["stock"]["decode_tok_s"] > recs["stock"]["decode_tok_s"]  # host time costs throughput


def test_profile_without_host_times_is_refused() -> None:
    setup = _setup()
    bare = dataclasses.replace(setup, profile=dataclasses.replace(setup.profile, host=None))
    with pytest.raises(ValueError, match="no host section.*--host-cost zero"):
        simulate(bare, ["stock"], [0.25], workers=1)
    partial = dataclasses.replace(setup.profile, host=HostCosts({"stock": {"decode": HostTime(), "prefill": HostTime()}}))
    with pytest.raises(ValueError, match="no decode host time for strategy 'hybrimoe'"):
        simulate(dataclasses.replace(setup, profile=partial), ["stock", "hybrimoe"], [0.25], workers=1)


def test_host_section_round_trips_and_rejects_bad_keys() -> None:
    host = load_profile("rtx4090-ddr5").host
    assert host is not None and host.source.startswith("estimate") and host.scale > 0
    again = HostCosts.from_dict(host.to_dict())
    assert again.get("stock", "decode") == pytest.approx(host.get("stock", "decode"))
    with pytest.raises(ValueError, match="unknown key"):
        HostCosts.from_dict({"strategies": {}, "bogus": 1})
    with pytest.raises(ValueError, match="critical_us, background_us"):
        HostCosts.from_dict({"strategies": {"stock": {"decode": {"critical_us": 1}}}})


def test_gguf_slot_formats_are_not_projections() -> None:
    """GPU slots may hold a GGUF model's own blocks (the runtime runs them); int4 groups it does not."""
    from hybrimoe_kt.sim.runner import RUNTIME_GPU_FORMATS

    assert {"bf16", "q8_0", "q4_k_m"} <= set(RUNTIME_GPU_FORMATS)
    assert "int4-g128" not in RUNTIME_GPU_FORMATS


def test_stream_pricing_is_charged_only_where_a_call_prices_the_stream() -> None:
    """``HostTime.stream`` delays exactly the prefill calls the controller prices a stream for: none
    below ``stream_min_rows`` rows, none at the last layer, none in decode; and it round-trips in JSON."""
    t = HostTime(1 * US, 0.0, 0.0, 400 * US)
    assert HostCosts.from_dict(HostCosts({"hybrimoe": {"prefill": t}}).to_dict()).get("hybrimoe", "prefill") == t
    trace = synthetic_trace("deepseek-v2-lite", n_requests=1, prompt_len=32, decode_len=4, seed=0, n_layers=3)
    setup = SimSetup(trace, "t", get_model("deepseek-v2-lite"), load_profile("rtx5090-ddr5"))
    base = get_strategy("hybrimoe")
    assert base.prefill_stream
    host = HostCosts({s: {"decode": HostTime(1 * US), "prefill": t}
                      for s in ("hybrimoe",)}, source="test")
    setup = dataclasses.replace(setup, profile=dataclasses.replace(setup.profile, host=host))
    specs = [dataclasses.replace(base, name=f"hybrimoe/min{m}", stream_min_rows=m) for m in (0, 33)]
    recs = {r["strategy"]: r for r in simulate(setup, specs, [0.25], workers=1)}
    priced, gated = recs["hybrimoe/min0"], recs["hybrimoe/min33"]
    # one prompt of 32 rows, 3 layers: layers 0 and 1 price the next layer's stream, unless gated
    assert priced["host_prefill_stream_us_per_call"] == pytest.approx(400)
    assert priced["prefill_tok_s"] < gated["prefill_tok_s"]
    assert priced["decode_tok_s"] == pytest.approx(gated["decode_tok_s"], rel=0.05)  # decode pays no stream
    with pytest.raises(ValueError, match="stream_min_rows"):
        dataclasses.replace(base, stream_min_rows=-1)
