"""Benchmark the simulator's own speed: wall time of the default ``simulate`` run on DeepSeek-V3.

Times, on the synthetic DeepSeek-V3 trace (58 MoE layers, 256 experts, top-8) and one smaller model,
each default strategy on its own over every cache ratio (one process: per-strategy seconds; the oracle
includes its clairvoyant variants), then the whole default run as ``hybrimoe-kt simulate`` does it
(forked workers: the total). Simulated results are not the point here; the memory-budget check is
disabled (``gpu_mem_gib = 0``), since a 24 GB profile refuses DeepSeek-V3 at every ratio and a
simulator's speed does not depend on it. Writes ``results/bench_simulate.json`` with commit and
dirty flag, machine, profile, seed, per-strategy seconds and the total.

    python scripts/bench_simulate.py [--models deepseek-v3,deepseek-v2-lite] [--ratios 0.25,0.5,0.75]
        [--hardware rtx4090-ddr5] [--seed 0] [--workers N] [--total-only] [--out results/bench_simulate.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from hybrimoe_kt.core.hardware import load_profile
from hybrimoe_kt.core.models import get_model
from hybrimoe_kt.measure.provenance import provenance
from hybrimoe_kt.sim.defaults import DEFAULT_STRATEGIES
from hybrimoe_kt.sim.folds import make_folds
from hybrimoe_kt.sim.runner import SimSetup, default_workers, simulate
from hybrimoe_kt.traces.spec import parse_trace_spec

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("bench_simulate")


def bench_model(model: str, ratios: list[float], hardware: str, seed: int, workers: int,
                per_strategy: bool) -> dict[str, Any]:
    spec = f"synthetic:{model}"
    load_start = os.getloadavg()[0]  # the machine may be shared: timings are only as clean as this
    t0 = time.perf_counter()
    trace = parse_trace_spec(spec, seed=seed)
    profile = dataclasses.replace(load_profile(hardware), gpu_mem_gib=0.0)  # no budget check (see above)
    setup = SimSetup(trace, spec, get_model(model), profile)
    t_trace = time.perf_counter() - t0
    t0 = time.perf_counter()
    folds = make_folds(trace, setup.prefill_chunk)
    t_folds = time.perf_counter() - t0
    names = DEFAULT_STRATEGIES.split(",")
    per: dict[str, float] = {}
    if per_strategy:
        for name in names:
            t0 = time.perf_counter()
            simulate(setup, [name], ratios, workers=1)
            per[name] = round(time.perf_counter() - t0, 3)
            log.info("%s %s: %.1f s", model, name, per[name])
    t0 = time.perf_counter()
    records = simulate(setup, names, ratios, workers=workers)
    total = round(time.perf_counter() - t0, 3)
    log.info("%s default run (%d workers): %.1f s", model, workers, total)
    return {
        "trace": spec, "model": model, "n_layers": trace.n_layers, "n_experts": trace.n_experts,
        "top_k": trace.top_k, "tokens": trace.n_tokens, "steps_per_job": sum(len(f.steps) for f in folds),
        "folds": len(folds), "strategies": names, "ratios": ratios, "workers": workers,
        "trace_build_s": round(t_trace, 3), "folds_build_s": round(t_folds, 3),
        "per_strategy_s": per, "per_strategy_sum_s": round(sum(per.values()), 3) if per else None,
        "total_s": total, "records": len(records), "loadavg_1m_start": load_start,
        "loadavg_1m_end": os.getloadavg()[0],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="deepseek-v3,deepseek-v2-lite")
    ap.add_argument("--ratios", default="0.25,0.5,0.75")
    ap.add_argument("--hardware", default="rtx4090-ddr5")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None, help="default: as hybrimoe-kt simulate")
    ap.add_argument("--total-only", action="store_true", help="skip the per-strategy timings")
    ap.add_argument("--out", default=str(REPO / "results" / "bench_simulate.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ratios = [float(r) for r in args.ratios.split(",")]
    workers = args.workers or default_workers()
    runs = [bench_model(m.strip(), ratios, args.hardware, args.seed, workers, not args.total_only)
            for m in args.models.split(",") if m.strip()]
    out = {"benchmark": "simulate wall time", "hardware_profile": args.hardware, "seed": args.seed,
           "loadavg_1m_end": os.getloadavg()[0], "runs": runs, **provenance(seed=args.seed)}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    for r in runs:
        print(f"{r['model']}: default run {r['total_s']:.1f} s with {r['workers']} workers"
              + (f"; per strategy (1 process) {r['per_strategy_s']}" if r["per_strategy_s"] else ""))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
