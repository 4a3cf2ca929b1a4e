"""Run strategies over a trace at several cache ratios; one record per (strategy, cache ratio)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Iterable, Literal, Mapping, Optional, Sequence

from hybrimoe_kt.core.cache import ExpertCache
from hybrimoe_kt.core.cost import RooflineCost
from hybrimoe_kt.core.hardware import HardwareProfile
from hybrimoe_kt.core.host import HOST_FREE, PHASES, HostTime
from hybrimoe_kt.core.memory import MemoryBudget, memory_budget
from hybrimoe_kt.core.stream import staging_slots
from hybrimoe_kt.core.models import ModelPreset
from hybrimoe_kt.core.protocols import Clock
from hybrimoe_kt.core.strategies import StrategySpec, build_policies, get_strategy, slots_for
from hybrimoe_kt.sim.bounds import check_bounds
from hybrimoe_kt.sim.oracle import best_variant, oracle_variants, uses_own_counts, variant_spec
from hybrimoe_kt.sim.oracle import own_counts as oracle_counts
from hybrimoe_kt.sim.engine import RunStats, replay
from hybrimoe_kt.sim.folds import Fold, make_folds
from hybrimoe_kt.sim.hidden import with_modelled_hints
from hybrimoe_kt.sim.metrics import Metrics
from hybrimoe_kt.sim.progress import StepCounter, map_jobs
from hybrimoe_kt.traces.format import Trace

log = logging.getLogger(__name__)

BOUNDS = ("oracle", "roofline")
# Weight formats the runtime executes today; any other is simulated as a projection (labelled so).
# GPU expert slots: bf16, or a GGUF model's own blocks (kernels.gguf_slots; Triton reads Q8_0/Q4_K/Q5_K/Q6_K)
RUNTIME_GPU_FORMATS = ("bf16", "q8_0", "q4_k_m")
RUNTIME_CPU_FORMATS = ("bf16", "q8_0", "q4_k_m")     # kt-kernel BF16 and GGUF (llamafile) kernels
RUNTIME_DENSE_FORMAT = "bf16"  # the GPU's other weights: Hugging Face modules in bf16
HostCostMode = Literal["profile", "zero"]


@dataclass(frozen=True)
class SimSetup:
    trace: Trace
    trace_name: str
    model: ModelPreset
    profile: HardwareProfile
    cpu_format: str = "q4_k_m"
    gpu_format: str = "host"        # the expert slots; "host": the CPU tier's format, copied unchanged
    prefill_chunk: int = 512
    host_cost: HostCostMode = "profile"
    dense_format: str = RUNTIME_DENSE_FORMAT  # attention, shared experts, dense layers, LM head

    def __post_init__(self) -> None:
        if self.gpu_format == "host":
            object.__setattr__(self, "gpu_format", self.cpu_format)

    @property
    def projection(self) -> bool:
        """True when a weight format is one the runtime cannot execute yet."""
        return self.gpu_format not in RUNTIME_GPU_FORMATS or self.cpu_format not in RUNTIME_CPU_FORMATS

    def host_times(self, spec: StrategySpec) -> Optional[Mapping[str, HostTime]]:
        """The strategy's host time per layer call by phase (None with ``host_cost='zero'``)."""
        if self.host_cost == "zero":
            return None
        if self.host_cost != "profile":
            raise ValueError(f"host cost must be 'profile' or 'zero', got {self.host_cost!r}")
        host = self.profile.host
        if host is None:
            if spec.name in HOST_FREE:
                return None
            raise ValueError(f"hardware profile {self.profile.name} has no host section: run 'hybrimoe-kt "
                             f"calibrate' to measure it, or pass --host-cost zero for an ablation")
        name = f"hardware profile {self.profile.name}"
        base = spec.name.split("/", 1)[0]  # an ablation variant ('hybrimoe/x') pays its base's host time
        base = spec.host_time_of or base   # a host's strategy pays that of ours making the same calls
        return {p: host.get(base, p, name) for p in PHASES}

    def check(self) -> None:
        t, m = self.trace, self.model
        if t.n_experts != m.n_experts or t.top_k != m.top_k:
            raise ValueError(f"trace {self.trace_name} has {t.n_experts} experts top-{t.top_k} but model "
                             f"preset {m.name} has {m.n_experts} top-{m.top_k}: pick the matching --model")
        if t.n_layers > m.n_moe_layers:
            raise ValueError(f"trace {self.trace_name} has {t.n_layers} MoE layers, more than model "
                             f"{m.name}'s {m.n_moe_layers}")

    @property
    def time_scale(self) -> float:
        """Times are extrapolated to the model's depth when the trace recorded fewer MoE layers."""
        return self.model.n_moe_layers / self.trace.n_layers


