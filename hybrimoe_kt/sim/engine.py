"""Deterministic discrete-event replay of routing through one strategy.

Resources: the CPU (routed experts), the GPU (attention, shared experts, routed experts) and one
serialized PCIe copy queue shared by demand loads and background copies (CPU-served misses being
admitted, prefetches). Per layer of every forward:

1. the GPU runs the non-MoE part of the layer (attention, norms);
2. the eviction policy sees the routing; the cache counts hits, late hits and misses;
3. the scheduler splits the activated experts; demand loads join the copy queue and take a slot
   (evicting a resident the layer does not use), or stream through a scratch buffer when no slot can
   be freed; the GPU runs shared experts first, then resident experts, then loads as they land;
   the CPU runs its experts meanwhile (slowed while the copy queue shares host-memory bandwidth);
4. the layer ends when both tiers are done; background copies are then queued while the copy queue is
   booked less than ``copy_horizon_layers`` layer-times ahead.

Timing follows the cost model exactly (the same rules as ``core.schedulers.makespan``), so a run is a
pure function of its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection, Sequence

from hybrimoe_kt.core.cache import CacheFull, ExpertCache
from hybrimoe_kt.core.cost import RooflineCost
from hybrimoe_kt.core.protocols import Clock
from hybrimoe_kt.core.strategies import Policies
from hybrimoe_kt.core.types import ExpertId, LayerRouting


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
    demand_loads: int = 0
    background_copies: int = 0
    streamed_loads: int = 0
    hits: int = 0
    late_hits: int = 0
    misses: int = 0
    decode_hits: int = 0
    decode_late_hits: int = 0
    decode_misses: int = 0
    gpu_experts: int = 0
    cpu_experts: int = 0
    token_latencies_s: list[float] = field(default_factory=list)

    def merge(self, other: "RunStats") -> None:
        for name in self.__slots__:
            if name == "token_latencies_s":
                self.token_latencies_s.extend(other.token_latencies_s)
            else:
                setattr(self, name, getattr(self, name) + getattr(other, name))


class _View:
    """What prefetchers see (core.protocols.CacheView)."""

    def __init__(self, cache: ExpertCache, policies: Policies, cost: RooflineCost, top_k: int) -> None:
        self.n_layers, self.n_experts, self.top_k = cache.n_layers, cache.n_experts, top_k
        self.cost, self.scheduler = cost, policies.scheduler
        self._cache, self._policy = cache, policies.eviction

    def resident(self, layer: int) -> Collection[int]:
        return self._cache.resident(layer)

    def score(self, eid: ExpertId) -> float:
        return self._policy.score(eid)


def replay(steps: Sequence[Step], cost: RooflineCost, policies: Policies, cache: ExpertCache,
           clock: Clock, top_k: int) -> RunStats:
    """Run ``steps`` in order from the cache's current state; returns the totals."""
    spec = policies.spec
    sched, policy, admission, prefetcher = (policies.scheduler, policies.eviction,
                                            policies.admission, policies.prefetcher)
    view = _View(cache, policies, cost, top_k)
    free = spec.free_transfers
    xfer = 0.0 if free else cost.transfer()
    nbytes = cost.expert_bytes_gpu
    n_layers = cache.n_layers
    st = RunStats()
    now = 0.0
    copyq = 0.0  # when the copy queue is free
    ema_layer = 0.0
    for i, step in enumerate(steps):
        t0 = now
        n = step.n_rows
        gpu_busy = cost.forward_extra(n)
        now += gpu_busy
        for r in step.routings:
            layer = r.layer
            clock.now = i * n_layers + layer
            t_attn = cost.non_moe(n)
            gpu_busy += t_attn
            now += t_attn
            layer_start = now
            policy.on_route(r)
            admission.observe(r)
            h, lh, m = cache.account(layer, r.experts, now)
            st.hits += h
            st.late_hits += lh
            st.misses += m
            if not step.is_prefill:
                st.decode_hits += h
                st.decode_late_hits += lh
                st.decode_misses += m
            in_use = {(layer, e) for e in r.experts}
            ready = cache.in_flight(layer, now)
            shared = cost.shared(n)
            split = sched.plan(r, cache.resident(layer), cost, ready, max(0.0, copyq - now), shared)
            # demand loads through the copy queue
            landing: dict[int, float] = {}
            for e in split.loads:
                t = now if free else max(copyq, now) + xfer
                if not free:
                    st.copy_busy_s += xfer
                    copyq = t
                landing[e] = t
                st.bytes_copied += nbytes
                st.demand_loads += 1
                try:
                    cache.admit((layer, e), t, in_use, now)
                except CacheFull:
                    st.streamed_loads += 1
            tokens = dict(zip(r.experts, r.tokens))
            # CPU tier, slowed while the copy queue reads host memory
            cpu_t = 0.0
            if split.cpu:
                est = cost.cpu_call + sum(cost.cpu_expert(tokens[e]) for e in split.cpu)
                frac = min(1.0, max(0.0, copyq - now) / est) if est > 0 and not free else 0.0
                cpu_t = cost.cpu_call + sum(cost.cpu_expert_contended(tokens[e], frac) for e in split.cpu)
            # GPU tier: shared experts, then routed experts as their weights become available
            g = now + shared
            gpu_t = shared
            if split.gpu:
                g += cost.gpu_call
                gpu_t += cost.gpu_call
                for e in split.gpu:
                    avail = landing[e] if e in landing else now + ready.get(e, 0.0)
                    if avail > g:
                        st.stall_s += avail - g
                        g = avail
                    d = cost.gpu_expert(tokens[e])
                    g += d
                    gpu_t += d
            now = max(now + cpu_t, g)
            st.cpu_busy_s += cpu_t
            gpu_busy += gpu_t
            st.gpu_experts += len(split.gpu)
            st.cpu_experts += len(split.cpu)
            lt = now - layer_start + t_attn
            ema_layer = lt if ema_layer == 0.0 else 0.9 * ema_layer + 0.1 * lt
            # background copies: admit CPU-served misses, then prefetches
            prefetcher.observe(r)
            if free:
                budget = float("inf")
            else:
                budget = now + spec.copy_horizon_layers * ema_layer - max(copyq, now)
            if budget >= xfer and (spec.background_in_prefill or not step.is_prefill):
                wanted: list[ExpertId] = [(layer, e) for e in split.cpu] if spec.admit_misses else []
                n_misses = len(wanted)
                wanted += prefetcher.propose(layer, view, budget)
                for j, eid in enumerate(wanted):
                    if budget < xfer:
                        break
                    if eid in cache:
                        continue
                    try:
                        victim = cache.choose_victim(eid[0], (), now)
                    except CacheFull:
                        continue
                    bonus = prefetcher.expected_uses(eid) if j >= n_misses else 0.0
                    if not admission.admit(eid, victim, policy, bonus):
                        continue
                    t = now if free else max(copyq, now) + xfer
                    if not free:
                        copyq = t
                        st.copy_busy_s += xfer
                        budget -= xfer
                        st.bytes_copied += nbytes
                    cache.admit(eid, t, (), now, victim=victim)
                    st.background_copies += 1
        dt = now - t0
        st.gpu_busy_s += gpu_busy
        if step.is_prefill:
            st.prefill_s += dt
            st.prefill_tokens += n
        else:
            st.decode_s += dt
            st.decode_tokens += n
            st.decode_steps += 1
            st.token_latencies_s.append(dt)
    return st
