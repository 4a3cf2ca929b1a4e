"""Layer-streaming prefill: the next layer's experts copied to the GPU while this layer computes.

A long prompt activates nearly every expert of every layer with hundreds of tokens each, and the GPU
computes an expert many times faster than the CPU. Copies booked at a layer's start (the split's
demand loads) leave the copy queue idle during the attention and wait for the gate; streaming books,
at layer ``l``'s decision, a copy of every expert of layer ``l + 1`` that is not resident into a
staging buffer (two buffers of ``buffer`` experts alternate between layers, so layer ``l + 1``'s
copies overlap layer ``l``'s compute and never overwrite what layer ``l`` reads). Staged experts are
not admitted to the cache: at layer ``l + 1`` the scheduler sees them as residents still in flight
(ready when their copy lands), so the token-aware split serves late ones on the CPU; that one split
covers the three modes (everything streamed on the GPU, the split, all on the CPU).

``choose_stream`` decides at layer ``l`` whether to stream layer ``l + 1``, before that layer's gate
has run: it prices layer ``l + 1`` both ways on a proxy of its routing and with the copy queue's pull
on host memory (``prefill_choice``), and adds what the copies cost layer ``l``'s CPU tier. The proxy
(``proxy_routing``) is layer ``l + 1``'s routing in the previous prefill forward (the prompt's previous
chunk) or, without one, layer ``l``'s token counts on the same ids (expert ids carry no meaning across
layers, so they stand for a random draw); the staging order puts the proxy's experts first, most
tokens first. The simulator and the runtime both call it through the controller.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Collection, Mapping, Optional, Sequence

from hybrimoe_kt.core.cost import CostModel
from hybrimoe_kt.core.schedulers.makespan import canonical_queue, evaluated_split
from hybrimoe_kt.core.schedulers.prefill_choice import contended_cpu_time, contended_makespan
from hybrimoe_kt.core.types import LayerRouting, Split

Planner = Callable[[LayerRouting, Collection[int], Mapping[int, float], float, float], Split]
"""How the controller splits a layer: ``(routing, resident, ready, copy_free, gpu_free) -> Split``."""

STREAM_MARGIN = 0.02
"""Streaming must beat the split by this fraction of the layer time (its copies are speculative)."""


def staging_slots(buffer: int, n_experts: int) -> int:
    """GPU slots of the two staging buffers (``buffer`` experts each, at most a layer; 0 = a layer)."""
    return 2 * (min(buffer, n_experts) if buffer > 0 else n_experts)


@dataclass(frozen=True, slots=True)
class StreamPlan:
    """Copies of ``layer``'s experts into the staging buffer, in queue order, and when they land."""

    layer: int
    experts: tuple[int, ...]
    landing: tuple[float, ...]  # absolute, as the controller's copy queue predicts

    def ready(self, now: float) -> dict[int, float]:
        """Staged expert -> seconds after ``now`` until its copy lands (0 once landed)."""
        return {e: max(0.0, t - now) for e, t in zip(self.experts, self.landing)}


def proxy_routing(routing: LayerRouting, previous: Optional[LayerRouting]) -> LayerRouting:
    """The next layer's routing as priced before its gate runs (see the module docstring)."""
    if previous is not None and previous.layer == routing.layer + 1:
        return replace(previous, n_rows=routing.n_rows, is_prefill=True) if previous.n_rows == routing.n_rows \
            else _rescaled(previous, routing.n_rows)
    return replace(routing, layer=routing.layer + 1)


def _rescaled(r: LayerRouting, n_rows: int) -> LayerRouting:
    """``r``'s experts with token counts scaled to ``n_rows`` rows (at least one token each)."""
    f = n_rows / max(1, r.n_rows)
    tokens = tuple(max(1, int(round(t * f))) for t in r.tokens)
    order = sorted(range(len(tokens)), key=lambda i: (-tokens[i], r.experts[i]))
    return replace(r, experts=tuple(r.experts[i] for i in order), tokens=tuple(tokens[i] for i in order),
                   n_rows=n_rows, is_prefill=True)


def stream_order(n_experts: int, resident: Collection[int], buffer: int, proxy: LayerRouting,
                 prior: Optional[Sequence[float]] = None) -> tuple[int, ...]:
    """The experts to stage for a layer: its non-residents, the proxy's first (most tokens first), the
    rest by ``prior`` (a score per expert, higher first; ties and no prior keep id order), at most
    ``buffer`` of them."""
    used = [e for e in proxy.experts if e not in resident]
    seen = set(used)
    rest = [e for e in range(n_experts) if e not in resident and e not in seen]
    if prior is not None:
        rest.sort(key=lambda e: -float(prior[e]))
    return tuple((used + rest)[:buffer])


@dataclass(frozen=True, slots=True)
class StreamChoice:
    """The decision and both prices of the next layer (seconds, contention and queue spill included)."""

    count: int          # how many of the staging order to copy (0: do not stream)
    with_stream_s: float
    without_s: float
    cost_here_s: float  # what the copies add to this layer (its CPU tier reads slower)

    @property
    def stream(self) -> bool:
        return self.count > 0


