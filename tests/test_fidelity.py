"""``hybrimoe-kt fidelity``: a tiny run produces the full report with finite errors; the prediction side is
the simulator's engine (per-layer times add up to the engine's totals, stock layers equal the CPU cost
formula); user errors end in one line and exit code 2. No timing is asserted."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from hybrimoe_kt.cli import main
from hybrimoe_kt.core.cache import ExpertCache
from hybrimoe_kt.core.hardware import load_profile
from hybrimoe_kt.core.models import get_model
from hybrimoe_kt.core.protocols import Clock
from hybrimoe_kt.core.strategies import build_policies, get_strategy, slots_for
from hybrimoe_kt.measure.fidelity import moe_only_cost, sim_steps, simulate_layers
from hybrimoe_kt.sim.engine import replay
from hybrimoe_kt.traces.synthetic import synthetic_trace

REPO = Path(__file__).resolve().parent.parent
PROFILE = REPO / "results" / "profile-this-machine.json"
ERROR_PREFIX = "hybrimoe-kt fidelity: error:"
TINY = ["--layers", "2", "--hidden", "64", "--intermediate", "32", "--steps", "3", "--requests", "1",
        "--prompt-len", "10", "--prefill-chunk", "8", "--repeats", "2", "--backend", "torch"]
STAT_KEYS = {"n", "median", "mean_abs", "p90_abs", "within_20pct", "p10", "p90", "measured_median_ms",
             "predicted_median_ms"}


def _profile() -> str:
    return str(PROFILE) if PROFILE.is_file() else "rtx4090-ddr5"


def test_tiny_run_writes_full_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fid.json"
    rc = main(["fidelity", "--profile", _profile(), "--strategy", "stock,hybrimoe", *TINY,
               "--json", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "CPU tier: goal +-20%" in captured.out and "informative only" in captured.out
    rep = json.loads(out.read_text())
    for key in ("commit", "dirty", "machine", "profile_used", "label", "shape", "cost_model",
                "layer_calls", "strategies", "goal", "busy_cpus_before", "busy_cpus_after", "n_steps"):
        assert key in rep, key
    assert rep["n_steps"] == {"decode": 3, "prefill": 2}  # 10 prompt tokens in chunks of 8
    n_calls = 2 * 5
    assert len(rep["layer_calls"]["step"]) == n_calls
    assert set(rep["strategies"]) == {"stock", "hybrimoe"}
    assert rep["strategies"]["stock"]["goal_applies"] and not rep["strategies"]["hybrimoe"]["goal_applies"]
    assert rep["goal"]["evaluated"] and set(rep["goal"]) >= {"decode_met", "prefill_met"}
    for name, row in rep["strategies"].items():
        blocks = [row] + ([row["first_repeat"]] if name == "stock" else [])
        for block in blocks:
            for level in ("per_layer", "per_step"):
                for phase in ("decode", "prefill"):
                    s = block[level][phase]
                    assert set(s) == STAT_KEYS
                    assert s["n"] > 0
                    assert all(math.isfinite(v) for k, v in s.items() if k != "n"), (name, level, phase)
        calls = row["layer_calls"]
        assert len(calls["measured_s"]) == len(calls["predicted_s"]) == n_calls
        assert all(m > 0 and math.isfinite(m) for m in calls["measured_s"])
    assert len(rep["strategies"]["stock"]["layer_calls"]["all_repeats_s"]) == 2


def _steps(n_layers: int = 3) -> tuple[list, np.ndarray]:
    model = get_model("deepseek-v2-lite")
    trace = synthetic_trace(model, n_requests=2, prompt_len=12, decode_len=6, seed=3, n_layers=n_layers)
    counts = synthetic_trace(model, n_requests=2, prompt_len=12, decode_len=6, seed=4,
                             n_layers=n_layers).expert_counts()
    routes, pre, req = [], [], []
    for f in trace.forwards():
        rows = f.rows
        ids = trace.experts[rows].astype(np.int64)           # [N, L, K]
        w = trace.weights[rows].astype(np.float32)           # [N, L, K]
        routes.append([(ids[:, l], w[:, l]) for l in range(n_layers)])
        pre.append(f.is_prefill)
        req.append(f.seq)
    return sim_steps(routes, pre, req), counts


@pytest.mark.parametrize("strategy", ["stock", "static-frequency", "hybrimoe"])
def test_prediction_is_the_simulator(strategy: str) -> None:
    from dataclasses import replace

    model = get_model("deepseek-v2-lite")
    small = replace(model, hidden=256, expert_intermediate=128)
    cost = moe_only_cost(load_profile(_profile()), small)
    steps, counts = _steps()
    n_layers, n_experts = counts.shape
    spec = get_strategy(strategy)
    slots = slots_for(spec, n_layers, n_experts, 0.25)
    pred = simulate_layers(steps, cost, spec, counts, slots, model.top_k)

    clock = Clock()
    pol = build_policies(spec, n_layers, n_experts, model.top_k, slots, clock, counts=counts)
    cache = ExpertCache(n_layers, n_experts, slots if spec.uses_gpu_cache else 0, pol.eviction,
                        global_pool=spec.pool == "global")
    cache.place(pol.placement)
    st = replay(steps, cost, pol, cache, clock, model.top_k)

    assert len(pred.layer_s) == n_layers * len(steps)
    assert sum(pred.layer_s) == pytest.approx(st.decode_s + st.prefill_s, rel=1e-12)
    decode_sums = [sum(pred.layer_s[i * n_layers:(i + 1) * n_layers])
                   for i, s in enumerate(steps) if not s.is_prefill]
    assert decode_sums == pytest.approx(st.token_latencies_s, rel=1e-9)
    assert (pred.stats.cpu_experts, pred.stats.gpu_experts, pred.stats.hits) == (
        st.cpu_experts, st.gpu_experts, st.hits)
    if strategy == "stock":
        formula = [cost.cpu_call + sum(cost.cpu_expert(n) for n in r.tokens)
                   for s in steps for r in s.routings]
        assert pred.layer_s == pytest.approx(formula, rel=1e-9)


@pytest.mark.parametrize("argv", [
    ["fidelity", "--profile", "/nonexistent/profile.json"],
    ["fidelity", "--profile", "rtx4090-ddr5", "--strategy", "oracle"],
    ["fidelity", "--profile", "rtx4090-ddr5", "--layers", "0"],
])
def test_user_errors_exit_2_with_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), err
    assert "Traceback" not in err
