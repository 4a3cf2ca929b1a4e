"""Slot safety: the pool mirrors the cache, and a slot is never rewritten before its readers finish.

The release's prefill race (bug B4): slots handed to a layer were evicted and overwritten by later
loads of the same layer with no ordering between copy and compute. Here a recording tier logs every
copy, wait and read; the test replays random prefill and decode routings and checks the log.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings, strategies as st

from hybrimoe_kt.runtime.device import StandInEvent, Tier
from hybrimoe_kt.runtime.moe import HybridMoE
from tests.runtime.helpers import E, K, L, random_routing, reference_moe, tiny_cost, tiny_store


class RecordingTier(Tier):
    """The CPU stand-in, logging ("copy_wait", ev), ("copy", slot), ("read", slots) and ("done", ev)."""

    def __init__(self) -> None:
        super().__init__("cpu")
        self.log: list[tuple] = []

    def wait_on_copy_stream(self, ev):  # type: ignore[override]
        self.log.append(("copy_wait", id(ev)))
        super().wait_on_copy_stream(ev)



def build(strategy: str, slots: int, tier: Tier) -> HybridMoE:
    counts = np.ones((L, E), dtype=np.int64)
    moe = HybridMoE(tiny_store(), tier, strategy, slots, tiny_cost(), K, counts=counts,
                    cpu_backend="torch", cpu_threads=1)
    pool = moe.pool
    orig = pool._copy

    def logged_copy(eid, s):
        orig(eid, s)
        tier.log.append(("copy", s, eid))

    orig_after = pool.after_compute

    def logged_after(slots):
        orig_after(slots)
        if slots:
            tier.log.append(("read", tuple(slots), id(pool.last_read[slots[0]])))

    pool._copy = logged_copy  # type: ignore[method-assign]
    pool.after_compute = logged_after  # type: ignore[method-assign]
    return moe


def check_pool_mirrors_cache(moe: HybridMoE) -> None:
    resident = {(l, e) for l in range(L) for e in moe.cache.resident(l)}
    assert set(moe.pool.table) == resident
    assert len(set(moe.pool.table.values())) == len(moe.pool.table)  # one expert per slot
    assert len(moe.pool.table) + len(moe.pool.free) == moe.pool.n_slots


def test_slot_rewritten_only_after_its_last_reader() -> None:
    tier = RecordingTier()
    moe = build("lru-offload", 2, tier)  # every expert on the GPU: heavy slot churn, prefill streams
    for step, n in enumerate([16, 1, 1, 8, 1]):
        for layer in range(L):
            x = torch.randn(n, moe.store.hidden).to(torch.bfloat16)
            ids, w = random_routing(n, seed=31 * step + layer)
            got = moe.forward(layer, x, ids, w).float()
            ref = reference_moe(moe.store, layer, x, ids, w)
            assert float((got - ref).norm() / ref.norm()) < 2e-2
            check_pool_mirrors_cache(moe)
    # every copy into a slot that had been read before must be preceded by a wait on its last read
    last_read_event: dict[int, int] = {}
    waited: set[int] = set()
    pool = moe.pool
    assert moe.stats.streamed > 0, "the prefill should have streamed loads through scratch slots"
    copies = 0
    rewrites = 0
    for entry in tier.log:
        if entry[0] == "copy_wait":
            waited.add(entry[1])
        elif entry[0] == "copy":
            s = entry[1]
            copies += 1
            if s in last_read_event:
                rewrites += 1
                assert last_read_event[s] in waited, f"slot {s} rewritten without waiting for its reader"
        elif entry[0] == "read":
            for s in entry[1]:
                last_read_event[s] = entry[2]
    placed = len(moe.policies.placement)
    assert copies == pool.copies - placed and rewrites > 0


def test_stand_in_events_catch_a_missing_record() -> None:
    ev = StandInEvent()
    try:
        ev.wait()
    except RuntimeError as e:
        assert "never recorded" in str(e)
    else:
        raise AssertionError("waiting on an unrecorded event must fail")


@settings(max_examples=15, deadline=None)
@given(st.sampled_from(["lru-offload", "hybrimoe-paper", "hybrimoe"]), st.integers(1, 4),
       st.lists(st.integers(1, 10), min_size=2, max_size=6), st.integers(0, 10_000))
def test_cache_invariants_under_random_routing(strategy: str, slots: int, rows: list[int], seed: int) -> None:
    tier = RecordingTier()
    moe = build(strategy, slots, tier)
    for step, n in enumerate(rows):
        for layer in range(L):
            x = torch.zeros(n, moe.store.hidden, dtype=torch.bfloat16)
            ids, w = random_routing(n, seed=seed + 7 * step + layer)
            moe.forward(layer, x, ids, w)
            check_pool_mirrors_cache(moe)
            for l in range(L):
                assert len(moe.cache.resident(l)) <= moe.cache.quotas[l]
    c = moe.cache.counters
    assert c.hits + c.late_hits + c.misses == sum(len(set(random_routing(n, seed + 7 * s + l)[0].flatten().tolist()))
                                                  for s, n in enumerate(rows) for l in range(L))
