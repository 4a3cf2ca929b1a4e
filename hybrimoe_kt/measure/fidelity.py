"""Calibration fidelity: replay one routing through the runtime and through the simulator, compare times.

A stack of model-shaped MoE layers (the model's expert count and top-k, a reduced hidden/intermediate
size, random bf16 weights) runs the replayed steps in ``HybridMoE``; every MoE layer call's wall time
is measured. The simulator's engine replays the same steps with the same strategy, the same calibration
counts and a ``RooflineCost`` built from the profile for the SAME reduced shape and bf16 weights, and its
predicted time of each layer call is read off the engine itself (see ``_TimedCache``), so the prediction
is the simulator's timing, not a re-derivation of it.

Each layer of the stack also runs an attention-like part before its MoE block and shared experts next
to the routed ones (``runtime.dense_parts``, a DeepSeek-V2-shaped layer), and the runtime's own host
work; the measured time of a layer is the whole layer (``RunRecord.layer_s``). The simulator prices the
attention-like part and the shared experts with ``stack_cost`` and charges the profile's host time per
layer call (its ``host`` section, per strategy and phase). Dense layers and the LM head are not in the
stack: their terms are zero. With ``--no-dense`` the stack runs routed experts only and every non-MoE
term is zero (``moe_only_cost``): for ``stock`` the prediction is then ``cpu_call + sum over activated
experts of cpu_expert(tokens)`` plus the host time.

Without a GPU the runtime's GPU tier is the CPU stand-in (torch on the CPU), which the profile's GPU tier
does not describe: rows of strategies that put experts on that tier are informative only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from hybrimoe_kt.core.cache import ExpertCache
from hybrimoe_kt.core.cost import RooflineCost
from hybrimoe_kt.core.hardware import HardwareProfile
from hybrimoe_kt.core.host import ZERO_HOST, HostTime
from hybrimoe_kt.core.models import ModelPreset
from hybrimoe_kt.core.protocols import Clock
from hybrimoe_kt.core.strategies import StrategySpec, build_policies, get_strategy
from hybrimoe_kt.core.types import LayerRouting
from hybrimoe_kt.sim.engine import RunStats, Step, replay

log = logging.getLogger(__name__)

GOAL_REL = 0.20  # the CPU tier's per-layer error goal (+-20%)
CPU_ONLY = "stock"


def moe_only_cost(profile: HardwareProfile, model: ModelPreset) -> RooflineCost:
    """The profile's cost model for ``model`` (a reduced ModelPreset) with bf16 weights on both
    tiers and every non-MoE term zero: what one runtime layer call (routed experts only) executes."""
    cost = RooflineCost.build(profile, model, "bf16", "bf16")
    return replace(cost, attn_mem=0.0, attn_per_token=0.0, shared_mem=0.0, shared_per_token=0.0,
                   layer_fixed=0.0, extra_mem=0.0, extra_per_token=0.0, n_extra_layers=0)


def stack_cost(profile: HardwareProfile, model: ModelPreset, attn: Optional[tuple[float, float]] = None,
               shared: Optional[tuple[float, float]] = None) -> RooflineCost:
    """The cost model of a stack with attention-like parts and shared experts (``model`` says their
    sizes): bf16 on both tiers, no dense layers or LM head, no per-layer overhead beyond the parts.
    ``attn``/``shared``: (weight-read seconds, seconds per token) measured on the GPU tier in use (the
    CPU stand-in, which the profile does not describe); None takes them from the profile."""
    cost = replace(RooflineCost.build(profile, model, "bf16", "bf16"), layer_fixed=0.0, extra_mem=0.0,
                   extra_per_token=0.0, n_extra_layers=0)
    if attn is not None:
        cost = replace(cost, attn_mem=attn[0], attn_per_token=attn[1])
    if shared is not None:
        cost = replace(cost, shared_mem=shared[0], shared_per_token=shared[1])
    return cost


def fit_two_point(t1: float, tn: float, n: int) -> tuple[float, float]:
    """(weight-read s, s per token) of ``max(mem, n * per_token)`` through t(1) and t(n)."""
    if n <= 1:
        return t1, 0.0
    return t1, max(tn, 0.0) / n


class _TimedCache(ExpertCache):
    """An ExpertCache that records the simulated time at which each layer's plan is decided.

    The engine calls ``account`` (``account_landed`` for a step-cadence decode layer) once per layer
    from ``Controller.decide`` with the time the layer's MoE
    part starts, after the layer's non-MoE part (``cost.non_moe``) and its critical host time; a layer
    ends where the next layer's non-MoE part starts (the last one where its step ends), so the engine's
    own per-layer times follow from these times and its step times.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.decided_at: list[float] = []

    def account(self, layer: int, experts: Any, now: float) -> tuple[int, int, int]:
        self.decided_at.append(now)
        return super().account(layer, experts, now)

    def account_landed(self, layer: int, experts: Any, t: float, now: float) -> Any:
        self.decided_at.append(now)  # the step cadence's decode layers
        return super().account_landed(layer, experts, t, now)


