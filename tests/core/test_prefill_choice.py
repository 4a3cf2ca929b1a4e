"""Prefill splits priced with the copies' pull on host memory (core.schedulers.prefill_choice)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from hybrimoe_kt.core.cost import RooflineCost
from hybrimoe_kt.core.hardware import load_profile
from hybrimoe_kt.core.models import get_model
from hybrimoe_kt.core.schedulers.balanced import BalancedScheduler
from hybrimoe_kt.core.schedulers.makespan import split_makespan
from hybrimoe_kt.core.schedulers.prefill_choice import choose_prefill, contended_cpu_time, contended_makespan
from hybrimoe_kt.core.types import LayerRouting


def cost(profile: str = "rtx5090-ddr5") -> RooflineCost:
    return RooflineCost.build(load_profile(profile), get_model("deepseek-v2-lite"), "q4_k_m", "bf16")


def routing(rows: int, seed: int = 0) -> LayerRouting:
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(64, 6, replace=False) for _ in range(rows)])
    return LayerRouting.from_topk(0, ids, np.full(ids.shape, 1 / 6, np.float32), is_prefill=True)


def test_contended_cpu_time_is_the_uncontended_time_without_copies() -> None:
    c = cost()
    tokens = [3, 1, 7]
    plain = c.cpu_call + sum(c.cpu_expert(n) for n in tokens)
    assert contended_cpu_time(tokens, c, 0.0) == plain
    assert contended_cpu_time(tokens, c, 1.0) > plain  # copies all along: slower
    assert contended_cpu_time([], c, 1.0) == 0.0


def test_choice_is_never_slower_under_contention_and_keeps_the_split_without_it() -> None:
    resident = set(range(16))
    for rows in (8, 32, 512):
        r = routing(rows, seed=rows)
        for c in (cost(), cost("rtx4090-ddr5")):
            split = BalancedScheduler().plan(r, resident, c)
            chosen = choose_prefill(split, r, resident, c, {}, 0.0, 0.0)
            assert contended_makespan(chosen, r, c, {}, 0.0, 0.0) <= contended_makespan(split, r, c, {}, 0.0, 0.0)
            assert set(chosen.gpu) | set(chosen.cpu) == set(r.experts)
            assert chosen is split or not chosen.loads
            free = replace(c, copy_dram_share=0.0)  # copies that take no host bandwidth: the plain rules
            plain = BalancedScheduler().plan(r, resident, free)
            assert contended_makespan(plain, r, free, {}, 0.0, 0.0) == pytest.approx(split_makespan(plain, r, free))
            assert choose_prefill(plain, r, resident, free, {}, 0.0, 0.0) is plain  # balanced is optimal there
