"""MRS: HybriMoE's score-based cache policy, with every token counted and each expert's own score.

Per layer, a float score vector ``S[E]`` starts at 0. For EVERY row (token) of a routing, in order,
prefill chunks included::

    S <- (1 - a) * S                      # all experts of the layer decay
    S[e] += a * s_e   for e in top-p(row)  # s_e = e's own routing score in that row

``top-p(row)`` is the row's ``p`` valid ids (``topk_ids >= 0``) with the highest scores, ties by column
order, where ``p = min(p_cfg, columns of topk_ids)`` and ``p_cfg`` defaults to ``2 * top_k``. The score
added to an expert is always read from the same ``(row, column)`` cell as its id, so the released
code's bug of pairing sorted scores with experts in ascending-id order cannot happen here.

``on_route`` applies a whole ``[N, P]`` routing at once: after N rows,
``S_N = (1-a)^N * S_0 + sum_t a * (1-a)^(N-1-t) * (row t's contributions)``, which equals the row-by-row
definition up to float rounding. Scores survive eviction. ``victim`` = lowest S, ties by
``(layer, expert)``; ``score(eid)`` = S.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from hybrimoe_kt.core.eviction._common import check_dims, lowest_masked, step_layers
from hybrimoe_kt.core.types import ExpertId, LayerRouting


def select_top_p(ids: np.ndarray, scores: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``p`` highest-scoring valid entries: ``(ids [N, p], scores [N, p])``, -1/0 where fewer.

    Ids and scores stay paired by their original cell; ties keep column order (stable sort).
    """
    ids = np.asarray(ids)  # [N, P]
    scores = np.asarray(scores, dtype=np.float64)  # [N, P]
    p = min(p, ids.shape[1])
    masked = np.where(ids >= 0, scores, -np.inf)
    order = np.argsort(-masked, axis=1, kind="stable")[:, :p]  # [N, p]
    top_ids = np.take_along_axis(ids, order, axis=1)
    top_scores = np.take_along_axis(scores, order, axis=1)
    valid = top_ids >= 0
    return np.where(valid, top_ids, -1), np.where(valid, top_scores, 0.0)


class MRS:
    """HybriMoE's exponential-moving score. ``alpha`` in (0, 1]; ``p`` >= 1 (default ``2 * top_k``)."""

    name = "mrs"

    def __init__(self, n_layers: int, n_experts: int, top_k: int, alpha: float = 0.5,
                 p: Optional[int] = None) -> None:
        self.n_layers, self.n_experts = check_dims(n_layers, n_experts)
        if int(top_k) != top_k or top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
        if not 0.0 < float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        p_cfg = 2 * int(top_k) if p is None else p
        if int(p_cfg) != p_cfg or p_cfg < 1:
            raise ValueError(f"p must be an integer >= 1 (experts scored per row), got {p!r}")
        self.top_k = int(top_k)
        self.alpha = float(alpha)
        self.p = int(p_cfg)
        self.scores = np.zeros((self.n_layers, self.n_experts), dtype=np.float64)  # [L, E]

    def on_route(self, routing: LayerRouting) -> None:
        layer = routing.layer
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"routing layer {layer} out of range 0..{self.n_layers - 1}")
        ids = np.asarray(routing.topk_ids)  # [N, P]
        n = ids.shape[0]
        if n == 0:
            return
        if n == 1 and ids.shape[1] <= self.p:  # decode fast path: every valid id is in the top-p
            keep = 1.0 - self.alpha
            row = self.scores[layer]
            row *= keep
            for e, sc in zip(ids[0].tolist(), routing.topk_scores[0].tolist()):
                if e >= 0:
                    if e >= self.n_experts:
                        raise ValueError(f"routing at layer {layer} names expert {e}, "
                                         f"but the model has {self.n_experts} experts")
                    if not np.isfinite(sc):
                        raise ValueError(f"routing at layer {layer} has non-finite scores for selected experts")
                    row[e] += self.alpha * sc
            return
        if ids.size and int(ids.max()) >= self.n_experts:
            raise ValueError(f"routing at layer {layer} names expert {int(ids.max())}, "
                             f"but the model has {self.n_experts} experts")
        top_ids, top_scores = select_top_p(ids, routing.topk_scores, self.p)  # [N, p]
        if not np.all(np.isfinite(top_scores)):
            raise ValueError(f"routing at layer {layer} has non-finite scores for selected experts")
        keep = 1.0 - self.alpha
        decay = keep ** np.arange(n - 1, -1, -1, dtype=np.float64)  # [N]: (1-a)^(N-1-t)
        weights = self.alpha * top_scores * decay[:, None]  # [N, p]
        valid = top_ids >= 0
        row = self.scores[layer]
        row *= keep ** n
        np.add.at(row, top_ids[valid], weights[valid])

    def on_step(self, step) -> None:
        """A whole forward at every layer at once (``core.upkeep.StepRouting``): per layer, the same
        update as ``on_route`` on its rows, vectorized over [layers, experts]."""
        ids = np.asarray(step.ids)  # [L, N, P]
        layer = step_layers(ids, self.n_layers, self.n_experts)
        n_l, n, p_cols = ids.shape
        if n == 0:
            return
        scores = np.asarray(step.scores, dtype=np.float64)
        if p_cols > self.p:  # keep each row's top-p
            top_ids, top_scores = select_top_p(ids.reshape(n_l * n, p_cols), scores.reshape(n_l * n, p_cols),
                                               self.p)
            ids, scores = top_ids.reshape(n_l, n, -1), top_scores.reshape(n_l, n, -1)
            layer = np.broadcast_to(np.arange(n_l)[:, None, None], ids.shape)
        valid = ids >= 0
        if not np.all(np.isfinite(scores[valid])):
            raise ValueError("step routing has non-finite scores for selected experts")
        keep = 1.0 - self.alpha
        decay = keep ** np.arange(n - 1, -1, -1, dtype=np.float64)  # [N]
        w = self.alpha * scores * decay[None, :, None]  # [L, N, P]
        self.scores *= keep ** n
        np.add.at(self.scores, (layer[valid], ids[valid]), w[valid])

    def score_array(self) -> np.ndarray:
        """[L, E] scores (a live view)."""
        return self.scores

    def on_admit(self, eid: ExpertId) -> None:
        """Admission does not change a score."""

    def on_evict(self, eid: ExpertId) -> None:
        """Scores survive eviction."""

    def victim(self, candidates: Sequence[ExpertId]) -> ExpertId:
        if not candidates:
            raise ValueError("victim() needs at least one candidate")
        v = self.scores
        return min(candidates, key=lambda eid: (v[eid[0], eid[1]], eid))  # lowest, ties by id

    def victim_masked(self, first: int, mask: np.ndarray) -> ExpertId:
        """``victim`` over the candidates ``mask`` [n, E] marks from layer ``first`` (see ExpertCache)."""
        return lowest_masked(first, mask, self.scores[first:first + mask.shape[0]])

    def score(self, eid: ExpertId) -> float:
        return float(self.scores[eid[0], eid[1]])
