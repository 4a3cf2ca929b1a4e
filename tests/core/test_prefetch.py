"""Prefetchers and the routing predictor, on a hand-made cache view."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection, Optional

import numpy as np
import pytest

from hybrimoe_kt.core.cost import ReleasedCost
from hybrimoe_kt.core.prefetch import (ImpactPrefetch, NextScorePrefetch, NoPrefetch, OraclePrefetch,
                                       RoutingPredictor)
from hybrimoe_kt.core.protocols import Clock, Scheduler
from hybrimoe_kt.core.schedulers import make_scheduler
from hybrimoe_kt.core.types import ExpertId, LayerRouting

# A copy (2.0) costs more than serving a miss on the CPU (0.79 + 1.0), so a resident expert shortens a
# decode layer: with the released constants (0.418 per copy) a load hides behind the GPU work of a hit.
COST = ReleasedCost(t_move=2.0)
XFER = COST.transfer()


@dataclass
class View:
    """A CacheView with fixed residency and scores."""

    n_layers: int = 3
    n_experts: int = 8
    top_k: int = 2
    cost: ReleasedCost = COST
    scheduler: Scheduler = field(default_factory=lambda: make_scheduler("balanced"))
    residents: dict[int, set[int]] = field(default_factory=dict)
    scores: dict[ExpertId, float] = field(default_factory=dict)

    def resident(self, layer: int) -> Collection[int]:
        return self.residents.get(layer, set())

    def score(self, eid: ExpertId) -> float:
        return self.scores.get(eid, 0.0)


def routing(layer: int, experts: list[int]) -> LayerRouting:
    """A decode routing: one row choosing ``experts``."""
    return LayerRouting.from_topk(layer, np.array([experts]))


# --- none and next-score ---------------------------------------------------------------------------

def test_no_prefetch_proposes_nothing() -> None:
    p = NoPrefetch()
    p.observe(routing(0, [1, 2]))
    assert p.propose(0, View(), budget_s=100.0) == []


def test_next_score_proposes_top_scored_non_resident_of_next_layer() -> None:
    view = View(residents={1: {5}},
                scores={(1, 5): 9.0, (1, 2): 8.0, (1, 7): 7.0, (1, 0): 6.0, (0, 3): 99.0, (2, 4): 99.0})
    p = NextScorePrefetch(size=4)
    # candidates: the top 4 of layer 1 by score = 5, 2, 7, 0; 5 is resident
    assert p.propose(0, view, budget_s=10 * XFER) == [(1, 2), (1, 7), (1, 0)]
    # the budget caps the count at int(budget / transfer)
    assert p.propose(0, view, budget_s=2.5 * XFER) == [(1, 2), (1, 7)]
    assert p.propose(0, view, budget_s=1.0 * XFER) == [(1, 2)]
    assert p.propose(0, view, budget_s=0.99 * XFER) == []
    # after the last layer it looks at layer 0
    assert NextScorePrefetch(size=1).propose(2, view, budget_s=10 * XFER) == [(0, 3)]
    with pytest.raises(ValueError):
        NextScorePrefetch(size=-1)


# --- oracle ----------------------------------------------------------------------------------------

def test_oracle_proposes_next_layers_non_resident_in_order_of_use() -> None:
    n_layers = 3
    future_steps = {  # position = forward * n_layers + layer
        0: routing(0, [1, 2]), 1: routing(1, [3, 4]), 2: routing(2, [5, 6]),
        3: routing(0, [1, 7]), 4: routing(1, [4, 6]),
    }

    def future(pos: int) -> Optional[LayerRouting]:
        return future_steps.get(pos)

    clock = Clock(0)
    view = View(n_layers=n_layers, residents={1: {4}, 2: {6}, 0: {1}})
    p = OraclePrefetch(future, clock, depth=4)
    # from position 0: layer 1 -> 3 (4 is resident), layer 2 -> 5 (6 resident), layer 0 -> 7, layer 1 -> 6
    assert p.propose(0, view, budget_s=10 * XFER) == [(1, 3), (2, 5), (0, 7), (1, 6)]
    assert p.propose(0, view, budget_s=2.2 * XFER) == [(1, 3), (2, 5)]
    assert p.propose(0, view, budget_s=0.5 * XFER) == []
    # depth limits the lookahead, and the end of the trace ends it
    assert OraclePrefetch(future, clock, depth=1).propose(0, view, 10 * XFER) == [(1, 3)]
    clock.now = 3
    assert p.propose(0, view, budget_s=10 * XFER) == [(1, 6)]
    # an expert used twice ahead is proposed once
    clock.now = 0
    twice = {1: routing(1, [3]), 2: routing(2, [5]), 3: routing(0, [2]), 4: routing(1, [3, 0])}
    got = OraclePrefetch(twice.get, clock, depth=4).propose(0, View(n_layers=3), 10 * XFER)
    assert got == [(1, 3), (2, 5), (0, 2), (1, 0)]


# --- impact ----------------------------------------------------------------------------------------

def trained_predictor(n_forwards: int = 30) -> RoutingPredictor:
    """Layer 0 always routes {1, 2}, layer 1 {3, 4}, layer 2 {5, 6}; the last layer seen is layer 0."""
    pred = RoutingPredictor(n_layers=3, n_experts=8, top_k=2)
    pattern = {0: [1, 2], 1: [3, 4], 2: [5, 6]}
    for _ in range(n_forwards):
        for layer in range(3):
            pred.observe(routing(layer, pattern[layer]))
    pred.observe(routing(0, pattern[0]))
    return pred


def test_impact_proposes_the_learned_pattern_of_the_next_layer() -> None:
    pred = trained_predictor()
    p = ImpactPrefetch(pred, depth=1)
    got = p.propose(0, View(), budget_s=10 * XFER)
    assert sorted(got) == [(1, 3), (1, 4)]


def test_impact_never_proposes_resident_experts() -> None:
    p = ImpactPrefetch(trained_predictor(), depth=2)
    view = View(residents={1: {3}, 2: {5, 6}})
    got = p.propose(0, view, budget_s=10 * XFER)
    assert got == [(1, 4)]
    for layer, e in got:
        assert e not in view.resident(layer)


def test_impact_respects_the_budget() -> None:
    p = ImpactPrefetch(trained_predictor(), depth=2)
    assert p.propose(0, View(), budget_s=0.99 * XFER) == []
    assert p.propose(0, View(), budget_s=0.0) == []
    one = p.propose(0, View(), budget_s=1.5 * XFER)
    assert len(one) == 1 and one[0][0] == 1  # the nearer layer is worth more (discounted further away)
    assert len(p.propose(0, View(), budget_s=3.0 * XFER + 1e-9)) == 3


def test_impact_without_observations_proposes_nothing() -> None:
    p = ImpactPrefetch(RoutingPredictor(3, 8, 2), depth=2)
    assert p.propose(0, View(), budget_s=10 * XFER) == []
    with pytest.raises(ValueError):
        ImpactPrefetch(RoutingPredictor(3, 8, 2), depth=0)


# --- the predictor ---------------------------------------------------------------------------------

def test_predictor_learns_an_inter_layer_transition() -> None:
    pred = RoutingPredictor(n_layers=2, n_experts=8, top_k=1)
    for _ in range(20):  # 1 -> 3 and 2 -> 5, alternating forwards
        pred.observe(routing(0, [1]))
        pred.observe(routing(1, [3]))
        pred.observe(routing(0, [2]))
        pred.observe(routing(1, [5]))
    pred.observe(routing(0, [1]))
    p = pred.predict(1)
    assert p.shape == (8,)
    assert int(np.argmax(p)) == 3  # the transition beats the reuse of the last layer-1 expert (5)
    assert p[3] > p[5] > 0
    assert p.sum() == pytest.approx(1.0)  # about top_k
    # the affinity signal alone puts all the mass on the learned successor
    only = RoutingPredictor(n_layers=2, n_experts=8, top_k=1, weights=(1.0, 0.0, 0.0))
    for _ in range(20):
        for l0, l1 in ((1, 3), (2, 5)):
            only.observe(routing(0, [l0]))
            only.observe(routing(1, [l1]))
    only.observe(routing(0, [2]))
    q = only.predict(1)
    assert int(np.argmax(q)) == 5 and q[5] == pytest.approx(1.0) and q[3] == 0.0


@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.5, 0.5, 0.5, 0.5), (1.0, -0.1, 0.1), (0.0, 0.0, 0.0)])
def test_predictor_validates_weights(weights: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="weights"):
        RoutingPredictor(2, 8, 1, weights=weights)
