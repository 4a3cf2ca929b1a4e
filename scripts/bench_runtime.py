"""Benchmark the HybridMoE runtime: host time per decode layer, strategies side by side; CPU tier vs bare kt-kernel.

Two stacks of DeepSeek-V2-Lite-shaped MoE layers (64 experts, top-6) with random bf16 weights; routing
replayed from synthetic deepseek-v2-lite traces. The GPU tier runs on device cpu (the CPU stand-in) and
every figure involving it is labelled so.

(a) ``host_overhead_per_decode_layer``: host time of one decode layer call, per strategy, with trivial
    kernels (``runtime.harness.trivial_kernels``: CPU/GPU expert calls and slot copies are no-ops) on a
    host stack with the model's 26 MoE layers (a step upkeep is amortized over them as in the model) and
    small matrices (no kernel reads them). Every strategy's HybridMoE is built once over one shared store
    and one set of CPU backends and warmed up; then each of R rounds replays the decode steps once per
    strategy, in alternating order, and the report is the median over rounds of each round's medians
    (the machine is shared: alternation spreads other processes' bursts over all strategies). Per call,
    critical = the layer call minus its background part; upkeep = a step-cadence strategy's
    ``begin_forward`` (once per decode step), also given per layer. ``ratio_vs_stock`` is the median
    over rounds of the round's critical median over stock's. Plus a cProfile of the profiled strategy.
(b) ``real_kernels_per_decode_layer``: with real kernels on the real-kernel stack (default the model's
    2048 x 1408 matrices, 4 layers), the runtime's own decide + dispatch time per decode layer call (on
    the stand-in, dispatch also contains the stand-in's synchronous GPU compute and slot copies).
(c) ``cpu_tier_vs_bare``: the CPU tier inside the runtime (stock: every expert on the CPU) vs the bare
    kt-kernel call on the same experts and routing, per token count; achieved GB/s of distinct expert
    weights read vs this machine's measured read bandwidth.
(d) ``goals``: hybrimoe's critical time per decode layer vs stock's (ratio at most 1.2) and absolute (at
    most 50 us); hybrimoe's upkeep per step vs a decode step's kernel time, from the cost model (a lower
    bound: every routed expert on the GPU, see ``step_kernel_floor``); the CPU tier within 10% of bare.

(e) ``gguf_copy``: a GGUF slot copy's host work vs a memcpy of the same bytes (``measure.gguf_copy``).
(f) ``gguf_slot_numerics``: per GGUF slot type, the GPU expert kernels' output over the slots vs a float32
    reference on the store's dequantized weights, for 1, 4 and 64 tokens (``measure.slot_numerics``): the
    torch slot path on the GPU tier's device (the CPU stand-in without CUDA), the Triton kernel on CUDA,
    or in the interpreter with ``--triton-interpreter``. Every figure says its path and device.

    python scripts/bench_runtime.py [--rounds 7] [--host-layers 26] [--layers 4] [--seed 0] [--quick]
    python scripts/bench_runtime.py --only gguf_copy gguf_slot_numerics [--triton-interpreter]

Writes results/bench_runtime.json (commit, dirty flag, machine, profile, seed). ``--only`` recomputes the
named sections (the quick ones, which need no idle machine) and replaces them in the existing file, the
rest kept as it is: the top-level commit and dirty flag stay those of the full run, and each refreshed
section's own commit, dirty flag and machine go to ``section_provenance``.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import logging
import os
import pstats
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from hybrimoe_kt.core.cost import RooflineCost
from hybrimoe_kt.core.hardware import load_profile
from hybrimoe_kt.core.models import get_model
from hybrimoe_kt.core.strategies import get_strategy, slots_for
from hybrimoe_kt.kernels.cpu_backend import make_cpu_backend
from hybrimoe_kt.kernels.cpu_ktkernel import CpuWorkerPool
from hybrimoe_kt.measure.calibrate import busy_cpus, read_bandwidth_gbs
from hybrimoe_kt.measure.gguf_copy import measure_gguf_copy
from hybrimoe_kt.measure.provenance import provenance
from hybrimoe_kt.measure.slot_numerics import gguf_slot_numerics
from hybrimoe_kt.runtime.device import Tier
from hybrimoe_kt.runtime.harness import (NoOpDense, RunRecord, StackShape, random_store, run_replay,
                                         summary_us, trivial_kernels)
from hybrimoe_kt.runtime.moe import HybridMoE
from hybrimoe_kt.runtime.replay import ReplayStep, RoutingReplay
from hybrimoe_kt.traces.format import Trace
from hybrimoe_kt.traces.synthetic import synthetic_trace

REPO = Path(__file__).resolve().parent.parent
MODEL = "deepseek-v2-lite"
STRATEGIES = ("stock", "static-frequency", "hybrimoe", "hybrimoe-layer")
GPU_TIER = "CPU stand-in (device cpu)"
GOAL_RATIO_MAX = 1.2   # hybrimoe's critical host time per decode layer, at most this times stock's
GOAL_US_MAX = 50.0     # ... and at most this many microseconds
TOKEN_COUNTS = (1, 4, 16, 64)
REPEATS = {1: 20, 4: 12, 16: 8, 64: 6}
PROMPT_LEN = 64        # prefill tokens per request (one chunk)
MAX_LEN = 512
ONLY_SECTIONS = ("gguf_copy", "gguf_slot_numerics")  # the sections --only can refresh in place
QUICK = {"layers": 2, "hidden": 256, "inter": 128, "host_layers": 4, "decode_tokens": 8, "decode_real": 2,
         "rounds": 2, "repeat_scale": 0.1}


@dataclass
class Stack:
    """A store of random experts, its CPU backends (one kt-kernel worker pool, as the runtime has) and
    the replayed routing; every HybridMoE built on it shares the store and the backends."""

    shape: StackShape
    trace: Trace
    replay: RoutingReplay
    counts: np.ndarray
    cost: RooflineCost
    store: Any
    backends: list[Any]
    setup_s: dict[str, float]

    @property
    def backend_desc(self) -> str:
        b = self.backends[0]
        return f"{b.name} ({getattr(b, 'variant', 'torch')}), 1 thread"

    def moe(self, strategy: str, cache_ratio: float) -> HybridMoE:
        spec = get_strategy(strategy)
        slots = slots_for(spec, self.shape.n_layers, self.shape.n_experts, cache_ratio)
        return HybridMoE(self.store, Tier("cpu"), spec, slots, self.cost, self.shape.top_k, counts=self.counts,
                         cpu_backends=self.backends, max_len=MAX_LEN)

    def request0(self) -> list[ReplayStep]:
        """Request 0's prefill step(s): the warm-up before decode."""
        return [s for s in self.replay if s.forward <= 1 and s.is_prefill]


