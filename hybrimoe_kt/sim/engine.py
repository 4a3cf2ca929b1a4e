"""Deterministic discrete-event replay of routing through one strategy.

Resources: the CPU (routed experts), the GPU (attention, shared experts, routed experts) and one
serialized PCIe copy queue shared by demand loads and background copies (CPU-served misses being
admitted, prefetches). Per forward, in the same named steps as the runtime's ``HybridMoE``:

0. ``upkeep`` (step-cadence strategies, before every forward's first layer): the controller feeds the
   previous decode step to the policies and books the swaps for the coming decode step; the host pays
   the measured upkeep time in full before the first layer.

Per layer:

1. the GPU runs the non-MoE part of the layer (attention, norms);
2. ``route`` + ``decide``: the host pays the strategy's critical host time of a layer call (routing to
   the host, deciding, dispatching, summing the tiers: ``core.host``), during which no expert kernel
   runs; the shared ``core.controller.Controller`` decides the layer's Plan (the same code the runtime
   runs): hits, the CPU/GPU split, demand loads and evictions;
3. ``dispatch``: the GPU runs shared experts first, then resident experts, then loads as they land; the
   CPU runs its experts meanwhile, slowed while the copy queue shares host-memory bandwidth with it;
4. ``background``: the host decides the background copies meanwhile (its background host time);
   a layer-wise prefill call (``core.layerwise``) instead copies the whole layer on the copy queue,
   runs every routed expert on the GPU once it landed, and pays its re-placement's device copies
   on the GPU afterwards;
5. ``combine``: the layer ends when both tiers and the host's background work are done.

Timing follows the cost model exactly (the same rules as ``core.schedulers.makespan``), so a run is a
pure function of its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

from hybrimoe_kt.core.cache import ExpertCache
from hybrimoe_kt.core.controller import Controller
from hybrimoe_kt.core.cost import RooflineCost
from hybrimoe_kt.core.host import ZERO_HOST, HostTime
from hybrimoe_kt.core.protocols import Clock
from hybrimoe_kt.core.schedulers.prefill_choice import contended_cpu_time
from hybrimoe_kt.core.strategies import Policies
from hybrimoe_kt.core.types import LayerRouting
from hybrimoe_kt.core.upkeep import StepRouting


@dataclass(frozen=True, slots=True)
class Step:
    """One forward (a decode step, a batched step or a prefill chunk): its routing at every layer."""

    routings: tuple[LayerRouting, ...]
    n_rows: int
    is_prefill: bool
    request: int


@dataclass(slots=True)
class RunStats:
    """Totals of one replay (seconds, counts); several replays add up with ``merge``."""

    decode_s: float = 0.0
    decode_tokens: int = 0
    decode_steps: int = 0
    prefill_s: float = 0.0
    prefill_tokens: int = 0
    cpu_busy_s: float = 0.0
    gpu_busy_s: float = 0.0
    copy_busy_s: float = 0.0
    stall_s: float = 0.0
    bytes_copied: int = 0
    decode_bytes_copied: int = 0     # part of bytes_copied issued during decode steps
    demand_loads: int = 0
    background_copies: int = 0
    streamed_loads: int = 0
    stream_copies: int = 0           # layer-streaming prefill: copies into the staging buffer
    stream_used: int = 0             # staged experts the GPU computed (the rest were not routed)
    prefill_layers_stream: int = 0   # prefill layer calls that read staged experts
    prefill_layers_split: int = 0    # ... that ran experts on the GPU without staged ones
    prefill_layers_cpu: int = 0      # ... that ran every routed expert on the CPU
    prefill_layers_layerwise: int = 0  # ... that copied the whole layer to the GPU (``core.layerwise``)
    layerwise_copies: int = 0        # experts copied into the full-layer buffer
    replaced: int = 0                # GPU experts re-placed from a batch (device-to-device copies)
    hits: int = 0
    late_hits: int = 0
    misses: int = 0
    decode_hits: int = 0
    decode_late_hits: int = 0
    decode_misses: int = 0
    gpu_experts: int = 0
    cpu_experts: int = 0
    host_critical_s: float = 0.0     # critical host time charged (all layer calls)
    host_background_s: float = 0.0   # background host time decided (all layer calls)
    host_delay_s: float = 0.0        # part of the background host time that delayed its layer
    host_upkeep_s: float = 0.0       # step-cadence upkeep charged before decode steps
    moe_layer_calls: int = 0
    token_latencies_s: list[float] = field(default_factory=list)
    # every replayed step: (request id, is_prefill, rows, seconds)
    steps: list[tuple[int, bool, int, float]] = field(default_factory=list)

    def merge(self, other: "RunStats") -> None:
        for name in self.__slots__:
            if name in ("token_latencies_s", "steps"):
                getattr(self, name).extend(getattr(other, name))
            else:
                setattr(self, name, getattr(self, name) + getattr(other, name))


class _Replay:
    """One replay's state; the methods are the named steps of the module docstring."""

    def __init__(self, cost: RooflineCost, policies: Policies, cache: ExpertCache, clock: Clock, top_k: int,
                 host: Optional[Mapping[str, HostTime]]) -> None:
        self.ctl = Controller(policies, cache, cost, clock, top_k)
        self.cost, self.clock, self.cache = cost, clock, cache
        self.host_of = {p: (host or {}).get(p, ZERO_HOST) for p in ("decode", "prefill")}
        self.free = policies.spec.free_transfers
        self.xfer = 0.0 if self.free else cost.transfer()
        self.nbytes = cost.expert_bytes_gpu
        self.step_cadence = policies.spec.cadence == "step"
        self.last: Optional[StepRouting] = None  # the previous forward's routing, when it was decode
        self.st = RunStats()
        self.now = 0.0

    def copies(self, n: int, decode: bool) -> None:
        if n and not self.free:
            st = self.st
            st.copy_busy_s += n * self.xfer
            st.bytes_copied += n * self.nbytes
            if decode:
                st.decode_bytes_copied += n * self.nbytes

    def upkeep(self, step: Step, ht: HostTime) -> None:
        if not self.step_cadence:
            return
        up = self.ctl.upkeep(self.last, self.now, plan=not step.is_prefill)
        self.st.background_copies += len(up.copies)
        self.copies(len(up.copies), not step.is_prefill)
        if not step.is_prefill:
            self.now += ht.upkeep * len(step.routings)  # on the host thread, before the first layer
            self.st.host_upkeep_s += ht.upkeep * len(step.routings)
        self.last = None if step.is_prefill else StepRouting.from_layers(step.routings, self.cache.n_layers)

    def layer(self, r: LayerRouting, step: Step, ht: HostTime) -> float:
        """One MoE layer call; returns the GPU's busy time in it."""
        cost, st, ctl, n = self.cost, self.st, self.ctl, step.n_rows
        t_attn = cost.non_moe(n)
        # the kernels wait for the host's critical part (and for pricing the next layer's stream)
        critical = ht.critical + (ht.stream if ht.stream and ctl.prices_stream(r, step.is_prefill) else 0.0)
        self.now += t_attn + critical
        now = self.now
        shared = cost.shared(n)
        d = ctl.decide(r, now, shared, step.is_prefill)
        plan = d.plan
        bg = ctl.background()
        st.hits += d.hits
        st.late_hits += d.late_hits
        st.misses += d.misses
        if not step.is_prefill:
            st.decode_hits += d.hits
            st.decode_late_hits += d.late_hits
            st.decode_misses += d.misses
        st.demand_loads += len(plan.loads)
        st.streamed_loads += len(d.streamed)
        st.background_copies += len(bg.copies)
        n_stream = len(d.stream.experts) if d.stream is not None else 0
        st.stream_copies += n_stream
        st.stream_used += len(d.staged)
        st.layerwise_copies += len(d.full_layer)
        rep = d.replacement
        if rep is not None:
            st.replaced += len(rep.admissions)
        if step.is_prefill:
            if d.layerwise:
                st.prefill_layers_layerwise += 1
            elif d.staged:
                st.prefill_layers_stream += 1
            elif plan.gpu:
                st.prefill_layers_split += 1
            else:
                st.prefill_layers_cpu += 1
        self.copies(len(plan.loads) + len(bg.copies) + n_stream + len(d.full_layer), not step.is_prefill)
        tokens = dict(zip(r.experts, r.tokens))
        cpu_t = self.cpu_tier(plan.cpu, tokens, d.demand_copy_end - now)
        gpu_end, gpu_t = self.gpu_tier(plan.gpu, tokens, d, shared)
        if rep is not None:  # the re-placement's device copies follow the layer's compute
            gpu_end += rep.copy_s
            gpu_t += rep.copy_s
        kernels_end = max(now + cpu_t, gpu_end)
        self.now = max(kernels_end, now + ht.background)  # background host work beyond the kernels delays
        st.host_delay_s += self.now - kernels_end
        st.host_critical_s += critical
        st.host_background_s += ht.background
        st.moe_layer_calls += 1
        ctl.finish(self.now - now + t_attn + critical)
        st.cpu_busy_s += cpu_t
        st.gpu_experts += len(plan.gpu)
        st.cpu_experts += len(plan.cpu)
        return t_attn + gpu_t

    def cpu_tier(self, experts: Sequence[int], tokens: Mapping[int, int], copy_busy: float) -> float:
        """The CPU tier's time, slowed while the copy queue reads host memory."""
        return contended_cpu_time([tokens[e] for e in experts], self.cost, 0.0 if self.free else copy_busy)

    def gpu_tier(self, experts: Sequence[int], tokens: Mapping[int, int], d, shared: float) -> tuple[float, float]:
        """Shared experts, then routed experts as their weights become available: ``(end, busy)``."""
        cost, now = self.cost, self.now
        g, busy = now + shared, shared
        if experts:
            g += cost.gpu_call
            busy += cost.gpu_call
            for e in experts:
                avail = d.landing[e] if e in d.landing else now + d.ready.get(e, 0.0)
                if avail > g:
                    self.st.stall_s += avail - g
                    g = avail
                dt_e = cost.gpu_expert(tokens[e])
                g += dt_e
                busy += dt_e
        return g, busy

    def step(self, i: int, step: Step) -> None:
        st, n_layers = self.st, self.cache.n_layers
        t0 = self.now
        ht = self.host_of["prefill" if step.is_prefill else "decode"]
        gpu_busy = self.cost.forward_extra(step.n_rows)
        self.now += gpu_busy
        self.upkeep(step, ht)  # where the runtime's begin_forward runs it: before the first layer
        for r in step.routings:
            self.clock.now = i * n_layers + r.layer
            gpu_busy += self.layer(r, step, ht)
        dt = self.now - t0
        st.gpu_busy_s += gpu_busy
        n = step.n_rows
        if step.is_prefill:
            st.prefill_s += dt
            st.prefill_tokens += n
        else:
            st.decode_s += dt
            st.decode_tokens += n
            st.decode_steps += 1
            st.token_latencies_s.append(dt)
        st.steps.append((step.request, step.is_prefill, n, dt))


def replay(steps: Sequence[Step], cost: RooflineCost, policies: Policies, cache: ExpertCache,
           clock: Clock, top_k: int, host: Optional[Mapping[str, HostTime]] = None) -> RunStats:
    """Run ``steps`` in order from the cache's current state; returns the totals. ``host``: the
    strategy's host time per layer call by phase (``decode`` / ``prefill``); None charges none."""
    run = _Replay(cost, policies, cache, clock, top_k, host)
    for i, step in enumerate(steps):
        run.step(i, step)
    return run.st
