"""The per-layer decision loop shared by the simulator and the runtime.

For every MoE layer of every forward the executor calls ``decide(routing, now)`` and applies the
returned ``Plan`` exactly; once the layer's kernels are dispatched it calls ``background()`` and queues
the returned copies (so that deciding them overlaps the kernels instead of delaying them); after the
layer it reports how long it took with ``finish``. The controller
owns the expert cache, the strategy's policies and its own prediction of the copy queue (the times at
which booked copies land, from the cost model): the simulator takes those times as truth, the runtime
uses them for decisions and enforces ordering with real events.

A strategy with a layer-wise prefill (``core.layerwise``) decides a long prefill layer call
differently: the whole layer is copied to the GPU and computed there, and the layer's GPU experts may
then be re-placed from the batch (``Decision.replacement``, applied by the executor after the layer).

A strategy with the step cadence (``core.upkeep``) skips the policies in decode: ``decide`` splits a
decode layer by visible residency (landed by the last ``upkeep``), and the executor calls ``upkeep``
before every forward, with the previous decode step's routing, to feed the policies and book swaps.

Order inside ``decide``: the eviction policy and admission rule see the routing; the cache counts hits;
the scheduler splits the experts; demand loads take slots (evicting residents the layer does not use,
or streaming through a scratch buffer when none can be freed). ``background`` then chooses CPU-served
misses worth admitting and the prefetcher's proposals while the copy queue is booked less than
``copy_horizon_layers`` layer-times past the layer's predicted end.
"""

from __future__ import annotations

from dataclasses import dataclass

from hybrimoe_kt.core.cache import CacheFull, ExpertCache
from hybrimoe_kt.core.cost import CostModel
from hybrimoe_kt.core.layerwise import Replacement, device_copy_s
from hybrimoe_kt.core.protocols import Clock
from hybrimoe_kt.core.schedulers.makespan import canonical_queue, evaluated_split
from hybrimoe_kt.core.schedulers.prefill_choice import choose_prefill, contended_makespan
from hybrimoe_kt.core.stream import StreamPlan, choose_stream, proxy_routing, stream_order
from hybrimoe_kt.core.strategies import Policies
from hybrimoe_kt.core.types import EMPTY_BACKGROUND, BackgroundPlan, ExpertId, LayerRouting, Plan
from hybrimoe_kt.core.upkeep import EMPTY_UPKEEP, StepRouting, UpkeepPlan


@dataclass(frozen=True, slots=True)
class Decision:
    """A Plan plus what the executor needs to time or account it."""

    plan: Plan
    hits: int
    late_hits: int
    misses: int
    landing: dict[int, float]       # demand load -> predicted landing time (absolute)
    ready: dict[int, float]         # in-flight resident -> seconds after ``now`` until it lands
    streamed: tuple[int, ...]       # demand loads that found no slot (scratch buffer, not admitted)
    demand_copy_end: float          # copy queue end after demand loads and stream copies, before
                                    # background copies
    staged: tuple[int, ...] = ()    # GPU experts served from the staging buffer (``core.stream``)
    stream: StreamPlan | None = None  # copies of the next layer's experts into the staging buffer
    layerwise: bool = False         # a layer-wise prefill call (``core.layerwise``): every GPU expert
                                    # waits for the whole ``full_layer`` copy
    full_layer: tuple[int, ...] = ()  # experts copied into the full-layer buffer, in queue order
    replacement: Replacement | None = None  # after the layer: evictions/admissions (device copies)


@dataclass(frozen=True, slots=True)
class _Pending:
    """What ``background`` needs from the last ``decide``."""

    routing: LayerRouting
    cpu: tuple[int, ...]            # experts the CPU serves (candidates for admission)
    end: float                      # the layer's predicted end
    is_prefill: bool
    keep: set[ExpertId]             # experts the layer uses or loads: never background victims