def build_stack(shape: StackShape, args: argparse.Namespace) -> Stack:
    """Trace, calibration counts (placement never sees the replayed tokens), store and CPU backends."""
    def trace(seed: int) -> Trace:
        return synthetic_trace(shape.model, n_requests=2, prompt_len=PROMPT_LEN, decode_len=args.decode_tokens,
                               seed=seed, n_layers=shape.n_layers)

    replayed = trace(args.seed)
    counts = trace(args.seed + 1000).expert_counts()
    cost = RooflineCost.build(load_profile(args.profile), shape.preset(), "bf16", "bf16")
    t0 = time.perf_counter()
    store = random_store(shape, seed=args.seed)
    t_fill = time.perf_counter() - t0
    t0 = time.perf_counter()
    workers = CpuWorkerPool(1)
    backends = [make_cpu_backend(args.backend, lw.gate, lw.up, lw.down, 1, top_k=shape.top_k, max_len=MAX_LEN,
                                 pool=workers, layer_idx=i) for i, lw in enumerate(store)]
    setup = {"fill": round(t_fill, 1), "cpu_backends": round(time.perf_counter() - t0, 1)}
    stack = Stack(shape, replayed, RoutingReplay(replayed, shape.model, prefill_chunk=PROMPT_LEN), counts, cost,
                  store, backends, setup)
    print(f"stack {shape.n_layers} layers {shape.hidden}x{shape.inter}: store filled in {setup['fill']} s, CPU "
          f"backends ({stack.backend_desc}) built in {setup['cpu_backends']} s", flush=True)
    return stack


