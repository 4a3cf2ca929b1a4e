"""Static placement strategies: which experts to put on the GPU once, from activation counts.

These mirror kt-kernel's ``uniform | frequency | front-loading`` GPU-expert choices, plus a per-layer
quota variant for per-layer caches. ``counts[L, E]`` are activation counts (tokens that selected each
expert) measured on a CALIBRATION split: requests other than the ones being replayed. Counts taken
from the replayed tokens themselves leak the future and overstate a static placement's hit rate.

Every function is deterministic: equal counts fall to the lowest ``(layer, expert)`` id. Results are
lists of expert ids sorted by ``(layer, expert)``, ready for ``ExpertCache.place``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from hybrimoe_kt.core.eviction._common import check_dims
from hybrimoe_kt.core.types import ExpertId


def as_counts(counts: object) -> np.ndarray:
    """Validate activation counts: a finite, non-negative ``[L, E]`` array (returned as float64)."""
    arr = np.asarray(counts, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"counts must be a non-empty [n_layers, n_experts] array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError("counts must be finite and non-negative")
    return arr


def _check_slots(n_slots: int, total: int) -> int:
    if int(n_slots) != n_slots or not 0 <= n_slots <= total:
        raise ValueError(f"n_slots must be an integer in 0..{total} (layers x experts), got {n_slots!r}")
    return int(n_slots)


def _top_in_layer(row: np.ndarray, n: int) -> list[int]:
    """The ``n`` highest counts of one layer, ties by lowest expert index."""
    order = np.lexsort((np.arange(row.size), -row))
    return [int(e) for e in order[:n]]


def place_frequency(counts: object, n_slots: int) -> list[ExpertId]:
    """Global top-``n_slots`` experts by count across all layers (kt-kernel ``frequency``)."""
    arr = as_counts(counts)
    n_layers, n_experts = arr.shape
    n = _check_slots(n_slots, arr.size)
    flat = arr.ravel()  # index = layer * E + expert, so the index order is the id order
    order = np.lexsort((np.arange(flat.size), -flat))[:n]
    return sorted((int(i) // n_experts, int(i) % n_experts) for i in order)


def place_uniform(n_layers: int, n_experts: int, n_slots: int,
                  counts: Optional[object] = None) -> list[ExpertId]:
    """``n_slots`` spread evenly over the layers, the remainder to the first layers (kt-kernel ``uniform``).

    Within a layer, the most frequent experts when ``counts`` is given, else the lowest expert ids.
    """
    n_layers, n_experts = check_dims(n_layers, n_experts)
    n = _check_slots(n_slots, n_layers * n_experts)
    arr = None
    if counts is not None:
        arr = as_counts(counts)
        if arr.shape != (n_layers, n_experts):
            raise ValueError(f"counts shape {arr.shape} != ({n_layers}, {n_experts})")
    base, rem = divmod(n, n_layers)
    out: list[ExpertId] = []
    for layer in range(n_layers):
        k = base + (1 if layer < rem else 0)
        picks = list(range(k)) if arr is None else _top_in_layer(arr[layer], k)
        out.extend((layer, e) for e in sorted(picks))
    return out


def place_front_loading(counts: object, n_slots: int) -> list[ExpertId]:
    """Fill layers from the first one, each with its most frequent experts, until the budget is spent.

    Layer 0 takes ``min(E, n_slots)`` experts, layer 1 the next ``min(E, left)``, and so on
    (kt-kernel ``front-loading``).
    """
    arr = as_counts(counts)
    n_layers, n_experts = arr.shape
    left = _check_slots(n_slots, arr.size)
    out: list[ExpertId] = []
    for layer in range(n_layers):
        k = min(n_experts, left)
        out.extend((layer, e) for e in sorted(_top_in_layer(arr[layer], k)))
        left -= k
    return out


def place_per_layer_quota(counts: object, quota: Union[int, Sequence[int]]) -> list[ExpertId]:
    """Each layer's top-``quota`` experts by count (one int for all layers, or one per layer)."""
    arr = as_counts(counts)
    n_layers, n_experts = arr.shape
    quotas = [quota] * n_layers if np.ndim(quota) == 0 else list(quota)  # type: ignore[arg-type]
    if len(quotas) != n_layers or any(int(q) != q or not 0 <= q <= n_experts for q in quotas):
        raise ValueError(f"quota must be an integer or {n_layers} integers, each in 0..{n_experts}; "
                         f"got {quota!r}")
    out: list[ExpertId] = []
    for layer, q in enumerate(quotas):
        out.extend((layer, e) for e in sorted(_top_in_layer(arr[layer], int(q))))
    return out
