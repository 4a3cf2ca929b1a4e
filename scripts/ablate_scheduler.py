"""ABLATION: the ``greedy`` 0-1 assignment scheduler in place of ``balanced``, SIMULATED with host time charged.

Variants ``hybrimoe/greedy`` and ``hybrimoe-layer/greedy`` are the StrategySpecs ``hybrimoe`` (step cadence:
a decode layer only looks residency up, the scheduler splits prefill layers) and ``hybrimoe-layer`` (the
scheduler also decides every decode layer's demand loads) with ``scheduler="greedy"``. Reported: prefill
and decode tok/s of each variant over its base, per cell, their geometric means, the worst and best cells.

Host time (never ``--host-cost zero``): a variant pays its base's host time from the profile, plus what
greedy's decisions cost more than balanced's. That extra is measured on this machine on the scheduler
calls the simulator makes: one run of the base strategy at 50% cache per trace, hardware and seed records
every ``Scheduler.plan`` call and how many layer calls each phase has; a sample of the calls is replayed
through both schedulers (interleaved, both orders, each call's fastest of 2 x ``--repeats`` passes); the mean difference per
call times the calls per layer call, scaled by the profile's ``host.scale`` (as the profiles scale their
own measurement), is added to the phase's critical host time when positive. Calls made while deciding
background copies count as critical (charges greedy more, never less). ``BASE/greedy@base-host`` runs the
same splits charged only the base's host time: a bound that isolates the quality of greedy's splits.

Grid: the goal grid of ``scripts/policy_goals.py`` (real Mixtral trace, synthetic DeepSeek-V2-Lite and
Qwen3-30B-A3B with seed 0; rtx4090-ddr5 and rtx5090-ddr5; 25/50/75% cache) and the tuning data (the
synthetic traces with seed 1, as ``scripts/ablate_policy.py``). Nothing here was chosen on either: greedy's
constants (``ROUNDS``, ``TOP``) were set on random Dirichlet routings before any trace was run. Also
times one ``plan`` call on decode-sized (top-6 of 64, 1 token) and prefill-sized (512 tokens, top-6 of 64)
random routings.

    python scripts/ablate_scheduler.py [--out results/ablation-scheduler-greedy.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from hybrimoe_kt.core.controller import Controller
from hybrimoe_kt.core.cost import RooflineCost
from hybrimoe_kt.core.hardware import load_profile
from hybrimoe_kt.core.host import HostTime
from hybrimoe_kt.core.models import get_model
from hybrimoe_kt.core.protocols import EMPTY_READY
from hybrimoe_kt.core.schedulers import BalancedScheduler, GreedyScheduler
from hybrimoe_kt.core.strategies import STRATEGIES, StrategySpec, with_overrides
from hybrimoe_kt.core.types import LayerRouting
from hybrimoe_kt.measure.provenance import provenance
from hybrimoe_kt.sim.defaults import infer_model
from hybrimoe_kt.sim.runner import SimSetup, simulate
from hybrimoe_kt.traces.spec import parse_trace_spec


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


pg = _script("policy_goals")      # the goal grid: traces, fitting ratios, geomean
bd = _script("bench_decision")    # interleaved per-call timing

BASES = ("hybrimoe", "hybrimoe-layer")
SUFFIX = "/greedy"
BASE_HOST = "/greedy@base-host"  # greedy's splits, charged only the base's host time (decision free)
KINDS = {"charged": SUFFIX, "base_host": BASE_HOST}
PHASES = ("prefill", "decode")


def variant(base: str, suffix: str = SUFFIX) -> StrategySpec:
    s = STRATEGIES[base]
    return with_overrides(s, name=base + suffix, scheduler="greedy",
                          description=f"ABLATION: {s.description}; greedy 0-1 assignment scheduler")


@dataclass(frozen=True)
class _Setup(SimSetup):
    """Charges a ``/greedy`` variant its base's host time plus ``extra_us[base][phase]`` critical."""

    extra_us: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def host_times(self, spec: StrategySpec) -> Optional[Mapping[str, HostTime]]:
        ht = super().host_times(spec)
        if ht is None or not spec.name.endswith(SUFFIX):
            return ht
        extra = self.extra_us.get(spec.name[:-len(SUFFIX)], {})
        return {p: replace(t, critical=t.critical + extra.get(p, 0.0) * 1e-6) for p, t in ht.items()}