# (a) host overhead per decode layer, strategies side by side, trivial kernels


def round_stats(rec: RunRecord, n_layers: int, step_cadence: bool) -> dict[str, float]:
    """One decode replay's medians in microseconds (the replay holds decode steps only)."""
    call = np.asarray(rec.layer_call_s)
    bg = np.asarray(rec.layer_background_s)
    critical = call - bg
    upkeep_step = float(np.median(rec.forward_upkeep_s)) if step_cadence else 0.0
    return {"critical_median_us": float(np.median(critical)) * 1e6,
            "critical_p90_us": float(np.percentile(critical, 90)) * 1e6,
            "background_median_us": float(np.median(bg)) * 1e6,
            "upkeep_us_per_step": upkeep_step * 1e6,
            "upkeep_us_per_layer": upkeep_step / n_layers * 1e6,
            "calls": int(call.size), "steps": len(rec.forward_upkeep_s)}


def summarize_rounds(rounds: list[dict[str, float]], stock: list[dict[str, float]]) -> dict[str, Any]:
    """Median over rounds of each per-round figure, and the per-round ratios of critical medians to stock's."""
    def med(key: str) -> float:
        return round(float(np.median([r[key] for r in rounds])), 2)

    ratios = [r["critical_median_us"] / s["critical_median_us"] for r, s in zip(rounds, stock)]
    out: dict[str, Any] = {k: med(k) for k in ("critical_median_us", "critical_p90_us", "background_median_us",
                                                 "upkeep_us_per_layer", "upkeep_us_per_step")}
    out["critical_plus_upkeep_us_per_layer"] = round(out["critical_median_us"] + out["upkeep_us_per_layer"], 2)
    out["ratio_vs_stock"] = round(float(np.median(ratios)), 4)
    out["ratio_vs_stock_per_round"] = [round(x, 4) for x in ratios]
    out["critical_median_us_per_round"] = [round(r["critical_median_us"], 2) for r in rounds]
    out["calls"], out["steps"] = rounds[0]["calls"], rounds[0]["steps"]
    return out


def host_side_by_side(args: argparse.Namespace, stack: Stack, moes: dict[str, HybridMoE],
                      shared: bool) -> dict[str, Any]:
    """Warm every strategy up, then ``args.rounds`` rounds of one decode replay per strategy in turn
    (order reversed every other round); per strategy the medians over rounds (``summarize_rounds``).
    ``shared``: every layer call also adds shared experts (no-op kernels, ``NoOpDense``), as a
    DeepSeek-V2-Lite layer does; else routed experts only."""
    decode = stack.replay.steps("decode")
    warm = stack.request0() + decode[:4]
    dense = NoOpDense(stack.shape.hidden) if shared else None
    for moe in moes.values():
        with trivial_kernels(moe):
            run_replay(moe, stack.replay, warm, seed=args.seed, timed=False, dense=dense)
    rounds: dict[str, list[dict[str, float]]] = {s: [] for s in moes}
    names = list(moes)
    for r in range(args.rounds):
        for strategy in names if r % 2 == 0 else names[::-1]:
            moe = moes[strategy]
            gc.collect()
            with trivial_kernels(moe):
                rec = run_replay(moe, stack.replay, decode, seed=args.seed + 1 + r, timed=False, dense=dense)
            rounds[strategy].append(round_stats(rec, stack.shape.n_layers, moe.spec.cadence == "step"))
        print(f"  round {r + 1}/{args.rounds}: critical median "
              + ", ".join(f"{s} {rounds[s][-1]['critical_median_us']:.1f}" for s in names) + " us", flush=True)
    out = {}
    for strategy, moe in moes.items():
        out[strategy] = {**summarize_rounds(rounds[strategy], rounds["stock"]), "rounds": args.rounds,
                         "hit_rate": round(moe.cache.counters.hit_rate, 4), "gpu_tier": GPU_TIER}
    return out


