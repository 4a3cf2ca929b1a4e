"""scripts/bench_prefill.py in quick mode: simulated and CPU-stand-in prefill rows, labelled, with the
mode each prefill layer took and provenance."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quick_prefill_bench(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_prefill.py"), "--quick", "--threads", "1",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    for key in ("commit", "dirty", "machine", "seed", "wall_s"):
        assert key in rep, key
    sim = rep["simulated"]
    assert sim["label"].startswith("SIMULATED") and sim["rows"]
    for r in sim["rows"]:
        assert set(r["prefill_tok_s"]) == {"stock", "static-frequency", "hybrimoe/no-stream", "hybrimoe"}
        assert all(v > 0 for v in r["prefill_tok_s"].values())
        assert sum(r["layer_modes"].values()) > 0 and r["stage_used"] <= r["stage_copies"]
        assert r["stream_over_no_stream"] > 0.9  # streaming is chosen only where it is priced to pay
        assert r["stream_buffers_gib"] > 0 and r["gpu_format"] == "q4_k_m"
    meas = rep["measured_cpu_stand_in"]
    assert "CPU stand-in" in meas["label"] and meas["rows"]
    for r in meas["rows"]:
        for name in ("stock", "hybrimoe/no-stream", "hybrimoe"):
            assert r[name]["prefill_tok_s"] > 0 and r[name]["wall_s"] > 0
        assert r["stock"]["layer_modes"]["stream"] == 0 and r["hybrimoe/no-stream"]["stage_copies"] == 0
        assert sum(r["hybrimoe"]["layer_modes"].values()) == meas["shape"]["n_layers"]
