"""``balanced``: the project's scheduler (strategy ``hybrimoe``): the best split of a small family.

Residents ``R`` are in canonical order (ready time, then tokens desc) and non-residents ``U`` in copy
order (tokens desc). A candidate ``(k, b)`` gives the CPU the last ``k`` residents and all but the first
``b`` non-residents, which are loaded and run on the GPU after the remaining residents:

    gpu = R[:m-k] ++ U[:b]      cpu = R[m-k:] ++ U[b:]      loads = U[:b]

Every candidate is priced under the shared rules (``makespan.py``), incrementally: the GPU end of the
resident prefixes and the CPU suffix sums are computed once, and for each ``k`` the sweep over
``b = 0..|U|`` advances the GPU clock by one load at a time (O(|U|) per ``k``; it stops as soon as the
GPU alone is slower than the best candidate, since adding loads never makes the GPU finish earlier).
When ready times put the residents in another order than tokens desc, a second family drops residents
by fewest tokens instead (same sweep over ``b``).

Guarantees, by construction: ``hss`` always gives the GPU a prefix of the queue ``R ++ U`` (see
``hss.py``), which is candidate ``(m - cut, 0)`` or ``(0, cut - m)`` of the first family, so
``balanced`` is never worse than ``hss`` under the cost model; ``(0, 0)`` is ``static``, ``(m, 0)`` is
``stock`` and ``(0, |U|)`` is ``offload``, so it is never worse than those either. Ties keep the earlier
candidate (fewer residents on the CPU, then fewer loads). The chosen split's ``makespan_s`` is the shared
evaluator's value: recomputed with ``makespan.ends_from_times`` in general, and exact by construction in
the decode fast path (all token counts equal, no late hit), which prices only the prefix cuts.
"""

from __future__ import annotations

from typing import Collection, Mapping, Sequence

from hybrimoe_kt.core.cost import CostModel
from hybrimoe_kt.core.protocols import EMPTY_READY
from hybrimoe_kt.core.schedulers.costtable import CostTable, CostTableCache
from hybrimoe_kt.core.schedulers.makespan import canonical_queue, ends_from_times
from hybrimoe_kt.core.types import LayerRouting, Split


def _resident_prefix_ends(res: Sequence[int], res_gpu: Sequence[float], ready: Mapping[int, float],
                          start: float) -> list[float]:
    """GPU clock after the first ``i`` residents, for ``i = 0..m`` (``start`` already includes gpu_call)."""
    ends = [start]
    g = start
    for e, dt in zip(res, res_gpu):
        if ready:
            a = ready.get(e, 0.0)
            if a > g:
                g = a
        g += dt
        ends.append(g)
    return ends


