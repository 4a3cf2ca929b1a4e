"""Step upkeep: the expert cache's changes decided once per decode step, vectorized over [L, E].

A strategy with ``cadence="step"`` keeps policy work off the decode critical path. Per MoE layer of a
decode step the executor only looks residency up (a visible resident runs on the GPU from its slot,
everything else on the CPU kernel) and records the routing. Between steps, ``Controller.upkeep``:

1. makes the copies that landed visible (an expert is served from its slot only from the first step
   after its copy landed, so no kernel ever reads a slot before its copy is done);
2. feeds the recorded step to the policies in one vectorized update (``on_step`` of the eviction
   policy and of the reuse-rate estimator);
3. plans swaps with ``plan_swaps``: per layer (or over one global pool), the best non-resident experts
   by expected reuse are paired with free slots, then with the lowest-ranked evictable residents; a
   swap is kept when ``(value_new - value_victim) * horizon`` exceeds ``threshold`` (the expected extra
   GPU hits must pay for the host-memory read of the copy, as in ``AdmitExpectedReuse``), best gains
   first, as many as the copy budget allows (copies booked for about ``budget_steps`` steps).

The same code runs in the simulator and in the runtime; the runtime queues the copies on its copy
stream behind a barrier on the compute stream (a slot is overwritten only after every kernel that read
its previous expert), and updates its slot table and CPU masks in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from hybrimoe_kt.core.types import ExpertId, LayerRouting


@dataclass(frozen=True, slots=True)
class StepRouting:
    """One forward's routing at every MoE layer: ``ids`` [L, N, P] (-1 = none), ``scores`` [L, N, P];
    the first ``top_k`` columns are the experts that ran."""

    ids: np.ndarray
    scores: np.ndarray
    top_k: int

    @staticmethod
    def from_layers(routings: Sequence[LayerRouting], n_layers: int) -> "StepRouting":
        """Stack per-layer routings (layers without one get rows of -1)."""
        if not routings:
            raise ValueError("a step needs at least one layer routing")
        n = routings[0].n_rows
        p = max(r.topk_ids.shape[1] for r in routings)
        ids = np.full((n_layers, n, p), -1, dtype=np.int32)
        scores = np.zeros((n_layers, n, p), dtype=np.float32)
        for r in routings:
            if r.n_rows != n:
                raise ValueError(f"layer {r.layer} has {r.n_rows} rows, layer {routings[0].layer} has {n}")
            w = r.topk_ids.shape[1]
            ids[r.layer, :, :w] = r.topk_ids
            scores[r.layer, :, :w] = r.topk_scores
        top_k = routings[0].top_k or routings[0].topk_ids.shape[1]
        return StepRouting(ids, scores, top_k)

    @property
    def ran(self) -> np.ndarray:
        """``[L, N, K]``: the ids that ran."""
        return self.ids[:, :, : self.top_k]


@dataclass(frozen=True, slots=True)
class UpkeepPlan:
    """What one upkeep changes: ``evictions`` free slots first, then ``copies`` (best first) land at
    ``landing`` (predicted, absolute seconds)."""

    evictions: tuple[ExpertId, ...]
    copies: tuple[ExpertId, ...]
    landing: tuple[float, ...]


EMPTY_UPKEEP = UpkeepPlan((), (), ())


def _pairs(value: np.ndarray, rank: np.ndarray, resident: np.ndarray, evictable: np.ndarray,
           free: np.ndarray, depth: int, horizon: float, threshold: float):
    """Rows are independent pools. Returns ``(gain, cand, victim)`` [G, J]: the j-th best candidate
    of each row, the victim it replaces (-1 = a free slot) and the swap's gain (-inf = none)."""
    g, m = value.shape
    j_n = min(m, depth)
    cv = np.where(resident, -np.inf, value)                          # non-residents are candidates
    c_idx = np.argsort(-cv, axis=1, kind="stable")[:, :j_n]          # [G, J] best first, ties by id
    c_val = np.take_along_axis(cv, c_idx, axis=1)
    rv = np.where(evictable, rank, np.inf)
    v_idx = np.argsort(rv, axis=1, kind="stable")[:, :j_n]           # [G, J] lowest rank first
    v_ok = np.take_along_axis(evictable, v_idx, axis=1)
    j = np.arange(j_n)[None, :]
    vi = j - free[:, None]                                           # victim position after free slots
    on_free = vi < 0
    vi_c = np.clip(vi, 0, j_n - 1)
    victim = np.where(on_free, -1, np.take_along_axis(v_idx, vi_c, axis=1))
    victim_ok = on_free | (np.take_along_axis(v_ok, vi_c, axis=1) & (vi < j_n))
    old = np.where(on_free, 0.0, np.take_along_axis(value, np.maximum(victim, 0), axis=1))
    ok = np.isfinite(c_val) & victim_ok
    gain = np.where(ok, (c_val - old) * horizon - threshold, -np.inf)
    return gain, c_idx, victim


