"""The shared timing rules for one MoE layer: every scheduler, test and the simulator price a Split here.

Given a layer's Split (``gpu`` experts in GPU execution order, ``cpu`` experts, ``loads`` = the
non-resident GPU experts in copy-queue order), the token count of every expert, and the layer's
starting state, the layer's time is computed as follows (all times in seconds from the layer start):

- **CPU**: ``0`` if no expert runs on the CPU, else ``cost.cpu_call + sum(cost.cpu_expert(n_e))``.
- **Copies** are serialized in one queue: load ``j`` (0-based, in ``loads`` order) lands at
  ``copy_free + (j + 1) * cost.transfer()``.
- **GPU**: if any expert runs on the GPU, its clock starts at ``gpu_free + cost.gpu_call``; experts run
  in ``gpu`` order, each starting at ``max(clock, availability)`` where availability is
  ``ready.get(e, 0)`` for a resident expert (a late hit lands at ``ready[e]``) and the landing time for a
  load; then ``clock += cost.gpu_expert(n_e)``.
- **makespan** = ``max(CPU end, GPU end)``.

The trace-driven simulator (``hybrimoe_kt/sim``) executes plans under these same rules, so a scheduler's
``Split.makespan_s`` is exactly what the simulator charges for the routed experts of that layer.

This module also fixes the canonical GPU order every scheduler emits: resident experts first (by ready
time, then token count descending, then routing order), then the loads in copy order.
"""

from __future__ import annotations

from typing import Collection, Mapping, Sequence

from hybrimoe_kt.core.cost import CostModel
from hybrimoe_kt.core.protocols import EMPTY_READY
from hybrimoe_kt.core.schedulers.costtable import CostTable
from hybrimoe_kt.core.types import LayerRouting, Split


def tier_ends(gpu: Sequence[int], cpu: Sequence[int], loads: Sequence[int], tokens: Mapping[int, int],
              cost: CostModel, ready: Mapping[int, float] = EMPTY_READY, copy_free: float = 0.0,
              gpu_free: float = 0.0) -> tuple[float, float]:
    """``(CPU end, GPU end)`` of one layer under the shared rules (see the module docstring).

    ``loads`` must be a subset of ``gpu``; an expert of ``gpu`` that is not in ``loads`` is resident.
    """
    t = cost.transfer()
    landing = {e: copy_free + (j + 1) * t for j, e in enumerate(loads)}
    avail = [landing[e] if e in landing else ready.get(e, 0.0) for e in gpu]
    return ends_from_times(avail, [cost.gpu_expert(tokens[e]) for e in gpu],
                           [cost.cpu_expert(tokens[e]) for e in cpu], cost.cpu_call, cost.gpu_call,
                           gpu_free)


def ends_from_times(gpu_avail: Sequence[float], gpu_times: Sequence[float], cpu_times: Sequence[float],
                    cpu_call: float, gpu_call: float, gpu_free: float = 0.0) -> tuple[float, float]:
    """The rules on precomputed inputs: ``(CPU end, GPU end)``.

    ``gpu_avail[i]``/``gpu_times[i]``: availability and run time of the i-th GPU expert (execution
    order); ``cpu_times``: run time of each CPU expert, summed in the given order. ``tier_ends`` and the
    schedulers' fast paths both end here, so their floating-point results are identical.
    """
    cpu_end = 0.0
    if cpu_times:
        cpu_end = cpu_call
        for c in cpu_times:
            cpu_end += c
    gpu_end = 0.0
    if gpu_times:
        clock = gpu_free + gpu_call
        for a, g in zip(gpu_avail, gpu_times):
            if a > clock:
                clock = a
            clock += g
        gpu_end = clock
    return cpu_end, gpu_end


def makespan(gpu: Sequence[int], cpu: Sequence[int], loads: Sequence[int], tokens: Mapping[int, int],
             cost: CostModel, ready: Mapping[int, float] = EMPTY_READY, copy_free: float = 0.0,
             gpu_free: float = 0.0) -> float:
    """Predicted time of one layer's routed experts: ``max(CPU end, GPU end)``."""
    c, g = tier_ends(gpu, cpu, loads, tokens, cost, ready, copy_free, gpu_free)
    return c if c > g else g


