"""Eviction policies: rank resident experts; the ``ExpertCache`` owns capacity, pinning and counters.

Registry: ``EVICTION_POLICIES`` maps each ``EvictionName`` to its class; ``make_policy(name, **kwargs)``
builds one and turns unknown names or keyword arguments into a ``ValueError`` that lists what is
accepted. Constructors:

- ``lru``: ``LRU(n_layers, n_experts, clock=None)``
- ``lfu``: ``LFU(n_layers, n_experts, clock=None)``
- ``mrs``: ``MRS(n_layers, n_experts, top_k, alpha=0.5, p=None)`` (p defaults to ``2 * top_k``)
- ``static``: ``StaticPlacement(placement, counts, n_layers=None, n_experts=None)``
- ``belady``: ``Belady(uses, clock, n_layers=None, n_experts=None, rate_horizon=None)``
- ``reuse``: ``ReuseRate(n_layers, n_experts, half_life=32.0)``
- ``nextuse``: ``NextUse(n_layers, n_experts, top_k=1, beta=0.3)``
"""

from __future__ import annotations

import inspect
from typing import Any, Literal, get_args

from hybrimoe_kt.core.eviction.belady import Belady, belady_uses_from_routings
from hybrimoe_kt.core.eviction.lfu import LFU
from hybrimoe_kt.core.eviction.lru import LRU
from hybrimoe_kt.core.eviction.mrs import MRS
from hybrimoe_kt.core.eviction.nextuse import NextUse
from hybrimoe_kt.core.eviction.placement import (
    place_front_loading,
    place_frequency,
    place_per_layer_quota,
    place_uniform,
)
from hybrimoe_kt.core.eviction.reuse import ReuseRate
from hybrimoe_kt.core.eviction.static import StaticPlacement
from hybrimoe_kt.core.protocols import EvictionPolicy

EvictionName = Literal["lru", "lfu", "mrs", "static", "belady", "reuse", "nextuse"]

EVICTION_POLICIES: dict[str, type] = {
    "lru": LRU,
    "lfu": LFU,
    "mrs": MRS,
    "static": StaticPlacement,
    "belady": Belady,
    "reuse": ReuseRate,
    "nextuse": NextUse,
}
assert set(EVICTION_POLICIES) == set(get_args(EvictionName))
assert all(cls.name == key for key, cls in EVICTION_POLICIES.items())


def policy_kwargs(name: str) -> tuple[str, ...]:
    """The keyword arguments ``make_policy(name, ...)`` accepts, in constructor order."""
    cls = _lookup(name)
    return tuple(inspect.signature(cls).parameters)


def make_policy(name: str, **kwargs: Any) -> EvictionPolicy:
    """Build the eviction policy called ``name`` from keyword arguments (see the module docstring)."""
    cls = _lookup(name)
    sig = inspect.signature(cls)
    try:
        sig.bind(**kwargs)
    except TypeError as exc:
        required = [p for p, v in sig.parameters.items() if v.default is inspect.Parameter.empty]
        raise ValueError(f"eviction policy {name!r}: {exc}; accepted: {', '.join(sig.parameters)} "
                         f"(required: {', '.join(required) or 'none'})") from None
    return cls(**kwargs)


def _lookup(name: str) -> type:
    try:
        return EVICTION_POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; known: {', '.join(EVICTION_POLICIES)}") from None


__all__ = [
    "EVICTION_POLICIES", "Belady", "EvictionName", "LFU", "LRU", "MRS", "NextUse", "ReuseRate", "StaticPlacement",
    "belady_uses_from_routings", "make_policy", "place_front_loading", "place_frequency",
    "place_per_layer_quota", "place_uniform", "policy_kwargs",
]
