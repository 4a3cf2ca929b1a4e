"""Measure the GPU tier and the PCIe link with torch.cuda (used by ``calibrate`` when CUDA exists).

GPU tier: the same roofline fit as the CPU tier, on BF16 SiLU-gated experts run as three GEMMs,
timed with CUDA events; experts rotate over a set larger than the L2 cache. The call overhead is the
time of a launch that does no expert work. PCIe: pinned host-to-device copies of a small and an
expert-sized buffer; latency and bandwidth from the two-point line t(b) = latency + b / bandwidth.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from hybrimoe_kt.core.hardware import Link, Tier
from hybrimoe_kt.measure.calibrate_fit import ExpertSample, fit_tier

log = logging.getLogger(__name__)


def _cuda_time(fn: Any, repeats: int) -> float:
    """Median seconds of fn() over repeats, after one warm-up, timed with CUDA events."""
    import torch

    fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    return float(np.median(times))


def measure_gpu(hidden: int, intermediate: int, tokens: tuple[int, ...], repeats: int = 10,
                n_experts: int = 32) -> tuple[Tier, Link, dict[str, Any]]:
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        raise ValueError("no CUDA device: calibrate copies the GPU tier from --gpu-from instead")
    dev = torch.device("cuda")
    h, i = hidden, intermediate
    gate = torch.randn(n_experts, i, h, device=dev, dtype=torch.bfloat16) / h**0.5  # [E, I, H]
    up = torch.randn(n_experts, i, h, device=dev, dtype=torch.bfloat16) / h**0.5    # [E, I, H]
    down = torch.randn(n_experts, h, i, device=dev, dtype=torch.bfloat16) / i**0.5  # [E, H, I]
    state = {"e": 0}

    def expert(x: torch.Tensor) -> torch.Tensor:
        e = state["e"] = (state["e"] + 1) % n_experts
        return F.linear(F.silu(F.linear(x, gate[e])) * F.linear(x, up[e]), down[e])

    samples, raw = [], []
    for n in tokens:
        x = torch.randn(n, h, device=dev, dtype=torch.bfloat16)  # [n, H]
        t = _cuda_time(lambda: expert(x), repeats)
        samples.append(ExpertSample(3 * h * i * 2, 2.0 * 3 * h * i, n, t))
        raw.append({"tokens": n, "per_expert_s": t})
    fit = fit_tier(samples)
    empty = torch.zeros(1, device=dev)
    call_s = _cuda_time(lambda: empty.add_(1), repeats)
    gpu = Tier(mem_bw_gbs=fit.mem_bw_gbs, tflops=fit.tflops, expert_overhead_us=fit.expert_overhead_us,
               call_overhead_us=call_s * 1e6)

    big = 3 * h * i * 2
    sizes = (4096, big)
    copy_s = []
    for nbytes in sizes:
        src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        copy_s.append(_cuda_time(lambda: dst.copy_(src, non_blocking=True), repeats))
    bw = (sizes[1] - sizes[0]) / max(copy_s[1] - copy_s[0], 1e-9)
    latency = max(copy_s[0] - sizes[0] / bw, 0.0)
    pcie = Link(bw_gbs=bw / 1e9, latency_us=latency * 1e6)
    info = {"device": torch.cuda.get_device_name(0), "samples": raw,
            "mem_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 2),
            "fit_rel_rms": fit.rel_rms,
            "mem_bw_source": fit.mem_bw_source, "call_s": call_s,
            "h2d_copy": [{"bytes": b, "seconds": s} for b, s in zip(sizes, copy_s)]}
    log.info("GPU %s: %.0f GB/s, %.1f TFLOP/s, PCIe %.1f GB/s", info["device"], gpu.mem_bw_gbs,
             gpu.tflops, pcie.bw_gbs)
    return gpu, pcie, info
