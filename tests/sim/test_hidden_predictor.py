"""The simulator's modelled hidden-state predictor (``sim.hidden``): its accuracy is the stated one,
accuracy 1 hints the true next-layer experts, runs are deterministic per seed, and only per-layer
strategies with a stated accuracy take hints."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from hybrimoe_kt.core.hardware import load_profile
from hybrimoe_kt.core.models import get_model
from hybrimoe_kt.core.prefetch import HiddenPrefetch
from hybrimoe_kt.core.protocols import Clock
from hybrimoe_kt.core.strategies import STRATEGIES, with_overrides
from hybrimoe_kt.sim.folds import make_folds
from hybrimoe_kt.sim.hidden import ModelledHints, fold_rng, gate_cost_s, modelled_hint
from hybrimoe_kt.sim.runner import SimSetup, simulate
from hybrimoe_kt.traces.synthetic import synthetic_trace

MODEL = "deepseek-v2-lite"
BASE = STRATEGIES["hybrimoe-layer"]


def trace():
    return synthetic_trace(MODEL, n_requests=2, prompt_len=16, decode_len=24, n_layers=4)


def variant(a: float, seed: int = 0):
    return with_overrides(BASE, name=f"hybrimoe-layer/hidden@{a}", prefetch="hidden", prefetch_depth=1,
                          hidden_accuracy=a, hidden_seed=seed)


def feed(accuracy: float, seed: int = 0):
    """Replay every fold's layers through ModelledHints; returns (hints per position, the hinter)."""
    t = trace()
    out, hinters = {}, []
    for fold in make_folds(t):
        clock = Clock()
        h = ModelledHints(HiddenPrefetch(), fold.future, clock, accuracy, t.n_experts, fold_rng(seed, fold.name))
        for i, step in enumerate(fold.steps):
            for r in step.routings:
                clock.now = i * t.n_layers + r.layer
                h.observe(r)
                if r.layer + 1 < t.n_layers:
                    out[(fold.name, i, r.layer + 1)] = h.inner.hinted(r.layer + 1)
        hinters.append(h)
    return out, hinters, t


@pytest.mark.parametrize("a", [0.0, 0.5, 0.85])
def test_measured_accuracy_matches_the_stated_one(a: float) -> None:
    _, hinters, _ = feed(a)
    right, n = sum(h.true_hinted for h in hinters), sum(h.activated for h in hinters)
    assert n > 1000
    assert abs(right / n - a) < 4 * math.sqrt(a * (1 - a) / n) + 1e-9  # within sampling error


def test_accuracy_one_hints_the_true_next_layer_experts() -> None:
    hints, _, t = feed(1.0)
    folds = {f.name: f for f in make_folds(t)}
    for (name, i, layer), hint in hints.items():
        assert hint == folds[name].steps[i].routings[layer].experts


def test_wrong_experts_are_distinct_non_activated_and_keep_positions() -> None:
    from hybrimoe_kt.core.types import LayerRouting
    r = LayerRouting.from_topk(1, np.array([[3, 5, 9]]))
    for seed in range(20):
        h = modelled_hint(r, 0.0, 12, np.random.default_rng(seed))
        assert len(h) == 3 and len(set(h)) == 3 and not set(h) & {3, 5, 9}
    full = LayerRouting.from_topk(1, np.array([[0, 1], [2, 3]]))
    assert modelled_hint(full, 0.0, 4, np.random.default_rng(0)) == ()  # no wrong expert left


def test_deterministic_per_seed() -> None:
    a1, _, _ = feed(0.7, seed=3)
    a2, _, _ = feed(0.7, seed=3)
    b, _, _ = feed(0.7, seed=4)
    assert a1 == a2 and a1 != b
    s = SimSetup(trace(), "small", get_model(MODEL), dataclasses.replace(load_profile("rtx5090-ddr5"), gpu_mem_gib=0.0))
    r1 = simulate(s, [variant(0.7, 3)], [0.25], workers=1)
    r2 = simulate(s, [variant(0.7, 3)], [0.25], workers=1)
    assert r1[0]["decode_tok_s"] == r2[0]["decode_tok_s"] and r1[0]["decode_hit_rate"] == r2[0]["decode_hit_rate"]


def test_perfect_hints_raise_the_hit_rate_over_wrong_ones() -> None:
    s = SimSetup(trace(), "small", get_model(MODEL), dataclasses.replace(load_profile("rtx5090-ddr5"), gpu_mem_gib=0.0),
                 host_cost="zero")
    recs = {r["strategy"]: r for r in simulate(s, [BASE, variant(0.0), variant(1.0)], [0.25], workers=1)}
    assert recs[variant(1.0).name]["decode_hit_rate"] > recs[variant(0.0).name]["decode_hit_rate"]
    assert recs[variant(1.0).name]["prefill_tok_s"] == pytest.approx(recs[BASE.name]["prefill_tok_s"])


def test_refusals() -> None:
    with pytest.raises(ValueError, match="step cadence"):
        with_overrides(STRATEGIES["hybrimoe"], prefetch="hidden")
    with pytest.raises(ValueError, match="hidden_accuracy"):
        with_overrides(BASE, hidden_accuracy=0.5)  # no hidden prefetch
    with pytest.raises(ValueError, match="hidden_accuracy"):
        variant(1.5)
    s = SimSetup(trace(), "small", get_model(MODEL), dataclasses.replace(load_profile("rtx5090-ddr5"), gpu_mem_gib=0.0))
    with pytest.raises(ValueError, match="models hidden-state hints"):
        simulate(s, [with_overrides(BASE, name="hybrimoe-layer/x", prefetch="hidden")], [0.25], workers=1)


def test_gate_cost_counts_launches_the_gemv_the_copy_and_the_hook() -> None:
    p, m = load_profile("rtx4090-ddr5"), get_model("mixtral-8x7b")
    base = 2 * p.gpu.call_overhead_us + p.pcie.latency_us
    t = gate_cost_s(p, m, hook_host_us=0.0) * 1e6
    assert base < t < base + 1.0  # the GEMV itself: 64 KiB of weights, well under a microsecond
    assert gate_cost_s(p, m, hook_host_us=10.0) * 1e6 == pytest.approx(t + 10.0 * p.host.scale)
