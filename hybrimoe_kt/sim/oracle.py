"""The ``oracle`` bound: the best clairvoyant configuration, per cache ratio.

A system that knew the future could pick any configuration. The oracle runs several clairvoyant
variants and keeps, per cache ratio, the one with the highest decode tok/s for every decode figure and
the one with the highest prefill tok/s for prefill tok/s (each a bound on its own metric; the record
names both in ``oracle_variant``):

- ``copy``: the ``oracle`` strategy itself (Belady eviction, perfect prefetch and admissions through the
  same copy queue, balanced split);
- ``static-frequency+own-counts``: the static placement learnt from the replayed requests' own
  activation counts (a clairvoyant calibration);
- every deployable strategy as it is, without host time (the project's, plus any other registered one
  the run compares, e.g. ``kt-dynamic-update``: ``oracle_variants``);
- ``hybrimoe+future-hN``: ``hybrimoe``'s own design (decode layers only look residency up; the cache
  changes once per step) with its upkeep told the true future: the value and rank of every expert are
  its exact activations over the next N tokens (``Belady.rate``), every swap that gains a hit is made
  (``STEP_FUTURE``). Without it the oracle was no bound for the step cadence: told the future, that
  design reached 1.2x the other variants' best on a small cache, because copies booked between steps
  never delay a layer while a per-layer demand load does.

Every variant pays the copy queue, PCIe and host-memory contention as the deployable strategies do,
and no host time (a bound: any implementation's host time only adds). The last group makes the oracle
bound every deployable strategy by construction; ``sim.bounds`` checks it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from hybrimoe_kt.core.strategies import StrategySpec, get_strategy, with_overrides
from hybrimoe_kt.sim.engine import RunStats
from hybrimoe_kt.sim.folds import Fold

COPY = "copy"
OWN = "+own-counts"  # suffix: the structure placed from the replayed requests' own counts
DEPLOYABLE = ("stock", "static-frequency", "lru-offload", "hybrimoe-paper", "hybrimoe-layer", "hybrimoe")
STEP_FUTURE: dict[str, dict] = {  # hybrimoe's step cadence with a clairvoyant upkeep (overrides)
    "hybrimoe+future-h4": dict(reuse_half_life=4.0, admission_margin=0.0),
    "hybrimoe+future-h8": dict(reuse_half_life=8.0, admission_margin=0.0),
}
VARIANTS: tuple[str, ...] = (COPY, "static-frequency" + OWN, *DEPLOYABLE, *STEP_FUTURE)


def oracle_variants(specs: Sequence[StrategySpec]) -> tuple[str, ...]:
    """The oracle's variants for a run of ``specs``: ``VARIANTS`` plus every other registered
    deployable strategy of the run (so that the oracle bounds it by construction too)."""
    from hybrimoe_kt.core.strategies import STRATEGIES

    extra = tuple(s.name for s in specs if s.name in STRATEGIES and not s.clairvoyant
                  and s.name not in VARIANTS and STRATEGIES[s.name] == s)
    return VARIANTS + extra


def variant_spec(oracle: StrategySpec, variant: str) -> StrategySpec:
    """The strategy a variant runs (``copy``: the oracle's own spec)."""
    if variant in STEP_FUTURE:
        return with_overrides(get_strategy("hybrimoe"), name=variant, eviction="belady", clairvoyant=True,
                              **STEP_FUTURE[variant])
    return oracle if variant == COPY else get_strategy(variant.removesuffix(OWN))


def uses_own_counts(variant: str) -> bool:
    return variant.endswith(OWN)


def own_counts(fold: Fold, n_layers: int, n_experts: int) -> np.ndarray:
    """Activation counts [L, E] of the replayed steps themselves (clairvoyant calibration)."""
    counts = np.zeros((n_layers, n_experts), dtype=np.int64)
    for (layer, e), pos in fold.uses().items():
        counts[layer, e] = len(pos)
    return counts


def best_variant(results: Sequence[tuple[str, RunStats]], decode_tok_s: Sequence[float]) -> int:
    """Index of the variant with the highest decode tok/s (the first on a tie)."""
    best: Optional[int] = None
    for i, v in enumerate(decode_tok_s):
        if best is None or v > decode_tok_s[best]:
            best = i
    assert best is not None, "no oracle variant ran"
    return best
