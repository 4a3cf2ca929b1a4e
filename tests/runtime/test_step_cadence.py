"""The step cadence in the runtime: decode layers look residency up, the upkeep between forwards swaps
experts, and no slot is read before its copy lands or rewritten before its last reader finished."""

from __future__ import annotations

import numpy as np
import torch

from hybrimoe_kt.core.strategies import get_strategy, with_overrides
from hybrimoe_kt.runtime.moe import HybridMoE
from tests.runtime.helpers import E, K, L, random_routing, reference_moe, tiny_cost, tiny_store
from tests.runtime.test_slots_ordering import RecordingTier, check_pool_mirrors_cache

EAGER = with_overrides(get_strategy("hybrimoe"), admission_margin=0.0, step_copy_budget=50.0)  # swaps often


def build(tier=None, spec=EAGER, slots: int = 3) -> HybridMoE:
    from hybrimoe_kt.runtime.device import Tier

    counts = np.ones((L, E), dtype=np.int64)
    return HybridMoE(tiny_store(), tier or Tier("cpu"), spec, slots, tiny_cost(), K, counts=counts,
                     cpu_backend="torch", cpu_threads=1)


def check_published(moe: HybridMoE) -> None:
    """The visible slot table, its list mirror and the CPU masks agree, and every visible slot holds
    its expert's weights (so no kernel reads a slot before its copy landed)."""
    cad = moe._cadence
    vis = cad.slots >= 0
    assert cad.rows == cad.slots.tolist()
    for layer in range(L):
        assert np.array_equal(moe._masks[layer], vis[layer])
        for e in np.flatnonzero(vis[layer]):
            s = int(cad.slots[layer, e])
            assert moe.pool.table[(layer, int(e))] == s
            gate, up, down = moe.pool.weights.dequant_slot(s, torch.bfloat16)
            lw = moe.store.layers[layer]
            assert torch.equal(gate, lw.gate[e]) and torch.equal(up, lw.up[e]) and torch.equal(down, lw.down[e])


def test_decode_swaps_between_steps_and_stays_exact() -> None:
    moe = build()
    orig = moe.controller.decide

    def boom(*a, **k):
        raise AssertionError("a decode layer asked the controller")

    worst = 0.0
    for step, n in enumerate([6, 1, 1, 1, 1, 1, 1, 1, 1]):
        moe.controller.decide = orig if n > 1 else boom  # decode layers never ask the controller
        for layer in range(L):
            x = torch.randn(n, moe.store.hidden, generator=torch.Generator().manual_seed(step * 10 + layer))
            x = x.to(torch.bfloat16)
            ids, w = random_routing(n, seed=7 * step + layer)
            got = moe.forward(layer, x, ids, w).float()
            ref = reference_moe(moe.store, layer, x, ids, w)
            worst = max(worst, float((got - ref).norm() / ref.norm()))
        check_pool_mirrors_cache(moe)
        if n == 1:  # a decode step runs on what its upkeep published (a prefill rewrites masks per layer)
            check_published(moe)
    assert worst < 2e-2
    assert moe._cadence.copies > 0, "the eager upkeep never swapped"
    c = moe.cache.counters
    assert c.hits + c.misses == sum(len(set(random_routing(n, 7 * s + l)[0].flatten().tolist()))
                                    for s, n in enumerate([6, 1, 1, 1, 1, 1, 1, 1, 1]) for l in range(L))


def test_upkeep_copies_wait_for_the_barrier_after_the_last_decode_step() -> None:
    tier = RecordingTier()
    moe = build(tier)
    barriers: list[int] = []
    pool = moe.pool
    orig_barrier = pool.barrier

    def logged_barrier() -> None:
        orig_barrier()
        barriers.append(id(pool._barrier))
        tier.log.append(("barrier", id(pool._barrier)))

    pool.barrier = logged_barrier  # type: ignore[method-assign]
    orig_copy = pool._copy

    def logged_copy(eid, s):
        orig_copy(eid, s)
        tier.log.append(("copy", s, eid))

    pool._copy = logged_copy  # type: ignore[method-assign]
    for step in range(8):
        for layer in range(L):
            ids, w = random_routing(1, seed=11 * step + layer)
            moe.forward(layer, torch.zeros(1, moe.store.hidden, dtype=torch.bfloat16), ids, w)
    assert barriers, "decode steps must be followed by a barrier"
    current, waited = None, set()
    upkeep_copies = 0
    for entry in tier.log:
        if entry[0] == "barrier":
            current, waited = entry[1], set()
        elif entry[0] == "copy_wait":
            waited.add(entry[1])
        elif entry[0] == "copy" and current is not None:
            assert current in waited, f"copy into slot {entry[1]} does not wait for the step's barrier"
            upkeep_copies += 1
    assert upkeep_copies > 0


class PendingEvent:
    """A copy event that has not completed (a CUDA copy still in flight)."""

    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done


def test_a_copy_in_flight_is_not_published_until_it_completes() -> None:
    moe = build()
    cad, pool = moe._cadence, moe.pool
    eid = next(iter(pool.table))
    ev = PendingEvent()
    pool._in_flight[eid] = ev  # as pool.load records on CUDA
    cad.publish()
    assert cad.slots[eid] == -1 and not moe._masks[eid[0]][eid[1]]  # the CPU serves it meanwhile
    ids = torch.tensor([[eid[1], (eid[1] + 1) % E]])
    x = torch.randn(1, moe.store.hidden).to(torch.bfloat16)
    w = torch.tensor([[0.5, 0.5]])
    moe.forward(eid[0], x, ids, w)
    before = moe.stats.cpu_experts
    ev.done = True
    cad.publish()
    assert cad.slots[eid] == pool.table[eid] and moe._masks[eid[0]][eid[1]]
    assert eid not in pool._in_flight and before >= 1


def test_stock_and_static_decode_also_look_residency_up() -> None:
    for name, slots in (("stock", 0), ("static-frequency", 3 * L)):
        moe = build(spec=get_strategy(name), slots=slots)
        assert moe._cadence is not None
        for step, n in enumerate([4, 1, 1]):
            if n == 1:
                moe.controller.decide = lambda *a, **k: (_ for _ in ()).throw(AssertionError("decide"))
            for layer in range(L):
                ids, w = random_routing(n, seed=step * 5 + layer)
                x = torch.randn(n, moe.store.hidden).to(torch.bfloat16)
                got = moe.forward(layer, x, ids, w).float()
                ref = reference_moe(moe.store, layer, x, ids, w)
                assert float((got - ref).norm() / ref.norm()) < 2e-2
            if n == 1:
                check_published(moe)
