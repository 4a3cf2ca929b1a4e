"""Helpers shared by the eviction policies: argument checks and deterministic selection."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from hybrimoe_kt.core.types import ExpertId


def check_dims(n_layers: int, n_experts: int) -> tuple[int, int]:
    """Validate and return ``(n_layers, n_experts)``; both must be integers >= 1."""
    try:
        nl, ne = int(n_layers), int(n_experts)
    except (TypeError, ValueError):
        raise ValueError(f"n_layers and n_experts must be integers, got {n_layers!r}, {n_experts!r}") from None
    if nl != n_layers or ne != n_experts or nl < 1 or ne < 1:
        raise ValueError(f"n_layers and n_experts must be integers >= 1, got {n_layers!r}, {n_experts!r}")
    return nl, ne


def check_eid(eid: ExpertId, n_layers: int, n_experts: int) -> tuple[int, int]:
    """Validate one expert id against the model shape; returns it as a plain ``(int, int)``."""
    layer, expert = int(eid[0]), int(eid[1])
    if not (0 <= layer < n_layers and 0 <= expert < n_experts):
        raise ValueError(f"expert id {eid!r} out of range: layers 0..{n_layers - 1}, experts 0..{n_experts - 1}")
    return layer, expert


def lowest(candidates: Sequence[ExpertId], key: Callable[[ExpertId], tuple]) -> ExpertId:
    """The candidate with the smallest ``(key(eid), layer, expert)``: ties always fall to the lowest id."""
    if not candidates:
        raise ValueError("victim() needs at least one candidate")
    return min(candidates, key=lambda eid: (*key(eid), eid[0], eid[1]))


def lowest_masked(first: int, mask: np.ndarray, *keys: np.ndarray) -> ExpertId:
    """Vectorised ``lowest``: the candidate with the smallest ``(keys..., layer, expert)``.

    ``mask`` [n, E] marks the candidates ``(first + i, e)``; each key is an [n, E] array (rows of the
    policy's [L, E] state). Candidates are visited in flat (layer, expert) order, and ``argmin`` keeps
    the first minimum, so ties fall to the lowest id exactly as in ``lowest``.
    """
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        raise ValueError("victim_masked() needs at least one candidate")
    for key in keys[:-1]:
        vals = key.ravel()[idx]
        idx = idx[vals == vals.min()]
    j = int(idx[int(np.argmin(keys[-1].ravel()[idx]))]) if keys else int(idx[0])
    n_e = mask.shape[1]
    return first + j // n_e, j % n_e


def step_layers(ids: np.ndarray, n_layers: int, n_experts: int) -> np.ndarray:
    """Validate a step's ids ``[L, N, P]`` (``core.upkeep.StepRouting``) against the model shape and
    return the layer index of every cell (``[L, N, P]``, a broadcast view)."""
    if ids.ndim != 3 or ids.shape[0] != n_layers:
        raise ValueError(f"step routing must be [{n_layers}, N, P], got shape {ids.shape}")
    if ids.size and int(ids.max()) >= n_experts:
        raise ValueError(f"step routing names expert {int(ids.max())}, but the model has {n_experts} experts")
    return np.broadcast_to(np.arange(n_layers)[:, None, None], ids.shape)


class RateRanked:
    """The ranking half of a policy scored by an ``[L, E]`` rate (expected activations per token):
    ``victim`` = lowest rate, ties by id; ``score`` = the rate; admissions and evictions change nothing.
    Subclasses provide ``rate`` (an array or a property) and may override ``_rate_rows`` to compute only
    the rows a masked victim search reads."""

    rate: np.ndarray

    def _rate_rows(self, first: int, n: int) -> np.ndarray:
        return self.rate[first:first + n]

    def score_array(self) -> np.ndarray:
        """[L, E] rates (a live view where ``rate`` is stored, a new array where it is computed)."""
        return self.rate

    def on_admit(self, eid: ExpertId) -> None:
        """Admission is not an activation."""

    def on_evict(self, eid: ExpertId) -> None:
        """The history survives eviction."""

    def victim(self, candidates: Sequence[ExpertId]) -> ExpertId:
        if not candidates:
            raise ValueError("victim() needs at least one candidate")
        v = self.rate
        return min(candidates, key=lambda eid: (v[eid[0], eid[1]], eid))  # lowest, ties by id

    def victim_masked(self, first: int, mask: np.ndarray) -> ExpertId:
        """``victim`` over the candidates ``mask`` [n, E] marks from layer ``first`` (see ExpertCache)."""
        return lowest_masked(first, mask, self._rate_rows(first, mask.shape[0]))

    def score(self, eid: ExpertId) -> float:
        return float(self._rate_rows(eid[0], 1)[0, eid[1]])
