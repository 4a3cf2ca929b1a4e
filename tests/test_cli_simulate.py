"""``hybrimoe-kt simulate`` end to end, in-process: the table, the JSON records, the plot, and one-line
errors with exit code 2 for bad inputs.

``synthetic:PRESET`` traces are full-size (64 prompt + 128 decode tokens per request, every MoE
layer), too slow for a unit test, so a small synthetic trace is saved to a file and passed by path.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hybrimoe_kt.cli import main
from hybrimoe_kt.traces.format import save_trace
from hybrimoe_kt.traces.synthetic import synthetic_trace

ERROR_PREFIX = "hybrimoe-kt simulate: error:"


@pytest.fixture(scope="module")
def small_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    stem = tmp_path_factory.mktemp("trace") / "small"
    save_trace(synthetic_trace("deepseek-v2-lite", n_requests=2, prompt_len=16, decode_len=24, n_layers=4),
               stem)
    return stem


def sim_args(trace: Path, *extra: str) -> list[str]:
    return ["simulate", "--trace", str(trace), "--model", "deepseek-v2-lite", "--no-progress", *extra]


def test_simulate_writes_table_json_and_plot(small_trace: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out_json, out_png = tmp_path / "out" / "records.json", tmp_path / "plot.png"
    rc = main(sim_args(small_trace, "--cache-ratio", "0.5", "--strategies", "stock,hybrimoe",
                       "--json", str(out_json), "--plot", str(out_png)))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "SIMULATED" in captured.out
    assert "hybrimoe" in captured.out and "decode tok/s" in captured.out
    assert "Traceback" not in captured.err
    records = json.loads(out_json.read_text())
    assert [(r["strategy"], r["cache_ratio"]) for r in records] == [("stock", 0.5), ("hybrimoe", 0.5)]
    for r in records:
        for key in ("strategy", "cache_ratio", "decode_tok_s", "prefill_tok_s", "hit_rate", "pcie_gb",
                    "commit"):
            assert key in r, key
        assert r["kind"] == "simulated"
        assert r["decode_tok_s"] > 0 and 0.0 <= r["hit_rate"] <= 1.0
        assert r["model"] == "deepseek-v2-lite"
    assert records[0]["speedup_vs_stock"] == 1.0
    assert out_png.is_file() and out_png.stat().st_size > 0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stock_is_added_when_missing(small_trace: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "r.json"
    assert main(sim_args(small_trace, "--cache-ratio", "0.25", "--strategies", "static-frequency",
                         "--json", str(out_json))) == 0
    capsys.readouterr()
    assert [r["strategy"] for r in json.loads(out_json.read_text())] == ["stock", "static-frequency"]


def bad_profile(tmp_path: Path) -> Path:
    from hybrimoe_kt.core.hardware import load_profile

    d = json.loads(load_profile("rtx4090-ddr5").to_json())
    d["gpu"]["turbo_mode"] = True
    p = tmp_path / "profile.json"
    p.write_text(json.dumps(d))
    return p


BAD_INPUTS = {
    "unknown strategy": (["--strategies", "stock,no-such-strategy"], "no-such-strategy"),
    "ratio above 1": (["--cache-ratio", "1.5"], "1.5"),
    "ratio not a number": (["--cache-ratio", "abc"], "abc"),
    "unknown hardware": (["--hardware", "no-such-gpu"], "no-such-gpu"),
    "model mismatch": (["--model", "mixtral-8x7b"], "mixtral-8x7b"),
    "profile unknown key": (["--hardware", "PROFILE"], "turbo_mode"),
    "missing trace": (["--trace", "MISSING"], "not found"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(case: str, small_trace: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    extra, needle = BAD_INPUTS[case]
    extra = [str(bad_profile(tmp_path)) if a == "PROFILE" else
             str(tmp_path / "nope" / "missing") if a == "MISSING" else a for a in extra]
    rc = main(sim_args(small_trace, "--cache-ratio", "0.5", *extra) if "--cache-ratio" not in extra
              else sim_args(small_trace, *extra))
    captured = capsys.readouterr()
    assert rc == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(ERROR_PREFIX)
    assert needle in lines[0]
    assert "Traceback" not in captured.err
    assert "SIMULATED" not in captured.out


def test_real_process_stderr_is_one_line_for_a_model_mismatch(small_trace: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "hybrimoe_kt.cli",
                           *sim_args(small_trace, "--model", "mixtral-8x7b")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(ERROR_PREFIX)
    assert len(lines) == 1, proc.stderr


def profile_without_gpu_memory(tmp_path: Path) -> Path:
    from hybrimoe_kt.core.hardware import load_profile

    d = json.loads(load_profile("rtx4090-ddr5").to_json())
    d["gpu_mem_gib"] = 0.0
    p = tmp_path / "no-mem.json"
    p.write_text(json.dumps(d))
    return p


def test_cache_ratio_max_in_a_list(small_trace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hybrimoe_kt.core.memory import GIB, max_cache_ratio
    from hybrimoe_kt.core.models import get_model

    model = get_model("deepseek-v2-lite")
    best = max_cache_ratio(model, "bf16", 24.0)  # 48 of 64 experts per layer (hand check in tests/core)
    assert best == 0.75
    out_json = tmp_path / "r.json"
    rc = main(sim_args(small_trace, "--cache-ratio", "0.25,max", "--strategies", "lru-offload",
                       "--gpu-format", "bf16", "--json", str(out_json)))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "--cache-ratio max: 0.75" in captured.out
    records = json.loads(out_json.read_text())
    assert sorted({r["cache_ratio"] for r in records}) == [0.25, 0.75]
    lru = next(r for r in records if r["strategy"] == "lru-offload" and r["cache_ratio"] == 0.75)
    assert lru["cache_gib"] == pytest.approx(48 * 26 * model.expert_bytes("bf16") / GIB, abs=1e-3)
    assert lru["memory_gib"]["total"] <= 24.0 and lru["memory_gib"]["gpu_mem"] == 24.0
    assert lru["memory_gib"]["expert_cache"] == lru["cache_gib"]
    stock = next(r for r in records if r["strategy"] == "stock" and r["cache_ratio"] == 0.75)
    assert stock["cache_gib"] == 0.0  # stock holds no expert cache


def test_cache_gib_sizes_whole_slots(small_trace: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    from hybrimoe_kt.core.memory import GIB
    from hybrimoe_kt.core.models import get_model

    per_slot = 26 * get_model("deepseek-v2-lite").expert_bytes("q4_k_m") / GIB  # one slot in each MoE layer
    out_json = tmp_path / "r.json"
    rc = main(sim_args(small_trace, "--cache-gib", "2,4", "--strategies", "lru-offload", "--json", str(out_json)))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    got = {r["cache_ratio"]: r["cache_gib"] for r in json.loads(out_json.read_text()) if r["strategy"] != "stock"}
    assert len(got) == 2
    for want, gib in zip((2.0, 4.0), sorted(got.values())):
        assert want - per_slot < gib <= want
    assert all(r * 64 == int(r * 64) for r in got)  # whole slots per layer


def test_a_cache_that_does_not_fit_is_refused(small_trace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(sim_args(small_trace, "--cache-ratio", "0.5,1.0", "--strategies", "lru-offload", "--gpu-format", "bf16"))
    captured = capsys.readouterr()
    assert rc == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), captured.err
    assert "cache ratio 1 " in lines[0] and "needs 30." in lines[0] and "has 24 GiB" in lines[0]
    assert "largest cache ratio that fits is 0.75" in lines[0]
    assert "SIMULATED" not in captured.out  # refused before any work


def test_without_gpu_memory_nothing_is_refused(small_trace: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               caplog: pytest.LogCaptureFixture) -> None:
    rc = main(sim_args(small_trace, "--cache-ratio", "1.0", "--strategies", "lru-offload", "--hardware",
                       str(profile_without_gpu_memory(tmp_path))))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "cache ratios are not checked against GPU memory" in caplog.text


BAD_CACHE_FLAGS = {
    "both flags": (["--cache-ratio", "0.5", "--cache-gib", "4"], "both size the cache"),
    "gib not a number": (["--cache-gib", "4,lots"], "4,lots"),
    "gib negative": (["--cache-gib", "-2"], "-2"),
    "gib below one slot per layer": (["--cache-gib", "0.1"], "holds no slot"),
    "max without gpu memory": (["--cache-ratio", "max", "--hardware", "NOMEM"], "no gpu_mem_gib"),
    "empty list": (["--cache-ratio", ","], "at least one value"),
}


@pytest.mark.parametrize("case", list(BAD_CACHE_FLAGS))
def test_bad_cache_flags_are_one_line_and_exit_2(case: str, small_trace: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    extra, needle = BAD_CACHE_FLAGS[case]
    extra = [str(profile_without_gpu_memory(tmp_path)) if a == "NOMEM" else a for a in extra]
    rc = main(sim_args(small_trace, "--strategies", "lru-offload", *extra))
    captured = capsys.readouterr()
    assert rc == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), captured.err
    assert needle in lines[0]
    assert "SIMULATED" not in captured.out


def test_slots_default_to_the_host_format(small_trace: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Slots hold the CPU tier's blocks (copied unchanged): DeepSeek-V2-Lite's Q4_K experts all fit 24 GiB
    beside hybrimoe's staging buffers, and the dense weights stay bf16."""
    out_json = tmp_path / "r.json"
    rc = main(sim_args(small_trace, "--cache-ratio", "max", "--strategies", "hybrimoe", "--json", str(out_json)))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "--cache-ratio max: 1 for deepseek-v2-lite (q4_k_m)" in captured.out
    rec = next(r for r in json.loads(out_json.read_text()) if r["strategy"] == "hybrimoe")
    assert rec["gpu_format"] == rec["cpu_format"] == "q4_k_m" and rec["dense_format"] == "bf16"
    assert rec["memory_gib"]["stream_buffers"] > 0 and rec["memory_gib"]["total"] <= 24.0
