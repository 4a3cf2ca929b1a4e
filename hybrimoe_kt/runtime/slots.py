"""The GPU slot pool: a fixed number of expert slots allocated once, shared by all MoE layers.

The pool mirrors the core's ExpertCache: whenever the cache admits an expert the pool assigns it a
slot and copies its weights on the copy stream; whenever the cache evicts one, its slot goes back to
the free list. Ordering is enforced with events, never with host syncs:

- a copy into a slot first waits for the last compute that read the slot (``last_read``), so a slot
  is overwritten only after every kernel reading the previous expert has finished;
- a compute that reads a slot first waits for the slot's copy (``copy_done``).

A step-cadence decode reads slots through the slot table without per-layer events; its upkeep records
one ``barrier`` on the compute stream before queueing copies, and every later copy waits for it too
(all kernels launched before the upkeep, the previous step's included, have read their slots). The
``slot_table`` [L, E] (slot, or -1) and the copies still in flight (``in_flight``) let the runtime
publish only landed experts.

Together with the core never evicting an expert the current layer uses, this makes the released
code's prefill race (a slot handed to a layer and overwritten before its compute ran) impossible.
Scratch slots beyond the cache's capacity serve demand loads that found no evictable slot ("streamed":
copied, computed once, never admitted). Staging slots after them hold the layer-streaming prefill's two
buffers (``core.stream``): layer ``l``'s staged experts go to buffer ``l % 2``, copied while layer
``l - 1`` runs, read by layer ``l``, and overwritten (after those reads, by the same events) two layers on.
A layer-wise prefill (``core.layerwise``) uses the staging slots as one full-layer buffer instead
(``fill_layer``): a layer's experts are copied there, computed, and a re-placed expert is copied from
there into its cache slot on the device (``admit_from_buffer``).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from hybrimoe_kt.core.types import ExpertId
from hybrimoe_kt.kernels.slot_weights import SlotWeights, quantize_expert
from hybrimoe_kt.runtime.device import Event, Tier
from hybrimoe_kt.runtime.store import HostExpertStore
from hybrimoe_kt.runtime.store_gguf import GgufExpertStore


class SlotPool:
    def __init__(self, tier: Tier, store: HostExpertStore | GgufExpertStore, n_slots: int, n_scratch: int = 2,
                 fmt: str = "bf16", n_stage: int = 0) -> None:
        if n_slots < 0 or n_scratch < 1:
            raise ValueError(f"slot pool needs n_slots >= 0 and n_scratch >= 1, got {n_slots}, {n_scratch}")
        if n_stage < 0 or n_stage % 2:
            raise ValueError(f"staging slots come in two equal buffers, got n_stage={n_stage}")
        if fmt != "bf16":
            raise ValueError(f"slot format {fmt!r} is not supported by the runtime yet; use bf16")
        self.tier, self.store = tier, store
        self.n_slots, self.n_scratch, self.n_stage = n_slots, n_scratch, n_stage
        total = n_slots + n_scratch + n_stage
        make = getattr(store, "make_slots", None)  # a GGUF store: slots hold its raw blocks
        self.weights = (make(total, tier.device) if make is not None else
                        SlotWeights.allocate(total, store.hidden, store.intermediate, fmt, tier.device))
        self.table: dict[ExpertId, int] = {}
        self.free: list[int] = list(range(n_slots - 1, -1, -1))  # pop() gives the lowest slot first
        self.copy_done: list[Optional[Event]] = [None] * total
        self.last_read: list[Optional[Event]] = [None] * total
        self.staged: dict[ExpertId, int] = {}  # staged expert -> its staging slot
        self.stage_copies = 0
        self._next_scratch = 0
        self.slot_table = np.full((store.n_layers, store.n_experts), -1, dtype=np.int32)  # [L, E]
        self._barrier: Optional[Event] = None  # every copy waits for it (see the module docstring)
        self._in_flight: dict[ExpertId, Event] = {}  # admitted copies not yet seen complete
        self.copies = 0
        self.bytes_copied = 0

    def slot_of(self, eid: ExpertId) -> int:
        return self.table[eid]

    def release(self, eid: ExpertId) -> None:
        """The cache evicted ``eid``: its slot becomes free (rewritten only after its readers finish)."""
        try:
            s = self.table.pop(eid)
        except KeyError:
            raise RuntimeError(f"slot pool out of sync with the cache: {eid} has no slot") from None
        self.free.append(s)
        self.slot_table[eid] = -1
        self._in_flight.pop(eid, None)

    def load(self, eid: ExpertId) -> int:
        """Assign a free slot to ``eid`` and copy its weights there on the copy stream."""
        if eid in self.table:
            raise RuntimeError(f"slot pool out of sync with the cache: {eid} already has a slot")
        if not self.free:
            raise RuntimeError(f"slot pool out of sync with the cache: no free slot for {eid}")
        s = self.free.pop()
        self.table[eid] = s
        self.slot_table[eid] = s
        self._copy(eid, s)
        ev = self.copy_done[s]
        if ev is not None and self.tier.is_cuda:
            self._in_flight[eid] = ev
        return s

    def barrier(self) -> None:
        """Every later copy waits for the compute queued so far (step cadence, see the module doc)."""
        self._barrier = self.tier.record_on_compute()

    def hide_in_flight(self, visible: np.ndarray) -> None:
        """Clear in ``visible`` [L, E] the experts whose copy has not completed yet (never blocks)."""
        if not self._in_flight:
            return
        done = [eid for eid, ev in self._in_flight.items() if ev.query()]
        for eid in done:
            del self._in_flight[eid]
        for eid in self._in_flight:
            visible[eid] = False

    def stream(self, eid: ExpertId) -> int:
        """Copy ``eid`` into the next scratch slot for one compute (not admitted)."""
        s = self.n_slots + self._next_scratch
        self._next_scratch = (self._next_scratch + 1) % self.n_scratch
        self._copy(eid, s)
        return s

    def stage(self, layer: int, experts: tuple[int, ...]) -> None:
        """Copy ``layer``'s ``experts`` into its staging buffer (``layer % 2``), replacing what that
        buffer held; each copy waits for the reads of the slot it overwrites."""
        half = self.n_stage // 2
        if len(experts) > half:
            raise ValueError(f"{len(experts)} experts to stage, the staging buffers hold {half} each")
        base = self.n_slots + self.n_scratch + (layer % 2) * half
        self.staged = {eid: s for eid, s in self.staged.items() if not base <= s < base + half}
        for j, e in enumerate(experts):
            self._copy((layer, e), base + j)
            self.staged[(layer, e)] = base + j
        self.stage_copies += len(experts)

    def fill_layer(self, layer: int, experts: tuple[int, ...]) -> None:
        """Copy ``layer``'s ``experts`` into the full-layer buffer (the staging slots, expert ``j`` of the
        list at slot ``j``), replacing what it held; each copy waits for the reads of its slot."""
        if len(experts) > self.n_stage:
            raise ValueError(f"{len(experts)} experts for the full-layer buffer, it holds {self.n_stage}")
        base = self.n_slots + self.n_scratch
        self.staged = {}
        for j, e in enumerate(experts):
            self._copy((layer, e), base + j)
            self.staged[(layer, e)] = base + j
        self.stage_copies += len(experts)

    def admit_from_buffer(self, eid: ExpertId) -> int:
        """Give ``eid`` a free slot and copy it there on the device from the full-layer buffer (after the
        slot's last reads; the buffer slot is rewritten only behind this copy on the copy stream)."""
        src = self.staged.get(eid)
        if src is None:
            raise RuntimeError(f"{eid} is not in the full-layer buffer: nothing to copy it from")
        if eid in self.table or not self.free:
            raise RuntimeError(f"slot pool out of sync with the cache: cannot admit {eid}")
        s = self.free.pop()
        self.table[eid] = s
        self.slot_table[eid] = s
        tier = self.tier
        with tier.copying():
            for ev in (self.last_read[s], self.copy_done[src], self._barrier):
                if ev is not None:
                    tier.wait_on_copy_stream(ev)
            self.weights.copy_slot(s, src, non_blocking=tier.is_cuda)
            self.copy_done[s] = tier.record_on_copy()
        ev = self.copy_done[s]
        if ev is not None and tier.is_cuda:
            self._in_flight[eid] = ev
        self.copies += 1
        return s

    def _copy(self, eid: ExpertId, s: int) -> None:
        layer, e = eid
        self.store.check(layer, e)
        gguf = self.weights.fmt == "gguf"  # raw blocks, copied unchanged; else packed on the host
        if gguf:
            types, blocks = self.store.expert_blocks(layer, e)
        else:
            packed = quantize_expert(*self.store.expert(layer, e), self.weights.fmt)  # bf16 store: views
        tier = self.tier
        with tier.copying():
            prev = self.last_read[s]
            if prev is not None:
                tier.wait_on_copy_stream(prev)
            if self._barrier is not None:
                tier.wait_on_copy_stream(self._barrier)
            if gguf:
                self.weights.write_blocks(s, types, blocks, non_blocking=tier.is_cuda)
            else:
                self.weights.write_packed(s, packed, non_blocking=tier.is_cuda)
            self.copy_done[s] = tier.record_on_copy()
        self.copies += 1
        self.bytes_copied += self.store.expert_bytes()

    def before_compute(self, slots: list[int]) -> None:
        """The compute stream waits for the copies of ``slots``."""
        for s in slots:
            ev = self.copy_done[s]
            if ev is not None:
                self.tier.wait_on_compute(ev)

    def after_compute(self, slots: list[int]) -> None:
        """Mark ``slots`` as read by the compute just queued."""
        if not slots:
            return
        ev = self.tier.record_on_compute()
        for s in slots:
            self.last_read[s] = ev
