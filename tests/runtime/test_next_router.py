"""The hidden-state predictor hook of HybridMoE (``set_next_router``): called with the right layer's
hidden state, its predictions prefetched, outputs unchanged, off by default. GPU tier: the CPU stand-in."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybrimoe_kt.core.strategies import get_strategy, with_overrides
from hybrimoe_kt.runtime.device import Tier
from hybrimoe_kt.runtime.moe import HybridMoE
from hybrimoe_kt.runtime.next_router import hint_order
from tests.runtime.helpers import E, H, K, L, random_routing, reference_moe, tiny_cost, tiny_store

# admission "always": every hinted expert gets a slot, so the test sees each prediction land
HIDDEN = with_overrides(get_strategy("hybrimoe-layer"), name="hybrimoe-layer/hidden", prefetch="hidden",
                        prefetch_depth=1, admission="always")
PREDICTED = {0: [6, 7], 1: [5, 6]}  # layer l -> what its predictor says layer l+1 will use


def make(spec=HIDDEN, slots: int = 3) -> HybridMoE:
    counts = np.zeros((L, E), dtype=np.int64)
    counts[:, :3] = 10  # placement: experts 0-2 of every layer; the predictions are not resident
    return HybridMoE(tiny_store(), Tier("cpu"), spec, slots, tiny_cost(), K, counts=counts, cpu_backend="torch",
                     cpu_threads=1)


def inputs(step: int, layer: int, n: int):
    x = torch.randn(n, H, generator=torch.Generator().manual_seed(100 * step + layer)).to(torch.bfloat16)
    ids, w = random_routing(n, seed=1000 * step + layer)
    return x, ids, w


def recording_router(layer: int, seen: dict):
    def fn(x: torch.Tensor) -> torch.Tensor:
        seen.setdefault(layer, []).append(x.clone())
        return torch.tensor([PREDICTED[layer]] * x.shape[0])
    return fn


def run(moe: HybridMoE, rows: list[int]) -> list[torch.Tensor]:
    outs = []
    for step, n in enumerate(rows):
        for layer in range(L):
            x, ids, w = inputs(step, layer, n)
            with torch.no_grad():
                outs.append(moe.forward(layer, x, ids, w).float())
    return outs


def test_hook_sees_its_layers_hidden_state_and_its_predictions_are_prefetched() -> None:
    moe, seen = make(), {}
    run(moe, [1])  # a first step: the controller learns the layer time (the copy budget is 0 before)
    for layer in PREDICTED:
        moe.set_next_router(layer, recording_router(layer, seen))
    copies0 = moe.pool.copies
    x, ids, w = inputs(1, 0, 1)
    with torch.no_grad():
        moe.forward(0, x, ids, w)
    assert len(seen[0]) == 1 and torch.equal(seen[0][0], x) and 1 not in seen
    assert {6, 7} <= set(moe.cache.resident(1))  # layer 0's background copies prefetched layer 1's hint
    assert moe.pool.copies - copies0 >= 2
    assert moe.hint_stats.calls == 1 and moe.hint_stats.hinted == 2
    x1, ids1, w1 = inputs(1, 1, 1)
    with torch.no_grad():
        moe.forward(1, x1, ids1, w1)
    assert torch.equal(seen[1][0], x1) and {5, 6} <= set(moe.cache.resident(2))
    x2, ids2, w2 = inputs(1, 2, 1)
    with torch.no_grad():
        moe.forward(2, x2, ids2, w2)  # the last layer has no next router
    assert moe.hint_stats.calls == 2


def test_outputs_are_the_same_with_and_without_the_hook() -> None:
    rows = [6, 1, 1, 2, 1]
    off, on = make(), make()
    for layer in PREDICTED:
        on.set_next_router(layer, recording_router(layer, {}))
    got_off, got_on = run(off, rows), run(on, rows)
    assert on.pool.copies > off.pool.copies  # the hook changed where experts ran
    for step, n in enumerate(rows):
        for layer in range(L):
            x, ids, w = inputs(step, layer, n)
            ref = reference_moe(on.store, layer, x, ids, w)
            i = step * L + layer
            for got in (got_off[i], got_on[i]):
                assert float((got - ref).norm() / ref.norm()) < 2e-2
            assert float((got_on[i] - got_off[i]).norm() / ref.norm()) < 2e-2


def test_off_by_default_and_refused_where_it_would_do_nothing() -> None:
    moe = make()
    run(moe, [1, 1])
    assert moe.hint_stats.calls == 0 and moe._next_router is None
    moe.set_next_router(0, recording_router(0, {}))
    moe.set_next_router(0, None)
    assert moe._next_router is None
    with pytest.raises(ValueError, match="prefetch='hidden'"):
        make(get_strategy("hybrimoe-layer")).set_next_router(0, recording_router(0, {}))
    with pytest.raises(ValueError, match="0..1"):
        moe.set_next_router(L - 1, recording_router(0, {}))
    with pytest.raises(ValueError, match="step cadence"):
        with_overrides(get_strategy("hybrimoe"), prefetch="hidden")
    with pytest.raises(ValueError, match="simulator"):
        make(with_overrides(HIDDEN, hidden_accuracy=0.9))


def test_hint_order_counts_rows() -> None:
    assert hint_order(np.array([[3, 1]])) == [3, 1]
    assert hint_order(np.array([[3, 1], [1, 2], [1, -1]])) == [1, 3, 2]
