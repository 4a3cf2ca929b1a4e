"""Static placement as an eviction policy: residents chosen once, from calibration counts.

``StaticPlacement(placement, counts)`` ranks experts by a fixed activation count ``counts[L, E]``
(measured on a calibration split, never on the replayed tokens; see ``placement.py``). Experts of the
placement are protected: the victim is the lowest-count candidate outside the placement, and only when
every candidate belongs to the placement the lowest-count one of those. Ties by ``(layer, expert)``.
Routing never changes the counts: the policy is static by definition.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np

from hybrimoe_kt.core.eviction._common import check_eid, lowest, lowest_masked
from hybrimoe_kt.core.eviction.placement import as_counts
from hybrimoe_kt.core.types import ExpertId, LayerRouting


class StaticPlacement:
    """A fixed hot set. ``n_layers``/``n_experts``, when given, must match ``counts``' shape."""

    name = "static"

    def __init__(self, placement: Iterable[ExpertId], counts: object,
                 n_layers: Optional[int] = None, n_experts: Optional[int] = None) -> None:
        arr = as_counts(counts)
        if (n_layers is not None and n_layers != arr.shape[0]) or \
                (n_experts is not None and n_experts != arr.shape[1]):
            raise ValueError(f"counts shape {arr.shape} != (n_layers={n_layers}, n_experts={n_experts})")
        self.n_layers, self.n_experts = arr.shape
        self.counts: np.ndarray = arr  # [L, E]
        self.placement: frozenset[ExpertId] = frozenset(
            check_eid(eid, self.n_layers, self.n_experts) for eid in placement)
        self._placed = np.zeros(arr.shape, dtype=bool)  # [L, E] the placement as a mask
        for layer, e in self.placement:
            self._placed[layer, e] = True

    def on_route(self, routing: LayerRouting) -> None:
        """Static: routing does not change anything."""

    def on_admit(self, eid: ExpertId) -> None:
        """Static: admission does not change anything."""

    def on_evict(self, eid: ExpertId) -> None:
        """Static: eviction does not change anything."""

    def victim(self, candidates: Sequence[ExpertId]) -> ExpertId:
        return lowest(candidates, lambda eid: (eid in self.placement, float(self.counts[eid[0], eid[1]])))

    def victim_masked(self, first: int, mask: np.ndarray) -> ExpertId:
        """``victim`` over the candidates ``mask`` [n, E] marks from layer ``first`` (see ExpertCache)."""
        rows = slice(first, first + mask.shape[0])
        return lowest_masked(first, mask, self._placed[rows], self.counts[rows])

    def score(self, eid: ExpertId) -> float:
        return float(self.counts[eid[0], eid[1]])
