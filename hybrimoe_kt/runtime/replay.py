"""Routing replay: feed a recorded (or synthetic) trace's routing to the runtime instead of a router.

A ``RoutingReplay`` walks the trace's forward passes (``Trace.forwards()``; prefill forwards may be cut
into chunks of at most ``prefill_chunk`` tokens) and gives, for each step and MoE layer, the tensors a
router would have produced: ``topk_ids [N, K]`` int64 and ``topk_weights [N, K]`` float32.

- ids: the trace's first ``K`` columns (router order); ``-1`` where the trace has no id or the row is
  invalid at that layer. ``K`` is the model's top-k (the trace may hold more columns, never fewer).
- weights: the trace's weights renormalised over the row's valid entries when the trace has weights,
  uniform over the valid entries otherwise; ``0`` for every ``-1`` entry (a row with no valid entry is
  all zeros).

Everything measured with replayed routing must say so: ``label`` is the text callers attach to results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Union

import numpy as np
import torch

from hybrimoe_kt.core.models import ModelPreset, get_model
from hybrimoe_kt.traces.format import Forward, Trace


@dataclass(frozen=True, slots=True)
class ReplayStep:
    """One forward of the replayed run (a decode step, a batch, or one chunk of a prefill)."""

    index: int               # position in the replayed run, from 0
    rows: np.ndarray         # int64 trace rows (tokens) of this step
    is_prefill: bool
    forward: int             # index of the trace forward this step comes from
    chunk: int               # chunk index inside that forward (0 when not chunked)

    @property
    def n_tokens(self) -> int:
        return int(self.rows.size)


class RoutingReplay:
    """Per-step, per-layer routing tensors taken from ``trace``."""

    def __init__(self, trace: Trace, model: Union[ModelPreset, str, None] = None, *,
                 n_experts: Optional[int] = None, top_k: Optional[int] = None,
                 prefill_chunk: Optional[int] = None) -> None:
        preset = get_model(model) if isinstance(model, str) else model
        e = n_experts if n_experts is not None else (preset.n_experts if preset else trace.n_experts)
        k = top_k if top_k is not None else (preset.top_k if preset else trace.top_k)
        if e != trace.n_experts:
            raise ValueError(f"trace {self._name(trace)} has {trace.n_experts} experts per layer but the "
                             f"model has {e}; replay a trace of the same model")
        if not 1 <= k <= trace.top_k:
            raise ValueError(f"top_k={k} must be in 1..{trace.top_k} (the trace's columns per token)")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 or None, got {prefill_chunk}")
        self.trace = trace
        self.n_experts, self.top_k, self.n_layers = e, k, trace.n_layers
        self.prefill_chunk = prefill_chunk
        ids = trace.experts[:, :, :k].astype(np.int64)                    # [T, L, K]
        usable = (ids >= 0) & trace.valid[:, :, None]                     # [T, L, K]
        ids[~usable] = -1
        if trace.weights is not None:
            w = np.where(usable, trace.weights[:, :, :k].astype(np.float32), 0.0)
            w = np.maximum(w, 0.0)
        else:
            w = usable.astype(np.float32)
        total = w.sum(axis=2, keepdims=True)                               # [T, L, 1]
        w = np.divide(w, total, out=np.zeros_like(w), where=total > 0).astype(np.float32)
        self._ids = torch.from_numpy(np.ascontiguousarray(ids))           # [T, L, K] int64
        self._w = torch.from_numpy(np.ascontiguousarray(w))               # [T, L, K] float32
        self._steps = tuple(self._build_steps(trace.forwards()))

    @staticmethod
    def _name(trace: Trace) -> str:
        return trace.source or f"{trace.model} ({trace.metadata.get('source', 'in-memory trace')})"

    @property
    def label(self) -> str:
        """How results produced with this replay must be labelled."""
        return f"routing replayed from {self._name(self.trace)}"

    def _build_steps(self, forwards: list[Forward]) -> Iterator[ReplayStep]:
        i = 0
        for f_idx, fwd in enumerate(forwards):
            chunk = self.prefill_chunk if fwd.is_prefill and self.prefill_chunk else max(1, fwd.n_tokens)
            for c, start in enumerate(range(0, fwd.n_tokens, chunk)):
                yield ReplayStep(i, fwd.rows[start:start + chunk].astype(np.int64), fwd.is_prefill, f_idx, c)
                i += 1

    def steps(self, kind: Optional[str] = None) -> list[ReplayStep]:
        """Replayed steps in order; ``kind`` "prefill" or "decode" keeps only those."""
        if kind not in (None, "prefill", "decode"):
            raise ValueError(f"kind must be None, 'prefill' or 'decode', got {kind!r}")
        if kind is None:
            return list(self._steps)
        want = kind == "prefill"
        return [s for s in self._steps if s.is_prefill == want]

    def __len__(self) -> int:
        return len(self._steps)

    def __iter__(self) -> Iterator[ReplayStep]:
        return iter(self._steps)

    def routing(self, step: Union[ReplayStep, int], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(topk_ids [N, K] int64, topk_weights [N, K] float32)`` of MoE layer ``layer`` at ``step``."""
        s = self._steps[step] if isinstance(step, int) else step
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} out of range 0..{self.n_layers - 1} (the trace's MoE layers)")
        return self.rows_routing(s.rows, layer)

    def rows_routing(self, rows: np.ndarray, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing of arbitrary trace ``rows`` at ``layer`` (copies, safe to hand to kernels)."""
        r = rows
        if r.size and np.all(np.diff(r) == 1):  # contiguous rows: slice instead of gather
            sl = slice(int(r[0]), int(r[-1]) + 1)
            return self._ids[sl, layer].clone(), self._w[sl, layer].clone()
        idx = torch.from_numpy(np.asarray(r, dtype=np.int64))
        return self._ids[idx, layer], self._w[idx, layer]

    def expert_counts(self, steps: Optional[list[ReplayStep]] = None) -> np.ndarray:
        """int64 [L, E] activation counts over ``steps`` (all steps when None), top-k columns only."""
        sel = self._steps if steps is None else steps
        if not sel:
            return np.zeros((self.n_layers, self.n_experts), dtype=np.int64)
        rows = np.concatenate([s.rows for s in sel])
        ids = self._ids[torch.from_numpy(rows)].numpy()                    # [R, L, K]
        layer = np.broadcast_to(np.arange(self.n_layers)[None, :, None], ids.shape)
        ok = ids >= 0
        flat = layer[ok] * self.n_experts + ids[ok]
        return np.bincount(flat, minlength=self.n_layers * self.n_experts).reshape(self.n_layers,
                                                                                    self.n_experts)
