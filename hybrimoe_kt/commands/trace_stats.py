"""``hybrimoe-kt trace-stats``: statistics of routing traces side by side. With no trace given, the
real traces of the shared folder are compared with synthetic traces of the same shapes."""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("trace-stats", help="print routing-trace statistics side by side")
    p.add_argument("traces", nargs="*", help="trace files/stems or synthetic:PRESET specs")
    p.add_argument("--shared", default=str(REPO.parent / "shared" / "traces"),
                   help="folder of real traces compared when no trace is given")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def _matching_synthetic(real, seed: int):
    """A synthetic trace with the real trace's model shape, layer count and request lengths."""
    from hybrimoe_kt.core.models import MODEL_PRESETS, ModelPreset
    from hybrimoe_kt.traces.synthetic import as_batched, synthetic_trace

    preset = next((p for p in MODEL_PRESETS.values()
                   if p.n_experts == real.n_experts and p.top_k == real.top_k), None)
    if preset is None:
        raise ValueError(f"no model preset with {real.n_experts} experts top-{real.top_k}")
    if isinstance(preset, ModelPreset) and preset.n_moe_layers < real.n_layers:
        raise ValueError(f"preset {preset.name} has fewer layers than {real.model}")
    batched = real.step is not None and not real.requests()
    fw = real.forwards()
    # a batched log: as many requests as rows in its largest decode step, interleaved per step
    n_req = max((f.n_tokens for f in fw if not f.is_prefill), default=1) if batched \
        else max(1, len(real.requests()))
    prompt = int(real.is_prefill.sum()) // n_req
    decode = max(1, int((~real.is_prefill).sum()) // n_req)
    syn = synthetic_trace(preset, n_requests=n_req, prompt_len=prompt, decode_len=decode, seed=seed,
                          n_layers=real.n_layers)
    return preset.name, as_batched(syn) if batched else syn


def run(args: argparse.Namespace) -> int:
    from hybrimoe_kt.traces.spec import parse_trace_spec
    from hybrimoe_kt.traces.stats import compare_stats, format_table, trace_stats

    names, traces = [], []
    if args.traces:
        for spec in args.traces:
            names.append(Path(spec).name if not spec.startswith("synthetic:") else spec)
            traces.append(parse_trace_spec(spec, args.seed))
    else:
        shared = Path(args.shared)
        files = sorted(shared.glob("*.npz")) if shared.is_dir() else []
        if not files:
            raise ValueError(f"no trace given and no real traces in {shared}; pass TRACE arguments "
                             f"or --shared DIR")
        for f in files:
            real = parse_trace_spec(str(f), args.seed)
            preset, syn = _matching_synthetic(real, args.seed)
            names += [f.stem[:28], f"synthetic:{preset}"]
            traces += [real, syn]
    print(format_table(compare_stats([trace_stats(t) for t in traces], names)))
    return 0
