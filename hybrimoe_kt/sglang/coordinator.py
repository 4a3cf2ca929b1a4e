"""One model's GPU experts inside sglang-kt, decided by our core and written into kt's state.

The coordinator owns, per process and model, the shared ``Controller`` (with its ``ExpertCache``
under per-layer quotas: each layer's ``num_gpu_experts`` slots as kt allocated them, holding kt's
load-time placement first) and two host-side tables the kernels' state is rebuilt from:
``table`` [L, E] (the slot each resident expert holds, -1 otherwise) and ``mask`` [L, E] (the experts
the kernels serve from a slot: the GPU kernel through ``gpu_experts_mask_cuda`` /
``logical_to_gpu_index_cuda``, the CPU kernel by skipping them in its ``gpu_experts_mask``).

- Before every forward (``before_forward``, from the ``ModelRunner.forward`` hook, outside any CUDA
  graph): the previous decode step's recorded routing goes to ``Controller.upkeep``, which makes the
  landed copies visible and books the step's swaps; evicted experts leave their slot at once, new
  ones are written into theirs and become visible at a later upkeep, as in our runtime.
- Prefill layer calls (eager): ``Controller.decide`` plans the layer (its split, demand loads and
  evictions); loads are written into their slots and the layer's mask is the plan's GPU experts, so kt's
  ``apply`` computes exactly that split. A demand load that found no free slot is served by the CPU
  kernel (the host's layer has no scratch slot). A call at or above kt's
  ``--kt-gpu-prefill-token-threshold`` runs kt's full-GPU path untouched.
- Decode layer calls only record the routing into a device buffer (a captured copy, so it works
  inside CUDA graphs); kt's ``apply`` reads the masks the last upkeep published. So do layer calls
  of forwards the hook did not announce (sglang's CUDA graph capture and its warm-up runs call the
  model directly) and calls inside a capture: they never plan.

Every change is written in place into the same tensors (``host.copy_into``): no allocation after the
first call, no rebinding, so captured graphs and the C++ kernel keep reading them. Before slot
contents change the device is synchronized (the previous forward's kernels read those slots).
Under tensor parallelism TP rank 0 decides; each sync point broadcasts a flag and, when something
changed, the tables over the TP CPU group; every rank then writes the experts whose slot changed
(``host.ExpertWriter``: kt-kernel on rank 0 writes each rank's partition, scattered to the ranks) and
publishes the same masks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from hybrimoe_kt.core.cache import ExpertCache
from hybrimoe_kt.core.controller import Controller
from hybrimoe_kt.core.cost import RooflineCost
from hybrimoe_kt.core.hardware import load_profile
from hybrimoe_kt.core.models import ModelPreset
from hybrimoe_kt.core.protocols import Clock
from hybrimoe_kt.core.strategies import build_policies
from hybrimoe_kt.core.types import ExpertId, LayerRouting
from hybrimoe_kt.core.upkeep import StepRouting
from hybrimoe_kt.sglang import host
from hybrimoe_kt.sglang.settings import PluginSettings

log = logging.getLogger(__name__)

TIMER: Callable[[], float] = time.perf_counter  # the clock a coordinator reads unless given one


@dataclass
class PluginStats:
    upkeeps: int = 0
    swaps: int = 0            # experts written by upkeeps
    demand_loads: int = 0     # experts written by prefill plans
    cpu_fallbacks: int = 0    # demand loads without a free slot, served by the CPU kernel instead
    kt_full_gpu: int = 0      # prefill layer calls left to kt's full-GPU path
    syncs: int = 0            # sync points that changed the kernels' state


class ModelCoordinator:
    def __init__(self, settings: PluginSettings, timer: Optional[Callable[[], float]] = None) -> None:
        self.settings, self.spec = settings, settings.spec()
        self.layers: dict[int, tuple[Any, Any]] = {}  # kt layer id -> (FusedMoE layer, kt method)
        self.built = False
        self.stats = PluginStats()
        self._timer = timer or TIMER
        self._owners: dict[int, bool] = {}     # id(model runner) -> runs this model
        self._kind: Optional[str] = None       # the current forward: "decode" or "prefill"
        self._rows = 0
        self._forward = -1
        self._mark: Optional[float] = None      # when the current forward (or prefill layer) began

    def add_layer(self, layer_id: int, layer: Any, method: Any) -> None:
        if self.built:
            raise RuntimeError(f"MoE layer {layer_id} joined after the first forward; hybrimoe builds its "
                               f"tables once, from every layer of the model")
        self.layers[layer_id] = (layer, method)

    # --- build ---------------------------------------------------------------------------------------
    def build(self) -> None:
        """Read every layer's kt state and set up the core (once, at the first forward)."""
        if self.built:
            return
        if not self.layers:
            raise RuntimeError("hybrimoe has no MoE layer to manage")
        ids = sorted(self.layers)
        self.index = {lid: i for i, lid in enumerate(ids)}
        self.states = [host.layer_state(*self.layers[lid]) for lid in ids]
        st0 = self.states[0]
        n_l, n_e, k = len(ids), st0.n_experts, st0.top_k
        for st in self.states:
            if (st.n_experts, st.top_k, st.hidden, st.intermediate) != (n_e, k, st0.hidden, st0.intermediate):
                raise host.UnsupportedHost(f"MoE layer {st.layer_id} differs in shape from layer "
                                           f"{st0.layer_id}: hybrimoe needs one expert shape per model")
        self.n_layers, self.n_experts, self.top_k = n_l, n_e, k
        self.quotas = [st.n_slots for st in self.states]
        self.rank, self.size = host.tp_rank(), host.tp_size()
        self.table = np.full((n_l, n_e), -1, dtype=np.int32)  # [L, E] slot of each resident expert
        for i, st in enumerate(self.states):
            mask = st.mask_cpu.numpy().astype(bool)
            lut = st.lut_cpu.numpy()
            self.table[i] = np.where(mask, lut, -1)
        self.content = np.full((n_l, max(self.quotas + [1])), -1, dtype=np.int32)  # [L, S] expert in slot
        for i, e in zip(*np.nonzero(self.table >= 0)):
            self.content[i, self.table[i, e]] = e
        self.mask = self.table >= 0  # [L, E] served from a slot
        self.writers = [host.ExpertWriter(st, self.rank, self.size) for st in self.states]
        self._flag = torch.zeros(1, dtype=torch.int32)
        self._table_t = torch.from_numpy(self.table)          # shares memory with self.table
        self._mask_t = torch.zeros((n_l, n_e), dtype=torch.uint8)
        self._shown = (self.table.copy(), self.mask.copy())  # what the kernels' state holds now
        self.controller: Optional[Controller] = None
        if self.rank == 0:
            self._build_core()
        dev = st0.mask_dev.device
        rows = self.settings.max_decode_rows
        self._ids = torch.full((n_l, rows, k), -1, dtype=torch.int32, device=dev)  # decode routing [L, R, K]
        self._w = torch.zeros((n_l, rows, k), dtype=torch.float32, device=dev)
        self._t0 = self._timer()
        self.built = True
        log.info("hybrimoe: %d MoE layers x %d experts, %s GPU slots per layer, strategy %s, TP rank %d/%d",
                 n_l, n_e, sorted(set(self.quotas)), self.spec.name, self.rank, self.size)

    def _build_core(self) -> None:
        st0 = self.states[0]
        preset = ModelPreset("sglang-kt-model", "", self.n_layers, 0, self.n_experts, self.top_k, 0,
                             st0.hidden, st0.intermediate, 0, 4 * st0.hidden * st0.hidden, 0)
        cost = RooflineCost.build(load_profile(self.settings.hardware), preset, self.settings.cpu_format, "bf16")
        self.clock = Clock()
        if self.spec.decode_demand != "off":
            raise ValueError(f"strategy {self.spec.name}: decode demand loads (decode_demand) are a simulator "
                             f"ablation; the coordinator does not implement them")
        pol = build_policies(self.spec, self.n_layers, self.n_experts, self.top_k, max(self.quotas), self.clock)
        self.cache = ExpertCache(self.n_layers, self.n_experts, self.quotas, pol.eviction)
        self.cache.place([(int(i), int(e)) for i, e in zip(*np.nonzero(self.table >= 0))])
        self.controller = Controller(pol, self.cache, cost, self.clock, self.top_k)

    # --- the step hook -------------------------------------------------------------------------------
    def owns(self, runner: Any) -> bool:
        """Whether ``runner``'s model holds this coordinator's layers (a draft model does not)."""
        key = id(runner)
        if key not in self._owners:
            model, first = getattr(runner, "model", None), next(iter(self.layers.values()), (None,))[0]
            self._owners[key] = bool(model is not None and first is not None and hasattr(model, "modules")
                                     and any(m is first for m in model.modules()))
        return self._owners[key]

    def before_forward(self, runner: Any, forward_batch: Any) -> None:
        """The step hook: the upkeep for the step that ended, then the kernels' state for the next."""
        if not self.layers or not self.owns(runner):
            return
        kind, rows = host.forward_kind(forward_batch)
        if kind == "idle":
            return
        self.build()
        now = self._timer() - self._t0
        changed = False
        if self.rank == 0:
            ctl = self.controller
            assert ctl is not None
            last = None
            if self._kind == "decode" and self._rows:
                n = min(self._rows, self.settings.max_decode_rows)
                ids = self._ids[:, :n].cpu().numpy().copy()  # a copy: the buffer is rewritten next step
                last = StepRouting(ids, self._w[:, :n].cpu().numpy().copy(), self.top_k)
                if self._mark is not None:
                    ctl.finish((now - self._mark) / self.n_layers)  # the step's mean layer time
            self.clock.now = (self._forward + 1) * self.n_layers
            up = ctl.upkeep(last, now, plan=kind == "decode")
            for eid in up.evictions:
                self._release(eid)
            for eid in up.copies:
                self._assign(eid)
            self.stats.swaps += len(up.copies)
            self.stats.upkeeps += 1
            visible = ctl.visible() & (self.table >= 0)
            changed = bool(up.evictions or up.copies) or not np.array_equal(visible, self.mask)
            self.mask = visible
        self.sync(changed)
        self._kind, self._rows, self._forward = kind, rows, self._forward + 1
        self._mark = self._timer() - self._t0

    # --- layer calls ---------------------------------------------------------------------------------
    def on_layer(self, layer_id: int, layer: Any, dispatch_output: Any, apply: Callable[[Any, Any], Any]) -> Any:
        """One MoE layer call: decode records the routing; prefill applies our plan, then kt runs it."""
        self.build()
        i = self.index[layer_id]
        x, ids, w = host.routing_of(dispatch_output)
        n = int(x.shape[0])
        # a layer call outside a forward the step hook announced (CUDA graph capture and its warm-up
        # runs call the model directly), or inside a capture, only records: it never plans
        if self._kind != "prefill" or host.capturing():
            if self.rank == 0:
                m = min(n, self.settings.max_decode_rows)
                self._ids[i, :m].copy_(ids[:m])
                self._w[i, :m].copy_(w[:m])
            return apply(layer, dispatch_output)
        threshold = host.prefill_threshold(self.layers[layer_id][1])
        if threshold and n >= threshold:  # kt's full-GPU prefill: it computes every expert itself
            self.stats.kt_full_gpu += 1
            return apply(layer, dispatch_output)
        changed = False
        if self.rank == 0:
            changed = self._plan_prefill(i, ids, w)
        self.sync(changed)
        out = apply(layer, dispatch_output)
        changed = False
        if self.rank == 0:
            ctl = self.controller
            assert ctl is not None
            bg = ctl.background()
            for eid in bg.evictions:
                self._release(eid)
            for eid in bg.copies:
                self._assign(eid)
            changed = bool(bg.copies or bg.evictions)
            end = self._timer() - self._t0
            ctl.finish(end - (self._mark if self._mark is not None else end))
            self._mark = end
        self.sync(changed)
        return out

    def _plan_prefill(self, i: int, ids: torch.Tensor, w: torch.Tensor) -> bool:
        ctl = self.controller
        assert ctl is not None
        now = self._timer() - self._t0
        self.clock.now = max(self._forward, 0) * self.n_layers + i
        routing = LayerRouting.from_topk(i, ids.to(torch.int64).cpu().numpy(), w.float().cpu().numpy(),
                                         is_prefill=True, top_k=self.top_k)
        d = ctl.decide(routing, now, 0.0, True)
        for eid in d.plan.evictions:
            self._release(eid)
        streamed = set(d.streamed)
        for e in d.plan.loads:
            if e not in streamed:
                self._assign((i, e))
        self.stats.demand_loads += len(d.plan.loads) - len(streamed)
        self.stats.cpu_fallbacks += len(streamed)
        row = np.zeros(self.n_experts, dtype=bool)
        for e in d.plan.gpu:
            if self.table[i, e] >= 0:
                row[e] = True
        self.mask[i] = row
        return True

    # --- slots ---------------------------------------------------------------------------------------
    def _assign(self, eid: ExpertId) -> None:
        """Give ``eid`` its layer's lowest free slot (the cache admitted it)."""
        i, e = eid
        used = set(self.table[i][self.table[i] >= 0].tolist())
        free = [s for s in range(self.quotas[i]) if s not in used]
        if not free or self.table[i, e] >= 0:
            raise RuntimeError(f"hybrimoe slot table out of sync with the cache at {eid}")
        self.table[i, e] = free[0]

    def _release(self, eid: ExpertId) -> None:
        i, e = eid
        if self.table[i, e] < 0:
            raise RuntimeError(f"hybrimoe slot table out of sync with the cache: {eid} holds no slot")
        self.table[i, e] = -1
        self.mask[i, e] = False

    # --- writing the kernels' state ------------------------------------------------------------------
    def sync(self, changed: bool) -> None:
        """A sync point (every TP rank calls it at the same places): rank 0's tables reach every rank,
        the experts whose slot changed are written, and the masks are published."""
        self._flag[0] = int(changed)
        host.broadcast(self._flag)
        if not int(self._flag[0]):
            return
        self._mask_t.copy_(torch.from_numpy(self.mask.astype(np.uint8)))
        host.broadcast(self._table_t)   # in place into self.table
        host.broadcast(self._mask_t)
        self.mask = self._mask_t.numpy().astype(bool) & (self.table >= 0)
        writes = [(int(i), int(e), int(self.table[i, e])) for i, e in zip(*np.nonzero(self.table >= 0))
                  if self.content[i, self.table[i, e]] != e]
        if writes:
            host.synchronize()  # the previous kernels have read the slots being rewritten
        for i, e, s in writes:
            self.writers[i].write(e, s)
            self.content[i, s] = e
        self._publish()
        self.stats.syncs += 1

    def _publish(self) -> None:
        """Rewrite the kernels' tables of the layers whose slots or mask changed since the last time."""
        table, mask = self._shown
        for i in np.flatnonzero((table != self.table).any(axis=1) | (mask != self.mask).any(axis=1)):
            self._publish_layer(int(i))
        self._shown = (self.table.copy(), self.mask.copy())

    def _publish_layer(self, i: int) -> None:
        st = self.states[i]
        m = torch.from_numpy(self.mask[i].copy())
        lut = torch.from_numpy(np.where(self.mask[i], self.table[i], -1).astype(np.int32))
        inv = np.full(st.n_slots, -1, dtype=np.int32)
        res = np.flatnonzero(self.table[i] >= 0)
        inv[self.table[i, res]] = res
        host.copy_into(st.mask_cpu, m)
        if st.kernel_mask is not None:
            host.copy_into(st.kernel_mask, m)
        host.copy_into(st.mask_dev, m)
        host.copy_into(st.lut_cpu, lut)
        host.copy_into(st.lut_dev, lut)
        host.copy_into(st.inverse, torch.from_numpy(inv))
