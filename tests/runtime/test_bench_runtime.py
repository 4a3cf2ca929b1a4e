"""scripts/bench_runtime.py --quick runs on the CPU stand-in and writes every section of its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STRATEGIES = {"stock", "static-frequency", "hybrimoe", "hybrimoe-layer"}
HOST_KEYS = ("critical_median_us", "critical_p90_us", "background_median_us", "upkeep_us_per_layer",
             "upkeep_us_per_step", "ratio_vs_stock", "calls", "steps")
GOAL_KEYS = ("hybrimoe_critical_vs_stock", "hybrimoe_critical_median_us", "goal_ratio_max", "goal_us_max",
             "ratio_met", "us_met", "upkeep_below_step_kernel_time", "step_kernel_time_us",
             "step_kernel_time_source", "runtime_within_10pct_of_bare")


def test_quick_bench_writes_host_overhead_goals_and_cpu_tier(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_runtime.py"), "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in ("commit", "dirty", "machine", "profile", "seed", "label", "hotspots", "real_kernels_per_decode_layer",
                "cpu_tier_vs_bare", "wall_s"):
        assert key in report, key
    assert "CPU stand-in" in report["label"]

    host = report["host_overhead_per_decode_layer"]
    assert set(host) == STRATEGIES
    for name, h in host.items():
        for key in HOST_KEYS:
            assert key in h, (name, key)
        assert h["critical_median_us"] > 0 and h["critical_p90_us"] >= h["critical_median_us"], name
        assert h["calls"] > 0 and h["steps"] > 0 and h["ratio_vs_stock"] > 0, name
        assert len(h["ratio_vs_stock_per_round"]) == report["rounds"], name
        assert "CPU stand-in" in h["gpu_tier"]
    assert host["hybrimoe"]["upkeep_us_per_layer"] > 0 and host["hybrimoe"]["upkeep_us_per_step"] > 0
    assert host["stock"]["upkeep_us_per_layer"] == 0
    assert host["stock"]["ratio_vs_stock"] == 1.0

    goals = report["goals"]
    for key in GOAL_KEYS:
        assert key in goals, key
    assert goals["hybrimoe_critical_vs_stock"] == host["hybrimoe"]["ratio_vs_stock"]
    assert goals["hybrimoe_critical_median_us"] > 0 and goals["step_kernel_time_us"] > 0
    assert (goals["goal_ratio_max"], goals["goal_us_max"]) == (1.2, 50)
    for key in ("ratio_met", "us_met", "upkeep_below_step_kernel_time"):
        assert isinstance(goals[key], bool), key

    assert report["hotspots"]["strategy"] == "hybrimoe" and report["hotspots"]["top"]
    assert set(report["real_kernels_per_decode_layer"]) == STRATEGIES
    rows = report["cpu_tier_vs_bare"]
    assert [r["tokens"] for r in rows] == [1, 4, 16, 64]
    assert all(r["runtime_ms"] > 0 and r["bare_ms"] > 0 for r in rows)

    gguf = report["gguf_copy"]
    for t in ("Q4_K", "Q8_0"):
        g = gguf[t]
        assert g["bytes_per_expert"] < g["bf16_bytes_per_expert"]  # slots move the quantized bytes
        assert g["prepare_us"] > 0 and g["memcpy_us"] > 0 and isinstance(g["goal_prepare_le_2x_memcpy"], bool)
        assert g["store_host_bytes_over_expert_bytes"] <= 1.05  # one host copy
