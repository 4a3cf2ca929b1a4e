"""The runtime and the simulator feed the shared Controller the same inputs and get the same Plans.

One routing sequence (a DeepSeek-V2-Lite-shaped stack: 64 experts, top-6, shared experts, attention and
host time in the cost model; small hidden sizes) is replayed by the simulator's engine; the runtime then
runs the same steps on the CPU stand-in with an injected timer that follows the simulator's timeline:
the layer's attention starts where the engine's non-MoE part starts (``begin_forward`` on a forward's
first layer), its MoE part starts at the engine's ``now`` and its shared experts end the layer at the
engine's layer end. Every layer call must then give the same ``decide`` inputs, Plans (GPU and CPU
experts, demand loads, evictions), background copies and reported layer times.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from hybrimoe_kt.core.cache import ExpertCache
from hybrimoe_kt.core.controller import Controller
from hybrimoe_kt.core.cost import RooflineCost
from hybrimoe_kt.core.hardware import load_profile
from hybrimoe_kt.core.host import HostTime
from hybrimoe_kt.core.protocols import Clock
from hybrimoe_kt.core.strategies import StrategySpec, build_policies, get_strategy, slots_for, with_overrides
from hybrimoe_kt.measure.fidelity import sim_steps
from hybrimoe_kt.runtime.device import Tier
from hybrimoe_kt.runtime.harness import StackShape, random_store
from hybrimoe_kt.runtime.moe import HybridMoE
from hybrimoe_kt.runtime.replay import RoutingReplay
from hybrimoe_kt.sim import engine
from hybrimoe_kt.traces.synthetic import synthetic_trace

SHAPE = StackShape("deepseek-v2-lite", n_layers=3, hidden=64, inter=32)
HOST = {"decode": HostTime(30e-6, 8e-6), "prefill": HostTime(60e-6, 12e-6)}
RATIO = 0.25


class ManualTimer:
    """A clock the test sets: ``timer()`` returns ``t``."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _record(ctl: Controller, log: list[dict[str, Any]], upkeeps: list[dict[str, Any]],
            moe: HybridMoE | None = None) -> None:
    """Wrap ``ctl`` (and the runtime's per-call accounting) so that every layer call's decision inputs
    and outputs land in ``log`` (one entry per call, appended at ``finish``) and every upkeep in
    ``upkeeps``. Layers that look residency up (``StrategySpec.decode_lookup``) call no ``decide`` in the
    runtime: their entry holds the tiers' expert counts only."""
    decide, background, finish, upkeep = ctl.decide, ctl.background, ctl.finish, ctl.upkeep
    cur: dict[str, Any] = {}

    def rec_decide(routing: Any, now: float, gpu_free: float = 0.0, is_prefill: bool = False) -> Any:
        d = decide(routing, now, gpu_free, is_prefill)
        cur.update({"now": now, "gpu_free": gpu_free, "prefill": is_prefill, "plan": d.plan,
                    "streamed": d.streamed, "staged": d.staged, "stream": d.stream,
                    "full_layer": d.full_layer, "replacement": d.replacement,
                    "n_gpu": len(d.plan.gpu), "n_cpu": len(d.plan.cpu)})
        return d

    def rec_background() -> Any:
        bg = background()
        cur["background"] = bg
        return bg

    def rec_finish(layer_time: float) -> None:
        cur["layer_time"] = layer_time
        log.append(dict(cur))
        cur.clear()
        finish(layer_time)

    def rec_upkeep(last: Any, now: float, plan: bool = True) -> Any:
        up = upkeep(last, now, plan)
        upkeeps.append({"now": now, "plan": plan, "last": None if last is None else last.ran.copy(),
                        "up": up, "visible": ctl.visible().copy()})
        return up

    ctl.decide, ctl.background, ctl.finish, ctl.upkeep = rec_decide, rec_background, rec_finish, rec_upkeep  # type: ignore
    if moe is not None:
        account = moe._account

        def rec_account(t_start: float, t_plan: float, t_dispatch: float, t_background: float, n_gpu: int,
                        n_cpu: int, n_streamed: int) -> None:
            cur.update({"n_gpu": n_gpu, "n_cpu": n_cpu})
            account(t_start, t_plan, t_dispatch, t_background, n_gpu, n_cpu, n_streamed)

        moe._account = rec_account  # type: ignore[method-assign]


@pytest.fixture(scope="module")
def setup() -> dict[str, Any]:
    kw = dict(n_requests=2, prompt_len=8, decode_len=8, n_layers=SHAPE.n_layers)
    trace = synthetic_trace(SHAPE.model, seed=3, **kw)
    counts = synthetic_trace(SHAPE.model, seed=1003, **kw).expert_counts()
    rp = RoutingReplay(trace, SHAPE.preset(), prefill_chunk=4)
    steps = rp.steps()
    routes = [[tuple(t.numpy() for t in rp.routing(s, l)) for l in range(SHAPE.n_layers)] for s in steps]
    ssteps = sim_steps(routes, [s.is_prefill for s in steps], [s.forward for s in steps])
    cost = RooflineCost.build(load_profile("rtx4090-ddr5"), SHAPE.preset(), "bf16", "bf16")
    assert cost.shared(1) > 0 and cost.non_moe(1) > 0  # the stack has shared experts and attention
    return {"rp": rp, "steps": steps, "ssteps": ssteps, "counts": counts, "cost": cost,
            "store": random_store(SHAPE, seed=0)}