def _plan_uniform(routing: LayerRouting, resident: Collection[int], table: CostTable,
                  ready: Mapping[int, float], copy_free: float, gpu_free: float) -> Split | None:
    """Fast path when every expert has the same token count (decode) and no resident is a late hit.

    Experts are then interchangeable, and a candidate ``(k, b)`` with ``k > 0`` and ``b > 0`` is never
    better than ``(k - 1, b - 1)`` (a resident instead of the last load: same CPU work, a GPU chain
    that ends no later), so only ``(k, 0)`` and ``(0, b)`` are priced: exactly the prefix cuts of the
    hss queue. Clocks are advanced with the same float operations as ``makespan.ends_from_times``, so
    the winner's makespan is the shared evaluator's value without recomputation. Returns None (use the
    general path) when a resident lands after the GPU could start it.
    """
    experts = routing.experts
    res = [e for e in experts if e in resident]
    unc = [e for e in experts if e not in resident]
    start = gpu_free + table.gpu_call
    if ready and res:
        when = [ready.get(e, 0.0) for e in res]
        if max(when) > start:
            return None
        if max(when) > 0.0:  # canonical order still sorts residents by ready time
            order = sorted(range(len(res)), key=when.__getitem__)
            res = [res[i] for i in order]
    n = routing.tokens[0]
    c = table.cpu[n] if n < table.size else table.cost.cpu_expert(n)
    g = table.gpu[n] if n < table.size else table.cost.gpu_expert(n)
    t = table.transfer
    m, p = len(res), len(unc)
    # cpu_end[i]: CPU end with i experts, summed like the evaluator (call, then one addition each).
    cpu_end = [0.0]
    acc = table.cpu_call
    for _ in range(m + p):
        acc += c
        cpu_end.append(acc)
    # GPU end with the first i residents (no waits: every resident is available by ``start``).
    res_end = [0.0]
    clock = start
    for _ in range(m):
        clock += g
        res_end.append(clock)
    # (0, b): all residents plus b loads; (k, 0) for k >= 1: m - k residents, no loads.
    best_keep, best_b = m, 0
    gpu_end = res_end[m]
    best = cpu_end[p] if cpu_end[p] > gpu_end else gpu_end
    clock = res_end[m] if m else start
    for b in range(1, p + 1):
        land = copy_free + b * t
        clock = (land if land > clock else clock) + g
        if clock >= best:
            break
        ce = cpu_end[p - b]
        ms = ce if ce > clock else clock
        if ms < best:
            best, best_b = ms, b
    for k in range(1, m + 1):
        ce = cpu_end[k + p]
        if ce >= best:
            break
        ge = res_end[m - k]
        ms = ce if ce > ge else ge
        if ms < best:
            best, best_keep, best_b = ms, m - k, 0
    loads = tuple(unc[:best_b])
    return Split(tuple(res[:best_keep]) + loads, tuple(res[best_keep:]) + tuple(unc[best_b:]), loads,
                 best)


