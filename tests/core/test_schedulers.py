"""Schedulers: shared makespan rules, the contract every scheduler meets, and golden splits."""

from __future__ import annotations

import subprocess
import sys
from typing import Collection, Mapping

import numpy as np
import pytest

from hybrimoe_kt.core.cost import ReleasedCost, RooflineCost
from hybrimoe_kt.core.hardware import load_profile
from hybrimoe_kt.core.models import get_model
from hybrimoe_kt.core.schedulers import (SCHEDULERS, BalancedScheduler, HssScheduler, make_scheduler)
from hybrimoe_kt.core.schedulers.costtable import CostTable
from hybrimoe_kt.core.schedulers.makespan import makespan, split_makespan, tier_ends
from hybrimoe_kt.core.types import LayerRouting, Split

REL = ReleasedCost(c=1.0)


def routing_from_tokens(tokens: Mapping[int, int], prefill: bool = False) -> LayerRouting:
    """A one-column routing in which expert e is picked by tokens[e] rows."""
    experts = np.array(list(tokens), dtype=np.int64)
    counts = np.array([tokens[e] for e in tokens], dtype=np.int64)
    return LayerRouting.from_topk(0, np.repeat(experts, counts)[:, None], is_prefill=prefill)


def decode(*experts: int) -> LayerRouting:
    return LayerRouting.from_topk(0, np.array([experts]))


def roofline() -> RooflineCost:
    return RooflineCost.build(load_profile("rtx4090-ddr5"), get_model("qwen3-30b-a3b"))


def check_contract(split: Split, routing: LayerRouting, resident: Collection[int], cost: object,
                   ready: Mapping[int, float] = {}, copy_free: float = 0.0,
                   gpu_free: float = 0.0) -> None:
    """Every activated expert exactly once; loads = the non-resident GPU experts, in GPU order;
    the canonical GPU order; makespan_s equal to the shared evaluator's value."""
    placed = list(split.gpu) + list(split.cpu)
    assert sorted(placed) == sorted(routing.experts)
    assert len(set(placed)) == len(placed)
    assert set(split.loads) <= set(split.gpu)
    assert set(split.loads) == {e for e in split.gpu if e not in resident}
    n_res = len(split.gpu) - len(split.loads)
    assert tuple(split.gpu[n_res:]) == split.loads  # residents first, then loads in copy order
    tok = dict(zip(routing.experts, routing.tokens))
    res_keys = [(ready.get(e, 0.0), -tok[e]) for e in split.gpu[:n_res]]
    assert res_keys == sorted(res_keys)
    assert [-tok[e] for e in split.loads] == sorted(-tok[e] for e in split.loads)
    assert split.makespan_s == split_makespan(split, routing, cost, ready, copy_free, gpu_free)


# ---- the shared rules ---------------------------------------------------------------------------

def test_makespan_rules_by_hand() -> None:
    tokens = {1: 2, 2: 1, 3: 3, 4: 1}
    # CPU (expert 3 only): 0.79 + 1.0*3 = 3.79.
    # GPU (gpu_free 0.2, gpu_call 0): resident 1 ready at 0.3 -> 0.3..0.8; load 2 lands 0.1+0.418
    # = 0.518 -> 0.8..1.3; resident 4 (no ready) -> 1.3..1.8.
    c, g = tier_ends((1, 2, 4), (3,), (2,), tokens, REL, {1: 0.3}, copy_free=0.1, gpu_free=0.2)
    assert c == pytest.approx(0.79 + 3.0)
    assert g == pytest.approx(1.8)
    # Two loads, serialized: they land at 0.418 and 0.836. 2 runs .418..918, 4 waits for the GPU.
    assert makespan((2, 4), (), (2, 4), tokens, REL) == pytest.approx(1.418)
    # With a busy copy queue (copy_free 1.0) they land at 1.418 and 1.836: 2 runs 1.418..1.918,
    # then 4 (landed) runs 1.918..2.418.
    assert makespan((2, 4), (), (2, 4), tokens, REL, copy_free=1.0) == pytest.approx(2.418)
    # A copy slower than the GPU: the GPU waits for each landing (1.0 and 2.0), ending 2.5.
    slow = ReleasedCost(c=1.0, t_move=1.0)
    assert makespan((2, 4), (), (2, 4), tokens, slow) == pytest.approx(2.5)
    assert makespan((), (), (), tokens, REL) == 0.0
    cost = RooflineCost.build(load_profile("rtx4090-ddr5"), get_model("qwen3-30b-a3b"))
    # gpu_call is paid once when the GPU has work; cpu_call once when the CPU has work.
    assert makespan((1,), (), (), tokens, cost) == pytest.approx(cost.gpu_call + cost.gpu_expert(2))
    assert makespan((), (1, 2), (), tokens, cost) == pytest.approx(
        cost.cpu_call + cost.cpu_expert(2) + cost.cpu_expert(1))


