"""HybridMoE running the host's strategies: kt-frequency and kt-dynamic-update's layer-wise prefill
(the whole layer copied into the full-layer buffer, computed there, then the layer's GPU experts
re-placed from the batch by device copies), on the CPU stand-in, against a torch reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybrimoe_kt.core.layerwise import batch_top
from hybrimoe_kt.core.strategies import get_strategy, with_overrides
from hybrimoe_kt.core.types import LayerRouting
from hybrimoe_kt.runtime.device import Tier
from hybrimoe_kt.runtime.moe import HybridMoE
from tests.runtime.helpers import E, H, K, L, random_routing, reference_moe, tiny_cost, tiny_store

SLOTS = 3 * L  # a global pool: 3 per layer on average


def make(strategy: str, threshold: int = 6) -> HybridMoE:
    spec = get_strategy(strategy)
    if spec.layerwise_threshold:
        spec = with_overrides(spec, layerwise_threshold=threshold)
    counts = (np.arange(L * E, dtype=np.int64).reshape(L, E) * 7) % 11
    return HybridMoE(tiny_store(), Tier("cpu"), spec, SLOTS, tiny_cost(), K, counts=counts,
                     cpu_backend="torch", cpu_threads=1)


def forward(moe: HybridMoE, n: int, seed: int) -> tuple[float, list[torch.Tensor]]:
    """One forward of ``n`` rows over every layer; worst relative error and each layer's routing ids."""
    worst, ids_all = 0.0, []
    for layer in range(L):
        x = torch.randn(n, H, generator=torch.Generator().manual_seed(seed + layer)).to(torch.bfloat16)
        ids, w = random_routing(n, seed=seed * 10 + layer)
        with torch.no_grad():
            got = moe.forward(layer, x, ids, w).float()
        ref = reference_moe(moe.store, layer, x, ids, w)
        worst = max(worst, float((got - ref).norm() / ref.norm()))
        ids_all.append(ids)
    return worst, ids_all


def slot_holds(moe: HybridMoE, layer: int, e: int) -> bool:
    """The cache slot of ``(layer, e)`` holds that expert's weights (bf16 slots)."""
    s = moe.pool.slot_of((layer, e))
    got = moe.pool.weights.dequant_slot(s)
    want = moe.store.expert(layer, e)
    return all(torch.allclose(a, b.float(), atol=1e-2) for a, b in zip(got, want))


def test_layerwise_prefill_matches_the_reference_and_re_places_the_slots() -> None:
    moe = make("kt-dynamic-update")
    before = {l: sorted(moe.cache.resident(l)) for l in range(L)}
    err, ids = forward(moe, 8, seed=1)  # 8 rows >= 6: every layer layer-wise
    assert err < 2e-2
    assert moe.stats.cpu_experts == 0 and moe.stats.gpu_experts > 0   # nothing ran on the CPU
    assert moe.pool.stage_copies == L * E                              # whole layers copied
    for layer in range(L):
        r = LayerRouting.from_topk(layer, ids[layer].numpy(), is_prefill=True)
        top = batch_top(r, E, len(before[layer]))
        assert sorted(moe.cache.resident(layer)) == list(top)           # the batch's top experts
        assert sorted(e for (l, e) in moe.pool.table if l == layer) == list(top)
        assert all(slot_holds(moe, layer, e) for e in top)              # copied from the buffer
    assert any(before[l] != sorted(moe.cache.resident(l)) for l in range(L))
    # decode then serves the new GPU experts; the CPU kernel's masks hold the same set
    err, _ = forward(moe, 1, seed=2)
    assert err < 2e-2
    vis = moe.controller.visible()
    for layer in range(L):
        assert np.array_equal(moe._masks[layer], vis[layer])
        assert np.array_equal(moe._cadence.slots[layer] >= 0, vis[layer])


def test_short_prefills_and_kt_frequency_never_copy() -> None:
    for moe in (make("kt-dynamic-update", threshold=64), make("kt-frequency")):
        placed = {l: sorted(moe.cache.resident(l)) for l in range(L)}
        copies = moe.pool.copies
        for n, seed in ((8, 3), (1, 4), (1, 5)):
            err, _ = forward(moe, n, seed)
            assert err < 2e-2
        assert moe.pool.copies == copies and moe.pool.stage_copies == 0
        assert {l: sorted(moe.cache.resident(l)) for l in range(L)} == placed
        assert moe.stats.gpu_experts > 0 and moe.stats.cpu_experts > 0


@pytest.mark.parametrize("reload", [True, False])
def test_full_layer_copy_with_and_without_the_residents(reload: bool) -> None:
    spec = with_overrides(get_strategy("kt-dynamic-update"), layerwise_threshold=4,
                          layerwise_reload_residents=reload)
    counts = (np.arange(L * E, dtype=np.int64).reshape(L, E) * 7) % 11
    moe = HybridMoE(tiny_store(), Tier("cpu"), spec, SLOTS, tiny_cost(), K, counts=counts,
                    cpu_backend="torch", cpu_threads=1)
    resident = sum(len(moe.cache.resident(l)) for l in range(L))
    err, _ = forward(moe, 4, seed=6)
    assert err < 2e-2
    assert moe.pool.stage_copies == (L * E if reload else L * E - resident)
