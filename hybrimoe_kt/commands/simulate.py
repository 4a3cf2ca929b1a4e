"""``hybrimoe-kt simulate``: replay a routing trace through strategies and print the comparison."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

from hybrimoe_kt.core.hardware import HardwareProfile
from hybrimoe_kt.core.models import MODEL_PRESETS, ModelPreset, get_model
from hybrimoe_kt.sim.defaults import DEFAULT_STRATEGIES, default_trace, infer_model

log = logging.getLogger(__name__)


def mode_label(setup: object) -> str:
    """What the figures charge and whether a format is a projection, for titles and headers."""
    host = ("host time from the profile" if getattr(setup, "host_cost") == "profile"
            else "host time ZERO (ablation)")
    fmt = f"CPU {getattr(setup, 'cpu_format')}, GPU {getattr(setup, 'gpu_format')}"
    return f"{host}; {fmt}" + (" (projection: a format the runtime cannot run yet)"
                               if getattr(setup, "projection") else "")


DEFAULT_CACHE_RATIOS = "0.25,0.5,0.75"
CacheSize = tuple[str, float]  # ("ratio", r), ("max", 0.0) or ("gib", G)


def parse_cache_sizes(ratio_text: Optional[str], gib_text: Optional[str]) -> list[CacheSize]:
    """``--cache-ratio 0.25,max`` or ``--cache-gib 4,8`` (not both), checked before any work."""
    if ratio_text is not None and gib_text is not None:
        raise ValueError(f"--cache-ratio {ratio_text} and --cache-gib {gib_text} both size the cache: pass one")
    flag, text = ("--cache-gib", gib_text) if gib_text is not None else ("--cache-ratio", ratio_text or
                                                                         DEFAULT_CACHE_RATIOS)
    items = [x.strip() for x in text.split(",") if x.strip()]
    out: list[CacheSize] = []
    for x in items:
        if flag == "--cache-ratio" and x == "max":
            out.append(("max", 0.0))
            continue
        try:
            v = float(x)
        except ValueError:
            raise ValueError(f"{flag} takes comma-separated " + ("fractions like 0.25,0.5,max" if flag ==
                             "--cache-ratio" else "sizes in GiB like 4,8") + f", got {text!r}") from None
        if flag == "--cache-ratio" and not 0.0 <= v <= 1.0:
            raise ValueError(f"--cache-ratio values must be fractions in [0, 1] or max, got {text!r}")
        if flag == "--cache-gib" and not (v >= 0.0 and v < float("inf")):
            raise ValueError(f"--cache-gib values must be GiB >= 0, got {text!r}")
        out.append(("ratio" if flag == "--cache-ratio" else "gib", v))
    if not out:
        raise ValueError(f"{flag} needs at least one value, got {text!r}")
    return out


def resolve_cache_sizes(sizes: list[CacheSize], model: ModelPreset, gpu_format: str,
                        profile: HardwareProfile, strategies: Sequence[str] = ()) -> list[float]:
    """Cache ratios of the parsed sizes for this model and GPU (``max``: the largest that fits beside
    the staging buffers of any of ``strategies`` that streams prefills)."""
    from hybrimoe_kt.core.memory import cache_ratio_for_gib, max_cache_ratio
    from hybrimoe_kt.core.strategies import get_strategy
    from hybrimoe_kt.core.stream import staging_slots
    from hybrimoe_kt.sim.runner import RUNTIME_DENSE_FORMAT

    ratios: list[float] = []
    for kind, v in sizes:
        if kind == "max":
            if not profile.gpu_mem_gib > 0:
                raise ValueError(f"--cache-ratio max needs the GPU memory size, but hardware profile "
                                 f"{profile.name} has no gpu_mem_gib: add it to the profile or pass ratios")
            staging = max([staging_slots(sp.stream_buffer, model.n_experts) for sp in map(get_strategy, strategies)
                           if sp.prefill_stream], default=0)
            r = max_cache_ratio(model, gpu_format, profile.gpu_mem_gib, dense_format=RUNTIME_DENSE_FORMAT,
                                staging_experts=staging)
            print(f"--cache-ratio max: {r:.4g} for {model.name} ({gpu_format}) on {profile.name} "
                  f"({profile.gpu_mem_gib:g} GiB)")
        elif kind == "gib":
            r = cache_ratio_for_gib(model, gpu_format, v)
            print(f"--cache-gib {v:g}: cache ratio {r:.4g} for {model.name} ({gpu_format})")
        else:
            r = v
        if r not in ratios:
            ratios.append(r)
    return ratios


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="replay a routing trace through strategies (simulated timings)",
                       description=__doc__)
    p.add_argument("--trace", default=None,
                   help="trace file (NAME.npz/.json or stem) or synthetic:PRESET; default: the real "
                        "Mixtral trace in ../shared/traces when present, else synthetic:mixtral-8x7b")
    from hybrimoe_kt.traces.workloads import WORKLOADS

    p.add_argument("--workload", default=None,
                   help="instead of --trace: synthetic traces of a workload preset for --model, one "
                        "per prompt length and batch (" +
                        "; ".join(f"{w.name}: {w.description}" for w in WORKLOADS.values()) + ")")
    p.add_argument("--model", default=None, help=f"model preset ({', '.join(MODEL_PRESETS)}); "
                   "default: inferred from the trace; required with --workload")
    p.add_argument("--hardware", default="rtx4090-ddr5", help="hardware profile preset name or JSON path")
    p.add_argument("--cache-ratio", default=None, help="GPU cache sizes as fractions of the routed "
                   f"experts, comma-separated (default {DEFAULT_CACHE_RATIOS}); 'max' = the largest that fits "
                   "the profile's GPU memory beside the resident weights, KV cache and reserve")
    p.add_argument("--cache-gib", default=None, help="instead of --cache-ratio: expert cache sizes in GiB, "
                   "comma-separated (whole slots per MoE layer in the GPU format)")
    p.add_argument("--strategies", default=DEFAULT_STRATEGIES, help="comma-separated strategy names")
    p.add_argument("--cpu-format", default="q4_k_m", help="weight format of the CPU experts (the runtime "
                   "runs bf16, q8_0, q4_k_m; others are labelled projection)")
    p.add_argument("--gpu-format", default="host", help="weight format of the GPU expert slots; 'host' "
                   "(default): the CPU tier's format, copied unchanged as the runtime does (it runs bf16 and a "
                   "GGUF model's own q8_0 / q4_k_m blocks; others, e.g. int4-g128, are labelled projection)")
    p.add_argument("--host-cost", choices=("profile", "zero"), default="profile",
                   help="host time per layer call: from the hardware profile's host section (default), "
                        "or zero (ablation only; labelled in the table, JSON and plot)")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prefill chunk size in tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of synthetic traces")
    p.add_argument("--json", dest="json_out", default=None, help="write the records to this JSON file")
    p.add_argument("--plot", default=None, help="write a PNG plot of decode tok/s and hit rate")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hybrimoe_kt.core.hardware import load_profile
    from hybrimoe_kt.core.strategies import get_strategy
    from hybrimoe_kt.measure.provenance import provenance
    from hybrimoe_kt.sim.report import format_table, plot, table_legend
    from hybrimoe_kt.sim.runner import SimSetup, simulate
    from hybrimoe_kt.traces.spec import parse_trace_spec

    if args.workload is not None and args.trace is not None:
        raise ValueError(f"--workload {args.workload} and --trace {args.trace} both name the input: "
                         f"pass one of them")
    if args.workload is not None and not args.model:
        raise ValueError(f"--workload {args.workload} needs --model to generate its traces: pass "
                         f"--model (one of {', '.join(MODEL_PRESETS)})")
    spec = args.trace or default_trace()
    sizes = parse_cache_sizes(args.cache_ratio, args.cache_gib)
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    for n in names:
        get_strategy(n)  # fail on a bad name before any work
    if "stock" not in names:
        names.insert(0, "stock")  # speedups are relative to it
    profile = load_profile(args.hardware)
    if args.gpu_format == "host":  # the slots hold the CPU tier's bytes
        args.gpu_format = args.cpu_format
    if args.workload is not None:
        ratios = resolve_cache_sizes(sizes, get_model(args.model), args.gpu_format, profile, names)
        return run_workload(args, names, ratios, profile)
    trace = parse_trace_spec(spec, seed=args.seed)
    model = get_model(args.model) if args.model else infer_model(
        trace.model, trace.n_layers, trace.n_experts, trace.top_k)
    ratios = resolve_cache_sizes(sizes, model, args.gpu_format, profile, names)
    trace_name = spec if spec.startswith("synthetic:") else Path(spec).name.removesuffix(".npz").removesuffix(".json")
    setup = SimSetup(trace, trace_name, model, profile, args.cpu_format, args.gpu_format, args.prefill_chunk,
                     host_cost=args.host_cost)
    records = simulate(setup, names, ratios, progress=not args.no_progress,
                       provenance=provenance(seed=args.seed, trace_spec=spec))
    print(f"SIMULATED: trace {trace_name} ({trace.n_tokens} tokens, {trace.n_layers} MoE layers, "
          f"{trace.n_skipped} unknown entries skipped), model {model.name}, hardware profile "
          f"{profile.name} (cost model, not a measurement); {mode_label(setup)}")
    if setup.time_scale != 1.0:
        print(f"  the trace has {trace.n_layers} of {model.n_moe_layers} MoE layers: times extrapolated "
              f"x{setup.time_scale:.2f}")
    print(format_table(records))
    print(table_legend())
    print("bounds (no host time): oracle = the best clairvoyant variant (Belady eviction and perfect prefetch "
          "through the same copy queue, or a deployable structure placed from the replayed requests' own "
          "counts); roofline = every expert on the GPU when used (perfect prefetch, free transfers)")
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
        print(f"wrote {out}")
    if args.plot:
        title = f"SIMULATED - {trace_name} - {model.name} on {profile.name}"
        print(f"wrote {plot(records, Path(args.plot), title, host_cost=setup.host_cost, projection=setup.projection)}")
    return 0


def run_workload(args: argparse.Namespace, names: list[str], ratios: list[float],
                 profile: HardwareProfile) -> int:
    """``--workload``: simulate every trace of the preset; records carry the workload, batch and lengths."""
    from hybrimoe_kt.measure.provenance import provenance
    from hybrimoe_kt.sim.report import format_table, plot, table_legend
    from hybrimoe_kt.sim.runner import SimSetup, simulate
    from hybrimoe_kt.traces.workloads import get_workload, workload_traces

    workload = get_workload(args.workload)  # fails on a bad name before any work
    model = get_model(args.model)
    records: list[dict] = []
    for wt in workload_traces(workload, model, seed=args.seed):
        setup = SimSetup(wt.trace, wt.label, model, profile, args.cpu_format,
                         args.gpu_format, args.prefill_chunk, host_cost=args.host_cost)
        recs = simulate(setup, names, ratios, progress=not args.no_progress,
                        provenance=provenance(seed=args.seed, trace_spec=f"workload:{workload.name}"))
        for r in recs:
            r.update(wt.record_fields())
        records.extend(recs)
        print(f"SIMULATED: workload {wt.label} (batch {wt.batch}, prompt {wt.prompt_len}, output "
              f"{wt.output_len}, {wt.trace.n_tokens} tokens), model {model.name}, hardware profile "
              f"{profile.name} (cost model, not a measurement); {mode_label(setup)}")
        print(format_table(recs))
        print(table_legend())
        if args.plot:
            out = Path(args.plot)
            path = out.with_name(f"{out.stem}-p{wt.prompt_len}-b{wt.batch}{out.suffix or '.png'}")
            title = f"SIMULATED - {wt.label} - {model.name} on {profile.name}"
            print(f"wrote {plot(recs, path, title, host_cost=setup.host_cost, projection=setup.projection)}")
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
        print(f"wrote {out}")
    return 0
