"""Measure this machine's CPU tier with the real CPU expert kernel and write a hardware profile.

CPU tier. A backend holds E BF16 experts (H x I); a call routes n tokens to the same k experts, so
each expert serves n tokens. Calls with every expert masked give the call overhead C (the smallest over
the sweep); real calls give T(n); the per-expert time is (T(n) - C) / k.

Honesty measures: the k experts rotate between repeats over a layer of at least ``rotate_mib`` of
weights (more experts for smaller shapes), so an expert's weights have left the last-level cache before
it runs again and come from DRAM as in a real model (streaming a flush buffer between calls instead
slowed the next call down beyond the cache effect); masked and real calls alternate so both see the
same machine state, and the token counts of a shape are timed round robin; each timing is the minimum of repeats (other
processes only add time; every repeat is kept in the profile); one-token calls at I/2 and I/4
separate the per-expert overhead (constant) from the weight and compute terms (proportional to the
expert size). ``calibrate_fit.fit_tier`` fits
the roofline to all samples and the command prints each sample's prediction error.

GPU tier and PCIe link: measured with torch when CUDA is available (``calibrate_gpu``), else copied
from a preset, and the profile says so.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hybrimoe_kt.core.hardware import HardwareProfile, Tier, load_profile
from hybrimoe_kt.measure.calibrate_fit import ExpertSample, TierFit, fit_tier
from hybrimoe_kt.measure.provenance import cpu_model, git_commit

log = logging.getLogger(__name__)

DEFAULT_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(frozen=True, slots=True)
class CalibrateConfig:
    backend: str = "auto"
    threads: int | None = None          # None: physical cores - 1
    hidden: int = 1024
    intermediate: int = 2048
    experts: int = 8
    top_k: int = 2                      # experts per timed call
    tokens: tuple[int, ...] = DEFAULT_TOKENS
    repeats: int = 10
    size_fractions: tuple[int, ...] = (2, 4)  # extra one-token shapes at I/2, I/4
    gpu_from: str = "rtx4090-ddr5"
    name: str = "this-machine"
    seed: int = 0
    rotate_mib: int = 128               # weights cycled through per shape: several times the LLC

    def __post_init__(self) -> None:
        for f in ("hidden", "intermediate", "experts", "top_k", "repeats", "rotate_mib"):
            if getattr(self, f) < 1:
                raise ValueError(f"--{f} must be >= 1, got {getattr(self, f)}")
        if self.top_k > self.experts:
            raise ValueError(f"top_k={self.top_k} must be <= experts={self.experts}; raise --experts")
        if not self.tokens or min(self.tokens) < 1:
            raise ValueError(f"--tokens must be positive integers like 1,2,4,8, got {self.tokens}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")


@dataclass
class CalibrationResult:
    profile: HardwareProfile
    cpu_samples: list[ExpertSample]
    cpu_fit: TierFit
    raw: list[dict[str, Any]] = field(default_factory=list)


def read_bandwidth_gbs(nbytes: int = 256 << 20, repeats: int = 5, lib: str = "numpy") -> float:
    """Single-thread streaming read bandwidth: the best of ``repeats`` sums over a buffer much larger than
    the caches, with numpy (``lib="numpy"``) or torch (``"torch"``)."""
    if lib == "torch":
        import torch

        buf = torch.ones(nbytes // 4, dtype=torch.float32)
    elif lib == "numpy":
        buf = np.ones(nbytes // 8, dtype=np.float64)
    else:
        raise ValueError(f"lib must be numpy or torch, got {lib!r}")
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def busy_cpus(interval_s: float = 0.5) -> float | None:
    """CPUs' worth of non-idle time over ``interval_s`` from /proc/stat (None where unavailable)."""
    def snap() -> tuple[int, int]:
        vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(vals), vals[3] + (vals[4] if len(vals) > 4 else 0)  # total, idle + iowait

    try:
        t0, i0 = snap()
        time.sleep(interval_s)
        t1, i1 = snap()
    except (OSError, ValueError, IndexError):
        return None
    return (1.0 - (i1 - i0) / max(t1 - t0, 1)) * (os.cpu_count() or 1)


def _stat(xs: list[float]) -> float:
    return float(min(xs))


