"""Which prompts should price layer streaming: ``hybrimoe``'s ``stream_min_rows``, SIMULATED with host
time charged (the stream decision's own host time, ``stream_us``, only on calls that price it).

Pricing the next layer's stream costs the host most of a millisecond per layer call; a short prompt's
layers are too short for a stream to pay that back. Each variant is ``hybrimoe`` with prefill calls of
fewer than N rows skipping the pricing (N = 0: every call prices it; ``no-stream``: streaming off).
Tuning data by default (synthetic seed 1, one request per prompt length, 2 decode tokens; both
profiles, 25 and 50% cache); ``--seed 0`` gives the held-out check. Writes
``results/ablation-stream-gate[-TAG].json`` (commit, machine, profiles, seed, every cell) with the prefill
tok/s of each variant over N = 0, per prompt length and in geomean.

    python scripts/ablate_stream_gate.py [--seed 1] [--tag tuning]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from hybrimoe_kt.core.hardware import load_profile
from hybrimoe_kt.core.models import get_model
from hybrimoe_kt.core.strategies import STRATEGIES, with_overrides
from hybrimoe_kt.measure.provenance import provenance
from hybrimoe_kt.sim.runner import SimSetup, simulate
from hybrimoe_kt.traces.synthetic import synthetic_trace

GATES = (0, 64, 128, 256, 512)


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def variants() -> list:
    base = STRATEGIES["hybrimoe"]
    out = [with_overrides(base, name=f"hybrimoe/min{n}", stream_min_rows=n, host_time_of="hybrimoe")
           for n in GATES]
    return out + [with_overrides(base, name="hybrimoe/no-stream", prefill_stream=False, host_time_of="hybrimoe")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=1, help="synthetic seed (1 = tuning data, 0 = held out)")
    ap.add_argument("--models", default="deepseek-v2-lite,qwen3-30b-a3b,mixtral-8x7b")
    ap.add_argument("--prompts", default="16,32,64,128,256,512,1024")
    ap.add_argument("--hardware", default="rtx4090-ddr5,rtx5090-ddr5")
    ap.add_argument("--ratios", default="0.25,0.5")
    ap.add_argument("--tag", default="tuning")
    args = ap.parse_args()
    specs = variants()
    ratios = [float(r) for r in args.ratios.split(",")]
    cells = []
    for model in args.models.split(","):
        for plen in (int(p) for p in args.prompts.split(",")):
            trace = synthetic_trace(model, n_requests=1, prompt_len=plen, decode_len=2, seed=args.seed)
            for hw in args.hardware.split(","):
                recs = simulate(SimSetup(trace, f"{model} prompt {plen}", get_model(model), load_profile(hw)),
                                specs, ratios, provenance=None)
                for r in ratios:
                    by = {x["strategy"]: x["prefill_tok_s"] for x in recs if x["cache_ratio"] == r}
                    ref = by["hybrimoe/min0"]
                    cells.append({"model": model, "prompt": plen, "hardware": hw, "cache_ratio": r,
                                  "prefill_tok_s": {k: round(v, 3) for k, v in by.items()},
                                  "vs_min0": {k: round(v / ref, 4) for k, v in by.items()}})
                print(f"{model:18s} {plen:5d} {hw:13s} " + " ".join(
                    f"{s.name.split('/')[1]}={cells[-1]['vs_min0'][s.name]:.3f}" for s in specs), flush=True)
    names = [s.name for s in specs]
    summary = {n: {"geomean_vs_min0": round(geomean([c["vs_min0"][n] for c in cells]), 4),
                   "worst_vs_min0": min(c["vs_min0"][n] for c in cells),
                   "per_prompt": {p: round(geomean([c["vs_min0"][n] for c in cells if c["prompt"] == p]), 4)
                                  for p in sorted({c["prompt"] for c in cells})}} for n in names}
    best = max(names, key=lambda n: summary[n]["geomean_vs_min0"])
    for n in names:
        print(f"geomean {n:20s} {summary[n]['geomean_vs_min0']:.4f}  worst {summary[n]['worst_vs_min0']:.4f}  "
              f"per prompt {summary[n]['per_prompt']}")
    print(f"best on this data: {best}")
    out = Path(f"results/ablation-stream-gate-{args.tag}.json")
    out.write_text(json.dumps({"benchmark": "stream gate (hybrimoe stream_min_rows)", "kind": "simulated",
                               "note": "SIMULATED prefill tok/s, host time charged from the profiles (the stream "
                                       "decision's stream_us only where a call prices it); synthetic traces, one "
                                       "request per prompt length",
                               "hardware": args.hardware.split(","), "gates": list(GATES), "best": best,
                               "summary": summary, "cells": cells, **provenance(seed=args.seed)},
                              indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
