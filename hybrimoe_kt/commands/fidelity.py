"""``hybrimoe-kt fidelity``: replay routing through the runtime and through the simulator with a hardware
profile; report the per-layer and per-step time error (the profile's fidelity on this machine).

Every layer of the stack runs an attention-like part and the model's shared experts too (--no-dense: routed
experts only), and the simulator charges the profile's host time per layer call. The +-20% goal applies
to the CPU tier (strategy stock). Without a GPU the runtime's GPU tier is the CPU
stand-in, which the profile's GPU tier does not describe: other strategies' rows are informative only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from hybrimoe_kt.core.models import MODEL_PRESETS


def add_parser(sub: Any) -> None:
    p = sub.add_parser("fidelity", help="runtime vs simulator per-layer time error for a hardware profile",
                       description=__doc__)
    p.add_argument("--profile", required=True, help="hardware profile JSON (from calibrate) or preset name")
    p.add_argument("--trace", default=None, help="trace file (NAME.npz/.json or stem) or synthetic:PRESET "
                   "(default: a synthetic trace of --model)")
    p.add_argument("--model", default="deepseek-v2-lite", help=f"model preset for expert count and top-k "
                   f"({', '.join(MODEL_PRESETS)})")
    p.add_argument("--layers", type=int, default=4, help="MoE layers in the stack")
    p.add_argument("--hidden", type=int, default=1024, help="reduced hidden size of the experts")
    p.add_argument("--intermediate", type=int, default=512, help="reduced expert intermediate size")
    p.add_argument("--strategy", default="stock,static-frequency,hybrimoe",
                   help="comma-separated strategies (stock = CPU tier only, the one the goal applies to)")
    p.add_argument("--steps", type=int, default=64, help="decode steps replayed (with the prefill before them)")
    p.add_argument("--requests", type=int, default=2, help="synthetic trace: requests")
    p.add_argument("--prompt-len", type=int, default=40, help="synthetic trace: prompt tokens per request")
    p.add_argument("--prefill-chunk", type=int, default=16, help="prefill chunk size in tokens")
    p.add_argument("--cache-ratio", type=float, default=0.25, help="GPU cache size (fraction of experts)")
    p.add_argument("--repeats", type=int, default=5, help="stock runs; each layer call keeps its fastest")
    p.add_argument("--backend", choices=("auto", "kt-kernel", "torch"), default="auto",
                   help="CPU expert kernel (auto: kt-kernel when importable)")
    p.add_argument("--threads", type=int, default=1, help="CPU kernel and torch threads")
    p.add_argument("--one-cpu-pool", action="store_true",
                   help="diagnostic: every layer runs on layer 0's CPU backend (one kt-kernel worker pool "
                        "instead of one per layer); timings only, the outputs are not the stack's")
    p.add_argument("--no-dense", dest="dense", action="store_false",
                   help="routed experts only: no attention-like part or shared experts in the layers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", default=None, help="write the report to this JSON file")
    p.set_defaults(func=run)


def _pct(v: Any) -> str:
    return "     -" if v is None else f"{100 * v:+6.1f}%"


def _abs(v: Any) -> str:
    return "     -" if v is None else f"{100 * v:6.1f}%"


def _frac(v: Any) -> str:
    return "    -" if v is None else f"{100 * v:4.0f}%"


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{'strategy':17s} {'level':6s} {'phase':8s} {'n':>4s} {'meas ms':>9s} {'pred ms':>9s} "
             f"{'median':>7s} {'mean|e|':>7s} {'p90|e|':>7s} {'<=20%':>5s} {'p90':>7s}  note"]
    for name, row in report["strategies"].items():
        note = "CPU tier: goal +-20%" if row["goal_applies"] else "CPU stand-in GPU tier: informative only"
        for level in ("per_layer", "per_step"):
            for phase in ("decode", "prefill"):
                s = row[level][phase]
                if not s["n"]:
                    continue
                lines.append(f"{name:17s} {level[4:]:6s} {phase:8s} {s['n']:4d} "
                             f"{s['measured_median_ms']:9.3f} {s['predicted_median_ms']:9.3f} "
                             f"{_pct(s['median'])} {_abs(s['mean_abs']):>7s} {_abs(s['p90_abs']):>7s} "
                             f"{_frac(s['within_20pct'])} {_pct(s['p90'])}  {note}")
    shares = {n: r["process_cpu_per_wall"] for n, r in report["strategies"].items()}
    lines.append(f"process CPU time / wall time per run (all threads; the CPU kernel's worker and the "
                 f"Python thread): {shares}")
    g = report["goal"]
    if g.get("evaluated"):
        lines.append(f"goal ({g['criterion']}): decode {'met' if g['decode_met'] else 'NOT met'}"
                     f" (excess {_pct(g['decode_excess_over_goal']).strip()}), prefill "
                     f"{'met' if g['prefill_met'] else 'NOT met'} (excess "
                     f"{_pct(g['prefill_excess_over_goal']).strip()})")
    lines.append("median/mean|e|/p90|e|: relative error (predicted - measured) / measured; p90: signed "
                 "90th percentile (the fastest tenth of the calls)")
    lines.append(f"busy CPUs (other processes) before/after: {report['busy_cpus_before']} / "
                 f"{report['busy_cpus_after']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from hybrimoe_kt.core.hardware import load_profile
    from hybrimoe_kt.measure.fidelity_run import FidelityConfig, run_fidelity
    from hybrimoe_kt.measure.provenance import provenance

    profile = load_profile(args.profile)  # a bad path fails here, before any work
    cfg = FidelityConfig(trace=args.trace, model=args.model, layers=args.layers, hidden=args.hidden,
                         intermediate=args.intermediate,
                         strategies=tuple(s.strip() for s in args.strategy.split(",") if s.strip()),
                         steps=args.steps, requests=args.requests, prompt_len=args.prompt_len,
                         prefill_chunk=args.prefill_chunk, cache_ratio=args.cache_ratio,
                         repeats=args.repeats, backend=args.backend, threads=args.threads, seed=args.seed,
                         one_cpu_pool=args.one_cpu_pool, dense=args.dense)
    body = run_fidelity(cfg, profile)
    report = {**provenance(profile=args.profile, seed=args.seed), "profile_used": json.loads(profile.to_json()),
              **body}
    print(f"FIDELITY: {report['label']}")
    print(f"shape {report['shape']}; CPU backend {report['cpu_backend']}; profile {profile.name}")
    print(f"host time: {report['host_time']}; non-MoE: {report['cost_model']['non_moe_terms']}")
    print(format_table(report))
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
        print(f"wrote {out}")
    return 0
