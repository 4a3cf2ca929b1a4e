"""A prefill layer's split, priced with the copy queue's pull on host memory.

The schedulers price a split with the shared rules of ``makespan.py``, where copies only delay the GPU.
But a copy reads host memory the CPU tier is reading too, and while the copy queue is busy the CPU
experts' weight reads slow down (``CostModel.cpu_expert_contended``: on a PCIe 5.0 card beside DDR5 a
copy takes most of the bandwidth). ``contended_cpu_time`` is that rule (the simulator's engine charges
it); ``choose_prefill`` prices the scheduler's split and the split without copies (residents on the GPU,
the rest on the CPU) with it and keeps the faster: short prompts, whose experts have few tokens each,
tend to lose more on the CPU than their loads save; long ones gain from the GPU.
"""

from __future__ import annotations

from typing import Collection, Mapping, Sequence

from hybrimoe_kt.core.cost import CostModel
from hybrimoe_kt.core.schedulers.makespan import canonical_queue, evaluated_split, tier_ends, token_map
from hybrimoe_kt.core.types import LayerRouting, Split


def contended_cpu_time(cpu_tokens: Sequence[int], cost: CostModel, copy_busy: float) -> float:
    """The CPU tier's time for experts of ``cpu_tokens`` tokens while the copy queue is busy for
    ``copy_busy`` seconds from the layer start (the busy share of the CPU's uncontended time)."""
    if not cpu_tokens:
        return 0.0
    est = cost.cpu_call + sum(cost.cpu_expert(n) for n in cpu_tokens)
    frac = min(1.0, max(0.0, copy_busy) / est) if est > 0 else 0.0
    return cost.cpu_call + sum(cost.cpu_expert_contended(n, frac) for n in cpu_tokens)


def contended_makespan(split: Split, routing: LayerRouting, cost: CostModel, ready: Mapping[int, float],
                       copy_free: float, gpu_free: float) -> float:
    """``max(CPU end, GPU end)`` of ``split`` with the CPU slowed by the copies queued up to its loads."""
    tokens = token_map(routing)
    _, gpu_end = tier_ends(split.gpu, (), split.loads, tokens, cost, ready, copy_free, gpu_free)
    busy = copy_free + len(split.loads) * cost.transfer()
    cpu_end = contended_cpu_time([tokens[e] for e in split.cpu], cost, busy)
    return cpu_end if cpu_end > gpu_end else gpu_end


def choose_prefill(split: Split, routing: LayerRouting, resident: Collection[int], cost: CostModel,
                   ready: Mapping[int, float], copy_free: float, gpu_free: float) -> Split:
    """The faster of ``split`` and the split without copies, both priced with contention."""
    if not split.loads:
        return split
    res, _, unc, _ = canonical_queue(routing, resident, ready)
    no_copy = evaluated_split(tuple(res), tuple(unc), (), routing, cost, ready, copy_free, gpu_free)
    a = contended_makespan(split, routing, cost, ready, copy_free, gpu_free)
    b = contended_makespan(no_copy, routing, cost, ready, copy_free, gpu_free)
    return no_copy if b < a * (1.0 - 1e-9) else split  # a float tie keeps the scheduler's split
