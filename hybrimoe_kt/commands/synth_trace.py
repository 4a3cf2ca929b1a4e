"""``hybrimoe-kt synth-trace``: write a calibrated synthetic routing trace for a model preset."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("synth-trace", help="write a seeded synthetic routing trace")
    p.add_argument("--model", required=True, help="model preset name (see hybrimoe_kt.core.models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output stem: writes STEM.npz and STEM.json")
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--decode-len", type=int, default=128)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hybrimoe_kt.traces.format import save_trace
    from hybrimoe_kt.traces.synthetic import synthetic_trace

    trace = synthetic_trace(args.model, n_requests=args.requests, prompt_len=args.prompt_len,
                            decode_len=args.decode_len, seed=args.seed)
    path = save_trace(trace, args.out)
    print(f"wrote {path} and .json: {trace.n_tokens} tokens, {trace.n_layers} layers, "
          f"{trace.n_experts} experts, top-{trace.top_k}")
    return 0