def hotspots(moe: HybridMoE, stack: Stack, seed: int, top: int = 15) -> list[dict[str, Any]]:
    """cProfile of one decode replay with trivial kernels: the functions with the most own time."""
    prof = cProfile.Profile()
    with trivial_kernels(moe):
        prof.enable()
        run_replay(moe, stack.replay, stack.replay.steps("decode"), seed=seed, timed=False)
        prof.disable()
    st = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (file, line, fn), (cc, nc, tt, ct, _) in st.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(file).name}:{line}({fn})", "calls": nc,
                     "tottime_ms": round(tt * 1e3, 3), "cumtime_ms": round(ct * 1e3, 3)})
    rows.sort(key=lambda r: -r["tottime_ms"])
    return rows[:top]


# (b) real kernels


def real_kernel_overhead(args: argparse.Namespace, stack: Stack) -> dict[str, Any]:
    """Per strategy, one HybridMoE at a time: request 0's prefill, then ``args.decode_real`` timed decode
    steps with real kernels; the runtime's decide + dispatch time per decode layer call."""
    out: dict[str, Any] = {}
    decode = stack.replay.steps("decode")[:args.decode_real]
    for strategy in STRATEGIES:
        moe = stack.moe(strategy, args.cache_ratio)
        run_replay(moe, stack.replay, stack.request0(), seed=args.seed, timed=False)
        rec = run_replay(moe, stack.replay, decode, seed=args.seed + 1)
        dec = [not p for p in rec.layer_prefill]
        out[strategy] = {
            "decide_plus_dispatch_per_decode_layer": summary_us([h for h, d in zip(rec.layer_host_s, dec) if d]),
            "decide_per_decode_layer": summary_us([h for h, d in zip(rec.layer_decide_s, dec) if d]),
            "decode_layer_wall": summary_us([f / stack.shape.n_layers for f in rec.forward_s]),
            "hit_rate": round(moe.cache.counters.hit_rate, 4),
            "gpu_experts": moe.stats.gpu_experts, "cpu_experts": moe.stats.cpu_experts,
            "gpu_tier": GPU_TIER,
            "note": "dispatch includes the CPU stand-in's synchronous GPU-tier compute and slot copies",
        }
        del moe
        gc.collect()
        r = out[strategy]["decide_plus_dispatch_per_decode_layer"]
        print(f"  {strategy:17s} real kernels decide+dispatch median {r['median_us']:9.1f} us (p90 "
              f"{r['p90_us']:9.1f}) [{GPU_TIER}] | hit {out[strategy]['hit_rate']:.2f}", flush=True)
    return out


# (c) CPU tier vs bare kt-kernel


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


def cpu_tier_vs_bare(args: argparse.Namespace, stack: Stack, bw: float) -> list[dict[str, Any]]:
    """Stock's layer call (every expert on the CPU tier) vs the bare kernel call, alternating, per token count."""
    shape = stack.shape
    moe = stack.moe("stock", args.cache_ratio)
    rows = []
    gen = torch.Generator().manual_seed(args.seed)
    for n in TOKEN_COUNTS:
        rp = RoutingReplay(stack.trace, shape.model, prefill_chunk=n)
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
            for which in (("rt", "bare") if r % 2 == 0 else ("bare", "rt")):
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


# (d) goals


def step_kernel_floor(profile: str) -> tuple[float, str]:
    """A decode step's expert-kernel time for DeepSeek-V2-Lite from the cost model, in microseconds, and
    how it was obtained: every routed expert of the token on the GPU (the fastest split; CPU misses only
    lengthen the step), one GPU call per MoE layer, over the model's MoE layers."""
    model = get_model(MODEL)
    cost = RooflineCost.build(load_profile(profile), model, "q4_k_m", "bf16")
    per_layer = cost.gpu_call + model.top_k * cost.gpu_expert(1)
    source = (f"cost model (RooflineCost, {profile}, {MODEL}, CPU q4_k_m / GPU bf16), lower bound: all "
              f"top-{model.top_k} experts of one decode token on the GPU, gpu_call + {model.top_k} x "
              f"gpu_expert(1) per MoE layer, x {model.n_moe_layers} MoE layers")
    return model.n_moe_layers * per_layer * 1e6, source


