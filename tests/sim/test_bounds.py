"""Bounds bound: ``roofline >= oracle >= every deployable strategy`` in decode tok/s, prefill tok/s and
hit rate (the oracle's hit rate excepted, see sim/bounds.py), on random traces; a violation is raised."""

from __future__ import annotations

import pytest

from hybrimoe_kt.core.hardware import load_profile
from hybrimoe_kt.core.models import get_model
from hybrimoe_kt.sim.bounds import BoundViolation, check_bounds, violations
from hybrimoe_kt.sim.runner import SimSetup, simulate
from hybrimoe_kt.traces.synthetic import synthetic_trace

STRATEGIES = ["stock", "static-frequency", "lru-offload", "hybrimoe-paper", "hybrimoe", "oracle", "roofline"]


@pytest.mark.parametrize("model,hardware,seed,ratios", [
    ("deepseek-v2-lite", "rtx4090-ddr5", 1, [0.25, 0.5]), ("qwen3-30b-a3b", "a6000-tr5995wx", 2, [0.25, 0.5]),
    ("mixtral-8x7b", "a6000-tr5995wx", 3, [0.125, 0.25]), ("deepseek-v2-lite", "rtx4080-2x8452y", 4, [0.125, 0.25])])
def test_bounds_hold_on_random_traces(model: str, hardware: str, seed: int, ratios: list[float]) -> None:
    trace = synthetic_trace(model, n_requests=2, prompt_len=24, decode_len=12, seed=seed, n_layers=3)
    setup = SimSetup(trace, f"synthetic seed {seed}", get_model(model), load_profile(hardware))
    recs = simulate(setup, STRATEGIES, ratios, workers=1)  # raises on a violation
    assert violations(recs) == []
    oracle = [r for r in recs if r["strategy"] == "oracle"]
    assert all(set(r["oracle_variant"]) == {"decode", "prefill"} for r in oracle)


def test_a_violation_is_raised_with_the_numbers() -> None:
    recs = [{"strategy": "roofline", "cache_ratio": 0.5, "decode_tok_s": 10.0, "prefill_tok_s": 100.0,
             "hit_rate": 0.9},
            {"strategy": "oracle", "cache_ratio": 0.5, "decode_tok_s": 9.0, "prefill_tok_s": 90.0, "hit_rate": 0.95},
            {"strategy": "hybrimoe", "cache_ratio": 0.5, "decode_tok_s": 9.5, "prefill_tok_s": 80.0,
             "hit_rate": 0.99}]
    bad = violations(recs)
    assert "cache 50%: roofline hit_rate 0.9 < oracle 0.95" in bad
    assert "cache 50%: oracle decode_tok_s 9 < hybrimoe 9.5" in bad
    assert not any("oracle hit_rate" in b for b in bad)  # the oracle's hit rate bounds nothing
    with pytest.raises(BoundViolation, match="roofline decode_tok_s|roofline hit_rate"):
        check_bounds(recs)
