"""Benchmark the per-layer decision cost of every scheduler on top-k decode routings.

For each resident fraction (default 25/50/75% of the layer's experts on the GPU), draws ``--routings``
random top-k decode routings and resident sets from a seeded numpy Generator, then times every
``Scheduler.plan`` call individually with ``time.perf_counter_ns`` over ``--repeats`` passes. Also times
``LayerRouting.from_topk`` (building the routing from a ``[1, k]`` id array) on its own, and records the
mean predicted makespan of each scheduler on the same layers. Writes JSON to
``results/bench_decision.json`` (commit, dirty flag, machine, profile, model, seed).

    python scripts/bench_decision.py [--model qwen3-30b-a3b] [--profile rtx4090-ddr5] [--seed 0]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hybrimoe_kt.core.cost import RooflineCost
from hybrimoe_kt.core.hardware import load_profile
from hybrimoe_kt.core.models import get_model
from hybrimoe_kt.core.schedulers import SCHEDULERS, make_scheduler
from hybrimoe_kt.core.types import LayerRouting

REPO = Path(__file__).resolve().parent.parent


def git_state() -> dict[str, Any]:
    def run(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return {"commit": run("rev-parse", "HEAD"), "dirty": bool(run("status", "--porcelain"))}


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu_model": cpu, "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "implementation": platform.python_implementation(),
            "loadavg_1m": os.getloadavg()[0]}


def summarize(ns: list[int]) -> dict[str, float]:
    a = np.array(ns, dtype=np.float64) / 1e3
    return {"median_us": float(np.median(a)), "p90_us": float(np.percentile(a, 90)),
            "mean_us": float(a.mean()), "n": int(a.size)}


def time_calls(fns: dict[str, Callable[[int], object]], n_items: int,
               repeats: int) -> dict[str, list[int]]:
    """Per-call wall time (ns) of ``fn(i)`` for every function and item, over ``repeats`` passes.

    Passes are interleaved across the functions, so load from other processes on the machine hits
    all of them alike. GC is off while timing.
    """
    out: dict[str, list[int]] = {name: [] for name in fns}
    clock = time.perf_counter_ns
    for fn in fns.values():  # warm up tables and caches
        for i in range(min(n_items, 50)):
            fn(i)
    gc.disable()
    try:
        for _ in range(repeats):
            for name, fn in fns.items():
                acc = out[name]
                for i in range(n_items):
                    t0 = clock()
                    fn(i)
                    acc.append(clock() - t0)
    finally:
        gc.enable()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3-30b-a3b")
    ap.add_argument("--profile", default="rtx4090-ddr5")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--routings", type=int, default=500, help="distinct routings per resident fraction")
    ap.add_argument("--repeats", type=int, default=20, help="timed passes over the routings")
    ap.add_argument("--fractions", default="0.25,0.5,0.75", help="resident fractions of the layer")
    ap.add_argument("--out", default=str(REPO / "results" / "bench_decision.json"))
    args = ap.parse_args()

    model = get_model(args.model)
    profile = load_profile(args.profile)
    cost = RooflineCost.build(profile, model)
    rng = np.random.default_rng(args.seed)
    n_exp, k = model.n_experts, model.top_k
    fractions = [float(f) for f in args.fractions.split(",")]

    results: dict[str, Any] = {}
    id_arrays = [rng.choice(n_exp, size=k, replace=False).astype(np.int64)[None, :]
                 for _ in range(args.routings)]
    routings = [LayerRouting.from_topk(0, ids) for ids in id_arrays]
    results["from_topk"] = summarize(time_calls(
        {"from_topk": lambda i: LayerRouting.from_topk(0, id_arrays[i])}, len(id_arrays),
        args.repeats)["from_topk"])
    for frac in fractions:
        n_res = int(round(frac * n_exp))
        residents = [frozenset(int(e) for e in rng.choice(n_exp, size=n_res, replace=False))
                     for _ in routings]
        scheds = {name: make_scheduler(name) for name in SCHEDULERS}
        calls = {name: (lambda i, s=s_: s.plan(routings[i], residents[i], cost))
                 for name, s_ in scheds.items()}
        timings = time_calls(calls, len(routings), args.repeats)
        per_sched: dict[str, Any] = {}
        for name, sched in scheds.items():
            stats = summarize(timings[name])
            splits = [sched.plan(r, res, cost) for r, res in zip(routings, residents)]
            stats["mean_makespan_us"] = float(np.mean([s.makespan_s for s in splits]) * 1e6)
            stats["mean_gpu_experts"] = float(np.mean([len(s.gpu) for s in splits]))
            stats["mean_loads"] = float(np.mean([len(s.loads) for s in splits]))
            per_sched[name] = stats
        results[f"resident_{int(round(frac * 100))}pct"] = per_sched

    doc = {
        "benchmark": "bench_decision",
        **git_state(),
        "machine": machine(),
        "profile": args.profile,
        "model": args.model,
        "seed": args.seed,
        "top_k": k,
        "n_experts": n_exp,
        "routings": args.routings,
        "repeats": args.repeats,
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    print(f"from_topk: median {results['from_topk']['median_us']:.2f} us, "
          f"p90 {results['from_topk']['p90_us']:.2f} us")
    for frac in fractions:
        key = f"resident_{int(round(frac * 100))}pct"
        for name, s in results[key].items():
            print(f"{key:16s} {name:9s} median {s['median_us']:6.2f} us  p90 {s['p90_us']:6.2f} us  "
                  f"makespan {s['mean_makespan_us']:7.1f} us  gpu {s['mean_gpu_experts']:.2f} "
                  f"loads {s['mean_loads']:.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
