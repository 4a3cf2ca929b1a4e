"""scripts/bench_runtime.py --quick runs on the CPU stand-in and writes every section of its JSON;
``--only`` refreshes the GGUF sections of an existing report in place."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from hybrimoe_kt.kernels.gguf_torch import GGUF_SLOT_TYPES
from hybrimoe_kt.measure.provenance import git_commit
from hybrimoe_kt.measure.slot_numerics import GGUF_SLOT_REL_TOL

REPO = Path(__file__).resolve().parents[2]
STRATEGIES = {"stock", "static-frequency", "hybrimoe", "hybrimoe-layer"}
HOST_KEYS = ("critical_median_us", "critical_p90_us", "background_median_us", "upkeep_us_per_layer",
             "upkeep_us_per_step", "ratio_vs_stock", "calls", "steps")
GOAL_KEYS = ("hybrimoe_critical_vs_stock", "hybrimoe_critical_median_us", "goal_ratio_max", "goal_us_max",
             "ratio_met", "us_met", "upkeep_below_step_kernel_time", "step_kernel_time_us",
             "step_kernel_time_source", "runtime_within_10pct_of_bare")
BENCH = str(REPO / "scripts" / "bench_runtime.py")


def check_slot_numerics(num: dict[str, Any]) -> None:
    """Every GGUF slot type has torch-path errors for 1, 4 and 64 tokens, labelled with path and device,
    below the kernel tests' tolerance; Triton figures, where present, too."""
    assert "CPU stand-in" in num["device"] and num["shape"]["hidden"] > 0
    for t in GGUF_SLOT_TYPES:
        row = num[t]
        assert row["tolerance_rel_err"] == GGUF_SLOT_REL_TOL[t]
        torch_path = row["torch"]
        assert torch_path["label"].startswith("torch path") and "CPU stand-in" in torch_path["label"]
        assert set(torch_path["tokens"]) == {"1", "4", "64"}
        for r in torch_path["tokens"].values():
            assert 0 < r["rel_err"] < GGUF_SLOT_REL_TOL[t], (t, r)
            assert 0 < r["max_abs_err"] < r["ref_max_abs"], (t, r)
        assert torch_path["tokens"]["64"]["path"] == "prefill" and torch_path["tokens"]["1"]["path"] == "decode"
        assert torch_path["max_rel_err"] == max(r["rel_err"] for r in torch_path["tokens"].values())
        assert ("triton" in row) != ("triton_skipped" in row), t
        if "triton" in row:
            assert row["triton"]["label"].startswith("Triton kernel")
            assert row["triton"]["max_rel_err"] < GGUF_SLOT_REL_TOL[t], t
        assert row["within_tolerance"] is True, t


def test_quick_bench_writes_host_overhead_goals_and_cpu_tier(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, BENCH, "--quick", "--out", str(out)],
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
    check_slot_numerics(report["gguf_slot_numerics"])


def test_only_refreshes_the_gguf_sections_in_place(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    old = {"commit": "0" * 40, "dirty": False, "host_overhead_per_decode_layer": {"stock": {"calls": 3}},
           "gguf_copy": {"Q4_K": {"prepare_us": 1.0}}}
    out.write_text(json.dumps(old))
    proc = subprocess.run([sys.executable, BENCH, "--only", "gguf_slot_numerics", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in ("commit", "dirty", "host_overhead_per_decode_layer", "gguf_copy"):
        assert report[key] == old[key], key  # the other sections and the full run's provenance stay
    check_slot_numerics(report["gguf_slot_numerics"])
    stamp = report["section_provenance"]["gguf_slot_numerics"]
    assert set(report["section_provenance"]) == {"gguf_slot_numerics"}
    assert stamp["commit"] == git_commit()[0] and "dirty" in stamp  # this tree's, not the full run's
    assert stamp["machine"]["cores"] > 0 and stamp["wall_s"] >= 0


def test_only_needs_an_existing_report(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, BENCH, "--only", "gguf_copy", "--out", str(tmp_path / "none.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "does not exist: run the full benchmark first" in proc.stderr
