"""Turn a trace into replayable folds: the steps of the replayed part, and calibration counts from the
rest.

Frequency-based placements learn from a separate profiling run; here they learn from the requests that
are not being replayed (leave one request out), never from the replayed tokens. In a batched log with
known request ids, requests that share a forward form one batch; each batch is replayed with counts
from the other batches (leave one batch out), and its steps carry the batch's first request id. A trace
without request ids (or with a single batch) is split into two halves of its forwards, each replayed
with counts from the other half.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from hybrimoe_kt.core.types import ExpertId, LayerRouting
from hybrimoe_kt.sim.engine import Step
from hybrimoe_kt.traces.format import Forward, Trace


@dataclass(frozen=True)
class Fold:
    name: str
    steps: tuple[Step, ...]
    counts: np.ndarray  # [L, E] calibration counts (other requests)

    def uses(self) -> dict[ExpertId, list[int]]:
        """Logical positions (step * L + layer) at which each expert is activated, for Belady."""
        out: dict[ExpertId, list[int]] = {}
        for i, s in enumerate(self.steps):
            n_layers = len(s.routings)
            for r in s.routings:
                pos = i * n_layers + r.layer
                for e in r.experts:
                    out.setdefault((r.layer, e), []).append(pos)
        return out

    def future(self, pos: int) -> Optional[LayerRouting]:
        if pos < 0 or not self.steps:
            return None
        n_layers = len(self.steps[0].routings)
        i, layer = divmod(pos, n_layers)
        return self.steps[i].routings[layer] if i < len(self.steps) else None


def _steps(trace: Trace, forwards: list[Forward], prefill_chunk: int,
           request: Optional[int] = None) -> tuple[Step, ...]:
    """Steps of ``forwards``; ``request`` (when given) labels every step, e.g. a batch's first request."""
    out: list[Step] = []
    for f in forwards:
        chunks = [f.rows]
        if f.is_prefill and f.rows.size > prefill_chunk:
            chunks = [f.rows[i:i + prefill_chunk] for i in range(0, f.rows.size, prefill_chunk)]
        for rows in chunks:
            part = Forward(rows, f.is_prefill, f.seq, f.step)
            routings = tuple(trace.layer_routing(part, l) for l in range(trace.n_layers))
            out.append(Step(routings, int(rows.size), f.is_prefill, f.seq if request is None else request))
    return tuple(out)


def batches(trace: Trace, forwards: list[Forward]) -> list[tuple[list[int], list[Forward]]]:
    """Requests linked by shared forwards (transitively), in order of first appearance, each with
    its forwards in execution order."""
    parent: dict[int, int] = {r: r for r in trace.requests()}

    def root(r: int) -> int:
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    seqs = [np.unique(trace.seq_id[f.rows]) for f in forwards]
    for ids in seqs:
        for other in ids[1:]:
            a, b = root(int(ids[0])), root(int(other))
            if a != b:
                parent[max(a, b)] = min(a, b)
    members: dict[int, list[int]] = {}
    for r in trace.requests():
        members.setdefault(root(r), []).append(r)
    mine: dict[int, list[Forward]] = {g: [] for g in members}
    for f, ids in zip(forwards, seqs):
        mine[root(int(ids[0]))].append(f)
    return [(members[g], mine[g]) for g in members]


def make_folds(trace: Trace, prefill_chunk: int = 512) -> list[Fold]:
    if prefill_chunk < 1:
        raise ValueError(f"prefill chunk must be >= 1 token, got {prefill_chunk}")
    forwards = trace.forwards()
    requests = trace.requests()
    folds: list[Fold] = []
    if len(requests) >= 2 and all(f.seq >= 0 for f in forwards):
        for req in requests:
            mine = [f for f in forwards if f.seq == req]
            other_rows = np.flatnonzero(trace.seq_id != req)
            folds.append(Fold(f"request {req}", _steps(trace, mine, prefill_chunk),
                              trace.expert_counts(other_rows)))
        return folds
    groups = batches(trace, forwards) if (trace.seq_id >= 0).all() else []
    if len(groups) >= 2:
        for members, mine in groups:
            other_rows = np.flatnonzero(~np.isin(trace.seq_id, members))
            name = (f"batch of request {members[0]}" if len(members) == 1 else
                    f"batch of requests {members[0]}..{members[-1]} ({len(members)})")
            folds.append(Fold(name, _steps(trace, mine, prefill_chunk, request=members[0]),
                              trace.expert_counts(other_rows)))
        return folds
    if len(forwards) < 2:
        raise ValueError(f"trace {trace.source}: needs at least two requests or two forwards to keep "
                         f"calibration and replay apart")
    half = len(forwards) // 2
    parts = [forwards[:half], forwards[half:]]
    for i, part in enumerate(parts):
        other = parts[1 - i]
        other_rows = np.concatenate([f.rows for f in other])
        folds.append(Fold(f"half {i + 1} of 2", _steps(trace, part, prefill_chunk),
                          trace.expert_counts(other_rows)))
    return folds
