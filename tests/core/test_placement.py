"""Static placement strategies (kt-kernel uniform / frequency / front-loading, per-layer quotas)."""

from __future__ import annotations

import numpy as np
import pytest

from hybrimoe_kt.core.eviction import (
    place_front_loading,
    place_frequency,
    place_per_layer_quota,
    place_uniform,
)

COUNTS = [[1, 5, 5, 0],
          [5, 2, 0, 9],
          [0, 0, 3, 3]]


def test_frequency_is_the_global_top_n_with_ties_by_id() -> None:
    # 9 (1,3); then three 5s: (0,1), (0,2), (1,0) in id order; then 3s (2,2), (2,3).
    assert place_frequency(COUNTS, 3) == [(0, 1), (0, 2), (1, 3)]
    assert place_frequency(COUNTS, 4) == [(0, 1), (0, 2), (1, 0), (1, 3)]
    assert place_frequency(COUNTS, 5) == [(0, 1), (0, 2), (1, 0), (1, 3), (2, 2)]
    assert place_frequency(COUNTS, 0) == []
    assert len(place_frequency(COUNTS, 12)) == 12


def test_uniform_spreads_with_the_remainder_first() -> None:
    # 5 slots over 3 layers: 2, 2, 1.
    assert place_uniform(3, 4, 5) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    assert place_uniform(3, 4, 5, counts=COUNTS) == [(0, 1), (0, 2), (1, 0), (1, 3), (2, 2)]
    with pytest.raises(ValueError, match="counts shape"):
        place_uniform(2, 4, 3, counts=COUNTS)


def test_front_loading_fills_the_first_layers() -> None:
    assert place_front_loading(COUNTS, 6) == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 3)]
    assert place_front_loading(COUNTS, 2) == [(0, 1), (0, 2)]


def test_per_layer_quota() -> None:
    assert place_per_layer_quota(COUNTS, 1) == [(0, 1), (1, 3), (2, 2)]
    assert place_per_layer_quota(COUNTS, [0, 2, 1]) == [(1, 0), (1, 3), (2, 2)]
    with pytest.raises(ValueError, match="quota"):
        place_per_layer_quota(COUNTS, [1, 1])
    with pytest.raises(ValueError, match="quota"):
        place_per_layer_quota(COUNTS, 5)


@pytest.mark.parametrize("bad", [[1, 2], [[1, -1]], [[np.nan, 1]], np.zeros((0, 3))])
def test_bad_counts(bad) -> None:
    with pytest.raises(ValueError, match="counts"):
        place_frequency(bad, 1)


@pytest.mark.parametrize("n", [-1, 13, 2.5])
def test_bad_slot_counts(n) -> None:
    with pytest.raises(ValueError, match="n_slots"):
        place_frequency(COUNTS, n)
