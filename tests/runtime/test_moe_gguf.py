"""HybridMoE over GGUF experts: numerics against a plain torch MoE on the dequantized weights, for each
GGUF type, prefill and decode, with the CPU tier on kt-kernel's llamafile MoE where it applies (shapes
multiple of 256) and the torch GGUF fallback otherwise. The GPU tier is the CPU stand-in."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybrimoe_kt.kernels.gguf_experts import GgufExperts, GgufLayerExperts
from hybrimoe_kt.runtime.device import Tier
from hybrimoe_kt.runtime.moe import HybridMoE
from hybrimoe_kt.runtime.store import HostExpertStore, LayerWeights
from hybrimoe_kt.runtime.store_gguf import GgufExpertStore
from tests.runtime.helpers import random_routing, reference_moe, tiny_cost, tiny_model

L, E, K, H, I = 2, 8, 2, 256, 256
TYPES = ["Q8_0", "Q6_K", "Q5_K", "Q4_K", ("Q4_K", "Q4_K", "Q6_K")]


def gguf_store(types) -> tuple[GgufExpertStore, HostExpertStore]:
    """The quantized store and a bf16 store of its dequantized weights (the reference's weights)."""
    gen = torch.Generator().manual_seed(0)
    layers, dense = {}, []
    for layer in range(L):
        g, u = (torch.randn(E, I, H, generator=gen) * H ** -0.5 for _ in range(2))
        d = torch.randn(E, H, I, generator=gen) * I ** -0.5
        lx = GgufLayerExperts.quantize(g, u, d, types)
        layers[10 + layer] = lx  # GGUF block indices need not start at 0
        dense.append(LayerWeights(*(t.to(torch.bfloat16).contiguous() for t in lx.dequantize())))
    return GgufExpertStore(GgufExperts(layers)), HostExpertStore(dense)


@pytest.mark.parametrize("types", TYPES, ids=lambda t: t if isinstance(t, str) else "-".join(t))
@pytest.mark.parametrize("strategy", ["stock", "hybrimoe"])
def test_gguf_runtime_matches_reference(types, strategy: str) -> None:
    store, dense = gguf_store(types)
    cost = tiny_cost(tiny_model(L, E, K, H, I))
    moe = HybridMoE(store, Tier("cpu"), strategy, 3, cost, K, counts=np.ones((L, E), dtype=np.int64),
                    cpu_backend="auto", cpu_threads=1)
    worst = 0.0
    for step, n in enumerate([9, 1, 1, 1]):
        for layer in range(L):
            x = torch.randn(n, H, generator=torch.Generator().manual_seed(7 * step + layer)).to(torch.bfloat16)
            ids, w = random_routing(n, seed=100 * step + layer, n_experts=E, top_k=K)
            got = moe.forward(layer, x, ids, w).float()
            ref = reference_moe(dense, layer, x, ids, w)
            worst = max(worst, float((got - ref).norm() / ref.norm()))
    assert worst < 5e-2, f"{types} {strategy}: relative error {worst}"
    if strategy == "hybrimoe":
        assert moe.stats.gpu_experts > 0 and moe.pool.copies > 0


def test_gguf_store_checks_shapes() -> None:
    store, _ = gguf_store("Q8_0")
    assert store.layer_ids == [10, 11] and store.n_layers == L
    with pytest.raises(ValueError, match="out of range"):
        store.check(L, 0)
    gate, up, down = store.expert(0, 3)
    assert gate.dtype == torch.bfloat16 and tuple(down.shape) == (H, I)
