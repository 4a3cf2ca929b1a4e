"""Executing one layer's Plan from the controller (prefill, and decode of per-layer strategies).

Evicted slots are freed first; the CPU backend's GPU mask is set in place and the CPU experts are
submitted (asynchronous); demand loads go on the copy stream; the GPU experts run from their slots
(waiting on copy events, no per-expert host syncs) with the shared experts meanwhile; experts that
found no evictable slot are streamed through a scratch slot (copied, computed once, not admitted).
A layer-streaming prefill (``core.stream``) reads its staged experts from the staging buffer, and the
next layer's staging copies are queued behind this layer's demand loads. A layer-wise prefill call
(``core.layerwise``) copies the layer into the full-layer buffer and reads its experts from there; its
re-placement is applied after the layer's kernels (``apply_replacement``).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from hybrimoe_kt.core.controller import Decision
from hybrimoe_kt.kernels.gpu_experts import gpu_experts_forward
from hybrimoe_kt.runtime.slots import SlotPool
from hybrimoe_kt.runtime.tiers import Tiers

SharedFn = Callable[[torch.Tensor], torch.Tensor]


def dispatch_plan(pool: SlotPool, tiers: Tiers, mask: np.ndarray, slot_of: np.ndarray, layer: int,
                  x: torch.Tensor, topk_weights: torch.Tensor, ids_cpu: torch.Tensor, w_cpu: torch.Tensor,
                  ids_np: np.ndarray, d: Decision, shared: Optional[SharedFn]):
    """Execute the Plan of ``d`` (see the module docstring); slot ids are built on the host and sent as
    one small copy - no device-side gathers, no syncs. Returns ``(cpu_out, out, shared_out)`` for
    ``Tiers.combine``; ``mask`` is the layer's CPU mask, ``slot_of`` an [E] scratch lookup table."""
    plan, n = d.plan, x.shape[0]
    for eid in plan.evictions:
        pool.release(eid)
    cpu_out = None
    if plan.cpu:
        mask[:] = False  # the backend's gpu_mask (a numpy view): written in place
        if plan.gpu:
            mask[list(plan.gpu)] = True
        cpu_out = tiers.submit_cpu(layer, x, ids_cpu, w_cpu)
    streamed = set(d.streamed)
    for e in plan.loads:
        if e not in streamed:
            pool.load((layer, e))
    if d.stream is not None:  # the next layer's experts, copied while this one runs
        pool.stage(d.stream.layer, d.stream.experts)
    if d.full_layer:  # a layer-wise call: the whole layer into the full-layer buffer
        pool.fill_layer(layer, d.full_layer)
    staged = set(d.staged) | set(d.full_layer)
    slot_of.fill(-1)
    resident_slots = []
    for e in plan.gpu:
        if e not in streamed:
            s = pool.staged[(layer, e)] if e in staged else pool.slot_of((layer, e))
            slot_of[e] = s
            resident_slots.append(s)
    dev = tiers.tier.device
    out = torch.zeros(n, tiers.hidden, dtype=torch.float32, device=dev) if plan.gpu or shared else None
    shared_out = shared(x) if shared is not None else None
    if plan.gpu:
        x_dev = x.to(dev)
        w_dev = topk_weights.to(dev, torch.float32)
    if resident_slots:
        pool.before_compute(resident_slots)
        sid_np = np.where(ids_np >= 0, slot_of[np.maximum(ids_np, 0)], -1).astype(np.int32)  # [N, K]
        slot_ids = torch.from_numpy(sid_np).to(dev, non_blocking=True)
        gpu_experts_forward(x_dev, slot_ids, w_dev, pool.weights, active_slots=resident_slots, out=out)
        pool.after_compute(resident_slots)
    for e in plan.gpu:
        if e in streamed:  # no evictable slot: copy into scratch, compute, forget
            s = pool.stream((layer, e))
            pool.before_compute([s])
            sid = torch.from_numpy(np.where(ids_np == e, s, -1).astype(np.int32)).to(dev, non_blocking=True)
            out += gpu_experts_forward(x_dev, sid, w_dev, pool.weights, active_slots=[s])
            pool.after_compute([s])
    return cpu_out, out, shared_out


def apply_replacement(pool: SlotPool, d: Decision) -> None:
    """A layer-wise call's re-placement: free the evicted experts' slots, then copy each admitted expert
    from the full-layer buffer into a slot (queued behind the layer's kernels by the slot events)."""
    rep = d.replacement
    if rep is None:
        return
    for eid in rep.evictions:
        pool.release(eid)
    for eid in rep.admissions:
        pool.admit_from_buffer(eid)
