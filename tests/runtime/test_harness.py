"""The host-time harness: with trivial kernels no expert kernel of any runtime path runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybrimoe_kt.kernels import gpu_experts
from hybrimoe_kt.runtime.device import Tier
from hybrimoe_kt.runtime.harness import NoOpDense, trivial_kernels
from hybrimoe_kt.runtime.moe import HybridMoE
from tests.runtime.helpers import E, K, L, random_routing, tiny_cost, tiny_store


@pytest.mark.parametrize("strategy", ["stock", "static-frequency", "lru-offload", "hybrimoe-paper",
                                      "hybrimoe-layer", "hybrimoe"])
def test_trivial_kernels_silence_every_path(strategy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    slots = 3 * L if strategy == "static-frequency" else 3
    moe = HybridMoE(tiny_store(), Tier("cpu"), strategy, slots, tiny_cost(), K,
                    counts=np.ones((L, E), dtype=np.int64), cpu_backend="torch", cpu_threads=1)

    def boom(*a, **k):
        raise AssertionError("an expert kernel ran under trivial_kernels")

    monkeypatch.setattr(gpu_experts, "slot_expert", boom)
    for b in moe.cpu:
        monkeypatch.setattr(b, "_compute", boom, raising=False)
    dense = NoOpDense(moe.store.hidden)
    with trivial_kernels(moe):
        for step, n in enumerate([8, 1, 1, 1]):
            moe.begin_forward(is_prefill=n > 1)
            for layer in range(L):
                ids, w = random_routing(n, seed=step * 7 + layer)
                x = torch.zeros(n, moe.store.hidden, dtype=torch.bfloat16)
                moe.forward(layer, dense.attention(layer, x), ids, w, shared=dense.shared(layer))
    assert moe.stats.forwards == 4 * L
    if strategy != "stock":
        assert moe.stats.gpu_experts > 0  # the GPU path was taken, its kernel silenced
