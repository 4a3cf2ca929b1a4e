"""scripts/device_check.py runs without a GPU (--dry-run: CPU stand-in, tiny shapes) and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_device_check_dry_run_writes_every_section(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "device_check.py"), "--dry-run",
                           "--out", str(tmp_path), "--layers", "2", "--decode-steps", "2", "--budget-s", "120"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "device_check.json").read_text())
    for key in ("commit", "dirty", "machine", "mode", "env", "numerics", "ab", "wall_s"):
        assert key in report, key
    assert report["mode"].startswith("dry-run")
    for name in ("env", "numerics", "ab"):
        assert "error" not in report[name], report[name].get("traceback", report[name])
    num = report["numerics"]
    assert set(num["hybrid_moe_max_rel_err"]) == {"stock", "static-frequency", "hybrimoe"}
    assert {"decode_n1", "prefill_n64"} <= set(num["gpu_experts_max_rel_err"])
    assert num["worst"] < 3e-2
    ab = report["ab"]
    assert "CPU stand-in" in ab["label"] and "routing replayed from" in ab["label"]
    runs = {(r["strategy"], r["cache_ratio"]): r for r in ab["runs"]}
    assert set(runs) == {("stock", 0.0), ("static-frequency", 0.25), ("hybrimoe", 0.25),
                         ("static-frequency", 0.5), ("hybrimoe", 0.5)}
    for row in runs.values():
        assert "error" not in row, row.get("traceback")
        for key in ("prefill_ms_per_layer", "decode_ms_per_layer", "decode_hit_rate", "gb_copied",
                    "host_overhead_per_decode_layer"):
            assert key in row, key
    assert runs[("stock", 0.0)]["decode_hit_rate"] == 0.0 and runs[("stock", 0.0)]["gb_copied"] == 0.0
