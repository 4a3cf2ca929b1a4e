"""build_policies: a static placement needs calibration counts; cache strategies without them start empty."""

from __future__ import annotations

import numpy as np
import pytest

from hybrimoe_kt.core.protocols import Clock
from hybrimoe_kt.core.strategies import build_policies, get_strategy

L, E, K = 4, 8, 2


@pytest.mark.parametrize("counts", [None, np.zeros((L, E), dtype=np.int64)])
def test_static_frequency_without_counts_names_the_fix(counts: np.ndarray | None) -> None:
    with pytest.raises(ValueError) as err:
        build_policies(get_strategy("static-frequency"), L, E, K, 2 * L, Clock(), counts=counts)
    msg = str(err.value)
    assert "static-frequency" in msg and "placement_counts" in msg and "hybrimoe-kt record" in msg


def test_static_frequency_with_counts_places_the_most_frequent() -> None:
    counts = np.zeros((L, E), dtype=np.int64)
    counts[3, 5], counts[2, 1], counts[0, 0] = 9, 7, 1
    pol = build_policies(get_strategy("static-frequency"), L, E, K, 2, Clock(), counts=counts)
    assert pol.placement == ((2, 1), (3, 5))


def test_static_frequency_without_slots_needs_no_counts() -> None:
    assert build_policies(get_strategy("static-frequency"), L, E, K, 0, Clock()).placement == ()


@pytest.mark.parametrize("name", ["lru-offload", "hybrimoe-paper", "hybrimoe"])
def test_cache_strategies_without_counts_start_empty(name: str) -> None:
    spec = get_strategy(name)
    assert spec.placement == "frequency" and spec.pool == "layer"
    assert build_policies(spec, L, E, K, 3, Clock()).placement == ()
    counts = np.arange(L * E, dtype=np.int64).reshape(L, E)
    warm = build_policies(spec, L, E, K, 3, Clock(), counts=counts).placement
    assert warm == tuple((layer, e) for layer in range(L) for e in (5, 6, 7))  # per-layer top 3
