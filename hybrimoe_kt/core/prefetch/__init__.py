"""Prefetchers: background copies of experts that later layers are expected to use.

The registry maps a name to a class; ``make_prefetcher`` builds one with the arguments it needs.
"""

from __future__ import annotations

from typing import Literal, get_args

from hybrimoe_kt.core.prefetch.basic import NextScorePrefetch, NoPrefetch
from hybrimoe_kt.core.prefetch.hidden import HiddenPrefetch
from hybrimoe_kt.core.prefetch.impact import ImpactPrefetch
from hybrimoe_kt.core.prefetch.oracle import OraclePrefetch
from hybrimoe_kt.core.prefetch.predictor import RoutingPredictor

PrefetcherName = Literal["none", "next-score", "impact", "oracle", "hidden"]

PREFETCHERS: dict[str, type] = {
    "none": NoPrefetch,
    "next-score": NextScorePrefetch,
    "impact": ImpactPrefetch,
    "oracle": OraclePrefetch,
    "hidden": HiddenPrefetch,  # hints from outside: the runtime hook or the simulator's model
}
assert set(PREFETCHERS) == set(get_args(PrefetcherName))

__all__ = ["PREFETCHERS", "PrefetcherName", "NoPrefetch", "NextScorePrefetch", "ImpactPrefetch",
           "OraclePrefetch", "HiddenPrefetch", "RoutingPredictor"]