class BalancedScheduler:
    """Best of the ``(k, b)`` family above under the cost model; never worse than hss/static/stock/offload."""

    name = "balanced"

    def __init__(self) -> None:
        self._tables = CostTableCache()
        self._last = 0.0  # makespan of the last successful _sweep

    def plan(self, routing: LayerRouting, resident: Collection[int], cost: CostModel,
             ready: Mapping[int, float] = EMPTY_READY, copy_free: float = 0.0,
             gpu_free: float = 0.0) -> Split:
        table = self._tables.get(cost)
        tokens = routing.tokens
        if tokens and tokens[0] == tokens[-1]:  # sorted desc: every expert has the same token count
            split = _plan_uniform(routing, resident, table, ready, copy_free, gpu_free)
            if split is not None:
                return split
        return self._plan_general(routing, resident, cost, table, ready, copy_free, gpu_free)

    def _plan_general(self, routing: LayerRouting, resident: Collection[int], cost: CostModel,
                      table: CostTable, ready: Mapping[int, float], copy_free: float,
                      gpu_free: float) -> Split:
        res, res_n, unc, unc_n = canonical_queue(routing, resident, ready)
        size, cpu_tab, gpu_tab = table.size, table.cpu, table.gpu
        res_cpu = [cpu_tab[n] if n < size else cost.cpu_expert(n) for n in res_n]
        res_gpu = [gpu_tab[n] if n < size else cost.gpu_expert(n) for n in res_n]
        unc_cpu = [cpu_tab[n] if n < size else cost.cpu_expert(n) for n in unc_n]
        unc_gpu = [gpu_tab[n] if n < size else cost.gpu_expert(n) for n in unc_n]
        m, p = len(res), len(unc)
        unc_suffix = [0.0] * (p + 1)
        acc = 0.0
        for b in range(p - 1, -1, -1):
            acc += unc_cpu[b]
            unc_suffix[b] = acc
        start = gpu_free + table.gpu_call
        t = table.transfer
        cpu_call = table.cpu_call
        lands = [copy_free + (j + 1) * t for j in range(p)]
        ends = _resident_prefix_ends(res, res_gpu, ready, start)

        # Family 1: drop the last k residents of the canonical order (contains every hss answer).
        best = float("inf")
        best_keep, best_b = m, 0
        cpu_base = 0.0
        for k in range(m + 1):
            keep = m - k
            if k:
                cpu_base += res_cpu[keep]
                if cpu_call + cpu_base >= best:
                    break  # the CPU alone is already slower, for this k and every larger one
            b = self._sweep(ends[keep], keep > 0, cpu_base, k > 0, unc_suffix, unc_gpu, lands,
                            cpu_call, best)
            if b >= 0:
                best, best_keep, best_b = self._last, keep, b
        gpu_res = res[:best_keep]
        cpu_res = res[best_keep:]

        # Family 2 (only when ready times reorder the residents): drop the fewest tokens first.
        by_tokens = (sorted(range(m), key=lambda i: (res_n[i], -ready.get(res[i], 0.0)))
                     if ready and m > 1 else [])
        if by_tokens and by_tokens != list(range(m - 1, -1, -1)):
            cpu_base = 0.0
            for k in range(1, m):
                cpu_base += res_cpu[by_tokens[k - 1]]
                if cpu_call + cpu_base >= best:
                    break
                dropped = set(by_tokens[:k])
                kept = [i for i in range(m) if i not in dropped]
                g_start = _resident_prefix_ends([res[i] for i in kept], [res_gpu[i] for i in kept],
                                                ready, start)[-1]
                b = self._sweep(g_start, True, cpu_base, True, unc_suffix, unc_gpu, lands, cpu_call,
                                best)
                if b >= 0:
                    best, best_b = self._last, b
                    gpu_res = [res[i] for i in kept]
                    cpu_res = [res[i] for i in sorted(dropped)]

        # Price the winner with the shared rules (same float operations as makespan.tier_ends).
        loads = tuple(unc[:best_b])
        gpu = tuple(gpu_res) + loads
        cpu = tuple(cpu_res) + tuple(unc[best_b:])
        pos = {e: i for i, e in enumerate(res)}
        avail = [ready.get(e, 0.0) for e in gpu_res] if ready else [0.0] * len(gpu_res)
        avail += lands[:best_b]
        gpu_times = [res_gpu[pos[e]] for e in gpu_res] + unc_gpu[:best_b]
        cpu_times = [res_cpu[pos[e]] for e in cpu_res] + unc_cpu[best_b:]
        c_end, g_end = ends_from_times(avail, gpu_times, cpu_times, cpu_call, table.gpu_call, gpu_free)
        return Split(gpu, cpu, loads, c_end if c_end > g_end else g_end)

    def _sweep(self, gpu_start: float, gpu_used: bool, cpu_base: float, cpu_used: bool,
               unc_suffix: Sequence[float], unc_gpu: Sequence[float], lands: Sequence[float],
               cpu_call: float, best: float) -> int:
        """Best number of loads ``b`` for one resident placement, or -1 if none beats ``best``.

        ``gpu_start``: GPU clock after the resident GPU experts (``gpu_used`` False if there are none).
        ``cpu_base``: CPU time of the residents given to the CPU. ``unc_suffix[b]``: CPU time of
        ``U[b:]``; ``lands[j]``: landing time of load ``j``. The winner's makespan is left in
        ``self._last``.
        """
        p = len(unc_gpu)
        g = gpu_start
        found = -1
        for b in range(p + 1):
            g_end = g if (gpu_used or b) else 0.0
            if g_end >= best:
                break  # more loads never make the GPU finish earlier
            c_end = (cpu_call + cpu_base + unc_suffix[b]) if (cpu_used or b < p) else 0.0
            ms = c_end if c_end > g_end else g_end
            if ms < best:
                best = ms
                found = b
            if b < p:
                land = lands[b]
                g = (land if land > g else g) + unc_gpu[b]
        self._last = best
        return found
