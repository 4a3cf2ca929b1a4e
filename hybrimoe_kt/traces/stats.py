"""Cache-relevant statistics of a routing trace, comparable across real and synthetic traces.

Streams: a trace with per-request ids is read as one stream of tokens per request (tokens in stored
order; -1 ids form one stream). A batched trace (``step`` array, unknown requests) is one stream of
forwards, each item being the union of the experts its rows picked. All statistics are per layer and
averaged over layers weighted by activations, unless stated otherwise:

- ``temporal_reuse``: share of an item's experts also used by the previous item of the stream at the
  same layer (sum of overlaps / sum of set sizes). Uniform routing gives K/E for token streams.
- ``reuse_within_8``: share of an item's experts used by any of the 8 previous items.
- ``lru_hit_<f>``: per-layer LRU cache of round(f*E) slots, cold at the start of every stream; an
  item's experts are looked up in the cache as it was before the item, then all of them are touched
  (hits / accesses). ``lru_hit_40%_warm64`` counts only items after the first 64 of each stream.
- ``top25_share``: share of activations taken by the top 25% (ceil E/4) experts of a layer, averaged
  over layers (uniform: 0.25).
- ``interlayer_top1``: for tokens with both layers valid, predict one expert of layer l+1 as the
  argmax over e' of sum_{e in S_l} C_l[e, e'], where C_l counts co-occurrences (e at l, e' at l+1)
  over the whole trace (in-sample); accuracy = share of predictions that are in S_{l+1}. Baseline K/E.
- ``prefill_touch``: for prefill forwards of >= 2 rows, share of the E experts touched, per layer.
- ``unique_per_forward``: mean number of distinct experts one forward activates at a layer.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np

from hybrimoe_kt.traces.format import Trace

LRU_FRACTIONS = (0.25, 0.5)


def _membership(trace: Trace) -> np.ndarray:
    """bool [T, L, E]: token t used expert e at layer l (valid entries only)."""
    t, n_layers, _ = trace.experts.shape
    m = np.zeros((t, n_layers, trace.n_experts + 1), dtype=bool)
    ids = np.where(trace.usable, trace.experts, trace.n_experts).astype(np.int64)
    np.put_along_axis(m, ids, True, axis=2)
    return m[:, :, :-1]


def _streams(trace: Trace, member: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Per stream: membership [N, L, E], row present [N, L], is_prefill [N]."""
    if trace.step is not None and (trace.seq_id < 0).all():
        fw = trace.forwards()
        m = np.stack([member[f.rows].any(axis=0) for f in fw])
        ok = np.stack([trace.valid[f.rows].any(axis=0) for f in fw])
        pre = np.array([f.is_prefill for f in fw])
        return [m], [ok], [pre]
    out_m, out_ok, out_pre = [], [], []
    for s in np.unique(trace.seq_id):
        rows = np.flatnonzero(trace.seq_id == s)
        out_m.append(member[rows])
        out_ok.append(trace.valid[rows] & trace.usable[rows].any(axis=2))
        out_pre.append(trace.is_prefill[rows])
    return out_m, out_ok, out_pre


def _reuse(ms, oks, pres, window: int, phase: str) -> float:
    hit = total = 0
    for m, ok, pre in zip(ms, oks, pres):
        for i in range(1, m.shape[0]):
            if phase == "prefill" and not pre[i] or phase == "decode" and pre[i]:
                continue
            lo = max(0, i - window)
            prev = (m[lo:i] & ok[lo:i, :, None]).any(axis=0)
            have = ok[i] & ok[lo:i].any(axis=0)
            cur = m[i][have]
            hit += int((cur & prev[have]).sum())
            total += int(cur.sum())
    return hit / total if total else float("nan")


