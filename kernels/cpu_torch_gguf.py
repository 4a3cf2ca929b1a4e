"""Pure-torch CPU expert backend for GGUF-quantised experts: the fallback without kt-kernel.

Weights stay as raw GGUF blocks. When an expert is first needed its three projections are dequantised
with ``gguf.quants.dequantize`` to BF16 and kept in a least-recently-used cache of ``cache_experts``
experts (0 disables caching: every call dequantises again). The arithmetic is ``TorchCpuBackend``'s.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from hybrimoe_kt.kernels.cpu_torch import TorchCpuBackend
from hybrimoe_kt.kernels.gguf_experts import GgufLayerExperts

log = logging.getLogger(__name__)

DEFAULT_CACHE_EXPERTS = 8

ExpertWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class TorchGgufBackend(TorchCpuBackend):
    name = "torch"

    def __init__(self, experts: GgufLayerExperts, n_threads: int = 1, *,
                 cache_experts: int = DEFAULT_CACHE_EXPERTS):
        # The base __init__ validates dense BF16 weights, so it is not called; this sets the same
        # attributes except the dense gate/up/down.
        if n_threads < 1:
            raise ValueError(f"n_threads must be >= 1, got {n_threads}")
        if cache_experts < 0:
            raise ValueError(f"cache_experts must be >= 0, got {cache_experts}")
        self.experts = experts
        self.n_experts, self.hidden, self.intermediate = (experts.n_experts, experts.hidden,
                                                          experts.intermediate)
        self.n_threads = n_threads
        self.types = experts.types
        self.cache_experts = cache_experts
        self._cache: OrderedDict[int, ExpertWeights] = OrderedDict()
        self.dequantized = 0   # experts dequantised so far (cache misses)
        self.gpu_mask = torch.zeros(self.n_experts, dtype=torch.bool)  # [E]

    def _expert(self, e: int) -> ExpertWeights:
        hit = self._cache.get(e)
        if hit is not None:
            self._cache.move_to_end(e)
            return hit
        ex = self.experts
        weights = (ex.gate.dequantize(e).to(torch.bfloat16),   # [I, H]
                   ex.up.dequantize(e).to(torch.bfloat16),     # [I, H]
                   ex.down.dequantize(e).to(torch.bfloat16))   # [H, I]
        self.dequantized += 1
        if self.cache_experts:
            self._cache[e] = weights
            while len(self._cache) > self.cache_experts:
                self._cache.popitem(last=False)
        return weights
