"""GGUF expert slots: a slot holds the expert's raw blocks byte for byte (nothing dequantized on the host
when it is copied), dequantizes to exactly the store's weights, and is counted at its real size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybrimoe_kt.kernels.gguf_experts import GgufExperts, GgufLayerExperts
from hybrimoe_kt.kernels.gguf_slots import GgufSlotWeights, row_bytes
from hybrimoe_kt.runtime.device import Tier
from hybrimoe_kt.runtime.moe import HybridMoE
from hybrimoe_kt.runtime.store_gguf import GgufExpertStore
from tests.runtime.helpers import random_routing, tiny_cost, tiny_model

L, E, K, H, I = 2, 8, 2, 256, 256


def mixed_store() -> GgufExpertStore:
    """Layer 0 keeps ``down`` in Q6_K, layer 1 in Q4_K (as Q4_K_M files do)."""
    gen = torch.Generator().manual_seed(3)
    layers = {}
    for layer, down in enumerate(("Q6_K", "Q4_K")):
        g, u = (torch.randn(E, I, H, generator=gen) * H ** -0.5 for _ in range(2))
        d = torch.randn(E, H, I, generator=gen) * I ** -0.5
        layers[layer] = GgufLayerExperts.quantize(g, u, d, ("Q4_K", "Q8_0", down))
    return GgufExpertStore(GgufExperts(layers))


def test_slots_hold_the_host_blocks_byte_for_byte() -> None:
    store = mixed_store()
    moe = HybridMoE(store, Tier("cpu"), "hybrimoe", 3, tiny_cost(tiny_model(L, E, K, H, I)), K,
                    counts=np.ones((L, E), dtype=np.int64), cpu_backend="torch", cpu_threads=1)
    w = moe.pool.weights
    assert isinstance(w, GgufSlotWeights)
    for step, n in enumerate([9, 1, 1, 1, 1]):
        for layer in range(L):
            ids, wts = random_routing(n, seed=11 * step + layer, n_experts=E, top_k=K)
            moe.forward(layer, torch.randn(n, H).to(torch.bfloat16), ids, wts)
    assert moe.pool.table and moe.pool.copies > 0
    for (layer, e), s in moe.pool.table.items():
        types, blocks = store.expert_blocks(layer, e)
        assert w.types[s] == types
        for data, src in zip(w.data, blocks):
            assert torch.equal(data[s, :, : src.shape[1]], src)  # the bytes, unchanged
        want = store.expert(layer, e)
        for got, ref in zip(w.dequant_slot(s, torch.bfloat16), want):
            assert torch.equal(got, ref)  # the GPU side sees exactly the CPU tier's weights


def test_slot_size_is_the_quantized_size() -> None:
    store = mixed_store()
    widest_down = row_bytes("Q6_K", I)  # layer 0's down is Q6_K: every slot's down row is that wide
    assert store.expert_bytes() == I * (row_bytes("Q4_K", H) + row_bytes("Q8_0", H)) + H * widest_down
    bf16 = 3 * H * I * 2
    assert store.expert_bytes() < 0.45 * bf16
    slots = store.make_slots(4, "cpu")
    assert slots.slot_nbytes() == store.expert_bytes()


def test_bad_blocks_are_refused() -> None:
    slots = GgufSlotWeights(2, H, I, [{"Q4_K"}, {"Q4_K"}, {"Q4_K"}])
    good = torch.zeros(I, row_bytes("Q4_K", H), dtype=torch.uint8)
    with pytest.raises(ValueError, match="up blocks must be uint8"):
        slots.write_blocks(0, ("Q4_K", "Q8_0", "Q4_K"), (good, good, good))
    with pytest.raises(ValueError, match="GGUF slots hold"):
        GgufSlotWeights(2, H, I, [{"Q2_K"}, {"Q4_K"}, {"Q4_K"}])
    with pytest.raises(RuntimeError, match="holds no expert"):
        slots.dequant_slot(1)