def token_map(routing: LayerRouting) -> dict[int, int]:
    """Expert -> token count of one layer's routing."""
    return dict(zip(routing.experts, routing.tokens))


def split_makespan(split: Split, routing: LayerRouting, cost: CostModel,
                   ready: Mapping[int, float] = EMPTY_READY, copy_free: float = 0.0,
                   gpu_free: float = 0.0) -> float:
    """``makespan`` of an existing Split (ignores its stored ``makespan_s``)."""
    return makespan(split.gpu, split.cpu, split.loads, token_map(routing), cost, ready, copy_free,
                    gpu_free)


def canonical_queue(routing: LayerRouting, resident: Collection[int],
                    ready: Mapping[int, float] = EMPTY_READY) -> tuple[list[int], list[int], list[int],
                                                                       list[int]]:
    """Split the activated experts into residents and non-residents, each in canonical order.

    Returns ``(res, res_tokens, unc, unc_tokens)``: residents sorted by ready time, then token count
    descending, then routing order (their GPU execution order); non-residents by token count descending,
    then routing order (their copy order). The routing is already sorted by tokens desc then id, so
    filtering keeps that order and only late hits need a sort.
    """
    res: list[int] = []
    res_n: list[int] = []
    unc: list[int] = []
    unc_n: list[int] = []
    late = False
    for e, n in zip(routing.experts, routing.tokens):
        if e in resident:
            res.append(e)
            res_n.append(n)
            if not late and ready and ready.get(e, 0.0) > 0.0:
                late = True
        else:
            unc.append(e)
            unc_n.append(n)
    if late:
        order = sorted(range(len(res)), key=lambda i: ready.get(res[i], 0.0))  # stable: keeps tokens desc
        res = [res[i] for i in order]
        res_n = [res_n[i] for i in order]
    return res, res_n, unc, unc_n


def evaluated_split(gpu: tuple[int, ...], cpu: tuple[int, ...], loads: tuple[int, ...],
                    routing: LayerRouting, cost: CostModel, ready: Mapping[int, float] = EMPTY_READY,
                    copy_free: float = 0.0, gpu_free: float = 0.0) -> Split:
    """Build a Split whose ``makespan_s`` is the shared evaluator's value."""
    ms = makespan(gpu, cpu, loads, token_map(routing), cost, ready, copy_free, gpu_free)
    return Split(gpu, cpu, loads, ms)


def prefix_split(res: Sequence[int], res_n: Sequence[int], unc: Sequence[int], unc_n: Sequence[int],
                 keep: int, n_loads: int, table: CostTable, ready: Mapping[int, float] = EMPTY_READY,
                 copy_free: float = 0.0, gpu_free: float = 0.0) -> Split:
    """The Split that runs ``res[:keep]`` and loads ``unc[:n_loads]`` on the GPU, the rest on the CPU.

    ``res``/``unc`` (with token counts ``res_n``/``unc_n``) are in canonical order, as returned by
    ``canonical_queue``. Priced with ``ends_from_times`` on the tabulated times of ``table``: the same
    values and float operations as ``makespan``, without building a token map or calling the model.
    """
    size, cpu_tab, gpu_tab, cost = table.size, table.cpu, table.gpu, table.cost
    loads = tuple(unc[:n_loads])
    gpu = tuple(res[:keep]) + loads
    cpu = tuple(res[keep:]) + tuple(unc[n_loads:])
    t = table.transfer
    avail = [ready.get(e, 0.0) for e in res[:keep]] if ready else [0.0] * keep
    avail += [copy_free + (j + 1) * t for j in range(n_loads)]
    gpu_n = list(res_n[:keep]) + list(unc_n[:n_loads])
    cpu_n = list(res_n[keep:]) + list(unc_n[n_loads:])
    gpu_times = [gpu_tab[n] if n < size else cost.gpu_expert(n) for n in gpu_n]
    cpu_times = [cpu_tab[n] if n < size else cost.cpu_expert(n) for n in cpu_n]
    c_end, g_end = ends_from_times(avail, gpu_times, cpu_times, table.cpu_call, table.gpu_call,
                                   gpu_free)
    return Split(gpu, cpu, loads, c_end if c_end > g_end else g_end)
