"""Measure the runtime's host time per layer call on this machine and write the scaled estimate into
every hardware preset's ``host`` section (core/profiles/*.json); the measurement itself goes to
results/host-this-machine.json (commit, machine, seed).

A preset's estimate = this machine's measurement x a factor: this machine's single-thread speed over the
preset CPU's, from boost clocks and relative per-clock performance (an estimate, stated per preset).
Host work is single-threaded Python and torch dispatch, so single-thread speed is what scales it. On a
real GPU, kernel launches add host time the CPU stand-in does not pay; the estimate does not include it.

The factors are stated against the reference machine below. Measured on another machine, pass
``--machine-factor F``: that machine's host time over the reference's, measured by running the
reference measurement's own commit there (a ``git worktree``; ``measure_host`` on stock and
static-frequency) and comparing with the reference's figures for them; the presets then get the
measurement / F x their factor.

    python scripts/preset_host.py [--seed 0] [--machine-factor F --machine-note "..."]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

import numpy as np

from hybrimoe_kt.core.host import HostCosts, HostTime
from hybrimoe_kt.measure.host import estimate_for, measure_host
from hybrimoe_kt.measure.provenance import provenance

REPO = Path(__file__).resolve().parent.parent
PROFILES = REPO / "hybrimoe_kt" / "core" / "profiles"
# this machine: AMD EPYC (Zen 4, family 25 model 17) cloud VM, ~3.7 GHz boost
HERE = "a Zen 4 EPYC cloud core at ~3.7 GHz"
# preset -> (factor = its host time / this machine's, reason)
FACTORS: dict[str, tuple[float, str]] = {
    "rtx4090-ddr5": (0.65, "Ryzen 9 7950X class, Zen 4 at 5.7 GHz boost vs " + HERE + ": 3.7/5.7"),
    "rtx5090-ddr5": (0.57, "Ryzen 9 9950X class, Zen 5 at 5.7 GHz boost (~+15% per clock over Zen 4) vs "
                     + HERE + ": 3.7/(5.7 x 1.15)"),
    "rtx3090-ddr4": (0.87, "Ryzen 9 5950X class, Zen 3 at 4.9 GHz boost (~13% less per clock than Zen 4) vs "
                     + HERE + ": 3.7/(4.9 x 0.87)"),
    "a6000-tr5995wx": (0.95, "Threadripper PRO 5995WX, Zen 3 at 4.5 GHz boost vs " + HERE
                       + ": 3.7/(4.5 x 0.87)"),
    "rtx4080-2x8452y": (1.15, "Xeon Platinum 8452Y, Sapphire Rapids at 3.2 GHz turbo (about Zen 4 per clock) vs "
                        + HERE + ": 3.7/3.2"),
    "a6000-xeon10": (1.15, "Xeon Gold 5220R, Cascade Lake at 4.0 GHz turbo (~20% less per clock than Zen 4) vs "
                     + HERE + ": 3.7/(4.0 x 0.8)"),
}


def median_host(runs: list[HostCosts]) -> HostCosts:
    """Per strategy, phase and part, the median over repeated measurements (the machine is shared)."""
    first = runs[0]
    table = {s: {p: HostTime(*(float(np.median([getattr(r.strategies[s][p], part) for r in runs]))
                               for part in ("critical", "background", "upkeep", "stream")))
                 for p in phases} for s, phases in first.strategies.items()}
    return HostCosts(table, 1.0, f"{first.source}; median of {len(runs)} measurements",
                     {"runs": [r.measured for r in runs]})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="measurements; each figure is their median")
    ap.add_argument("--out", default=str(REPO / "results" / "host-this-machine.json"))
    ap.add_argument("--machine-factor", type=float, default=1.0,
                    help="this machine's host time over the reference machine's (see the module docstring)")
    ap.add_argument("--machine-note", default="", help="how --machine-factor was measured")
    ap.add_argument("--strategies", default=None,
                    help="comma-separated: measure only these and replace only their entries (in --out and "
                         "in every preset); default: every deployable strategy, replacing the whole section")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    if not args.machine_factor > 0:
        ap.error(f"--machine-factor must be > 0, got {args.machine_factor}")
    if args.machine_factor != 1.0 and not args.machine_note:
        ap.error("--machine-factor needs --machine-note (how it was measured)")
    only = args.strategies.split(",") if args.strategies else None
    kw = {"strategies": only} if only else {}
    runs = [measure_host(seed=args.seed + i, progress=True, **kw) for i in range(args.repeats)]
    host = median_host(runs)
    out = Path(args.out)
    if only and out.is_file():  # keep the other strategies' measurement, name what was remeasured
        prev = HostCosts.from_dict(json.loads(out.read_text())["host"])
        host = HostCosts({**prev.strategies, **host.strategies}, 1.0,
                         f"{prev.source}; {', '.join(only)} remeasured: {host.source}",
                         {**prev.measured, "remeasured": {"strategies": only, "runs": host.measured["runs"]}})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**provenance(seed=args.seed), "label": "host time per MoE layer call, runtime "
                               "with no-op kernels, GPU tier = CPU stand-in (device cpu)",
                               "machine_factor": {"value": args.machine_factor, "reference": HERE,
                                                  "note": args.machine_note or "this is the reference machine"},
                               "host": host.to_dict()}, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out}")
    for name, (factor, reason) in FACTORS.items():
        path = PROFILES / f"{name}.json"
        if not path.is_file():
            print(f"skip {name}: no preset file")
            continue
        d = json.loads(path.read_text())
        if args.machine_factor != 1.0:
            factor = round(factor / args.machine_factor, 4)
            reason = (f"{reason}; this machine's host time is x{args.machine_factor:g} the reference's "
                      f"({args.machine_note})")
        d["host"] = estimate_for(host, factor, reason, f"the measurement in results/{out.name}").to_dict()
        d["host"]["measured"] = {}  # the raw figures live in the results file
        path.write_text(json.dumps(d, indent=2) + "\n")
        print(f"{name}: host x{factor}")
    for name, phases in sorted(host.strategies.items()):
        print(f"  {name:17s} " + "  ".join(f"{p} {t.critical * 1e6:7.1f}/{t.background * 1e6:6.1f} us"
                                           for p, t in phases.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
