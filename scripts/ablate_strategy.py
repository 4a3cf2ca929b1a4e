"""Ablation of the ``hybrimoe`` strategy's parts against the paper, static and oracle strategies.

Simulated (cost model of a hardware profile). Writes results/ablation.json and prints decode/prefill
tok/s of each variant relative to hybrimoe-paper, static-frequency and oracle.

    python scripts/ablate_strategy.py [--traces real-mixtral,synthetic:deepseek-v2-lite,...]
    python scripts/ablate_strategy.py --workload prefill-sweep --model deepseek-v2-lite --ratios 0.25,0.5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hybrimoe_kt.core.hardware import load_profile
from hybrimoe_kt.core.strategies import STRATEGIES, with_overrides
from hybrimoe_kt.measure.provenance import provenance
from hybrimoe_kt.sim.defaults import default_trace, infer_model
from hybrimoe_kt.sim.runner import SimSetup, simulate
from hybrimoe_kt.traces.spec import parse_trace_spec
from hybrimoe_kt.traces.workloads import workload_traces

VARIANTS = {
    # the step cadence's two prefill choices, each undone (simulated side by side with hybrimoe)
    "learn-from-prefill": dict(learn_from_prefill=True),
    "no-prefill-contention": dict(prefill_contention=False),
    "both-off": dict(learn_from_prefill=True, prefill_contention=False),
    # layer-streaming prefill (core.stream) on, off
    "stream": dict(prefill_stream=True),
    "no-stream": dict(prefill_stream=False),
    # relative to the current hybrimoe strategy (tried 2026-11-28: all within +-2% of it, except a
    # global pool: +1-2% decode but 22-55% slower prefill, and threshold 0.5: up to -3%)
    "global": dict(pool="global"),
    "alpha0.3": dict(mrs_alpha=0.3),
    "horizon8": dict(copy_horizon_layers=8.0),
    "halflife64": dict(reuse_half_life=64.0),
    "threshold0.5": dict(admission_margin=0.5),
    "A-nobgpre": dict(background_in_prefill=False),
    "B-reuse-h4-nobgpre": dict(eviction="reuse", admission="expected-reuse", admission_margin=1.0,
                               copy_horizon_layers=4.0, background_in_prefill=False),
    "C-mrs-xr": dict(admission="expected-reuse", admission_margin=1.0, background_in_prefill=False),
    "D-mrs-xr-h4": dict(admission="expected-reuse", admission_margin=1.0, copy_horizon_layers=4.0,
                        background_in_prefill=False),
    "E-mrs-xr-m0.5": dict(admission="expected-reuse", admission_margin=0.5, background_in_prefill=False),
    "G-mrs-xr-h4-d3": dict(admission="expected-reuse", admission_margin=1.0, copy_horizon_layers=4.0,
                           prefetch_depth=3, background_in_prefill=False),
    "H-mrs-xr-h4-bgpre": dict(admission="expected-reuse", admission_margin=1.0, copy_horizon_layers=4.0),
    "F-mrs-xr-d1": dict(admission="expected-reuse", admission_margin=1.0, prefetch_depth=1,
                        background_in_prefill=False),
    "reuse": dict(eviction="reuse", admission="expected-reuse", admission_margin=1.0),
    "reuse-m0.5": dict(eviction="reuse", admission="expected-reuse", admission_margin=0.5),
    "reuse-m2": dict(eviction="reuse", admission="expected-reuse", admission_margin=2.0),
    "reuse-hl16": dict(eviction="reuse", admission="expected-reuse", admission_margin=1.0, reuse_half_life=16.0),
    "reuse-hl64": dict(eviction="reuse", admission="expected-reuse", admission_margin=1.0, reuse_half_life=64.0),
    "reuse-h4": dict(eviction="reuse", admission="expected-reuse", admission_margin=1.0, copy_horizon_layers=4.0),
    "no-miss-admit": dict(admit_misses=False),
    "no-prefetch": dict(prefetch="none"),
    "depth1": dict(prefetch_depth=1),
    "horizon1": dict(copy_horizon_layers=1.0),
    "horizon4": dict(copy_horizon_layers=4.0),
    "alpha0.2": dict(mrs_alpha=0.2),
    "alpha0.1": dict(mrs_alpha=0.1),
    "lru": dict(eviction="lru"),
    "lfu": dict(eviction="lfu"),
    "margin0.05": dict(admission_margin=0.05),
    "no-bg-prefill": dict(background_in_prefill=False),
    "hss": dict(scheduler="hss"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--traces", default=f"{default_trace()},synthetic:deepseek-v2-lite,synthetic:qwen3-30b-a3b")
    ap.add_argument("--ratios", default="0.25,0.5,0.75")
    ap.add_argument("--hardware", default="rtx4090-ddr5")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--workload", default=None, help="instead of --traces: a workload preset's traces for --model")
    ap.add_argument("--model", default="deepseek-v2-lite", help="model preset of --workload")
    ap.add_argument("--out", default="results/ablation.json")
    args = ap.parse_args()
    base = STRATEGIES["hybrimoe"]
    specs = [STRATEGIES[n] for n in ("static-frequency", "hybrimoe-paper", "hybrimoe", "oracle")]
    specs += [with_overrides(base, name=f"hybrimoe/{v}", **VARIANTS[v]) for v in args.variants.split(",") if v]
    ratios = [float(r) for r in args.ratios.split(",")]
    profile = load_profile(args.hardware)
    all_recs = []
    if args.workload:
        inputs = [(f"{args.workload}/p{w.prompt_len}-b{w.batch}", w.trace)
                  for w in workload_traces(args.workload, args.model)]
    else:
        inputs = [(Path(t).name, parse_trace_spec(t)) for t in args.traces.split(",")]
    for name, trace in inputs:
        model = infer_model(trace.model, trace.n_layers, trace.n_experts, trace.top_k)
        recs = simulate(SimSetup(trace, name, model, profile), ["stock", *specs], ratios,
                        provenance=provenance(seed=0))
        all_recs += recs
        print(f"\n== SIMULATED {name} ({model.name}, {profile.name})")
        for r in ratios:
            by = {x["strategy"]: x for x in recs if x["cache_ratio"] == r}
            p, s, o = by["hybrimoe-paper"], by["static-frequency"], by["oracle"]
            print(f"-- cache {r:.0%}: paper {p['decode_tok_s']:.1f}  static {s['decode_tok_s']:.1f}  "
                  f"oracle {o['decode_tok_s']:.1f} tok/s (decode); paper prefill {p['prefill_tok_s']:.0f}")
            for k, x in by.items():
                if k.startswith("hybrimoe"):
                    print(f"   {k:24s} dec {x['decode_tok_s']:7.1f} /paper {x['decode_tok_s'] / p['decode_tok_s']:.3f}"
                          f" /static {x['decode_tok_s'] / s['decode_tok_s']:.3f} /oracle "
                          f"{x['decode_tok_s'] / o['decode_tok_s']:.3f}  pre/paper "
                          f"{x['prefill_tok_s'] / p['prefill_tok_s']:.3f}  hit {x['decode_hit_rate']:.3f} "
                          f"pcie {x['pcie_gb']:.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(all_recs, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