def choose_stream(routing: LayerRouting, split: Split, proxy: LayerRouting, resident_next: Collection[int],
                  staged: Sequence[int], plan: Planner, cost: CostModel, *, now: float,
                  next_start: float, copy_free: float, stream_free: float,
                  ready_next: Mapping[int, float], gpu_free: float) -> StreamChoice:
    """How many of ``staged`` (the next layer's non-residents, in copy order) to stage, if any.

    ``routing`` / ``split``: this layer, whose MoE part starts at ``now``; ``proxy``: the next layer's
    routing as priced (``proxy_routing``); ``next_start``: the predicted start of the next layer's MoE
    part; ``copy_free``: when the copy queue is idle without the stream (absolute), ``stream_free``:
    when the stream's copies would start; ``ready_next``: the next layer's residents still in flight
    (seconds after ``next_start``); ``gpu_free``: the next layer's shared experts (seconds); ``plan``:
    the controller's own split (its scheduler, and the contention choice where the strategy makes it).

    Each option is priced as the next layer's contended makespan plus its spill: the copy time still
    queued when that layer ends, which the layer after inherits. Prefixes of a quarter, a half, three
    quarters and all of ``staged`` are priced, and the one that fits the copy queue until the next
    layer's predicted end without the stream. The option without the stream is the controller's own
    split (``plan``); each stream option is priced with ``quick_split``: the best of ``balanced``'s
    candidates without demand loads (the latest-landing residents moved to the CPU), found in one
    O(experts) pass where ``plan`` searches the whole family (about 1 ms per call at 64 experts, five
    calls per layer). On the uncontended cost model it is never below ``plan``'s price, so the rule
    leans towards not streaming."""
    xfer = cost.transfer()
    tail = max(0.0, copy_free - next_start)
    plain = plan(proxy, resident_next, ready_next, tail, gpu_free)
    without = contended_makespan(plain, proxy, cost, ready_next, tail, gpu_free)
    without_all = without + max(0.0, tail + len(plain.loads) * xfer - without)
    n = len(staged)
    if n == 0 or xfer <= 0.0:
        return StreamChoice(0, without, without, 0.0)
    fit = int(max(0.0, next_start + without - stream_free) // xfer)
    best = StreamChoice(0, without, without, 0.0)
    best_total = without_all * (1.0 - STREAM_MARGIN)
    for b in sorted({max(1, n // 4), max(1, n // 2), max(1, 3 * n // 4), n, min(n, fit)} - {0}):
        end = stream_free + b * xfer
        ready = dict(ready_next)
        for j, e in enumerate(staged[:b]):
            ready[e] = max(0.0, stream_free + (j + 1) * xfer - next_start)
        both = set(resident_next) | set(staged[:b])
        tail_s = max(0.0, end - next_start)
        planned = quick_split(proxy, both, cost, ready, gpu_free)
        price = contended_makespan(planned, proxy, cost, ready, tail_s, gpu_free)
        spill = max(0.0, tail_s + len(planned.loads) * xfer - price)
        here = _cost_here(routing, split, cost, now, copy_free, end)
        if price + spill + here < best_total:
            best_total = price + spill + here
            best = StreamChoice(b, price, without, here)
    return best


def quick_split(routing: LayerRouting, resident: Collection[int], cost: CostModel,
                ready: Mapping[int, float], gpu_free: float) -> Split:
    """The best split without copies that keeps a prefix of the residents in canonical order (ready
    time first) on the GPU: ``balanced``'s candidates ``(k, 0)``, priced in one pass."""
    res, res_n, unc, unc_n = canonical_queue(routing, resident, ready)
    cpu_of = [cost.cpu_expert(n) for n in res_n]
    rest = sum(cost.cpu_expert(n) for n in unc_n)
    g = gpu_free + cost.gpu_call
    gpu_end = [0.0]
    for e, n in zip(res, res_n):
        a = ready.get(e, 0.0)
        g = (a if a > g else g) + cost.gpu_expert(n)
        gpu_end.append(g)
    best, keep, cpu_tail = float("inf"), 0, rest
    for k in range(len(res), -1, -1):  # keep the first k residents on the GPU
        c = (cost.cpu_call + cpu_tail) if (cpu_tail > 0.0 or k < len(res) or unc) else 0.0
        ms = c if c > gpu_end[k] else gpu_end[k]
        if ms < best:
            best, keep = ms, k
        if k:
            cpu_tail += cpu_of[k - 1]
    return evaluated_split(tuple(res[:keep]), tuple(res[keep:]) + tuple(unc), (), routing, cost, ready, 0.0,
                           gpu_free)


def _cost_here(routing: LayerRouting, split: Split, cost: CostModel, now: float, copy_free: float,
               stream_end: float) -> float:
    """How much later this layer ends when the copy queue stays busy until ``stream_end`` instead of
    ``copy_free``: only its CPU tier slows (reads share host memory with the copies)."""
    if not split.cpu:
        return 0.0
    tokens = dict(zip(routing.experts, routing.tokens))
    n_cpu = [tokens[e] for e in split.cpu]
    before = contended_cpu_time(n_cpu, cost, copy_free - now)
    after = contended_cpu_time(n_cpu, cost, stream_end - now)
    end = max(before, split.makespan_s)
    return max(0.0, after - end)