STREAM = "hybrimoe+stream"  # hybrimoe under a cost model where its prefill streams (core.stream)
LAYERWISE = "kt-dynamic-update@4"  # kt-dynamic-update with a threshold the 4-row prefill chunks reach


def _spec(name: str) -> StrategySpec:
    if name == LAYERWISE:
        return with_overrides(get_strategy("kt-dynamic-update"), layerwise_threshold=4)
    if name == STREAM:  # the 4-row prefill chunks are below hybrimoe's stream_min_rows: price them all
        return with_overrides(get_strategy("hybrimoe"), stream_min_rows=0)
    return get_strategy(name)


def _strategy_cost(s: dict[str, Any], name: str) -> tuple[str, RooflineCost]:
    """The strategy and cost model of a case: ``STREAM`` makes the CPU slow and copies cheap and off
    the CPU's memory bandwidth, so staging the next layer pays in prefill."""
    if name != STREAM:
        return name, s["cost"]
    c: RooflineCost = s["cost"]
    return STREAM, replace(c, cpu_fixed=50e-6, gpu_fixed=1e-6, transfer_s=2e-6, copy_dram_share=0.0)


def simulate(s: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch,
             upkeeps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    name, cost = _strategy_cost(s, name)
    spec = _spec(name)
    slots = slots_for(spec, SHAPE.n_layers, SHAPE.n_experts, RATIO)
    clock = Clock()
    pol = build_policies(spec, SHAPE.n_layers, SHAPE.n_experts, SHAPE.top_k, slots, clock, counts=s["counts"])
    cache = ExpertCache(SHAPE.n_layers, SHAPE.n_experts, slots if spec.uses_gpu_cache else 0, pol.eviction,
                        global_pool=spec.pool == "global")
    cache.place(pol.placement)
    log: list[dict[str, Any]] = []

    class Recording(Controller):
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **k)
            _record(self, log, upkeeps)

    monkeypatch.setattr(engine, "Controller", Recording)
    engine.replay(s["ssteps"], cost, pol, cache, clock, SHAPE.top_k, host=HOST)
    return log


