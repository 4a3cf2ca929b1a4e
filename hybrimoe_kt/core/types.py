"""Core value types: expert ids, per-layer routing, the scheduler's Split and the frozen Plan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

ExpertId = tuple[int, int]
"""(MoE layer index, routed expert index). Layer indices count recorded MoE layers from 0."""


@dataclass(frozen=True, slots=True)
class LayerRouting:
    """What the router chose at one MoE layer in one forward (a decode step, a batch or a prefill chunk).

    ``experts``/``tokens`` are the activated routed experts and how many rows picked each, sorted by
    token count (descending) then id. ``topk_ids``/``topk_scores`` keep the per-row choice for policies
    that need every token (MRS): ``topk_ids`` is ``[N, P]`` in router order, -1 where unknown, and
    ``topk_scores`` holds each id's own routing score. P may exceed the model's top-k when the full
    router distribution was available (MRS uses the top-p experts, p = 2k by default).
    """

    layer: int
    experts: tuple[int, ...]
    tokens: tuple[int, ...]
    n_rows: int
    is_prefill: bool
    topk_ids: np.ndarray = field(repr=False)  # [N, P] int
    topk_scores: np.ndarray = field(repr=False)  # [N, P] float32
    top_k: int = 0  # leading columns of topk_ids that ran (0: all of them)

    @staticmethod
    def from_topk(
        layer: int,
        ids: np.ndarray,
        scores: Optional[np.ndarray] = None,
        is_prefill: bool = False,
        top_k: Optional[int] = None,
    ) -> "LayerRouting":
        """Build from a ``[N, P]`` array of expert ids (-1 = skipped) and optional scores.

        Token counts use the first ``top_k`` columns (all columns when ``top_k`` is None): the experts
        that actually run. Missing scores default to ``1/top_k`` (uniform weights).
        """
        ids = np.asarray(ids)
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2:
            raise ValueError(f"routing ids must be [N, K], got shape {ids.shape}")
        k = ids.shape[1] if top_k is None else top_k
        if not 1 <= k <= ids.shape[1]:
            raise ValueError(f"top_k={top_k} must be in 1..{ids.shape[1]} (columns of the ids array)")
        if scores is None:
            scores = np.where(ids >= 0, 1.0 / k, 0.0).astype(np.float32)
        else:
            scores = np.asarray(scores, dtype=np.float32)
            if scores.shape != ids.shape:
                raise ValueError(f"routing scores shape {scores.shape} != ids shape {ids.shape}")
        run = ids[:, :k]
        if run.shape[0] == 1:  # decode fast path: one row, plain Python beats numpy here
            row = sorted({int(x) for x in run[0].tolist() if x >= 0})
            return LayerRouting(layer, tuple(row), (1,) * len(row), 1, bool(is_prefill),
                                ids.astype(np.int32, copy=False), scores, k)
        flat = run[run >= 0]
        if flat.size:
            uniq, counts = np.unique(flat, return_counts=True)
            order = np.lexsort((uniq, -counts))
            experts = tuple(int(x) for x in uniq[order])
            tokens = tuple(int(x) for x in counts[order])
        else:
            experts, tokens = (), ()
        return LayerRouting(layer, experts, tokens, int(ids.shape[0]), bool(is_prefill),
                            ids.astype(np.int32, copy=False), scores, k)

    @property
    def n_activated(self) -> int:
        return len(self.experts)

    def token_count(self, expert: int) -> int:
        for e, n in zip(self.experts, self.tokens):
            if e == expert:
                return n
        return 0


@dataclass(frozen=True, slots=True)
class Split:
    """A scheduler's answer for one layer: which activated experts run where.

    ``loads`` are the GPU experts that are not resident, in the order they go through the copy
    queue; ``makespan_s`` is the layer time the cost model predicts for this split.
    """

    gpu: tuple[int, ...]
    cpu: tuple[int, ...]
    loads: tuple[int, ...]
    makespan_s: float

    def __post_init__(self) -> None:
        if set(self.gpu) & set(self.cpu):
            raise ValueError(f"expert on both tiers: {sorted(set(self.gpu) & set(self.cpu))}")
        if not set(self.loads) <= set(self.gpu):
            raise ValueError(f"loads {self.loads} must be a subset of the GPU experts {self.gpu}")


@dataclass(frozen=True, slots=True)
class Plan:
    """What the executor (runtime or simulator) does for one layer and one forward, before it computes.

    ``gpu``/``cpu``/``loads`` come from the Split; ``evictions`` free the slots the loads take.
    Background copies are decided separately (``BackgroundPlan``), while the layer's kernels run.
    """

    layer: int
    gpu: tuple[int, ...]
    cpu: tuple[int, ...]
    loads: tuple[int, ...]
    evictions: tuple[ExpertId, ...]
    predicted_s: float


@dataclass(frozen=True, slots=True)
class BackgroundPlan:
    """Copies queued after a layer was dispatched, which no kernel of that layer waits for: CPU-served
    misses being admitted and prefetches of later layers. ``evictions`` free their slots (in order);
    ``landing`` is each copy's predicted arrival time."""

    layer: int
    copies: tuple[ExpertId, ...]
    evictions: tuple[ExpertId, ...]
    landing: tuple[float, ...]


EMPTY_BACKGROUND = BackgroundPlan(-1, (), (), ())