def goals(host: dict[str, Any], routed_only: dict[str, Any], tier: list[dict[str, Any]],
          profile: str) -> dict[str, Any]:
    """The issue's measured goals for hybrimoe, from the side-by-side host figures (the DeepSeek-V2-Lite
    layer, shared experts included; routed experts only reported beside) and the CPU tier rows."""
    hy = host["hybrimoe"]
    kernel_us, source = step_kernel_floor(profile)
    return {
        "layer_shape": "DeepSeek-V2-Lite: routed top-6 of 64 plus shared experts (no-op kernels)",
        "hybrimoe_critical_vs_stock": hy["ratio_vs_stock"],
        "hybrimoe_critical_vs_stock_routed_only": routed_only["hybrimoe"]["ratio_vs_stock"],
        "hybrimoe_critical_median_us_routed_only": routed_only["hybrimoe"]["critical_median_us"],
        "hybrimoe_critical_median_us": hy["critical_median_us"],
        "goal_ratio_max": GOAL_RATIO_MAX,
        "goal_us_max": GOAL_US_MAX,
        "ratio_met": hy["ratio_vs_stock"] <= GOAL_RATIO_MAX,
        "us_met": hy["critical_median_us"] <= GOAL_US_MAX,
        "hybrimoe_upkeep_us_per_step": hy["upkeep_us_per_step"],
        "step_kernel_time_us": round(kernel_us, 1),
        "step_kernel_time_source": source,
        "upkeep_below_step_kernel_time": hy["upkeep_us_per_step"] < kernel_us,
        "runtime_within_10pct_of_bare": {str(r["tokens"]): r["ratio_runtime_over_bare"] <= 1.10 for r in tier},
    }


# (e), (f) GGUF slots


def gguf_sections(args: argparse.Namespace, names: Sequence[str] = ONLY_SECTIONS) -> dict[str, Any]:
    """The GGUF sections ``names``: slot copy cost (e) and slot kernel numerics (f)."""
    out: dict[str, Any] = {}
    if "gguf_copy" in names:
        print("(e) GGUF slot copies: host work before the DMA vs a memcpy of the same bytes", flush=True)
        gguf = measure_gguf_copy(repeats=5 if args.quick else 20)
        for t in ("Q4_K", "Q8_0"):
            g = gguf[t]
            print(f"  {t}: {g['bytes_per_expert'] / 2**20:.2f} MiB per expert, prepare {g['prepare_us']:.1f} us, "
                  f"memcpy {g['memcpy_us']:.1f} us (host dequantization before: "
                  f"{g['dequant_us_host_path_before']:.0f} us)", flush=True)
        out["gguf_copy"] = gguf
    if "gguf_slot_numerics" in names:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        print(f"(f) GGUF slot kernels vs a float32 reference on the store's dequantized weights [{device}]",
              flush=True)
        num = gguf_slot_numerics(device, triton_interpreter=args.triton_interpreter)
        for t, row in num.items():
            if isinstance(row, dict) and "torch" in row:
                paths = [f"{p} {row[p]['max_rel_err']:.2e} (abs {row[p]['max_abs_err']:.2e})"
                         for p in ("torch", "triton") if p in row]
                print(f"  {t}: max rel err {', '.join(paths)}; tolerance {row['tolerance_rel_err']}", flush=True)
        out["gguf_slot_numerics"] = num
    return out


