"""Belady's offline optimum: evict the resident expert whose next use lies furthest in the future.

The policy is given the future: ``uses[eid]`` is the sorted list of logical positions at which the
expert is activated, with position = ``forward_index * n_layers + layer`` (the ``Clock`` convention).
At a decision, the next use of a candidate is its first position strictly after ``clock.now``
(the current layer's own activations are in use and never candidates). An expert never used again
has next use = infinity. ``victim`` = furthest next use, ties by lowest ``(layer, expert)``;
``score(eid)`` = ``-(next use - now)`` (``-inf`` when never used again). With ``rate_horizon`` (forwards)
the score is instead the exact activation rate over the next ``rate_horizon`` forwards, on the scale of
the ``reuse`` policy, so that the ``expected-reuse`` admission rule can be given the true future; ``rate``
(and ``score_array``, ``on_step``) give the same over ``[L, E]`` arrays, so the step cadence's upkeep
(``core.upkeep``) can run on the true future too: a bound for that design, not a policy. Belady is a bound for
demand caching with unit-size items; it ignores transfer timing, so it is a reference, not a schedule.

``victim_masked`` (the cache's vectorised search) reads an ``[L, E]`` array of next uses that is
advanced incrementally as the clock moves forward (each use is passed once per run; a clock that moves
back rebuilds it), so a victim search over a global pool is one argmax, not a bisect per resident.
"""

from __future__ import annotations

import bisect
import math
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from hybrimoe_kt.core.protocols import Clock
from hybrimoe_kt.core.types import ExpertId, LayerRouting


def belady_uses_from_routings(
    routings: Iterable[tuple[int, int, Iterable[int]]],
) -> dict[ExpertId, list[int]]:
    """Build ``uses`` from ``(position, layer, activated experts)`` records, in any order.

    Returns each expert's positions sorted ascending and without duplicates.
    """
    acc: dict[ExpertId, set[int]] = {}
    for position, layer, experts in routings:
        for e in experts:
            acc.setdefault((int(layer), int(e)), set()).add(int(position))
    return {eid: sorted(ps) for eid, ps in sorted(acc.items())}


