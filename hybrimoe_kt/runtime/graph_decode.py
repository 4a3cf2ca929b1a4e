"""The graph-safe decode layer: one MoE layer of a decode step with no host sync and no data-dependent
host decision, so a CUDA graph can capture it (``kt.cuda_graph`` captures the whole step).

Per layer, all on the compute stream:

1. the routing ids, weights and the hidden rows are copied into this layer's pinned host buffers;
2. the CPU experts are submitted on the stream (kt-kernel's ``submit_with_cuda_stream``: the task runs
   when the stream reaches it, after those copies); the kernel skips what the layer's GPU mask marks;
3. the GPU experts: slot ids gathered on the device from the device slot table ``[L, E]`` (-1 = the CPU
   serves it), one kernel over them (Triton on CUDA: it reads each pair's slot itself);
4. the shared experts, then the stream waits for the CPU task (``sync_with_cuda_stream``) and adds its
   pinned output.

The residency this reads - the device slot table and the CPU masks - changes only in the upkeep
between steps (``publish``), after the previous step finished. The pinned routing buffers double as
the step's record for that upkeep (``step``). On the CPU stand-in (no streams) the same function runs
eagerly, with plain submit/sync and the torch expert kernel.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from hybrimoe_kt.kernels.gpu_experts import gpu_experts_forward
from hybrimoe_kt.kernels.triton_experts import TRITON_GGUF_TYPES, triton_available, triton_experts_forward
from hybrimoe_kt.runtime.device import Tier
from hybrimoe_kt.runtime.slots import SlotPool

SharedFn = Callable[[torch.Tensor], torch.Tensor]


def triton_reads(slots: object) -> bool:
    """Whether the Triton expert kernel reads this slot format (GGUF slots: every type they may hold)."""
    if getattr(slots, "fmt", "bf16") != "gguf":
        return True
    return slots.all_types_in(TRITON_GGUF_TYPES)  # type: ignore[attr-defined]


def graph_unsupported(tier: Tier, backends: Sequence[object], slots: object = None) -> Optional[str]:
    """Why decode steps on ``tier`` with these CPU backends and slots cannot be captured (None: they can)."""
    if slots is not None and not triton_reads(slots):
        return (f"these GGUF expert slots hold a type the graph-safe (Triton) kernel does not read yet "
                f"(it reads {', '.join(TRITON_GGUF_TYPES)})")
    if not tier.is_cuda:
        return f"the GPU tier is {tier.label}, not a CUDA device"
    if not triton_available(tier.device):
        return "triton is not installed (the graph's GPU expert kernel reads slot ids on the device)"
    missing = sorted({type(b).__name__ for b in backends if not hasattr(b, "submit_on_stream")})
    if missing:
        return f"the CPU expert backend {', '.join(missing)} cannot queue work on a CUDA stream (use kt-kernel)"
    return None


class GraphSafeDecode:
    def __init__(self, tier: Tier, pool: SlotPool, backends: Sequence[object], n_layers: int, top_k: int,
                 hidden: int, max_rows: int) -> None:
        self.tier, self.pool, self.backends = tier, pool, list(backends)
        self.top_k, self.hidden, self.max_rows = top_k, hidden, max_rows
        pin = tier.pin_ok()
        L, N, K, H = n_layers, max_rows, top_k, hidden

        def host(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, pin_memory=pin)

        self.ids = host((L, N, K), torch.int64)       # [L, N, K] routing ids (and the step's record)
        self.w = host((L, N, K), torch.float32)       # [L, N, K]
        self.x = host((L, N, H), torch.bfloat16)      # [L, N, H] rows for the CPU kernel
        self.cpu_out = host((L, N, H), torch.bfloat16)
        self.slots = torch.full((L, pool.slot_table.shape[1]), -1, dtype=torch.int32, device=tier.device)
        self._rows = 0  # rows of the last step that ran through this path (0: none since the upkeep)

    def publish(self, visible_slots: np.ndarray) -> None:
        """Write the visible slot table ``[L, E]`` (the caller has finished the previous step)."""
        self.slots.copy_(torch.from_numpy(visible_slots), non_blocking=False)

    def replayed(self, rows: int) -> None:
        """A captured step of ``rows`` rows was replayed (no Python ran): its routing is in the buffers."""
        self._rows = rows

    def step(self) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """The routing of the last step (``ids``, ``weights`` [L, N, K]), once; None if none ran."""
        n, self._rows = self._rows, 0
        if n == 0:
            return None
        return self.ids[:, :n].numpy(), self.w[:, :n].numpy()

    def layer(self, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
              shared: Optional[SharedFn]) -> torch.Tensor:
        """``x [N, H]``, routing ``ids``/``w [N, K]`` on the tier's device; returns ``[N, H]`` in x's dtype."""
        n = x.shape[0]
        if not 1 <= n <= self.max_rows:
            raise ValueError(f"the graph-safe decode path takes 1..{self.max_rows} rows, got {n}")
        self._rows = n
        ih, wh, xh, oh = self.ids[layer, :n], self.w[layer, :n], self.x[layer, :n], self.cpu_out[layer, :n]
        ih.copy_(ids, non_blocking=True)
        wh.copy_(w, non_blocking=True)
        xh.copy_(x, non_blocking=True)
        backend = self.backends[layer]
        stream = torch.cuda.current_stream(self.tier.device).cuda_stream if self.tier.is_cuda else None
        if stream is None:
            backend.submit(xh, ih, wh, oh)
        else:
            backend.submit_on_stream(stream, xh, ih, wh, oh)
        sid = self.slots[layer].index_select(0, ids.reshape(-1).clamp_min(0)).view(ids.shape)
        sid = torch.where(ids >= 0, sid, -1)                                     # [N, K] slot or -1
        if self.tier.is_cuda:
            out = triton_experts_forward(x, sid, w, self.pool.weights)
        else:  # the stand-in runs eagerly: its slot list may come from the host
            active = sorted({s for s in sid.reshape(-1).tolist() if s >= 0})
            out = gpu_experts_forward(x, sid, w, self.pool.weights, active_slots=active, path="decode")
        if shared is not None:
            out.add_(shared(x))
        if stream is None:
            backend.sync()
        else:
            backend.sync_on_stream(stream)
        out.add_(oh.to(out.device, non_blocking=True))
        return out.to(x.dtype)