def _lru(ms, oks, slots: int, warmup: int = 0) -> float:
    hits = total = 0
    for m, ok in zip(ms, oks):
        for layer in range(m.shape[1]):
            cache: OrderedDict[int, None] = OrderedDict()
            for i in range(m.shape[0]):
                if not ok[i, layer]:
                    continue
                used = np.flatnonzero(m[i, layer]).tolist()
                if i >= warmup:
                    hits += sum(e in cache for e in used)
                    total += len(used)
                for e in used:
                    if e in cache:
                        cache.move_to_end(e)
                    else:
                        cache[e] = None
                        if len(cache) > slots:
                            cache.popitem(last=False)
    return hits / total if total else float("nan")


def _interlayer(trace: Trace, member: np.ndarray) -> float:
    if trace.n_layers < 2:
        return float("nan")
    hit = total = 0
    for layer in range(trace.n_layers - 1):
        ok = trace.usable[:, layer].any(axis=1) & trace.usable[:, layer + 1].any(axis=1)
        a = member[ok, layer].astype(np.float64)
        b = member[ok, layer + 1]
        if not a.shape[0]:
            continue
        co = a.T @ b.astype(np.float64)  # [E, E] co-occurrence counts
        pred = np.argmax(a @ co, axis=1)
        hit += int(b[np.arange(b.shape[0]), pred].sum())
        total += b.shape[0]
    return hit / total if total else float("nan")


def trace_stats(trace: Trace, fractions: Sequence[float] = LRU_FRACTIONS) -> dict[str, Any]:
    """Statistics of ``trace`` as a flat dict (see the module docstring for definitions)."""
    member = _membership(trace)
    ms, oks, pres = _streams(trace, member)
    e, k = trace.n_experts, trace.top_k
    counts = trace.expert_counts()
    top = math.ceil(e / 4)
    shares = [np.sort(c)[::-1][:top].sum() / c.sum() for c in counts if c.sum()]
    fw = trace.forwards()
    touch = [member[f.rows].any(axis=0).sum(axis=1).mean() / e for f in fw if f.is_prefill and f.n_tokens > 1]
    uniq = [member[f.rows].any(axis=0).sum(axis=1).mean() for f in fw]
    out: dict[str, Any] = {
        "model": trace.model,
        "tokens": trace.n_tokens,
        "layers": trace.n_layers,
        "experts": e,
        "top_k": k,
        "streams": "steps" if len(ms) == 1 and trace.step is not None and (trace.seq_id < 0).all()
        else "requests",
        "prefill_tokens": int(trace.is_prefill.sum()),
        "forwards": len(fw),
        "valid_fraction": float(trace.usable.mean()),
        "uniform_baseline": k / e,
        "temporal_reuse": _reuse(ms, oks, pres, 1, "all"),
        "temporal_reuse_decode": _reuse(ms, oks, pres, 1, "decode"),
        "reuse_within_8": _reuse(ms, oks, pres, 8, "all"),
    }
    for f in fractions:
        slots = max(1, round(f * e))
        out[f"lru_hit_{f:.0%}"] = _lru(ms, oks, slots)
    out["lru_hit_40%_warm64"] = _lru(ms, oks, max(1, round(0.4 * e)), warmup=64)
    out["top25_share"] = float(np.mean(shares)) if shares else float("nan")
    out["interlayer_top1"] = _interlayer(trace, member)
    out["prefill_touch"] = float(np.mean(touch)) if touch else float("nan")
    out["unique_per_forward"] = float(np.mean(uniq))
    return out


def compare_stats(stats: Sequence[dict[str, Any]], names: Sequence[str] | None = None) -> list[list[str]]:
    """Rows of a side-by-side table: a header row, then one row per statistic."""
    names = list(names) if names is not None else [str(s.get("model", i)) for i, s in enumerate(stats)]
    keys: list[str] = []
    for s in stats:
        keys += [k for k in s if k not in keys and k != "model"]
    rows = [["statistic", *names]]
    for key in keys:
        cells = []
        for s in stats:
            v = s.get(key, "")
            if isinstance(v, float):
                cells.append("n/a" if math.isnan(v) else f"{v:.3f}")
            else:
                cells.append(str(v))
        rows.append([key, *cells])
    return rows


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
