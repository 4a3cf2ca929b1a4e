"""``greedy``: a 0-1 assignment of every activated expert to one tier, outside ``balanced``'s family.

``balanced`` (``balanced.py``) prices the splits that give the CPU a *suffix* of the residents and all
but a *prefix* of the non-residents. ``greedy`` searches arbitrary subsets, in three steps:

1. **List scheduling** (LPT's rule). Experts in decreasing CPU time (the routing order: tokens desc);
   each goes to the tier where it finishes earliest: the CPU, or the GPU, as a resident (after its ready
   time) or after a load on the copy queue (a non-resident lands ``transfer`` after the previous load).
   (The tier whose end grows least would ignore how busy each tier already is.)
2. **Local improvement**, from the better of that split and ``balanced``'s: single moves (one expert to
   the other tier) and swaps (a CPU expert and a GPU expert trade tiers). Each round ranks the moves with
   an O(1) estimate of the two tiers' ends, prices the ``TOP`` best exactly (the shared rules of
   ``makespan.py``, canonical GPU order) and applies the best one that lowers the makespan; it stops
   when none does, or after ``ROUNDS`` rounds.
3. **The better of that and ``balanced``'s split**, priced with the shared evaluator; a tie keeps
   balanced's. So ``greedy`` is never worse than ``balanced`` (hence than hss, static, stock and
   offload) under the cost model, by construction.

The GPU order is always the canonical one (residents by ready time then tokens desc, then the loads in
copy order), so a split is fixed by which experts go to the GPU. Shortcut: when every expert has the same
token count and no resident lands after the GPU could start it (every decode layer without late hits),
experts of a kind are interchangeable and ``balanced``'s prefix cuts already cover every 0-1 assignment
(see ``balanced._plan_uniform``): ``greedy`` returns balanced's split without searching. The returned
``makespan_s`` is always the shared evaluator's value (``makespan.ends_from_times`` on the same inputs).
"""

from __future__ import annotations

from typing import Collection, Mapping

from hybrimoe_kt.core.cost import CostModel
from hybrimoe_kt.core.protocols import EMPTY_READY
from hybrimoe_kt.core.schedulers.balanced import BalancedScheduler
from hybrimoe_kt.core.schedulers.costtable import CostTableCache
from hybrimoe_kt.core.schedulers.makespan import canonical_queue, ends_from_times
from hybrimoe_kt.core.types import LayerRouting, Split

ROUNDS = 8
"""Most local-improvement rounds per call."""
TOP = 6
"""Moves priced exactly per round (the best by the O(1) estimate)."""
_PARTNERS = 2
"""Swap partners per expert: the other tier's experts of least CPU time and of most GPU time."""


