"""Every registered prefetcher (``PREFETCHERS``) keeps the Prefetcher contract on one replayed pattern:
it proposes only non-resident experts of valid layers, each at most once, within the copy budget, and
``expected_uses`` is a non-negative number. Plus the hidden-state prefetcher's own rules."""

from __future__ import annotations

import numpy as np
import pytest

from hybrimoe_kt.core.prefetch import (PREFETCHERS, HiddenPrefetch, ImpactPrefetch, NextScorePrefetch,
                                       NoPrefetch, OraclePrefetch, RoutingPredictor)
from hybrimoe_kt.core.protocols import Clock
from tests.core.test_prefetch import XFER, View, routing

N_LAYERS, N_EXPERTS, TOP_K = 3, 8, 2
PATTERN = [[(l + s) % N_EXPERTS, (3 * l + s + 1) % N_EXPERTS] for s in range(6) for l in range(N_LAYERS)]


def build(name: str, clock: Clock):
    future = (lambda pos: routing(pos % N_LAYERS, PATTERN[pos]) if 0 <= pos < len(PATTERN) else None)
    return {"none": lambda: NoPrefetch(), "next-score": lambda: NextScorePrefetch(size=TOP_K),
            "impact": lambda: ImpactPrefetch(RoutingPredictor(N_LAYERS, N_EXPERTS, TOP_K), depth=2),
            "oracle": lambda: OraclePrefetch(future, clock, depth=2),
            "hidden": lambda: HiddenPrefetch()}[name]()


def test_the_contract_covers_every_registered_prefetcher() -> None:
    clock = Clock()
    assert {type(build(n, clock)) for n in PREFETCHERS} == set(PREFETCHERS.values())
    assert all(build(n, clock).name == n for n in PREFETCHERS)


@pytest.mark.parametrize("name", sorted(PREFETCHERS))
@pytest.mark.parametrize("budget", [0.5, 1.0, 3.0])
def test_prefetcher_contract(name: str, budget: float) -> None:
    clock = Clock()
    p = build(name, clock)
    view = View(n_layers=N_LAYERS, n_experts=N_EXPERTS, top_k=TOP_K, residents={0: {0}, 1: {1, 2}, 2: {5}},
                scores={(l, e): float((l * 7 + e) % 5) for l in range(N_LAYERS) for e in range(N_EXPERTS)})
    for pos, experts in enumerate(PATTERN):
        clock.now = pos
        layer = pos % N_LAYERS
        if isinstance(p, HiddenPrefetch) and layer + 1 < N_LAYERS:
            p.hint(layer + 1, PATTERN[pos + 1])  # a perfect predictor's hint
        p.observe(routing(layer, experts))
        out = p.propose(layer, view, budget_s=budget * XFER)
        assert len(out) <= int(budget), f"{name}: {len(out)} copies for a budget of {budget}"
        assert len(set(out)) == len(out)
        for l, e in out:
            assert 0 <= l < N_LAYERS and 0 <= e < N_EXPERTS and e not in view.resident(l)
            u = p.expected_uses((l, e))
            assert isinstance(u, float) and u >= 0.0


def test_hidden_proposes_the_next_layers_hint_in_order_skipping_residents() -> None:
    view = View(residents={1: {5}})
    p = HiddenPrefetch()
    assert p.propose(0, view, budget_s=10 * XFER) == []  # no hint, no proposal
    p.hint(1, [5, 3, -1, 7, 3, 0])
    assert p.hinted(1) == (5, 3, 7, 0)
    assert p.propose(0, view, budget_s=10 * XFER) == [(1, 3), (1, 7), (1, 0)]
    assert p.propose(0, view, budget_s=2.5 * XFER) == [(1, 3), (1, 7)]
    assert p.propose(0, view, budget_s=0.9 * XFER) == []
    assert p.propose(1, view, budget_s=10 * XFER) == []  # layer 2 has no hint
    p.hint(0, [1])
    assert p.propose(2, view, budget_s=10 * XFER) == []  # the last layer's next is not layer 0
    assert p.propose(0, view, budget_s=float("inf")) == [(1, 3), (1, 7), (1, 0)]


def test_hidden_expected_uses_is_the_measured_precision_of_past_hints() -> None:
    p = HiddenPrefetch(prior=0.5, prior_weight=2.0, decay=1.0)
    view = View(n_layers=3)
    assert p.precision == 0.5
    for _ in range(10):
        p.hint(1, [1, 2, 3, 4])
        p.observe(routing(1, [1, 2]))  # half of every hint right
    p.hint(1, [6, 7])
    p.propose(0, view, budget_s=10 * XFER)
    assert p.expected_uses((1, 6)) == pytest.approx(0.5)
    for _ in range(40):
        p.hint(2, [1, 2])
        p.observe(routing(2, [1, 2]))
    assert p.precision == pytest.approx((1 + 20 + 80) / (2 + 40 + 80))
    p.hint(1, [6])
    p.propose(0, view, budget_s=10 * XFER)
    assert p.expected_uses((1, 6)) == pytest.approx(p.precision) and p.expected_uses((1, 7)) == 0.0
    with pytest.raises(ValueError):
        HiddenPrefetch(prior=1.5)


def test_hidden_is_registered() -> None:
    assert PREFETCHERS["hidden"] is HiddenPrefetch
    np.testing.assert_equal(HiddenPrefetch().hinted(3), ())
