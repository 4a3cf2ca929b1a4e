"""Prefill tok/s at 32, 512, 2K and 8K-token prompts, with and without layer streaming (core.stream).

Two parts, side by side in one run, written to results/prefill_stream.json:

- SIMULATED: the cost model of each hardware preset, synthetic routing of each model preset, one forward
  per prompt (chunk 8192), cache 25%, host time from the profile: stock, static-frequency, hybrimoe
  without streaming and hybrimoe, with the mode each prefill layer took (stream / split / cpu).
- MEASURED on the CPU stand-in: the runtime (HybridMoE) over a stack of DeepSeek-V2-Lite-shaped MoE
  layers (64 experts, top-6; smaller FFNs by default) with random weights, deciding with the cost model
  of ``--decide-profile`` (a GPU preset) while its GPU tier computes on this CPU. Both tiers then run on
  the same cores, so the figures show what the path costs here (its copies into the staging buffers
  included), not a GPU's speed; the modes show the choice the runtime made at each length.

    python scripts/bench_prefill.py [--quick] [--out results/prefill_stream.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from hybrimoe_kt.core.cost import RooflineCost
from hybrimoe_kt.core.hardware import load_profile
from hybrimoe_kt.core.models import get_model
from hybrimoe_kt.core.strategies import get_strategy, slots_for, with_overrides
from hybrimoe_kt.measure.provenance import provenance
from hybrimoe_kt.runtime.device import Tier
from hybrimoe_kt.runtime.harness import StackShape, random_store, run_replay
from hybrimoe_kt.runtime.moe import HybridMoE
from hybrimoe_kt.runtime.replay import RoutingReplay
from hybrimoe_kt.sim.runner import SimSetup, simulate
from hybrimoe_kt.traces.synthetic import synthetic_trace

PROMPTS = (32, 512, 2048, 8192)
NO_STREAM = with_overrides(get_strategy("hybrimoe"), name="hybrimoe/no-stream", prefill_stream=False)


def simulated(profiles: Sequence[str], models: Sequence[str], prompts: Sequence[int], ratio: float,
              chunk: int) -> list[dict[str, Any]]:
    out = []
    for hw in profiles:
        profile = load_profile(hw)
        for m in models:
            model = get_model(m)
            for p in prompts:
                trace = synthetic_trace(model, n_requests=1, prompt_len=p, decode_len=1, seed=0)
                setup = SimSetup(trace, f"synthetic:{m}/p{p}", model, profile, prefill_chunk=chunk)
                recs = {r["strategy"]: r for r in simulate(setup, ["stock", "static-frequency", NO_STREAM,
                                                                   "hybrimoe"], [ratio])}
                on, off = recs["hybrimoe"], recs["hybrimoe/no-stream"]
                out.append({"hardware": hw, "model": m, "prompt_tokens": p,
                            "prefill_tok_s": {k: round(v["prefill_tok_s"], 1) for k, v in recs.items()},
                            "stream_over_no_stream": round(on["prefill_tok_s"] / off["prefill_tok_s"], 4),
                            "hybrimoe_over_stock": round(on["prefill_tok_s"] / recs["stock"]["prefill_tok_s"], 4),
                            "hybrimoe_over_static": round(on["prefill_tok_s"]
                                                          / recs["static-frequency"]["prefill_tok_s"], 4),
                            "layer_modes": on["prefill_layer_modes"],
                            "stage_copies": on["stage_copies"], "stage_used": on["stage_used"],
                            "stream_buffers_gib": on["memory_gib"].get("stream_buffers", 0.0),
                            "gpu_format": on["gpu_format"], "dense_format": on["dense_format"]})
                r = out[-1]
                print(f"SIMULATED {hw:14s} {m:16s} {p:5d} tok: prefill tok/s stock {r['prefill_tok_s']['stock']:8.0f}"
                      f"  static {r['prefill_tok_s']['static-frequency']:8.0f}  no-stream "
                      f"{r['prefill_tok_s']['hybrimoe/no-stream']:8.0f}  hybrimoe {r['prefill_tok_s']['hybrimoe']:8.0f}"
                      f"  (x{r['stream_over_no_stream']:.3f})  modes {r['layer_modes']}")
    return out


def _modes(moe: HybridMoE) -> dict[str, int]:
    """Count the mode of every prefill layer call the runtime's controller decides (stream/split/cpu)."""
    counts = {"stream": 0, "split": 0, "cpu": 0}
    decide = moe.controller.decide

    def rec(routing: Any, now: float, gpu_free: float = 0.0, is_prefill: bool = False) -> Any:
        d = decide(routing, now, gpu_free, is_prefill)
        if is_prefill:
            counts["stream" if d.staged else "split" if d.plan.gpu else "cpu"] += 1
        return d

    moe.controller.decide = rec  # type: ignore[method-assign]
    return counts


