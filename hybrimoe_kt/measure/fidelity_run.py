"""Drive a fidelity run: routing, the runtime's measured layer calls, the simulator's predicted ones.

``run_fidelity`` builds the stack (``runtime.harness``), replays the chosen steps through ``HybridMoE`` per
strategy (the CPU tier with the kt-kernel or torch backend; the GPU tier on the CPU stand-in when no
GPU is used) and through the simulator (``fidelity.simulate_layers``), and returns the report.
``stock`` is measured ``repeats`` times and each layer call keeps its fastest repeat (the statistic of
``calibrate``: other processes only add time); the first repeat alone is reported too.

The stack has, per layer, an attention-like part and the model's shared experts (``--no-dense``: routed
experts only); both run on the GPU tier, here the CPU stand-in, so they are timed alone first and priced
for the simulator from that measurement (``fidelity.stack_cost``). The simulator charges the profile's
host time per strategy and phase (its ``host`` section; without one no host time is charged and the
report says so).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

from hybrimoe_kt.core.hardware import HardwareProfile
from hybrimoe_kt.core.models import get_model
from hybrimoe_kt.core.strategies import slots_for
from hybrimoe_kt.core.host import PHASES
from hybrimoe_kt.measure.fidelity import (CPU_ONLY, LayerCalls, compare, fit_two_point, goal_summary,
                                          moe_only_cost, sim_steps, simulate_layers, stack_cost, strategy_spec)

log = logging.getLogger(__name__)

STANDIN_NOTE = ("informative only: the runtime's GPU tier is the CPU stand-in (torch on this CPU), "
                "which the profile's GPU tier (a preset) does not describe; the +-20% goal applies to "
                "the CPU tier (stock)")


@dataclass(frozen=True, slots=True)
class FidelityConfig:
    trace: Optional[str] = None         # None: a synthetic trace of ``model``
    model: str = "deepseek-v2-lite"
    layers: int = 4
    hidden: int = 1024
    intermediate: int = 512
    strategies: tuple[str, ...] = ("stock", "static-frequency", "hybrimoe")
    steps: int = 64                     # decode steps replayed (prefill chunks before them included)
    requests: int = 2                   # synthetic trace: requests
    prompt_len: int = 40                # synthetic trace: prefill tokens per request
    prefill_chunk: int = 16
    cache_ratio: float = 0.25
    repeats: int = 5                    # stock runs; each layer call keeps its fastest
    warmup_steps: int = 4
    backend: str = "auto"
    threads: int = 1
    seed: int = 0
    one_cpu_pool: bool = False          # diagnostic: every layer runs on layer 0's CPU backend
    dense: bool = True                  # attention-like part and shared experts in every layer

    def __post_init__(self) -> None:
        for f in ("layers", "hidden", "intermediate", "steps", "requests", "prefill_chunk", "repeats",
                  "threads"):
            if getattr(self, f) < 1:
                raise ValueError(f"--{f.replace('_', '-')} must be >= 1, got {getattr(self, f)}")
        if self.prompt_len < 0 or self.warmup_steps < 0:
            raise ValueError("--prompt-len and the warm-up steps must be >= 0")
        if not 0.0 <= self.cache_ratio <= 1.0:
            raise ValueError(f"--cache-ratio must be in [0, 1], got {self.cache_ratio}")
        if not self.strategies:
            raise ValueError("--strategy needs at least one strategy name")
        for s in self.strategies:
            strategy_spec(s)
        get_model(self.model)


def _routing(cfg: FidelityConfig) -> tuple[Any, Optional[np.ndarray], str]:
    """(trace, calibration counts [L, E] never taken from the replayed tokens or None: from the trace's
    rows that are not replayed, trace description)."""
    from hybrimoe_kt.traces.format import load_trace
    from hybrimoe_kt.traces.synthetic import synthetic_trace

    if cfg.trace is None or cfg.trace.startswith("synthetic"):
        decode = -(-cfg.steps // cfg.requests)
        kw = dict(n_requests=cfg.requests, prompt_len=cfg.prompt_len, decode_len=decode,
                  n_layers=cfg.layers)
        trace = synthetic_trace(cfg.model, seed=cfg.seed, **kw)
        counts = synthetic_trace(cfg.model, seed=cfg.seed + 1000, **kw).expert_counts()
        return trace, counts, f"synthetic:{cfg.model} (seed {cfg.seed}, {kw})"
    trace = load_trace(cfg.trace)
    if trace.n_layers < cfg.layers:
        raise ValueError(f"trace {cfg.trace} has {trace.n_layers} MoE layers, fewer than --layers "
                         f"{cfg.layers}")
    return trace, None, cfg.trace


def _replay_steps(rp: Any, n_decode: int) -> list[Any]:
    """Steps in order up to and including the ``n_decode``-th decode step."""
    out, seen = [], 0
    for s in rp:
        if seen >= n_decode:
            break
        out.append(s)
        seen += not s.is_prefill
    return out


def _run_runtime(moe: Any, rp: Any, steps: list[Any], seed: int, dense: Any) -> tuple[Any, float]:
    """The run's record (whole layer times in ``layer_s``), and this process's CPU time (all threads)
    over the run divided by its wall time: well below the threads the run keeps busy means other
    processes took the CPU."""
    from hybrimoe_kt.runtime.harness import run_replay

    c0, t0 = time.process_time(), time.perf_counter()
    rec = run_replay(moe, rp, steps, seed=seed, dense=dense)
    return rec, (time.process_time() - c0) / max(time.perf_counter() - t0, 1e-9)


def _dense_widths(cfg: FidelityConfig) -> tuple[int, int]:
    """(attention-like width A, shared-expert width S) of the reduced stack: the model's attention
    weights and shared experts scaled like its hidden and expert sizes."""
    m = get_model(cfg.model)
    attn_width = max(1, round(m.attn_params * cfg.hidden / (2 * m.hidden * m.hidden)))
    return attn_width, m.n_shared_experts * cfg.intermediate


def run_fidelity(cfg: FidelityConfig, profile: HardwareProfile) -> dict[str, Any]:
    """Measure and predict every layer call of the replayed steps per strategy; returns the report body."""
    import torch

    from hybrimoe_kt.measure.calibrate import busy_cpus
    from hybrimoe_kt.kernels.cpu_backend import make_cpu_backend
    from hybrimoe_kt.kernels.cpu_ktkernel import CpuWorkerPool
    from hybrimoe_kt.runtime.dense_parts import DenseParts
    from hybrimoe_kt.runtime.device import Tier
    from hybrimoe_kt.runtime.harness import StackShape, random_store, run_replay
    from hybrimoe_kt.runtime.moe import HybridMoE
    from hybrimoe_kt.runtime.replay import RoutingReplay

    t_start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    tier = Tier("cpu")
    dense, standin = None, None
    if cfg.dense:
        attn_width, shared_inter = _dense_widths(cfg)
        dense = DenseParts(cfg.layers, cfg.hidden, attn_width, shared_inter, tier.device, seed=cfg.seed)
        shape = StackShape(cfg.model, cfg.layers, cfg.hidden, cfg.intermediate, shared_inter, dense.attn_params)
        n_max = max(cfg.prefill_chunk, 1)
        (a1, s1), (an, sn) = dense.measure(1), dense.measure(n_max)
        attn_fit, shared_fit = fit_two_point(a1, an, n_max), fit_two_point(s1, sn, n_max)
        cost = stack_cost(profile, shape.preset(), attn_fit, shared_fit)
        standin = {"tokens": [1, n_max], "attention_s": [a1, an], "shared_s": [s1, sn],
                   "fit": "max(mem, n * per_token) through both points"}
    else:
        shape = StackShape(cfg.model, cfg.layers, cfg.hidden, cfg.intermediate)
        cost = moe_only_cost(profile, shape.preset())
    trace, counts, trace_desc = _routing(cfg)
    rp = RoutingReplay(trace, shape.preset(), prefill_chunk=cfg.prefill_chunk)
    steps = _replay_steps(rp, cfg.steps)
    if not steps:
        raise ValueError(f"trace {trace_desc} has no steps to replay")
    if counts is None:  # a trace file: calibrate on the rows that are not replayed (none: no counts)
        replayed = np.concatenate([s.rows for s in steps])
        counts = trace.expert_counts(np.setdiff1d(np.arange(trace.n_tokens), replayed))
    counts = counts[:cfg.layers]
    calib = counts if counts.any() else None  # all zero: static-frequency refuses, caches start empty
    routes = [[tuple(t.numpy() for t in rp.routing(s, l)) for l in range(cfg.layers)] for s in steps]
    ssteps = sim_steps(routes, [s.is_prefill for s in steps], [s.forward for s in steps])
    calls = LayerCalls.of(ssteps)

    busy_before = busy_cpus()
    load_before = os.getloadavg()[0]
    store = random_store(shape, seed=cfg.seed)
    t0 = time.perf_counter()
    built = store.layers[:1] if cfg.one_cpu_pool else store.layers
    workers = CpuWorkerPool(cfg.threads)  # one kt-kernel worker pool for all layers, as the runtime does
    backends = [make_cpu_backend(cfg.backend, lw.gate, lw.up, lw.down, cfg.threads, top_k=shape.top_k,
                                 max_len=max(cfg.prefill_chunk, 1), pool=workers, layer_idx=i)
                for i, lw in enumerate(built)]
    if cfg.one_cpu_pool:  # one worker pool serves every layer (same shape, layer 0's weights)
        backends = backends * cfg.layers
    t_build = time.perf_counter() - t0
    backend_desc = (f"{backends[0].name} ({getattr(backends[0], 'variant', 'torch')}), {cfg.threads} "
                    f"thread(s), " + ("ONE backend for all layers (diagnostic: layer 0's weights serve "
                                      "every layer; timings only)" if cfg.one_cpu_pool
                                      else "one backend per layer, one shared worker pool"))

    def make(name: str) -> HybridMoE:
        spec = strategy_spec(name)
        return HybridMoE(store, tier, spec, slots_for(spec, cfg.layers, shape.n_experts, cfg.cache_ratio),
                         cost, shape.top_k, counts=calib, cpu_backends=backends,
                         max_len=max(cfg.prefill_chunk, 1))

    warm = _replay_steps(rp, cfg.warmup_steps)
    if warm:
        run_replay(make(CPU_ONLY), rp, warm, seed=cfg.seed + 7, timed=False, dense=dense)  # page in buffers
    results: dict[str, Any] = {}
    for name in cfg.strategies:
        spec = strategy_spec(name)
        reps = cfg.repeats if name == CPU_ONLY else 1
        runs, shares, moe, background = [], [], None, []
        for r in range(reps):
            moe = make(name)
            with torch.no_grad():
                rec, share = _run_runtime(moe, rp, steps, cfg.seed + 1, dense)
            runs.append(rec.layer_s)
            background.append(rec.layer_background_s)
            shares.append(round(share, 3))
        measured = np.min(np.asarray(runs), axis=0).tolist()
        host = None if profile.host is None else {p: profile.host.get(name, p, profile.name) for p in PHASES}
        pred = simulate_layers(ssteps, cost, spec, counts, slots_for(spec, cfg.layers, shape.n_experts,
                                                                     cfg.cache_ratio), shape.top_k, host)
        row: dict[str, Any] = {
            "description": spec.description,
            "goal_applies": name == CPU_ONLY,
            "tiers": "CPU tier only (every routed expert on the CPU kernel)" if name == CPU_ONLY
                     else STANDIN_NOTE,
            "process_cpu_per_wall": shares,
            "repeats": reps, "statistic": "min over repeats per layer call" if reps > 1 else "single run",
            **compare(calls, pred.layer_s, measured),
            "runtime_hit_rate": round(float(moe.cache.counters.hit_rate), 4) if moe else None,
            "simulated_hit_rate": round(float(pred.hit_rate), 4),
            "host_charged_us": None if host is None else
            {p: {"critical": round(t.critical * 1e6, 2), "background": round(t.background * 1e6, 2)}
             for p, t in host.items()},
            "runtime_background_median_us": {
                ph: round(1e6 * float(np.median([b for b, pre in zip(background[0], calls.prefill)
                                                 if pre == want] or [0.0])), 2)
                for ph, want in (("decode", False), ("prefill", True))},
            "runtime_gpu_experts": moe.stats.gpu_experts if moe else 0,
            "runtime_cpu_experts": moe.stats.cpu_experts if moe else 0,
            "simulated_gpu_experts": pred.stats.gpu_experts,
            "simulated_cpu_experts": pred.stats.cpu_experts,
            "layer_calls": {"measured_s": [round(x, 7) for x in measured],
                            "predicted_s": [round(x, 7) for x in pred.layer_s]},
        }
        if reps > 1:
            row["first_repeat"] = compare(calls, pred.layer_s, runs[0])
            row["layer_calls"]["all_repeats_s"] = [[round(x, 7) for x in run] for run in runs]
        results[name] = row
        del moe
    busy_after = busy_cpus()
    return {
        "label": f"runtime on this machine vs simulator with the calibrated profile; {rp.label}; "
                 f"random bf16 weights; GPU tier = {tier.label}",
        "config": {**asdict(cfg), "strategies": list(cfg.strategies)},
        "routing": trace_desc,
        "shape": shape.describe(),
        "cpu_backend": backend_desc,
        "torch_threads": torch.get_num_threads(),
        "cost_model": {"weights": "bf16 on both tiers", "cpu_call_s": cost.cpu_call,
                       "cpu_expert_fixed_s": cost.cpu_fixed, "cpu_expert_mem_s": cost.cpu_mem,
                       "cpu_per_token_s": cost.cpu_per_token,
                       "crossover_tokens": round(cost.cpu_mem / cost.cpu_per_token, 2),
                       "attn_mem_s": cost.attn_mem, "attn_per_token_s": cost.attn_per_token,
                       "shared_mem_s": cost.shared_mem, "shared_per_token_s": cost.shared_per_token,
                       "non_moe_terms": ("attention-like part and shared experts priced from the CPU "
                                         "stand-in's measurement; no dense layers or LM head" if dense
                                         else "zero (--no-dense: the stack runs routed experts only)")},
        "standin_dense_parts": standin,
        "host_time": ("charged per strategy and phase from the profile's host section" if profile.host
                      else "NOT charged: the profile has no host section (measure it with 'hybrimoe-kt "
                           "calibrate')"),
        "layer_calls": {"step": calls.step, "layer": calls.layer, "tokens": calls.tokens,
                        "prefill": calls.prefill, "activated_experts": calls.experts},
        "n_steps": {"decode": sum(not s.is_prefill for s in ssteps),
                    "prefill": sum(s.is_prefill for s in ssteps)},
        "strategies": results,
        "goal": goal_summary(results.get(CPU_ONLY)),
        "busy_cpus_before": busy_before, "busy_cpus_after": busy_after,
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "setup_s": {"cpu_backends": round(t_build, 1)},
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
