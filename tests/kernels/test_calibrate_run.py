from __future__ import annotations

import json
from pathlib import Path

import pytest

from hybrimoe_kt.cli import main
from hybrimoe_kt.core.hardware import load_profile
from hybrimoe_kt.measure.calibrate import CalibrateConfig


# The kt-kernel run needs calls measurably slower than masked calls; its hand-off to a worker thread
# makes that need a few repeats when other processes share the CPU.
@pytest.mark.parametrize("backend,repeats", [
    ("torch", 1), pytest.param("kt-kernel", 3, marks=pytest.mark.kt_kernel)])
def test_quick_calibration_writes_loadable_profile(tmp_path: Path, backend: str, repeats: int,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    if backend == "kt-kernel":
        pytest.importorskip("kt_kernel.kt_kernel_ext", reason="kt-kernel extension not importable")
    out = tmp_path / "prof.json"
    host = ["--host-strategies", "stock,hybrimoe"] if backend == "torch" else ["--skip-host"]
    rc = main(["calibrate", "--backend", backend, "--threads", "1", "--hidden", "512",
               "--intermediate", "1024", "--experts", "4", "--tokens", "1,8", "--repeats",
               str(repeats), "--rotate-mib", "16", "--no-progress", "--out", str(out), *host])
    assert rc == 0
    prof = load_profile(out)
    assert prof.name == "prof"
    m = prof.measured
    assert m["backend"] == backend and m["threads"] == 1
    assert m["weight_format"] == "bf16" and m["gpu_source"].startswith(("copied from preset", "measured"))
    assert {(r["intermediate"], r["tokens"]) for r in m["samples"]} == {(1024, 1), (1024, 8), (512, 1),
                                                                        (256, 1)}
    assert m["machine_read_bw_gbs"] > 0 and m["cpu_model"] and m["git_commit"]
    assert prof.cpu.mem_bw_gbs > 0 and prof.cpu.tflops > 0
    printed = capsys.readouterr().out
    assert "per-expert time" in printed
    if backend == "torch":  # host time measured from the runtime, per strategy and phase
        assert prof.host is not None and set(prof.host.strategies) == {"stock", "hybrimoe"}
        for phases in prof.host.strategies.values():
            assert set(phases) == {"decode", "prefill"}
            assert all(t.critical > 0 for t in phases.values())
        assert prof.host.get("oracle", "decode").critical == 0.0  # bounds pay no host time
        assert "host time per MoE layer call" in printed
    else:
        assert prof.host is None
    json.loads(out.read_text())  # plain JSON


def test_bad_arguments_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["calibrate", "--backend", "torch", "--experts", "1", "--top-k", "2",
               "--out", str(tmp_path / "x.json")])
    assert rc == 2
    assert "raise --experts" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--tokens"):
        CalibrateConfig(tokens=())


def test_gpu_measurement_without_cuda_is_value_error() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    from hybrimoe_kt.measure.calibrate_gpu import measure_gpu

    with pytest.raises(ValueError, match="no CUDA device"):
        measure_gpu(64, 128, (1, 2))
