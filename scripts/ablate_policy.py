"""Ablation of issue 12's policy ideas as variants of ``hybrimoe``, SIMULATED with host time charged.

Each variant is ``hybrimoe`` with some StrategySpec fields overridden (``--variants`` names entries of
``VARIANTS`` below, or ``NAME=JSON``). A variant is charged ``hybrimoe``'s measured host time (the
same calls; a variant whose upkeep costs more must be measured before it replaces ``hybrimoe``).
Runs on the *tuning* data by default - synthetic DeepSeek-V2-Lite and Qwen3-30B-A3B with seed 1 -
so that the goal figures (seed 0 and the real Mixtral trace, scripts/policy_goals.py) are never the
data a parameter was chosen on. Writes results/ablation-policy-<tag>.json with every record, the
decode tok/s of each variant over ``hybrimoe`` and over the best deployable strategy per cell, and
the geometric means.

    python scripts/ablate_policy.py --variants threshold1,threshold2 --tag thresholds
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from hybrimoe_kt.core.hardware import load_profile
from hybrimoe_kt.core.strategies import STRATEGIES, with_overrides
from hybrimoe_kt.measure.provenance import provenance
from hybrimoe_kt.sim.defaults import infer_model
from hybrimoe_kt.sim.runner import SimSetup, simulate
from hybrimoe_kt.traces.spec import parse_trace_spec

BASELINES = ("static-frequency", "lru-offload", "hybrimoe-paper", "hybrimoe")
DEPLOYABLE = ("static-frequency", "lru-offload", "hybrimoe-paper")
VARIANTS: dict[str, dict] = {
    "threshold2": dict(admission_margin=2.0),
    "threshold1": dict(admission_margin=1.0),
    "threshold0.5": dict(admission_margin=0.5),
    "budget2": dict(step_copy_budget=2.0),
    "depth32": dict(swap_depth=32),
    "halflife8": dict(reuse_half_life=8.0),
    "halflife16": dict(reuse_half_life=16.0),
    "global": dict(pool="global"),
    "reuse": dict(eviction="reuse"),
    "lru": dict(eviction="lru"),    # rank victims by staleness (least recently used)
    "lfu": dict(eviction="lfu"),    # rank victims by token count
}


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--traces", default="synthetic:deepseek-v2-lite,synthetic:qwen3-30b-a3b")
    ap.add_argument("--seed", type=int, default=1, help="seed of the synthetic traces (1 = tuning data)")
    ap.add_argument("--hardware", default="rtx4090-ddr5,rtx5090-ddr5")
    ap.add_argument("--ratios", default="0.25,0.5,0.75")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--tag", default="tuning")
    args = ap.parse_args()
    base = STRATEGIES["hybrimoe"]
    variants: dict[str, dict] = {}
    for v in filter(None, args.variants.split(";" if "=" in args.variants else ",")):
        name, _, js = v.partition("=")
        variants[name] = json.loads(js) if js else VARIANTS[name]
    specs = [STRATEGIES[n] for n in BASELINES]
    specs += [with_overrides(base, name=f"hybrimoe/{n}", **o) for n, o in variants.items()]
    ratios = [float(r) for r in args.ratios.split(",")]
    recs_all, cells = [], []
    for tspec in args.traces.split(","):
        trace = parse_trace_spec(tspec, seed=args.seed)
        model = infer_model(trace.model, trace.n_layers, trace.n_experts, trace.top_k)
        for hw in args.hardware.split(","):
            recs = simulate(SimSetup(trace, Path(tspec).name, model, load_profile(hw)), specs, ratios,
                            provenance=None)
            recs_all += recs
            for r in ratios:
                by = {x["strategy"]: x for x in recs if x["cache_ratio"] == r}
                best = max(by[k]["decode_tok_s"] for k in DEPLOYABLE)
                me = by["hybrimoe"]["decode_tok_s"]
                cell = {"trace": tspec, "hardware": hw, "cache_ratio": r,
                        "vs_hybrimoe": {n: round(by[f"hybrimoe/{n}"]["decode_tok_s"] / me, 4) for n in variants},
                        "hit": {k: round(x["decode_hit_rate"], 4) for k, x in by.items()},
                        "prefill_vs_hybrimoe": {n: round(by[f"hybrimoe/{n}"]["prefill_tok_s"]
                                                         / by["hybrimoe"]["prefill_tok_s"], 4) for n in variants}}
                cell["vs_best_deployable"] = {n: round(by[n if n == "hybrimoe" else f"hybrimoe/{n}"]
                                                       ["decode_tok_s"] / best, 4) for n in ["hybrimoe", *variants]}
                cells.append(cell)
                print(f"{tspec:30s} {hw:13s} {r:4.0%} " + " ".join(
                    f"{n}={cell['vs_hybrimoe'][n]:.3f}" for n in variants)
                      + f"  (hybrimoe/best {cell['vs_best_deployable']['hybrimoe']:.3f})", flush=True)
    summary = {n: {"decode_vs_hybrimoe": round(geomean([c["vs_hybrimoe"][n] for c in cells]), 4),
                   "decode_vs_best_deployable": round(geomean([c["vs_best_deployable"][n] for c in cells]), 4),
                   "worst_vs_best_deployable": min(c["vs_best_deployable"][n] for c in cells),
                   "prefill_vs_hybrimoe": round(geomean([c["prefill_vs_hybrimoe"][n] for c in cells]), 4)}
               for n in variants}
    summary["hybrimoe"] = {"decode_vs_best_deployable": round(geomean([c["vs_best_deployable"]["hybrimoe"]
                                                                        for c in cells]), 4)}
    for n, s in summary.items():
        print(f"geomean {n:24s} {s}")
    out = Path(f"results/ablation-policy-{args.tag}.json")
    out.write_text(json.dumps({"benchmark": "policy ablation (issue 12)", "kind": "simulated",
                               "note": "SIMULATED, host time charged (variants pay hybrimoe's measured host "
                                       "time); data: the traces and seed below",
                               "traces": args.traces.split(","), "hardware": args.hardware.split(","),
                               "variants": variants, "summary": summary, "cells": cells,
                               **provenance(seed=args.seed), "records": recs_all}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