class _Layer:
    """One layer's experts as parallel lists: residents (canonical order) then non-residents (copy order)."""

    __slots__ = ("ids", "c", "g", "a", "m", "n", "start", "copy_free", "t", "cpu_call", "gpu_call",
                 "gpu_free")

    def __init__(self, routing: LayerRouting, resident: Collection[int], table, ready: Mapping[int, float],
                 copy_free: float, gpu_free: float) -> None:
        res, res_n, unc, unc_n = canonical_queue(routing, resident, ready)
        size, ct, gt, cost = table.size, table.cpu, table.gpu, table.cost
        ns = res_n + unc_n
        self.ids = res + unc
        self.c = [ct[n] if n < size else cost.cpu_expert(n) for n in ns]
        self.g = [gt[n] if n < size else cost.gpu_expert(n) for n in ns]
        self.a = [ready.get(e, 0.0) for e in res] if ready else [0.0] * len(res)
        self.m, self.n = len(res), len(ns)
        self.start = gpu_free + table.gpu_call
        self.copy_free, self.t = copy_free, table.transfer
        self.cpu_call, self.gpu_call, self.gpu_free = table.cpu_call, table.gpu_call, gpu_free

    def inputs(self, on: list[bool]) -> tuple[list[float], list[float], list[float]]:
        """``ends_from_times`` inputs of the split ``on`` (True = GPU): avail, GPU times, CPU times."""
        avail, gt, ct = [], [], []
        r = 0
        for i in range(self.n):
            if on[i]:
                if i < self.m:
                    avail.append(self.a[i])
                else:
                    r += 1
                    avail.append(self.copy_free + r * self.t)
                gt.append(self.g[i])
            else:
                ct.append(self.c[i])
        return avail, gt, ct

    def ends(self, on: list[bool]) -> tuple[float, float]:
        avail, gt, ct = self.inputs(on)
        return ends_from_times(avail, gt, ct, self.cpu_call, self.gpu_call, self.gpu_free)

    def ends_below(self, on: list[bool], bound: float) -> tuple[float, float] | None:
        """``ends(on)`` (the same float operations), or None as soon as a tier reaches ``bound``."""
        c, g, a, m, cf, t = self.c, self.g, self.a, self.m, self.copy_free, self.t
        cpu = self.cpu_call
        clock = self.start
        any_cpu = any_gpu = False
        r = 0
        for i, x in enumerate(on):
            if x:
                if i < m:
                    av = a[i]
                else:
                    r += 1
                    av = cf + r * t
                if av > clock:
                    clock = av
                clock += g[i]
                if clock >= bound:
                    return None
                any_gpu = True
            else:
                cpu += c[i]
                if cpu >= bound:
                    return None
                any_cpu = True
        return (cpu if any_cpu else 0.0), (clock if any_gpu else 0.0)

    def split(self, on: list[bool]) -> Split:
        avail, gt, ct = self.inputs(on)
        c_end, g_end = ends_from_times(avail, gt, ct, self.cpu_call, self.gpu_call, self.gpu_free)
        gpu = tuple(e for e, x in zip(self.ids, on) if x)
        cpu = tuple(e for e, x in zip(self.ids, on) if not x)
        loads = tuple(e for e, x in zip(self.ids[self.m:], on[self.m:]) if x)
        return Split(gpu, cpu, loads, c_end if c_end > g_end else g_end)


def list_schedule(L: _Layer) -> list[bool]:
    """Step 1: each expert, in decreasing CPU time, to the tier where it finishes earliest (estimated
    ends: a resident is placed as if it ran after the GPU experts placed so far)."""
    on = [False] * L.n
    cpu = 0.0
    gpu = 0.0  # 0: the GPU has no work yet
    loads = 0
    for i in sorted(range(L.n), key=lambda j: -L.c[j]):
        c_new = (cpu if cpu else L.cpu_call) + L.c[i]
        clock = gpu if gpu else L.start
        if i < L.m:
            avail = L.a[i]
        else:
            avail = L.copy_free + (loads + 1) * L.t
        g_new = (avail if avail > clock else clock) + L.g[i]
        if g_new < c_new:
            on[i] = True
            gpu = g_new
            loads += i >= L.m
        else:
            cpu = c_new
    return on