def plan_swaps(value: np.ndarray, rank: np.ndarray, resident: np.ndarray, evictable: np.ndarray, *,
               quotas: Optional[Sequence[int]] = None, capacity: Optional[int] = None,
               max_copies: int, horizon: float, threshold: float, depth: int = 8
               ) -> list[tuple[ExpertId, Optional[ExpertId]]]:
    """The swaps worth one copy each, best gain first, at most ``max_copies``.

    ``value`` [L, E]: expected activations per token (reuse rate); ``rank`` [L, E]: the eviction
    order (lowest goes first); ``resident`` [L, E]: holds a slot (copies in flight included);
    ``evictable`` [L, E]: resident experts that may be evicted now. Per-layer pools pass ``quotas``
    (slots per layer); one global pool passes ``capacity``. ``depth`` bounds the swaps per pool that
    are considered in one upkeep. Returns ``(new, victim)``, victim None for a free slot.
    """
    if max_copies <= 0:
        return []
    n_l, n_e = value.shape
    if capacity is not None:  # one global pool: a single row over every (layer, expert)
        rows = [a.reshape(1, -1) for a in (value, rank, resident, evictable)]
        free = np.array([capacity - int(resident.sum())])
    else:
        if quotas is None:
            raise ValueError("plan_swaps needs quotas (per-layer pools) or capacity (a global pool)")
        rows = [value, rank, resident, evictable]
        free = np.asarray(quotas, dtype=np.int64) - resident.sum(axis=1)
    # only pools holding a non-resident worth a copy even into a free slot can gain
    hot = np.flatnonzero(((rows[0] * horizon > threshold) & ~rows[2]).any(axis=1))
    if hot.size == 0:
        return []
    gain, cand, victim = _pairs(*(a[hot] for a in rows), np.maximum(free[hot], 0), depth, horizon, threshold)
    flat = np.flatnonzero(gain.ravel() > 0)
    if flat.size == 0:
        return []
    order = flat[np.argsort(-gain.ravel()[flat], kind="stable")][:max_copies]
    j_n = gain.shape[1]
    out: list[tuple[ExpertId, Optional[ExpertId]]] = []
    for f in order.tolist():
        i, j = divmod(f, j_n)
        row = int(hot[i])
        c, v = int(cand[i, j]), int(victim[i, j])
        if capacity is not None:
            new = (c // n_e, c % n_e)
            old = None if v < 0 else (v // n_e, v % n_e)
        else:
            new, old = (row, c), (None if v < 0 else (row, v))
        out.append((new, old))
    return out


class StepRebalance:
    """The step cadence's policy state: the eviction policy's ranking plus a reuse-rate estimate.

    ``estimator``: an object with ``rate`` [L, E] and ``on_step`` (``ReuseRate``): the eviction policy
    itself when it is one, else the expected-reuse admission rule's (which the per-layer path feeds in
    prefill). The eviction policy must have ``on_step`` and a score array
    (``score_array()``).
    """

    def __init__(self, eviction, estimator, *, horizon: float, threshold: float, budget_steps: float,
                 depth: int = 8) -> None:
        for name in ("on_step", "score_array"):
            if not hasattr(eviction, name):
                raise ValueError(f"eviction policy {eviction.name} has no {name}(): the step cadence needs "
                                 f"a policy scored over [layers, experts] arrays (mrs or reuse)")
        if horizon <= 0 or threshold < 0 or budget_steps < 0:
            raise ValueError(f"step upkeep needs horizon > 0, threshold >= 0, budget_steps >= 0, got "
                             f"{horizon}, {threshold}, {budget_steps}")
        self.eviction, self.estimator = eviction, estimator
        self.horizon, self.threshold, self.budget_steps, self.depth = horizon, threshold, budget_steps, depth

    def observe_step(self, step: StepRouting) -> None:
        self.eviction.on_step(step)
        if self.estimator is not self.eviction:
            self.estimator.on_step(step)

    def swaps(self, resident: np.ndarray, evictable: np.ndarray, quotas: Sequence[int],
              capacity: Optional[int], max_copies: int) -> list[tuple[ExpertId, Optional[ExpertId]]]:
        value = self.estimator.rate
        rank = value if self.estimator is self.eviction else self.eviction.score_array()  # one read
        return plan_swaps(value, rank, resident, evictable,
                          quotas=None if capacity is not None else quotas, capacity=capacity,
                          max_copies=max_copies, horizon=self.horizon, threshold=self.threshold,
                          depth=self.depth)
