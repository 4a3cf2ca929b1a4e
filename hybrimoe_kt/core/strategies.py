"""Strategies: named bundles of scheduler, eviction policy, admission rule and prefetcher, as data.

``STRATEGIES`` holds the specs; ``build_policies`` turns a spec into fresh policy objects for one run
(the simulator) or one model (the runtime). What a spec needs from outside - calibration counts for the
initial placement, the future for the clairvoyant parts - is passed in explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Literal, Mapping, Optional, Sequence, get_args

import numpy as np

from hybrimoe_kt.core.admission import AdmissionName, AdmissionRule, make_admission
from hybrimoe_kt.core.eviction import (EvictionName, ReuseRate, make_policy, place_frequency,
                                       place_per_layer_quota)
from hybrimoe_kt.core.layerwise import KT_PREFILL_THRESHOLD, LayerwisePrefill
from hybrimoe_kt.core.prefetch import (HiddenPrefetch, ImpactPrefetch, NextScorePrefetch, NoPrefetch,
                                       OraclePrefetch, PrefetcherName, RoutingPredictor)
from hybrimoe_kt.core.protocols import Clock, EvictionPolicy, Prefetcher, Scheduler
from hybrimoe_kt.core.schedulers import SchedulerName, make_scheduler
from hybrimoe_kt.core.types import ExpertId, LayerRouting
from hybrimoe_kt.core.upkeep import StepRebalance

RATE_POLICIES = ("reuse", "nextuse")  # eviction policies whose score is an activation rate (value per token)

StrategyName = Literal["stock", "static-frequency", "kt-frequency", "kt-dynamic-update", "lru-offload",
                       "hybrimoe-paper", "hybrimoe-layer", "hybrimoe", "oracle", "roofline"]


@dataclass(frozen=True, slots=True)
class StrategySpec:
    name: str
    description: str
    scheduler: SchedulerName
    eviction: EvictionName
    prefetch: PrefetcherName = "none"
    prefetch_depth: int = 1
    admit_misses: bool = False          # copy CPU-served misses to the GPU in idle copy time
    admission: AdmissionName = "always"  # rule for background copies (misses and prefetches)
    admission_margin: float = 0.0       # better-than-victim: the newcomer must outscore by this much
    mrs_alpha: float = 0.5              # MRS update weight (the paper's default 0.5)
    reuse_half_life: float = 32.0       # memory of the reuse-rate policy, tokens
    background_in_prefill: bool = True  # queue background copies during prefill forwards too
    placement: Literal["none", "frequency"] = "frequency"  # initial GPU experts at load time
    pool: Literal["layer", "global"] = "layer"
    copy_horizon_layers: float = 2.0    # background copies may book the queue this many layers ahead
    # "layer": policies run per layer call (demand loads, background copies); "step": decode layers
    # only look residency up, and the cache is updated once per decode step (core.upkeep)
    cadence: Literal["layer", "step"] = "layer"
    step_copy_budget: float = 1.0       # step cadence: upkeep copies may book the queue this many steps
    swap_depth: int = 8                 # step cadence: swaps considered per pool and upkeep
    learn_from_prefill: bool = True     # step cadence: prefill routing updates the scores too
    # step cadence, SIMULATOR-ONLY ABLATION (the runtime and the sglang coordinator refuse it; no
    # registered strategy sets it): decode layers may copy misses to the GPU as demand loads into slots
    # the eviction policy frees (the copy is also the admission, as lru-offload's). "scheduler": the loads
    # the strategy's scheduler chooses (the copy and the GPU end before the CPU would; copies only delay
    # the GPU); "contended": the number of loads (misses in copy order) whose split is fastest once the
    # copies' pull on host memory slows the CPU tier (``contended_makespan``, the engine's rule); "all":
    # every miss not in flight is loaded (lru-offload's rule over the visible residents)
    decode_demand: Literal["off", "scheduler", "contended", "all"] = "off"
    prefill_contention: bool = False    # prefill: keep the split without copies when the copies' pull on
                                        # host memory would cost the CPU tier more (schedulers.prefill_choice)
    prefill_stream: bool = False        # prefill: stage the next layer's non-residents while a layer runs
                                        # when the cost model says it pays (core.stream)
    stream_buffer: int = 0              # experts per staging buffer (two alternate); 0 = a whole layer
    stream_min_rows: int = 0            # prefill calls of fewer rows do not price the stream (its host time)
    # prefill forwards of at least this many rows run each MoE layer on the GPU after copying the whole
    # layer into a full-layer buffer (sglang-kt's --kt-gpu-prefill-token-threshold; core.layerwise); 0 = off
    layerwise_threshold: int = 0
    layerwise_reload_residents: bool = True  # the full-layer copy includes the layer's GPU experts
    replace_from_batch: bool = False    # after a layer-wise call the layer's GPU experts become the batch's
                                        # top ones (sglang-kt's --kt-enable-dynamic-expert-update)
    # prefetch "hidden" (per-layer cadence only): hints of layer l+1's experts given during layer l. The
    # runtime's hook runs layer l+1's router on layer l's hidden state (None here); the simulator models a
    # predictor of this accuracy in [0, 1] (sim.hidden), seeded with hidden_seed. Never in a preset.
    hidden_accuracy: Optional[float] = None
    hidden_seed: int = 0
    host_time_of: str = ""              # the strategy whose measured host time this one is charged ("" = its own)
    free_transfers: bool = False        # bound only: copies take no time and no queue
    uses_gpu_cache: bool = True
    clairvoyant: bool = False           # needs the future (a bound, not a deployable policy)

    @property
    def decode_lookup(self) -> bool:
        """Decode layers need no per-layer decision: the split is the residency (no cache, a fixed
        cache, or the step cadence), so the runtime looks it up instead of asking the controller."""
        return self.cadence == "step" or not self.uses_gpu_cache or self.eviction == "static"

    def __post_init__(self) -> None:
        if self.prefetch_depth < 1:
            raise ValueError(f"strategy {self.name}: prefetch_depth must be >= 1")
        if self.copy_horizon_layers < 0:
            raise ValueError(f"strategy {self.name}: copy_horizon_layers must be >= 0")
        if self.cadence not in ("layer", "step"):
            raise ValueError(f"strategy {self.name}: cadence must be 'layer' or 'step', got {self.cadence!r}")
        if self.cadence == "step" and self.eviction not in ("mrs", "reuse", "nextuse", "lru", "lfu", "belady"):
            raise ValueError(f"strategy {self.name}: the step cadence needs an eviction policy scored over "
                             f"[layers, experts] arrays (mrs, reuse, nextuse, lru, lfu, or belady for a "
                             f"bound), got {self.eviction}")
        if self.cadence == "step" and self.eviction == "belady" and not self.clairvoyant:
            raise ValueError(f"strategy {self.name}: belady needs the future: set clairvoyant (a bound)")
        if self.cadence == "step" and self.eviction not in RATE_POLICIES and self.admission != "expected-reuse":
            raise ValueError(f"strategy {self.name}: the step cadence prices swaps with a reuse rate: use "
                             f"eviction 'reuse' or 'nextuse', or admission 'expected-reuse'")
        if self.decode_demand not in ("off", "scheduler", "contended", "all"):
            raise ValueError(f"strategy {self.name}: decode_demand must be 'off', 'scheduler', 'contended' or "
                             f"'all', "
                             f"got {self.decode_demand!r}")
        if self.decode_demand != "off" and (self.cadence != "step" or not self.uses_gpu_cache):
            raise ValueError(f"strategy {self.name}: decode_demand is an ablation of the step cadence "
                             f"(decode demand loads on top of the step upkeep): set cadence='step'")
        if self.prefetch == "hidden" and (self.cadence != "layer" or not self.uses_gpu_cache):
            raise ValueError(f"strategy {self.name}: hidden-state hints feed per-layer background copies; the "
                             f"step cadence's decode layers make none: use cadence='layer' with a GPU cache")
        if self.hidden_accuracy is not None and (self.prefetch != "hidden"
                                                 or not 0.0 <= self.hidden_accuracy <= 1.0):
            raise ValueError(f"strategy {self.name}: hidden_accuracy (in [0, 1]) models the hints of "
                             f"prefetch='hidden', got {self.hidden_accuracy} with prefetch {self.prefetch!r}")
        if self.stream_buffer < 0:
            raise ValueError(f"strategy {self.name}: stream_buffer must be >= 0 (0 = a whole layer)")
        if self.stream_min_rows < 0:
            raise ValueError(f"strategy {self.name}: stream_min_rows must be >= 0 (0 = every prefill call)")
        if self.step_copy_budget < 0 or self.swap_depth < 1:
            raise ValueError(f"strategy {self.name}: step_copy_budget must be >= 0 and swap_depth >= 1")
        if self.layerwise_threshold < 0:
            raise ValueError(f"strategy {self.name}: layerwise_threshold must be >= 0 tokens (0 = off)")
        if self.layerwise_threshold and (not self.uses_gpu_cache or self.cadence != "layer"
                                         or self.prefill_stream):
            raise ValueError(f"strategy {self.name}: the layer-wise prefill needs a GPU cache, the layer "
                             f"cadence and no layer streaming")
        if self.replace_from_batch and not self.layerwise_threshold:
            raise ValueError(f"strategy {self.name}: replace_from_batch re-places after layer-wise prefill "
                             f"calls: set layerwise_threshold too")


STRATEGIES: Mapping[str, StrategySpec] = {s.name: s for s in (
    StrategySpec("stock", "kTransformers default rules: every routed expert on the CPU kernel",
                 "stock", "lru", placement="none", uses_gpu_cache=False),
    StrategySpec("static-frequency", "kt-kernel experts-sched: static GPU set, global top by calibration "
                 "frequency; misses on the CPU", "static", "static", pool="global"),
    StrategySpec("kt-frequency", "sglang-kt --kt-expert-placement-strategy frequency "
                 "(generate_gpu_experts_masks): global top-n experts by calibration activation counts, n = "
                 "--kt-num-gpu-experts x MoE layers, fixed; the rest on the CPU kernel. The same decisions as "
                 "static-frequency (an alias, charged its host time)", "static", "static", pool="global",
                 host_time_of="static-frequency"),
    StrategySpec("kt-dynamic-update", "sglang-kt --kt-enable-dynamic-expert-update with "
                 f"--kt-gpu-prefill-token-threshold {KT_PREFILL_THRESHOLD}, placed as kt-frequency: prefill "
                 f"forwards of {KT_PREFILL_THRESHOLD}+ tokens copy each layer whole to the GPU and compute it "
                 "there, then the layer's GPU experts become the batch's top ones (as many as it held, "
                 "copied GPU to GPU); decode stays static", "static", "static", pool="global",
                 layerwise_threshold=KT_PREFILL_THRESHOLD, replace_from_batch=True,
                 host_time_of="static-frequency"),
    StrategySpec("lru-offload", "MoE-offloading style: per-layer LRU cache, every expert on the GPU, "
                 "misses copied on demand", "offload", "lru"),
    StrategySpec("hybrimoe-paper", "HybriMoE as published, release bugs fixed: hss scheduling, MRS "
                 "eviction, impact-driven prefetch of the next layer", "hss", "mrs", prefetch="impact",
                 prefetch_depth=1, copy_horizon_layers=1.0),
    StrategySpec("hybrimoe-layer", "the project's per-layer strategy: balanced scheduling, MRS eviction, "
                 "background copies (CPU-served misses, impact prefetch two layers ahead) decided per layer "
                 "call, only when their expected extra hits pay for the host-memory traffic of the copy, "
                 "decode only", "balanced", "mrs",
                 prefetch="impact", prefetch_depth=2, admit_misses=True, admission="expected-reuse",
                 admission_margin=1.0, copy_horizon_layers=4.0, background_in_prefill=False),
    StrategySpec("hybrimoe", "the project's strategy, its cache upkeep off the decode critical path: "
                 "decode layers run resident experts on the GPU and the rest on the CPU; once per decode "
                 "step the cache swaps in the experts whose expected extra hits (over 32 tokens) exceed 4 "
                 "copies' worth of host-memory reads (MRS ranks the residents, a reuse rate prices the "
                 "swap), copies booked for about one step; the scores learn from decode steps only (a "
                 "prompt's routing is another distribution); prefill: balanced split with demand loads, or none "
                 "when the copies' pull on host memory would slow the CPU tier more than they save; prefill calls "
                 "of 64+ rows price streaming: up to 64 of the next layer's non-residents are staged while a "
                 "layer runs when the cost model says it pays (shorter calls skip the pricing, whose host "
                 "time they would not win back)",
                 "balanced", "mrs", admit_misses=True, admission="expected-reuse", admission_margin=4.0,
                 copy_horizon_layers=4.0, background_in_prefill=False, cadence="step",
                 learn_from_prefill=False, prefill_contention=True, prefill_stream=True, stream_buffer=64,
                 stream_min_rows=64),  # chosen on tuning data: results/ablation-stream-gate-tuning.json
    StrategySpec("oracle", "clairvoyant reference: Belady eviction, perfect prefetch through the same "
                 "copy queue, balanced scheduling", "balanced", "belady", prefetch="oracle",
                 prefetch_depth=4, admit_misses=True, admission="expected-reuse", admission_margin=1.0,
                 copy_horizon_layers=4.0, background_in_prefill=False, clairvoyant=True),
    StrategySpec("roofline", "bandwidth roofline: Belady over one global pool with perfect prefetch "
                 "and free transfers (an expert is copied in whenever it is used sooner than the resident "
                 "it replaces), no host time, each layer split at its best between the tiers (a fixed "
                 "hits-on-GPU split or per-layer quotas would not bound the deployable strategies)",
                 "balanced", "belady", prefetch="oracle", prefetch_depth=8, admit_misses=True,
                 admission="better-than-victim", free_transfers=True, pool="global", clairvoyant=True),
)}
assert set(STRATEGIES) == set(get_args(StrategyName))
assert all(s.decode_demand == "off" for s in STRATEGIES.values()), "decode_demand is an ablation, never a preset"
assert all(s.prefetch != "hidden" for s in STRATEGIES.values()), "hidden-state hints are an ablation, never a preset"


def get_strategy(name: str) -> StrategySpec:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}") from None


@dataclass(frozen=True, slots=True)
class Policies:
    spec: StrategySpec
    scheduler: Scheduler
    eviction: EvictionPolicy
    admission: AdmissionRule
    prefetcher: Prefetcher
    placement: tuple[ExpertId, ...]
    upkeep: Optional[StepRebalance] = None  # the step cadence's planner (None: per-layer cadence)
    layerwise: Optional[LayerwisePrefill] = None  # the layer-wise prefill (None: off)


def slots_for(spec: StrategySpec, n_layers: int, n_experts: int, cache_ratio: float) -> int:
    """GPU expert slots: per layer for a layer pool, in total for a global pool (0 if unused)."""
    if not 0.0 <= cache_ratio <= 1.0:
        raise ValueError(f"cache ratio must be in [0, 1], got {cache_ratio}")
    if not spec.uses_gpu_cache:
        return 0
    per_layer = int(round(cache_ratio * n_experts))
    return per_layer * n_layers if spec.pool == "global" else per_layer


def build_policies(spec: StrategySpec, n_layers: int, n_experts: int, top_k: int, slots: int,
                   clock: Clock, counts: Optional[np.ndarray] = None,
                   uses: Optional[Mapping[ExpertId, Sequence[int]]] = None,
                   future: Optional[Callable[[int], Optional[LayerRouting]]] = None) -> Policies:
    """Fresh policy objects for one run.

    ``counts`` [L, E]: activation counts from calibration data (never the replayed tokens), for the
    initial placement and the static policy: required (ValueError) by a static placement; a cache
    strategy without them starts with an empty cache. ``uses``/``future``: the replayed run's future, only for
    clairvoyant strategies.
    """
    if spec.clairvoyant and (uses is None or future is None):
        raise ValueError(f"strategy {spec.name} is clairvoyant: pass the future (uses, future)")
    placement: tuple[ExpertId, ...] = ()
    if spec.eviction == "static" and slots > 0 and (counts is None or not np.any(counts)):
        # the placement IS this strategy's GPU set: without counts it would be an arbitrary one (the
        # lowest (layer, expert) ids, e.g. every slot in Mixtral's first layers)
        got = "no calibration counts" if counts is None else "calibration counts that are all zero"
        raise ValueError(f"strategy {spec.name} places its fixed GPU experts by calibration frequency but got "
                         f"{got}: pass counts [L, E] from other requests (in a rule file, "
                         f"'placement_counts:' = a routing trace or a .npy of [L, E] counts, e.g. recorded "
                         f"with 'hybrimoe-kt record')")
    if counts is None:
        # without calibration counts a cache strategy starts empty (its placement is only a warm start)
        counts = np.zeros((n_layers, n_experts), dtype=np.int64)
    elif spec.placement == "frequency" and slots > 0:
        chosen = (place_frequency(counts, slots) if spec.pool == "global"
                  else place_per_layer_quota(counts, slots))
        placement = tuple(sorted(chosen))
    ev = spec.eviction
    if ev in ("lru", "lfu"):
        eviction = make_policy(ev, n_layers=n_layers, n_experts=n_experts, clock=clock)
    elif ev == "mrs":
        eviction = make_policy(ev, n_layers=n_layers, n_experts=n_experts, top_k=top_k,
                               alpha=spec.mrs_alpha)
    elif ev == "reuse":
        eviction = make_policy(ev, n_layers=n_layers, n_experts=n_experts, half_life=spec.reuse_half_life)
    elif ev == "nextuse":
        eviction = make_policy(ev, n_layers=n_layers, n_experts=n_experts, top_k=top_k)
    elif ev == "static":
        eviction = make_policy(ev, placement=placement, counts=counts)
    else:
        horizon = int(spec.reuse_half_life) if spec.admission == "expected-reuse" else None
        eviction = make_policy(ev, uses=uses, clock=clock, n_layers=n_layers, n_experts=n_experts,
                               rate_horizon=horizon)
    scheduler = make_scheduler(spec.scheduler)
    prefetcher: Prefetcher
    if spec.prefetch == "none":
        prefetcher = NoPrefetch()
    elif spec.prefetch == "next-score":
        prefetcher = NextScorePrefetch(size=top_k)
    elif spec.prefetch == "impact":
        prefetcher = ImpactPrefetch(RoutingPredictor(n_layers, n_experts, top_k), depth=spec.prefetch_depth)
    elif spec.prefetch == "hidden":
        prefetcher = HiddenPrefetch()  # hints come from the runtime's hook or the simulator's model
    else:
        assert future is not None
        prefetcher = OraclePrefetch(future, clock, depth=spec.prefetch_depth)
    estimator = None
    if spec.admission == "expected-reuse" and ev not in (*RATE_POLICIES, "belady"):
        estimator = ReuseRate(n_layers, n_experts, half_life=spec.reuse_half_life)
    admission = make_admission(spec.admission, margin=spec.admission_margin,
                               horizon=spec.reuse_half_life, estimator=estimator)
    upkeep = None
    if spec.cadence == "step" and slots > 0:
        # fed per layer in prefill, per step in decode; belady knows the exact future rate (a bound)
        rate = eviction if ev in (*RATE_POLICIES, "belady") else estimator
        upkeep = StepRebalance(eviction, rate, horizon=spec.reuse_half_life, threshold=spec.admission_margin,
                               budget_steps=spec.step_copy_budget, depth=spec.swap_depth)
    layerwise = (LayerwisePrefill(spec.layerwise_threshold, spec.layerwise_reload_residents,
                                  spec.replace_from_batch) if spec.layerwise_threshold else None)
    return Policies(spec, scheduler, eviction, admission, prefetcher, placement, upkeep, layerwise)


def with_overrides(spec: StrategySpec, **changes: object) -> StrategySpec:
    """A variant of a strategy (for ablations): unknown fields raise ValueError."""
    try:
        return replace(spec, **changes)  # type: ignore[arg-type]
    except TypeError as e:
        raise ValueError(f"strategy {spec.name}: {e}") from None