def improve(L: _Layer, on: list[bool], rounds: int = ROUNDS, top: int = TOP) -> tuple[list[bool], float]:
    """Step 2: local improvement of ``on``; returns the split and its makespan (the shared rules).

    Only moves that take work off the slower tier are ranked: when the CPU ends last, an expert goes to
    the GPU (alone, or swapped with one of ``_PARTNERS`` GPU experts of least CPU time or most GPU time);
    when the GPU does, an expert goes to the CPU (alone, or swapped with one of the CPU experts of most
    CPU time). The estimate of a move: the CPU end changes by the CPU times moved; the GPU end after an
    added resident is ``max(end, ready) + g``, after an added load ``max(end, next landing) + g``, and
    it drops by ``g`` (a resident) or ``max(g, transfer)`` (a load) for an expert taken off.
    """
    c_end, g_end = L.ends(on)
    best = c_end if c_end > g_end else g_end
    m, c, g, a, t = L.m, L.c, L.g, L.a, L.t
    for _ in range(rounds):
        cpu_side = [i for i in range(L.n) if not on[i]]
        gpu_side = [i for i in range(L.n) if on[i]]
        base = g_end if g_end else L.start
        land = L.copy_free + (sum(1 for i in gpu_side if i >= m) + 1) * t
        moves: list[tuple[float, int, int]] = []
        if c_end >= g_end:  # CPU-bound: something leaves the CPU
            partners = {*sorted(gpu_side, key=c.__getitem__)[:_PARTNERS],
                        *sorted(gpu_side, key=lambda i: -g[i])[:_PARTNERS]}
            off = [(y, c[y], g[y] if y < m else (g[y] if g[y] > t else t)) for y in partners]
            for x in cpu_side:
                avail = a[x] if x < m else land
                ge = (avail if avail > base else base) + g[x]
                ce = c_end - c[x]
                moves.append((ce if ce > ge else ge, x, -1))
                for y, cy, gy in off:
                    ce2, ge2 = ce + cy, ge - gy
                    moves.append((ce2 if ce2 > ge2 else ge2, x, y))
        else:  # GPU-bound: something leaves the GPU
            partners = sorted(cpu_side, key=lambda i: (-c[i], g[i]))[:_PARTNERS]
            cbase = c_end if c_end else L.cpu_call
            on_ = [(x, c[x], (a[x] if x < m else land)) for x in partners]
            for y in gpu_side:
                ce = cbase + c[y]
                ge = g_end - (g[y] if y < m else (g[y] if g[y] > t else t))
                moves.append((ce if ce > ge else ge, -1, y))
                for x, cx, avail in on_:
                    ce2 = ce - cx
                    ge2 = (avail if avail > ge else ge) + g[x]
                    moves.append((ce2 if ce2 > ge2 else ge2, x, y))
        moves.sort()
        chosen = None
        for _, x, y in moves[:top]:
            trial = on[:]
            if x >= 0:
                trial[x] = True
            if y >= 0:
                trial[y] = False
            ends = L.ends_below(trial, best)
            if ends is not None:
                ce, ge = ends
                best, chosen, c_end, g_end = (ce if ce > ge else ge), trial, ce, ge
        if chosen is None:
            break
        on = chosen
    return on, best


class GreedyScheduler:
    """List scheduling plus local improvement over 0-1 assignments; never worse than ``balanced``."""

    name = "greedy"

    def __init__(self, rounds: int = ROUNDS, top: int = TOP) -> None:
        self._balanced = BalancedScheduler()
        self._tables = CostTableCache()
        self.rounds, self.top = rounds, top

    def plan(self, routing: LayerRouting, resident: Collection[int], cost: CostModel,
             ready: Mapping[int, float] = EMPTY_READY, copy_free: float = 0.0,
             gpu_free: float = 0.0) -> Split:
        bal = self._balanced.plan(routing, resident, cost, ready, copy_free, gpu_free)
        tokens = routing.tokens
        if len(tokens) < 2:
            return bal
        table = self._tables.get(cost)
        if tokens[0] == tokens[-1]:
            start = gpu_free + table.gpu_call
            if not ready or all(ready.get(e, 0.0) <= start for e in routing.experts if e in resident):
                return bal  # interchangeable experts: balanced's family is every assignment
        L = _Layer(routing, resident, table, ready, copy_free, gpu_free)
        on_gpu = set(bal.gpu)
        on_bal = [e in on_gpu for e in L.ids]
        ls = list_schedule(L)
        c, g = L.ends(ls)
        start_on = ls if (c if c > g else g) < bal.makespan_s else on_bal
        on, ms = improve(L, start_on, self.rounds, self.top)
        if not ms < bal.makespan_s:
            return bal
        split = L.split(on)
        return split if split.makespan_s < bal.makespan_s else bal