def _time_sweep(points: list[tuple[Any, int]], k: int, repeats: int, gen: Any,
                bar: Any) -> list[tuple[list[float], list[float]]]:
    """Seconds of real and of fully masked calls for each (backend, n tokens) point, n tokens routed
    to k experts that rotate over the backend's layer.

    Round robin: every round times each point once (a masked call right before its real call, so
    both see the same machine state); a burst of load from other processes then hits one round of
    every point instead of all repeats of one point. Round 0 is an untimed warm-up.
    """
    import torch

    inputs = [(torch.randn(n, be.hidden, generator=gen).to(torch.bfloat16),  # [n, H]
               torch.rand(n, k, generator=gen),                               # [n, k]
               torch.empty(n, be.hidden, dtype=torch.bfloat16))               # [n, H]
              for be, n in points]
    times: list[tuple[list[float], list[float]]] = [([], []) for _ in points]
    calls = [0] * len(points)
    for r in range(repeats + 1):
        for p, ((be, n), (x, w, out)) in enumerate(zip(points, inputs)):
            ids = ((torch.arange(k) + calls[p] * k) % be.n_experts).repeat(n, 1).contiguous()  # [n, k]
            calls[p] += 1
            for is_masked, dest in ((True, times[p][1]), (False, times[p][0])):
                be.gpu_mask.fill_(is_masked)  # in place: the backend reads it at compute time
                t0 = time.perf_counter()
                be.forward(x, ids, w, out)
                dt = time.perf_counter() - t0
                if r:
                    dest.append(dt)
            be.gpu_mask.fill_(False)
            bar.update(1)
    return times


def _weights(e: int, h: int, i: int, gen: Any) -> tuple[Any, Any, Any]:
    import torch

    gate = (torch.randn(e, i, h, generator=gen) / h**0.5).to(torch.bfloat16)  # [E, I, H]
    up = (torch.randn(e, i, h, generator=gen) / h**0.5).to(torch.bfloat16)    # [E, I, H]
    down = (torch.randn(e, h, i, generator=gen) / i**0.5).to(torch.bfloat16)  # [E, H, I]
    return gate, up, down


