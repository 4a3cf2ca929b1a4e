"""Accuracy of history-only forecasts of the experts the next 1-8 tokens activate, per layer.

At every decode token t of a request, each forecaster names a set of ``m`` experts per layer from the
routing up to t; the set is scored against the experts token t+h actually activates at that layer
(precision = hits / m, recall = hits / top_k), averaged over tokens, layers and requests, for
h = 1..8. Forecasters (all fed the request's decode tokens only, as ``hybrimoe``'s step upkeep is):

- ``nextuse``: the ``m`` experts with the soonest predicted next use (core.eviction.NextUse);
- ``reuse-rate``: the ``m`` highest decayed activation rates (core.eviction.ReuseRate, half-life 32);
- ``last-token``: the experts token t activated (``m`` = top_k only);
- ``oracle-own-counts``: the request's own most frequent experts over all its decode tokens
  (clairvoyant: the oracle's static variant); ``oracle`` itself knows token t+h exactly (1.0 / 1.0).

Writes results/forecast-accuracy.json. Pure trace statistics: no cost model, no timing.

    python scripts/forecast_accuracy.py [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from hybrimoe_kt.core.eviction import NextUse, ReuseRate
from hybrimoe_kt.core.upkeep import StepRouting
from hybrimoe_kt.measure.provenance import provenance
from hybrimoe_kt.sim.defaults import REAL_MIXTRAL, shared_traces_dir
from hybrimoe_kt.traces.spec import parse_trace_spec

HORIZONS = tuple(range(1, 9))


def request_tokens(trace) -> list[np.ndarray]:
    """Per request, its decode tokens' experts [T, L, K] (-1 = unknown)."""
    out = []
    for req in trace.requests():
        rows = np.flatnonzero((trace.seq_id == req) & ~trace.is_prefill)
        if rows.size > max(HORIZONS):
            out.append(np.asarray(trace.experts[rows], dtype=np.int64))
    return out


def topm(values: np.ndarray, m: int) -> np.ndarray:
    """[L, m] indices of the m largest values per row (ties by lowest id)."""
    return np.argsort(-values, axis=1, kind="stable")[:, :m]


def score(pred: np.ndarray, actual: np.ndarray, k: int) -> tuple[float, float]:
    """pred [L, m], actual [L, K] (-1 skipped): mean precision and recall over layers."""
    hits = np.array([len(set(p.tolist()) & set(a[a >= 0].tolist())) for p, a in zip(pred, actual)])
    n_act = np.maximum((actual >= 0).sum(axis=1), 1)
    return float(np.mean(hits / pred.shape[1])), float(np.mean(hits / n_act))


def evaluate(tokens: list[np.ndarray], n_experts: int, k: int, m: int) -> dict:
    acc: dict[str, dict[int, list[tuple[float, float]]]] = {}
    for toks in tokens:
        n_t, n_l, _ = toks.shape
        nu, rr = NextUse(n_l, n_experts, k), ReuseRate(n_l, n_experts, half_life=32.0)
        own = np.zeros((n_l, n_experts))
        for t in range(n_t):
            for l in range(n_l):
                ids = toks[t, l][toks[t, l] >= 0]
                own[l, ids] += 1
        own_pred = topm(own, m)
        for t in range(n_t):
            ids = toks[t][:, None, :]                                  # [L, 1, K]
            step = StepRouting(ids.astype(np.int32), np.ones(ids.shape, dtype=np.float32), k)
            nu.on_step(step)
            rr.on_step(step)
            preds = {"nextuse": topm(nu.rate, m), "reuse-rate": topm(rr.rate, m), "oracle-own-counts": own_pred}
            if m == k:
                preds["last-token"] = np.where(toks[t] >= 0, toks[t], -1)
            for h in HORIZONS:
                if t + h >= n_t:
                    break
                for name, p in preds.items():
                    acc.setdefault(name, {}).setdefault(h, []).append(score(p, toks[t + h], k))
    return {name: {str(h): {"precision": round(float(np.mean([x[0] for x in v])), 4),
                            "recall": round(float(np.mean([x[1] for x in v])), 4), "n": len(v)}
                   for h, v in sorted(by_h.items())} for name, by_h in acc.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/forecast-accuracy.json")
    args = ap.parse_args()
    specs = []
    d = shared_traces_dir()
    if d is not None and (d / f"{REAL_MIXTRAL}.npz").is_file():
        specs.append(("mixtral-real", str(d / REAL_MIXTRAL)))
    specs += [("deepseek-v2-lite-synthetic", "synthetic:deepseek-v2-lite"),
              ("qwen3-30b-a3b-synthetic", "synthetic:qwen3-30b-a3b")]
    results = {}
    for label, spec in specs:
        trace = parse_trace_spec(spec, seed=args.seed)
        toks = request_tokens(trace)
        k = trace.top_k
        results[label] = {f"m={m}": evaluate(toks, trace.n_experts, k, m) for m in (k, 2 * k)}
        for m_key, res in results[label].items():
            print(label, m_key, " ".join(f"{n}: h1 {r['1']['precision']:.2f}/{r['1']['recall']:.2f} "
                                          f"h8 {r['8']['precision']:.2f}/{r['8']['recall']:.2f}"
                                          for n, r in res.items()))
    out = Path(args.out)
    out.write_text(json.dumps({"benchmark": "history-only expert forecast accuracy (issue 12)",
                               "note": "precision/recall of the experts token t+h activates, per layer, "
                                       "decode tokens; the oracle knows them exactly (1.0/1.0); m = set size",
                               "horizons": list(HORIZONS), **provenance(seed=args.seed), "traces": results},
                              indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