class Controller:
    def __init__(self, policies: Policies, cache: ExpertCache, cost: CostModel, clock: Clock,
                 top_k: int) -> None:
        self.policies = policies
        self.spec = policies.spec
        self.cache = cache
        self.cost = _FreeTransfers(cost) if self.spec.free_transfers else cost  # policies price copies at 0
        self.clock = clock
        self.top_k = top_k
        self.copy_free_at = 0.0     # predicted time at which the copy queue is idle
        self.layer_time_ema = 0.0   # recent layer time (non-MoE part included), seconds
        self._free = self.spec.free_transfers
        self._xfer = 0.0 if self._free else cost.transfer()
        self._view = _View(self)
        self._pending: _Pending | None = None  # what background() needs from the last decide()
        self._step = self.spec.cadence == "step"
        self.visible_at = -float("inf")  # step cadence: copies landed by then are served from their slot
        self._stream = (self.spec.prefill_stream and not self._free
                        and hasattr(cost, "cpu_expert_contended"))
        self._staged: StreamPlan | None = None  # booked at the previous layer for the next one
        self._last_prefill: dict[int, LayerRouting] = {}  # layer -> its routing in the last prefill forward

    def decide(self, routing: LayerRouting, now: float, gpu_free: float = 0.0,
               is_prefill: bool = False) -> Decision:
        """Plan one layer whose MoE part starts at ``now``; the GPU is busy for ``gpu_free`` first."""
        if self._step and not is_prefill:
            return self._decide_visible(routing, now, gpu_free)
        pol, cache, layer = self.policies, self.cache, routing.layer
        if pol.layerwise is not None and pol.layerwise.applies(routing.n_rows, is_prefill):
            return self._decide_layerwise(routing, now, gpu_free)
        # without a GPU cache there is nothing to rank or admit; a step-cadence strategy may learn its
        # scores from decode steps only (a prompt's routing is a different distribution)
        if self.spec.uses_gpu_cache and (self.spec.learn_from_prefill or not (self._step and is_prefill)):
            pol.eviction.on_route(routing)
            pol.admission.observe(routing)
        h, lh, m = cache.account(layer, routing.experts, now)
        in_use = {(layer, e) for e in routing.experts}
        ready = cache.in_flight(layer, now)
        resident = cache.resident(layer)
        staged, self._staged = (self._staged if self._staged is not None and self._staged.layer == layer
                                and is_prefill else None), None
        if staged is not None:  # staged experts count as residents still in flight (core.stream)
            ready.update({e: t for e, t in staged.ready(now).items() if t > 0.0})
            resident = set(resident) | set(staged.experts)
        copy_free = max(0.0, self.copy_free_at - now)
        split = self._split(routing, resident, ready, copy_free, gpu_free, is_prefill)
        from_stage = tuple(e for e in split.gpu if e in staged.experts) if staged is not None else ()
        evictions: list[ExpertId] = []
        landing: dict[int, float] = {}
        streamed: list[int] = []
        for e in split.loads:
            t = now if self._free else max(self.copy_free_at, now) + self._xfer
            if not self._free:
                self.copy_free_at = t
            landing[e] = t
            try:
                victim = cache.admit((layer, e), t, in_use, now)
            except CacheFull:
                streamed.append(e)
                continue
            if victim is not None:
                evictions.append(victim)
        stream = self._plan_stream(routing, split, now, gpu_free) if self.prices_stream(routing, is_prefill) else None
        demand_end = self.copy_free_at
        if self.spec.uses_gpu_cache:
            pol.prefetcher.observe(routing)
        # experts this layer uses or this plan admits are never background victims: the executor
        # frees evicted slots before it loads and computes, so such a victim would have no slot
        keep = in_use | {(layer, e) for e in split.loads}
        self._pending = _Pending(routing, split.cpu, now + split.makespan_s, is_prefill, keep)
        plan = Plan(layer, split.gpu, split.cpu, split.loads, tuple(evictions), split.makespan_s)
        return Decision(plan, h, lh, m, landing, ready, tuple(streamed), demand_end, from_stage, stream)

    def prices_stream(self, routing: LayerRouting, is_prefill: bool) -> bool:
        """Whether ``decide`` prices streaming the next layer for this call (a prefill call of at least
        ``stream_min_rows`` rows below the last layer, of a streaming strategy): the host time
        ``HostTime.stream`` the simulator charges such a call."""
        return (self._stream and is_prefill and routing.layer + 1 < self.cache.n_layers
                and routing.n_rows >= self.spec.stream_min_rows)

    def _split(self, routing: LayerRouting, resident, ready, copy_free: float, gpu_free: float,
               is_prefill: bool = True):
        """The scheduler's split; in prefill, the contention choice where the strategy makes it."""
        split = self.policies.scheduler.plan(routing, resident, self.cost, ready, copy_free, gpu_free)
        if is_prefill and self.spec.prefill_contention and not self._free:  # copies slow the CPU
            split = choose_prefill(split, routing, resident, self.cost, ready, copy_free, gpu_free)
        return split

    def _plan_stream(self, routing: LayerRouting, split, now: float, gpu_free: float) -> StreamPlan | None:
        """Book the next layer's non-residents into the staging buffer when ``core.stream`` says it
        pays (after this layer's demand loads on the copy queue)."""
        cache, nxt = self.cache, routing.layer + 1
        self._last_prefill[routing.layer] = routing
        resident = cache.resident(nxt)
        proxy = proxy_routing(routing, self._last_prefill.get(nxt))
        score_array = getattr(self.policies.eviction, "score_array", None)  # [L, E], higher = keep
        scores = score_array() if score_array is not None else None
        prior = scores[nxt] if scores is not None and getattr(scores, "ndim", 0) == 2 else None
        order = stream_order(cache.n_experts, resident, self.spec.stream_buffer or cache.n_experts, proxy, prior)
        if not order:
            return None
        non_moe = getattr(self.cost, "non_moe", None)
        next_start = now + split.makespan_s + (non_moe(routing.n_rows) if non_moe is not None else 0.0)
        start = max(self.copy_free_at, now)
        choice = choose_stream(routing, split, proxy, resident, order, self._split, self.cost, now=now,
                               next_start=next_start, copy_free=self.copy_free_at, stream_free=start,
                               ready_next=cache.in_flight(nxt, next_start), gpu_free=gpu_free)
        if not choice.stream:
            return None
        order = order[:choice.count]
        landing = tuple(start + (j + 1) * self._xfer for j in range(len(order)))
        self.copy_free_at = landing[-1]
        self._staged = StreamPlan(nxt, order, landing)
        return self._staged

    def _decide_layerwise(self, routing: LayerRouting, now: float, gpu_free: float) -> Decision:
        """A layer-wise prefill call (``core.layerwise``): the layer's copy into the full-layer buffer
        goes on the copy queue, every activated expert runs on the GPU once the whole copy landed, and
        the layer's GPU experts may be re-placed from the batch right after (device copies)."""
        pol, cache, layer, lw = self.policies, self.cache, routing.layer, self.policies.layerwise
        assert lw is not None
        pol.eviction.on_route(routing)
        pol.admission.observe(routing)
        h, lh, m = cache.account(layer, routing.experts, now)
        resident = set(cache.resident(layer))
        copies = lw.copies(cache.n_experts, resident)
        landed = now
        if copies and not self._free:  # booked one after another, as demand loads are
            t = max(self.copy_free_at, now)
            for _ in copies:
                t += self._xfer
            self.copy_free_at = landed = t
        wait = max(0.0, landed - now)
        ready = {e: wait for e in routing.experts}
        gpu = routing.experts
        launch = gpu_free + (self.cost.gpu_call if gpu else 0.0)  # the launch overlaps the wait
        compute = sum(self.cost.gpu_expert(n) for n in routing.tokens)
        evicted, admitted = lw.swaps(routing, cache.n_experts, resident)
        copy_s = len(admitted) * device_copy_s(self.cost)
        makespan = max(launch, wait) + compute + copy_s
        replacement = None
        if admitted:
            end = now + makespan
            for v, e in zip(evicted, admitted):
                cache.admit((layer, e), end, (), now, victim=(layer, v))
            replacement = Replacement(layer, tuple((layer, v) for v in evicted),
                                      tuple((layer, e) for e in admitted), copy_s)
        pol.prefetcher.observe(routing)
        self._pending = None
        plan = Plan(layer, gpu, (), (), (), makespan)
        return Decision(plan, h, lh, m, {}, ready, (), self.copy_free_at, layerwise=True, full_layer=copies,
                        replacement=replacement)

    def _decide_visible(self, routing: LayerRouting, now: float, gpu_free: float = 0.0) -> Decision:
        """Step cadence, decode: visible residents on the GPU, the rest on the CPU; no policy work.
        With ``decode_demand`` (a simulator-only ablation) misses may become demand loads instead."""
        self._pending = None
        gpu, cpu = self.cache.account_landed(routing.layer, routing.experts, self.visible_at, now)
        if self.spec.decode_demand != "off" and cpu:
            return self._decide_demand(routing, gpu, cpu, now, gpu_free)
        plan = Plan(routing.layer, gpu, cpu, (), (), 0.0)
        return Decision(plan, len(gpu), 0, len(cpu), {}, {}, (), self.copy_free_at)

    def _decide_demand(self, routing: LayerRouting, gpu: tuple[int, ...], cpu: tuple[int, ...], now: float,
                       gpu_free: float) -> Decision:
        """``decode_demand`` ablation: the strategy's scheduler splits the layer over the visible
        residents with the copy queue as booked (upkeep copies first), and each load it chooses - a miss
        whose copy plus GPU compute ends before the CPU tier would - is admitted into a slot freed by the
        eviction policy (never an expert this layer uses; an expert whose upkeep copy is still in flight
        stays on the CPU). Hits and misses are counted as without it (a demand load is a miss).
        ``decode_demand="contended"`` instead takes the number of loads (misses in copy order) whose
        split is fastest with the CPU tier slowed by the copy queue's host-memory reads."""
        cache, layer = self.cache, routing.layer
        in_flight = set(cache.resident(layer)) - set(gpu)  # upkeep copies not landed yet: not loadable
        copy_free = max(0.0, self.copy_free_at - now)
        if self.spec.decode_demand in ("contended", "all"):
            split = self._contended_demand(routing, gpu, in_flight, copy_free, gpu_free,
                                           everything=self.spec.decode_demand == "all")
        else:
            split = self.policies.scheduler.plan(routing, set(gpu), self.cost, {}, copy_free, gpu_free)
        in_use = {(layer, e) for e in routing.experts}
        loads: list[int] = []
        evictions: list[ExpertId] = []
        landing: dict[int, float] = {}
        streamed: list[int] = []
        for e in split.loads:
            if e in in_flight:
                continue
            t = max(self.copy_free_at, now) + self._xfer
            self.copy_free_at = t
            landing[e] = t
            loads.append(e)
            try:
                victim = cache.admit((layer, e), t, in_use, now)
            except CacheFull:  # every slot in use or in flight: a scratch buffer, not admitted
                streamed.append(e)
                continue
            if victim is not None:
                evictions.append(victim)
        on_gpu = set(split.gpu) - in_flight
        gpu_out = tuple(e for e in routing.experts if e in on_gpu)
        cpu_out = tuple(e for e in routing.experts if e not in on_gpu)
        plan = Plan(layer, gpu_out, cpu_out, tuple(loads), tuple(evictions), split.makespan_s)
        return Decision(plan, len(gpu), 0, len(cpu), landing, {}, tuple(streamed), self.copy_free_at)

    def _contended_demand(self, routing: LayerRouting, gpu: tuple[int, ...], in_flight: set[int],
                          copy_free: float, gpu_free: float, everything: bool = False):
        """The fastest of "visible residents on the GPU plus the first ``b`` loadable misses (copy
        order: tokens desc), the rest on the CPU", priced with ``contended_makespan``; ties keep fewer
        loads. ``everything``: ``b`` = every loadable miss."""
        _, _, unc, _ = canonical_queue(routing, gpu)
        loadable = [e for e in unc if e not in in_flight]
        stay = tuple(e for e in unc if e in in_flight)
        best, best_t = None, float("inf")
        for b in range(len(loadable) if everything else 0, len(loadable) + 1):
            sp = evaluated_split(gpu + tuple(loadable[:b]), tuple(loadable[b:]) + stay, tuple(loadable[:b]),
                                 routing, self.cost, {}, copy_free, gpu_free)
            t = contended_makespan(sp, routing, self.cost, {}, copy_free, gpu_free)
            if t < best_t * (1.0 - 1e-9):
                best, best_t = sp, t
        assert best is not None
        return best

    def visible(self):  # -> np.ndarray [L, E] bool
        """The experts a decode layer serves from their slot (a new array). Step cadence: those landed
        by the last upkeep. Otherwise every resident: a layer cadence only changes the cache inside
        forwards, and the executor hides copies still in flight itself."""
        if not self._step:
            return self.cache.resident_mask().copy()
        return self.cache.landed_mask(self.visible_at)

    def upkeep(self, last: StepRouting | None, now: float, plan: bool = True) -> UpkeepPlan:
        """Step cadence, between forwards (a no-op for the per-layer cadence): copies landed by ``now``
        become visible; ``last`` (the previous forward's routing when it was a decode step, else None)
        goes to the policies in one vectorized update; when ``plan`` (the coming forward is a decode
        step) the swaps worth their copy are booked on the copy queue, about ``step_copy_budget`` steps
        of it. The executor frees the evictions' slots, then queues the copies in order."""
        if not self._step:
            return EMPTY_UPKEEP
        self.visible_at = now
        up = self.policies.upkeep
        if up is None:
            return EMPTY_UPKEEP
        if last is not None:
            up.observe_step(last)
        if not plan:
            return EMPTY_UPKEEP
        cache, xfer = self.cache, self._xfer
        if self._free:
            max_copies = cache.n_layers * cache.n_experts
        else:
            budget = (up.budget_steps * cache.n_layers * self.layer_time_ema
                      - max(0.0, self.copy_free_at - now))
            max_copies = int(budget // xfer) if xfer > 0 and budget > 0 else 0
        swaps = up.swaps(cache.resident_mask(), cache.evictable_mask(now), cache.quotas,
                         cache.capacity if cache.global_pool else None, max_copies)
        evictions: list[ExpertId] = []
        copies: list[ExpertId] = []
        landing: list[float] = []
        for new, victim in swaps:
            if victim is not None:
                evictions.append(victim)
            t = now if self._free else max(self.copy_free_at, now) + xfer
            if not self._free:
                self.copy_free_at = t
            cache.admit(new, t, (), now, victim=victim)
            copies.append(new)
            landing.append(t)
        return UpkeepPlan(tuple(evictions), tuple(copies), tuple(landing))

    def background(self) -> BackgroundPlan:
        """Background copies for the layer last passed to ``decide`` (once; empty when called again)."""
        if self._pending is None:
            return EMPTY_BACKGROUND
        p, self._pending = self._pending, None
        routing, cpu, end, is_prefill, keep = p.routing, p.cpu, p.end, p.is_prefill, p.keep
        evictions: list[ExpertId] = []
        copies, landing = self._background(routing, cpu, end, is_prefill, evictions, keep)
        if not copies:
            return EMPTY_BACKGROUND
        return BackgroundPlan(routing.layer, tuple(copies), tuple(evictions), tuple(landing))

    def finish(self, layer_time: float) -> None:
        """Report the layer's measured (or simulated) time, non-MoE part included."""
        e = self.layer_time_ema
        self.layer_time_ema = layer_time if e == 0.0 else 0.9 * e + 0.1 * layer_time

    def _background(self, routing: LayerRouting, cpu: tuple[int, ...], end: float, is_prefill: bool,
                    evictions: list[ExpertId], keep: set[ExpertId]) -> tuple[list[ExpertId], list[float]]:
        spec, pol, cache = self.spec, self.policies, self.cache
        if is_prefill and not spec.background_in_prefill:
            return [], []
        xfer = self._xfer
        if self._free:
            budget = float("inf")
        else:
            budget = end + spec.copy_horizon_layers * self.layer_time_ema - max(self.copy_free_at, end)
        if budget < xfer:
            return [], []
        layer = routing.layer
        wanted: list[ExpertId] = [(layer, e) for e in cpu] if spec.admit_misses else []
        n_misses = len(wanted)
        wanted += pol.prefetcher.propose(layer, self._view, budget)
        out: list[ExpertId] = []
        lands: list[float] = []
        for j, eid in enumerate(wanted):
            if budget < xfer:
                break
            if eid in cache:
                continue
            bonus = pol.prefetcher.expected_uses(eid) if j >= n_misses else 0.0
            if not pol.admission.worth(eid, pol.eviction, bonus):  # cheap test before a victim search
                continue
            try:
                victim = cache.choose_victim(eid[0], keep, end)
            except CacheFull:
                continue
            if not pol.admission.admit(eid, victim, pol.eviction, bonus):
                continue
            t = end if self._free else max(self.copy_free_at, end) + xfer
            if not self._free:
                self.copy_free_at = t
                budget -= xfer
            cache.admit(eid, t, (), end, victim=victim)
            keep.add(eid)
            if victim is not None:
                evictions.append(victim)
            out.append(eid)
            lands.append(t)
        return out, lands


class _FreeTransfers:
    """A cost model whose transfers cost nothing (bounds with free transfers), else the same."""

    def __init__(self, cost: CostModel) -> None:
        self._cost = cost

    def __getattr__(self, name: str):  # delegate everything else
        return getattr(self._cost, name)

    def transfer(self) -> float:
        return 0.0


class _View:
    """What prefetchers see (core.protocols.CacheView)."""

    def __init__(self, ctl: Controller) -> None:
        self.n_layers, self.n_experts = ctl.cache.n_layers, ctl.cache.n_experts
        self.top_k = ctl.top_k
        self.cost, self.scheduler = ctl.cost, ctl.policies.scheduler
        self._cache, self._policy = ctl.cache, ctl.policies.eviction

    def resident(self, layer: int):  # -> Collection[int]
        return self._cache.resident(layer)

    def score(self, eid: ExpertId) -> float:
        return self._policy.score(eid)
