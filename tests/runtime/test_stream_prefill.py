"""Layer-streaming prefill in the runtime (core.stream, runtime.slots staging buffers): the staged
experts are computed from the staging buffer, equal to the split without streaming and to the torch
reference within tolerance, never admitted to the cache, and decode afterwards reads intact slots.
Both for bf16 slots and for slots holding GGUF blocks. The GPU tier is the CPU stand-in."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from hybrimoe_kt.core.cost import RooflineCost
from hybrimoe_kt.core.strategies import get_strategy, with_overrides
from hybrimoe_kt.core.stream import staging_slots
from hybrimoe_kt.runtime.device import Tier
from hybrimoe_kt.runtime.moe import HybridMoE
from tests.runtime.helpers import E, H, K, L, random_routing, reference_moe, tiny_cost, tiny_model, tiny_store
from tests.runtime.test_moe_gguf import gguf_store


def streaming_cost(base: RooflineCost) -> RooflineCost:
    """A slow CPU and copies that leave the CPU's memory bandwidth alone: staging the next layer pays."""
    return replace(base, cpu_fixed=200e-6, gpu_fixed=1e-6, transfer_s=20e-6, copy_dram_share=0.0)


class StepTimer:
    """A timer that advances a fixed amount per reading: host timing without the machine's noise."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1e-4
        return self.t


def make(stream: bool, store, cost: RooflineCost, n_experts: int) -> HybridMoE:
    spec = with_overrides(get_strategy("hybrimoe"), prefill_stream=stream, stream_min_rows=0)  # short test prompts
    return HybridMoE(store, Tier("cpu"), spec, 2, cost, K, counts=np.ones((store.n_layers, n_experts), np.int64),
                     cpu_backend="torch", cpu_threads=1, timer=StepTimer())


def run(moe: HybridMoE, reference_store, rows: list[int], n_experts: int, hidden: int) -> tuple[list, float]:
    outs, worst = [], 0.0
    for step, n in enumerate(rows):
        moe.begin_forward(is_prefill=n > 1)
        for layer in range(moe.store.n_layers):
            x = torch.randn(n, hidden, generator=torch.Generator().manual_seed(31 * step + layer)).to(torch.bfloat16)
            ids, w = random_routing(n, seed=97 * step + layer, n_experts=n_experts, top_k=K)
            with torch.no_grad():
                got = moe.forward(layer, x, ids, w).float()
            ref = reference_moe(reference_store, layer, x, ids, w)
            worst = max(worst, float((got - ref).norm() / ref.norm()))
            outs.append(got)
    return outs, worst


def test_streamed_prefill_equals_the_split_and_the_reference() -> None:
    cost = streaming_cost(tiny_cost())
    rows = [48, 1, 1, 32, 1, 1]
    on, off = make(True, tiny_store(), cost, E), make(False, tiny_store(), cost, E)
    assert on.pool.n_stage == staging_slots(get_strategy("hybrimoe").stream_buffer, E)
    assert off.pool.n_stage == 0
    got_on, err_on = run(on, on.store, rows, E, H)
    got_off, err_off = run(off, off.store, rows, E, H)
    assert err_on < 2e-2 and err_off < 2e-2, (err_on, err_off)
    for a, b in zip(got_on, got_off):  # the same experts, computed from a staging slot instead
        assert float((a - b).norm() / b.norm()) < 2e-2
    assert on.stats.staged > 0 and on.pool.stage_copies > 0 and off.stats.staged == 0
    assert on.stats.forwards == len(rows) * L
    for eid in on.pool.staged:  # staged experts stay out of the cache and the slot table
        assert eid not in on.cache and on.pool.slot_table[eid] == -1


@pytest.mark.parametrize("types", ["Q4_K", "Q8_0"])
def test_streamed_prefill_over_gguf_slots(types: str) -> None:
    L2, E2, H2, I2 = 2, 8, 256, 256
    store, dense = gguf_store(types)
    cost = streaming_cost(tiny_cost(tiny_model(L2, E2, K, H2, I2)))
    moe = make(True, store, cost, E2)
    _, worst = run(moe, dense, [40, 1, 1], E2, H2)
    assert worst < 5e-2, f"{types}: relative error {worst}"
    assert moe.stats.staged > 0
    (layer, e), s = next(iter(moe.pool.staged.items()))  # a staging slot holds the GGUF blocks unchanged
    _, blocks = store.expert_blocks(layer, e)
    assert moe.pool.weights.fmt == "gguf"
    for held, b in zip(moe.pool.weights.data, blocks):
        assert torch.equal(held[s, :, : b.shape[1]].cpu(), b)


def test_staging_refuses_more_experts_than_a_buffer_holds() -> None:
    moe = make(True, tiny_store(), streaming_cost(tiny_cost()), E)
    half = moe.pool.n_stage // 2
    with pytest.raises(ValueError, match="staging buffers hold"):
        moe.pool.stage(1, tuple(range(half + 1)))