def run_one(spec: StrategySpec, ratio: float, folds: Sequence[Fold], cost: RooflineCost,
            n_layers: int, n_experts: int, top_k: int,
            host: Optional[Mapping[str, HostTime]] = None, own_counts: bool = False) -> RunStats:
    """``own_counts``: place from the replayed requests' own counts (the oracle's clairvoyant variants)."""
    total = RunStats()
    for fold in folds:
        clock = Clock()
        slots = slots_for(spec, n_layers, n_experts, ratio)
        uses = fold.uses() if spec.clairvoyant else None
        future = fold.future if spec.clairvoyant else None
        counts = oracle_counts(fold, n_layers, n_experts) if own_counts else fold.counts
        pol = build_policies(spec, n_layers, n_experts, top_k, slots, clock, counts=counts,
                             uses=uses, future=future)
        if spec.prefetch == "hidden":  # the modelled hidden-state predictor (sim.hidden)
            pol = with_modelled_hints(pol, fold, clock, n_experts)
        cache = ExpertCache(n_layers, n_experts, slots, pol.eviction, global_pool=spec.pool == "global")
        cache.place(pol.placement)
        total.merge(replay(fold.steps, cost, pol, cache, clock, top_k, host))
    return total


_JOB_CONTEXT: dict = {}


Job = tuple[StrategySpec, float, Optional[str]]  # strategy, cache ratio, oracle variant (or None)


def _run_job(job: Job) -> RunStats:
    c = _JOB_CONTEXT
    spec, ratio, variant = job
    counter: StepCounter = c["counter"]
    total = RunStats()
    for fold in c["folds"]:  # one fold at a time for the progress bar; the totals add up the same way
        if variant is not None:  # a bound: no host time
            stats = run_one(variant_spec(spec, variant), ratio, [fold], c["cost"], *c["dims"],
                            own_counts=uses_own_counts(variant))
        else:
            stats = run_one(spec, ratio, [fold], c["cost"], *c["dims"], host=c["host"][spec.name])
        total.merge(stats)
        counter.tick(len(fold.steps))
    return total


def _map_jobs(jobs: list[Job], workers: int, bar: object) -> list[RunStats]:
    """Run jobs in order, in forked worker processes when ``workers`` > 1; results keep job order.

    ``bar`` (tqdm or None) counts replayed steps, ticked per fold from every worker (``sim.progress``).
    """
    parallel = workers > 1 and len(jobs) > 1
    counter = StepCounter(bar, shared=parallel)
    _JOB_CONTEXT["counter"] = counter

    def done(n: int) -> None:
        if bar is not None:
            bar.set_postfix_str(f"runs {n}/{len(jobs)}", refresh=False)  # type: ignore[attr-defined]

    return map_jobs(_run_job, jobs, workers, counter, done)


def default_workers() -> int:
    import os

    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))


def _host_fields(ht: Optional[Mapping[str, HostTime]]) -> dict[str, float]:
    """The host time a record was charged, microseconds per layer call."""
    out = {}
    for phase, prefix in (("decode", "host"), ("prefill", "host_prefill")):
        t = ht[phase] if ht else None
        out[f"{prefix}_critical_us_per_layer"] = round(t.critical * 1e6, 3) if t else 0.0
        out[f"{prefix}_background_us_per_layer"] = round(t.background * 1e6, 3) if t else 0.0
    out["host_prefill_stream_us_per_call"] = round(ht["prefill"].stream * 1e6, 3) if ht else 0.0
    return out


def check_memory(setup: SimSetup, specs: Sequence[StrategySpec], ratios: Sequence[float]) -> MemoryBudget:
    """Refuse, before any work, a cache ratio whose expert cache does not fit the profile's GPU memory."""
    budget = spec_budget(setup, None)
    if not budget.known:
        log.warning("hardware profile %s has no gpu_mem_gib: cache ratios are not checked against GPU memory",
                    setup.profile.name)
    for spec in specs:
        b = spec_budget(setup, spec)
        for r in ratios if spec.uses_gpu_cache else [0.0]:
            b.check(r, where=f"hardware profile {setup.profile.name}")
    return budget


def spec_budget(setup: SimSetup, spec: Optional[StrategySpec]) -> MemoryBudget:
    """The GPU memory budget of ``setup`` for ``spec`` (its staging buffers when it streams prefills,
    its full-layer buffer when it runs layer-wise prefills)."""
    staging = 0
    if spec is not None and spec.prefill_stream:
        staging = staging_slots(spec.stream_buffer, setup.model.n_experts)
    elif spec is not None and spec.layerwise_threshold:
        staging = setup.model.n_experts  # one layer, shared by all layers (core.layerwise)
    return memory_budget(setup.model, setup.gpu_format, setup.profile.gpu_mem_gib,
                         dense_format=setup.dense_format, staging_experts=staging)