@dataclass
class Prediction:
    """The simulator's time of every layer call (in replay order) and its run totals."""

    layer_s: list[float]
    stats: RunStats
    hit_rate: float


def simulate_layers(steps: Sequence[Step], cost: RooflineCost, spec: StrategySpec, counts: np.ndarray,
                    slots: int, top_k: int, host: Optional[Mapping[str, HostTime]] = None) -> Prediction:
    """Run the simulator's engine over ``steps`` (charging ``host`` time per layer call by phase, None:
    none); returns each layer call's simulated time, its non-MoE part and host time included."""
    n_layers, n_experts = counts.shape
    clock = Clock()
    pol = build_policies(spec, n_layers, n_experts, top_k, slots, clock,
                         counts=counts if counts.any() else None)  # as the runtime is given them
    cache = _TimedCache(n_layers, n_experts, slots if spec.uses_gpu_cache else 0, pol.eviction,
                        global_pool=spec.pool == "global")
    cache.place(pol.placement)
    st = replay(steps, cost, pol, cache, clock, top_k, host=host)
    starts = cache.decided_at
    n_calls = sum(len(s.routings) for s in steps)
    if len(starts) != n_calls or len(st.steps) != len(steps):
        raise RuntimeError(f"the engine decided {len(starts)} layers for {n_calls} layer calls")
    layer_s: list[float] = []
    step_end, j = 0.0, 0  # the run starts at 0 and steps follow each other
    for step, rec in zip(steps, st.steps):
        step_end += rec[3]
        crit = (host or {}).get("prefill" if step.is_prefill else "decode", ZERO_HOST).critical
        begin = [starts[j + i] - cost.non_moe(step.n_rows) - crit for i in range(len(step.routings))]
        layer_s += [b - a for a, b in zip(begin, begin[1:] + [step_end])]
        j += len(step.routings)
    return Prediction(layer_s, st, cache.counters.hit_rate)


def sim_steps(routings: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]], is_prefill: Sequence[bool],
              requests: Sequence[int]) -> list[Step]:
    """Simulator steps from per-step, per-layer ``(ids [N, K], weights [N, K])``, built exactly as the
    runtime builds its LayerRouting (prefill when the call has more than one row)."""
    out: list[Step] = []
    for layers, pre, req in zip(routings, is_prefill, requests):
        n = int(layers[0][0].shape[0])
        rs = tuple(LayerRouting.from_topk(l, ids, w, is_prefill=n > 1) for l, (ids, w) in enumerate(layers))
        out.append(Step(rs, n, bool(pre), int(req)))
    return out


def rel_errors(predicted: Sequence[float], measured: Sequence[float]) -> np.ndarray:
    """(predicted - measured) / measured, per entry."""
    p = np.asarray(predicted, dtype=np.float64)
    m = np.asarray(measured, dtype=np.float64)
    return (p - m) / m