class Belady:
    """Offline optimal eviction from known future uses and a shared logical clock."""

    name = "belady"

    def __init__(self, uses: Mapping[ExpertId, Sequence[int]], clock: Clock,
                 n_layers: Optional[int] = None, n_experts: Optional[int] = None,
                 rate_horizon: Optional[int] = None) -> None:
        if clock is None or not hasattr(clock, "now"):
            raise ValueError("Belady needs the executor's Clock (an object with a logical .now)")
        if rate_horizon is not None and (rate_horizon < 1 or n_layers is None):
            raise ValueError("rate_horizon must be >= 1 forwards and needs n_layers")
        self.rate_horizon = rate_horizon
        self.clock = clock
        self.n_layers = n_layers
        self.n_experts = n_experts
        self._uses: dict[ExpertId, tuple[int, ...]] = {}
        for eid, positions in uses.items():
            layer, expert = int(eid[0]), int(eid[1])
            if (n_layers is not None and not 0 <= layer < n_layers) or \
                    (n_experts is not None and not 0 <= expert < n_experts):
                raise ValueError(f"uses names expert {eid!r}, outside n_layers={n_layers}, n_experts={n_experts}")
            ps = tuple(int(p) for p in positions)
            if any(a > b for a, b in zip(ps, ps[1:])):
                raise ValueError(f"uses[{eid!r}] must be sorted ascending, got {list(ps)[:8]}...")
            self._uses[(layer, expert)] = ps
        self._next: Optional[np.ndarray] = None  # [L, E] next use after self._at (built on first use)

    def _build_next(self) -> None:
        """Use events sorted by position, each with the same expert's following use (inf if none)."""
        assert self.n_layers is not None and self.n_experts is not None
        n_l, n_e = self.n_layers, self.n_experts
        self._shape = (n_l, n_e)
        pos: list[int] = []
        idx: list[int] = []
        nxt: list[float] = []
        first = np.full(n_l * n_e, math.inf)
        for (layer, e), ps in self._uses.items():
            if not ps:
                continue
            i = layer * n_e + e
            first[i] = ps[0]
            pos.extend(ps)
            idx.extend([i] * len(ps))
            nxt.extend(float(p) for p in ps[1:])
            nxt.append(math.inf)
        order = np.argsort(np.asarray(pos, dtype=np.int64), kind="stable")
        self._ev_pos = np.asarray(pos, dtype=np.int64)[order]
        self._ev_idx = np.asarray(idx, dtype=np.int64)[order]
        self._ev_next = np.asarray(nxt, dtype=np.float64)[order]
        self._first = first
        self._reset_next()

    def _reset_next(self) -> None:
        self._next = self._first.copy()  # flat [L * E]: next use after any time before every use
        self._done = 0                   # events with index < _done have been passed
        self._at = -math.inf

    def _sync(self) -> np.ndarray:
        """The next-use array at ``clock.now``, [L, E]."""
        if self._next is None:
            self._build_next()
        now = self.clock.now
        if now < self._at:
            self._reset_next()
        if now != self._at:
            end = int(np.searchsorted(self._ev_pos, now, side="right"))
            if end > self._done:
                sl = slice(self._done, end)
                # an expert passed several times keeps its latest following use (the largest)
                np.maximum.at(self._next, self._ev_idx[sl], self._ev_next[sl])
                self._done = end
            self._at = now
        assert self._next is not None
        return self._next.reshape(self._shape)

    def next_use(self, eid: ExpertId) -> float:
        """First position strictly after ``clock.now`` at which ``eid`` is activated; inf if none."""
        ps = self._uses.get((eid[0], eid[1]), ())
        i = bisect.bisect_right(ps, self.clock.now)
        return float(ps[i]) if i < len(ps) else math.inf

    def on_route(self, routing: LayerRouting) -> None:
        """The future is known in advance; routing teaches nothing."""

    def on_admit(self, eid: ExpertId) -> None:
        """Nothing to record."""

    def on_evict(self, eid: ExpertId) -> None:
        """Nothing to record."""

    def victim(self, candidates: Sequence[ExpertId]) -> ExpertId:
        if not candidates:
            raise ValueError("victim() needs at least one candidate")
        return min(candidates, key=lambda eid: (-self.next_use(eid), eid[0], eid[1]))

    def victim_masked(self, first: int, mask: np.ndarray) -> ExpertId:
        """``victim`` over the candidates ``mask`` [n, E] marks from layer ``first`` (see ExpertCache)."""
        if self.n_layers is None or self.n_experts is None:  # shape unknown: the candidate list
            return self.victim([(first + int(i), int(e)) for i, e in zip(*np.nonzero(mask))])
        nxt = self._sync()[first:first + mask.shape[0]]
        idx = np.flatnonzero(mask)
        if idx.size == 0:
            raise ValueError("victim_masked() needs at least one candidate")
        j = int(idx[int(np.argmax(nxt.ravel()[idx]))])  # furthest next use, first = lowest id
        n_e = mask.shape[1]
        return first + j // n_e, j % n_e

    def score(self, eid: ExpertId) -> float:
        if self.rate_horizon is None:
            return -(self.next_use(eid) - self.clock.now)
        ps = self._uses.get((eid[0], eid[1]), ())
        now = self.clock.now
        assert self.n_layers is not None
        end = now + self.rate_horizon * self.n_layers
        return (bisect.bisect_right(ps, end) - bisect.bisect_right(ps, now)) / self.rate_horizon

    def on_step(self, step: object) -> None:
        """The future is known in advance; a decode step teaches nothing (the step cadence's hook)."""

    @property
    def rate(self) -> np.ndarray:
        """``[L, E]``: each expert's exact activations per forward over the next ``rate_horizon`` forwards
        after ``clock.now`` (``score`` for every expert at once; the step cadence's value and rank)."""
        if self.rate_horizon is None or self.n_layers is None or self.n_experts is None:
            raise ValueError("Belady.rate needs rate_horizon, n_layers and n_experts")
        if self._next is None:
            self._build_next()
        now = self.clock.now
        lo = int(np.searchsorted(self._ev_pos, now, side="right"))
        hi = int(np.searchsorted(self._ev_pos, now + self.rate_horizon * self.n_layers, side="right"))
        n = self.n_layers * self.n_experts
        counts = np.bincount(self._ev_idx[lo:hi], minlength=n)[:n]
        return (counts / self.rate_horizon).reshape(self.n_layers, self.n_experts)

    def score_array(self) -> np.ndarray:
        """``rate`` (fewest uses in the horizon ranks lowest: the step upkeep's victim order)."""
        return self.rate
