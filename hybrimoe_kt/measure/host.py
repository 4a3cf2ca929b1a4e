"""Measure the runtime's host time per MoE layer call, per strategy and phase, for a profile's ``host``.

The runtime itself runs (``HybridMoE`` over a DeepSeek-V2-Lite-shaped stack: 64 experts, top-6, with
replayed synthetic routing) with every kernel and slot copy replaced by a no-op
(``runtime.harness.trivial_kernels``), so what remains is host work: routing to the host, deciding,
masks, slot bookkeeping, dispatch, the sum of the tiers, and the background copies decided while the
kernels would run. The stack has DeepSeek-V2-Lite's 26 MoE layers (a step upkeep's fixed cost is
amortized over them as in the model) and small matrices (no kernel reads them). Per layer call:

- background = the runtime's own ``background_s`` of the call (deciding and queueing background copies);
- critical = the whole layer call minus its background part;
- upkeep (step-cadence strategies) = the step's upkeep before its first layer, per layer call;
- stream (streaming strategies, prefill) = what pricing the next layer's stream adds to a call: the
  strategy's prefill critical time minus that of its twin without streaming (measured beside it), so
  that ``critical`` is the call without it and the simulator charges the rest only where a call prices
  a stream (``Controller.prices_stream``: short prompts under ``stream_min_rows`` do not).

Medians over the calls of each phase (the machine is shared: the median ignores other processes'
bursts). The GPU tier is the CPU stand-in here: on a CUDA machine the same code measures the real path.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from hybrimoe_kt.core.host import HostCosts, HostTime

log = logging.getLogger(__name__)

DEPLOYABLE = ("stock", "static-frequency", "lru-offload", "hybrimoe-paper", "hybrimoe-layer", "hybrimoe")
NO_STREAM = "/no-stream"  # suffix of the twin measured without streaming (its raw figures stay in ``measured``)


def measure_host(strategies: Sequence[Any] = DEPLOYABLE, *, layers: int = 26, hidden: int = 256,
                 inter: int = 128, decode_tokens: int = 64, prefill_chunk: int = 128,
                 cache_ratio: float = 0.25, profile: str = "rtx4090-ddr5", backend: str = "auto",
                 seed: int = 0, progress: bool = False,
                 prepare: Optional[Callable[[Any], None]] = None) -> HostCosts:
    """Host time per layer call of each strategy (a name or a StrategySpec), decode and prefill, measured
    on this machine. ``prepare(moe)`` runs on each runtime before its warm-up (e.g. to register hooks)."""
    import torch

    from hybrimoe_kt.core.cost import RooflineCost
    from hybrimoe_kt.core.hardware import load_profile
    from hybrimoe_kt.core.strategies import StrategySpec, get_strategy, slots_for, with_overrides
    from hybrimoe_kt.kernels.cpu_backend import make_cpu_backend
    from hybrimoe_kt.kernels.cpu_ktkernel import CpuWorkerPool
    from hybrimoe_kt.measure.provenance import cpu_model, git_commit
    from hybrimoe_kt.runtime.device import Tier
    from hybrimoe_kt.runtime.harness import StackShape, random_store, run_replay, trivial_kernels
    from hybrimoe_kt.runtime.moe import HybridMoE
    from hybrimoe_kt.runtime.replay import RoutingReplay
    from hybrimoe_kt.traces.synthetic import synthetic_trace

    shape = StackShape("deepseek-v2-lite", layers, hidden, inter)
    trace = synthetic_trace(shape.model, n_requests=2, prompt_len=2 * prefill_chunk, decode_len=decode_tokens,
                            seed=seed, n_layers=layers)
    counts = synthetic_trace(shape.model, n_requests=2, prompt_len=2 * prefill_chunk, decode_len=decode_tokens,
                             seed=seed + 1000, n_layers=layers).expert_counts()
    replay = RoutingReplay(trace, shape.model, prefill_chunk=prefill_chunk)
    cost = RooflineCost.build(load_profile(profile), shape.preset(), "bf16", "bf16")
    store = random_store(shape, seed=seed)
    workers = CpuWorkerPool(1)
    backends = [make_cpu_backend(backend, lw.gate, lw.up, lw.down, 1, top_k=shape.top_k, max_len=1024,
                                 pool=workers, layer_idx=i) for i, lw in enumerate(store)]
    prefill = [s for s in replay if s.is_prefill]
    decode = replay.steps("decode")
    table: dict[str, dict[str, HostTime]] = {}
    raw: dict[str, Any] = {}
    specs = [s if isinstance(s, StrategySpec) else get_strategy(s) for s in strategies]
    twins = {s.name: with_overrides(s, name=f"{s.name}{NO_STREAM}", prefill_stream=False)
             for s in specs if s.prefill_stream}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(specs) + len(twins), desc="host time", unit="strategy", leave=False)
    t0 = time.perf_counter()
    for spec in [*specs, *twins.values()]:
        name = spec.name
        moe = HybridMoE(store, Tier("cpu"), spec, slots_for(spec, layers, shape.n_experts, cache_ratio), cost,
                        shape.top_k, counts=counts, cpu_backends=backends, max_len=1024)
        if prepare is not None:
            prepare(moe)
        table[name], raw[name] = {}, {}
        with trivial_kernels(moe):
            run_replay(moe, replay, prefill[:1] + decode[:4], seed=seed, timed=False)  # warm-up
            for phase, steps in (("prefill", prefill), ("decode", decode)):
                rec = run_replay(moe, replay, steps, seed=seed + 1, timed=False)
                call = np.asarray(rec.layer_call_s)                     # [calls] whole forward() call
                bg = np.asarray(rec.layer_background_s)                 # [calls] its background part
                critical = float(np.median(call - bg)) if call.size else 0.0
                background = float(np.median(bg)) if bg.size else 0.0
                upkeep = float(np.median(rec.forward_upkeep_s)) / layers if spec.cadence == "step" else 0.0
                table[name][phase] = HostTime(max(0.0, critical), background, upkeep)
                raw[name][phase] = {"upkeep_median_us_per_layer": round(upkeep * 1e6, 2),
                                    "layer_call_median_us": round(float(np.median(call)) * 1e6, 2),
                                    "layer_call_p90_us": round(float(np.percentile(call, 90)) * 1e6, 2),
                                    "critical_median_us": round(critical * 1e6, 2),
                                    "background_median_us": round(background * 1e6, 2), "calls": int(call.size)}
        del moe
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    for name, twin in twins.items():  # the stream's share of the prefill call, then the twin is dropped
        full, plain = table[name]["prefill"], table.pop(twin.name)["prefill"]
        table[name]["prefill"] = HostTime(min(full.critical, plain.critical), full.background, full.upkeep,
                                          max(0.0, full.critical - plain.critical))
    commit, dirty = git_commit()
    measured = {"method": "runtime with no-op kernels (runtime.harness.trivial_kernels); per call, critical "
                          "= layer call - its background part; medians over the calls", "stack": shape.describe(),
                "cache_ratio": cache_ratio, "prefill_chunk": prefill_chunk, "decode_steps": len(decode),
                "gpu_tier": "CPU stand-in (device cpu)", "cpu_backend": backends[0].name,
                "cpu_model": cpu_model(), "git_commit": commit, "git_dirty": dirty,
                "wall_s": round(time.perf_counter() - t0, 1), "per_strategy": raw}
    return HostCosts(table, 1.0, f"measured by hybrimoe-kt calibrate on {cpu_model()} (commit {commit})",
                     measured)


def estimate_for(measured: HostCosts, factor: float, reason: str,
                 base: Optional[str] = None) -> HostCosts:
    """A preset's estimate: ``measured`` times ``factor`` (e.g. single-thread speed of this machine
    over the preset's CPU), with the reason and the measurement it came from."""
    src = f"estimate: {reason}; x{factor:g} of {base or measured.source}"
    return measured.scaled(factor, src)