def record_calls(setup: SimSetup, base: str, ratio: float) -> tuple[dict, dict]:
    """Every ``plan`` call of one in-process run of ``base`` (balanced), by phase; layer calls by phase."""
    calls: dict[str, list] = {p: [] for p in PHASES}
    layers = {p: 0 for p in PHASES}
    phase = ["prefill"]
    plan0, decide0 = BalancedScheduler.plan, Controller.decide

    def plan(self, routing, resident, cost, ready=EMPTY_READY, copy_free=0.0, gpu_free=0.0):
        calls[phase[0]].append((routing, frozenset(resident), cost, dict(ready), copy_free, gpu_free))
        return plan0(self, routing, resident, cost, ready, copy_free, gpu_free)

    def decide(self, routing, now, gpu_free=0.0, is_prefill=False):
        phase[0] = "prefill" if is_prefill else "decode"
        layers[phase[0]] += 1
        return decide0(self, routing, now, gpu_free, is_prefill)

    BalancedScheduler.plan, Controller.decide = plan, decide  # type: ignore[method-assign]
    try:
        simulate(setup, [STRATEGIES[base]], [ratio], provenance=None, workers=1)
    finally:
        BalancedScheduler.plan, Controller.decide = plan0, decide0  # type: ignore[method-assign]
    return calls, layers


def time_plans(calls: list, sample: int, repeats: int, seed: int) -> dict[str, float]:
    """Mean over (a seeded sample of) ``calls`` of each scheduler's per-call median time, in µs."""
    if not calls:
        return {"balanced_us": 0.0, "greedy_us": 0.0, "n": 0, "split_greedy_better_share": 0.0,
                "split_makespan_greedy_over_balanced_min": 1.0}
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(calls), size=min(sample, len(calls)), replace=False)
    picked = [calls[i] for i in idx]
    b, g = BalancedScheduler(), GreedyScheduler()
    fns = {"balanced": lambda i: b.plan(*picked[i]), "greedy": lambda i: g.plan(*picked[i])}
    t1 = bd.time_calls(fns, len(picked), repeats)  # both orders within a pass: neither always goes first
    t2 = bd.time_calls(dict(reversed(list(fns.items()))), len(picked), repeats)
    ms = np.array([g.plan(*c).makespan_s / b.plan(*c).makespan_s for c in picked if b.plan(*c).makespan_s > 0])
    return {**{f"{k}_us": round(per_call(t1[k] + t2[k], 2 * repeats), 2) for k in fns}, "n": len(picked),
            "split_greedy_better_share": round(float((ms < 1).mean()), 4) if ms.size else 0.0,
            "split_makespan_greedy_over_balanced_min": round(float(ms.min()), 5) if ms.size else 1.0}


def per_call(ns: list[int], passes: int) -> float:
    """Mean over the calls of each call's fastest pass, µs: the machine's other load (the 2 cores are
    shared) only ever adds time, so the minimum is the estimate of a call's own cost."""
    return float(np.array(ns, dtype=np.float64).reshape(passes, -1).min(axis=0).mean() / 1e3)


def host_extra(setup: SimSetup, sample: int, repeats: int, seed: int) -> dict:
    """Per base strategy and phase: the measured decision costs and the extra µs charged at this profile."""
    scale = setup.profile.host.scale if setup.profile.host is not None else 1.0
    out = {}
    for base in BASES:
        calls, layers = record_calls(setup, base, 0.5)
        out[base] = {}
        for p in PHASES:
            t = time_plans(calls[p], sample, repeats, seed)
            per_layer = len(calls[p]) / layers[p] if layers[p] else 0.0
            delta = (t["greedy_us"] - t["balanced_us"]) * per_layer
            out[base][p] = {**t, "plan_calls": len(calls[p]), "layer_calls": layers[p],
                            "plan_calls_per_layer_call": round(per_layer, 3),
                            "delta_us_per_layer_call_here": round(delta, 2), "profile_scale": scale,
                            "extra_critical_us_charged": round(max(0.0, delta) * scale, 2)}
    return out


