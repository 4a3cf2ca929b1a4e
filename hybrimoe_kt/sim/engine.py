"""Deterministic discrete-event replay of routing through one strategy.

Resources: the CPU (routed experts), the GPU (attention, shared experts, routed experts) and one
serialized PCIe copy queue shared by demand loads and background copies (CPU-served misses being
admitted, prefetches). Per layer of every forward:

1. the GPU runs the non-MoE part of the layer (attention, norms);
2. the host pays the strategy's critical host time of a layer call (routing to the host, deciding,
   dispatching, summing the tiers: ``core.host``), during which no expert kernel runs;
3. the shared ``core.controller.Controller`` decides the layer's Plan (the same code the runtime runs):
   hits, the CPU/GPU split, demand loads and evictions, background copies;
4. the GPU runs shared experts first, then resident experts, then loads as they land; the CPU runs its
   experts meanwhile, slowed while the copy queue shares host-memory bandwidth with it; the host decides
   the background copies meanwhile (its background host time);
5. the layer ends when both tiers and the host's background work are done.

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
from hybrimoe_kt.core.strategies import Policies
from hybrimoe_kt.core.types import LayerRouting


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


def replay(steps: Sequence[Step], cost: RooflineCost, policies: Policies, cache: ExpertCache,
           clock: Clock, top_k: int, host: Optional[Mapping[str, HostTime]] = None) -> RunStats:
    """Run ``steps`` in order from the cache's current state; returns the totals. ``host``: the
    strategy's host time per layer call by phase (``decode`` / ``prefill``); None charges none."""
    ctl = Controller(policies, cache, cost, clock, top_k)
    host_of = {p: (host or {}).get(p, ZERO_HOST) for p in ("decode", "prefill")}
    free = policies.spec.free_transfers
    xfer = 0.0 if free else cost.transfer()
    nbytes = cost.expert_bytes_gpu
    n_layers = cache.n_layers
    st = RunStats()
    now = 0.0
    for i, step in enumerate(steps):
        t0 = now
        n = step.n_rows
        ht = host_of["prefill" if step.is_prefill else "decode"]
        gpu_busy = cost.forward_extra(n)
        now += gpu_busy
        for r in step.routings:
            clock.now = i * n_layers + r.layer
            t_attn = cost.non_moe(n)
            gpu_busy += t_attn
            now += t_attn + ht.critical  # the kernels wait for the host's critical part
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
            n_copies = len(plan.loads) + len(bg.copies)
            st.demand_loads += len(plan.loads)
            st.streamed_loads += len(d.streamed)
            st.background_copies += len(bg.copies)
            if not free:
                st.copy_busy_s += n_copies * xfer
                st.bytes_copied += n_copies * nbytes
                if not step.is_prefill:
                    st.decode_bytes_copied += n_copies * nbytes
            tokens = dict(zip(r.experts, r.tokens))
            # CPU tier, slowed while the copy queue reads host memory
            cpu_t = 0.0
            if plan.cpu:
                est = cost.cpu_call + sum(cost.cpu_expert(tokens[e]) for e in plan.cpu)
                busy = max(0.0, d.demand_copy_end - now)
                frac = min(1.0, busy / est) if est > 0 and not free else 0.0
                cpu_t = cost.cpu_call + sum(cost.cpu_expert_contended(tokens[e], frac) for e in plan.cpu)
            # GPU tier: shared experts, then routed experts as their weights become available
            g = now + shared
            gpu_t = shared
            if plan.gpu:
                g += cost.gpu_call
                gpu_t += cost.gpu_call
                for e in plan.gpu:
                    avail = d.landing[e] if e in d.landing else now + d.ready.get(e, 0.0)
                    if avail > g:
                        st.stall_s += avail - g
                        g = avail
                    dt_e = cost.gpu_expert(tokens[e])
                    g += dt_e
                    gpu_t += dt_e
            layer_start = now
            kernels_end = max(now + cpu_t, g)
            now = max(kernels_end, now + ht.background)  # background host work beyond the kernels delays
            st.host_delay_s += now - kernels_end
            st.host_critical_s += ht.critical
            st.host_background_s += ht.background
            st.moe_layer_calls += 1
            ctl.finish(now - layer_start + t_attn + ht.critical)
            st.cpu_busy_s += cpu_t
            gpu_busy += gpu_t
            st.gpu_experts += len(plan.gpu)
            st.cpu_experts += len(plan.cpu)
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
        st.steps.append((step.request, step.is_prefill, n, dt))
    return st
