"""ABLATION / PROJECTION: decode demand loads on top of ``hybrimoe``'s step upkeep, SIMULATED on issue 12's
goal grid with host time charged (never ``--host-cost zero``).

``hybrimoe`` decode layers only look residency up (a miss runs on the CPU; the cache changes once per
decode step in ``core.upkeep``). The variants ``hybrimoe+decode-demand:RULE`` (``StrategySpec.decode_demand``)
also let a decode layer copy misses to the GPU as demand loads, into slots the eviction policy (MRS) frees:
the copy is also the admission, as in ``lru-offload``. Copies are charged like every copy (PCIe queue
time behind the copies already booked, host-memory contention with the CPU tier). Rules (``--rules``):

- ``contended``: as many misses (copy order) as make this layer's split fastest with the CPU tier slowed
  by the copies' host-memory reads (``contended_makespan``, the engine's rule); step upkeep as hybrimoe.
- ``all``: every miss whose upkeep copy is not in flight is loaded; step upkeep as hybrimoe.
- ``all-no-upkeep``: ``all`` with the upkeep's copy budget at 0 (the demand loads are the only admissions).
- ``scheduler``: the loads the balanced scheduler picks (copies only delay the GPU; contention unpriced).

The runtime and the sglang coordinator do NOT implement decode demand loads (they refuse the flag): these
figures are a projection of what building them would gain, not a deployable strategy, and no default
grid runs them.

Host time: a demand decision puts the policies and an admission on the decode critical path, which the
runtime's lookup path does not do, and no measured host time matches it exactly. Two brackets per rule:

- ``hybrimoe+decode-demand:RULE``: decode critical host time of ``hybrimoe-layer`` (a per-layer decision
  with the balanced scheduler and demand loads; its background-copy work is not charged) plus
  ``hybrimoe``'s step upkeep; prefill as ``hybrimoe``. The figure the docs quote.
- ``.../lookup-host``: ``hybrimoe``'s host time, as if the decision were free (an upper bound).

Same grid and data as ``scripts/policy_goals.py`` (real Mixtral trace, synthetic DeepSeek-V2-Lite and
Qwen3-30B-A3B with ``--seed``, rtx4090-ddr5 and rtx5090-ddr5, 25/50/75% cache). No parameter is tuned:
the rules add no knob (the cost model or the stated rule decides each load); the rules were picked after
looking at one goal cell (DeepSeek-V2-Lite, rtx5090, 25%), so this is an ablation, not a tuned result.

    python scripts/ablate_decode_demand.py [--seed 0] [--out results/ablation-decode-demand.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path
from typing import Mapping, Optional

from hybrimoe_kt.core.hardware import load_profile
from hybrimoe_kt.core.host import HostTime
from hybrimoe_kt.core.strategies import STRATEGIES, StrategySpec, with_overrides
from hybrimoe_kt.measure.provenance import provenance
from hybrimoe_kt.sim.defaults import infer_model
from hybrimoe_kt.sim.runner import SimSetup, simulate
from hybrimoe_kt.traces.spec import parse_trace_spec

_spec = importlib.util.spec_from_file_location("policy_goals", Path(__file__).with_name("policy_goals.py"))
pg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pg)  # type: ignore[union-attr]

PREFIX = "hybrimoe+decode-demand"
LOOKUP = "/lookup-host"
RULES = {"contended": dict(decode_demand="contended"), "all": dict(decode_demand="all"),
         "all-no-upkeep": dict(decode_demand="all", step_copy_budget=0.0),
         "scheduler": dict(decode_demand="scheduler")}
COMPARE = ("hybrimoe", "static-frequency", "lru-offload", "oracle", "hybrimoe-paper", "kt-dynamic-update")


class _Setup(SimSetup):
    """Charges the variants the host time stated in the module docstring."""

    def host_times(self, spec: StrategySpec) -> Optional[Mapping[str, HostTime]]:
        if not spec.name.startswith(PREFIX):
            return super().host_times(spec)
        base = super().host_times(STRATEGIES["hybrimoe"])
        if spec.name.endswith(LOOKUP):
            return base
        layer = super().host_times(STRATEGIES["hybrimoe-layer"])
        assert base is not None and layer is not None
        d = base["decode"]
        return {**base, "decode": HostTime(critical=layer["decode"].critical, background=d.background,
                                            upkeep=d.upkeep)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic traces (0 = the goal grid's)")
    ap.add_argument("--hardware", default="rtx4090-ddr5,rtx5090-ddr5")
    ap.add_argument("--ratios", default="0.25,0.5,0.75")
    ap.add_argument("--only", default=None, help="comma-separated trace labels (default: all)")
    ap.add_argument("--rules", default="contended,all,all-no-upkeep", help=f"of {', '.join(RULES)}")
    ap.add_argument("--out", default="results/ablation-decode-demand.json")
    args = ap.parse_args()
    base = STRATEGIES["hybrimoe"]
    names = [f"{PREFIX}:{r}{h}" for r in args.rules.split(",") for h in ("", LOOKUP)]
    variants = [with_overrides(base, name=n, **RULES[n[len(PREFIX) + 1:].split("/")[0]],
                               description=f"ABLATION (simulator only, not deployable): {base.description}; "
                                           f"plus decode demand loads") for n in names]
    specs = [STRATEGIES[n] for n in pg.STRATS] + variants
    ratios = [float(r) for r in args.ratios.split(",")]
    cells, runs = [], []
    for tname, tspec in pg.traces(args.seed):
        if args.only and tname not in args.only.split(","):
            continue
        trace = parse_trace_spec(tspec, seed=args.seed)
        model = infer_model(trace.model, trace.n_layers, trace.n_experts, trace.top_k)
        for hw in args.hardware.split(","):
            setup = _Setup(trace, Path(tspec).name, model, load_profile(hw))
            rs = pg.fitting(setup, specs, ratios)
            t0 = time.perf_counter()
            recs = simulate(setup, specs, rs, provenance=None)
            runs.append({"trace": tname, "hardware": hw, "ratios": rs, "wall_s": round(time.perf_counter() - t0, 1)})
            for r in rs:
                by = {x["strategy"]: x for x in recs if x["cache_ratio"] == r}
                cell = {**pg.cell_fields(tname, tspec, model, hw, r, by),
                        "ratio": {n: {k: round(by[n]["decode_tok_s"] / by[k]["decode_tok_s"], 4)
                                      for k in (*pg.DEPLOYABLE, "hybrimoe", "oracle") if by[k]["decode_tok_s"] > 0}
                                  for n in names}}
                cells.append(cell)
                print(f"{tname:28s} {hw:13s} {r:4.0%} vs hybrimoe: " + " ".join(
                    f"{n[len(PREFIX) + 1:]}={cell['ratio'][n]['hybrimoe']:.3f}" for n in names)
                      + f"  (hybrimoe/lru-offload {by['hybrimoe']['decode_tok_s'] / by['lru-offload']['decode_tok_s']:.3f})",
                      flush=True)
    summary = {}
    for n in names:
        gm = {k: round(pg.geomean([c["ratio"][n][k] for c in cells]), 4) for k in COMPARE}
        worst = min((c["ratio"][n][k], k, c["trace"], c["hardware"], c["cache_ratio"]) for c in cells
                    for k in (*pg.DEPLOYABLE, "hybrimoe"))
        worst_h = min((c["ratio"][n]["hybrimoe"], c["trace"], c["hardware"], c["cache_ratio"]) for c in cells)
        summary[n] = {"geomean_ratio": gm,
                      "worst_vs_deployable_or_hybrimoe": dict(zip(("ratio", "vs", "trace", "hardware", "cache_ratio"),
                                                                  worst)),
                      "worst_vs_hybrimoe": dict(zip(("ratio", "trace", "hardware", "cache_ratio"), worst_h))}
        print(f"geomean {n}: {gm}\n  worst {summary[n]['worst_vs_deployable_or_hybrimoe']}\n"
              f"  worst vs hybrimoe {summary[n]['worst_vs_hybrimoe']}")
    doc = {"benchmark": "decode demand loads ablation (issue 12)", "kind": "simulated",
           "ablation": True, "deployable": False,
           "note": "SIMULATED ABLATION / PROJECTION: hybrimoe plus decode demand loads (StrategySpec.decode_demand), "
                   "which the runtime does not implement; host time charged from the profiles (never zero): "
                   f"{PREFIX}:RULE pays hybrimoe-layer's decode critical host time plus hybrimoe's upkeep, "
                   f"RULE{LOOKUP} pays hybrimoe's (the decision free); grid as scripts/policy_goals.py",
           "variants": {n: {"overrides": RULES[n[len(PREFIX) + 1:].split("/")[0]],
                            "host": "hybrimoe's (optimistic)" if n.endswith(LOOKUP) else
                                    "decode critical of hybrimoe-layer + hybrimoe's upkeep"} for n in names},
           "hardware_profiles": args.hardware.split(","), **provenance(seed=args.seed),
           "summary": summary, "cells": cells, "runs": runs}
    pg.write_json(doc, args.out)


if __name__ == "__main__":
    main()