def run_runtime(s: dict[str, Any], name: str, sim: list[dict[str, Any]],
                upkeeps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    name, cost = _strategy_cost(s, name)
    spec = _spec(name)
    timer = ManualTimer()
    moe = HybridMoE(s["store"], Tier("cpu"), spec, slots_for(spec, SHAPE.n_layers, SHAPE.n_experts, RATIO),
                    cost, SHAPE.top_k, counts=s["counts"], cpu_backend="torch", cpu_threads=1, max_len=8,
                    timer=timer)
    log: list[dict[str, Any]] = []
    _record(moe.controller, log, upkeeps, moe)
    gen = torch.Generator().manual_seed(0)
    w_shared = torch.randn(SHAPE.hidden, SHAPE.hidden, generator=gen) * SHAPE.hidden ** -0.5
    calls = iter(sim)
    for step in s["steps"]:
        x = (torch.randn(step.n_tokens, SHAPE.hidden, generator=gen) * 0.5).to(torch.bfloat16)
        ht = HOST["prefill" if step.is_prefill else "decode"]
        for layer in range(SHAPE.n_layers):
            c = next(calls)
            attn_start = c["now"] - ht.critical - cost.non_moe(step.n_tokens)
            layer_end = attn_start + c["layer_time"]

            def shared(h: torch.Tensor, end: float = layer_end) -> torch.Tensor:
                timer.t = end  # the shared experts run last on the GPU tier here: the layer ends with them
                return (h.float() @ w_shared).to(h.dtype)

            if layer == 0:
                timer.t = attn_start
                moe.begin_forward(is_prefill=step.is_prefill)
            timer.t = c["now"]
            ids, w = s["rp"].routing(step, layer)
            with torch.no_grad():
                y = moe.forward(layer, x, ids, w, shared=shared)
            assert torch.isfinite(y.float()).all()
            x = (x.float() + y.float()).to(torch.bfloat16)
    return log


@pytest.mark.parametrize("name", ["stock", "static-frequency", "kt-frequency", "kt-dynamic-update", LAYERWISE,
                                  "lru-offload", "hybrimoe-paper", "hybrimoe-layer", "hybrimoe", STREAM])
def test_runtime_and_simulator_make_the_same_plans(setup: dict[str, Any], name: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    sim_up: list[dict[str, Any]] = []
    rt_up: list[dict[str, Any]] = []
    sim = simulate(setup, name, monkeypatch, sim_up)
    rt = run_runtime(setup, name, sim, rt_up)
    assert len(rt) == len(sim) == len(setup["steps"]) * SHAPE.n_layers
    name, n_cost = _strategy_cost(setup, name)
    spec = _spec(name)
    lookup = spec.decode_lookup
    for i, (a, b) in enumerate(zip(rt, sim)):
        where = f"{name}, layer call {i} (layer {b['plan'].layer})"
        assert (a["n_gpu"], a["n_cpu"]) == (b["n_gpu"], b["n_cpu"]), where
        assert a["layer_time"] == pytest.approx(b["layer_time"], rel=1e-9, abs=1e-15), where
        assert b["layer_time"] > n_cost.non_moe(1), where     # the whole layer, attention included
        if lookup and not b["prefill"]:
            assert "plan" not in a, where                      # decode looked residency up: no decide
            assert not b["plan"].loads and not b["plan"].evictions, where
            continue
        assert a["now"] == b["now"], where
        assert a["gpu_free"] == b["gpu_free"] and a["gpu_free"] > 0, where  # predicted shared time
        assert a["prefill"] == b["prefill"], where
        assert a["plan"] == b["plan"], where                  # gpu, cpu, loads, evictions, prediction
        assert a["streamed"] == b["streamed"], where
        assert a["staged"] == b["staged"] and a["stream"] == b["stream"], where  # layer streaming
        assert a["full_layer"] == b["full_layer"] and a["replacement"] == b["replacement"], where
        assert a["background"] == b["background"], where      # copies, their evictions and landings
    # the step upkeeps: same inputs (time, recorded routing), same plans, same published residency
    assert len(rt_up) == len(sim_up) == (len(setup["steps"]) if spec.cadence == "step" else 0)
    for j, (a, b) in enumerate(zip(rt_up, sim_up)):
        assert a["now"] == pytest.approx(b["now"], rel=1e-12) and a["plan"] == b["plan"], j
        assert (a["last"] is None) == (b["last"] is None), j
        if a["last"] is not None:
            assert np.array_equal(a["last"], b["last"]), j
        # swaps exactly; landing times up to the float noise of ``now`` (approx above)
        assert (a["up"].evictions, a["up"].copies) == (b["up"].evictions, b["up"].copies), j
        assert a["up"].landing == pytest.approx(b["up"].landing, rel=1e-12), j
        assert np.array_equal(a["visible"], b["visible"]), j
    if name != "stock":
        assert sum(c["n_gpu"] for c in sim) > 0, f"{name} never used the GPU tier"
    if name in ("lru-offload", "hybrimoe-paper", "hybrimoe-layer"):
        assert sum(len(c["plan"].loads) + len(c["background"].copies) for c in sim) > 0
    if spec.name == "hybrimoe":  # also the streaming case
        assert sum(len(u["up"].copies) for u in sim_up) > 0, "the upkeep never swapped an expert in"
    if name == LAYERWISE:  # layer-wise prefill calls ran, copied whole layers and re-placed experts
        assert any(c.get("full_layer") for c in sim) and any(c.get("replacement") for c in sim)
        assert all(c["n_cpu"] == 0 for c in rt if c.get("full_layer"))
    staged = sum(len(c.get("staged", ())) for c in sim)
    if n_cost is not setup["cost"]:  # the streaming case: layers read staged experts
        assert staged > 0 and any(c.get("stream") is not None for c in sim)


def test_first_layer_without_begin_forward_reports_its_moe_part_only(setup: dict[str, Any]) -> None:
    timer = ManualTimer()
    moe = HybridMoE(setup["store"], Tier("cpu"), "stock", 0, setup["cost"], SHAPE.top_k,
                    cpu_backend="torch", cpu_threads=1, max_len=8, timer=timer)
    log: list[dict[str, Any]] = []
    _record(moe.controller, log, [], moe)
    step = next(s for s in setup["steps"] if s.is_prefill)  # goes through decide (stock decode looks up)
    x = torch.zeros(step.n_tokens, SHAPE.hidden, dtype=torch.bfloat16)
    for fwd in range(2):
        for layer in range(SHAPE.n_layers):
            timer.t += 1.0          # non-MoE part: one second

            def advance(h: torch.Tensor) -> torch.Tensor:
                timer.t += 0.25     # MoE part: a quarter second
                return torch.zeros_like(h)

            ids, w = setup["rp"].routing(step, layer)
            moe.forward(layer, x, ids, w, shared=advance)
    times = [c["layer_time"] for c in log]
    assert times == [0.25, 1.25, 1.25, 0.25, 1.25, 1.25]
    assert moe.controller.clock.now == 1 * SHAPE.n_layers + SHAPE.n_layers - 1
    assert np.isclose(log[0]["gpu_free"], setup["cost"].shared(step.n_tokens))
