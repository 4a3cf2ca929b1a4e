"""The host's placements as strategies: kt-frequency (an alias of static-frequency) and kt-dynamic-update
(layer-wise prefill at a token threshold, then the layer's GPU experts re-placed from the batch).

Golden inputs with expected outputs; the controller scenario uses round, binary-exact costs so the
predicted times are exact. The references for the host's choices are written here from their
documented behaviour (kt-kernel's ``generate_gpu_experts_masks``: global top-n by frequency;
sglang-kt's ``select_top_experts_from_batch``: per-layer top-n of the batch's counts, sorted).
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest

from hybrimoe_kt.core.cache import ExpertCache
from hybrimoe_kt.core.controller import Controller
from hybrimoe_kt.core.cost import RooflineCost
from hybrimoe_kt.core.layerwise import KT_PREFILL_THRESHOLD, LayerwisePrefill, batch_top, device_copy_s
from hybrimoe_kt.core.protocols import Clock
from hybrimoe_kt.core.strategies import StrategySpec, build_policies, get_strategy, slots_for, with_overrides
from hybrimoe_kt.core.types import LayerRouting


def routing(layer: int, rows: list[list[int]], prefill: bool = True) -> LayerRouting:
    return LayerRouting.from_topk(layer, np.array(rows), is_prefill=prefill)


def cost() -> RooflineCost:
    return RooflineCost(cpu_call=1.0, gpu_call=0.5, cpu_fixed=0.0, cpu_mem=2.0, cpu_per_token=0.125,
                        gpu_fixed=0.0, gpu_mem=0.25, gpu_per_token=0.0625, transfer_s=3.0,
                        attn_mem=0.5, attn_per_token=0.0625, layer_fixed=0.5, shared_mem=0.0,
                        shared_per_token=0.0, extra_mem=0.25, extra_per_token=0.0625, n_extra_layers=0,
                        copy_dram_share=0.5, expert_bytes_cpu=100, expert_bytes_gpu=1000)


# --- kt-frequency ---------------------------------------------------------------------------------

def test_kt_frequency_is_static_frequency_under_another_name() -> None:
    kt, ours = get_strategy("kt-frequency"), get_strategy("static-frequency")
    differ = {f.name for f in fields(StrategySpec) if getattr(kt, f.name) != getattr(ours, f.name)}
    assert differ == {"name", "description", "host_time_of"}
    assert kt.host_time_of == "static-frequency" and kt.decode_lookup


def test_kt_frequency_places_the_global_top_n_like_kt_kernel() -> None:
    """kt-kernel's generate_gpu_experts_masks: the n largest of activation_freq [L, E] over all layers
    (n = --kt-num-gpu-experts x MoE layers); counts without ties, so the host's choice is unique."""
    rng = np.random.default_rng(0)
    counts = rng.permutation(6 * 16).reshape(6, 16) * 3 + 1  # distinct
    spec = get_strategy("kt-frequency")
    slots = slots_for(spec, 6, 16, 0.25)
    assert slots == 4 * 6  # --kt-num-gpu-experts 4 per layer, times the MoE layers, in one pool
    pol = build_policies(spec, 6, 16, 2, slots, Clock(), counts=counts)
    flat = np.argsort(-counts.ravel())[:slots]
    expected = sorted((int(i) // 16, int(i) % 16) for i in flat)
    assert list(pol.placement) == expected
    assert pol.layerwise is None


@pytest.mark.kt_kernel
def test_kt_frequency_matches_generate_gpu_experts_masks() -> None:
    torch = pytest.importorskip("torch")
    kt = pytest.importorskip("kt_kernel.experts_base", reason="kt-kernel is not installed")
    counts = np.random.default_rng(1).permutation(4 * 8).reshape(4, 8).astype(np.float32)
    n = slots_for(get_strategy("kt-frequency"), 4, 8, 0.25)
    masks = kt.generate_gpu_experts_masks(torch.from_numpy(counts), n).numpy()
    pol = build_policies(get_strategy("kt-frequency"), 4, 8, 2, n, Clock(), counts=counts)
    assert sorted(zip(*np.nonzero(masks))) == [tuple(e) for e in pol.placement]


# --- the policy ------------------------------------------------------------------------------------

def test_batch_top_counts_rows_breaks_ties_by_id_and_fills_by_id() -> None:
    r = routing(0, [[3, 5], [5, 1], [3, 5], [7, 1]])  # counts: 5 -> 3, 3 -> 2, 1 -> 2, 7 -> 1
    assert batch_top(r, 8, 1) == (5,)
    assert batch_top(r, 8, 2) == (1, 5)          # 3 and 1 tie at 2: the lower id
    assert batch_top(r, 8, 3) == (1, 3, 5)
    assert batch_top(r, 8, 6) == (0, 1, 2, 3, 5, 7)  # unused experts fill up from the lowest id
    assert batch_top(r, 8, 0) == ()
    with pytest.raises(ValueError, match="n=9"):
        batch_top(r, 8, 9)


def test_batch_top_matches_a_torch_topk_of_the_counts() -> None:
    """The host counts each row's top-k ids and keeps torch.topk(counts, n) sorted by id."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    for _ in range(20):
        ids = np.stack([rng.choice(16, 4, replace=False) for _ in range(40)])
        counts = torch.bincount(torch.from_numpy(ids).flatten(), minlength=16)
        if len(set(counts.tolist())) < 16:
            continue  # the host breaks ties as torch does; compare where it is unambiguous
        ref = tuple(sorted(torch.topk(counts, 5, sorted=True).indices.tolist()))
        assert batch_top(routing(0, ids.tolist()), 16, 5) == ref


def test_layerwise_threshold_copies_and_swaps() -> None:
    lw = LayerwisePrefill(8, reload_residents=True, replace=True)
    assert lw.applies(8, True) and lw.applies(9, True)
    assert not lw.applies(7, True) and not lw.applies(64, False)  # decode forwards stay static
    assert lw.copies(4, {1}) == (0, 1, 2, 3)
    assert LayerwisePrefill(8, reload_residents=False).copies(4, {1}) == (0, 2, 3)
    r = routing(0, [[2, 3]] * 5 + [[0, 3]] * 3)  # counts: 3 -> 8, 2 -> 5, 0 -> 3
    assert lw.swaps(r, 4, {1, 2}) == ((1,), (3,))  # the layer keeps two GPU experts: 2 and 3
    assert lw.swaps(r, 4, {2, 3}) == ((), ())
    assert lw.swaps(r, 4, set()) == ((), ())      # a layer without GPU experts stays without
    assert LayerwisePrefill(8).swaps(r, 4, {1, 2}) == ((), ())  # no dynamic update: nothing moves
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="threshold"):
            LayerwisePrefill(bad)  # type: ignore[arg-type]


def test_kt_dynamic_update_spec_and_its_checks() -> None:
    spec = get_strategy("kt-dynamic-update")
    assert spec.layerwise_threshold == KT_PREFILL_THRESHOLD == 500 and spec.replace_from_batch
    assert spec.scheduler == spec.eviction == "static" and spec.pool == "global" and spec.decode_lookup
    with pytest.raises(ValueError, match="layerwise_threshold too"):
        with_overrides(get_strategy("kt-frequency"), replace_from_batch=True)
    with pytest.raises(ValueError, match="layer-wise prefill needs"):
        with_overrides(get_strategy("hybrimoe"), layerwise_threshold=8)
    with pytest.raises(ValueError, match="layerwise_threshold must be"):
        with_overrides(spec, layerwise_threshold=-1)


# --- the controller's decisions ----------------------------------------------------------------------

def controller(threshold: int = 4) -> tuple[Controller, ExpertCache]:
    spec = with_overrides(get_strategy("kt-dynamic-update"), layerwise_threshold=threshold)
    counts = np.array([[9, 8, 1, 1], [1, 1, 9, 8]])  # placement: (0, 0), (0, 1), (1, 2), (1, 3)
    clock = Clock()
    pol = build_policies(spec, 2, 4, 2, slots_for(spec, 2, 4, 0.5), clock, counts=counts)
    cache = ExpertCache(2, 4, 4, pol.eviction, global_pool=True)
    cache.place(pol.placement)
    return Controller(pol, cache, cost(), clock, 2), cache


def test_a_long_prefill_layer_runs_on_the_gpu_after_the_whole_layer_is_copied() -> None:
    ctl, cache = controller()
    r = routing(0, [[2, 3], [2, 3], [3, 1], [2, 0]])  # 4 rows: counts 2 -> 3, 3 -> 3, 0 -> 1, 1 -> 1
    d = ctl.decide(r, now=10.0, gpu_free=1.0, is_prefill=True)
    assert d.layerwise and d.full_layer == (0, 1, 2, 3)          # every expert of the layer, id order
    assert d.plan.gpu == r.experts and d.plan.cpu == () and d.plan.loads == () and d.plan.evictions == ()
    assert ctl.copy_free_at == 10.0 + 4 * 3.0                      # four copies on the queue
    assert d.ready == {e: 12.0 for e in r.experts}                 # all wait for the last copy
    assert (d.hits, d.misses) == (2, 2)                            # 0 and 1 were on the GPU
    # the layer's two GPU experts become the batch's top two: 2 and 3 (tied at 3 rows) replace 0 and 1
    rep = d.replacement
    assert rep is not None and rep.evictions == ((0, 0), (0, 1)) and rep.admissions == ((0, 2), (0, 3))
    assert rep.copy_s == 2 * device_copy_s(cost()) == 2 * 0.5
    compute = cost().gpu_expert(3) * 2 + cost().gpu_expert(1) * 2  # the launch (1.0 + 0.5) hides in the wait
    assert d.plan.predicted_s == pytest.approx(12.0 + compute + 1.0)
    assert sorted(cache.resident(0)) == [2, 3] and sorted(cache.resident(1)) == [2, 3]
    assert all(cache.ready_at((0, e)) == pytest.approx(10.0 + d.plan.predicted_s) for e in (2, 3))
    assert ctl.background().copies == ()
    assert ctl.visible()[0].tolist() == [False, False, True, True]  # decode serves the new set


def test_short_prefills_and_decode_keep_the_static_split() -> None:
    ctl, cache = controller(threshold=4)
    for d in (ctl.decide(routing(0, [[2, 3], [2, 0], [1, 0]]), 0.0, 0.0, True),   # 3 rows < 4
              ctl.decide(routing(0, [[2, 3]] * 8, prefill=False), 0.0, 0.0, False)):  # decode
        assert not d.layerwise and d.full_layer == () and d.replacement is None
        assert set(d.plan.gpu) <= {0, 1} and d.plan.loads == ()
    assert sorted(cache.resident(0)) == [0, 1] and ctl.copy_free_at == 0.0