def measured(shape: StackShape, prompts: Sequence[int], ratio: float, decide_profile: str, repeats: int,
             seed: int) -> dict[str, Any]:
    store = random_store(shape, seed=seed)
    cost = RooflineCost.build(load_profile(decide_profile), shape.preset(), "bf16", "bf16")
    rows = []
    for p in prompts:
        trace = synthetic_trace(shape.model, n_requests=1, prompt_len=p, decode_len=1, seed=seed,
                                n_layers=shape.n_layers)
        replay = RoutingReplay(trace, shape.preset())
        steps = [s for s in replay.steps() if s.is_prefill]
        row: dict[str, Any] = {"prompt_tokens": p}
        for spec in (get_strategy("stock"), NO_STREAM, get_strategy("hybrimoe")):
            best = float("inf")
            modes: dict[str, int] = {}
            for i in range(repeats + 1):  # the first run warms kernels and allocations up: not timed
                moe = HybridMoE(store, Tier("cpu"), spec, slots_for(spec, shape.n_layers, shape.n_experts, ratio),
                                cost, shape.top_k, counts=trace.expert_counts(), cpu_backend="auto",
                                cpu_threads=torch.get_num_threads(), max_len=max(prompts))
                modes = _modes(moe)
                rec = run_replay(moe, replay, steps, seed=seed)
                if i:
                    best = min(best, sum(rec.forward_s))
            row[spec.name] = {"prefill_tok_s": round(p / best, 1), "wall_s": round(best, 4), "layer_modes": modes,
                              "staged": moe.stats.staged, "stage_copies": moe.pool.stage_copies}
        row["stream_over_no_stream"] = round(row["hybrimoe"]["prefill_tok_s"]
                                             / row["hybrimoe/no-stream"]["prefill_tok_s"], 4)
        rows.append(row)
        print(f"MEASURED (CPU stand-in) {p:5d} tok: stock {row['stock']['prefill_tok_s']:8.0f}  no-stream "
              f"{row['hybrimoe/no-stream']['prefill_tok_s']:8.0f}  hybrimoe {row['hybrimoe']['prefill_tok_s']:8.0f}"
              f" tok/s  modes {row['hybrimoe']['layer_modes']}")
    return {"label": "CPU stand-in: the GPU tier computes on this CPU (device cpu); decisions use the cost "
                     f"model of {decide_profile}", "shape": shape.describe(), "decide_profile": decide_profile,
            "cache_ratio": ratio, "repeats": repeats, "timing": "best of repeats after one warm-up run", "torch_threads": torch.get_num_threads(), "rows": rows}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profiles", default="rtx4090-ddr5,rtx5090-ddr5,rtx3090-ddr4,a6000-xeon10")
    ap.add_argument("--models", default="deepseek-v2-lite,qwen3-30b-a3b")
    ap.add_argument("--prompts", default=",".join(map(str, PROMPTS)))
    ap.add_argument("--cache-ratio", type=float, default=0.25)
    ap.add_argument("--chunk", type=int, default=8192, help="simulated prefill chunk (tokens per forward)")
    ap.add_argument("--decide-profile", default="rtx5090-ddr5", help="cost model the stand-in runtime decides with")
    ap.add_argument("--layers", type=int, default=2, help="MoE layers of the measured stack")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=704)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="small run for a smoke test (prompts up to 512)")
    ap.add_argument("--skip-measured", action="store_true")
    ap.add_argument("--out", default="results/prefill_stream.json")
    args = ap.parse_args(argv)
    prompts = [int(p) for p in args.prompts.split(",")]
    profiles, models = args.profiles.split(","), args.models.split(",")
    if args.quick:
        prompts, profiles, models = [p for p in prompts if p <= 512] or [32], profiles[:1], models[:1]
        args.layers, args.hidden, args.inter, args.repeats = 2, 128, 64, 1
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"simulated": {"label": "SIMULATED: cost model of each hardware preset, not a measurement",
                                         "chunk": args.chunk, "cache_ratio": args.cache_ratio,
                                         "rows": simulated(profiles, models, prompts, args.cache_ratio, args.chunk)}}
    if not args.skip_measured:
        shape = StackShape("deepseek-v2-lite", args.layers, args.hidden, args.inter)
        out["measured_cpu_stand_in"] = measured(shape, prompts, args.cache_ratio, args.decide_profile,
                                                args.repeats, args.seed)
    out.update(provenance(seed=args.seed, quick=args.quick, wall_s=round(time.perf_counter() - t0, 1)))
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
