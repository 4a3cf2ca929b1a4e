"""``hybrimoe-kt calibrate``: measure this machine and write a hardware profile JSON."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hybrimoe_kt.core.hardware import PRESET_NAMES


def _tokens(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tokens must be comma-separated integers like 1,2,4,8, "
                                         f"got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"--tokens needs positive integers, got {text!r}")
    return vals


def _err(pred: float, meas: float) -> str:
    return f"{100 * (pred - meas) / meas:>+6.1f}%" if meas > 0 else "dropped"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("calibrate", help="measure the CPU (and GPU) expert tiers; write a profile JSON",
                       description=__doc__)
    p.add_argument("--backend", choices=("auto", "kt-kernel", "torch"), default="auto",
                   help="CPU expert kernel (auto: kt-kernel when importable)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores - 1)")
    p.add_argument("--hidden", type=int, default=1024, help="expert hidden size H")
    p.add_argument("--intermediate", type=int, default=2048, help="expert intermediate size I")
    p.add_argument("--experts", type=int, default=8, help="experts in the measured layer")
    p.add_argument("--top-k", type=int, default=2, help="experts per timed call")
    p.add_argument("--tokens", type=_tokens, default=(1, 2, 4, 8, 16, 32, 64, 128),
                   help="token counts per expert to sweep (default 1,2,4,8,16,32,64,128)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per point (the minimum is used)")
    p.add_argument("--rotate-mib", type=int, default=128,
                   help="weights cycled through per shape so experts come from DRAM (default 128, "
                        "several times the last-level cache)")
    p.add_argument("--gpu-from", default="rtx4090-ddr5", choices=PRESET_NAMES,
                   help="preset for the GPU tier and PCIe link when no CUDA device is present")
    p.add_argument("--host-strategies", default="stock,static-frequency,lru-offload,hybrimoe-paper,hybrimoe",
                   help="strategies whose host time per layer call is measured from the runtime (no-op "
                        "kernels) into the profile's host section")
    p.add_argument("--skip-host", action="store_true", help="do not measure host time (the profile then "
                   "has no host section: simulate needs --host-cost zero with it)")
    p.add_argument("--name", default=None, help="profile name (default: the output file's stem)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--out", required=True, type=Path, help="profile JSON to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hybrimoe_kt.measure.calibrate import CalibrateConfig, run_calibration

    cfg = CalibrateConfig(backend=args.backend, threads=args.threads, hidden=args.hidden,
                          intermediate=args.intermediate, experts=args.experts, top_k=args.top_k,
                          tokens=tuple(args.tokens), repeats=args.repeats, gpu_from=args.gpu_from,
                          rotate_mib=args.rotate_mib,
                          name=args.name or args.out.stem)
    gpu_measure = None
    import torch

    if torch.cuda.is_available():
        from hybrimoe_kt.measure.calibrate_gpu import measure_gpu

        def gpu_measure():  # type: ignore[no-untyped-def]
            return measure_gpu(cfg.hidden, cfg.intermediate, cfg.tokens)

    from hybrimoe_kt.core.strategies import get_strategy

    host_strategies = None
    if not args.skip_host:
        host_strategies = tuple(n.strip() for n in args.host_strategies.split(",") if n.strip())
        for n in host_strategies:
            if get_strategy(n).clairvoyant:
                raise ValueError(f"--host-strategies: {n} is a bound (simulator only); it has no host time")
    res = run_calibration(cfg, progress=not args.no_progress, gpu_measure=gpu_measure,
                          host_strategies=host_strategies)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(res.profile.to_json())
    m = res.profile.measured
    print(f"CPU samples ({m['backend']} {m['backend_variant']}, {m['threads']} thread(s), min of "
          f"{cfg.repeats}; per-expert time = (call - call overhead) / {cfg.top_k}; "
          f"call overhead = smallest masked call):")
    print(f"{'I':>6} {'tokens':>6} {'call ms':>9} {'masked ms':>9} {'expert ms':>9} {'model ms':>9} "
          f"{'err':>7}")
    for row in res.raw:
        meas, pred = row["per_expert_s"], row["predicted_per_expert_s"]
        call, masked = min(row["call_s"]), min(row["masked_call_s"])
        print(f"{row['intermediate']:>6} {row['tokens']:>6} {call * 1e3:>9.3f} {masked * 1e3:>9.3f} "
              f"{meas * 1e3:>9.3f} {pred * 1e3:>9.3f} {_err(pred, meas)}")
    c = res.profile.cpu
    print(f"fit: mem_bw {c.mem_bw_gbs:.1f} GB/s ({m['fit']['mem_bw_source']}), {c.tflops * 1e3:.1f} "
          f"GFLOP/s, expert overhead {c.expert_overhead_us:.1f} us, call overhead "
          f"{c.call_overhead_us:.1f} us; rel. RMS error {100 * m['fit']['rel_rms']:.1f}%; "
          f"machine read bandwidth {m['machine_read_bw_gbs']:.1f} GB/s")
    print(f"GPU/PCIe: {m['gpu_source']}")
    if res.profile.host is not None:
        print("host time per MoE layer call (runtime, no-op kernels; GPU tier = CPU stand-in here):")
        for name, phases in sorted(res.profile.host.strategies.items()):
            print("  " + f"{name:17s}" + "  ".join(f"{ph}: critical {t.critical * 1e6:7.1f} us, background "
                                                  f"{t.background * 1e6:6.1f} us" for ph, t in phases.items()))
    print(f"wrote {args.out}")
    return 0
