"""The decode demand loads ablation (``StrategySpec.decode_demand``): simulator only, off in every preset."""

from __future__ import annotations

import dataclasses

import pytest

from hybrimoe_kt.core.hardware import load_profile
from hybrimoe_kt.core.models import get_model
from hybrimoe_kt.core.strategies import STRATEGIES, with_overrides
from hybrimoe_kt.sim.runner import SimSetup, simulate
from hybrimoe_kt.traces.synthetic import synthetic_trace

MODEL = "deepseek-v2-lite"


def setup(hw: str = "rtx5090-ddr5") -> SimSetup:
    trace = synthetic_trace(MODEL, n_requests=2, prompt_len=16, decode_len=24, n_layers=4)
    return SimSetup(trace, "small", get_model(MODEL), dataclasses.replace(load_profile(hw), gpu_mem_gib=0.0))


def test_no_registered_strategy_uses_decode_demand_loads() -> None:
    assert all(s.decode_demand == "off" for s in STRATEGIES.values())


@pytest.mark.parametrize("changes,msg", [(dict(decode_demand="yes"), "decode_demand must be"),
                                         (dict(decode_demand="all", cadence="layer"), "ablation of the step")])
def test_bad_decode_demand_is_refused(changes: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        with_overrides(STRATEGIES["hybrimoe"], name="x", **changes)


def test_runtime_refuses_decode_demand_loads() -> None:
    from hybrimoe_kt.runtime.device import Tier
    from hybrimoe_kt.runtime.moe import HybridMoE
    from tests.runtime.helpers import K, tiny_cost, tiny_store

    spec = with_overrides(STRATEGIES["hybrimoe"], name="hybrimoe/dd", decode_demand="contended")
    with pytest.raises(ValueError, match="simulator ablation"):
        HybridMoE(tiny_store(), Tier("cpu"), spec, 2, tiny_cost(), K, cpu_backend="torch")


@pytest.mark.parametrize("rule", ["scheduler", "contended", "all"])
def test_decode_demand_loads_are_copies_charged_like_any(rule: str) -> None:
    base = STRATEGIES["hybrimoe"]
    var = with_overrides(base, name=f"hybrimoe/{rule}", decode_demand=rule)
    recs = simulate(setup(), [base, var], [0.25, 0.5], workers=1)
    for r in (0.25, 0.5):
        a, b = ({x["strategy"]: x for x in recs if x["cache_ratio"] == r}[n] for n in (base.name, var.name))
        assert a["prefill_tok_s"] == pytest.approx(b["prefill_tok_s"])  # prefill is untouched
        if rule == "all":  # every miss is loaded: more bytes copied in decode, a higher hit rate
            assert b["decode_hit_rate"] > a["decode_hit_rate"]
            assert b["pcie_gb_per_decode_token"] > a["pcie_gb_per_decode_token"]
        assert b["decode_tok_s"] > 0
