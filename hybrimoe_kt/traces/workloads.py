"""Workload presets used by the field, as synthetic routing traces: ``simulate --workload NAME``.

A workload fixes prompt and output lengths, the batch sizes and how many independent batches
(``groups``) to generate; each (prompt length, batch) pair is one :class:`WorkloadTrace`. At batch 1
the trace is a plain sequence of requests (one prefill forward each, then one decode forward per
token). At batch B > 1 the trace is a static-batching serving log with known request ids: the B
prompts of a batch are one prefill forward, then decode step d holds the d-th output token of every
request of the batch (one forward with B rows), recorded through the ``step``/``row`` arrays. Batches
are independent, so the simulator can replay one batch while placement counts come from the others.

Presets (REFERENCE.md sections 5 and 7):
  - ``chat-32-512``: batch 1, prompt 32, output 512 (kTransformers SOSP'25 decode setup);
  - ``dali-64-64``: prompt 64, output 64, batches 1, 8 and 32 (DALI's batched decode setup);
  - ``long-prefill``: prompts of 1K, 4K and 16K tokens, output 16 (prefill-bound serving).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Union

import numpy as np

from hybrimoe_kt.core.models import ModelPreset, get_model
from hybrimoe_kt.traces.format import Trace
from hybrimoe_kt.traces.synthetic import synthetic_trace


@dataclass(frozen=True)
class Workload:
    """Request shape of a workload: every (prompt length, batch) pair becomes one trace."""

    name: str
    prompt_lens: tuple[int, ...]
    output_len: int
    batches: tuple[int, ...] = (1,)
    groups: int = 2          # independent batches per trace (>= 2: one replayed, the others calibrate)
    description: str = ""

    def __post_init__(self) -> None:
        if not self.prompt_lens or any(p < 1 for p in self.prompt_lens):
            raise ValueError(f"workload {self.name}: prompt_lens={self.prompt_lens} must be lengths >= 1")
        if self.output_len < 1:
            raise ValueError(f"workload {self.name}: output_len={self.output_len} must be >= 1")
        if not self.batches or any(b < 1 for b in self.batches):
            raise ValueError(f"workload {self.name}: batches={self.batches} must be sizes >= 1")
        if self.groups < 2:
            raise ValueError(f"workload {self.name}: groups={self.groups} must be >= 2 so that "
                             f"calibration counts come from batches that are not replayed")


WORKLOADS: Mapping[str, Workload] = {
    "chat-32-512": Workload("chat-32-512", (32,), 512, (1,), groups=4,
                            description="batch 1, prompt 32, output 512 (kTransformers SOSP'25)"),
    "dali-64-64": Workload("dali-64-64", (64,), 64, (1, 8, 32), groups=2,
                           description="prompt 64, output 64, batches 1/8/32 (DALI, batched decode)"),
    "prefill-sweep": Workload("prefill-sweep", (32, 512, 2048, 8192), 4, (1,), groups=2,
                              description="prompts of 32/512/2K/8K tokens, output 4 (prefill by length)"),
    "long-prefill": Workload("long-prefill", (1024, 4096, 16384), 16, (1,), groups=2,
                             description="prompts of 1K/4K/16K tokens, output 16 (prefill bound)"),
}


@dataclass(frozen=True, eq=False)
class WorkloadTrace:
    """One trace of a workload, with the request shape that produced it."""

    workload: str
    prompt_len: int
    output_len: int
    batch: int
    trace: Trace

    @property
    def label(self) -> str:
        return f"{self.workload}/p{self.prompt_len}-o{self.output_len}-b{self.batch}"

    def record_fields(self) -> dict:
        """Fields every simulation record of this trace carries."""
        return {"workload": self.workload, "batch": self.batch, "prompt_len": self.prompt_len,
                "output_len": self.output_len}


def get_workload(name: str) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}")
    return WORKLOADS[name]


def batched(trace: Trace, batch: int) -> Trace:
    """Group consecutive requests of ``trace`` into batches of ``batch``: per batch one prefill forward
    with every prompt, then one forward per decode position holding that token of each request.
    Request ids stay known; forwards are recorded in ``step`` and ``row``."""
    reqs = trace.requests()
    if batch < 1 or len(reqs) % batch:
        raise ValueError(f"batch={batch} must be >= 1 and divide the trace's {len(reqs)} requests")
    order: list[np.ndarray] = []
    for g in range(0, len(reqs), batch):
        members = reqs[g:g + batch]
        prompt = [np.flatnonzero((trace.seq_id == s) & trace.is_prefill) for s in members]
        decode = [np.flatnonzero((trace.seq_id == s) & ~trace.is_prefill) for s in members]
        if sum(p.size for p in prompt):
            order.append(np.concatenate(prompt))
        for d in range(max(r.size for r in decode)):
            order.append(np.array([r[d] for r in decode if d < r.size], dtype=np.int64))
    rows = np.concatenate(order)
    step = np.concatenate([np.full(o.size, i, dtype=np.int32) for i, o in enumerate(order)])
    row = np.concatenate([np.arange(o.size, dtype=np.int32) for o in order])
    meta = dict(trace.metadata)
    meta["source"] = f"{meta['source']}; static batches of {batch} requests"
    return Trace(experts=trace.experts[rows], seq_id=trace.seq_id[rows], pos=trace.pos[rows],
                 is_prefill=trace.is_prefill[rows], metadata=meta, step=step, row=row,
                 weights=None if trace.weights is None else trace.weights[rows],
                 valid=trace.valid[rows], layer_ids=trace.layer_ids)


def workload_traces(workload: Union[Workload, str], model: Union[ModelPreset, str], seed: int = 0,
                    n_layers: Optional[int] = None) -> list[WorkloadTrace]:
    """The traces of ``workload`` for ``model``: one per (prompt length, batch), in preset order.
    Each uses its own seed derived from ``seed`` and its position, so traces do not share routing."""
    w = get_workload(workload) if isinstance(workload, str) else workload
    preset = get_model(model) if isinstance(model, str) else model
    out: list[WorkloadTrace] = []
    for i, (p, b) in enumerate((p, b) for p in w.prompt_lens for b in w.batches):
        base = synthetic_trace(preset, n_requests=b * w.groups, prompt_len=p, decode_len=w.output_len,
                               seed=seed * 1000 + i, n_layers=n_layers)
        meta = dict(base.metadata)
        meta.update(workload=w.name, batch=b)
        base = Trace(experts=base.experts, seq_id=base.seq_id, pos=base.pos, is_prefill=base.is_prefill,
                     metadata=meta, weights=base.weights)
        out.append(WorkloadTrace(w.name, p, w.output_len, b, base if b == 1 else batched(base, b)))
    return out
