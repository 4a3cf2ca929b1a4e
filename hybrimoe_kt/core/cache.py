"""The expert cache: which routed experts hold a GPU slot, under per-layer quotas or one global pool.

The cache owns capacity, pinning, in-flight copies and hit counters; an ``EvictionPolicy`` only ranks
residents, and an ``AdmissionRule`` says whether a transferred expert may take a slot at all. Times are
seconds of the executor's clock (absolute), passed in by the caller: nothing here reads a real clock.

Invariants (checked by the shared contract tests):
- residents never exceed capacity (per layer, or in total for a global pool);
- an expert in use by the current forward, pinned, or whose copy is still in flight is never evicted;
- a victim is always resident.

Victim search is vectorised: besides the per-layer dicts (expert -> ready time) the cache keeps
``[L, E]`` arrays of residency and ready times, builds the candidate mask with numpy and asks the
policy's optional ``victim_masked(first_layer, mask)`` hook (same answer as ``victim`` over the
candidate list; every built-in policy has it). The hook must return the minimum of one total order
over the candidates (a key, ties by id), which lets the cache take many experts in use out lazily.
Policies without the hook get the candidate list.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Collection, Iterable, Optional, Sequence, Union

import numpy as np

from hybrimoe_kt.core.protocols import EvictionPolicy
from hybrimoe_kt.core.types import ExpertId


def _is_int(x: object) -> bool:
    """True for Python and numpy integers (not bools, not floats)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _masked_hook(policy: EvictionPolicy):  # -> Optional[Callable[[int, np.ndarray], ExpertId]]
    """The policy's ``victim_masked``, only when the class that defines ``victim`` defines it too
    (a subclass that overrides ``victim`` alone keeps its own ``victim``)."""
    for cls in type(policy).__mro__:
        if "victim" in vars(cls):
            return getattr(policy, "victim_masked") if "victim_masked" in vars(cls) else None
    return None


_EAGER_IN_USE = 16  # up to this many experts in use are taken out of the mask one by one
_LAZY_TRIES = 1     # beyond that, this many searches drop in-use winners before clearing them all


def _clear(mask: np.ndarray, first: int, in_use: Collection[ExpertId]) -> None:
    """Take the experts in use out of ``mask`` (rows from layer ``first``)."""
    n, n_e = mask.shape
    for l, e in in_use:
        i = l - first
        if 0 <= i < n and 0 <= e < n_e:
            mask[i, e] = False


class CacheFull(RuntimeError):
    """No free slot and every resident is in use, pinned or in flight."""


@dataclass(slots=True)
class CacheCounters:
    hits: int = 0        # activated and resident, weights already on the GPU
    late_hits: int = 0   # activated and resident, copy still in flight
    misses: int = 0      # activated and not resident
    admissions: int = 0
    evictions: int = 0

    @property
    def accesses(self) -> int:
        return self.hits + self.late_hits + self.misses

    @property
    def hit_rate(self) -> float:
        """Hits (late hits included) over activations; 0 when nothing was accessed."""
        a = self.accesses
        return (self.hits + self.late_hits) / a if a else 0.0


