"""The simulator's layer-streaming prefill (core.stream through the shared controller): where the cost
model says streaming pays (a PCIe 5.0 card beside DDR5, long prompts) hybrimoe stages the next layer,
prefills faster than without, decodes the same, and pays the staging buffers in GPU memory."""

from __future__ import annotations

from hybrimoe_kt.core.hardware import load_profile
from hybrimoe_kt.core.models import get_model
from hybrimoe_kt.core.strategies import get_strategy, with_overrides
from hybrimoe_kt.core.stream import staging_slots
from hybrimoe_kt.sim.runner import SimSetup, simulate
from hybrimoe_kt.traces.synthetic import synthetic_trace


def records(prompt_len: int) -> dict[str, dict]:
    model = get_model("deepseek-v2-lite")
    trace = synthetic_trace(model, seed=5, n_requests=1, prompt_len=prompt_len, decode_len=8, n_layers=6)
    setup = SimSetup(trace, "synthetic", model, load_profile("rtx5090-ddr5"), host_cost="zero")
    off = with_overrides(get_strategy("hybrimoe"), name="hybrimoe/no-stream", prefill_stream=False)
    return {r["strategy"]: r for r in simulate(setup, ["stock", "hybrimoe", off], [0.25])}


def test_long_prompts_stream_and_prefill_faster() -> None:
    by = records(512)
    on, off = by["hybrimoe"], by["hybrimoe/no-stream"]
    assert on["prefill_stream"] and not off["prefill_stream"]
    assert on["prefill_tok_s"] > 1.2 * off["prefill_tok_s"]
    assert on["decode_tok_s"] == off["decode_tok_s"]  # decode never streams
    assert on["gpu_format"] == "q4_k_m" and on["dense_format"] == "bf16"  # slots hold the host's blocks
    buffers = on["memory_gib"]["stream_buffers"]
    expect = staging_slots(64, 64) * get_model("deepseek-v2-lite").expert_bytes("q4_k_m") / 2**30
    assert abs(buffers - expect) < 1e-3 and "stream_buffers" not in off["memory_gib"]


def test_short_prompts_do_not_stream() -> None:
    by = records(4)
    assert by["hybrimoe"]["prefill_tok_s"] == by["hybrimoe/no-stream"]["prefill_tok_s"]


def test_records_count_the_staging_copies() -> None:
    by = records(512)
    on, off = by["hybrimoe"], by["hybrimoe/no-stream"]
    assert on["stage_copies"] >= on["stage_used"] > 0
    assert off["stage_copies"] == off["stage_used"] == 0
    modes = on["prefill_layer_modes"]
    assert modes["stream"] > 0 and sum(modes.values()) == sum(off["prefill_layer_modes"].values())
    assert off["prefill_layer_modes"]["stream"] == 0
