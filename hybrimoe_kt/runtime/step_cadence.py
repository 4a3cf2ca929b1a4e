"""The runtime half of the step cadence (``core.upkeep``): what a decode layer looks up, and the upkeep
applied between forwards.

Strategies whose decode split is the residency (``StrategySpec.decode_lookup``: no cache, a fixed
cache, or the step cadence) take this path. Their decode layers do no policy work: ``lookup`` maps the
routing ids to slots through ``slots`` ([L, E], -1 = served by the CPU kernel) and the CPU backends'
masks already hold the same residency, so the CPU kernel skips exactly the experts the GPU computes. ``record`` keeps the
step's ids and weights. ``between_forwards`` (at a forward's first MoE layer) hands the recorded step
to ``Controller.upkeep``, applies the plan (a barrier on the compute stream, evictions' slots
freed, copies queued in order on the copy stream) and publishes the residency: an expert becomes
visible only once its copy is complete, and the slot table and masks are rewritten in place.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from hybrimoe_kt.core.controller import Controller
from hybrimoe_kt.core.upkeep import EMPTY_UPKEEP, StepRouting
from hybrimoe_kt.runtime.slots import SlotPool


class StepCadence:
    def __init__(self, controller: Controller, pool: SlotPool, masks: Sequence[np.ndarray], top_k: int) -> None:
        self.ctl, self.pool, self.masks, self.top_k = controller, pool, list(masks), top_k
        self.on_publish: Optional[Callable[[np.ndarray], None]] = None  # e.g. the device slot table
        n_layers, n_experts = pool.slot_table.shape
        self.slots = np.full((n_layers, n_experts), -1, dtype=np.int32)  # [L, E] visible slot, or -1
        self.rows: list[list[int]] = self.slots.tolist()                  # the same, as Python lists
        self._ids = np.full((n_layers, 1, top_k), -1, dtype=np.int32)     # [L, rows, K] this step
        self._w = np.zeros((n_layers, 1, top_k), dtype=np.float32)
        self._rows = 0           # rows of the step being recorded (0: none)
        self.recording = False   # the current forward is a decode step of this cadence
        self.upkeeps = 0
        self.copies = 0
        self._stale = False      # a forward went through the per-layer path since the last publish
        self._moving = controller.spec.cadence == "step"  # copies may land between upkeeps

    def between_forwards(self, now: float, is_prefill: bool) -> None:
        """Before a forward's first MoE layer: upkeep for the step that ended, publish the residency."""
        last = None
        if self.recording and self._rows:
            n = self._rows
            last = StepRouting(self._ids[:, :n], self._w[:, :n], self.top_k)
        plan = self.ctl.upkeep(last, now, plan=not is_prefill) if self._moving else EMPTY_UPKEEP
        pool = self.pool
        if self.recording or plan.copies:  # the step's kernels read slots without per-layer events
            pool.barrier()
        for eid in plan.evictions:
            pool.release(eid)
        for eid in plan.copies:
            pool.load(eid)
        self.upkeeps += 1
        self.copies += len(plan.copies)
        if self._stale or plan.copies or plan.evictions or self._moving:
            self.publish()  # else nothing visible changed (a fixed cache after a decode step)
        self._stale = is_prefill  # the per-layer path rewrites the masks layer by layer
        if last is not None:
            self._ids[:, : self._rows] = -1  # layers a forward skips keep no stale ids
        self.recording, self._rows = not is_prefill, 0

    def publish(self) -> None:
        """Rewrite the visible slot table and the CPU masks from the cache (landed copies only)."""
        vis = self.ctl.visible()
        self.pool.hide_in_flight(vis)
        np.copyto(self.slots, np.where(vis, self.pool.slot_table, -1))
        self.rows = self.slots.tolist()
        if self.on_publish is not None:
            self.on_publish(self.slots)
        for layer, mask in enumerate(self.masks):
            np.copyto(mask, vis[layer])

    def load_step(self, ids: np.ndarray, w: np.ndarray) -> tuple[int, int]:
        """A whole decode step recorded elsewhere (``ids``/``w`` [L, N, K], the graph-safe path's
        buffers): kept for the upkeep, and counted against the residency it ran on. Returns
        ``(hits, misses)``: activated experts (distinct per layer) served from a slot, or not."""
        n_l, n, k = ids.shape
        if self._ids.shape[1] < n:
            self._ids = np.full((n_l, n, k), -1, dtype=np.int32)
            self._w = np.zeros((n_l, n, k), dtype=np.float32)
        self._ids[:, :n], self._w[:, :n] = ids, w
        self._rows, self.recording = n, True
        ok = ids >= 0
        used = np.zeros(self.slots.shape, dtype=bool)
        used[np.broadcast_to(np.arange(n_l)[:, None, None], ids.shape)[ok], ids[ok]] = True
        hits = int(np.count_nonzero(used & (self.slots >= 0)))
        return hits, int(np.count_nonzero(used)) - hits

    def record(self, layer: int, ids: np.ndarray, w: np.ndarray) -> None:
        """Keep one decode layer's routing ``[N, K]`` for the upkeep."""
        n = ids.shape[0]
        if self._rows == 0:
            if n > self._ids.shape[1]:
                self._ids = np.full((self._ids.shape[0], n, self.top_k), -1, dtype=np.int32)
                self._w = np.zeros((self._w.shape[0], n, self.top_k), dtype=np.float32)
            self._rows = n
        elif n != self._rows:  # a caller mixing batch sizes within one forward: stop recording it
            self._ids[:, : self._rows] = -1
            self.recording, self._rows = False, 0
            return
        self._ids[layer, :n] = ids
        self._w[layer, :n] = w

    def lookup(self, layer: int, ids: np.ndarray) -> np.ndarray:
        """``[N, K]`` int32 slot ids (-1 = the CPU kernel computes that pair)."""
        return np.where(ids >= 0, self.slots[layer][np.maximum(ids, 0)], -1).astype(np.int32, copy=False)
