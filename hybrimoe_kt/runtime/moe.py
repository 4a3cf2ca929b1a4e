"""HybridMoE: executes the core's Plans for every MoE layer of a model.

A strategy with the step cadence (``core.upkeep``) runs decode layers without the Controller: the
residency lookup of ``runtime.step_cadence`` splits the experts, and the cache upkeep runs once per
step, before the next forward's first layer. Otherwise (and for prefill)
``forward(layer, x, topk_ids, topk_weights)`` asks the shared Controller for the layer's Plan and
executes it (``runtime.layer_plan``), queues the background copies, waits for the CPU and sums the
tiers (``runtime.tiers``), each expert with its own routing weight. Inside ``graph_step`` every call
takes the graph-safe decode path (``runtime.graph_decode``) instead. The only host transfer per layer
is the routing ids and weights (``runtime.routing_io``; the CPU kernel needs them anyway).

The controller gets the inputs the simulator gives it: ``now`` (when the layer's MoE part starts),
``gpu_free`` (the cost model's predicted shared-expert time when the layer runs shared experts) and,
through ``finish``, the whole layer's time: from the end of the previous layer call (or from
``begin_forward`` on a forward's first layer) to the end of this one, so the attention and the rest of
the decoder layer are included. Time comes from ``timer`` (``time.perf_counter`` unless injected: a
test drives the runtime with the simulator's timeline).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from hybrimoe_kt.core.cache import ExpertCache
from hybrimoe_kt.core.controller import Controller
from hybrimoe_kt.core.cost import CostModel
from hybrimoe_kt.core.protocols import Clock
from hybrimoe_kt.core.strategies import StrategySpec, build_policies, get_strategy
from hybrimoe_kt.core.stream import staging_slots
from hybrimoe_kt.core.types import LayerRouting
from hybrimoe_kt.kernels.cpu_backend import CpuExpertBackend, default_threads
from hybrimoe_kt.kernels.cpu_ktkernel import CpuWorkerPool
from hybrimoe_kt.kernels.gpu_experts import gpu_experts_forward
from hybrimoe_kt.kernels.triton_experts import triton_available, triton_experts_forward
from hybrimoe_kt.runtime.device import Tier, real_host
from hybrimoe_kt.runtime.graph_decode import GraphSafeDecode, graph_unsupported, triton_reads
from hybrimoe_kt.runtime.layer_plan import apply_replacement, dispatch_plan
from hybrimoe_kt.runtime.next_router import HintStats, NextRouter, check_next_router, hint_order
from hybrimoe_kt.runtime.routing_io import check_call, route_to_host, to_host, to_host_placeholder
from hybrimoe_kt.runtime.slots import SlotPool
from hybrimoe_kt.runtime.step_cadence import StepCadence
from hybrimoe_kt.runtime.tiers import Tiers
from hybrimoe_kt.runtime.store import HostExpertStore
from hybrimoe_kt.runtime.store_gguf import GgufExpertStore

log = logging.getLogger(__name__)

SharedFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class RuntimeStats:
    forwards: int = 0
    decide_s: float = 0.0      # controller time (plan, cache, policies)
    dispatch_s: float = 0.0    # host time from the plan to the last queued kernel/copy
    background_s: float = 0.0  # deciding and queueing background copies, while the kernels run
    wait_s: float = 0.0        # waiting for the CPU tier and the sum
    gpu_experts: int = 0
    cpu_experts: int = 0
    streamed: int = 0
    staged: int = 0            # GPU experts read from the layer-streaming prefill's staging buffer
    per_layer_host_s: list[float] = field(default_factory=list)


class HybridMoE:
    def __init__(self, store: HostExpertStore | GgufExpertStore, tier: Tier, strategy: str | StrategySpec,
                 slots: int, cost: CostModel, top_k: int, *, counts: Optional[np.ndarray] = None,
                 cpu_backend: str = "auto", cpu_threads: Optional[int] = None, max_len: int = 512,
                 n_scratch: int = 2, cpu_backends: Optional[Sequence[CpuExpertBackend]] = None,
                 timer: Callable[[], float] = time.perf_counter) -> None:
        spec = strategy if isinstance(strategy, StrategySpec) else get_strategy(strategy)
        if spec.clairvoyant:
            raise ValueError(f"strategy {spec.name} needs the future and exists only in the simulator")
        if spec.decode_demand != "off":
            raise ValueError(f"strategy {spec.name}: decode demand loads (decode_demand) are a simulator "
                             f"ablation; the runtime does not implement them")
        if spec.hidden_accuracy is not None:
            raise ValueError(f"strategy {spec.name}: hidden_accuracy models a predictor in the simulator; the "
                             f"runtime takes real predictions (set_next_router)")
        if not 1 <= top_k <= store.n_experts:
            raise ValueError(f"top_k={top_k} must be in 1..{store.n_experts}")
        self.store, self.tier, self.spec, self.top_k = store, tier, spec, top_k
        n_layers, n_experts = store.n_layers, store.n_experts
        self.clock = Clock()
        self.policies = build_policies(spec, n_layers, n_experts, top_k, slots, self.clock, counts=counts)
        self.cache = ExpertCache(n_layers, n_experts, slots if spec.uses_gpu_cache else 0,
                                 self.policies.eviction, global_pool=spec.pool == "global")
        self.controller = Controller(self.policies, self.cache, cost, self.clock, top_k)
        n_stage = staging_slots(spec.stream_buffer, n_experts) if spec.prefill_stream else 0
        if spec.layerwise_threshold:  # one full-layer buffer (core.layerwise), an even slot count
            n_stage = n_experts + n_experts % 2
        self.pool = SlotPool(tier, store, self.cache.capacity, n_scratch, n_stage=n_stage)
        if cpu_backends is not None:  # prebuilt for this store (shared by runtimes over one store)
            if len(cpu_backends) != n_layers:
                raise ValueError(f"cpu_backends has {len(cpu_backends)} layers, the store has {n_layers}")
            self.cpu = list(cpu_backends)
        else:
            with real_host():  # the CPU tier is real even under FakeTensorMode
                workers = CpuWorkerPool(cpu_threads or default_threads())  # one kt-kernel pool for all layers
                self.cpu = [store.cpu_backend(i, cpu_backend, workers.n_threads, top_k, max_len, workers)
                            for i in range(n_layers)]
        with real_host():
            self._masks = [b.gpu_mask.numpy() for b in self.cpu]  # [E] bool views, shared memory
        self.cache.place(self.policies.placement)
        for eid in self.policies.placement:
            self.pool.load(eid)
        self.stats = RuntimeStats()
        self._timer = timer
        # fake tier: host work on real placeholders; else plain host copies and no context switches
        self._to_host = to_host_placeholder if tier.is_fake else to_host
        self._real = real_host if tier.is_fake else contextlib.nullcontext
        self._shared_s = getattr(cost, "shared", None)  # predicted shared-expert time (RooflineCost)
        self._t0 = timer()
        self._mark: Optional[float] = None  # when this layer's non-MoE part began (previous call's end)
        self._begun = False                 # begin_forward() was called for the coming forward
        self._forward_index = -1            # the first call starts forward 0 (the simulator's numbering)
        self._last_layer = n_layers
        self._slot_lut = np.full(n_experts, -1, dtype=np.int64)  # host [E]: expert -> slot this call
        self._tier_cpu = tier.device.type == "cpu"  # the CPU stand-in: no device moves
        self._tiers = Tiers(tier, self.cpu, store.hidden, self._to_host, self._real)
        self._triton = (triton_experts_forward if tier.is_cuda and triton_reads(self.pool.weights)
                        and triton_available(tier.device) else None)
        self._prefill = False               # the current forward's phase
        self._phase_given: Optional[bool] = None
        self._upkept = False                # begin_forward() already ran the step upkeep
        self._graph: Optional[GraphSafeDecode] = None  # the graph-safe decode path, once enabled
        self._capturing = False             # inside graph_step()
        self._graph_mark: Optional[float] = None  # when the last graph step's upkeep ran
        self._cadence: Optional[StepCadence] = None  # step-cadence strategies: decode without policy work
        self._next_router: Optional[dict[int, NextRouter]] = None  # hidden-state hook (runtime.next_router)
        self.hint_stats = HintStats()
        if spec.decode_lookup:
            self._cadence = StepCadence(self.controller, self.pool, self._masks, top_k)
            self._cadence.publish()

    def set_next_router(self, layer: int, fn: Optional[NextRouter]) -> None:
        """Run ``fn`` (layer+1's router) on layer ``layer``'s hidden state and prefetch what it predicts
        (``runtime.next_router``); ``fn=None`` removes it. Needs a strategy with ``prefetch='hidden'``."""
        check_next_router(self.spec.name, self.spec.prefetch, self.store.n_layers, layer)
        routers = dict(self._next_router or {})
        if fn is None:
            routers.pop(layer, None)
        else:
            routers[layer] = fn
        self._next_router = routers or None

    @property
    def label(self) -> str:
        return self.tier.label

    def begin_forward(self, is_prefill: Optional[bool] = None) -> None:
        """Mark the start of a forward's first MoE decoder layer (its attention): the first layer's time
        reported to the controller then includes its non-MoE part. Without it, a forward's first layer
        reports its MoE part only. ``is_prefill`` names the forward's phase (default: more than one
        row is a prefill, so a batched decode step should say so); given, a step-cadence strategy runs
        its upkeep here, before the attention, instead of at the first MoE layer."""
        if self._capturing:  # a hook inside a captured step: the caller ran the upkeep before it
            return
        if self._graph is not None:
            self._load_graph_step()
        self._begun = True
        self._phase_given = is_prefill
        if is_prefill is not None and self._cadence is not None:
            self._cadence.between_forwards(self._timer() - self._t0, is_prefill)
            self._upkept = True
        self._mark = self._timer()

    def graph_unsupported(self) -> Optional[str]:
        """Why this runtime's decode steps cannot be captured in a CUDA graph (None: they can)."""
        if self._cadence is None:
            return f"strategy {self.spec.name} decides per layer in decode"
        return graph_unsupported(self.tier, self.cpu, self.pool.weights)

    def enable_graph_decode(self, max_rows: int = 1) -> None:
        """Prepare the graph-safe decode path (``runtime.graph_decode``) for steps of up to ``max_rows``
        rows; ``graph_step`` then routes decode layers through it."""
        if self._cadence is None:
            raise ValueError(f"strategy {self.spec.name} decides per layer in decode and cannot run in a CUDA "
                             f"graph; use hybrimoe, static-frequency or stock")
        s = self.store
        self._graph = GraphSafeDecode(self.tier, self.pool, self.cpu, s.n_layers, self.top_k, s.hidden, max_rows)
        self._cadence.on_publish = self._graph.publish
        self._cadence.publish()

    @contextlib.contextmanager
    def graph_step(self) -> Iterator[None]:
        """Within: every layer call takes the graph-safe decode path and ``begin_forward`` does nothing
        (a CUDA graph captures or replays the step). Call ``begin_forward(is_prefill=False)`` before each
        step: it runs the upkeep for the step before, outside the graph."""
        if self._graph is None:
            raise RuntimeError("call enable_graph_decode() before graph_step()")
        self._capturing = True
        try:
            yield
        finally:
            self._capturing = False
            self._begun = self._upkept = False  # the next eager forward starts afresh

    def graph_replayed(self, rows: int = 1) -> None:
        """Call after each replay of a captured step (a replay runs no Python, so the runtime cannot
        see it): the next upkeep then loads that step's routing from the graph's buffers."""
        if self._graph is None:
            raise RuntimeError("call enable_graph_decode() before replaying graph steps")
        self._graph.replayed(rows)

    def end_graph_steps(self) -> None:
        """After the last graph-safe step of a generation: count it now (the next upkeep uses it)."""
        if self._graph is not None:
            self._load_graph_step()

    def _load_graph_step(self) -> None:
        """Hand the last graph-safe step's routing to the upkeep, with its counters and time."""
        step = self._graph.step()
        now = self._timer()
        if step is not None:
            hits, misses = self._cadence.load_step(*step)
            c, st, n_layers = self.cache.counters, self.stats, self.store.n_layers
            c.hits += hits
            c.misses += misses
            st.forwards += n_layers
            st.gpu_experts += hits
            st.cpu_experts += misses
            if self._graph_mark is not None:
                self.controller.finish((now - self._graph_mark) / n_layers)  # the step's mean layer time
        self._graph_mark = now

    def _check(self, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> None:
        check_call(self.store.n_layers, self.store.hidden, self.top_k, layer, x, ids, w)

    def forward(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                shared: Optional[SharedFn] = None) -> torch.Tensor:
        """Routed (+ shared) experts of MoE layer ``layer`` for ``x [N, H]``; returns ``[N, H]`` in x's
        dtype, on x's device. The steps (named as in ``sim.engine``): start (upkeep between forwards),
        route, decide (or, in a step-cadence decode, look residency up), dispatch, background, combine."""
        self._check(layer, x, topk_ids, topk_weights)
        if self._capturing:  # a CUDA graph captures (or the stand-in runs) the graph-safe step
            return self._graph.layer(layer, x, topk_ids, topk_weights, shared)
        t_start = self._timer()
        n = x.shape[0]
        self._start(layer, n, t_start)
        if self._next_router is not None:  # the hidden-state hook (off: this check only)
            self._hint(layer, x)
        ids_cpu, w_cpu, ids_np, w_np, flat = self._route(topk_ids, topk_weights)
        if self._cadence is not None and self._cadence.recording:
            return self._decode_visible(layer, x, topk_weights, ids_cpu, w_cpu, ids_np, w_np, flat, shared,
                                        t_start)
        routing = LayerRouting.from_topk(layer, ids_np, w_np, is_prefill=self._prefill)
        gpu_free = self._shared_s(n) if shared is not None and self._shared_s is not None else 0.0
        d = self.controller.decide(routing, t_start - self._t0, gpu_free, self._prefill)
        t_plan = self._timer()
        cpu_out, out, shared_out = dispatch_plan(self.pool, self._tiers, self._masks[layer], self._slot_lut, layer,
                                                 x, topk_weights, ids_cpu, w_cpu, ids_np, d, shared)
        apply_replacement(self.pool, d)  # a layer-wise call's re-placement, behind its kernels
        t_dispatch = self._timer()
        self._background()
        t_background = self._timer()
        result = self._tiers.combine(layer, x, bool(d.plan.cpu), bool(d.plan.gpu), cpu_out, out, shared_out)
        self._account(t_start, t_plan, t_dispatch, t_background, len(d.plan.gpu), len(d.plan.cpu),
                      len(d.streamed))
        self.stats.staged += len(d.staged)
        return result

    # --- the named steps ---------------------------------------------------------------------------
    def _start(self, layer: int, n: int, t_start: float) -> None:
        """A new forward begins at a layer index not above the last one: run the step upkeep."""
        if layer <= self._last_layer:
            self._forward_index += 1
            if not self._begun:
                self._mark = None  # no begin_forward(): the last forward's end is not this layer's start
            given = self._phase_given if self._begun else None
            self._prefill = n > 1 if given is None else given
            self._phase_given = None
            if self._cadence is not None and not self._upkept:
                self._cadence.between_forwards(t_start - self._t0, self._prefill)
            self._upkept = False
        self._last_layer = layer
        self.clock.now = self._forward_index * self.store.n_layers + layer

    def _route(self, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
        """The one device-to-host copy: routing ids and weights (the CPU kernel needs them anyway)."""
        return route_to_host(topk_ids, topk_weights, self.store.n_experts, self._to_host, self._real)

    def _hint(self, layer: int, x: torch.Tensor) -> None:
        """Layer ``layer + 1``'s router on ``x``: its predicted ids to the hidden prefetcher, before the
        decision (their host copy also completes the routing's, launched before them)."""
        fn = self._next_router.get(layer) if self._next_router is not None else None
        if fn is None or (self._prefill and not self.spec.background_in_prefill):  # no copies to feed
            return
        t0 = self._timer()
        predicted = fn(x)
        with self._real():
            experts = hint_order(self._to_host(predicted, torch.int64).numpy())
        self.policies.prefetcher.hint(layer + 1, experts)  # type: ignore[attr-defined]
        hs = self.hint_stats
        hs.calls += 1
        hs.hinted += len(experts)
        hs.seconds += self._timer() - t0

    def _decode_visible(self, layer: int, x: torch.Tensor, topk_weights: torch.Tensor, ids_cpu: torch.Tensor,
                        w_cpu: torch.Tensor, ids_np: np.ndarray, w_np: np.ndarray, flat: Optional[list],
                        shared: Optional[SharedFn], t_start: float) -> torch.Tensor:
        """Step-cadence decode: residency lookup, one CPU submit, the GPU experts, one sum."""
        cad = self._cadence
        cad.record(layer, ids_np, w_np)
        if flat is not None:  # decode sizes: plain Python over a list mirror of the slot table
            row = cad.rows[layer]
            sids = [row[e] if e >= 0 else -1 for e in flat]
        else:
            sids = cad.lookup(layer, ids_np).ravel().tolist()
            flat = ids_np.ravel().tolist()
        gpu_slots = [s for s in sids if s >= 0]
        has_cpu = len(gpu_slots) < len(sids) and (-1 not in flat
                                                  or any(s < 0 and e >= 0 for e, s in zip(flat, sids)))
        n, dev = x.shape[0], self.tier.device
        cpu_out = self._tiers.submit_cpu(layer, x, ids_cpu, w_cpu) if has_cpu else None  # its mask: the residency
        t_plan = self._timer()
        out = self._tiers.out_buffer(n) if gpu_slots else None
        shared_out = shared(x) if shared is not None else None
        if gpu_slots:
            slot_ids = torch.from_numpy(np.asarray(sids, dtype=np.int32).reshape(ids_np.shape))
            if self._tier_cpu:
                x_dev, w_dev = x, topk_weights
            else:
                slot_ids = slot_ids.to(dev, non_blocking=True)
                x_dev, w_dev = x.to(dev), topk_weights.to(dev)
            kernel = self._triton or gpu_experts_forward  # one launch pair over the slots on CUDA
            kernel(x_dev, slot_ids, w_dev, self.pool.weights, active_slots=gpu_slots, out=out)
        t_dispatch = self._timer()
        result = self._tiers.combine(layer, x, has_cpu, bool(gpu_slots), cpu_out, out, shared_out)
        if n == 1:  # a row's experts are distinct
            n_gpu, n_all = len(gpu_slots), len(flat) - flat.count(-1)
        else:
            n_gpu, n_all = len(set(gpu_slots)), len({e for e in flat if e >= 0})
        c = self.cache.counters  # as the controller counts a decode layer (distinct experts)
        c.hits += n_gpu
        c.misses += n_all - n_gpu
        self._account(t_start, t_plan, t_dispatch, t_dispatch, n_gpu, n_all - n_gpu, 0)
        return result

    def _background(self) -> None:
        """Background copies, decided while the kernels run, queued behind the demand loads."""
        bg = self.controller.background()
        for eid in bg.evictions:
            self.pool.release(eid)
        for eid in bg.copies:
            self.pool.load(eid)

    def _account(self, t_start: float, t_plan: float, t_dispatch: float, t_background: float, n_gpu: int,
                 n_cpu: int, n_streamed: int) -> None:
        t_end = self._timer()
        self.controller.finish(t_end - (t_start if self._mark is None else self._mark))
        self._mark, self._begun = t_end, False
        st = self.stats
        st.forwards += 1
        st.decide_s += t_plan - t_start
        st.dispatch_s += t_dispatch - t_plan
        st.background_s += t_background - t_dispatch
        st.wait_s += t_end - t_background
        st.gpu_experts += n_gpu
        st.cpu_experts += n_cpu
        st.streamed += n_streamed
