"""The eviction registry: names match the Literal, make_policy gives clear errors, core stays torch-free."""

from __future__ import annotations

import subprocess
import sys
from typing import get_args

import pytest

from hybrimoe_kt.core.eviction import (
    EVICTION_POLICIES,
    LRU,
    MRS,
    EvictionName,
    make_policy,
    policy_kwargs,
)
from hybrimoe_kt.core.protocols import Clock


def test_registry_matches_the_literal() -> None:
    assert set(EVICTION_POLICIES) == set(get_args(EvictionName))
    for name, cls in EVICTION_POLICIES.items():
        assert cls.name == name


def test_make_policy_builds_each_policy() -> None:
    clock = Clock()
    built = {
        "lru": make_policy("lru", n_layers=2, n_experts=4),
        "lfu": make_policy("lfu", n_layers=2, n_experts=4, clock=clock),
        "mrs": make_policy("mrs", n_layers=2, n_experts=4, top_k=2, alpha=0.3),
        "static": make_policy("static", placement=[(0, 1)], counts=[[1, 2, 3, 4]] * 2, n_layers=2, n_experts=4),
        "belady": make_policy("belady", uses={(0, 1): [0, 2]}, clock=clock, n_layers=2, n_experts=4),
    }
    for name, pol in built.items():
        assert isinstance(pol, EVICTION_POLICIES[name]) and pol.name == name
    assert isinstance(built["lru"], LRU)
    assert isinstance(built["mrs"], MRS) and built["mrs"].p == 4


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown eviction policy 'fifo'; known: lru, lfu, mrs"):
        make_policy("fifo")


def test_unknown_or_missing_kwargs_are_value_errors() -> None:
    with pytest.raises(ValueError, match=r"'lru'.*accepted: n_layers, n_experts, clock"):
        make_policy("lru", n_layers=2, n_experts=4, alpha=0.5)
    with pytest.raises(ValueError, match=r"required: n_layers, n_experts, top_k"):
        make_policy("mrs", n_layers=2, n_experts=4)
    assert policy_kwargs("belady") == ("uses", "clock", "n_layers", "n_experts", "rate_horizon")


def test_static_shape_must_match() -> None:
    with pytest.raises(ValueError, match="counts shape"):
        make_policy("static", placement=[], counts=[[1, 2]], n_layers=2, n_experts=2)
    with pytest.raises(ValueError, match="out of range"):
        make_policy("static", placement=[(0, 5)], counts=[[1, 2]])


def test_core_eviction_never_imports_torch() -> None:
    code = ("import sys, hybrimoe_kt.core.eviction, hybrimoe_kt.core.cache, hybrimoe_kt.core.admission; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
