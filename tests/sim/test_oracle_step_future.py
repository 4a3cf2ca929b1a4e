"""The oracle bounds the step cadence too: its ``hybrimoe+future-hN`` variants run ``hybrimoe``'s own
design with an upkeep told the true future (``Belady.rate`` over ``[L, E]``), and a clairvoyant
step-cadence run of any threshold stays below the oracle."""

from __future__ import annotations

import numpy as np
import pytest

from hybrimoe_kt.core.eviction import Belady
from hybrimoe_kt.core.hardware import load_profile
from hybrimoe_kt.core.models import get_model
from hybrimoe_kt.core.protocols import Clock
from hybrimoe_kt.core.strategies import STRATEGIES, with_overrides
from hybrimoe_kt.sim.oracle import STEP_FUTURE, VARIANTS, variant_spec
from hybrimoe_kt.sim.runner import SimSetup, simulate
from hybrimoe_kt.traces.synthetic import synthetic_trace


def test_belady_rate_is_score_for_every_expert() -> None:
    rng = np.random.default_rng(0)
    n_l, n_e, h = 3, 5, 4
    uses = {(l, e): sorted(set(rng.integers(0, 60, size=8).tolist())) for l in range(n_l) for e in range(n_e)}
    clock = Clock()
    b = Belady(uses, clock, n_layers=n_l, n_experts=n_e, rate_horizon=h)
    for now in (0, 7, 7, 31, 2, 59):  # forward, repeated, backwards
        clock.now = now
        rate = b.rate
        assert rate.shape == (n_l, n_e)
        assert np.array_equal(b.score_array(), rate)
        for (l, e) in uses:
            assert rate[l, e] == pytest.approx(b.score((l, e)))
    b.on_step(object())  # the future is known: nothing to learn
    assert np.array_equal(b.rate, rate)


def test_step_cadence_belady_needs_the_future() -> None:
    with pytest.raises(ValueError, match="belady needs the future"):
        with_overrides(STRATEGIES["hybrimoe"], name="x", eviction="belady")
    spec = variant_spec(STRATEGIES["oracle"], "hybrimoe+future-h4")
    assert spec.cadence == "step" and spec.clairvoyant and spec.eviction == "belady"
    assert set(STEP_FUTURE) <= set(VARIANTS)


def test_oracle_bounds_a_clairvoyant_step_cadence() -> None:
    trace = synthetic_trace("deepseek-v2-lite", n_requests=2, prompt_len=16, decode_len=24, seed=3, n_layers=3)
    setup = SimSetup(trace, "synthetic seed 3", get_model("deepseek-v2-lite"), load_profile("rtx5090-ddr5"))
    told = [with_overrides(STRATEGIES["hybrimoe"], name=f"hybrimoe/future-t{t}", eviction="belady",
                           clairvoyant=True, reuse_half_life=4.0, admission_margin=t) for t in (0.0, 1.0, 4.0)]
    recs = simulate(setup, ["hybrimoe", *told, "oracle", "roofline"], [0.25], workers=1)  # checks bounds
    by = {r["strategy"]: r for r in recs}
    for s in told:  # charged hybrimoe's host time, yet the oracle (no host time) still bounds them
        assert by[s.name]["decode_tok_s"] <= by["oracle"]["decode_tok_s"] * (1 + 1e-9)
    # told the future, every swap that gains a hit in the next 4 tokens: nearly every decode expert hits
    assert by["hybrimoe/future-t0.0"]["decode_hit_rate"] > 0.9 > by["hybrimoe"]["decode_hit_rate"]
    # a threshold of 4 extra hits over a 4-token horizon can never be met: no swap, fewer hits than MRS
    assert by["hybrimoe/future-t4.0"]["decode_hit_rate"] < by["hybrimoe/future-t0.0"]["decode_hit_rate"]