def decision_cost(seed: int, routings: int, repeats: int) -> dict:
    """µs per ``plan`` call on random top-6-of-64 routings (DeepSeek-V2-Lite shape, rtx4090-ddr5, 50%)."""
    cost = RooflineCost.build(load_profile("rtx4090-ddr5"), get_model("deepseek-v2-lite"))
    rng = np.random.default_rng(seed)
    out = {}
    for label, n_tok in (("decode_1_token", 1), ("prefill_512_tokens", 512)):
        cases = []
        for _ in range(routings):
            p = rng.dirichlet(np.full(64, 0.5))
            ids = np.stack([rng.choice(64, 6, replace=False, p=p) for _ in range(n_tok)])
            cases.append((LayerRouting.from_topk(0, ids, is_prefill=n_tok > 1),
                          frozenset(int(e) for e in rng.choice(64, 32, replace=False)), cost, {}, 0.0, 0.0))
        b, g = BalancedScheduler(), GreedyScheduler()
        t = bd.time_calls({"balanced": lambda i: b.plan(*cases[i]), "greedy": lambda i: g.plan(*cases[i])},
                          len(cases), repeats)
        wins = [g.plan(*c).makespan_s / b.plan(*c).makespan_s for c in cases]
        out[label] = {k: {**bd.summarize(v), "mean_of_fastest_pass_us": round(per_call(v, repeats), 2)}
                      for k, v in t.items()}
        out[label]["makespan_greedy_over_balanced"] = {"mean": float(np.mean(wins)), "min": float(np.min(wins)),
                                                       "share_below_1": float(np.mean(np.array(wins) < 1))}
    return out


def run_cells(data: str, seed: int, labels: list[tuple[str, str]], hardware: list[str], ratios: list[float],
              args: argparse.Namespace) -> tuple[list, list, dict]:
    specs = [s for b in BASES for s in (STRATEGIES[b], variant(b), variant(b, BASE_HOST))]
    cells, runs, extras = [], [], {}
    for tname, tspec in labels:
        trace = parse_trace_spec(tspec, seed=seed)
        model = infer_model(trace.model, trace.n_layers, trace.n_experts, trace.top_k)
        for hw in hardware:
            setup = _Setup(trace, Path(tspec).name, model, load_profile(hw))
            t0 = time.perf_counter()
            extra = host_extra(setup, args.sample, args.repeats, seed)
            extras[f"{data}/{tname}/{hw}"] = extra
            setup = replace(setup, extra_us={b: {p: extra[b][p]["extra_critical_us_charged"] for p in PHASES}
                                             for b in BASES})
            rs = pg.fitting(setup, specs, ratios)
            recs = simulate(setup, specs, rs, provenance=None)
            runs.append({"data": data, "trace": tname, "hardware": hw, "ratios": rs,
                         "wall_s": round(time.perf_counter() - t0, 1)})
            for r in rs:
                by = {x["strategy"]: x for x in recs if x["cache_ratio"] == r}
                cell = {"data": data, "seed": seed, "trace": tname, "model": model.name, "hardware": hw,
                        "cache_ratio": r,
                        "prefill_tok_s": {k: round(v["prefill_tok_s"], 3) for k, v in by.items()},
                        "decode_tok_s": {k: round(v["decode_tok_s"], 4) for k, v in by.items()},
                        "ratio": {b: {k: {p: round(by[b + x][f"{p}_tok_s"] / by[b][f"{p}_tok_s"], 5)
                                          for p in PHASES} for k, x in KINDS.items()} for b in BASES}}
                cells.append(cell)
                print(f"{data:6s} {tname:28s} {hw:13s} {r:4.0%} " + " ".join(
                    f"{b}: prefill {cell['ratio'][b]['charged']['prefill']:.4f} "
                    f"({cell['ratio'][b]['base_host']['prefill']:.4f}) decode {cell['ratio'][b]['charged']['decode']:.4f} "
                    f"({cell['ratio'][b]['base_host']['decode']:.4f})" for b in BASES), flush=True)
    return cells, runs, extras