def test_cost_table_matches_cost_model() -> None:
    for cost in (REL, ReleasedCost(c=0.2), roofline()):
        table = CostTable(cost, size=8)
        for n in (0, 1, 7, 8, 300):
            assert table.cpu_time(n) == cost.cpu_expert(n)
            assert table.gpu_time(n) == cost.gpu_expert(n)
        assert table.transfer == cost.transfer()


# ---- registry -----------------------------------------------------------------------------------

def test_registry_and_factory() -> None:
    assert set(SCHEDULERS) == {"stock", "static", "offload", "hss", "balanced", "greedy"}
    for name in SCHEDULERS:
        assert make_scheduler(name).name == name
    assert isinstance(make_scheduler("hybrimoe"), BalancedScheduler)
    assert isinstance(make_scheduler("hybrimoe-paper"), HssScheduler)
    with pytest.raises(ValueError, match="known: stock, static, offload, hss, balanced, greedy"):
        make_scheduler("fifo")


def test_import_is_light() -> None:
    code = ("import sys, hybrimoe_kt.core.schedulers; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- contract and fixed placements --------------------------------------------------------------

CASES = [
    (decode(3, 9, 1, 7, 2, 5), set(), {}, 0.0, 0.0),
    (decode(3, 9, 1, 7, 2, 5), {9, 2}, {}, 0.0, 0.0),
    (decode(3, 9, 1, 7, 2, 5, 11, 12), {3, 9, 1, 7, 2, 5, 11, 12}, {}, 0.0, 0.0),
    (decode(3, 9, 1, 7, 2, 5, 11, 12), {9, 11, 40}, {11: 0.7}, 0.3, 0.1),
    (routing_from_tokens({4: 40, 8: 3, 15: 120, 16: 1}, prefill=True), {8, 16}, {16: 2.0}, 0.5, 0.0),
    (routing_from_tokens({0: 7}), set(), {}, 0.0, 0.0),
]


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("cost", [REL, ReleasedCost(c=0.2), roofline()], ids=["rel1", "rel02", "roof"])
def test_contract(name: str, case: int, cost: object) -> None:
    routing, resident, ready, copy_free, gpu_free = CASES[case]
    split = make_scheduler(name).plan(routing, resident, cost, ready, copy_free, gpu_free)
    check_contract(split, routing, resident, cost, ready, copy_free, gpu_free)


def test_fixed_placements() -> None:
    r = routing_from_tokens({4: 40, 8: 3, 15: 120, 16: 1})
    resident = {8, 16, 99}
    stock = make_scheduler("stock").plan(r, resident, REL)
    assert stock.gpu == () and stock.loads == () and set(stock.cpu) == {4, 8, 15, 16}
    static = make_scheduler("static").plan(r, resident, REL, ready={16: 0.1})
    assert static.gpu == (8, 16) and static.loads == () and static.cpu == (15, 4)
    offload = make_scheduler("offload").plan(r, resident, REL)
    assert offload.cpu == () and offload.gpu == (8, 16, 15, 4) and offload.loads == (15, 4)


def test_late_hit_is_ordered_by_ready_time() -> None:
    r = decode(1, 2, 3)
    split = make_scheduler("static").plan(r, {1, 2, 3}, REL, ready={1: 0.9, 2: 0.2})
    assert split.gpu == (3, 2, 1)
    # 3 at 0..0.5, 2 ready 0.2 -> 0.5..1.0, 1 ready 0.9 -> 1.0..1.5
    assert split.makespan_s == pytest.approx(1.5)


# ---- hss golden splits (ReleasedCost: t_cpu = c*n + 0.79 first, t_gpu 0.5, t_move 0.418) ---------

def test_hss_top6_decode_nothing_cached_is_4_gpu_2_cpu() -> None:
    # Queue 0..5 (one token each). f=front, b=back; g = GPU end if f goes, c = CPU end if b goes.
    # 1: g = load lands .418 -> .918;  c = .79+1 = 1.79  -> GPU (T_move .418)
    # 2: g = max(.918, .836)+.5 = 1.418 <= 1.79          -> GPU
    # 3: g = max(1.418, 1.254)+.5 = 1.918 > 1.79         -> CPU takes 5 (T_cpu 1.79)
    # 4: g = 1.918 <= 2.79                               -> GPU
    # 5: g = max(1.918, 1.672)+.5 = 2.418 <= 2.79        -> GPU
    # 6: f = b = 4: g = max(2.418, 2.09)+.5 = 2.918 > 2.79 -> CPU
    r = decode(0, 1, 2, 3, 4, 5)
    split = make_scheduler("hss").plan(r, set(), REL)
    assert (split.gpu, split.cpu, split.loads) == ((0, 1, 2, 3), (4, 5), (0, 1, 2, 3))
    assert len(split.gpu) == 4 and len(split.cpu) == 2
    assert split.makespan_s == pytest.approx(2.79)  # CPU 0.79 + 2; GPU ends 2.418


def test_hss_top6_decode_one_cached_is_5_gpu_1_cpu() -> None:
    # Queue 3 (resident), 0, 1, 2, 4, 5.
    # 1: resident 3: g = .5 <= 1.79                       -> GPU
    # 2: 0 lands .418: g = max(.5, .418)+.5 = 1.0 <= 1.79  -> GPU
    # 3: 1 lands .836: g = 1.5 <= 1.79                     -> GPU
    # 4: 2 lands 1.254: g = 2.0 > 1.79                     -> CPU takes 5 (T_cpu 1.79)
    # 5: g = 2.0 <= 2.79                                   -> GPU
    # 6: f = b = 4 lands 1.672: g = 2.5 <= 2.79            -> GPU
    r = decode(0, 1, 2, 3, 4, 5)
    split = make_scheduler("hss").plan(r, {3}, REL)
    assert (split.gpu, split.cpu, split.loads) == ((3, 0, 1, 2, 4), (5,), (0, 1, 2, 4))
    assert split.makespan_s == pytest.approx(2.5)  # GPU 2.5, CPU 1.79


def test_hss_prefill_token_aware_c02() -> None:
    # c = 0.2; tokens e0:10, e1:6 (resident), e2:3, e3:1 -> CPU times 2.0, 1.2, 0.6, 0.2.
    # Queue e1, e0, e2, e3.
    # 1: e1 resident: g = .5; c = .79+.2 = .99             -> GPU
    # 2: e0 lands .418: g = max(.5, .418)+.5 = 1.0 > .99   -> CPU takes e3 (T_cpu .99)
    # 3: g = 1.0; c = .99+.6 = 1.59                        -> GPU (T_move .418)
    # 4: f = b = e2 lands .836: g = max(1.0, .836)+.5 = 1.5 <= 1.59 -> GPU
    # The release would send every prefill expert to the GPU: e3 lands 1.254, ends 2.0.
    r = routing_from_tokens({0: 10, 1: 6, 2: 3, 3: 1}, prefill=True)
    cost = ReleasedCost(c=0.2)
    split = make_scheduler("hss").plan(r, {1}, cost)
    assert (split.gpu, split.cpu, split.loads) == ((1, 0, 2), (3,), (0, 2))
    assert split.makespan_s == pytest.approx(1.5)
    assert make_scheduler("offload").plan(r, {1}, cost).makespan_s == pytest.approx(2.0)


def test_hss_prefill_nothing_cached_c1() -> None:
    # c = 1.0; tokens 8, 4, 2, 1, 1 for experts 0..4; nothing cached.
    # 1: e0 lands .418: g = .918; c = .79+1 = 1.79         -> GPU
    # 2: e1 lands .836: g = 1.418 <= 1.79                  -> GPU
    # 3: e2 lands 1.254: g = 1.918 > 1.79                  -> CPU takes e4 (T_cpu 1.79)
    # 4: g = 1.918 <= 1.79+1 = 2.79                        -> GPU
    # 5: f = b = e3 lands 1.672: g = 2.418 <= 2.79         -> GPU
    r = routing_from_tokens({0: 8, 1: 4, 2: 2, 3: 1, 4: 1}, prefill=True)
    split = make_scheduler("hss").plan(r, set(), REL)
    assert (split.gpu, split.cpu, split.loads) == ((0, 1, 2, 3), (4,), (0, 1, 2, 3))
    assert split.makespan_s == pytest.approx(2.418)


def test_hss_honours_gpu_free() -> None:
    # GPU busy until 1.0 (shared experts). 1: e0 lands .418, starts 1.0: g = 1.5 <= 1.79 -> GPU;
    # 2: e1: g = 2.0 > 1.79 -> CPU. Makespan max(1.79, 1.5).
    split = make_scheduler("hss").plan(decode(0, 1), set(), REL, gpu_free=1.0)
    assert (split.gpu, split.cpu) == ((0,), (1,))
    assert split.makespan_s == pytest.approx(1.79)


def test_hss_late_hit_and_balanced_beats_it() -> None:
    # Resident 0 lands at 1.2 (late hit). hss queue 0, 1, 2:
    # 1: 0 starts at 1.2: g = 1.7 <= 1.79 -> GPU;  2: 1 lands .418, g = 2.2 > 1.79 -> CPU takes 2;
    # 3: g = 2.2 <= 2.79 -> GPU. Makespan 2.2.
    # balanced: late hit 0 on the CPU (1.79), load 1 and 2 (GPU .918, 1.418). Makespan 1.79.
    r = decode(0, 1, 2)
    hss = make_scheduler("hss").plan(r, {0}, REL, ready={0: 1.2})
    assert (hss.gpu, hss.cpu, hss.loads) == ((0, 1), (2,), (1,))
    assert hss.makespan_s == pytest.approx(2.2)
    bal = make_scheduler("balanced").plan(r, {0}, REL, ready={0: 1.2})
    assert (bal.gpu, bal.cpu, bal.loads) == ((1, 2), (0,), (1, 2))
    assert bal.makespan_s == pytest.approx(1.79)


# ---- balanced -----------------------------------------------------------------------------------

def test_balanced_matches_hss_on_release_goldens() -> None:
    r = decode(0, 1, 2, 3, 4, 5)
    for resident in (set(), {3}):
        hss = make_scheduler("hss").plan(r, resident, REL)
        bal = make_scheduler("balanced").plan(r, resident, REL)
        assert bal.makespan_s <= hss.makespan_s + 1e-12


def test_balanced_gives_cpu_small_residents_when_gpu_bound() -> None:
    # Every expert resident; the GPU takes 0.5 each (3.0 for six), a 1-token expert costs the CPU
    # 0.79 + 0.2. Moving the smallest residents to the CPU shortens the layer.
    r = routing_from_tokens({0: 50, 1: 40, 2: 30, 3: 20, 4: 1, 5: 1}, prefill=True)
    cost = ReleasedCost(c=0.2)
    bal = make_scheduler("balanced").plan(r, set(range(6)), cost)
    static = make_scheduler("static").plan(r, set(range(6)), cost)
    assert static.makespan_s == pytest.approx(3.0)
    # 4 on the GPU (2.0) and 4, 5 on the CPU (0.79 + 0.4 = 1.19): makespan 2.0.
    assert set(bal.cpu) == {4, 5} and bal.makespan_s == pytest.approx(2.0)


def test_scheduler_instances_follow_a_new_cost_model() -> None:
    s = make_scheduler("balanced")
    r = decode(0, 1, 2, 3, 4, 5)
    a = s.plan(r, set(), ReleasedCost(c=1.0))
    b = s.plan(r, set(), ReleasedCost(c=100.0))
    assert a.cpu and not b.cpu
