"""Benchmark the HybridMoE runtime on this machine: host overhead per layer and the CPU tier vs bare kt-kernel.

A stack of DeepSeek-V2-Lite-shaped MoE layers (64 experts, top-6; hidden/intermediate configurable,
default the real 2048 x 1408) with random bf16 weights; routing replayed from a synthetic
deepseek-v2-lite trace. Without a GPU the GPU tier runs on device cpu (the CPU stand-in) and every
figure involving it is labelled so.

(a) host overhead of one decode layer call, per strategy (stock, static-frequency, hybrimoe):
    - with real kernels: the runtime's own decide + dispatch time per layer call (on the stand-in,
      dispatch also contains the stand-in's synchronous GPU compute and slot copies);
    - with trivial kernels (CPU/GPU expert calls and slot copies replaced by no-ops): the whole layer
      call, i.e. pure host time; plus a cProfile of that run (hot spots).
(b) CPU tier inside the runtime (stock: every expert on the CPU) vs the bare kt-kernel call on the same
    experts and routing, per token count; achieved GB/s of distinct expert weights read vs this
    machine's measured read bandwidth.

    python scripts/bench_runtime.py [--layers 4] [--hidden 2048] [--inter 1408] [--seed 0]

Writes results/bench_runtime.json (commit, dirty flag, machine, profile, seed).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import logging
import pstats
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from hybrimoe_kt.core.cost import RooflineCost
from hybrimoe_kt.core.hardware import load_profile
from hybrimoe_kt.core.strategies import get_strategy, slots_for
from hybrimoe_kt.kernels.cpu_backend import make_cpu_backend
from hybrimoe_kt.kernels.cpu_ktkernel import CpuWorkerPool
from hybrimoe_kt.measure.calibrate import busy_cpus, read_bandwidth_gbs
from hybrimoe_kt.measure.provenance import provenance
from hybrimoe_kt.runtime.device import Tier
from hybrimoe_kt.runtime.harness import (StackShape, random_store, run_replay, summary_us,
                                         trivial_kernels)
from hybrimoe_kt.runtime.moe import HybridMoE
from hybrimoe_kt.runtime.replay import RoutingReplay
from hybrimoe_kt.traces.synthetic import synthetic_trace

REPO = Path(__file__).resolve().parent.parent
STRATEGIES = ("stock", "static-frequency", "hybrimoe")
TOKEN_COUNTS = (1, 4, 16, 64)
REPEATS = {1: 20, 4: 12, 16: 8, 64: 6}


def torch_read_gbs(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def make_moe(args: argparse.Namespace, store: Any, backends: list[Any], strategy: str, counts: np.ndarray,
             cost: RooflineCost, shape: StackShape) -> HybridMoE:
    spec = get_strategy(strategy)
    slots = slots_for(spec, shape.n_layers, shape.n_experts, args.cache_ratio)
    return HybridMoE(store, Tier("cpu"), spec, slots, cost, shape.top_k, counts=counts,
                     cpu_backends=backends, max_len=512)


def host_overhead(args: argparse.Namespace, make: Callable[[str], HybridMoE], replay: RoutingReplay,
                  out: dict[str, Any]) -> None:
    req0 = [s for s in replay if s.forward <= 1]  # request 0: prefill (chunks) + its decode tokens
    prefill0 = [s for s in req0 if s.is_prefill]
    decode_all = replay.steps("decode")
    for strategy in STRATEGIES:
        res: dict[str, Any] = {}
        moe = make(strategy)
        run_replay(moe, replay, prefill0, seed=args.seed, timed=False)
        rec = run_replay(moe, replay, decode_all[:args.decode_real], seed=args.seed + 1)
        dec = [h for h, p in zip(rec.layer_host_s, rec.layer_prefill) if not p]
        res["real_kernels"] = {
            "decide_plus_dispatch_per_decode_layer": summary_us(dec),
            "decide_per_decode_layer": summary_us([h for h, p in zip(rec.layer_decide_s, rec.layer_prefill)
                                                   if not p]),
            "decode_layer_wall": summary_us([f / moe.store.n_layers for f in rec.forward_s]),
            "hit_rate": round(moe.cache.counters.hit_rate, 4),
            "gpu_experts": moe.stats.gpu_experts, "cpu_experts": moe.stats.cpu_experts,
            "note": "dispatch includes the CPU stand-in's synchronous GPU-tier compute and slot copies",
        }
        del moe
        gc.collect()
        moe = make(strategy)
        walls: list[float] = []
        with trivial_kernels(moe):
            run_replay(moe, replay, prefill0, seed=args.seed, timed=False)
            trec = run_replay(moe, replay, decode_all, seed=args.seed + 2, layer_wall=walls)
            dec_wall = walls  # decode steps only
            res["trivial_kernels"] = {
                "layer_call_per_decode_layer": summary_us(dec_wall),
                "critical_path_per_decode_layer": summary_us(
                    [h for h, p in zip(trec.layer_host_s, trec.layer_prefill) if not p]),
                "decide_per_decode_layer": summary_us([d for d, p in zip(trec.layer_decide_s,
                                                                         trec.layer_prefill) if not p]),
                "hit_rate": round(moe.cache.counters.hit_rate, 4),
            }
            if strategy == args.profile_strategy:
                prof = cProfile.Profile()
                prof.enable()
                run_replay(moe, replay, decode_all, seed=args.seed + 3)
                prof.disable()
                res["hotspots"] = hotspots(prof)
        del moe
        gc.collect()
        out[strategy] = res
        t = res["trivial_kernels"]["layer_call_per_decode_layer"]
        c = res["trivial_kernels"]["critical_path_per_decode_layer"]
        r = res["real_kernels"]["decide_plus_dispatch_per_decode_layer"]
        print(f"  {strategy:17s} trivial kernels: whole layer call median {t['median_us']:7.1f} us (p90 "
              f"{t['p90_us']:7.1f}), before the kernels (decide+dispatch) median {c['median_us']:7.1f} us | "
              f"real kernels decide+dispatch median {r['median_us']:9.1f} us (CPU stand-in) | hit "
              f"{res['real_kernels']['hit_rate']:.2f}", flush=True)


def hotspots(prof: cProfile.Profile, top: int = 15) -> list[dict[str, Any]]:
    st = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (file, line, fn), (cc, nc, tt, ct, _) in st.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(file).name}:{line}({fn})", "calls": nc,
                     "tottime_ms": round(tt * 1e3, 3), "cumtime_ms": round(ct * 1e3, 3)})
    rows.sort(key=lambda r: -r["tottime_ms"])
    return rows[:top]


def bare_call(backend: Any) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]:
    """The kernel call without the runtime: kt-kernel's task submit + sync (no checks, no wrappers)."""
    if backend.name != "kt-kernel":
        return lambda x, ids, w, out: backend.forward(x, ids, w, out) and None
    cpu, moe = backend._cpu, backend._moe

    def call(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
        qlen = torch.tensor([x.shape[0]], dtype=torch.int32)
        cpu.submit(moe.forward_task(qlen.data_ptr(), ids.shape[1], ids.data_ptr(), w.data_ptr(),
                                    x.data_ptr(), out.data_ptr()))
        cpu.sync()
    return call


def cpu_tier_vs_bare(args: argparse.Namespace, make: Callable[[str], HybridMoE], trace: Any,
                     shape: StackShape, bw: float) -> list[dict[str, Any]]:
    moe = make("stock")
    rows = []
    gen = torch.Generator().manual_seed(args.seed)
    for n in TOKEN_COUNTS:
        rp = RoutingReplay(trace, shape.model, prefill_chunk=n)
        steps = rp.steps("decode") if n == 1 else [s for s in rp.steps("prefill") if s.n_tokens == n]
        t_rt, t_bare, distinct = [], [], []
        reps = max(2, int(REPEATS[n] * args.repeat_scale))
        for r in range(reps):
            step, layer = steps[(r * 7) % len(steps)], r % shape.n_layers
            ids, w = rp.routing(step, layer)
            x = (torch.randn(n, shape.hidden, generator=gen) * 0.5).to(torch.bfloat16)
            out = torch.empty(n, shape.hidden, dtype=torch.bfloat16)
            call = bare_call(moe.cpu[layer])
            distinct.append(int(np.unique(ids[ids >= 0].numpy()).size))
            order = ("rt", "bare") if r % 2 == 0 else ("bare", "rt")
            for which in order:
                t0 = time.perf_counter()
                if which == "rt":
                    with torch.no_grad():
                        moe.forward(layer, x, ids, w)
                    t_rt.append(time.perf_counter() - t0)
                else:
                    call(x, ids, w, out)
                    t_bare.append(time.perf_counter() - t0)
        med_rt, med_bare = float(np.median(t_rt)), float(np.median(t_bare))
        gb = float(np.mean(distinct)) * shape.expert_bytes() / 1e9
        row = {"tokens": n, "repeats": reps, "runtime_ms": round(med_rt * 1e3, 3),
               "bare_ms": round(med_bare * 1e3, 3), "ratio_runtime_over_bare": round(med_rt / med_bare, 4),
               "runtime_minus_bare_us": round((med_rt - med_bare) * 1e6, 1),
               "distinct_experts_mean": round(float(np.mean(distinct)), 2),
               "gbs_runtime": round(gb / med_rt, 3), "gbs_bare": round(gb / med_bare, 3),
               "fraction_of_read_bw_bare": round(gb / med_bare / bw, 4)}
        rows.append(row)
        print(f"  N={n:3d}: runtime {row['runtime_ms']:9.2f} ms  bare {row['bare_ms']:9.2f} ms  "
              f"ratio {row['ratio_runtime_over_bare']:.3f}  experts {row['distinct_experts_mean']:5.1f}  "
              f"{row['gbs_bare']:6.2f} GB/s bare = {100 * row['fraction_of_read_bw_bare']:.0f}% of "
              f"{bw:.1f} GB/s read", flush=True)
    del moe
    gc.collect()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=1408)
    ap.add_argument("--cache-ratio", type=float, default=0.25)
    ap.add_argument("--decode-tokens", type=int, default=96, help="decode tokens per request in the trace")
    ap.add_argument("--decode-real", type=int, default=12, help="decode steps timed with real kernels")
    ap.add_argument("--repeat-scale", type=float, default=1.0)
    ap.add_argument("--profile", default="rtx4090-ddr5", help="hardware profile for the cost model")
    ap.add_argument("--profile-strategy", default="hybrimoe")
    ap.add_argument("--backend", default="auto", choices=("auto", "kt-kernel", "torch"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "results" / "bench_runtime.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    t_start = time.perf_counter()

    shape = StackShape("deepseek-v2-lite", args.layers, args.hidden, args.inter)
    trace = synthetic_trace(shape.model, n_requests=2, prompt_len=64, decode_len=args.decode_tokens,
                            seed=args.seed, n_layers=shape.n_layers)
    calib = synthetic_trace(shape.model, n_requests=2, prompt_len=64, decode_len=args.decode_tokens,
                            seed=args.seed + 1000, n_layers=shape.n_layers)
    counts = calib.expert_counts()  # placement from calibration routing, never the replayed tokens
    replay = RoutingReplay(trace, shape.model, prefill_chunk=64)
    cost = RooflineCost.build(load_profile(args.profile), shape.preset(), "bf16", "bf16")
    print(f"shape {shape.describe()}; {replay.label}", flush=True)

    busy = busy_cpus()
    print(f"busy CPUs before the run (other processes): {busy}", flush=True)
    bw_np, bw_torch = read_bandwidth_gbs(), torch_read_gbs()
    bw = max(bw_np, bw_torch)
    print(f"read bandwidth (1 thread): numpy {bw_np:.1f} GB/s, torch {bw_torch:.1f} GB/s", flush=True)

    t0 = time.perf_counter()
    store = random_store(shape, seed=args.seed)
    t_fill = time.perf_counter() - t0
    t0 = time.perf_counter()
    workers = CpuWorkerPool(1)  # one kt-kernel worker pool for all layers, as the runtime does
    backends = [make_cpu_backend(args.backend, lw.gate, lw.up, lw.down, 1, top_k=shape.top_k, max_len=512,
                                 pool=workers, layer_idx=i) for i, lw in enumerate(store)]
    t_build = time.perf_counter() - t0
    backend_desc = f"{backends[0].name} ({getattr(backends[0], 'variant', 'torch')}), 1 thread"
    print(f"store filled in {t_fill:.1f} s; CPU backends ({backend_desc}) built in {t_build:.1f} s", flush=True)

    def make(strategy: str) -> HybridMoE:
        return make_moe(args, store, backends, strategy, counts, cost, shape)

    label = "CPU stand-in for the GPU tier (device cpu); random bf16 weights; " + replay.label
    print("(a) host overhead per decode layer call [CPU stand-in]", flush=True)
    host: dict[str, Any] = {}
    host_overhead(args, make, replay, host)
    print("(b) CPU tier in the runtime (stock) vs bare kernel call", flush=True)
    tier = cpu_tier_vs_bare(args, make, trace, shape, bw)

    medians = {s: host[s]["trivial_kernels"]["layer_call_per_decode_layer"]["median_us"] for s in host}
    result = {
        **provenance(profile=args.profile, seed=args.seed),
        "label": label,
        "routing": replay.label,
        "shape": shape.describe(),
        "cache_ratio": args.cache_ratio,
        "cpu_backend": backend_desc,
        "torch_threads": torch.get_num_threads(),
        "busy_cpus_at_start": busy,
        "read_bandwidth_gbs": {"numpy_1thread": round(bw_np, 2), "torch_1thread": round(bw_torch, 2),
                               "used": round(bw, 2)},
        "setup_s": {"fill": round(t_fill, 1), "cpu_backends": round(t_build, 1)},
        "host_overhead_per_decode_layer": host,
        "cpu_tier_vs_bare": tier,
        "goals": {
            "host_median_le_50us": {s: m <= 50.0 for s, m in medians.items()},
            "runtime_within_10pct_of_bare": {str(r["tokens"]): r["ratio_runtime_over_bare"] <= 1.10
                                             for r in tier},
        },
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out} ({result['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
