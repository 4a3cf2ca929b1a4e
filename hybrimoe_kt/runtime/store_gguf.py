"""Host expert store for GGUF models: routed experts kept as quantized GGUF blocks.

The CPU kernels read the blocks directly (kt-kernel's llamafile MoE for Q4_K/Q5_K/Q6_K/Q8_0, a torch
fallback otherwise), so the host holds each expert once, quantized. A GPU slot holds the same blocks
(``kernels.gguf_slots``): a slot copy moves the expert's bytes unchanged (``expert_blocks``, views of
the store: nothing is dequantized or copied on the host), and the GPU kernels dequantize the slot.
``expert_bytes`` is a slot's size on the device; ``expert`` (bf16 weights) serves references.

With ``pin`` (the GPU tier is CUDA) the store moves each layer's projections out of the file mapping into
page-locked host buffers, one per layer and projection, of exactly their size (``runtime.page_locked``),
and keeps only those: the CPU kernels and the slot copies read the same bytes, still once in host memory,
and the copies are real DMA. Without it the blocks stay where the caller's ``GgufExperts`` keeps them
(a GGUF file's read-only mapping).
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np
import torch

from hybrimoe_kt.kernels.cpu_backend import CpuExpertBackend
from hybrimoe_kt.kernels.cpu_gguf_factory import make_gguf_cpu_backend
from hybrimoe_kt.kernels.gguf_experts import GgufExperts, GgufLayerExperts, GgufTensor
from hybrimoe_kt.kernels.gguf_slots import GgufSlotWeights, row_bytes
from hybrimoe_kt.runtime import page_locked

HostBuffer = Callable[[int], np.ndarray]  # nbytes -> a writeable uint8 [nbytes] host buffer


def _moved(lx: GgufLayerExperts, buffer: HostBuffer) -> GgufLayerExperts:
    """``lx`` with each projection's blocks copied into a buffer of its own, byte for byte."""
    projs = []
    for t in (lx.gate, lx.up, lx.down):
        nbytes = int(t.data.nbytes)
        buf = buffer(nbytes)
        if not isinstance(buf, np.ndarray) or buf.dtype != np.uint8 or buf.shape != (nbytes,) \
                or not buf.flags.writeable or not buf.flags.c_contiguous:
            raise ValueError(f"the host buffer for {nbytes} bytes must be a writeable contiguous uint8 "
                             f"[{nbytes}] array, got {type(buf).__name__} "
                             f"{getattr(buf, 'dtype', None)} {getattr(buf, 'shape', None)}")
        data = buf.reshape(t.data.shape)  # a view: the buffer's own bytes
        np.copyto(data, t.data)
        projs.append(GgufTensor(t.type_name, t.shape, data))
    return GgufLayerExperts(*projs)


class GgufExpertStore:
    def __init__(self, experts: GgufExperts, layer_ids: Sequence[int] | None = None, *, pin: bool = False,
                 host_buffer: HostBuffer | None = None) -> None:
        """``pin``: move the blocks into page-locked host memory (needs CUDA); ``host_buffer`` replaces
        the page-locked allocator there (same layout, e.g. pageable buffers to check it without CUDA)."""
        ids = sorted(experts.layers) if layer_ids is None else list(layer_ids)
        if not ids:
            raise ValueError("the GGUF expert store needs at least one MoE layer")
        if host_buffer is not None and not pin:
            raise ValueError("host_buffer is the allocator of the pinned layout; pass it with pin=True")
        layers = [experts.layer(i) for i in ids]
        shapes = {(l.n_experts, l.intermediate, l.hidden) for l in layers}
        if len(shapes) != 1:
            raise ValueError(f"every MoE layer must have the same expert shapes, got {sorted(shapes)}")
        if pin:
            buffer = host_buffer or page_locked.page_locked_buffer
            layers = [_moved(lx, buffer) for lx in layers]
        self.pinned = pin  # the blocks live in the pinned layout's buffers (page-locked unless replaced)
        self.layers: list[GgufLayerExperts] = layers
        self.layer_ids = ids
        self.n_experts, self.intermediate, self.hidden = shapes.pop()
        self.n_layers = len(self.layers)

    def expert(self, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """bf16 weights of one expert, dequantized from its blocks: gate [I, H], up [I, H], down [H, I]."""
        lx = self.layers[layer]
        return tuple(t.dequantize(e).to(torch.bfloat16) for t in (lx.gate, lx.up, lx.down))  # type: ignore[return-value]

    def cpu_backend(self, layer: int, kind: str, n_threads: int, top_k: int, max_len: int,
                    pool: object = None) -> CpuExpertBackend:
        return make_gguf_cpu_backend(kind, self.layers[layer], layer, n_threads, top_k=top_k,
                                     max_len=max_len, pool=pool)

    def expert_blocks(self, layer: int, e: int) -> tuple[tuple[str, str, str], tuple[torch.Tensor, ...]]:
        """One expert's raw blocks as the store holds them: the three projections' GGUF types and
        uint8 ``[rows, row bytes]`` views (no copy; page-locked memory when the store is ``pinned``)."""
        lx = self.layers[layer]
        projs = (lx.gate, lx.up, lx.down)
        with warnings.catch_warnings():  # a memory-mapped file is read-only; the views are only read
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            blocks = tuple(torch.from_numpy(t.data[e]) for t in projs)
        return tuple(t.type_name for t in projs), blocks  # type: ignore[return-value]

    def slot_types(self) -> list[set[str]]:
        """Per projection (gate, up, down), the GGUF types it has in any layer."""
        return [{getattr(lx, p).type_name for lx in self.layers} for p in ("gate", "up", "down")]

    def make_slots(self, n_slots: int, device: torch.device | str) -> GgufSlotWeights:
        return GgufSlotWeights(n_slots, self.hidden, self.intermediate, self.slot_types(), device)

    def expert_bytes(self) -> int:
        """Bytes one GPU slot holds (raw blocks, each projection at its widest type in the file)."""
        widths = [max(row_bytes(t, n_in) for t in types)
                  for types, n_in in zip(self.slot_types(), (self.hidden, self.hidden, self.intermediate))]
        return self.intermediate * (widths[0] + widths[1]) + self.hidden * widths[2]

    def quantized_bytes(self) -> int:
        return sum(t.data.nbytes for lx in self.layers for t in (lx.gate, lx.up, lx.down))

    def check(self, layer: int, expert: int) -> None:
        if not (0 <= layer < self.n_layers and 0 <= expert < self.n_experts):
            raise ValueError(f"expert ({layer}, {expert}) out of range: {self.n_layers} layers, "
                             f"{self.n_experts} experts")