def measure_cpu(cfg: CalibrateConfig, progress: bool = True) -> tuple[list[ExpertSample],
                                                                       list[dict[str, Any]], dict[str, Any]]:
    """Run the sweep; returns per-expert samples, raw rows and backend facts."""
    import torch
    from tqdm import tqdm

    from hybrimoe_kt.kernels.cpu_backend import default_threads, make_cpu_backend

    threads = cfg.threads or default_threads()
    gen = torch.Generator().manual_seed(cfg.seed)
    shapes = [cfg.intermediate] + [cfg.intermediate // d for d in cfg.size_fractions
                                   if cfg.intermediate // d >= 32]
    plan = [(shapes[0], list(cfg.tokens))] + [(i, [1]) for i in shapes[1:]]
    facts: dict[str, Any] = {}
    raw: list[dict[str, Any]] = []
    with tqdm(total=sum(len(t) * (cfg.repeats if len(t) > 1 else 3 * cfg.repeats) + len(t)
                        for _, t in plan), desc="calibrate cpu",
              unit="call", disable=not progress) as bar:
        # One backend alive at a time: an idle kt-kernel worker pool keeps spinning for a while after
        # its last task and slowed another pool's calls by milliseconds when both were alive.
        for inter, token_counts in plan:
            n_exp = max(cfg.experts, -(-(cfg.rotate_mib << 20) // (3 * cfg.hidden * inter * 2)))
            be = make_cpu_backend(cfg.backend, *_weights(n_exp, cfg.hidden, inter, gen), threads,
                                  top_k=cfg.top_k, max_len=max(cfg.tokens))
            facts = facts or {"backend": be.name, "threads": threads,
                              "variant": getattr(be, "variant", "torch")}
            points = [(be, n) for n in token_counts]
            # a lone one-token point is quick: more repeats spread it over a longer stretch of time
            reps = cfg.repeats if len(points) > 1 else 3 * cfg.repeats
            for n, (calls, empty) in zip(token_counts, _time_sweep(points, cfg.top_k, reps, gen, bar)):
                raw.append({"intermediate": inter, "tokens": n, "experts_per_call": cfg.top_k,
                            "experts_in_layer": be.n_experts,
                            "expert_bytes": 3 * cfg.hidden * inter * 2,  # bf16
                            "call_s": calls, "masked_call_s": empty})
            del be, points
    # The masked-call time does not depend on the token count or shape on an idle machine; on a busy
    # one single masked calls can take a scheduler tick. The smallest masked call over the whole sweep
    # is the call overhead subtracted everywhere.
    overhead = min(min(r["masked_call_s"]) for r in raw)
    facts["call_overhead_s"] = overhead
    samples: list[ExpertSample] = []
    for r in raw:
        r["per_expert_s"] = per_expert = (_stat(r["call_s"]) - overhead) / cfg.top_k
        if per_expert > 0:
            samples.append(ExpertSample(r["expert_bytes"], 2.0 * 3 * cfg.hidden * r["intermediate"],
                                        r["tokens"], per_expert))
        else:
            log.warning("I=%d, %d token(s): call not slower than a masked call; sample dropped "
                        "(another process is using the CPU? raise --repeats)", r["intermediate"],
                        r["tokens"])
    return samples, raw, facts


def run_calibration(cfg: CalibrateConfig, progress: bool = True,
                    gpu_measure: Callable[[], tuple[Tier, Any, dict[str, Any]]] | None = None,
                    host_strategies: tuple[str, ...] | None = None) -> CalibrationResult:
    """Measure the CPU tier (and the GPU when ``gpu_measure`` is given) and build the profile; with
    ``host_strategies`` also the runtime's host time per layer call of those strategies."""
    busy = busy_cpus()
    if busy is not None and busy >= 0.5:
        log.warning("%.1f of %d CPU(s) busy before the sweep: other processes compete for the CPU and "
                    "inflate the timings; calibrate on an idle machine, or raise --repeats", busy,
                    os.cpu_count() or 1)
    load_before = os.getloadavg()[0]
    samples, raw, facts = measure_cpu(cfg, progress)
    load_after = os.getloadavg()[0]
    busy_after = busy_cpus()
    read_bw = read_bandwidth_gbs()
    if len(samples) < 2:
        raise ValueError(f"only {len(samples)} usable sample(s): expert calls were not measurably "
                         f"slower than masked calls; raise --repeats or --intermediate")
    fit = fit_tier(samples, read_bw_gbs=read_bw)
    if fit.rel_rms > 0.25:
        log.warning("the roofline fits the samples poorly (relative RMS error %.0f%%); see the table",
                    100 * fit.rel_rms)
    call_overhead_us = facts["call_overhead_s"] * 1e6
    cpu = Tier(mem_bw_gbs=fit.mem_bw_gbs, tflops=fit.tflops, expert_overhead_us=fit.expert_overhead_us,
               call_overhead_us=call_overhead_us)
    preset = load_profile(cfg.gpu_from)
    if gpu_measure is not None:
        gpu, pcie, gpu_raw = gpu_measure()
        gpu_source = "measured with torch.cuda"
    else:
        gpu, pcie, gpu_raw = preset.gpu, preset.pcie, {}
        gpu_source = f"copied from preset {cfg.gpu_from} (no CUDA device)"
    commit, dirty = git_commit()
    for row in raw:
        b = row["expert_bytes"]
        row["predicted_per_expert_s"] = float(fit.predict(
            [ExpertSample(b, 2.0 * 3 * cfg.hidden * row["intermediate"], row["tokens"], 1.0)])[0])
        row["used_in_fit"] = row["per_expert_s"] > 0
    measured: dict[str, Any] = {
        "backend": facts.get("backend"), "backend_variant": facts.get("variant"),
        "threads": facts.get("threads"), "weight_format": "bf16",
        "shape": {"experts": cfg.experts, "hidden": cfg.hidden, "intermediate": cfg.intermediate,
                  "experts_per_call": cfg.top_k},
        "repeats": cfg.repeats, "statistic": "min", "rotate_mib": cfg.rotate_mib, "samples": raw,
        "fit": {"objective": "relative least squares", "rel_rms": fit.rel_rms,
                "mem_bw_source": fit.mem_bw_source},
        "machine_read_bw_gbs": read_bw, "load_average_1min": [load_before, load_after],
        "busy_cpus_before": busy, "busy_cpus_after": busy_after,
        "cpu_model": cpu_model(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit, "git_dirty": dirty, "gpu_source": gpu_source, "gpu": gpu_raw,
        "layer_overhead_source": f"copied from preset {cfg.gpu_from}",
    }
    desc = (f"Measured by hybrimoe-kt calibrate on {measured['cpu_model']}: CPU tier from the "
            f"{facts.get('backend')} backend ({facts.get('variant')}, {facts.get('threads')} thread(s), "
            f"BF16 experts H={cfg.hidden} I={cfg.intermediate}); GPU tier and PCIe {gpu_source}; "
            f"layer_overhead_us copied from preset {cfg.gpu_from}.")
    host = None
    if host_strategies:
        from hybrimoe_kt.measure.host import measure_host

        host = measure_host(host_strategies, backend=cfg.backend, seed=cfg.seed, progress=progress)
        desc += " Host time per layer call measured from the runtime with no-op kernels."
    profile = HardwareProfile(name=cfg.name, cpu=cpu, gpu=gpu, pcie=pcie, host=host,
                              gpu_mem_gib=preset.gpu_mem_gib if gpu_measure is None else float(
                                  gpu_raw.get("mem_gib", preset.gpu_mem_gib)),
                              layer_overhead_us=preset.layer_overhead_us, description=desc,
                              sources=(f"hybrimoe-kt calibrate, commit {commit}",), measured=measured)
    # round-trip through the schema so that what is written is exactly what load_profile accepts
    import json

    profile = HardwareProfile.from_dict(json.loads(profile.to_json()), origin="calibration")
    return CalibrationResult(profile=profile, cpu_samples=samples, cpu_fit=fit, raw=raw)