def error_stats(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, Any]:
    """Median (signed), mean absolute, p90 absolute relative error, fraction within +-20%, signed p10 and
    p90 (p90: the error of the fastest tenth of the calls relative to their prediction), medians."""
    if len(measured) == 0:
        return {"n": 0, "median": None, "mean_abs": None, "p90_abs": None, "within_20pct": None,
                "p10": None, "p90": None, "measured_median_ms": None, "predicted_median_ms": None}
    e = rel_errors(predicted, measured)
    a = np.abs(e)
    return {"n": int(e.size), "median": round(float(np.median(e)), 4),
            "mean_abs": round(float(a.mean()), 4), "p90_abs": round(float(np.percentile(a, 90)), 4),
            "within_20pct": round(float((a <= GOAL_REL).mean()), 4),
            "p10": round(float(np.percentile(e, 10)), 4), "p90": round(float(np.percentile(e, 90)), 4),
            "measured_median_ms": round(1e3 * float(np.median(measured)), 4),
            "predicted_median_ms": round(1e3 * float(np.median(predicted)), 4)}


@dataclass
class LayerCalls:
    """One replayed run, flattened: one entry per layer call in replay order."""

    step: list[int] = field(default_factory=list)
    layer: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    prefill: list[bool] = field(default_factory=list)
    experts: list[int] = field(default_factory=list)   # activated routed experts

    @staticmethod
    def of(steps: Sequence[Step]) -> "LayerCalls":
        c = LayerCalls()
        for i, s in enumerate(steps):
            for r in s.routings:
                c.step.append(i)
                c.layer.append(r.layer)
                c.tokens.append(s.n_rows)
                c.prefill.append(s.is_prefill)
                c.experts.append(r.n_activated)
        return c


def compare(calls: LayerCalls, predicted: Sequence[float], measured: Sequence[float]) -> dict[str, Any]:
    """Per-layer and per-step error statistics, decode and prefill apart."""
    if not len(predicted) == len(measured) == len(calls.step):
        raise ValueError(f"{len(predicted)} predictions, {len(measured)} measurements, "
                         f"{len(calls.step)} layer calls")
    out: dict[str, Any] = {"per_layer": {}, "per_step": {}}
    for phase, want in (("decode", False), ("prefill", True)):
        idx = [i for i, p in enumerate(calls.prefill) if p == want]
        out["per_layer"][phase] = error_stats([predicted[i] for i in idx], [measured[i] for i in idx])
        step_p: dict[int, float] = {}
        step_m: dict[int, float] = {}
        for i in idx:
            s = calls.step[i]
            step_p[s] = step_p.get(s, 0.0) + predicted[i]
            step_m[s] = step_m.get(s, 0.0) + measured[i]
        out["per_step"][phase] = error_stats(list(step_p.values()), list(step_m.values()))
    return out


def finite_report(block: dict[str, Any]) -> bool:
    """Every number in a compare() block is finite (None only where a phase has no calls)."""
    for group in block.values():
        for stats in group.values():
            for v in stats.values():
                if isinstance(v, float) and not math.isfinite(v):
                    return False
    return True


def strategy_spec(name: str) -> StrategySpec:
    spec = get_strategy(name)
    if spec.clairvoyant:
        raise ValueError(f"strategy {name} needs the future and exists only in the simulator; choose "
                         f"from stock, static-frequency, lru-offload, hybrimoe-paper, hybrimoe")
    return spec


def goal_summary(stock: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Whether the CPU tier (stock) meets +-20%: the median per-layer error of decode and of prefill."""
    if stock is None:
        return {"applies_to": CPU_ONLY, "evaluated": False}
    res: dict[str, Any] = {"applies_to": f"{CPU_ONLY} (CPU tier only)", "evaluated": True,
                           "criterion": "|median per-layer relative error| <= 20% for decode and prefill"}
    for phase in ("decode", "prefill"):
        med = stock["per_layer"][phase]["median"]
        res[f"{phase}_met"] = None if med is None else abs(med) <= GOAL_REL
        res[f"{phase}_excess_over_goal"] = None if med is None else round(max(0.0, abs(med) - GOAL_REL), 4)
    return res