def simulate(setup: SimSetup, strategies: Iterable[str | StrategySpec], ratios: Iterable[float],
             progress: bool = False, provenance: Optional[dict] = None,
             workers: Optional[int] = None) -> list[dict]:
    """Records with ``strategy``, ``cache_ratio``, the Metrics fields, ``speedup_vs_stock`` and provenance.

    Everything is simulated from the cost model of ``setup.profile``; records say so in ``kind``.
    """
    setup.check()
    specs = [s if isinstance(s, StrategySpec) else get_strategy(s) for s in strategies]
    ratios = [float(r) for r in ratios]
    for r in ratios:
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"cache ratio {r} is outside [0, 1]")
    budget = check_memory(setup, specs, ratios)
    t = setup.trace
    cost = RooflineCost.build(setup.profile, setup.model, setup.cpu_format, setup.gpu_format, setup.dense_format)
    host = {s.name: setup.host_times(s) for s in specs}  # fails on a missing host time before any work
    folds = make_folds(t, setup.prefill_chunk)
    variants = oracle_variants(specs)
    jobs: list[Job] = [(s, r, v) for r in ratios for s in specs
                       for v in (variants if s.name == "oracle" else (None,))]
    bar = None
    if progress:
        from tqdm import tqdm
        steps = sum(len(f.steps) for f in folds)  # every job replays every fold
        bar = tqdm(total=len(jobs) * steps, desc="simulate", unit="step", leave=False, smoothing=0.1,
                   postfix=f"runs 0/{len(jobs)}")
    _JOB_CONTEXT.update(folds=folds, cost=cost, dims=(t.n_layers, t.n_experts, t.top_k), host=host)
    try:
        results = _map_jobs(jobs, workers or default_workers(), bar)
    finally:
        _JOB_CONTEXT.clear()
    stock: dict[float, Metrics] = {}
    out: list[dict] = []
    done = dict(zip(jobs, results))
    for ratio in ratios:
        for spec in specs:
            oracle_variant = None
            if spec.name == "oracle":  # the best clairvoyant variant (sim/oracle.py)
                runs = [Metrics.from_stats(done[(spec, ratio, v)], setup.time_scale, cost,
                                           variant_spec(spec, v).free_transfers) for v in variants]
                i = best_variant(list(variants), [m.decode_tok_s for m in runs])
                j = best_variant(list(variants), [m.prefill_tok_s for m in runs])
                oracle_variant = {"decode": variants[i], "prefill": variants[j]}
                m = dataclasses.replace(runs[i], prefill_tok_s=runs[j].prefill_tok_s)
            else:
                m = Metrics.from_stats(done[(spec, ratio, None)], setup.time_scale, cost, spec.free_transfers)
            if spec.name == "stock":
                stock[ratio] = m
            out.append({"strategy": spec.name, "cache_ratio": ratio, **m.as_dict(), **_host_fields(host[spec.name]),
                        "slots": slots_for(spec, t.n_layers, t.n_experts, ratio),
                        "pool": spec.pool, "bound": spec.name in BOUNDS,
                        "cache_gib": budget.breakdown(ratio)["expert_cache"] if spec.uses_gpu_cache else 0.0,
                        "memory_gib": spec_budget(setup, spec).breakdown(ratio if spec.uses_gpu_cache else 0.0),
                        "prefill_stream": spec.prefill_stream,
                        **({"oracle_variant": oracle_variant} if oracle_variant else {})})
    if bar is not None:
        bar.close()
    base = {r: m for r, m in stock.items()}
    for rec in out:
        s = base.get(rec["cache_ratio"])
        rec["speedup_vs_stock"] = (round(rec["decode_tok_s"] / s.decode_tok_s, 6)
                                   if s and s.decode_tok_s else None)
        rec["prefill_speedup_vs_stock"] = (round(rec["prefill_tok_s"] / s.prefill_tok_s, 6)
                                           if s and s.prefill_tok_s else None)
        rec.update({
            "kind": "simulated",
            "trace": setup.trace_name,
            "model": setup.model.name,
            "hardware": setup.profile.name,
            "cpu_format": setup.cpu_format,
            "gpu_format": setup.gpu_format,
            "dense_format": setup.dense_format,
            "projection": setup.projection,
            "host_cost": setup.host_cost,
            "prefill_chunk": setup.prefill_chunk,
            "folds": [f.name for f in folds],
            "layers_simulated": t.n_layers,
            "time_scale": round(setup.time_scale, 9),
            **(provenance or {}),
        })
    check_bounds(out)  # a bound below what it bounds is a simulator bug: fail loudly
    return out