def summarize(cells: list) -> dict:
    out = {}
    for data in sorted({c["data"] for c in cells}):
        cs = [c for c in cells if c["data"] == data]
        out[data] = {}
        for b, k, p in ((b, k, p) for b in BASES for k in KINDS for p in PHASES):
            xs = [(c["ratio"][b][k][p], c["trace"], c["hardware"], c["cache_ratio"]) for c in cs]
            keys = ("ratio", "trace", "hardware", "cache_ratio")
            out[data][f"{b}/{k}/{p}"] = {"geomean_greedy_over_balanced": round(pg.geomean([x[0] for x in xs]), 5),
                                         "worst": dict(zip(keys, min(xs))), "best": dict(zip(keys, max(xs))),
                                         "cells": len(xs)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hardware", default="rtx4090-ddr5,rtx5090-ddr5")
    ap.add_argument("--ratios", default="0.25,0.5,0.75")
    ap.add_argument("--only", default=None, help="comma-separated trace labels (default: all)")
    ap.add_argument("--no-tuning", action="store_true", help="skip the tuning data (seed 1)")
    ap.add_argument("--sample", type=int, default=300, help="recorded plan calls timed per phase")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes over each sample")
    ap.add_argument("--out", default="results/ablation-scheduler-greedy.json")
    args = ap.parse_args()
    hw, ratios = args.hardware.split(","), [float(r) for r in args.ratios.split(",")]
    load0 = os.getloadavg()[0]
    only = args.only.split(",") if args.only else None
    pick = [(n, s) for n, s in pg.traces(0) if not only or n in only]
    cells, runs, extras = run_cells("goal", 0, pick, hw, ratios, args)
    if not args.no_tuning:
        synth = [(n, s) for n, s in pick if s.startswith("synthetic:")]
        c2, r2, e2 = run_cells("tuning", 1, synth, hw, ratios, args)
        cells, runs, extras = cells + c2, runs + r2, {**extras, **e2}
    summary = summarize(cells)
    for data, s in summary.items():
        for k, v in s.items():
            print(f"{data:6s} {k:34s} geomean {v['geomean_greedy_over_balanced']:.5f}  worst {v['worst']}  "
                  f"best {v['best']}")
    doc = {"benchmark": "greedy scheduler ablation", "kind": "simulated", "ablation": True,
           "note": "SIMULATED tok/s from each hardware profile's cost model, host time charged from the profile "
                   "(never zero); a /greedy variant pays its base's host time plus greedy's measured extra "
                   "decision cost (see host_extra); data 'goal' = scripts/policy_goals.py's grid (seed 0 + the "
                   "real Mixtral trace), 'tuning' = the synthetic traces with seed 1; nothing was tuned on either",
           "variants": {**{b + SUFFIX: {"base": b, "overrides": {"scheduler": "greedy"},
                                        "host": "base's host time + greedy's measured extra (host_extra)"}
                           for b in BASES},
                        **{b + BASE_HOST: {"base": b, "overrides": {"scheduler": "greedy"},
                                           "host": "base's host time only (greedy's decisions free: a bound)"}
                           for b in BASES}},
           "loadavg_1m": {"start": load0, "end": os.getloadavg()[0]},
           "hardware_profiles": hw, **provenance(seed={"goal": 0, "tuning": 1}),
           "decision_cost_us_random_routings": decision_cost(0, 200, args.repeats),
           "host_extra": extras, "summary": summary, "cells": cells, "runs": runs}
    pg.write_json(doc, args.out)


if __name__ == "__main__":
    main()
