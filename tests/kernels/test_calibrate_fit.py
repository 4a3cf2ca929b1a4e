from __future__ import annotations

import pytest

from hybrimoe_kt.measure.calibrate_fit import ExpertSample, fit_tier

B = 3 * 1024 * 2048 * 2   # bf16 expert bytes
F = 2.0 * 3 * 1024 * 2048  # flops per token


def _t(n: int, b: float = B, f: float = F, o: float = 40e-6, bw: float = 30e9, tf: float = 0.4e12) -> float:
    return o + max(b / bw, n * f / tf)


def test_recovers_known_parameters() -> None:
    samples = [ExpertSample(B, F, n, _t(n)) for n in (1, 2, 4, 8, 16, 32, 64, 128)]
    samples += [ExpertSample(B / d, F / d, 1, _t(1, B / d, F / d)) for d in (2, 4)]
    fit = fit_tier(samples)
    assert fit.mem_bw_gbs == pytest.approx(30.0, rel=0.01)
    assert fit.tflops == pytest.approx(0.4, rel=0.01)
    assert fit.expert_overhead_us == pytest.approx(40.0, rel=0.02)
    assert fit.mem_bw_source == "fit" and fit.rel_rms < 1e-3


def test_recovers_parameters_under_noise() -> None:
    noise = [1.02, 0.98, 1.01, 0.99, 1.03, 0.97, 1.0, 1.02, 0.99, 1.01]
    ns = (1, 2, 4, 8, 16, 32, 64, 128)
    samples = [ExpertSample(B, F, n, _t(n) * z) for n, z in zip(ns, noise)]
    samples += [ExpertSample(B / d, F / d, 1, _t(1, B / d, F / d) * z) for d, z in zip((2, 4), noise[8:])]
    fit = fit_tier(samples)
    assert fit.mem_bw_gbs == pytest.approx(30.0, rel=0.1)
    assert fit.tflops == pytest.approx(0.4, rel=0.1)


def test_compute_bound_kernel_reports_unidentified_bandwidth() -> None:
    slow = 0.02e12  # compute bound already at one token: bytes / bandwidth is never observed
    samples = [ExpertSample(B, F, n, _t(n, tf=slow)) for n in (1, 2, 4, 8)]
    fit = fit_tier(samples)
    assert fit.tflops == pytest.approx(0.02, rel=0.01)
    assert fit.mem_bw_source == "compute-bound lower bound"
    assert fit.mem_bw_gbs == pytest.approx(B * slow / F / 1e9, rel=0.01)
    with_read = fit_tier(samples, read_bw_gbs=100.0)
    assert with_read.mem_bw_source == "machine read bandwidth" and with_read.mem_bw_gbs == 100.0
    assert with_read.predict(samples) == pytest.approx(fit.predict(samples), rel=1e-6)


def test_needs_two_positive_samples() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        fit_tier([ExpertSample(B, F, 1, 1e-3)])
    with pytest.raises(ValueError, match="tokens"):
        ExpertSample(B, F, 0, 1e-3)
