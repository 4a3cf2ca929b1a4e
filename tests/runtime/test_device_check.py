"""scripts/device_check.py runs without a GPU (--dry-run: CPU stand-in, tiny shapes) and writes its JSON:
every section, the chat of every family under the stock and hybrimoe rules (the graphed decode step,
run uncaptured, generates what the eager loop does), and every A/B run with decode measured graph off
and graph on (the graph-safe step uncaptured, labelled as such)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hybrimoe_kt.kt.families import FAMILIES

REPO = Path(__file__).resolve().parents[2]
RUNS = {("stock", 0.0), ("static-frequency", 0.25), ("hybrimoe", 0.25), ("static-frequency", 0.5),
        ("hybrimoe", 0.5)}
DECODE_KEYS = ("tok_s", "step_mean_s", "step", "host_us_per_layer", "decode_hit_rate", "gb_copied")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("device_check")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "device_check.py"), "--dry-run",
                           "--out", str(out), "--layers", "2", "--decode-steps", "2", "--budget-s", "240"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "device_check.json").read_text())


def test_device_check_dry_run_writes_every_section(report: dict) -> None:
    for key in ("commit", "dirty", "machine", "mode", "env", "numerics", "chat", "ab", "wall_s"):
        assert key in report, key
    assert report["mode"].startswith("dry-run")
    assert report["wall_s"] > 0
    for name in ("env", "numerics", "chat", "ab"):
        assert "error" not in report[name], report[name].get("traceback", report[name])
    num = report["numerics"]
    assert set(num["hybrid_moe_max_rel_err"]) == {"stock", "static-frequency", "hybrimoe"}
    assert {"decode_n1", "prefill_n64"} <= set(num["gpu_experts_max_rel_err"])
    assert num["worst"] < 3e-2
    gguf = num["gguf_slots_max_rel_err"]  # GGUF slots, per type (the torch path here; Triton too on CUDA)
    assert {f"{t}_torch_n{n}" for t in ("Q8_0", "Q4_K", "Q5_K", "Q6_K", "BF16") for n in (1, 16)} <= set(gguf)
    assert max(gguf.values()) < 3e-2
    assert "needs CUDA" in num["gguf_pinned_store"]["skipped"]  # page-locking is checked on a GPU


def test_chat_covers_every_family_and_the_graphed_step_matches_the_eager_loop(report: dict) -> None:
    chat = report["chat"]
    assert chat["rules_device"] == "cpu" and chat["graph_request"] == "eager"
    assert set(chat["families"]) == set(FAMILIES)
    for family, fam in chat["families"].items():
        assert "error" not in fam and "skipped" not in fam, (family, fam)
        for kind in ("stock", "hybrimoe"):
            pair = fam[kind]
            assert "error" not in pair, (family, kind, pair.get("traceback"))
            assert pair["tier"].startswith("CPU stand-in"), pair["tier"]
            assert pair["strategy"] == kind
            off, graph = pair["modes"]["off"], pair["modes"]["graph"]
            for mode in (off, graph):
                assert "error" not in mode, (family, kind, mode.get("traceback"))
                assert mode["new_tokens"] == len(mode["tokens"]) == chat["max_new_tokens"]
                for key in ("decode_tok_s", "gpu_experts", "cpu_experts", "hit_rate"):
                    assert key in mode, key
            assert off["cuda_graph"] == "off" and graph["cuda_graph"] == "eager"
            # on the CPU stand-in the graphed step is the same computation as the eager loop
            assert pair["graph_tokens_equal"] is True and graph["tokens"] == off["tokens"], (family, kind)
            if kind == "hybrimoe":
                assert graph["gpu_experts"] > 0 and off["gpu_experts"] > 0
            else:
                assert graph["gpu_experts"] == off["gpu_experts"] == 0
    assert chat["pairs_compared"] == 2 * len(FAMILIES) and chat["all_graph_tokens_equal"] is True
    assert chat["graph_modes"] == ["eager"]


def test_ab_measures_every_run_graph_off_and_on(report: dict) -> None:
    ab = report["ab"]
    assert "CPU stand-in" in ab["label"] and "routing replayed from" in ab["label"]
    assert ab["graph_unsupported"] and "not a CUDA device" in ab["graph_unsupported"]
    runs = {(r["strategy"], r["cache_ratio"]): r for r in ab["runs"]}
    assert set(runs) == RUNS
    for key, row in runs.items():
        assert "error" not in row, row.get("traceback")
        for field in ("prefill_ms_per_layer", "decode_ms_per_layer", "decode_hit_rate", "gb_copied",
                      "host_overhead_per_decode_layer", "decode_eager", "decode_graph", "graph", "graph_speedup"):
            assert field in row, (key, field, row.get("graph_traceback"))
        eager, graph = row["decode_eager"], row["decode_graph"]
        assert row["graph"] == graph["mode"] == "eager (CPU stand-in, no capture)"
        for k in DECODE_KEYS:
            assert k in eager and k in graph, k
        assert eager["tok_s"] > 0 and graph["tok_s"] > 0 and row["graph_speedup"] > 0
        assert graph["timed_steps"] == ab["decode_tokens"] - 1
        # the graph-safe step counts every step and serves the experts the eager layer calls do
        assert graph["steps_counted"] == graph["steps"] == ab["decode_tokens"]
        assert graph["decode_hit_rate"] == eager["decode_hit_rate"], key
    assert runs[("stock", 0.0)]["decode_hit_rate"] == 0.0 and runs[("stock", 0.0)]["gb_copied"] == 0.0
    assert runs[("stock", 0.0)]["decode_graph"]["decode_hit_rate"] == 0.0
