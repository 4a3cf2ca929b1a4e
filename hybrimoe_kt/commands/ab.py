"""``hybrimoe-kt ab``: the same model and prompts under two rule files (e.g. stock vs hybrimoe), one after
the other, greedy; prints both sides and B/A, the greedy token agreement, and - when the GPU tier is the
CPU stand-in - the simulator's projection of both strategies on a hardware profile (SIMULATED)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

from hybrimoe_kt.commands.runtime_flags import add_kt_cuda_graph, resolve_cuda_graph


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ab", help="A/B two rule files on one model: speed, hit rate, token agreement",
                       description=__doc__)
    p.add_argument("--model-path", "--model_path", dest="model_path", required=True,
                   help="local Hugging Face model folder")
    p.add_argument("--rules-a", required=True, help="rule file A (the baseline, e.g. *-stock.yaml)")
    p.add_argument("--rules-b", required=True, help="rule file B (e.g. *-hybrimoe.yaml)")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=32,
                   help="tokens generated per prompt")
    p.add_argument("--cpu-infer", "--cpu_infer", dest="cpu_infer", type=int, default=None, metavar="T",
                   help="CPU expert threads on both sides (overrides the rule files' cpu_threads)")
    p.add_argument("--cuda-graph", choices=("auto", "on", "off"), default="auto",
                   help="decode steps in a CUDA graph on both sides: auto (default) = where supported")
    add_kt_cuda_graph(p)
    p.add_argument("--json", dest="json_out", required=True, help="write the comparison to this JSON file")
    p.add_argument("--plot", default=None, help="write a PNG bar chart of prefill/decode tok/s")
    p.add_argument("--hardware", default="rtx4090-ddr5",
                   help="hardware profile of the simulated projection (preset name or JSON path)")
    p.add_argument("--sim-trace", default=None, help="trace of the simulated projection; default: the real "
                   "Mixtral trace in ../shared/traces when present, else synthetic:mixtral-8x7b")
    p.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> list[str]:
    """User errors before any model load; returns the prompts."""
    from hybrimoe_kt.core.hardware import load_profile
    from hybrimoe_kt.kt.ab_compare import read_prompts
    from hybrimoe_kt.kt.rule_strategy import rule_strategy
    from hybrimoe_kt.kt.rules import load_rules

    if not (Path(args.model_path) / "config.json").is_file():
        raise ValueError(f"--model-path {args.model_path} is not a model folder (no config.json)")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.cpu_infer is not None and args.cpu_infer < 1:
        raise ValueError(f"--cpu-infer must be >= 1 thread, got {args.cpu_infer}")
    resolve_cuda_graph(args)
    for path in (args.rules_a, args.rules_b):
        rule_strategy(load_rules(path))
    load_profile(args.hardware)
    return read_prompts(args.prompts)


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def table(a: dict[str, Any], b: dict[str, Any], r: dict[str, Any]) -> str:
    rows = [("", f"A: {Path(a['rules']).stem}", f"B: {Path(b['rules']).stem}", "B/A"),
            ("strategy", a["strategy"], b["strategy"], ""),
            ("prefill tok/s", _fmt(a["prefill_tok_s"]), _fmt(b["prefill_tok_s"]), _fmt(r["prefill_tok_s"], ".3f")),
            ("decode tok/s", _fmt(a["decode_tok_s"]), _fmt(b["decode_tok_s"]), _fmt(r["decode_tok_s"], ".3f")),
            ("hit rate", _fmt(a["hit_rate"], ".1%"), _fmt(b["hit_rate"], ".1%"), _fmt(r["hit_rate"], ".3f")),
            ("experts CPU/GPU", f"{a['cpu_experts']}/{a['gpu_experts']}", f"{b['cpu_experts']}/{b['gpu_experts']}",
             ""),
            ("GPU share", _fmt(a["gpu_share"], ".1%"), _fmt(b["gpu_share"], ".1%"), _fmt(r["gpu_share"], ".3f")),
            ("GB copied", _fmt(a["gb_copied"], ".4f"), _fmt(b["gb_copied"], ".4f"), _fmt(r["gb_copied"], ".3f"))]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def plot(result: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = result["a"], result["b"]
    names = [f"A: {Path(a['rules']).stem}", f"B: {Path(b['rules']).stem}"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, title in ((axes[0], "prefill_tok_s", "prefill tok/s"), (axes[1], "decode_tok_s", "decode tok/s")):
        ax.bar(names, [a[key], b[key]], color=["tab:gray", "tab:blue"])
        ax.set_title(title)
    fig.suptitle(f"measured, GPU tier: {result['gpu_tier']['b']}", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def run(args: argparse.Namespace) -> int:
    prompts = check_args(args)
    from transformers.utils import logging as hf_logging

    from hybrimoe_kt.kt.ab_compare import agreement, projection, ratios, run_side
    from hybrimoe_kt.measure.provenance import provenance
    from hybrimoe_kt.sim.defaults import default_trace

    hf_logging.disable_progress_bar()
    overrides = {"cpu_threads": args.cpu_infer} if args.cpu_infer is not None else None
    graph = {"auto": None, "on": True, "off": False}[args.cuda_graph]
    a = run_side(args.model_path, args.rules_a, prompts, args.max_new_tokens, overrides, cuda_graph=graph)
    b = run_side(args.model_path, args.rules_b, prompts, args.max_new_tokens, overrides, cuda_graph=graph)
    agree = agreement(a["tokens"], b["tokens"])
    stand_in = not (a["gpu_tier_is_gpu"] and b["gpu_tier_is_gpu"])
    r = ratios(a, b)
    sim: Optional[dict[str, Any]] = None
    trace = args.sim_trace or default_trace()
    if stand_in:
        sim = projection(a["strategy"], a["cache_ratio"], b["strategy"], b["cache_ratio"], args.hardware, trace)
    result = {"kind": "ab", "model_path": str(args.model_path), "prompts": len(prompts),
              "max_new_tokens": args.max_new_tokens, "a": a, "b": b, "ratio": r, "agreement": agree,
              "gpu_tier": {"a": a["gpu_tier"], "b": b["gpu_tier"], "stand_in": stand_in},
              "simulated_projection": sim, "provenance": provenance(sim_trace=trace if stand_in else None)}
    print(f"A/B on {args.model_path}: {len(prompts)} prompts x {args.max_new_tokens} greedy tokens (measured)")
    print(table(a, b, r))
    print(f"greedy token agreement: {agree['overall']:.1%} ({agree['matched']} of {agree['compared']}), "
          f"{agree['identical_prompts']} of {len(prompts)} prompts identical; first divergence per prompt: "
          f"{[p['first_divergence'] for p in agree['per_prompt']]}")
    if stand_in:
        print(f"GPU tier: {b['gpu_tier']} - measured speeds say nothing about a real GPU")
        sa, sb = sim["a"], sim["b"]  # type: ignore[index]
        print(f"SIMULATED on {sim['hardware']} ({sim['model']}, trace {sim['trace']}): "  # type: ignore[index]
              f"decode {sa['decode_tok_s']:.2f} -> {sb['decode_tok_s']:.2f} tok/s "
              f"(B/A {_fmt(sim['ratio']['decode_tok_s'], '.3f')}), prefill {sa['prefill_tok_s']:.1f} -> "  # type: ignore[index]
              f"{sb['prefill_tok_s']:.1f} tok/s, hit rate {sa['hit_rate']:.1%} -> {sb['hit_rate']:.1%} "
              f"(cost model, not a measurement)")
        for note in sim.get("memory_notes", ()):  # type: ignore[union-attr]
            print(f"  {note}")
    else:
        print(f"GPU tier: {b['gpu_tier']}")
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}")
    if args.plot:
        print(f"wrote {plot(result, Path(args.plot))}")
    return 0
