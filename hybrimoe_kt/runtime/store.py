"""Host expert store: every routed expert's weights once in host memory.

Per MoE layer, stacked bf16 tensors ``gate [E, I, H]``, ``up [E, I, H]``, ``down [E, H, I]`` - the
layout the CPU kernels read - allocated pinned when the GPU tier is CUDA, so the same bytes feed the
CPU kernel and the host-to-GPU copies (no second copy per tier, no staging copy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from hybrimoe_kt.kernels.cpu_backend import CpuExpertBackend, make_cpu_backend


@dataclass(frozen=True)
class LayerWeights:
    gate: torch.Tensor  # [E, I, H] bf16
    up: torch.Tensor    # [E, I, H] bf16
    down: torch.Tensor  # [E, H, I] bf16

    @property
    def n_experts(self) -> int:
        return int(self.gate.shape[0])

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.gate[e], self.up[e], self.down[e]


class HostExpertStore:
    def __init__(self, layers: Sequence[LayerWeights]) -> None:
        if not layers:
            raise ValueError("the expert store needs at least one MoE layer")
        shapes = {(tuple(l.gate.shape), tuple(l.up.shape), tuple(l.down.shape)) for l in layers}
        if len(shapes) != 1:
            raise ValueError(f"every MoE layer must have the same expert shapes, got {sorted(shapes)}")
        g, u, d = next(iter(shapes))
        e, i, h = g
        if u != g or d != (e, h, i):
            raise ValueError(f"expert weights must be gate/up [E, I, H] and down [E, H, I], got {g}, {u}, {d}")
        for l in layers:
            for name, t in (("gate", l.gate), ("up", l.up), ("down", l.down)):
                if t.dtype != torch.bfloat16 or t.device.type != "cpu" or not t.is_contiguous():
                    raise ValueError(f"{name} weights must be contiguous bfloat16 CPU tensors, got "
                                     f"{t.dtype} on {t.device}")
        self.layers = list(layers)
        self.n_layers = len(layers)
        self.n_experts, self.intermediate, self.hidden = e, i, h

    @staticmethod
    def allocate(n_layers: int, n_experts: int, hidden: int, inter: int, pin: bool = False) -> "HostExpertStore":
        """Uninitialised storage to be filled by a loader (pinned when ``pin``)."""
        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, dtype=torch.bfloat16, pin_memory=pin)

        return HostExpertStore([LayerWeights(empty(n_experts, inter, hidden), empty(n_experts, inter, hidden),
                                             empty(n_experts, hidden, inter)) for _ in range(n_layers)])

    @staticmethod
    def page_locked(layers: Sequence[LayerWeights], alloc: Optional[Callable[[int], np.ndarray]] = None
                    ) -> "HostExpertStore":
        """A store over copies of ``layers`` in page-locked host memory of exactly their size
        (``runtime.page_locked``; torch's pinned allocator would round each tensor up to a power of two),
        one layer at a time, so that at most one layer is held twice. ``alloc(nbytes)`` -> a uint8
        buffer replaces the allocator in tests."""
        if alloc is None:
            from hybrimoe_kt.runtime.page_locked import page_locked_buffer as alloc
        out = []
        for lw in layers:
            copies = []
            for t in (lw.gate, lw.up, lw.down):
                buf = alloc(t.numel() * t.element_size())
                dst = torch.from_numpy(buf).view(torch.bfloat16).view(t.shape)
                dst.copy_(t)
                copies.append(dst)
            out.append(LayerWeights(*copies))
        return HostExpertStore(out)

    @staticmethod
    def random(n_layers: int, n_experts: int, hidden: int, inter: int, seed: int = 0,
               pin: bool = False, scale: Optional[float] = None) -> "HostExpertStore":
        """Random weights (for tests and benchmarks with replayed routing); always labelled as such."""
        store = HostExpertStore.allocate(n_layers, n_experts, hidden, inter, pin)
        gen = torch.Generator().manual_seed(seed)
        s_in = scale if scale is not None else hidden ** -0.5
        s_out = scale if scale is not None else inter ** -0.5
        for lw in store.layers:
            lw.gate.copy_(torch.randn(lw.gate.shape, generator=gen) * s_in)
            lw.up.copy_(torch.randn(lw.up.shape, generator=gen) * s_in)
            lw.down.copy_(torch.randn(lw.down.shape, generator=gen) * s_out)
        return store

    def __iter__(self) -> Iterator[LayerWeights]:
        return iter(self.layers)

    def expert_bytes(self) -> int:
        return 3 * self.hidden * self.intermediate * 2

    def nbytes(self) -> int:
        return self.n_layers * self.n_experts * self.expert_bytes()

    def expert(self, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """bf16 views of one expert (the bytes a GPU slot copy reads): gate [I, H], up [I, H], down [H, I]."""
        return self.layers[layer].expert(e)

    def cpu_backend(self, layer: int, kind: str, n_threads: int, top_k: int, max_len: int,
                    pool: object = None) -> "CpuExpertBackend":
        lw = self.layers[layer]
        return make_cpu_backend(kind, lw.gate, lw.up, lw.down, n_threads, top_k=top_k, max_len=max_len,
                                pool=pool, layer_idx=layer)

    def check(self, layer: int, expert: int) -> None:
        if not (0 <= layer < self.n_layers and 0 <= expert < self.n_experts):
            raise ValueError(f"expert ({layer}, {expert}) out of range: {self.n_layers} layers, "
                             f"{self.n_experts} experts")