class ExpertCache:
    def __init__(
        self,
        n_layers: int,
        n_experts: int,
        capacity: Union[int, Sequence[int]],
        policy: EvictionPolicy,
        *,
        global_pool: bool = False,
    ) -> None:
        if not _is_int(n_layers) or not _is_int(n_experts) or n_layers < 1 or n_experts < 1:
            raise ValueError(f"cache needs integers n_layers >= 1 and n_experts >= 1, "
                             f"got {n_layers!r}, {n_experts!r}")
        n_layers, n_experts = int(n_layers), int(n_experts)
        if global_pool:
            if not _is_int(capacity) or not 0 <= capacity <= n_layers * n_experts:
                raise ValueError(f"global pool capacity must be an int in 0..{n_layers * n_experts}, "
                                 f"got {capacity!r}")
            capacity = int(capacity)
            quotas = [n_experts] * n_layers
        else:
            try:
                quotas = [capacity] * n_layers if _is_int(capacity) else list(capacity)  # type: ignore[arg-type]
            except TypeError:
                quotas = []
            if len(quotas) != n_layers or any(not _is_int(q) or not 0 <= q <= n_experts for q in quotas):
                raise ValueError(f"per-layer quotas must be an int or {n_layers} ints, each in 0..{n_experts}, "
                                 f"got {capacity!r}")
            quotas = [int(q) for q in quotas]
        self.n_layers = n_layers
        self.n_experts = n_experts
        self.policy = policy
        self.global_pool = global_pool
        self.quotas = quotas
        self.capacity = capacity if global_pool else sum(quotas)
        self.counters = CacheCounters()
        self._slots: list[dict[int, float]] = [{} for _ in range(n_layers)]  # expert -> ready time
        self._pinned: set[ExpertId] = set()
        self._size = 0
        # numpy mirrors of _slots and _pinned, for the vectorised candidate mask
        self._is_res = np.zeros((n_layers, n_experts), dtype=bool)  # [L, E]
        self._ready = np.zeros((n_layers, n_experts), dtype=np.float64)  # [L, E], valid where resident
        self._is_pinned = np.zeros((n_layers, n_experts), dtype=bool)  # [L, E]
        self._masked = _masked_hook(policy)

    # --- queries -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._size

    def __contains__(self, eid: ExpertId) -> bool:
        return eid[1] in self._slots[eid[0]]

    def resident(self, layer: int) -> Collection[int]:
        """Experts of ``layer`` holding a slot, copies in flight included (a live view)."""
        return self._slots[layer].keys()

    def ready_at(self, eid: ExpertId) -> float:
        return self._slots[eid[0]][eid[1]]

    def in_flight(self, layer: int, now: float) -> dict[int, float]:
        """Resident experts of ``layer`` whose copy lands after ``now``: expert -> seconds until it lands."""
        return {e: t - now for e, t in self._slots[layer].items() if t > now}

    def resident_mask(self) -> np.ndarray:
        """``[L, E]`` bool: holds a slot, copies in flight included (a live view: do not write)."""
        return self._is_res

    def landed_mask(self, t: float) -> np.ndarray:
        """``[L, E]`` bool: resident with its copy landed by ``t`` (a new array)."""
        return self._is_res & (self._ready <= t)

    def evictable_mask(self, now: float) -> np.ndarray:
        """``[L, E]`` bool: residents that may be evicted at ``now`` (landed, not pinned)."""
        m = self.landed_mask(now)
        if self._pinned:
            m &= ~self._is_pinned
        return m

    def account_landed(self, layer: int, experts: Iterable[int], t: float,
                       now: float) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The step cadence's ``account``: ``(landed, rest)`` - the ``experts`` of ``layer`` resident
        with their copy landed by ``t`` (counted as hits) and the others (misses: the CPU serves them),
        in the given order. ``now``: when the layer's MoE part starts (for subclasses that record it)."""
        slots = self._slots[layer]
        on, off = [], []
        for e in experts:
            r = slots.get(e)
            (on if r is not None and r <= t else off).append(e)
        self.counters.hits += len(on)
        self.counters.misses += len(off)
        return tuple(on), tuple(off)

    def has_room(self, layer: int) -> bool:
        if self.global_pool:
            return self._size < self.capacity
        return len(self._slots[layer]) < self.quotas[layer]

    def candidates(self, layer: int, in_use: Collection[ExpertId], now: float) -> list[ExpertId]:
        """Residents that may be evicted to make room for an expert of ``layer``."""
        layers: Iterable[int] = range(self.n_layers) if self.global_pool else (layer,)
        out = []
        for l in layers:
            for e, t in self._slots[l].items():
                eid = (l, e)
                if t <= now and eid not in in_use and eid not in self._pinned:
                    out.append(eid)
        return out

    # --- changes -------------------------------------------------------------------------------
    def _check(self, eid: ExpertId) -> None:
        if not (0 <= eid[0] < self.n_layers and 0 <= eid[1] < self.n_experts):
            raise ValueError(f"expert id {eid!r} out of range: layers 0..{self.n_layers - 1}, "
                             f"experts 0..{self.n_experts - 1}")

    def account(self, layer: int, experts: Iterable[int], now: float) -> tuple[int, int, int]:
        """Count the activated ``experts`` of one forward at ``layer`` as hits, late hits or misses."""
        slots = self._slots[layer]
        h = lh = m = 0
        for e in experts:
            t = slots.get(e)
            if t is None:
                m += 1
            elif t <= now:
                h += 1
            else:
                lh += 1
        c = self.counters
        c.hits += h
        c.late_hits += lh
        c.misses += m
        return h, lh, m

    def choose_victim(self, layer: int, in_use: Collection[ExpertId], now: float) -> Optional[ExpertId]:
        """The expert that admitting one more expert of ``layer`` would evict; None if a slot is free."""
        if self.has_room(layer):
            return None
        if self._masked is not None:
            return self._masked_victim(layer, in_use, now)
        cands = self.candidates(layer, in_use, now)
        if not cands:
            raise CacheFull(f"layer {layer}: no free slot and every resident is in use, pinned or in flight")
        victim = self.policy.victim(cands)
        if victim not in cands:
            raise RuntimeError(f"eviction policy {self.policy.name} chose {victim}, not a candidate")
        return victim

    def candidate_mask(self, layer: int, in_use: Collection[ExpertId], now: float) -> tuple[int, np.ndarray]:
        """``(first_layer, mask)``: ``mask[i, e]`` is True when ``(first_layer + i, e)`` is a candidate
        (the same set as ``candidates``); ``[1, E]`` for a layer pool, ``[L, E]`` for a global pool."""
        first, mask = self._ready_mask(layer, now)
        _clear(mask, first, in_use)
        return first, mask

    def _ready_mask(self, layer: int, now: float) -> tuple[int, np.ndarray]:
        """Candidates before the experts in use are taken out."""
        if self.global_pool:
            first, rows = 0, slice(None)
        else:
            first, rows = layer, slice(layer, layer + 1)
        mask = self._is_res[rows] & (self._ready[rows] <= now)  # [n, E]
        if self._pinned:
            mask &= ~self._is_pinned[rows]
        return first, mask

    def _masked_victim(self, layer: int, in_use: Collection[ExpertId], now: float) -> ExpertId:
        """``victim_masked`` is the minimum of a total order over the candidates, so the experts in
        use can be taken out lazily when there are many: search, and drop the winner while it is in
        use (the minimum of the rest is unchanged by removing non-minimal ones)."""
        first, mask = self._ready_mask(layer, now)
        lazy = len(in_use) > _EAGER_IN_USE
        if not lazy:
            _clear(mask, first, in_use)
        for attempt in range(_LAZY_TRIES + 1):
            if lazy and attempt == _LAZY_TRIES:  # in-use experts keep winning: take them all out
                _clear(mask, first, in_use)
            if not mask.any():
                raise CacheFull(f"layer {layer}: no free slot and every resident is in use, pinned or in flight")
            victim = self._masked(first, mask)  # type: ignore[misc]
            i = victim[0] - first
            if not (0 <= i < mask.shape[0] and mask[i, victim[1]]):
                raise RuntimeError(f"eviction policy {self.policy.name} chose {victim}, not a candidate")
            if not lazy or victim not in in_use:
                return victim
            mask[i, victim[1]] = False
        raise AssertionError("unreachable: the last attempt searches without the experts in use")

    def admit(self, eid: ExpertId, ready_at: float, in_use: Collection[ExpertId], now: float,
              victim: Optional[ExpertId] = None) -> Optional[ExpertId]:
        """Give ``eid`` a slot whose copy lands at ``ready_at``; returns the evicted expert, if any.

        ``victim`` may be passed when the caller already asked ``choose_victim`` (same arguments).
        """
        self._check(eid)
        layer, e = eid
        if e in self._slots[layer]:
            raise ValueError(f"expert {eid} is already resident")
        if victim is None and not self.has_room(layer):
            victim = self.choose_victim(layer, in_use, now)
        if victim is not None:
            self.evict(victim)
        self._slots[layer][e] = ready_at
        self._is_res[layer, e] = True
        self._ready[layer, e] = ready_at
        self._size += 1
        self.counters.admissions += 1
        self.policy.on_admit(eid)
        return victim

    def evict(self, eid: ExpertId) -> None:
        self._check(eid)
        if eid not in self:
            raise ValueError(f"cannot evict {eid}: not resident")
        if eid in self._pinned:
            raise ValueError(f"expert {eid} is pinned and cannot be evicted")
        del self._slots[eid[0]][eid[1]]
        self._is_res[eid[0], eid[1]] = False
        self._size -= 1
        self.counters.evictions += 1
        self.policy.on_evict(eid)

    def place(self, eids: Iterable[ExpertId]) -> None:
        """Initial placement at load time: free, counted as neither admission nor transfer."""
        for eid in eids:
            self._check(eid)
            layer, e = eid
            if e in self._slots[layer]:
                continue
            if not self.has_room(layer):
                raise ValueError(f"initial placement exceeds the capacity at layer {layer}")
            self._slots[layer][e] = -math.inf
            self._is_res[layer, e] = True
            self._ready[layer, e] = -math.inf
            self._size += 1
            self.policy.on_admit(eid)

    def pin(self, eid: ExpertId) -> None:
        self._check(eid)
        if eid not in self:
            raise ValueError(f"cannot pin {eid}: not resident")
        self._pinned.add(eid)
        self._is_pinned[eid[0], eid[1]] = True

    def unpin(self, eid: ExpertId) -> None:
        self._pinned.discard(eid)
        if 0 <= eid[0] < self.n_layers and 0 <= eid[1] < self.n_experts:
            self._is_pinned[eid[0], eid[1]] = False