def refresh_sections(args: argparse.Namespace) -> int:
    """``--only``: recompute the named sections and replace them in the existing ``--out`` file."""
    out = Path(args.out)
    if not out.is_file():
        raise SystemExit(f"--only refreshes sections of an existing report, and {out} does not exist: "
                         f"run the full benchmark first")
    report = json.loads(out.read_text())
    t0 = time.perf_counter()
    fresh = gguf_sections(args, args.only)
    stamp = {k: v for k, v in provenance().items() if k in ("commit", "dirty", "machine")}
    stamp["wall_s"] = round(time.perf_counter() - t0, 1)
    report.update(fresh)
    report.setdefault("section_provenance", {}).update({name: stamp for name in fresh})
    out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(f"refreshed {', '.join(fresh)} in {out} ({stamp['wall_s']} s, commit {stamp['commit'][:12]}, "
          f"dirty {stamp['dirty']}); the other sections are those of commit {str(report.get('commit'))[:12]}")
    return 0


def print_summary(result: dict[str, Any]) -> None:
    """A few lines: host figures per strategy, the goals, the CPU tier ratios."""
    print(f"summary [{GPU_TIER}; trivial kernels, {result['host_shape']['n_layers']} layers, "
          f"medians over {result['rounds']} rounds]")
    for s, h in result["host_overhead_per_decode_layer"].items():
        print(f"  {s:17s} critical {h['critical_median_us']:7.1f} us (p90 {h['critical_p90_us']:7.1f}), "
              f"background {h['background_median_us']:7.1f} us, upkeep {h['upkeep_us_per_layer']:6.1f} us/layer "
              f"({h['upkeep_us_per_step']:7.1f} us/step), x{h['ratio_vs_stock']:.3f} stock")
    g = result["goals"]
    print(f"  goals: hybrimoe/stock {g['hybrimoe_critical_vs_stock']:.3f} (<= {g['goal_ratio_max']}: "
          f"{g['ratio_met']}), {g['hybrimoe_critical_median_us']:.1f} us (<= {g['goal_us_max']:.0f}: "
          f"{g['us_met']}); upkeep {g['hybrimoe_upkeep_us_per_step']:.1f} us/step < step kernels "
          f"{g['step_kernel_time_us']:.1f} us (cost model): {g['upkeep_below_step_kernel_time']}")
    print("  CPU tier / bare kt-kernel: " + ", ".join(
        f"N={r['tokens']} {r['ratio_runtime_over_bare']:.3f}" for r in result["cpu_tier_vs_bare"]))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line; ``--quick`` swaps the defaults for tiny shapes and few steps (explicit options win)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"tiny shapes, few steps and rounds: {QUICK}")
    ap.add_argument("--layers", type=int, default=4, help="MoE layers of the real-kernel stack")
    ap.add_argument("--hidden", type=int, default=2048, help="hidden size of the real-kernel stack")
    ap.add_argument("--inter", type=int, default=1408, help="expert intermediate size of the real-kernel stack")
    ap.add_argument("--host-layers", type=int, default=26, help="MoE layers of the trivial-kernel host stack")
    ap.add_argument("--host-hidden", type=int, default=256, help="hidden size of the host stack")
    ap.add_argument("--host-inter", type=int, default=128, help="expert intermediate size of the host stack")
    ap.add_argument("--rounds", type=int, default=7, help="side-by-side rounds of the host measurement")
    ap.add_argument("--cache-ratio", type=float, default=0.25)
    ap.add_argument("--decode-tokens", type=int, default=96, help="decode tokens per request in the traces")
    ap.add_argument("--decode-real", type=int, default=12, help="decode steps timed with real kernels")
    ap.add_argument("--repeat-scale", type=float, default=1.0, help="scales the CPU tier vs bare repeats")
    ap.add_argument("--profile", default="rtx4090-ddr5", help="hardware profile for the cost model")
    ap.add_argument("--profile-strategy", default="hybrimoe", choices=STRATEGIES, help="strategy cProfiled")
    ap.add_argument("--backend", default="auto", choices=("auto", "kt-kernel", "torch"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "results" / "bench_runtime.json"))
    ap.add_argument("--only", nargs="+", choices=ONLY_SECTIONS, metavar="SECTION",
                    help=f"recompute only these sections ({', '.join(ONLY_SECTIONS)}) and replace them in the "
                         f"existing --out file")
    ap.add_argument("--triton-interpreter", action="store_true",
                    help="without CUDA, also run the Triton slot kernel in its interpreter (TRITON_INTERPRET=1; "
                         "calls of at most a few tokens, tens of seconds)")
    args = ap.parse_args(argv)
    if args.quick:
        ap.set_defaults(**QUICK)
        args = ap.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    if args.triton_interpreter:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the Triton kernels are first built
    if args.only:
        return refresh_sections(args)
    t_start = time.perf_counter()
    busy = busy_cpus()
    print(f"busy CPUs before the run (other processes): {busy}", flush=True)
    bw_np, bw_torch = read_bandwidth_gbs(), read_bandwidth_gbs(lib="torch")
    bw = max(bw_np, bw_torch)
    print(f"read bandwidth (1 thread): numpy {bw_np:.1f} GB/s, torch {bw_torch:.1f} GB/s", flush=True)

    host_stack = build_stack(StackShape(MODEL, args.host_layers, args.host_hidden, args.host_inter), args)
    print(f"(a) host overhead per decode layer call, trivial kernels, side by side [{GPU_TIER}]", flush=True)
    moes = {s: host_stack.moe(s, args.cache_ratio) for s in STRATEGIES}
    host = host_side_by_side(args, host_stack, moes, shared=True)  # the DeepSeek-V2-Lite layer: shared experts
    print("    the same, routed experts only (no shared-expert plumbing)", flush=True)
    routed_only = host_side_by_side(args, host_stack, moes, shared=False)
    hot = hotspots(moes[args.profile_strategy], host_stack, args.seed + 100)
    host_shape = host_stack.shape.describe()
    del moes, host_stack
    gc.collect()

    real_stack = build_stack(StackShape(MODEL, args.layers, args.hidden, args.inter), args)
    print(f"(b) decide + dispatch per decode layer call, real kernels [{GPU_TIER}]", flush=True)
    real = real_kernel_overhead(args, real_stack)
    print("(c) CPU tier in the runtime (stock) vs bare kernel call", flush=True)
    tier = cpu_tier_vs_bare(args, real_stack, bw)
    gguf = gguf_sections(args)

    result = {
        **provenance(profile=args.profile, seed=args.seed),
        "label": f"{GPU_TIER} for the GPU tier; random bf16 weights; {real_stack.replay.label}",
        "quick": args.quick,
        "routing": real_stack.replay.label,
        "shape": real_stack.shape.describe(),
        "host_shape": host_shape,
        "rounds": args.rounds,
        "cache_ratio": args.cache_ratio,
        "cpu_backend": real_stack.backend_desc,
        "torch_threads": torch.get_num_threads(),
        "busy_cpus_at_start": busy,
        "read_bandwidth_gbs": {"numpy_1thread": round(bw_np, 2), "torch_1thread": round(bw_torch, 2),
                               "used": round(bw, 2)},
        "setup_s": real_stack.setup_s,
        "host_overhead_method": (
            f"trivial kernels (runtime.harness.trivial_kernels), GPU tier = {GPU_TIER}; every strategy built once "
            f"over one store and one set of CPU backends, warmed up, then {args.rounds} rounds of one decode replay "
            f"per strategy in alternating order; per call critical = layer call - its background part; upkeep = "
            f"begin_forward of a step-cadence strategy (per step, and / n_layers per layer); figures are medians "
            f"over rounds of per-round medians (p90: of per-round p90s); ratio_vs_stock = median over rounds of "
            f"the round's critical median / stock's; calls and steps are per round"),
        "host_overhead_per_decode_layer": host,
        "host_overhead_per_decode_layer_routed_only": routed_only,
        "hotspots": {"strategy": args.profile_strategy, "kernels": "trivial", "gpu_tier": GPU_TIER, "top": hot},
        "real_kernels_per_decode_layer": real,
        "cpu_tier_vs_bare": tier,
        **gguf,
        "goals": goals(host, routed_only, tier, args.profile),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print_summary(result)
    print(f"wrote {out} ({result['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
